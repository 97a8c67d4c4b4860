"""The N-ACTION side: check a commitment request, record it, answer, then report.

pynetdicom's own N-ACTION handling only answers; its ``send_n_event_report``
takes whatever DIMSE message comes next as the response. This service class
sends the N-ACTION-RSP itself, then the N-EVENT-REPORT-RQ on the same
association while the peer is known to be waiting, and routes what comes back:
our response is taken, a request the peer sends meanwhile is put back for the
association to serve afterwards, and a release or abort hands the report to
the delivery worker (Annex F §F.4.2.3.4.1.5).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from typing import Any, cast

from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class_n import StorageCommitmentServiceClass
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from db.models import CommitmentState
from db.queries import commitment as queries
from db.queries.commitment import Decision
from servers.core import logs
from servers.core.context import ServiceContext
from servers.core.declaration import ServiceDeclaration, StatusRow
from servers.core.dimse import await_response, peer_closing
from servers.core.network import DicomlabAE
from servers.core.runtime import check_status
from servers.storage_commitment import delivery
from servers.storage_commitment.tables import (
    DELIVERED_CODES,
    FR_CLASS_INSTANCE_CONFLICT,
    FR_NO_SUCH_OBJECT,
    FR_PROCESSING_FAILURE,
    FR_SOP_CLASS_NOT_SUPPORTED,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    N_ACTION_STATUSES,
    NO_SUCH_ACTION,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    REQUEST_STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_PUSH,
    SUCCESS_CODE,
    WELL_KNOWN_INSTANCE,
    CommitmentSettings,
)

SERVICE = "storage_commitment"
STORAGE_SERVICE = "storage"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# How long a transaction stays claimed by its own association before the worker
# may take it, beyond the DIMSE timeout (covers a crash during the first attempt).
_CLAIM_MARGIN = 30.0


class Rejected(Exception):
    """The N-ACTION is answered with ``row`` and nothing is recorded."""

    def __init__(self, row: StatusRow, reason: str) -> None:
        super().__init__(reason)
        self.row = row
        self.reason = reason


@dataclass(frozen=True)
class CommitmentAction:
    transaction_uid: str
    references: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID)


def _valid_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID.match(value))


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip(" \0")


def parse_action(req: N_ACTION, context: PresentationContext) -> CommitmentAction:
    """The transaction a Request Storage Commitment N-ACTION asks for, or :class:`Rejected`."""
    if _text(req.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
        raise Rejected(
            N_ACTION_STATUSES[NO_SUCH_SOP_INSTANCE],
            f"requested instance {_text(req.RequestedSOPInstanceUID)!r}",
        )
    if req.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
        raise Rejected(N_ACTION_STATUSES[NO_SUCH_ACTION], f"action type {req.ActionTypeID}")
    raw = req.ActionInformation
    if raw is None or not raw.getvalue():
        raise Rejected(N_ACTION_STATUSES[MISSING_ATTRIBUTE], "no Action Information")
    syntax = context.transfer_syntax[0]
    try:
        ds = decode(raw, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        has_transaction = "TransactionUID" in ds
        has_sequence = "ReferencedSOPSequence" in ds
        if not (has_transaction and has_sequence):
            missing = "TransactionUID" if not has_transaction else "ReferencedSOPSequence"
            raise Rejected(N_ACTION_STATUSES[MISSING_ATTRIBUTE], f"{missing} absent")
        transaction = _text(ds.TransactionUID)
        items = ds.ReferencedSOPSequence or []
        if not transaction:
            raise Rejected(N_ACTION_STATUSES[MISSING_ATTRIBUTE_VALUE], "TransactionUID empty")
        if len(items) == 0:
            raise Rejected(
                N_ACTION_STATUSES[MISSING_ATTRIBUTE_VALUE], "ReferencedSOPSequence empty"
            )
        references: list[tuple[str, str]] = []
        for number, item in enumerate(items, start=1):
            sop_class = _text(item.get("ReferencedSOPClassUID"))
            sop_instance = _text(item.get("ReferencedSOPInstanceUID"))
            if not sop_class or not sop_instance:
                raise Rejected(
                    N_ACTION_STATUSES[MISSING_ATTRIBUTE_VALUE],
                    f"ReferencedSOPSequence item {number} lacks a class or instance UID",
                )
            references.append((sop_class, sop_instance))
    except Rejected:
        raise
    except Exception as exc:
        raise Rejected(
            N_ACTION_STATUSES[PROCESSING_FAILURE], f"undecodable: {type(exc).__name__}: {exc}"
        ) from exc
    bad = [uid for uid in (transaction, *(u for pair in references for u in pair))]
    bad = [uid for uid in bad if not _valid_uid(uid)]
    if bad:
        raise Rejected(N_ACTION_STATUSES[PROCESSING_FAILURE], f"not a valid UID: {bad[0]!r}")
    # One outcome per instance, even if the peer names an instance twice.
    unique: dict[str, tuple[str, str]] = {}
    for sop_class, sop_instance in references:
        unique.setdefault(sop_instance, (sop_class, sop_instance))
    return CommitmentAction(transaction, tuple(unique.values()))


def storage_classes(ctx: ServiceContext) -> frozenset[str]:
    """The SOP classes the Storage service on this AE accepts (§F.4.2.3.4.1.5)."""
    running = ctx.suite.aes.get(ctx.ae.key)
    if running is None:
        return frozenset()
    return frozenset(
        uid for d in running.services if d.name == STORAGE_SERVICE for uid in d.sop_classes
    )


def decide(
    ctx: ServiceContext, settings: CommitmentSettings, action: CommitmentAction, log: Any
) -> list[Decision]:
    """Commit an instance only if indexed under that class with an intact file."""
    supported = storage_classes(ctx)
    with ctx.db.read() as session:
        stored = queries.stored_instances(session, (uid for _, uid in action.references))
    decisions: list[Decision] = []
    for sop_class, uid in action.references:
        reason: int | None = None
        cause = ""
        row = stored.get(uid)
        if sop_class not in supported:
            reason, cause = FR_SOP_CLASS_NOT_SUPPORTED, "sop_class_not_supported"
        elif row is None:
            reason, cause = FR_NO_SUCH_OBJECT, "not_indexed"
        elif row.sop_class_uid != sop_class:
            reason, cause = FR_CLASS_INSTANCE_CONFLICT, "indexed_under_other_class"
        else:
            try:
                path = ctx.store.path(row.file_path)
                if not path.is_file():
                    reason, cause = FR_NO_SUCH_OBJECT, "file_missing"
                elif settings.verify_checksum and not ctx.store.verify(row.file_path, row.sha256):
                    reason, cause = FR_NO_SUCH_OBJECT, "checksum_mismatch"
            except Exception as exc:
                reason, cause = FR_PROCESSING_FAILURE, f"{type(exc).__name__}: {exc}"
        if reason is not None:
            level = log.error if cause in ("file_missing", "checksum_mismatch") else log.info
            level(
                "commitment_item_failed",
                sop_instance=uid,
                failure_reason=f"0x{reason:04X}",
                cause=cause,
            )
        decisions.append(Decision(sop_class, uid, reason))
    return decisions


def record(
    ctx: ServiceContext,
    action: CommitmentAction,
    decisions: Sequence[Decision],
    calling_ae: str,
    first_attempt_here: bool,
) -> None:
    """Persist the transaction in one write, or raise :class:`Rejected` (nothing written)."""
    now = delivery.utcnow()
    if first_attempt_here:
        # Claimed by this association until its own attempt ends; after a crash
        # the worker takes it over once the claim runs out.
        due = now + timedelta(seconds=ctx.ae.dimse_timeout + _CLAIM_MARGIN)
    else:
        due = now
    try:
        with ctx.db.write() as session:
            existing = queries.find_transaction(session, action.transaction_uid)
            if existing is not None and existing.state == CommitmentState.PENDING:
                raise Rejected(
                    N_ACTION_STATUSES[PROCESSING_FAILURE],
                    "transaction UID belongs to a transaction still being delivered",
                )
            queries.record_transaction(
                session,
                transaction_uid=action.transaction_uid,
                calling_ae=calling_ae,
                called_ae=ctx.ae.title,
                decisions=decisions,
                next_attempt_at=due,
                existing=existing,
            )
    except IntegrityError as exc:
        # Another association recorded the same Transaction UID a moment earlier.
        raise Rejected(
            N_ACTION_STATUSES[PROCESSING_FAILURE], "transaction UID recorded concurrently"
        ) from exc
    except SQLAlchemyError as exc:
        raise Rejected(
            N_ACTION_STATUSES[PROCESSING_FAILURE], f"database: {type(exc).__name__}"
        ) from exc


class CommitmentServiceClass(StorageCommitmentServiceClass):  # type: ignore[misc]
    """Storage Commitment Push Model SCP with same-association reports."""

    def SCP(self, req: Any, context: PresentationContext) -> None:
        if isinstance(req, N_ACTION):
            self._commitment_action(req, context)
        else:
            super().SCP(req, context)

    @property
    def _ctx(self) -> ServiceContext:
        return cast(ServiceContext, cast(DicomlabAE, self.assoc.ae).service_contexts[SERVICE])

    def _declaration(self, ctx: ServiceContext) -> ServiceDeclaration:
        return ctx.suite.declarations[SERVICE]

    def _commitment_action(self, req: N_ACTION, context: PresentationContext) -> None:
        ctx = self._ctx
        settings = CommitmentSettings.from_mapping(ctx.settings)
        log = logs.assoc_logger(self.assoc)
        calling_ae = _text(self.assoc.requestor.ae_title)
        action: CommitmentAction | None = None
        decisions: list[Decision] = []
        try:
            action = parse_action(req, context)
            log = log.bind(transaction_uid=action.transaction_uid)
            decisions = decide(ctx, settings, action, log)
            record(ctx, action, decisions, calling_ae, not settings.always_new_association)
            row = N_ACTION_STATUSES[SUCCESS_CODE]
            reason = ""
        except Rejected as exc:
            row, reason = exc.row, exc.reason
        except Exception as exc:
            log.exception("n_action_error")
            row, reason = N_ACTION_STATUSES[PROCESSING_FAILURE], type(exc).__name__

        rsp = N_ACTION()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.RequestedSOPClassUID
        rsp.AffectedSOPInstanceUID = req.RequestedSOPInstanceUID
        rsp.ActionTypeID = req.ActionTypeID
        rsp.Status = row.code
        check_status(self._declaration(ctx), "N-ACTION", row.code, log)
        self.dimse.send_msg(rsp, cast(int, context.context_id))
        committed = sum(1 for d in decisions if d.failure_reason is None)
        (log.info if row.code == SUCCESS_CODE else log.warning)(
            "n_action_handled",
            status=f"0x{row.code:04X}",
            meaning=row.meaning,
            reason=reason or None,
            requested=len(action.references) if action else None,
            committed=committed if row.code == SUCCESS_CODE else None,
        )
        if row.code != SUCCESS_CODE or action is None:
            return
        if settings.always_new_association:
            delivery.wake(ctx)
            return
        try:
            self._report_here(ctx, settings, action.transaction_uid, context, log)
        except Exception:
            # The transaction is recorded; the worker delivers it once its claim lapses.
            log.exception("event_report_error", association="same")

    def _report_here(
        self,
        ctx: ServiceContext,
        settings: CommitmentSettings,
        transaction_uid: str,
        context: PresentationContext,
        log: Any,
    ) -> None:
        """First attempt: the N-EVENT-REPORT on the association that carried the N-ACTION."""
        with ctx.db.read() as session:
            request = queries.load_transaction(session, transaction_uid)
        if request is None:
            return
        event_type, ds = delivery.event_report(request)
        log = log.bind(attempt=1)
        if peer_closing(self.assoc):
            # Nothing sent: not an attempt; the worker opens a new association now.
            self._reschedule_now(ctx, transaction_uid)
            log.info("event_report_deferred", reason="peer closed the association first")
            delivery.wake(ctx)
            return
        syntax = context.transfer_syntax[0]
        rq = N_EVENT_REPORT()
        rq.MessageID = 1
        rq.AffectedSOPClassUID = STORAGE_COMMITMENT_PUSH
        rq.AffectedSOPInstanceUID = WELL_KNOWN_INSTANCE
        rq.EventTypeID = event_type
        encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        if encoded is None:
            raise RuntimeError("the Event Information could not be encoded")
        rq.EventInformation = BytesIO(encoded)
        self.dimse.send_msg(rq, cast(int, context.context_id))
        # Table F.4.2-36: a DIMSE timeout waiting for the N-EVENT-REPORT-RSP aborts.
        code, problem = await_response(
            self.assoc, N_EVENT_REPORT, 1, self.assoc.dimse.dimse_timeout, abort_on_timeout=True
        )
        if code is not None and code in DELIVERED_CODES:
            with ctx.db.write() as session:
                queries.mark_delivered(session, transaction_uid, 1)
            (log.warning if code else log.info)(
                "event_report_sent",
                status=f"0x{code:04X}",
                event_type=event_type,
                association="same",
            )
            return
        if code is not None:
            delivery.record_failure(
                ctx, settings, transaction_uid, 1, f"peer answered 0x{code:04X}", log
            )
        else:
            # The statement's fallback: a new association, at once (digest F5).
            delivery.record_failure(ctx, settings, transaction_uid, 1, problem, log, True)
        delivery.wake(ctx)

    def _reschedule_now(self, ctx: ServiceContext, transaction_uid: str) -> None:
        with ctx.db.write() as session:
            queries.reschedule(session, transaction_uid, delivery.utcnow())
