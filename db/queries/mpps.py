"""Modality Performed Procedure Step: instances, their messages and exceptions.

Every function takes a :class:`~sqlalchemy.orm.Session`; the caller owns the transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import MppsException, PerformedStep, PerformedStepMessage, PpsState, utcnow


def get_step(
    session: Session, sop_instance_uid: str, *, for_update: bool = False
) -> PerformedStep | None:
    """The step, row-locked until the transaction ends when ``for_update``.

    Two processes on one PostgreSQL database may get N-SETs for the same step at
    once; under READ COMMITTED both would read IN PROGRESS and both succeed, the
    second overwriting the first. The lock makes the second wait and then read
    the first's final state. (SQLite writers are serialised by BEGIN IMMEDIATE.)
    """
    query = select(PerformedStep).where(PerformedStep.sop_instance_uid == sop_instance_uid)
    if for_update:
        query = query.with_for_update()
    return session.scalar(query)


def create_step(
    session: Session,
    *,
    sop_instance_uid: str,
    patient_id: str,
    accession_numbers: list[str],
    performed_station_ae: str,
    calling_ae: str,
    matched: bool,
    dataset: dict[str, Any],
) -> PerformedStep:
    step = PerformedStep(
        sop_instance_uid=sop_instance_uid,
        state=PpsState.IN_PROGRESS,
        patient_id=patient_id,
        accession_numbers="\\".join(accession_numbers),
        performed_station_ae=performed_station_ae,
        calling_ae=calling_ae,
        matched=matched,
        dataset=dataset,
    )
    session.add(step)
    session.flush()
    return step


def add_message(
    session: Session, step: PerformedStep, operation: str, calling_ae: str, dataset: dict[str, Any]
) -> None:
    session.add(
        PerformedStepMessage(
            step_pk=step.id, operation=operation, calling_ae=calling_ae, dataset=dataset
        )
    )


def add_exception(session: Session, step: PerformedStep, reason: str) -> None:
    session.add(
        MppsException(step_pk=step.id, sop_instance_uid=step.sop_instance_uid, reason=reason)
    )


def list_steps(session: Session) -> list[PerformedStep]:
    return list(session.scalars(select(PerformedStep).order_by(PerformedStep.id)))


def list_exceptions(session: Session) -> list[MppsException]:
    return list(session.scalars(select(MppsException).order_by(MppsException.id)))


def messages_of(session: Session, step: PerformedStep) -> list[PerformedStepMessage]:
    return list(
        session.scalars(
            select(PerformedStepMessage)
            .where(PerformedStepMessage.step_pk == step.id)
            .order_by(PerformedStepMessage.id)
        )
    )


def purge_steps(session: Session, final_before: datetime, idle_before: datetime) -> int:
    """Delete steps final since ``final_before`` or in progress untouched since ``idle_before``."""
    doomed = list(
        session.scalars(
            select(PerformedStep.id).where(
                ((PerformedStep.final_at.is_not(None)) & (PerformedStep.final_at < final_before))
                | ((PerformedStep.final_at.is_(None)) & (PerformedStep.updated_at < idle_before))
            )
        )
    )
    if not doomed:
        return 0
    session.execute(delete(PerformedStepMessage).where(PerformedStepMessage.step_pk.in_(doomed)))
    session.execute(delete(MppsException).where(MppsException.step_pk.in_(doomed)))
    session.execute(delete(PerformedStep).where(PerformedStep.id.in_(doomed)))
    return len(doomed)


def touch(step: PerformedStep) -> None:
    step.updated_at = utcnow()
