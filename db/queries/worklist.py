"""Modality Worklist: scheduled procedure steps, their states and removal.

Every function takes a :class:`~sqlalchemy.orm.Session`; the caller owns the
transaction (``Database.read()`` for lookups, ``Database.write()`` for changes).
Matching keys are filtered here in SQL wherever SQL says exactly what the
statement says: equality, the start-date range and ``*``/``?`` wildcards (an
escaped ``LIKE`` on PostgreSQL, a case-sensitive ``GLOB`` on SQLite, as for the
archive's C-FIND). Patient's Name is matched on ``patient_name_key``, the stored
case-folded alphabetic group, with a case-folded pattern, so the case rule holds
on both databases. The caller finishes what SQL cannot express on the few light
rows returned (the performing physician's alphabetic group, start date and time
as one range) and only then loads the entries it answers with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.models import ScheduledStep, utcnow
from db.queries.find import LIKE_ESCAPE, glob_pattern, like_pattern


@dataclass(frozen=True)
class StepRecord:
    """A new worklist entry: the matching columns and the whole entry (DICOM JSON)."""

    sps_id: str
    accession_number: str
    patient_id: str
    patient_name: str
    patient_name_key: str
    modality: str
    station_ae: str
    start_date: str
    start_time: str
    performing_physician: str
    study_instance_uid: str
    dataset: dict[str, Any]
    placer_order_number: str = ""
    source: str = ""


@dataclass(frozen=True)
class StepFilter:
    """What the database decides: exact values, DICOM wildcard patterns (``*``/``?``,
    every other character literal) and an inclusive start-date range.

    Keys of ``equal`` and ``wildcard`` name columns of :data:`MATCH_COLUMNS`; the
    ``patient_name_key`` value must already be case-folded. ``prefix`` patterns
    match the start of the stored value (a superset the caller narrows).
    """

    equal: dict[str, str] = field(default_factory=dict)
    wildcard: dict[str, str] = field(default_factory=dict)
    prefix: dict[str, str] = field(default_factory=dict)
    date_low: str = ""
    date_high: str = ""


@dataclass(frozen=True)
class StepCandidate:
    """The columns the caller still matches on, without the stored entry."""

    id: int
    sps_id: str
    start_date: str
    start_time: str
    performing_physician: str


MATCH_COLUMNS: dict[str, InstrumentedAttribute[str]] = {
    "patient_id": ScheduledStep.patient_id,
    "patient_name_key": ScheduledStep.patient_name_key,
    "modality": ScheduledStep.modality,
    "station_ae": ScheduledStep.station_ae,
    "performing_physician": ScheduledStep.performing_physician,
}


def _wildcard(
    column: InstrumentedAttribute[str], pattern: str, dialect: str
) -> ColumnElement[bool]:
    # SQLite's LIKE ignores ASCII case, so there the case-sensitive GLOB; wildcards
    # and escaping come from the archive's C-FIND so that both say the same.
    if dialect == "sqlite":
        return column.op("GLOB")(glob_pattern(pattern))
    return column.like(like_pattern(pattern), escape=LIKE_ESCAPE)


def existing_sps_ids(session: Session, sps_ids: Iterable[str]) -> set[str]:
    ids = list(sps_ids)
    if not ids:
        return set()
    return set(session.scalars(select(ScheduledStep.sps_id).where(ScheduledStep.sps_id.in_(ids))))


def active_accessions(session: Session, accessions: Iterable[str]) -> set[str]:
    """Accession numbers among ``accessions`` that already have an active entry."""
    values = [a for a in accessions if a]
    if not values:
        return set()
    rows = session.scalars(
        select(ScheduledStep.accession_number).where(
            ScheduledStep.accession_number.in_(values), ScheduledStep.removed.is_(False)
        )
    )
    return set(rows)


def add_steps(session: Session, records: Sequence[StepRecord]) -> list[ScheduledStep]:
    rows = [
        ScheduledStep(
            sps_id=r.sps_id,
            accession_number=r.accession_number,
            patient_id=r.patient_id,
            patient_name=r.patient_name,
            patient_name_key=r.patient_name_key,
            modality=r.modality,
            station_ae=r.station_ae,
            start_date=r.start_date,
            start_time=r.start_time,
            performing_physician=r.performing_physician,
            study_instance_uid=r.study_instance_uid,
            dataset=r.dataset,
            placer_order_number=r.placer_order_number,
            source=r.source,
            procedure_state="SCHEDULED",
            removed=False,
            removed_reason="",
        )
        for r in records
    ]
    session.add_all(rows)
    session.flush()
    return rows


def candidate_steps(session: Session, where: StepFilter) -> list[StepCandidate]:
    """Entries still on the worklist that pass the database-side conditions, in schedule
    order: the matching columns only, so a broad query decodes no stored entry."""
    dialect = session.get_bind().dialect.name
    query = select(
        ScheduledStep.id,
        ScheduledStep.sps_id,
        ScheduledStep.start_date,
        ScheduledStep.start_time,
        ScheduledStep.performing_physician,
    ).where(ScheduledStep.removed.is_(False))
    for name, value in where.equal.items():
        query = query.where(MATCH_COLUMNS[name] == value)
    for name, pattern in where.wildcard.items():
        query = query.where(_wildcard(MATCH_COLUMNS[name], pattern, dialect))
    for name, pattern in where.prefix.items():
        query = query.where(_wildcard(MATCH_COLUMNS[name], pattern + "*", dialect))
    if where.date_low:
        query = query.where(ScheduledStep.start_date >= where.date_low)
    if where.date_high:
        query = query.where(ScheduledStep.start_date <= where.date_high)
    query = query.order_by(ScheduledStep.start_date, ScheduledStep.start_time, ScheduledStep.id)
    return [StepCandidate(*row) for row in session.execute(query)]


# Bound parameters per IN list: SQLite allows 32,766 per statement, older builds 999.
_IDS_PER_QUERY = 900


def step_datasets(session: Session, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The stored entries (DICOM JSON) of the steps ``ids``, by id."""
    found: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start : start + _IDS_PER_QUERY]
        rows = session.execute(
            select(ScheduledStep.id, ScheduledStep.dataset).where(ScheduledStep.id.in_(chunk))
        )
        found.update({row_id: dataset for row_id, dataset in rows})
    return found


def list_steps(session: Session, include_removed: bool = False) -> list[ScheduledStep]:
    query = select(ScheduledStep)
    if not include_removed:
        query = query.where(ScheduledStep.removed.is_(False))
    query = query.order_by(ScheduledStep.start_date, ScheduledStep.start_time, ScheduledStep.id)
    return list(session.scalars(query))


def remove_step(session: Session, sps_id: str, reason: str) -> bool:
    """Take one entry off the worklist; False when no active entry has that SPS ID."""
    result = session.execute(
        update(ScheduledStep)
        .where(ScheduledStep.sps_id == sps_id, ScheduledStep.removed.is_(False))
        .values(removed=True, removed_reason=reason, updated_at=utcnow())
    )
    return bool(getattr(result, "rowcount", 0))


def cancel_order(session: Session, placer_order_number: str) -> int:
    """Remove every active entry of an order (the sample's "parent procedure canceled")."""
    if not placer_order_number:
        return 0
    result = session.execute(
        update(ScheduledStep)
        .where(
            ScheduledStep.placer_order_number == placer_order_number,
            ScheduledStep.removed.is_(False),
        )
        .values(
            removed=True, removed_reason="canceled", procedure_state="CANCELED", updated_at=utcnow()
        )
    )
    return int(getattr(result, "rowcount", 0))


def steps_for_order(
    session: Session, patient_id: str, accessions: Iterable[str]
) -> list[ScheduledStep]:
    """Entries (removed or not) of ``patient_id`` with one of ``accessions``."""
    values = [a for a in accessions if a]
    if not values:
        return []
    return list(
        session.scalars(
            select(ScheduledStep).where(
                ScheduledStep.patient_id == patient_id,
                ScheduledStep.accession_number.in_(values),
            )
        )
    )


def patient_known(session: Session, patient_id: str) -> bool:
    return (
        session.scalar(
            select(ScheduledStep.id).where(ScheduledStep.patient_id == patient_id).limit(1)
        )
        is not None
    )


def set_procedure_state(
    session: Session, accessions: Iterable[str], state: str, removal_state: str
) -> int:
    """Set the requested procedure state of every entry of ``accessions``.

    Reaching ``removal_state`` takes the entries off the worklist; an entry once
    removed stays removed.
    """
    values = [a for a in accessions if a]
    if not values:
        return 0
    now = utcnow()
    result = session.execute(
        update(ScheduledStep)
        .where(ScheduledStep.accession_number.in_(values))
        .values(procedure_state=state, updated_at=now)
    )
    if state == removal_state:
        session.execute(
            update(ScheduledStep)
            .where(ScheduledStep.accession_number.in_(values), ScheduledStep.removed.is_(False))
            .values(removed=True, removed_reason=f"state {state}"[:64], updated_at=now)
        )
    return int(getattr(result, "rowcount", 0))


def expire_steps(session: Session, scheduled_before: datetime) -> int:
    """Remove active entries scheduled before ``scheduled_before`` (local time, naive)."""
    stamp_date = scheduled_before.strftime("%Y%m%d")
    stamp_time = scheduled_before.strftime("%H%M%S")
    rows = session.scalars(
        select(ScheduledStep).where(
            ScheduledStep.removed.is_(False), ScheduledStep.start_date <= stamp_date
        )
    )
    count = 0
    now = utcnow()
    for row in rows:
        if (row.start_date, row.start_time[:6]) < (stamp_date, stamp_time):
            row.removed = True
            row.removed_reason = "expired"
            row.updated_at = now
            count += 1
    return count
