"""Modality Worklist SCP of the RIS AE, with its order sources (Annex C "DICOMRis").

The C-FIND SCP is in ``find.py``, the information model in ``keys.py``, orders
over HL7 in ``hl7.py`` and the ``dicomlab worklist`` commands in ``cli.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from pynetdicom import evt

from db.queries.worklist import expire_steps
from servers.core import logs
from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import ContextRow, ServiceDeclaration, StatementSection
from servers.core.hookspecs import hookimpl
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from servers.worklist.find import C_FIND_STATUSES, make_find_handler
from servers.worklist.hl7 import HL7Listener, HL7Settings, OrderHandler
from servers.worklist.keys import key_table_markdown

NAME = "worklist"
MWL_FIND = "1.2.840.10008.5.1.4.31"


def settings_of(config: Config) -> dict[str, Any]:
    raw = config.service_settings(NAME)
    return {
        "max_matches": int(raw.get("max_matches", 100)),
        "cancel_check_interval": int(raw.get("cancel_check_interval", 1)),
        "expiry_minutes": int(raw.get("expiry_minutes", 2880)),
        "removal_state": str(raw.get("removal_state", "PROCEDURE STARTED")),
        "maintenance_interval": float(raw.get("maintenance_interval", 3600)),
        "hl7_enabled": bool(raw.get("hl7_enabled", True)),
        "hl7_port": int(raw.get("hl7_port", 2575)),
        "hl7_default_modality": str(raw.get("hl7_default_modality", "OT")),
        "hl7_stations": {str(k): str(v) for k, v in raw.get("hl7_stations", {}).items()},
        "hl7_default_station_ae": str(raw.get("hl7_default_station_ae", "MODALITY")),
        "hl7_coding_scheme": str(raw.get("hl7_coding_scheme", "99DICOMRIS")),
        "character_sets": ["ISO_IR 100", "ISO_IR 192"],
    }


def hl7_settings(config: Config, settings: Mapping[str, Any]) -> HL7Settings:
    return HL7Settings(
        enabled=bool(settings["hl7_enabled"]),
        host=config.host,
        port=int(settings["hl7_port"]),
        default_modality=str(settings["hl7_default_modality"]),
        stations=dict(settings["hl7_stations"]),
        default_station_ae=str(settings["hl7_default_station_ae"]),
        coding_scheme=str(settings["hl7_coding_scheme"]),
    )


class WorklistWorker:
    """The HL7 listener and the day-end maintenance job (expired steps leave the worklist)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        hl7 = hl7_settings(ctx.config, ctx.settings)
        self.listener = (
            HL7Listener(OrderHandler(ctx, hl7), hl7.host, hl7.port) if hl7.enabled else None
        )
        if self.listener is not None:
            logs.get_logger().info(
                "hl7_listening", host=hl7.host, port=self.listener.bound_port, ae=ctx.ae.title
            )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worklist-maintenance", daemon=True)
        self._thread.start()

    def run_once(self, now: datetime | None = None) -> int:
        if int(self.settings["expiry_minutes"]) <= 0:
            return 0
        cutoff = (now or datetime.now()) - timedelta(minutes=int(self.settings["expiry_minutes"]))
        with self.ctx.db.write() as session:
            return expire_steps(session, cutoff)

    def _run(self) -> None:
        log = logs.get_logger().bind(service=NAME)
        while not self._stop.is_set():
            try:
                expired = self.run_once()
                if expired:
                    log.info("worklist_expired", steps=expired)
            except Exception as exc:  # keep the worker alive
                log.error("worklist_maintenance_failed", reason=f"{type(exc).__name__}: {exc}")
            self._stop.wait(float(self.settings["maintenance_interval"]))

    def stop(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.stop()
        self._thread.join(timeout=5)


def _background(ctx: ServiceContext) -> WorklistWorker:
    return WorklistWorker(ctx)


def handlers(ctx: ServiceContext) -> Mapping[Any, Callable[..., Any]]:
    return {evt.EVT_C_FIND: make_find_handler(ctx)}


def statement(settings: Mapping[str, Any]) -> tuple[StatementSection, ...]:
    hl7_state = (
        f"enabled on TCP port {settings['hl7_port']} (`hl7_port`)"
        if settings["hl7_enabled"]
        else "disabled (`hl7_enabled = false`)"
    )
    return (
        StatementSection(
            "MWL: keys (PS3.4 Table K.6-1)",
            "Each response carries one scheduled procedure step: the Scheduled Procedure "
            "Step Sequence of a response has exactly one item. Accession Number and "
            "Requested Procedure ID have the same value in every response. Keys:\n\n"
            + key_table_markdown(),
        ),
        StatementSection(
            "MWL: matching rules",
            "- Only the eight required matching keys are matched. As the sample says, no "
            "optional matching key is matched: a value in Accession Number, Requested "
            "Procedure ID, Study Instance UID or any other optional key is ignored, the "
            "stored value is returned and the responses are FF01 (PS3.4 K.2.2.1.1.2). A "
            "query by Accession Number therefore returns every step the other keys match.\n"
            "- A zero-length value or a value made only of `*` is universal matching. `*` "
            "(any run of characters) and `?` (one character) are wildcards in Patient's "
            "Name, Patient ID, Scheduled Station AE Title, Modality and Scheduled "
            "Performing Physician's Name; every other character matches only itself.\n"
            "- Patient's Name is matched case-insensitively (Unicode case folding, not "
            "accent-insensitive); all other keys are case-sensitive (the sample lists "
            "only Patient's Name, digest B4). Person names are compared on their first "
            "(alphabetic) component group, without trailing `^` and spaces.\n"
            "- Scheduled Procedure Step Start Date accepts `YYYYMMDD`, `d1-d2`, `d1-` and "
            "`-d2`. Start Time accepts a single time (a partial time such as `10` covers "
            "the whole hour) and ranges; ranges across midnight are answered A900. When "
            "both are given they form one date-time range (the K.6-1 remark: dates July 5 "
            "to July 7 with times 10am to 6pm select July 5 10am to July 7 6pm).\n"
            "- A step whose stored value of a matched key is empty never matches a "
            "non-universal value of that key (PS3.4 K.2.2.1.1.1).\n"
            "- Specific Character Set and Timezone Offset From UTC are never matched; "
            "values are local time. Priority is ignored.\n"
            "- Steps are returned in order of scheduled start date and time.",
        ),
        StatementSection(
            "MWL: returned attributes",
            "Each response holds the requested supported keys and Specific Character Set; "
            "a key with no stored value is returned zero-length. A requested sequence is "
            "returned with all its stored items. An empty or zero-length Scheduled "
            "Procedure Step Sequence returns every supported attribute of the step. Other "
            "attributes of the model's modules (for example Patient's Size or Study Date) "
            "are not returned and make the responses FF01. Attributes outside the model, "
            "including private attributes, are answered A900 (the sample's status table).",
        ),
        StatementSection(
            "MWL: character sets",
            "Key values are decoded with the identifier's Specific Character Set "
            "(ISO_IR 100 when absent and a value is not ASCII). Patient's Name values with "
            "accents match case-insensitively after decoding. Every response carries "
            "Specific Character Set: `ISO_IR 100` when all its text fits Latin-1, "
            "otherwise `ISO_IR 192` (UTF-8), so names in non-Latin scripts received in "
            "orders are returned intact. ISO_IR 192 is an addition to the sample, which "
            "lists ISO_IR 100 only. A non-ASCII key value in a character set this AE "
            "cannot decode is answered C001.",
        ),
        StatementSection(
            "MWL: match limit and cancel",
            f"When more than {settings['max_matches']} steps match (`max_matches`), the "
            "request is refused with A700 before any pending response is sent (exactly "
            f"{settings['max_matches']} matches are sent). A C-CANCEL-FIND-RQ is checked "
            f"for before every {settings['cancel_check_interval']} pending response(s) "
            "(`cancel_check_interval`) and after the last; once seen, FE00 is sent and "
            "no further pending response.",
        ),
        StatementSection(
            "MWL: the worklist and its entries",
            "Entries come from HL7 orders (below) and from `dicomlab worklist add` and "
            "`dicomlab worklist import`. Each order makes one requested procedure with one "
            "scheduled procedure step. Accession Number (= Requested Procedure ID), "
            "Scheduled Procedure Step ID and Study Instance UID are generated unless the "
            "order supplies them; Referenced Study Sequence references the Study Instance "
            "UID with the Detached Study Management SOP Class; Scheduled Procedure Step "
            "Status is SCHEDULED. An entry leaves the worklist when its requested "
            f"procedure reaches the state `{settings['removal_state']}` (`removal_state`, "
            "set by MPPS as configured there), when its order is canceled (HL7 ORC-1 CA), "
            "when it is removed with `dicomlab worklist remove`, or "
            f"{settings['expiry_minutes']} minutes after its scheduled start "
            "(`expiry_minutes`; 0 never) by the maintenance job, which runs at start and every "
            f"{settings['maintenance_interval']:g} seconds (`maintenance_interval`). "
            "Until the job runs, an expired entry is still returned.",
        ),
        StatementSection(
            "Orders over HL7 (Table C.8.1-2)",
            f"The HL7 v2 listener (MLLP framing) is {hl7_state}, on the address of "
            "`host`. It accepts ORM^O01 and OMI^O23; ORC-1 NW (or absent) schedules a new "
            "order and CA, DC or OC cancel the order named by ORC-2 (removing its steps). "
            "Mapping: PID-3 Patient ID (and Admission ID, as the sample maps it), PID-3.4 "
            "Issuer of Patient ID, PID-5 Patient's Name, PID-7 Birth Date, PID-8 Sex, "
            "PID-10 Ethnic Group, PV1-8 Referring Physician's Name, ORC-2/OBR-2 Placer "
            "Order Number, ORC-3/OBR-3 Filler Order Number, ORC-10 Order Entered By, "
            "ORC-17 Order Enterer's Location, OBR-4 Requested Procedure Code Sequence "
            "(code, text, scheme; text also the descriptions; scheme "
            f"`{settings['hl7_coding_scheme']}` when absent), OBR-12 Patient State, OBR-13 "
            "Medical Alerts, OBR-16 Requesting Physician, OBR-20 Last Menstrual Date (a "
            "date) or Pregnancy Status (1-4), OBR-24 Modality (default "
            f"`{settings['hl7_default_modality']}`), OBR-27.4 scheduled start (else ORC-7.4 "
            "or OBR-36), OBR-27.6 Requested Procedure Priority, OBR-30 Patient Transport "
            "Arrangements, OBR-31 Reason for the Imaging Service Request, OBR-34 Scheduled "
            "Performing Physician's Name, NTE-3 Patient Comments, AL1-3 Allergies, DG1-4 "
            "Admitting Diagnosis Description; OMI's IPC-1 Accession Number, IPC-3 Study "
            "Instance UID, IPC-4 SPS ID, IPC-5 Modality and IPC-9 Scheduled Station AE "
            "Title. The Scheduled Station AE Title is otherwise looked up by modality in "
            f"`hl7_stations`, default `{settings['hl7_default_station_ae']}`. MSH-18 may "
            "name ASCII, 8859/1 or UNICODE UTF-8 (UTF-8 when absent).\n\n"
            "Every message is answered with an ACK whose MSA-1 is AA when the order was "
            "applied, AE when it cannot be applied (a required field such as PID-3, PID-5 "
            "or the scheduled start is missing or invalid, the accession number is "
            "already scheduled, a canceled order is unknown, or the database failed), and "
            "AR when the message is rejected (not parsable, not MLLP framed, a message "
            "type or order control other than those above, no PID or OBR segment, an "
            "unsupported character set). MSA-3 gives the reason. Only AA changes the "
            "worklist.",
        ),
    )


def declaration(config: Config) -> ServiceDeclaration:
    settings = settings_of(config)
    return ServiceDeclaration(
        name=NAME,
        title="Modality Worklist",
        accepted=(ContextRow(MWL_FIND, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),),
        statuses={"C-FIND": C_FIND_STATUSES},
        handlers=handlers,
        settings=settings,
        statement=statement(settings),
        background=_background,
    )


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return [declaration(config)]
