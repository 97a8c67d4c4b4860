"""Modality Worklist C-FIND SCP (Annex C §C.4.2.1.4.1, Table C.4.2-8; digest §3).

Order of checks (digest §3.6): decode the identifier, check it against the
information model (A900), query the database and count (C001, A700), then
stream one pending response per matching step with cancel checks, then 0000.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from sqlalchemy.exc import SQLAlchemyError

from db.queries.worklist import StepCandidate, StepFilter, candidate_steps, step_datasets
from db.values import normalize_time, valid_date
from servers.core import logs
from servers.core.context import ServiceContext
from servers.core.declaration import (
    CANCEL,
    FAILURE,
    PENDING,
    REFUSED,
    SUCCESS,
    StatusRow,
    StatusTable,
)
from servers.core.dimse import CancelLatch
from servers.core.query_values import (
    ESC,
    TEXT_VRS,
    CharsetError,
    decode_text,
    query_encodings,
    time_bounds,
)
from servers.worklist.entries import alphabetic
from servers.worklist.keys import (
    CONTROL_KEYS,
    SPS_OTHER_KEYS,
    SPS_SEQUENCE_TAG,
    SPS_SUPPORTED_KEYS,
    TOP_OTHER_KEYS,
    TOP_SUPPORTED_KEYS,
    Key,
)

C_FIND_STATUSES = StatusTable(
    "C-FIND",
    [
        StatusRow(
            0x0000,
            SUCCESS,
            "Matching is complete",
            "Sent after the last pending response, or alone when no scheduled procedure "
            "step matches. It carries no identifier.",
        ),
        StatusRow(
            0xA700,
            REFUSED,
            "Out of resources",
            "More scheduled procedure steps match than the configured maximum "
            "(`max_matches`). No pending response is sent; Error Comment says how many "
            "matches are allowed.",
        ),
        StatusRow(
            0xA900,
            FAILURE,
            "Identifier does not match SOP class",
            "The identifier holds an attribute outside the Modality Worklist Information "
            "Model (not in a module of PS3.4 Table K.6-1, including every private "
            "attribute), Scheduled Procedure Step Sequence has more than one item, a "
            "date or time key value is not a valid DA/TM value or range, or the "
            "identifier cannot be decoded. Offending Element lists the attributes; no "
            "pending response is sent.",
        ),
        StatusRow(
            0xC001,
            FAILURE,
            "Unable to process",
            "The worklist database could not be searched, or a key value holds "
            "characters outside ASCII in a Specific Character Set this AE cannot decode "
            "(or bytes invalid in it). No pending response is sent.",
        ),
        StatusRow(
            0xFE00,
            CANCEL,
            "Matching terminated due to cancel request",
            "The SCU sent a C-CANCEL-FIND-RQ for this request before the last match was "
            "sent; no further pending response is sent and this final response carries "
            "no identifier.",
        ),
        StatusRow(
            0xFF00,
            PENDING,
            "Matches are continuing - current match is supplied and any optional keys "
            "were supported in the same manner as required keys",
            "Sent with each match when every key of the identifier is a supported key "
            "and no optional matching key has a value.",
        ),
        StatusRow(
            0xFF01,
            PENDING,
            "Matches are continuing - warning that one or more optional keys were not "
            "supported for existence for this identifier",
            "Sent with each match instead of FF00 when the identifier holds an optional "
            "matching key with a value other than zero-length or `*` (the value is not "
            "used for matching and the stored value is returned), or an attribute of "
            "the model that this AE does not return.",
        ),
    ],
)

SUCCESS_ROW = C_FIND_STATUSES[0x0000]
OUT_OF_RESOURCES = C_FIND_STATUSES[0xA700]
IDENTIFIER_INVALID = C_FIND_STATUSES[0xA900]
UNABLE_TO_PROCESS = C_FIND_STATUSES[0xC001]
CANCELLED = C_FIND_STATUSES[0xFE00]
PENDING_ALL_SUPPORTED = C_FIND_STATUSES[0xFF00]
PENDING_UNSUPPORTED = C_FIND_STATUSES[0xFF01]

LATIN_1 = "ISO_IR 100"
UTF_8 = "ISO_IR 192"
TIME_MAX = "235959.999999"


class FindError(Exception):
    """A request answered with a failure status and no pending responses."""

    def __init__(self, row: StatusRow, comment: str, offending: tuple[int, ...] = ()) -> None:
        super().__init__(comment)
        self.row = row
        self.comment = comment
        self.offending = offending

    def status(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.row.code
        ds.ErrorComment = self.comment[:64]  # LO
        if self.offending:
            ds.OffendingElement = list(self.offending)
        return ds


@dataclass
class Pattern:
    """A single value or wildcard pattern on one column."""

    value: str
    regex: re.Pattern[str] | None = None

    @classmethod
    def of(cls, value: str, fold: bool = False) -> Pattern:
        if fold:
            value = value.casefold()
        if "*" in value or "?" in value:
            parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value]
            return cls(value, re.compile("".join(parts), re.DOTALL))
        return cls(value)

    def matches(self, stored: str) -> bool:
        if not stored:
            return False  # K.2.2.1.1.1: an unknown value fails every non-universal key
        if self.regex is not None:
            return self.regex.fullmatch(stored) is not None
        return stored == self.value


@dataclass
class WorklistQuery:
    patterns: dict[str, Pattern] = field(default_factory=dict)
    date_range: tuple[str, str] | None = None
    time_range: tuple[str, str] | None = None
    top_keys: list[Key] = field(default_factory=list)
    sps_keys: list[Key] = field(default_factory=list)
    sps_requested: bool = False
    unsupported: list[str] = field(default_factory=list)

    def database_filter(self) -> StepFilter:
        equal: dict[str, str] = {}
        wildcard: dict[str, str] = {}
        prefix: dict[str, str] = {}
        for name, p in self.patterns.items():
            if name == "performing_physician":
                # Matched on the alphabetic group, a prefix of the stored value:
                # SQL narrows, :meth:`matches` decides.
                prefix[name] = p.value
            elif p.regex is None:
                equal[SQL_COLUMNS[name]] = p.value
            else:
                wildcard[SQL_COLUMNS[name]] = p.value
        low, high = self.date_range or ("", "")
        return StepFilter(
            equal=equal, wildcard=wildcard, prefix=prefix, date_low=low, date_high=high
        )

    def matches(self, step: StepCandidate) -> bool:
        """The rules :meth:`database_filter` leaves to Python, on a candidate row."""
        physician = self.patterns.get("performing_physician")
        if physician is not None and not physician.matches(alphabetic(step.performing_physician)):
            return False
        when_time = step.start_time or ""
        if self.date_range is not None:
            if not step.start_date:
                return False
            t_low, t_high = self.time_range or ("", TIME_MAX)
            d_low, d_high = self.date_range
            low = (d_low or "00000000", t_low) if d_low else ("", "")
            high = (d_high or "99999999", t_high) if d_high else ("99999999", TIME_MAX)
            return low <= (step.start_date, when_time) <= high
        if self.time_range is not None:
            if not when_time:
                return False
            return self.time_range[0] <= when_time <= self.time_range[1]
        return True


# --- decoding ---------------------------------------------------------------------------


def _text(element: DataElement | RawDataElement, vr: str, encodings: list[str] | None) -> str:
    """One element's value as text; "" for zero-length."""
    value = element.value
    tag = int(element.tag)
    if value is None:
        return ""
    if isinstance(value, bytes):
        if value.isascii() and ESC not in value:
            return value.decode("ascii").strip(" \0")
        if vr not in TEXT_VRS:
            raise FindError(IDENTIFIER_INVALID, "a value is not ASCII", (tag,))
        try:
            text = decode_text(value, vr, encodings)
        except CharsetError as error:
            if error.unsupported:
                raise FindError(
                    UNABLE_TO_PROCESS, "Specific Character Set not supported", (0x00080005,)
                ) from None
            raise FindError(
                UNABLE_TO_PROCESS, "value invalid in its character set", (tag,)
            ) from None
        return text.strip(" \0")
    if isinstance(value, str):
        return value.strip(" \0")
    try:
        return "\\".join(str(v) for v in value).strip(" \0")
    except TypeError:
        return str(value).strip(" \0")


def _time_bounds(value: str) -> tuple[str, str] | None:
    """Legacy ``HH:MM:SS`` colons allowed; the low bound normalised as stored times are."""
    bounds = time_bounds(value.replace(":", ""))
    if bounds is None:
        return None
    return normalize_time(bounds[0]), bounds[1]


def _date_range(value: str, tag: int) -> tuple[str, str]:
    if "-" in value:
        low, _, high = value.partition("-")
    else:
        low = high = value
    if not (low or high) or not all(valid_date(v) for v in (low, high) if v):
        raise FindError(
            IDENTIFIER_INVALID, "invalid date in Scheduled Procedure Step Start Date", (tag,)
        )
    return low, high


def _time_range(value: str, tag: int) -> tuple[str, str]:
    if "-" in value:
        low_text, _, high_text = value.partition("-")
        low = _time_bounds(low_text) if low_text else ("", "")
        high = _time_bounds(high_text) if high_text else ("", TIME_MAX)
        if low is None or high is None or not (low_text or high_text) or low[0] > high[1]:
            raise FindError(IDENTIFIER_INVALID, "invalid time range in SPS Start Time", (tag,))
        return low[0], high[1]
    bounds = _time_bounds(value)
    if bounds is None:
        raise FindError(IDENTIFIER_INVALID, "invalid time in SPS Start Time", (tag,))
    return bounds


def _universal(value: str) -> bool:
    return value == "" or value.strip("*") == ""


def _has_value(parent: Dataset, tag: int, vr: str, enc: list[str] | None) -> bool:
    """Whether an optional key carries a matching value (sequences: any value inside)."""
    if vr == "SQ":
        try:
            items = parent[tag].value
        except Exception:
            return True
        for item in items or ():
            for sub_tag in list(item.keys()):
                sub = item.get_item(sub_tag)
                if sub is not None and _has_value(item, int(sub_tag), str(sub.VR or "UN"), enc):
                    return True
        return False
    element = parent.get_item(tag)
    return element is not None and not _universal(_text(element, vr, enc))


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


MATCH_COLUMNS = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "Modality": "modality",
    "ScheduledStationAETitle": "station_ae",
    "ScheduledPerformingPhysicianName": "performing_physician",
}
# Patient's Name is matched on the stored case-folded alphabetic group.
SQL_COLUMNS = {**{c: c for c in MATCH_COLUMNS.values()}, "patient_name": "patient_name_key"}


def _match_key(query: WorklistQuery, key: Key, value: str) -> None:
    if key.keyword == "ScheduledProcedureStepStartDate":
        if not _universal(value):
            query.date_range = _date_range(value, key.tag)
        return
    if key.keyword == "ScheduledProcedureStepStartTime":
        if not _universal(value):
            query.time_range = _time_range(value, key.tag)
        return
    if _universal(value):
        return
    if key.vr == "PN":
        value = alphabetic(value)
    query.patterns[MATCH_COLUMNS[key.keyword]] = Pattern.of(
        value, fold=key.keyword == "PatientName"
    )


def parse_identifier(identifier: Dataset) -> WorklistQuery:
    """Validate the identifier against the model; raises :class:`FindError`."""
    encodings = query_encodings(identifier)
    query = WorklistQuery()
    outside: list[int] = []
    for raw_tag in list(identifier.keys()):
        tag = BaseTag(raw_tag)
        if tag.element == 0 or tag.group == 0x0002 or int(tag) in CONTROL_KEYS:
            continue
        element = identifier.get_item(tag)
        if element is None:
            continue
        if int(tag) == SPS_SEQUENCE_TAG:
            _parse_sps(identifier, query, encodings, outside)
            continue
        key = TOP_SUPPORTED_KEYS.get(int(tag))
        if key is None:
            if int(tag) in TOP_OTHER_KEYS:
                query.unsupported.append(TOP_OTHER_KEYS[int(tag)].keyword)
            else:
                outside.append(int(tag))
            continue
        query.top_keys.append(key)
        if key.keyword in MATCH_COLUMNS:
            _match_key(query, key, _text(element, key.vr, encodings))
        elif _has_value(identifier, int(tag), key.vr, encodings):
            query.unsupported.append(key.keyword)  # optional matching key with a value
    if outside:
        raise FindError(
            IDENTIFIER_INVALID,
            "attributes outside the Modality Worklist Information Model",
            tuple(outside),
        )
    return query


def _parse_sps(
    identifier: Dataset, query: WorklistQuery, encodings: list[str] | None, outside: list[int]
) -> None:
    query.sps_requested = True
    items = identifier[SPS_SEQUENCE_TAG].value or []
    if len(items) > 1:
        raise FindError(
            IDENTIFIER_INVALID,
            "Scheduled Procedure Step Sequence has several items",
            (SPS_SEQUENCE_TAG,),
        )
    if not items or not list(items[0].keys()):
        query.sps_keys = list(SPS_SUPPORTED_KEYS.values())  # universal: the whole item
        return
    item = items[0]
    for raw_tag in list(item.keys()):
        tag = BaseTag(raw_tag)
        if tag.element == 0 or int(tag) in CONTROL_KEYS:
            continue
        element = item.get_item(tag)
        if element is None:
            continue
        key = SPS_SUPPORTED_KEYS.get(int(tag))
        if key is None:
            if int(tag) in SPS_OTHER_KEYS:
                query.unsupported.append(SPS_OTHER_KEYS[int(tag)].keyword)
            else:
                outside.append(int(tag))
            continue
        query.sps_keys.append(key)
        if key.keyword in MATCH_COLUMNS or key.keyword.startswith("ScheduledProcedureStepStart"):
            _match_key(query, key, _text(element, key.vr, encodings))
        elif _has_value(item, int(tag), key.vr, encodings):
            query.unsupported.append(key.keyword)


# --- responses -----------------------------------------------------------------------


def _json_tag(tag: int) -> str:
    return f"{tag:08X}"


def _pick(stored: dict[str, Any], keys: list[Key]) -> dict[str, Any]:
    """The requested keys of a stored entry (DICOM JSON), zero-length when it has none:
    only these are decoded into a data set, not the whole entry."""
    return {_json_tag(k.tag): stored.get(_json_tag(k.tag)) or {"vr": k.vr} for k in keys}


def _needs(values: Dataset) -> str:
    """The Specific Character Set a response needs: Latin-1 when it holds all its text."""
    for element in values.iterall():
        if element.VR in TEXT_VRS and element.value is not None:
            text = str(element.value)
            try:
                text.encode("latin_1")
            except UnicodeEncodeError:
                return UTF_8
    return LATIN_1


def build_response(query: WorklistQuery, stored: dict[str, Any]) -> Dataset:
    """One pending identifier: the requested supported keys, zero-length when unknown.

    ``stored`` is the step's entry as DICOM JSON (``ScheduledStep.dataset``).
    """
    picked = _pick(stored, query.top_keys)
    if query.sps_requested:
        items = stored.get(_json_tag(SPS_SEQUENCE_TAG), {}).get("Value") or [{}]
        picked[_json_tag(SPS_SEQUENCE_TAG)] = {
            "vr": "SQ",
            "Value": [_pick(items[0], query.sps_keys)],
        }
    response = Dataset.from_json(picked)
    # pydicom writes elements in tag order, so (0008,0005) still goes first.
    response.SpecificCharacterSet = _needs(response)
    return response


# --- handler -------------------------------------------------------------------------


def between_matches(is_cancelled: Callable[[], bool]) -> None:
    """Runs after each pending response; the cancel test replaces it to wait for C-CANCEL."""


FindResult = tuple[Dataset | int, Dataset | None]


def make_find_handler(ctx: ServiceContext) -> Callable[[Any], Iterator[FindResult]]:
    max_matches = int(ctx.settings.get("max_matches", 100))
    check_every = max(1, int(ctx.settings.get("cancel_check_interval", 1)))

    def handle_find(event: Any) -> Iterator[FindResult]:
        log = logs.assoc_logger(event.assoc).bind(operation="C-FIND", sop_class="MWL")
        try:
            try:
                query = parse_identifier(event.identifier)
            except FindError:
                raise
            except Exception as exc:  # pydicom raises many kinds on a broken identifier
                raise FindError(IDENTIFIER_INVALID, "identifier cannot be decoded") from exc
            stored: dict[int, dict[str, Any]] = {}
            with ctx.db.read() as session:
                steps = [
                    s for s in candidate_steps(session, query.database_filter()) if query.matches(s)
                ]
                # Entries are loaded only for an answer that will be sent (not A700).
                if len(steps) <= max_matches:
                    stored = step_datasets(session, [s.id for s in steps])
                    steps = [s for s in steps if s.id in stored]
        except FindError as error:
            log.warning(
                "c_find_handled",
                status=f"0x{error.row.code:04X}",
                reason=error.comment,
                offending=[_tag_text(t) for t in error.offending],
            )
            yield error.status(), None
            return
        except (SQLAlchemyError, OSError, MemoryError) as exc:
            log.error(
                "c_find_handled",
                status=f"0x{UNABLE_TO_PROCESS.code:04X}",
                reason=f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            )
            yield FindError(UNABLE_TO_PROCESS, "worklist database unavailable").status(), None
            return
        fields: dict[str, Any] = {"matches": len(steps)}
        if query.unsupported:
            fields["unsupported"] = query.unsupported
        if len(steps) > max_matches:
            log.warning("c_find_handled", status=f"0x{OUT_OF_RESOURCES.code:04X}", **fields)
            comment = f"{len(steps)} matches exceed the maximum of {max_matches}"
            yield FindError(OUT_OF_RESOURCES, comment).status(), None
            return
        row = PENDING_UNSUPPORTED if query.unsupported else PENDING_ALL_SUPPORTED
        cancelled = CancelLatch(event)
        sent = 0
        for step in steps:
            if sent % check_every == 0 and cancelled():
                log.info("c_find_handled", status=f"0x{CANCELLED.code:04X}", sent=sent, **fields)
                yield CANCELLED.code, None
                return
            response = build_response(query, stored[step.id])
            log.debug("c_find_pending", status=f"0x{row.code:04X}", sps_id=step.sps_id)
            yield row.code, response
            sent += 1
            between_matches(cancelled)
        if sent and cancelled():
            log.info("c_find_handled", status=f"0x{CANCELLED.code:04X}", sent=sent, **fields)
            yield CANCELLED.code, None
            return
        log.info("c_find_handled", status=f"0x{SUCCESS_ROW.code:04X}", sent=sent, **fields)
        yield SUCCESS_ROW.code, None

    return handle_find
