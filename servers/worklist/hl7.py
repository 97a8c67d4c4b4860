"""Orders in: an HL7 v2 listener over MLLP that turns ORM^O01 / OMI^O23 into worklist entries.

Field mapping is the sample's Table C.8.1-2 (digest §7.1, with B8's corrected tags);
parsing is the ``hl7`` library's, framing its MLLP streams'. Every message gets one
acknowledgement: AA when applied, AE (application error) when the order cannot
become a worklist entry, AR (rejected) when the message is not an order this
listener accepts or cannot be parsed. Only AA changes the worklist.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import hl7  # type: ignore[import-untyped]
from hl7.mllp import InvalidBlockError, start_hl7_server  # type: ignore[import-untyped]
from sqlalchemy.exc import SQLAlchemyError

from db.queries.worklist import active_accessions, add_steps, cancel_order, existing_sps_ids
from servers.core import logs
from servers.core.context import ServiceContext
from servers.core.declaration import StartupError
from servers.worklist.entries import EntryError, build_entry

CHARSETS = {"": "utf-8", "ASCII": "ascii", "8859/1": "latin-1", "UNICODE UTF-8": "utf-8"}
ACCEPTED_TYPES = (("ORM", "O01"), ("OMI", "O23"))
PRIORITIES = {"S": "STAT", "A": "HIGH", "R": "ROUTINE", "P": "LOW", "T": "MEDIUM"}
PREGNANCY = {"1": 1, "2": 2, "3": 3, "4": 4}


class Nack(Exception):
    """A message answered AE or AR, with the reason in MSA-3."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class HL7Settings:
    enabled: bool
    host: str
    port: int
    default_modality: str
    stations: Mapping[str, str]
    default_station_ae: str
    coding_scheme: str


def _field(msg: Any, segment: str, number: int, component: int = 1, repetition: int = 1) -> str:
    try:
        seg = msg.segment(segment)
    except KeyError:
        return ""
    try:
        value = seg.extract_field(
            repeat_num=repetition, field_num=number, component_num=component, subcomponent_num=1
        )
    except (IndexError, KeyError, ValueError, AttributeError, TypeError):
        return ""
    return str(value or "").strip()


def _has(msg: Any, segment: str) -> bool:
    try:
        msg.segment(segment)
    except KeyError:
        return False
    return True


def _xpn(msg: Any, segment: str, number: int) -> str:
    """HL7 XPN family^given^middle^suffix^prefix as DICOM PN family^given^middle^prefix^suffix."""
    parts = [_field(msg, segment, number, c) for c in range(1, 6)]
    family, given, middle, suffix, prefix = parts
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def _xcn(msg: Any, segment: str, number: int) -> str:
    """HL7 XCN id^family^given^middle^suffix^prefix as a DICOM PN."""
    family, given, middle, suffix, prefix = (_field(msg, segment, number, c) for c in range(2, 7))
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def _start(msg: Any) -> tuple[str, str]:
    """Scheduled start (date, time) from OBR-27.4, ORC-7.4 or OBR-36."""
    for segment, number, component in (("OBR", 27, 4), ("ORC", 7, 4), ("OBR", 36, 1)):
        stamp = _field(msg, segment, number, component)
        if stamp:
            digits = stamp.split("+")[0].split("-")[0]
            if len(digits) < 8 or not digits[:8].isdigit():
                raise Nack("AE", f"{segment}-{number}: invalid date/time {stamp[:20]!r}")
            time = digits[8:14] or "0000"
            return digits[:8], time
    raise Nack("AE", "no scheduled date/time (OBR-27.4, ORC-7.4 or OBR-36)")


def order_values(msg: Any, settings: HL7Settings) -> dict[str, Any]:
    """The worklist attributes of one new order, per Table C.8.1-2."""
    values: dict[str, Any] = {}

    def put(keyword: str, value: Any) -> None:
        if value not in ("", None, []):
            values[keyword] = value

    put("PatientID", _field(msg, "PID", 3))
    put("IssuerOfPatientID", _field(msg, "PID", 3, 4))
    put("AdmissionID", _field(msg, "PID", 3))  # the sample maps PID-3 (digest B9)
    put("PatientName", _xpn(msg, "PID", 5))
    put("PatientBirthDate", _field(msg, "PID", 7)[:8])
    sex = _field(msg, "PID", 8).upper()[:1]
    put("PatientSex", sex if sex in ("M", "F", "O") else "")
    put("EthnicGroup", _field(msg, "PID", 10)[:16])
    put("ReferringPhysicianName", _xcn(msg, "PV1", 8))
    put("PlacerOrderNumberImagingServiceRequest", _field(msg, "ORC", 2) or _field(msg, "OBR", 2))
    put("FillerOrderNumberImagingServiceRequest", _field(msg, "ORC", 3) or _field(msg, "OBR", 3))
    put("OrderEnteredBy", _xcn(msg, "ORC", 10))
    put("OrderEntererLocation", _field(msg, "ORC", 17)[:16])
    code, text, scheme = (_field(msg, "OBR", 4, c) for c in (1, 2, 3))
    if code:
        put(
            "RequestedProcedureCodeSequence",
            {
                "CodeValue": code[:16],
                "CodingSchemeDesignator": (scheme or settings.coding_scheme)[:16],
                "CodeMeaning": (text or code)[:64],
            },
        )
    put("RequestedProcedureDescription", text[:64])
    put("ScheduledProcedureStepDescription", text[:64])
    put("PatientState", _field(msg, "OBR", 12)[:64])
    put("MedicalAlerts", _field(msg, "OBR", 13)[:64])
    put("RequestingPhysician", _xcn(msg, "OBR", 16))
    filler1 = _field(msg, "OBR", 20)
    if len(filler1) >= 8 and filler1[:8].isdigit():
        put("LastMenstrualDate", filler1[:8])
    elif filler1 in PREGNANCY:
        put("PregnancyStatus", PREGNANCY[filler1])
    put("RequestedProcedurePriority", PRIORITIES.get(_field(msg, "OBR", 27, 6).upper(), ""))
    put("PatientTransportArrangements", _field(msg, "OBR", 30)[:64])
    put("ReasonForTheImagingServiceRequest", _field(msg, "OBR", 31, 2) or _field(msg, "OBR", 31))
    put("ScheduledPerformingPhysicianName", _xcn(msg, "OBR", 34) or _field(msg, "OBR", 34))
    put("PatientComments", _field(msg, "NTE", 3))
    put("Allergies", _field(msg, "AL1", 3, 2) or _field(msg, "AL1", 3))
    put("AdmittingDiagnosesDescription", _field(msg, "DG1", 4)[:64])
    modality = _field(msg, "OBR", 24).upper() or settings.default_modality
    if _has(msg, "IPC"):  # OMI^O23: the order filler's imaging procedure control
        put("AccessionNumber", _field(msg, "IPC", 1))
        put("StudyInstanceUID", _field(msg, "IPC", 3))
        put("ScheduledProcedureStepID", _field(msg, "IPC", 4))
        modality = _field(msg, "IPC", 5).upper() or modality
        put("ScheduledStationAETitle", _field(msg, "IPC", 9))
    put("Modality", modality[:16])
    values.setdefault(
        "ScheduledStationAETitle", settings.stations.get(modality, settings.default_station_ae)
    )
    date, time = _start(msg)
    values["ScheduledProcedureStepStartDate"] = date
    values["ScheduledProcedureStepStartTime"] = time
    return values


def _decode(block: bytes) -> tuple[str, str]:
    """The message text and the codec its MSH-18 names (default: UTF-8)."""
    head = block.split(b"\r", 1)[0]
    fields = head.split(b"|")
    charset = fields[17].decode("ascii", "replace").strip() if len(fields) > 17 else ""
    codec = CHARSETS.get(charset.split("~")[0])
    if codec is None:
        raise Nack("AR", f"MSH-18 character set {charset[:20]!r} not supported")
    try:
        return block.decode(codec), codec
    except UnicodeDecodeError:
        raise Nack("AR", f"message bytes invalid in {charset or 'UTF-8'}") from None


def ack(msg: Any | None, code: str, text: str) -> str:
    """An ACK for ``msg`` (or for an unparsable message) with MSA-1 ``code``."""
    get = (lambda n: _field(msg, "MSH", n)) if msg is not None else (lambda n: "")
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    text = text.replace("|", "/").replace("^", " ").replace("~", " ").replace("\\", "/")
    text = text.replace("&", "+")[:80]
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            get(5) or "DICOMLAB",
            get(6),
            get(3),
            get(4),
            stamp,
            "",
            "ACK^" + (_field(msg, "MSH", 9, 2) if msg is not None else "") + "^ACK",
            uuid.uuid4().hex[:20],
            get(11) or "P",
            get(12) or "2.5",
        ]
    )
    if msg is not None and get(18):
        msh += "|" * 6 + get(18)
    return "\r".join([msh, f"MSA|{code}|{get(10)}|{text}"]) + "\r"


class OrderHandler:
    """Applies one HL7 message to the worklist and answers its acknowledgement."""

    def __init__(self, ctx: ServiceContext, settings: HL7Settings) -> None:
        self.ctx = ctx
        self.settings = settings

    def handle(self, block: bytes, peer: str) -> bytes:
        log = logs.get_logger().bind(service="worklist", channel="hl7", peer=peer)
        msg = None
        codec = "utf-8"
        try:
            text, codec = _decode(block)
            try:
                msg = hl7.parse(text.replace("\n", "\r").strip("\r"))
                _field(msg, "MSH", 9)
                msg.segment("MSH")
            except Exception as exc:
                msg = None
                raise Nack("AR", "message cannot be parsed as HL7 v2") from exc
            kind = (_field(msg, "MSH", 9, 1), _field(msg, "MSH", 9, 2))
            if kind not in ACCEPTED_TYPES:
                raise Nack("AR", f"message type {'^'.join(kind)} not supported")
            reply = self._apply(msg, log)
            code, reason = "AA", reply
        except Nack as nack:
            code, reason = nack.code, nack.reason
        except SQLAlchemyError as exc:
            code, reason = "AE", "worklist database unavailable"
            log.error("hl7_database_error", reason=type(exc).__name__)
        control = _field(msg, "MSH", 10) if msg is not None else ""
        (log.info if code == "AA" else log.warning)(
            "hl7_order_handled", ack=code, reason=reason, control_id=control
        )
        return ack(msg, code, reason).encode(codec, errors="replace")

    def _apply(self, msg: Any, log: Any) -> str:
        control = _field(msg, "ORC", 1).upper() or "NW"
        if control in ("CA", "DC", "OC"):
            placer = _field(msg, "ORC", 2) or _field(msg, "OBR", 2)
            if not placer:
                raise Nack("AE", "cancel without placer order number (ORC-2)")
            with self.ctx.db.write() as session:
                count = cancel_order(session, placer)
            if not count:
                raise Nack("AE", f"no scheduled order {placer[:32]}")
            return f"order {placer[:32]} canceled: {count} step(s) removed"
        if control != "NW":
            raise Nack("AR", f"order control {control[:4]} not supported")
        if not _has(msg, "PID") or not _has(msg, "OBR"):
            raise Nack("AR", "order without PID or OBR segment")
        try:
            entry = build_entry(order_values(msg, self.settings), source="hl7")
        except EntryError as exc:
            raise Nack("AE", str(exc)) from None
        record = entry.record
        with self.ctx.db.write() as session:
            if existing_sps_ids(session, [record.sps_id]):
                raise Nack("AE", f"scheduled procedure step {record.sps_id} exists")
            if active_accessions(session, [record.accession_number]):
                raise Nack("AE", f"accession number {record.accession_number} is scheduled")
            add_steps(session, [record])
        log.info("worklist_entry_added", sps_id=record.sps_id, accession=record.accession_number)
        return f"scheduled {record.sps_id} accession {record.accession_number}"


class HL7Listener:
    """The MLLP listener, on its own thread and event loop."""

    def __init__(self, handler: OrderHandler, host: str, port: int) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hl7-mllp", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if isinstance(self._error, OSError):
            raise StartupError(
                f"the HL7 listener cannot listen on {host}:{port}: "
                f"{self._error.strerror or self._error}; choose another port with "
                "DICOMLAB_SERVICES__WORKLIST__HL7_PORT (services.worklist.hl7_port), "
                "turn it off with hl7_enabled = false, or stop what holds it"
            ) from None
        if self._error is not None:
            raise self._error

    async def _client(self, reader: Any, writer: Any) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            while True:
                try:
                    block = await reader.readblock()
                except InvalidBlockError:
                    writer.writeblock(ack(None, "AR", "not an MLLP block").encode())
                    await writer.drain()
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                reply = await asyncio.get_running_loop().run_in_executor(
                    None, self.handler.handle, bytes(block), where
                )
                writer.writeblock(reply)
                await writer.drain()
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await start_hl7_server(self._client, self.host, self.port)

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:
            self._error = exc
            self._loop.close()
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    @property
    def bound_port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        def close() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(close)
        self._thread.join(timeout=5)
