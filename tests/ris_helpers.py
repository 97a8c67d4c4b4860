"""Shared helpers for the RIS tests: worklist entries, MWL queries, MPPS data sets, HL7."""

from __future__ import annotations

import socket
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from db.queries.worklist import add_steps
from servers.core.runtime import Suite
from servers.worklist.entries import build_entry
from tests.helpers import associate

MWL = "1.2.840.10008.5.1.4.31"
MPPS = "1.2.840.10008.3.1.2.3.3"


def add_entry(suite: Suite, **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "PatientID": "PAT001",
        "PatientName": "DOE^JOHN",
        "Modality": "CT",
        "ScheduledStationAETitle": "CT1",
        "ScheduledProcedureStepStartDate": "20240105",
        "ScheduledProcedureStepStartTime": "1000",
        "PatientBirthDate": "19700101",
        "PatientSex": "M",
    }
    base.update(values)
    entry = build_entry(base, source="test")
    with suite.db.write() as session:
        add_steps(session, [entry.record])
    return {"sps_id": entry.record.sps_id, "accession": entry.record.accession_number}


def mwl_identifier(**top: Any) -> Dataset:
    ds = Dataset()
    ds.PatientName = top.pop("PatientName", "")
    ds.PatientID = top.pop("PatientID", "")
    ds.AccessionNumber = top.pop("AccessionNumber", "")
    ds.RequestedProcedureID = ""
    sps = top.pop("sps", {})
    item = Dataset()
    item.ScheduledStationAETitle = sps.get("ScheduledStationAETitle", "")
    item.ScheduledProcedureStepStartDate = sps.get("ScheduledProcedureStepStartDate", "")
    item.ScheduledProcedureStepStartTime = sps.get("ScheduledProcedureStepStartTime", "")
    item.Modality = sps.get("Modality", "")
    item.ScheduledPerformingPhysicianName = sps.get("ScheduledPerformingPhysicianName", "")
    item.ScheduledProcedureStepID = ""
    ds.ScheduledProcedureStepSequence = [item]
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    return ds


def mwl_find(suite: Suite, identifier: Dataset) -> list[tuple[int, Dataset | None]]:
    with associate(suite, "ris_scp", [MWL]) as assoc:
        return [(int(status.Status), ds) for status, ds in assoc.send_c_find(identifier, MWL)]


def mpps_create(
    *, patient_id: str = "PAT001", accession: str = "", status: str = "IN PROGRESS", **extra: Any
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    item = Dataset()
    item.StudyInstanceUID = generate_uid()
    item.AccessionNumber = accession
    item.RequestedProcedureID = accession
    item.ReferencedStudySequence = []
    item.ScheduledProcedureStepID = ""
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20240105"
    ds.PerformedProcedureStepStartTime = "100500"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = ""
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = ""
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def mpps_final(status: str = "COMPLETED") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20240105"
    ds.PerformedProcedureStepEndTime = "103000"
    series = Dataset()
    series.PerformingPhysicianName = ""
    series.ProtocolName = "HEAD"
    series.OperatorsName = ""
    series.SeriesInstanceUID = generate_uid()
    series.SeriesDescription = ""
    series.RetrieveAETitle = ""
    series.ReferencedImageSequence = []
    series.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds.PerformedSeriesSequence = [series]
    return ds


def send_hl7(port: int, message: str, encoding: str = "utf-8") -> str:
    """One MLLP exchange: the message out, the acknowledgement back."""
    data = b"\x0b" + message.replace("\n", "\r").encode(encoding) + b"\x1c\r"
    return send_raw(port, data).decode(encoding, errors="replace")


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.strip(b"\x0b\x1c\r")
