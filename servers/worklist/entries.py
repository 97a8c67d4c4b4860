"""Worklist entries from orders: a flat mapping of DICOM keywords to a stored entry.

HL7 orders, ``dicomlab worklist add`` and ``dicomlab worklist import`` all come
through :func:`build_entry`, so the rules are the same for every source:

- Accession Number and Requested Procedure ID are one value (§C.4.2.1.4.1.1);
  it is generated when the order carries none;
- Scheduled Procedure Step ID, Study Instance UID and the Referenced Study
  Sequence are generated ("DICOMRis generated");
- Scheduled Procedure Step Status is SCHEDULED.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from db.queries.worklist import StepRecord
from db.values import normalize_time
from servers.worklist.keys import SPS_SUPPORTED_KEYS, TOP_SUPPORTED_KEYS

# Retired Detached Study Management SOP Class (PS3.4 F.7.2.1.2 note 2, digest §9).
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
REQUIRED = (
    "PatientID",
    "PatientName",
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
)
SPS_KEYWORDS = {key.keyword: key for key in SPS_SUPPORTED_KEYS.values()}
TOP_KEYWORDS = {key.keyword: key for key in TOP_SUPPORTED_KEYS.values()}
GENERATED = ("ScheduledProcedureStepStatus", "RequestedProcedureID", "ReferencedStudySequence")
DATE_RE = re.compile(r"[0-9]{8}")
TIME_RE = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")
SH_MAX = 16


class EntryError(ValueError):
    """An order that cannot become a worklist entry; the message says why."""


@dataclass(frozen=True)
class Entry:
    record: StepRecord
    dataset: Dataset


def _code_items(value: Any, keyword: str) -> list[Dataset]:
    """Code sequence items from ``{"CodeValue": ..}`` mappings or ``value^scheme^meaning``."""
    raw = value if isinstance(value, list) else [value]
    items = []
    for part in raw:
        if isinstance(part, Mapping):
            fields = (
                str(part.get("CodeValue", "")),
                str(part.get("CodingSchemeDesignator", "")),
                str(part.get("CodeMeaning", "")),
            )
        else:
            pieces = [*str(part).split("^"), "", ""]
            fields = (pieces[0], pieces[1], pieces[2])
        if not fields[0]:
            continue
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = fields
        if not item.CodingSchemeDesignator:
            raise EntryError(f"{keyword}: code {fields[0]!r} has no coding scheme designator")
        items.append(item)
    return items


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _check_date(keyword: str, value: str) -> None:
    if not DATE_RE.fullmatch(value):
        raise EntryError(f"{keyword} must be YYYYMMDD, got {value!r}")
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise EntryError(f"{keyword} is not a date: {value!r}") from None


def _set(ds: Dataset, keyword: str, value: Any, vr: str) -> None:
    if vr == "SQ":
        setattr(ds, keyword, _code_items(value, keyword))
        return
    text = _text(value)
    if vr == "DA" and text:
        _check_date(keyword, text)
    if vr == "TM" and text and not TIME_RE.fullmatch(text):
        raise EntryError(f"{keyword} must be HHMM[SS], got {text!r}")
    if vr == "US":
        if not text:
            return
        try:
            setattr(ds, keyword, int(text))
        except ValueError:
            raise EntryError(f"{keyword} must be a number, got {text!r}") from None
        return
    if vr in ("SH", "CS", "AE") and len(text) > SH_MAX:
        raise EntryError(f"{keyword} is longer than {SH_MAX} characters")
    setattr(ds, keyword, text)


def build_entry(values: Mapping[str, Any], source: str) -> Entry:
    """A worklist entry from keyword values; :class:`EntryError` when it cannot be one."""
    unknown = sorted(
        k for k in values if k not in SPS_KEYWORDS and k not in TOP_KEYWORDS and k != "sps_id"
    )
    if unknown:
        raise EntryError(f"not a worklist attribute: {', '.join(unknown)}")
    missing = [k for k in REQUIRED if not _text(values.get(k))]
    if missing:
        raise EntryError(f"missing {', '.join(missing)}")
    accession = _text(values.get("AccessionNumber")) or _text(values.get("RequestedProcedureID"))
    if not accession:
        accession = "A" + uuid.uuid4().hex[:15].upper()
    sps_id = _text(values.get("ScheduledProcedureStepID")) or "S" + uuid.uuid4().hex[:15].upper()
    study_uid = _text(values.get("StudyInstanceUID")) or generate_uid()

    ds = Dataset()
    item = Dataset()
    for keyword, value in values.items():
        if keyword in GENERATED or keyword == "sps_id":
            continue
        if keyword in SPS_KEYWORDS:
            _set(item, keyword, value, SPS_KEYWORDS[keyword].vr)
        else:
            _set(ds, keyword, value, TOP_KEYWORDS[keyword].vr)
    ds.AccessionNumber = accession
    ds.RequestedProcedureID = accession
    item.ScheduledProcedureStepID = sps_id
    item.ScheduledProcedureStepStatus = "SCHEDULED"
    ds.StudyInstanceUID = study_uid
    ref = Dataset()
    ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    ref.ReferencedSOPInstanceUID = study_uid
    ds.ReferencedStudySequence = [ref]
    # Type 1C pairs (K.6-1): a description when no code sequence says what to do.
    if not ds.get("RequestedProcedureDescription") and not ds.get("RequestedProcedureCodeSequence"):
        ds.RequestedProcedureDescription = "Requested procedure"
    if not item.get("ScheduledProcedureStepDescription") and not item.get(
        "ScheduledProtocolCodeSequence"
    ):
        item.ScheduledProcedureStepDescription = str(
            ds.get("RequestedProcedureDescription") or "Scheduled procedure step"
        )
    for keyword in ("AccessionNumber", "ScheduledProcedureStepID"):
        holder = item if keyword in SPS_KEYWORDS else ds
        if len(str(holder.get(keyword))) > SH_MAX:
            raise EntryError(f"{keyword} is longer than {SH_MAX} characters")
    ds.ScheduledProcedureStepSequence = [item]
    name = str(ds.PatientName)
    record = StepRecord(
        sps_id=sps_id,
        accession_number=accession,
        patient_id=str(ds.PatientID),
        patient_name=name,
        patient_name_key=name_key(name),
        modality=str(item.Modality),
        station_ae=str(item.ScheduledStationAETitle),
        start_date=str(item.ScheduledProcedureStepStartDate),
        start_time=normalize_time(item.ScheduledProcedureStepStartTime),
        performing_physician=str(item.get("ScheduledPerformingPhysicianName", "") or ""),
        study_instance_uid=study_uid,
        dataset=ds.to_json_dict(),
        placer_order_number=str(ds.get("PlacerOrderNumberImagingServiceRequest", "") or ""),
        source=source,
    )
    return Entry(record=record, dataset=ds)


def alphabetic(name: str) -> str:
    """The alphabetic component group of a PN value, without trailing ``^`` and spaces."""
    return name.split("=")[0].rstrip("^ ")


def name_key(name: str) -> str:
    """The case-insensitive matching form of a Patient's Name (Unicode case folding)."""
    return alphabetic(name).casefold()
