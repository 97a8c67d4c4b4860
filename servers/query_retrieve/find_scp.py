"""The C-FIND SCP loop of QUERY-RETRIEVE-SCP, with pending responses sent as bytes.

pynetdicom's ``_c_find_scp`` builds a pydicom Dataset for every match, encodes it,
turns a C-FIND-RSP primitive into a message, encodes its command set and fires
EVT_DIMSE_SENT (one log line) for each. At 10,000 matches that was ~0.7 ms a match,
most of the association thread's time. Here the handler
(:func:`servers.query_retrieve.find.make_find_handler`) yields each pending
identifier already encoded (:func:`encode_elements`), and a pending response goes to
the DUL as one P-DATA (command set from a per-request template, then the identifier).
Every other response (failures, cancel, the final Success) takes pynetdicom's path
unchanged, so it is logged as before; pending responses are counted in the
operation's ``c_find_handled`` line (``sent``) instead of logged one by one, except
under ``--trace``, where each still goes through pynetdicom and is logged with its
identifier.
"""

from __future__ import annotations

import struct
import traceback
from collections.abc import Iterable, Iterator
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass, attempt

from servers.core import logs

PENDING_CODES = frozenset({0xFF00, 0xFF01})
C_FIND_RSP_FIELD = 0x8020
DATA_SET_PRESENT = 0x0001
# Exception in the handler (pynetdicom's code for it).
HANDLER_FAILED = 0xC311

# Padding to even length (PS3.5 6.2): UI with NUL, every other string VR with a space.
_NUL_PADDED = frozenset({"UI"})


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in _NUL_PADDED else b" "
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long for {vr}")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def encode_elements(elements: Iterable[tuple[int, str, bytes]], implicit: bool) -> bytes:
    """A little endian data set of string elements ``(tag, VR, value)`` in tag order.

    Only for VRs with a 2-byte explicit length (AE, CS, DA, IS, LO, PN, SH, TM, UI):
    the attributes of the C-FIND key tables.
    """
    return b"".join(_element(tag, vr, value, implicit) for tag, vr, value in elements)


def _command_prefix(sop_class_uid: str, message_id: int) -> bytes:
    """C-FIND-RSP command set without its trailing Status element (Implicit VR LE)."""
    body = (
        _element(0x00000002, "UI", sop_class_uid.encode("ascii"), True)
        + _element(0x00000100, "US", struct.pack("<H", C_FIND_RSP_FIELD), True)
        + _element(0x00000120, "US", struct.pack("<H", message_id), True)
        + _element(0x00000800, "US", struct.pack("<H", DATA_SET_PRESENT), True)
    )
    status_length = 10  # (0000,0900) US: tag, length, value
    return _element(0x00000000, "UL", struct.pack("<I", len(body) + status_length), True) + body


class PendingSender:
    """Sends the pending C-FIND-RSPs of one request straight to the DUL."""

    def __init__(self, assoc: Any, context_id: int, sop_class_uid: str, message_id: int) -> None:
        self.dul = assoc.dul
        self.context_id = context_id
        self.max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        self.prefix = _command_prefix(sop_class_uid, message_id)

    def _pdvs(self, header: int, data: bytes, last: int) -> Iterator[tuple[int, bytes]]:
        if not self.max_pdu:
            yield self.context_id, bytes([header | last]) + data
            return
        size = self.max_pdu - 6
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        for index, chunk in enumerate(chunks):
            final = last if index == len(chunks) - 1 else 0
            yield self.context_id, bytes([header | final]) + chunk

    def send(self, status: int, identifier: bytes) -> None:
        command = self.prefix + struct.pack("<HHIH", 0, 0x0900, 2, status)
        # One P-DATA-TF carries both PDVs when it fits the peer's maximum PDU
        # (PS3.8 9.3.5 allows several PDVs per PDU): one socket write per match.
        if not self.max_pdu or len(command) + len(identifier) + 12 <= self.max_pdu:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((self.context_id, b"\x03" + command))
            pdata.presentation_data_value_list.append((self.context_id, b"\x02" + identifier))
            self.dul.send_pdu(pdata)
            return
        for pdv in [*self._pdvs(0x01, command, 0x02), *self._pdvs(0x00, identifier, 0x02)]:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append(pdv)
            self.dul.send_pdu(pdata)


class FindServiceClass(QueryRetrieveServiceClass):
    """QUERY-RETRIEVE-SCP's C-FIND: pynetdicom's loop, with encoded pending identifiers."""

    def SCP(self, req: Any, context: PresentationContext) -> None:
        if not isinstance(req, C_FIND):
            super().SCP(req, context)
            return
        self._find(req, context)

    def _find(self, req: C_FIND, context: PresentationContext) -> None:
        cx_id = cast(int, context.context_id)
        syntax = context.transfer_syntax[0]
        rsp = C_FIND()
        rsp.MessageID = req.MessageID
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID

        with attempt(rsp, self.dimse, cx_id, self.assoc) as ctx:
            ctx.error_msg = "Exception in handler bound to 'evt.EVT_C_FIND'"
            ctx.error_status = HANDLER_FAILED
            generator = evt.trigger(
                self.assoc,
                evt.EVT_C_FIND,
                {
                    "request": req,
                    "context": context.as_tuple,
                    "_is_cancelled": self.is_cancelled,
                },
            )
        if not ctx.success or not self.assoc.is_established:
            return
        if generator is None:
            generator = iter([(0x0000, None)])

        sender: PendingSender | None = None
        if not logs.tracing():
            sender = PendingSender(
                self.assoc, cx_id, str(req.AffectedSOPClassUID), cast(int, req.MessageID)
            )
        for result, exc in self._wrap_handler(generator):
            if not self.assoc.is_established:
                return
            if exc:
                logs.assoc_logger(self.assoc).error(
                    "c_find_handler_exception",
                    traceback="".join(traceback.format_exception(*exc)),
                )
                rsp.Identifier = None
                rsp.Status = HANDLER_FAILED
                self.dimse.send_msg(rsp, cx_id)
                return
            status, identifier = cast(tuple[Any, Any], result)
            if isinstance(status, int) and status in PENDING_CODES:
                if isinstance(identifier, Dataset):
                    identifier = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian)
                if sender is not None:
                    sender.send(status, cast(bytes, identifier))
                    continue
                rsp.Status = status
                rsp.Identifier = BytesIO(cast(bytes, identifier))
                self.dimse.send_msg(rsp, cx_id)
                continue
            # Failure, cancel or the final Success: pynetdicom's path, logged as ever.
            rsp.Identifier = None
            rsp = self.validate_status(status, rsp)
            self.dimse.send_msg(rsp, cx_id)
            return
        if self.assoc.is_established:
            rsp.Identifier = None
            rsp.Status = 0x0000
            self.dimse.send_msg(rsp, cx_id)
