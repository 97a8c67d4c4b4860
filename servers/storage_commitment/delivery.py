"""Delivering Storage Commitment reports over associations this AE opens.

One worker per AE that runs the service. It opens one association at a time
(Table F.4.2-24) to the peer whose calling AE title sent the N-ACTION, sends
every due report for that peer over it, and records each outcome in the
database, so that a restart picks up where the last run stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.presentation import build_role

from db.models import CommitmentRequest
from db.queries import commitment as queries
from servers.core import logs
from servers.core.context import ServiceContext
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION
from servers.storage_commitment.tables import (
    DELIVERED_CODES,
    EVENT_ALL_COMMITTED,
    EVENT_FAILURES_EXIST,
    STORAGE_COMMITMENT_PUSH,
    WELL_KNOWN_INSTANCE,
    CommitmentSettings,
)

# Table F.4.2-28, one transfer syntax per context as printed.
PROPOSED_CONTEXTS: tuple[tuple[str, str], ...] = (
    (VERIFICATION, IMPLICIT_VR_LE),
    (STORAGE_COMMITMENT_PUSH, IMPLICIT_VR_LE),
    (STORAGE_COMMITMENT_PUSH, EXPLICIT_VR_LE),
)

# Longest sleep between looks at the queue when nothing is due.
_IDLE_WAIT = 30.0

# Workers by the id of their suite, so the N-ACTION handler can wake its own.
_WORKERS: dict[int, DeliveryWorker] = {}


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def event_report(request: CommitmentRequest) -> tuple[int, Dataset]:
    """The Event Type ID and Event Information of a stored transaction (PS3.4 J.3.3)."""
    ds = Dataset()
    ds.TransactionUID = request.transaction_uid
    committed = [item for item in request.items if item.failure_reason is None]
    failed = [item for item in request.items if item.failure_reason is not None]
    if committed:
        # Type 1C in event type 2: present only when something was committed.
        ds.ReferencedSOPSequence = [
            _reference(i.sop_class_uid, i.sop_instance_uid) for i in committed
        ]
    if failed:
        items = []
        for item in failed:
            ref = _reference(item.sop_class_uid, item.sop_instance_uid)
            ref.FailureReason = item.failure_reason
            items.append(ref)
        ds.FailedSOPSequence = items
    return (EVENT_FAILURES_EXIST if failed else EVENT_ALL_COMMITTED), ds


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_instance
    return ref


def next_attempt(
    settings: CommitmentSettings, attempts: int, now: datetime, immediate: bool = False
) -> datetime | None:
    """When to try again after ``attempts`` failed ones; None once they are used up."""
    if attempts >= settings.max_attempts:
        return None
    return now if immediate else now + timedelta(seconds=settings.retry_interval)


def record_failure(
    ctx: ServiceContext,
    settings: CommitmentSettings,
    transaction_uid: str,
    attempts: int,
    error: str,
    log: Any,
    immediate: bool = False,
) -> None:
    """Count a failed attempt, schedule the next one or fail the transaction for good."""
    when = next_attempt(settings, attempts, utcnow(), immediate)
    with ctx.db.write() as session:
        queries.mark_attempt_failed(
            session, transaction_uid, attempts=attempts, error=error, next_attempt_at=when
        )
    if when is None:
        log.error("commitment_failed", attempts=attempts, error=error)
    else:
        log.warning(
            "event_report_failed", attempts=attempts, error=error, retry_at=when.isoformat()
        )


def wake(ctx: ServiceContext) -> None:
    worker = _WORKERS.get(id(ctx.suite))
    if worker is not None:
        worker.wake()


class DeliveryWorker:
    """Delivers PENDING reports whose next attempt is due; ``stop()`` ends it."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = CommitmentSettings.from_mapping(ctx.settings)
        self.log = logs.get_logger(ae=ctx.ae.title, worker="commitment_delivery")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"commitment-delivery-{ctx.ae.key}", daemon=True
        )

    def start(self) -> DeliveryWorker:
        _WORKERS[id(self.ctx.suite)] = self
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if _WORKERS.get(id(self.ctx.suite)) is self:
            del _WORKERS[id(self.ctx.suite)]
        self._thread.join(timeout=self.ctx.ae.acse_timeout + 5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.deliver_due()
                wait = self._until_next_due()
            except Exception:
                # A database outage must not end the worker; the next round retries.
                self.log.exception("commitment_worker_error")
                wait = min(_IDLE_WAIT, max(self.settings.retry_interval, 1.0))
            self._wake.wait(wait)

    def _until_next_due(self) -> float:
        with self.ctx.db.read() as session:
            due = queries.next_due(session, self.ctx.ae.title)
        if due is None:
            return _IDLE_WAIT
        seconds = (aware(due) - utcnow()).total_seconds()
        return min(_IDLE_WAIT, max(seconds, 0.01))

    def deliver_due(self) -> None:
        with self.ctx.db.read() as session:
            due = queries.due_transactions(session, self.ctx.ae.title, utcnow())
        by_peer: dict[str, list[CommitmentRequest]] = {}
        for request in due:
            by_peer.setdefault(request.calling_ae, []).append(request)
        for peer, requests in by_peer.items():
            if self._stopping.is_set():
                return
            self._deliver_to(peer, requests)

    def _deliver_to(self, peer: str, requests: Sequence[CommitmentRequest]) -> None:
        remote = self.ctx.config.remote(peer)
        if remote is None:
            # Digest F4: no fallback to the peer's address with a guessed port.
            for request in requests:
                with self.ctx.db.write() as session:
                    queries.mark_attempt_failed(
                        session,
                        request.transaction_uid,
                        attempts=request.attempts,
                        error=f"peer AE {peer!r} is not in the remote AE table",
                        next_attempt_at=None,
                    )
                self.log.error(
                    "commitment_failed",
                    transaction_uid=request.transaction_uid,
                    peer_ae=peer,
                    error="peer AE not configured in [remote]",
                )
            return

        ae = self.ctx.suite.requestor(self.ctx.ae.key)
        for abstract_syntax, transfer_syntax in PROPOSED_CONTEXTS:
            ae.add_requested_context(abstract_syntax, [transfer_syntax])
        try:
            assoc = ae.associate(
                remote.host,
                remote.port,
                ae_title=remote.title,
                ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)],
            )
            if not assoc.is_established:
                for request in requests:
                    record_failure(
                        self.ctx,
                        self.settings,
                        request.transaction_uid,
                        request.attempts + 1,
                        f"association to {remote.title}@{remote.host}:{remote.port} "
                        "not established",
                        self.log.bind(transaction_uid=request.transaction_uid, peer_ae=peer),
                    )
                return
            self._check_role(assoc, peer)
            try:
                self._send_all(assoc, peer, requests)
            finally:
                if assoc.is_established:
                    assoc.release()
        finally:
            ae.shutdown()

    def _check_role(self, assoc: Any, peer: str) -> None:
        contexts = [
            cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH
        ]
        if contexts and not any(cx.as_scp for cx in contexts):
            # Digest F3: many SCUs ignore role selection; the report is sent anyway.
            self.log.warning("role_selection_not_confirmed", peer_ae=peer)

    def _send_all(self, assoc: Any, peer: str, requests: Sequence[CommitmentRequest]) -> None:
        for index, request in enumerate(requests):
            attempt = request.attempts + 1
            log = self.log.bind(
                transaction_uid=request.transaction_uid, peer_ae=peer, attempt=attempt
            )
            event_type, ds = event_report(request)
            code: int | None = None
            error = ""
            try:
                status, _reply = assoc.send_n_event_report(
                    ds, event_type, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE, msg_id=index + 1
                )
                code = int(status.Status) if "Status" in status else None
            except (RuntimeError, ValueError) as exc:
                # No accepted Storage Commitment context, or the association went away.
                error = str(exc)
            if code in DELIVERED_CODES:
                with self.ctx.db.write() as session:
                    queries.mark_delivered(session, request.transaction_uid, attempt)
                (log.warning if code else log.info)(
                    "event_report_sent",
                    status=f"0x{code:04X}",
                    event_type=event_type,
                    association="new",
                )
                continue
            error = error or (f"peer answered 0x{code:04X}" if code is not None else "no response")
            record_failure(self.ctx, self.settings, request.transaction_uid, attempt, error, log)
            # The statement halts the batch on any error; the rest wait for the same retry.
            retry = utcnow() + timedelta(seconds=self.settings.retry_interval)
            with self.ctx.db.write() as session:
                for later in requests[index + 1 :]:
                    queries.reschedule(session, later.transaction_uid, retry)
            return


def start_worker(ctx: ServiceContext) -> DeliveryWorker:
    return DeliveryWorker(ctx).start()
