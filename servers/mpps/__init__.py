"""Modality Performed Procedure Step SCP (Annex C §C.4.2.1.4.2, Table C.4.2-11; digest §4).

State machine: N-CREATE makes a step IN PROGRESS; N-SET may change it to
COMPLETED or DISCONTINUED, after which nothing changes it. Every accepted
message is stored as received; a rejected one changes nothing. Steps are
matched against the worklist on Patient ID and the Accession Numbers of the
Scheduled Step Attribute Sequence; unmatched steps are kept as exceptions.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from db.models import PerformedStep, PpsState, utcnow
from db.queries import mpps as q
from db.queries.worklist import patient_known, set_procedure_state, steps_for_order
from servers.core import logs
from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import (
    FAILURE,
    SUCCESS,
    ContextRow,
    ServiceDeclaration,
    StatementSection,
    StatusRow,
    StatusTable,
)
from servers.core.hookspecs import hookimpl
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE

NAME = "mpps"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
FINAL_COMMENT = "Performed Procedure Step Object may no longer be updated"
ERROR_ID_FINAL = 0xA710
UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

N_CREATE_STATUSES = StatusTable(
    "N-CREATE",
    [
        StatusRow(
            0x0000,
            SUCCESS,
            "Successful completion of the N-CREATE Request",
            "The step was created IN PROGRESS and the message stored, whether or not it "
            "matched the worklist (an unmatched step is kept as an exception).",
        ),
        StatusRow(
            0x0106,
            FAILURE,
            "Invalid Attribute Value",
            "Performed Procedure Step Status is not IN PROGRESS (PS3.4 F.7.2.1.3), or the "
            "attribute list cannot be decoded. Nothing is stored.",
        ),
        StatusRow(
            0x0110,
            FAILURE,
            "Processing Failure",
            "Internal error: the database could not store the step. Error Comment says "
            "so; nothing is stored.",
        ),
        StatusRow(
            0x0111,
            FAILURE,
            "Duplicate SOP Instance",
            "A step with this Affected SOP Instance UID already exists (or existed and was "
            "not yet purged). The stored step is unchanged.",
        ),
        StatusRow(
            0x0117,
            FAILURE,
            "Invalid SOP Instance",
            "The Affected SOP Instance UID is longer than 64 characters or breaks the UID "
            "construction rules. Nothing is stored.",
        ),
        StatusRow(
            0x0120,
            FAILURE,
            "Missing Attribute",
            "A Type 1 attribute of PS3.4 Table F.7.2-1 is absent or empty: Scheduled Step "
            "Attribute Sequence (at least one item, each with Study Instance UID), "
            "Performed Procedure Step ID, Performed Station AE Title, Performed Procedure "
            "Step Start Date and Start Time, Performed Procedure Step Status or Modality. "
            "Error Comment names them; nothing is stored.",
        ),
    ],
)

N_SET_STATUSES = StatusTable(
    "N-SET",
    [
        StatusRow(
            0x0000,
            SUCCESS,
            "Successful completion of the N-SET Request",
            "The step was IN PROGRESS; the modifications were applied and the message stored.",
        ),
        StatusRow(
            0x0106,
            FAILURE,
            "Invalid Attribute Value",
            "Performed Procedure Step Status is not IN PROGRESS, COMPLETED or "
            "DISCONTINUED, or the modification list cannot be decoded. The step is "
            "unchanged.",
        ),
        StatusRow(
            0x0110,
            FAILURE,
            "Processing Failure",
            "The step is already COMPLETED or DISCONTINUED: Error Comment is "
            f'"{FINAL_COMMENT}" and Error ID is A710 (PS3.4 F.7.2.2.4); or an internal '
            "error (the database could not store the change), with Error Comment saying "
            "so. The step is unchanged.",
        ),
        StatusRow(
            0x0112,
            FAILURE,
            "No such SOP Instance",
            "No step with the Requested SOP Instance UID exists: never created, or purged.",
        ),
        StatusRow(
            0x0120,
            FAILURE,
            "Missing Attribute",
            "The N-SET sets COMPLETED or DISCONTINUED, but after it the step would lack a "
            "final-state attribute: Performed Procedure Step End Date, End Time, or a "
            "Performed Series Sequence with at least one item, each with Protocol Name "
            "and Series Instance UID. Error Comment names them; the step is unchanged.",
        ),
    ],
)

TYPE1_CREATE = (
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)
# "N" in Table C.4.2-10: an N-SET value is ignored (logged), the N-CREATE value kept.
NOT_SETTABLE = frozenset(
    {
        "SpecificCharacterSet",
        "ScheduledStepAttributesSequence",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferencedPatientSequence",
        "PerformedProcedureStepID",
        "PerformedStationAETitle",
        "PerformedStationName",
        "PerformedLocation",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "Modality",
        "StudyID",
    }
)
STATES = {s.value: s for s in PpsState}


class MppsError(Exception):
    def __init__(self, row: StatusRow, comment: str, error_id: int | None = None) -> None:
        super().__init__(comment)
        self.row = row
        self.comment = comment
        self.error_id = error_id

    def status(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.row.code
        ds.ErrorComment = self.comment[:64]
        if self.error_id is not None:
            ds.ErrorID = self.error_id
        return ds


@dataclass(frozen=True)
class MppsSettings:
    purge_days: float
    # Performed Station AE Title (or calling AE, or "*") -> event -> procedure state.
    procedure_states: Mapping[str, Mapping[str, str]]
    removal_state: str
    maintenance_interval: float

    @classmethod
    def from_config(cls, config: Config) -> MppsSettings:
        raw = config.service_settings(NAME)
        states = raw.get("procedure_states", {})
        return cls(
            purge_days=float(raw.get("purge_days", 30)),
            procedure_states={str(k): dict(v) for k, v in states.items()},
            removal_state=str(
                config.service_settings("worklist").get("removal_state", "PROCEDURE STARTED")
            ),
            maintenance_interval=float(raw.get("maintenance_interval", 3600)),
        )

    def state_for(self, station: str, calling: str, event_name: str) -> str:
        for key in (station, calling, "*"):
            if key in self.procedure_states:
                return str(self.procedure_states[key].get(event_name, ""))
        return ""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _exists(ctx: ServiceContext, uid: str) -> bool:
    try:
        with ctx.db.read() as session:
            return q.get_step(session, uid) is not None
    except SQLAlchemyError:
        return False


def _json(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict()


def _decode(ds: Dataset) -> Dataset:
    """Force decoding of every element (raises on an undecodable value)."""
    ds.decode()
    for element in ds.iterall():
        _ = element.value
    return ds


def _missing_create(ds: Dataset) -> list[str]:
    missing = [k for k in TYPE1_CREATE if not _text(ds, k)]
    items = ds.get("ScheduledStepAttributesSequence")
    if not items:
        missing.insert(0, "ScheduledStepAttributesSequence")
    elif any(not _text(item, "StudyInstanceUID") for item in items):
        missing.insert(0, ">StudyInstanceUID")
    return missing


def _missing_final(ds: Dataset) -> list[str]:
    missing = [
        k
        for k in ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")
        if not _text(ds, k)
    ]
    series = ds.get("PerformedSeriesSequence")
    if not series:
        missing.append("PerformedSeriesSequence")
    else:
        for keyword in ("ProtocolName", "SeriesInstanceUID"):
            if any(not _text(item, keyword) for item in series):
                missing.append(f">{keyword}")
    return missing


def _accessions(ds: Dataset) -> list[str]:
    return [
        _text(item, "AccessionNumber") for item in ds.get("ScheduledStepAttributesSequence", [])
    ]


def _match(session: Any, ds: Dataset) -> tuple[bool, list[str]]:
    """Whether the step matches the worklist, and the exception reasons to record."""
    patient_id = _text(ds, "PatientID")
    accessions = [a for a in _accessions(ds) if a]
    if not patient_id or not patient_known(session, patient_id):
        return False, [f"Patient ID {patient_id!r} matches no order"]
    if not accessions:
        return False, ["no Accession Number in Scheduled Step Attribute Sequence"]
    steps = steps_for_order(session, patient_id, accessions)
    found = {s.accession_number for s in steps}
    unknown = [a for a in accessions if a not in found]
    if unknown:
        return False, [f"Accession Number {', '.join(unknown)} matches no order of {patient_id}"]
    reasons = []
    order = Dataset.from_json(steps[0].dataset)
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex"):
        sent, held = _text(ds, keyword), _text(order, keyword)
        if sent and held and sent != held:
            reasons.append(f"demographic mismatch: {keyword} {sent!r} != order {held!r}")
    return True, reasons


def make_handlers(ctx: ServiceContext) -> Mapping[Any, Callable[..., Any]]:
    settings = MppsSettings.from_config(ctx.config)

    def apply_state(session: Any, step: PerformedStep, event_name: str) -> str:
        if not step.matched:
            return ""
        state = settings.state_for(step.performed_station_ae, step.calling_ae, event_name)
        if state:
            accessions = [a for a in step.accession_numbers.split("\\") if a]
            set_procedure_state(session, accessions, state, settings.removal_state)
        return state

    def handle_create(event: Any) -> tuple[Any, Dataset | None]:
        log = logs.assoc_logger(event.assoc).bind(operation="N-CREATE")
        calling = str(event.assoc.requestor.ae_title).strip()
        uid = event.request.AffectedSOPInstanceUID
        assigned = uid is None
        uid = str(uid) if uid is not None else generate_uid()
        try:
            if len(uid) > 64 or not UID_RE.fullmatch(uid):
                raise MppsError(N_CREATE_STATUSES[0x0117], "invalid Affected SOP Instance UID")
            try:
                ds = _decode(event.attribute_list)
                received = _json(ds)
            except Exception as exc:
                raise MppsError(
                    N_CREATE_STATUSES[0x0106], "attribute list cannot be decoded"
                ) from exc
            with ctx.db.write() as session:
                if q.get_step(session, uid) is not None:
                    raise MppsError(N_CREATE_STATUSES[0x0111], "SOP Instance already exists")
                missing = _missing_create(ds)
                if missing:
                    raise MppsError(N_CREATE_STATUSES[0x0120], "missing " + ", ".join(missing))
                status_value = _text(ds, "PerformedProcedureStepStatus")
                if status_value != PpsState.IN_PROGRESS.value:
                    raise MppsError(
                        N_CREATE_STATUSES[0x0106], "Performed Procedure Step Status not IN PROGRESS"
                    )
                matched, reasons = _match(session, ds)
                step = q.create_step(
                    session,
                    sop_instance_uid=uid,
                    patient_id=_text(ds, "PatientID"),
                    accession_numbers=_accessions(ds),
                    performed_station_ae=_text(ds, "PerformedStationAETitle"),
                    calling_ae=calling,
                    matched=matched,
                    dataset=received,
                )
                q.add_message(session, step, "N-CREATE", calling, received)
                for reason in reasons:
                    q.add_exception(session, step, reason)
                state = apply_state(session, step, "n_create")
        except MppsError as error:
            log.warning(
                "n_create_handled", status=f"0x{error.row.code:04X}", uid=uid, reason=error.comment
            )
            return error.status(), None
        except IntegrityError as exc:
            # Another process created the same step between our check and our insert:
            # the unique SOP Instance UID refused the second row.
            if _exists(ctx, uid):
                log.warning("n_create_handled", status="0x0111", uid=uid, reason="concurrent")
                return MppsError(
                    N_CREATE_STATUSES[0x0111], "SOP Instance already exists"
                ).status(), None
            log.error("n_create_handled", status="0x0110", uid=uid, reason=type(exc).__name__)
            return MppsError(N_CREATE_STATUSES[0x0110], "internal error: database").status(), None
        except SQLAlchemyError as exc:
            log.error("n_create_handled", status="0x0110", uid=uid, reason=type(exc).__name__)
            return MppsError(N_CREATE_STATUSES[0x0110], "internal error: database").status(), None
        log.info(
            "n_create_handled",
            status="0x0000",
            uid=uid,
            matched=matched,
            exceptions=reasons,
            procedure_state=state,
        )
        if assigned:
            reply = Dataset()
            reply.AffectedSOPInstanceUID = uid
            return N_CREATE_STATUSES[0x0000].code, reply
        return N_CREATE_STATUSES[0x0000].code, None

    def handle_set(event: Any) -> tuple[Any, Dataset | None]:
        log = logs.assoc_logger(event.assoc).bind(operation="N-SET")
        calling = str(event.assoc.requestor.ae_title).strip()
        uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            with ctx.db.write() as session:
                step = q.get_step(session, uid, for_update=True)
                if step is None:
                    raise MppsError(N_SET_STATUSES[0x0112], "no such SOP Instance")
                if step.state is not PpsState.IN_PROGRESS:
                    raise MppsError(N_SET_STATUSES[0x0110], FINAL_COMMENT, ERROR_ID_FINAL)
                try:
                    mods = _decode(event.modification_list)
                    received = _json(mods)
                except Exception as exc:
                    raise MppsError(
                        N_SET_STATUSES[0x0106], "modification list cannot be decoded"
                    ) from exc
                new_status = _text(mods, "PerformedProcedureStepStatus") or step.state.value
                if new_status not in STATES:
                    raise MppsError(
                        N_SET_STATUSES[0x0106], "invalid Performed Procedure Step Status"
                    )
                merged = Dataset.from_json(step.dataset)
                ignored = []
                for element in mods:
                    if element.keyword in NOT_SETTABLE:
                        ignored.append(element.keyword)
                        continue
                    merged[element.tag] = element
                new_state = STATES[new_status]
                if new_state is not PpsState.IN_PROGRESS:
                    missing = _missing_final(merged)
                    if missing:
                        raise MppsError(N_SET_STATUSES[0x0120], "missing " + ", ".join(missing))
                step.dataset = _json(merged)
                step.state = new_state
                q.touch(step)
                q.add_message(session, step, "N-SET", calling, received)
                if not step.matched:
                    q.add_exception(session, step, f"N-SET ({new_status}) of an unmatched step")
                state = ""
                if new_state is not PpsState.IN_PROGRESS:
                    step.final_at = utcnow()
                    state = apply_state(session, step, new_state.value.lower())
        except MppsError as error:
            log.warning(
                "n_set_handled", status=f"0x{error.row.code:04X}", uid=uid, reason=error.comment
            )
            return error.status(), None
        except SQLAlchemyError as exc:
            log.error("n_set_handled", status="0x0110", uid=uid, reason=type(exc).__name__)
            return MppsError(N_SET_STATUSES[0x0110], "internal error: database").status(), None
        log.info(
            "n_set_handled",
            status="0x0000",
            uid=uid,
            pps_status=new_status,
            ignored=ignored,
            procedure_state=state,
        )
        return N_SET_STATUSES[0x0000].code, None

    return {evt.EVT_N_CREATE: handle_create, evt.EVT_N_SET: handle_set}


class Maintenance:
    """Purges performed steps after the purge period (digest C8), every interval."""

    def __init__(self, ctx: ServiceContext, settings: MppsSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpps-maintenance", daemon=True)
        self._thread.start()

    def run_once(self) -> int:
        cutoff = utcnow() - timedelta(days=self.settings.purge_days)
        with self.ctx.db.write() as session:
            return q.purge_steps(session, final_before=cutoff, idle_before=cutoff)

    def _run(self) -> None:
        log = logs.get_logger().bind(service=NAME)
        while not self._stop.is_set():
            try:
                purged = self.run_once()
                if purged:
                    log.info("mpps_purged", steps=purged)
            except Exception as exc:  # keep the worker alive; report and retry later
                log.error("mpps_purge_failed", reason=f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.settings.maintenance_interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _background(ctx: ServiceContext) -> Maintenance:
    return Maintenance(ctx, MppsSettings.from_config(ctx.config))


def _states_text(settings: MppsSettings) -> str:
    if not settings.procedure_states:
        return (
            "With the embedded default no station is configured (`procedure_states = {}`, "
            "the sample's blank defaults), so an MPPS never changes a procedure's state."
        )
    lines = [
        "| Station | on N-CREATE | on N-SET COMPLETED | on N-SET DISCONTINUED |",
        "|---|---|---|---|",
    ]
    for station, states in settings.procedure_states.items():
        lines.append(
            f"| `{station}` | {states.get('n_create', '') or '-'} | "
            f"{states.get('completed', '') or '-'} | {states.get('discontinued', '') or '-'} |"
        )
    return "In effect:\n\n" + "\n".join(lines)


def statement(settings: MppsSettings) -> tuple[StatementSection, ...]:
    return (
        StatementSection(
            "MPPS: state machine",
            "N-CREATE is accepted only with Performed Procedure Step Status IN PROGRESS "
            "(otherwise 0106, PS3.4 F.7.2.1.3). N-SET is accepted only while the step is IN "
            "PROGRESS: it may leave the status IN PROGRESS (an intermediate update) or set "
            "COMPLETED or DISCONTINUED; any N-SET of a COMPLETED or DISCONTINUED step is "
            f'answered 0110 with Error Comment "{FINAL_COMMENT}" and Error ID A710 (PS3.4 '
            "F.7.2.2.4), an addition to the sample's table, which lists 0110 only for "
            "internal errors. Each request is checked and applied in one database "
            "transaction: a request answered with a failure changes nothing. An N-SET "
            "value of an attribute the sample's Table C.4.2-10 marks N (not settable, such "
            "as Patient ID, Scheduled Step Attribute Sequence or Performed Station AE "
            "Title) is ignored and logged, and the N-CREATE value kept; Specific Character "
            "Set in an N-SET decodes that N-SET only (PS3.4 F.7.2.2.3). A sequence in an "
            "N-SET replaces the stored sequence. Responses carry no Attribute List. An "
            "N-CREATE without Affected SOP Instance UID gets one assigned, returned in the "
            "response. The Attribute Identifier List of 0120 cannot be sent with "
            "pynetdicom, so the missing attributes are named in Error Comment.",
        ),
        StatementSection(
            "MPPS: attributes and storage",
            "Every accepted N-CREATE and N-SET is stored as received, with the calling AE "
            "title and the time (`dicomlab worklist mpps` lists them). Attributes are not "
            "validated beyond the checks of the status table (the sample's default: "
            "validate and log, do not fail on every validation error); every standard "
            "attribute is stored, including the retired Placer/Filler Order Number tags "
            "and dose attributes of the sample's Table C.4.2-10. MPPS Retrieve and "
            "Notification are not supported, so stored content is never sent over DICOM. "
            "Billing, supply and dose tables of the sample are not kept as separate "
            "tables (charge generation: off, as the sample's default).",
        ),
        StatementSection(
            "MPPS: matching to the worklist and exceptions",
            "On N-CREATE the step is matched: Patient ID (0010,0020) must be the Patient ID "
            "of a worklist order, and every non-empty Accession Number (0008,0050) of the "
            "Scheduled Step Attribute Sequence must be an order of that patient (removed "
            "entries count). A step with no Accession Number, or any failure, is "
            "*unmatched*: it is stored and answered 0000, and an exception row records "
            "why; its later N-SETs add exception rows too. A matched step whose Patient's "
            "Name, Birth Date or Sex differ from the order stays matched, and a "
            "'demographic mismatch' exception is recorded (the sample's Table C.8.1-3 "
            "coercion is not applied to the stored messages, which are kept as "
            "received). `dicomlab worklist mpps --exceptions` lists exceptions. The IHE "
            "trauma cases (automatic registration and ordering) are not supported.",
        ),
        StatementSection(
            "MPPS: procedure state updates",
            "Per performing station, a matched N-CREATE, N-SET COMPLETED and N-SET "
            "DISCONTINUED can set the state of the referenced requested procedures, "
            "configured as `[services.mpps.procedure_states.<AE title>]` with keys "
            "`n_create`, `completed` and `discontinued`. The station is looked up by "
            "Performed Station AE Title (0040,0241), then by the calling AE title, then "
            "as `*`. A procedure reaching the worklist's `removal_state` "
            f"(`{settings.removal_state}`) has its scheduled steps removed from the "
            "worklist; they are not returned again. " + _states_text(settings),
        ),
        StatementSection(
            "MPPS: purge",
            f"A step and its stored messages and exceptions are deleted {settings.purge_days:g} "
            "days (`purge_days`) after it reached COMPLETED or DISCONTINUED, or, if it never "
            "did, after its last update (digest C8). After that an N-SET for it is answered "
            "0112 and an N-CREATE with its UID is accepted as new. The purge runs at start "
            f"and every {settings.maintenance_interval:g} seconds (`maintenance_interval`).",
        ),
    )


def declaration(config: Config) -> ServiceDeclaration:
    settings = MppsSettings.from_config(config)
    return ServiceDeclaration(
        name=NAME,
        title="Modality Performed Procedure Step",
        accepted=(ContextRow(MPPS_SOP_CLASS, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),),
        statuses={"N-CREATE": N_CREATE_STATUSES, "N-SET": N_SET_STATUSES},
        handlers=make_handlers,
        settings={
            "purge_days": settings.purge_days,
            "maintenance_interval": settings.maintenance_interval,
            "procedure_states": {k: dict(v) for k, v in settings.procedure_states.items()},
        },
        statement=statement(settings),
        background=_background,
    )


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return [declaration(config)]
