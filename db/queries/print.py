"""Print jobs, their films and the printer's state (PS3.2 Annex E print server)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, selectinload

from db.models import PrinterState, PrintFilm, PrintJob, PrintJobState

UNFINISHED = (PrintJobState.PENDING, PrintJobState.PRINTING)


def add_job(session: Session, job: PrintJob) -> PrintJob:
    """Insert ``job`` and give it the next Print Job ID (a short decimal number)."""
    session.add(job)
    session.flush()
    job.job_number = str(job.id)
    return job


def unfinished_jobs(session: Session) -> int:
    return int(
        session.scalar(select(func.count(PrintJob.id)).where(PrintJob.state.in_(UNFINISHED))) or 0
    )


def job_by_uid(session: Session, job_uid: str) -> PrintJob | None:
    return session.scalar(
        select(PrintJob).options(selectinload(PrintJob.films)).where(PrintJob.job_uid == job_uid)
    )


def job_by_pk(session: Session, pk: int) -> PrintJob | None:
    return session.get(PrintJob, pk)


def set_job_state(
    session: Session, pk: int, state: PrintJobState, info: str, *, attempts: int | None = None
) -> PrintJob | None:
    job = session.get(PrintJob, pk)
    if job is None:
        return None
    job.state = state
    job.status_info = info
    if attempts is not None:
        job.attempts = attempts
    if state in (PrintJobState.DONE, PrintJobState.FAILURE):
        job.finished_at = datetime.now(UTC)
    return job


def fail_unfinished(session: Session, info: str) -> list[str]:
    """End every PENDING or PRINTING job FAILURE with ``info``; their Print Job IDs."""
    jobs = session.scalars(select(PrintJob).where(PrintJob.state.in_(UNFINISHED))).all()
    for job in jobs:
        set_job_state(session, job.id, PrintJobState.FAILURE, info)
    return [job.job_number for job in jobs]


def add_film(session: Session, job_pk: int, film: PrintFilm) -> None:
    film.job_pk = job_pk
    session.add(film)


def set_job_pdf(session: Session, pk: int, relative_path: str) -> None:
    job = session.get(PrintJob, pk)
    if job is not None:
        job.pdf_path = relative_path


def list_jobs(session: Session, limit: int = 50) -> Sequence[PrintJob]:
    return session.scalars(
        select(PrintJob)
        .options(selectinload(PrintJob.films))
        .order_by(PrintJob.id.desc())
        .limit(limit)
    ).all()


def pending_job_pks(session: Session) -> list[int]:
    """Unfinished jobs in print order: Print Priority HIGH, MED, LOW, then first in first out."""
    rank = {"HIGH": 0, "MED": 1, "LOW": 2}
    jobs = session.scalars(select(PrintJob).where(PrintJob.state.in_(UNFINISHED))).all()
    return [j.id for j in sorted(jobs, key=lambda j: (rank.get(j.priority, 2), j.id))]


def delete_job(session: Session, pk: int) -> None:
    session.execute(delete(PrintFilm).where(PrintFilm.job_pk == pk))
    session.execute(delete(PrintJob).where(PrintJob.id == pk))


def expire_jobs(session: Session, older_than_s: float) -> int:
    """Forget finished jobs older than the retention time; returns how many."""
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
    pks = session.scalars(
        select(PrintJob.id).where(
            PrintJob.state.in_((PrintJobState.DONE, PrintJobState.FAILURE)),
            PrintJob.finished_at < cutoff,
        )
    ).all()
    for pk in pks:
        delete_job(session, pk)
    return len(pks)


def printer_state(session: Session) -> tuple[str, str]:
    row = session.scalar(select(PrinterState).order_by(PrinterState.id).limit(1))
    if row is None:
        return ("NORMAL", "NORMAL")
    return (row.status, row.status_info)


def set_printer_state(session: Session, status: str, info: str) -> None:
    row = session.scalar(select(PrinterState).order_by(PrinterState.id).limit(1))
    if row is None:
        session.add(PrinterState(status=status, status_info=info))
        return
    row.status = status
    row.status_info = info
    row.updated_at = datetime.now(UTC)


def job_visible(job: PrintJob, retention_s: float) -> bool:
    """Whether Print Job N-GET still answers for ``job`` (finished jobs expire)."""
    if job.finished_at is None:
        return True
    finished = job.finished_at
    if finished.tzinfo is None:
        finished = finished.replace(tzinfo=UTC)
    return datetime.now(UTC) - finished <= timedelta(seconds=retention_s)
