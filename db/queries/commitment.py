"""Storage Commitment: the instances a request names, and the transactions awaiting delivery.

Every function takes a :class:`~sqlalchemy.orm.Session`; the caller owns the
transaction (``Database.read()`` for lookups, ``Database.write()`` for changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, selectinload

from db.models import CommitmentItem, CommitmentRequest, CommitmentState, Instance

# Keep IN lists well below every backend's bound-parameter limit (SQLite: 32766).
_CHUNK = 500


@dataclass(frozen=True)
class StoredInstance:
    """What commitment needs to know about one indexed instance."""

    sop_instance_uid: str
    sop_class_uid: str
    file_path: str
    sha256: str


@dataclass(frozen=True)
class Decision:
    """One referenced instance and its outcome: ``failure_reason`` None means committed."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None


def stored_instances(session: Session, uids: Iterable[str]) -> dict[str, StoredInstance]:
    """The index rows whose SOP Instance UID is one of ``uids``, by that UID."""
    wanted = list(dict.fromkeys(uids))
    found: dict[str, StoredInstance] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        rows = session.execute(
            select(
                Instance.sop_instance_uid,
                Instance.sop_class_uid,
                Instance.file_path,
                Instance.sha256,
            ).where(Instance.sop_instance_uid.in_(chunk))
        )
        for uid, sop_class, path, sha256 in rows:
            found[uid] = StoredInstance(uid, sop_class, path, sha256)
    return found


def find_transaction(session: Session, transaction_uid: str) -> CommitmentRequest | None:
    return session.scalars(
        select(CommitmentRequest).where(CommitmentRequest.transaction_uid == transaction_uid)
    ).one_or_none()


def record_transaction(
    session: Session,
    *,
    transaction_uid: str,
    calling_ae: str,
    called_ae: str,
    decisions: Sequence[Decision],
    next_attempt_at: datetime,
    existing: CommitmentRequest | None = None,
) -> CommitmentRequest:
    """Store a PENDING transaction with its outcomes; ``existing`` (a finished one) is reused."""
    event_type = 1 if all(d.failure_reason is None for d in decisions) else 2
    if existing is None:
        request = CommitmentRequest(transaction_uid=transaction_uid)
        session.add(request)
    else:
        request = existing
        session.execute(delete(CommitmentItem).where(CommitmentItem.request_pk == request.id))
    request.calling_ae = calling_ae
    request.called_ae = called_ae
    request.state = CommitmentState.PENDING
    request.event_type_id = event_type
    request.attempts = 0
    request.next_attempt_at = next_attempt_at
    request.last_error = ""
    session.flush()
    session.add_all(
        CommitmentItem(
            request_pk=request.id,
            sop_class_uid=d.sop_class_uid,
            sop_instance_uid=d.sop_instance_uid,
            failure_reason=d.failure_reason,
        )
        for d in decisions
    )
    session.flush()
    return request


def load_transaction(session: Session, transaction_uid: str) -> CommitmentRequest | None:
    """A transaction with its items loaded, usable after the session closes."""
    return session.scalars(
        select(CommitmentRequest)
        .options(selectinload(CommitmentRequest.items))
        .where(CommitmentRequest.transaction_uid == transaction_uid)
    ).one_or_none()


def due_transactions(session: Session, called_ae: str, now: datetime) -> list[CommitmentRequest]:
    """PENDING transactions received on ``called_ae`` whose next attempt is due, oldest first."""
    return list(
        session.scalars(
            select(CommitmentRequest)
            .options(selectinload(CommitmentRequest.items))
            .where(
                CommitmentRequest.state == CommitmentState.PENDING,
                CommitmentRequest.called_ae == called_ae,
                CommitmentRequest.next_attempt_at <= now,
            )
            .order_by(CommitmentRequest.next_attempt_at, CommitmentRequest.id)
        )
    )


def next_due(session: Session, called_ae: str) -> datetime | None:
    """When the earliest PENDING transaction of ``called_ae`` is due, if any."""
    return session.scalar(
        select(func.min(CommitmentRequest.next_attempt_at)).where(
            CommitmentRequest.state == CommitmentState.PENDING,
            CommitmentRequest.called_ae == called_ae,
        )
    )


def mark_delivered(session: Session, transaction_uid: str, attempts: int) -> None:
    request = find_transaction(session, transaction_uid)
    if request is None:
        return
    request.state = CommitmentState.DELIVERED
    request.attempts = attempts
    request.next_attempt_at = None
    request.last_error = ""


def mark_attempt_failed(
    session: Session,
    transaction_uid: str,
    *,
    attempts: int,
    error: str,
    next_attempt_at: datetime | None,
) -> None:
    """Record a failed attempt; ``next_attempt_at`` None makes the failure final."""
    request = find_transaction(session, transaction_uid)
    if request is None:
        return
    request.attempts = attempts
    request.last_error = error
    request.next_attempt_at = next_attempt_at
    if next_attempt_at is None:
        request.state = CommitmentState.FAILED


def reschedule(session: Session, transaction_uid: str, next_attempt_at: datetime) -> None:
    """Move a transaction's next attempt without counting one (a halted batch)."""
    request = find_transaction(session, transaction_uid)
    if request is not None and request.state == CommitmentState.PENDING:
        request.next_attempt_at = next_attempt_at
