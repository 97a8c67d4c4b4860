"""STORAGE-SCU: the C-STORE sub-operations of one C-MOVE, over one new association.

What is sent (Annex F §F.4.2.1.3.1.4, Table F.8.1-3; digest C6, E9):

* The stored data set bytes, unchanged, when the destination accepted the stored
  transfer syntax. Nothing is decoded, so the §F.7.1 bit-preserving claim holds.
* Explicit VR Little Endian and Implicit VR Little Endian are re-encoded into each
  other when only the other one was accepted (lossless; the UID is kept).
* The database's view of the patient wins over the file in two cases only: a
  Patient's Sex the index holds as 'U' is sent empty (Table F.8.1-2), and a Patient
  ID coerced on receipt is sent as coerced (digest C7). Only then is the data set
  decoded and re-encoded.
* JPEG Baseline data is never decompressed or compressed here: if the destination
  accepted no JPEG Baseline context for it, the sub-operation fails.

How destination answers count (Table F.4.2-7; digest E11): 0000 is a success;
any warning-class code (0001, Bxxx, 0107, 0116) is a success with a warning;
every other code, a missing response (DIMSE timeout), an abort or a closed
connection is a permanent failure.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext

from db.queries.move import MoveInstance
from servers.core.config import RemoteAE
from servers.core.declaration import ContextRow
from servers.core.network import DicomlabAE
from servers.core.sop_classes import (
    CR,
    CT,
    MR,
    NM_RETIRED,
    RETIRED_NAMES,
    SC,
    US,
    US_MULTIFRAME,
    US_MULTIFRAME_RETIRED,
    US_RETIRED,
)
from servers.core.transfer_syntax import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    JPEG_BASELINE,
    VERIFICATION,
)
from storage.filestore import FileStore, StoreError

UNCOMPRESSED = (IMPLICIT_VR_LE, EXPLICIT_VR_LE)
ALL_THREE = (IMPLICIT_VR_LE, EXPLICIT_VR_LE, JPEG_BASELINE)

# Table F.4.2-6, one entry per SOP class with its rows' transfer syntaxes in table order.
TABLE_F_4_2_6: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    (VERIFICATION, (IMPLICIT_VR_LE,), None),
    (US_RETIRED, ALL_THREE, RETIRED_NAMES[US_RETIRED]),
    (US, ALL_THREE, None),
    (US_MULTIFRAME_RETIRED, ALL_THREE, RETIRED_NAMES[US_MULTIFRAME_RETIRED]),
    (US_MULTIFRAME, ALL_THREE, None),
    (CR, UNCOMPRESSED, None),
    (CT, UNCOMPRESSED, None),
    (MR, UNCOMPRESSED, None),
    (SC, ALL_THREE, None),
)
# Accepted by STORAGE-SCP with Implicit VR only (Table F.4.2-30), so exported the
# same way when such an instance is retrieved (digest A2).
EXTRA_ROWS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    (NM_RETIRED, (IMPLICIT_VR_LE,), RETIRED_NAMES[NM_RETIRED]),
)
TABLE_TRANSFER_SYNTAXES = {uid: ts for uid, ts, _ in TABLE_F_4_2_6 + EXTRA_ROWS}

MEDIUM_PRIORITY = 0
WARNING_CODES = frozenset({0x0001, 0x0107, 0x0116})

Outcome = Literal["success", "warning", "failure"]


def table_rows(mode: str) -> tuple[ContextRow, ...]:
    """Table F.4.2-6 (plus NM Retired) as proposed rows, split per ``mode``."""
    rows: list[ContextRow] = []
    for uid, syntaxes, name in TABLE_F_4_2_6 + EXTRA_ROWS:
        if mode == "multi":
            rows.append(ContextRow(uid, syntaxes, scu_role=True, scp_role=False, name=name))
        else:
            rows.extend(
                ContextRow(uid, (ts,), scu_role=True, scp_role=False, name=name) for ts in syntaxes
            )
    return tuple(rows)


def contexts_for(sop_classes: Iterable[str], mode: str) -> list[tuple[str, tuple[str, ...]]]:
    """The contexts to propose for the SOP classes about to be sent.

    Verification is always proposed (Table F.4.2-6 row 1). A class outside the
    table (added to STORAGE-SCP by configuration) is proposed with both
    uncompressed transfer syntaxes.
    """
    contexts: list[tuple[str, tuple[str, ...]]] = [(VERIFICATION, (IMPLICIT_VR_LE,))]
    for uid in dict.fromkeys(sop_classes):
        syntaxes = TABLE_TRANSFER_SYNTAXES.get(uid, UNCOMPRESSED)
        if mode == "multi":
            contexts.append((uid, syntaxes))
        else:
            contexts.extend((uid, (ts,)) for ts in syntaxes)
    return contexts


def classify(status: int | None) -> Outcome:
    """Table F.4.2-7: what a destination's C-STORE status means for the C-MOVE."""
    if status is None:
        return "failure"
    if status == 0x0000:
        return "success"
    if status in WARNING_CODES or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


@dataclass(frozen=True)
class SubOperation:
    """The result of sending one instance."""

    outcome: Outcome
    status: int | None
    reason: str


class ExportError(Exception):
    """The instance cannot be sent as stored (missing, corrupt, no usable context)."""


def _not_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def read_stored(store: FileStore, instance: MoveInstance) -> tuple[bytes, str]:
    """The stored data set bytes (after the File Meta Information) and their transfer syntax."""
    try:
        raw = store.read(instance.file_path)
    except (OSError, StoreError) as exc:
        raise ExportError(f"stored file unreadable: {exc}") from exc
    if instance.sha256 and hashlib.sha256(raw).hexdigest() != instance.sha256:
        raise ExportError("stored file does not match its recorded checksum")
    fp = BytesIO(raw)
    try:
        read_preamble(fp, True)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_meta)
    except Exception as exc:
        raise ExportError(f"stored file is not a DICOM file: {exc}") from exc
    syntax = str(meta.get("TransferSyntaxUID", "") or instance.transfer_syntax_uid)
    return raw[fp.tell() :], syntax


def _decode(data: bytes, syntax: str) -> Dataset:
    return read_dataset(
        BytesIO(data), is_implicit_VR=syntax == IMPLICIT_VR_LE, is_little_endian=True
    )


def _head(data: bytes, syntax: str) -> Dataset:
    """Only the Patient module's first elements; cheap, for deciding whether to edit."""

    def past_patient(tag: BaseTag, vr: str | None, length: int) -> bool:
        return bool(tag > 0x00100040)

    return read_dataset(
        BytesIO(data),
        is_implicit_VR=syntax == IMPLICIT_VR_LE,
        is_little_endian=True,
        stop_when=past_patient,
    )


def edits_for(instance: MoveInstance, data: bytes, syntax: str) -> dict[str, str]:
    """Attributes whose database value must replace the file's (digest C6, C7)."""
    if instance.patient_sex != "U" and instance.patient_id == instance.received_patient_id:
        return {}
    if syntax not in UNCOMPRESSED and syntax != JPEG_BASELINE:
        return {}
    head = _head(data, syntax)
    edits: dict[str, str] = {}
    if instance.patient_sex == "U" and str(head.get("PatientSex", "") or "").strip():
        edits["PatientSex"] = ""
    if (
        instance.patient_id != instance.received_patient_id
        and str(head.get("PatientID", "") or "") != instance.patient_id
    ):
        edits["PatientID"] = instance.patient_id
    return edits


def payload(data: bytes, stored: str, target: str, edits: dict[str, str]) -> bytes:
    """The data set bytes to send in ``target`` syntax; ``data`` itself when nothing changes."""
    if stored == target and not edits:
        return data
    if stored != target and not (stored in UNCOMPRESSED and target in UNCOMPRESSED):
        raise ExportError(f"cannot convert {stored} to {target}")
    ds = _decode(data, stored)
    for keyword, value in edits.items():
        setattr(ds, keyword, value)
    encoded = encode(ds, target == IMPLICIT_VR_LE, True)
    if encoded is None:
        raise ExportError(f"cannot encode the data set in {target}")
    return encoded


def _keep_responses_for(assoc: Association, owner: int) -> None:
    """Let only thread ``owner`` take DIMSE messages off ``assoc``'s queue.

    pynetdicom's pause (``_reactor_checkpoint`` / ``_is_paused``) does not make that
    sure: the reactor sets ``_is_paused`` before every ``wait()``, so right after a
    resume the flag can still read True while the reactor goes on to
    ``get_msg(block=False)`` and swallows the next C-STORE-RSP; the sub-operation then
    fails after the DIMSE timeout (2 of 2,000 sub-operations on a busy 2-core host,
    2026-11-23). A STORAGE-SCU association receives nothing but those responses, so every
    other caller is told there is no message.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if threading.get_ident() == owner:
            return take(block=block)
        if block:
            time.sleep(0.001)
        return None, None

    dimse.get_msg = get_msg  # type: ignore[method-assign]


def choose_context(
    accepted: Sequence[PresentationContext], sop_class: str, stored: str
) -> PresentationContext:
    """An accepted context for ``sop_class``: the stored syntax first, else uncompressed."""
    usable = [cx for cx in accepted if cx.abstract_syntax == sop_class]
    for cx in usable:
        if cx.transfer_syntax[0] == stored:
            return cx
    if stored in UNCOMPRESSED:
        for cx in usable:
            if cx.transfer_syntax[0] in UNCOMPRESSED:
                return cx
    raise ExportError(
        f"the destination accepted no context for {sop_class} usable with {stored}"
        if usable
        else f"the destination accepted no context for {sop_class}"
    )


class Export:
    """One association from STORAGE-SCU to one destination, and the sends over it."""

    def __init__(
        self,
        ae: DicomlabAE,
        destination: RemoteAE,
        store: FileStore,
        log: Any,
        *,
        mode: str = "single",
        retries: int = 0,
        retry_delay: float = 0.0,
    ) -> None:
        self.ae = ae
        self.destination = destination
        self.store = store
        self.log = log.bind(destination=destination.title, storage_scu=ae.ae_title)
        self.mode = mode
        self.retries = retries
        self.retry_delay = retry_delay
        self.assoc: Association | None = None
        self._message_id = 0

    def open(self, sop_classes: Iterable[str]) -> str | None:
        """Associate with the destination; ``None`` on success, else why it failed."""
        for abstract_syntax, syntaxes in contexts_for(sop_classes, self.mode):
            self.ae.add_requested_context(abstract_syntax, list(syntaxes))
        reason = "not attempted"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_delay)
            assoc = self.ae.associate(
                self.destination.host, self.destination.port, ae_title=self.destination.title
            )
            if assoc.is_established:
                self.assoc = assoc
                _keep_responses_for(assoc, threading.get_ident())
                self.log.info(
                    "export_association_established",
                    accepted=len(assoc.accepted_contexts),
                    attempt=attempt + 1,
                )
                return None
            if assoc.is_rejected:
                rj = assoc.acceptor.primitive
                reason = (
                    f"association rejected ({rj.result}, {rj.result_source}, {rj.diagnostic})"
                    if rj is not None
                    else "association rejected"
                )
            elif assoc.is_aborted:
                reason = "association aborted during negotiation"
            else:
                reason = "destination unreachable"
            self.log.error("export_association_failed", reason=reason, attempt=attempt + 1)
        return reason

    def send(
        self, instance: MoveInstance, originator_ae: str, originator_message_id: int
    ) -> SubOperation:
        """One C-STORE sub-operation; never raises for a failed send."""
        assoc = self.assoc
        if assoc is None or not assoc.is_established:
            return SubOperation("failure", None, "association to the destination lost")
        try:
            data, stored = read_stored(self.store, instance)
            context = choose_context(assoc.accepted_contexts, instance.sop_class_uid, stored)
            target = str(context.transfer_syntax[0])
            body = payload(data, stored, target, edits_for(instance, data, stored))
        except ExportError as exc:
            return SubOperation("failure", None, str(exc))
        except Exception as exc:  # a data set pydicom cannot parse for conversion
            return SubOperation("failure", None, f"cannot prepare data set: {exc}")

        self._message_id = self._message_id % 65535 + 1
        req = C_STORE()
        req.MessageID = self._message_id
        req.AffectedSOPClassUID = instance.sop_class_uid
        req.AffectedSOPInstanceUID = instance.sop_instance_uid
        req.Priority = MEDIUM_PRIORITY
        req.MoveOriginatorApplicationEntityTitle = originator_ae
        req.MoveOriginatorMessageID = originator_message_id
        req.DataSet = BytesIO(body)
        status = self._exchange(assoc, req, cast(int, context.context_id))
        if status is None:
            return SubOperation("failure", None, "no C-STORE response (timeout or abort)")
        outcome = classify(status)
        return SubOperation(outcome, status, "" if outcome != "failure" else "failure status")

    def _exchange(self, assoc: Association, req: C_STORE, context_id: int) -> int | None:
        # As pynetdicom's send_c_store does after encoding: pause the requestor's
        # reactor so it does not take the response off the queue first.
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused and assoc.is_established:
                time.sleep(0.0001)
            assoc.dimse.send_msg(req, context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is None:
            # DIMSE timeout: Table F.4.2-8 says A-ABORT; a peer abort needs nothing.
            assoc._handle_no_response()
            return None
        result = assoc._check_received_status(rsp)
        return int(result.Status) if "Status" in result else None

    def close(self, abort: bool = False) -> None:
        """Release (or abort) the association and free the AE's resources."""
        assoc = self.assoc
        if assoc is not None and assoc.is_established:
            if abort:
                assoc.abort()
            else:
                assoc.release()
        self.ae.shutdown()
