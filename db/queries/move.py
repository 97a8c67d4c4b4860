"""The instances a C-MOVE sends, found from the unique keys of its identifier.

A retrieve never matches with wildcards: every key is compared for equality, so
no LIKE pattern (and no escaping) is involved. The caller has validated the
identifier already; this module only turns the keys into one SELECT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.models import Instance, Patient, Series, Study

PATIENT = "PATIENT"
STUDY = "STUDY"
SERIES = "SERIES"
IMAGE = "IMAGE"


@dataclass(frozen=True)
class MoveKeys:
    """Validated unique keys of a C-MOVE identifier; ``None`` means "not given".

    Only the key of the retrieve level may list several values; the keys of the
    levels above hold at most one value each.
    """

    level: str
    patient_id: str | None = None
    study_uids: tuple[str, ...] | None = None
    series_uids: tuple[str, ...] | None = None
    sop_instance_uids: tuple[str, ...] | None = None


class MoveInstance(NamedTuple):
    """One instance to send, with the index values the export may apply to it."""

    sop_class_uid: str
    sop_instance_uid: str
    file_path: str
    transfer_syntax_uid: str
    sha256: str
    # Patient row values: the statement exports a database 'U' as empty and the
    # archive's (possibly coerced) Patient ID (Table F.8.1-2; digest C6, C7).
    patient_sex: str
    patient_id: str
    received_patient_id: str


def _in(column: InstrumentedAttribute[str], values: Sequence[str]) -> ColumnElement[bool]:
    return column == values[0] if len(values) == 1 else column.in_(values)


def instances_for_move(session: Session, keys: MoveKeys) -> list[MoveInstance]:
    """Every instance below the entities ``keys`` names, study by study, series by series.

    The order is stable (insertion order of studies, series and instances) so a
    repeated C-MOVE sends the same sequence.

    >>> from db.engine import Database
    >>> from db.models import Base
    >>> db = Database("sqlite://")
    >>> Base.metadata.create_all(db.engine)
    >>> with db.read() as s:
    ...     instances_for_move(s, MoveKeys(level=STUDY, study_uids=("1.2.3",)))
    []
    """
    stmt = (
        select(
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.file_path,
            Instance.transfer_syntax_uid,
            Instance.sha256,
            Patient.sex,
            Patient.patient_id,
            Patient.received_patient_id,
        )
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
    )
    if keys.patient_id is not None:
        stmt = stmt.where(Patient.patient_id == keys.patient_id)
    if keys.study_uids is not None:
        stmt = stmt.where(_in(Study.study_instance_uid, keys.study_uids))
    if keys.series_uids is not None:
        stmt = stmt.where(_in(Series.series_instance_uid, keys.series_uids))
    if keys.sop_instance_uids is not None:
        stmt = stmt.where(_in(Instance.sop_instance_uid, keys.sop_instance_uids))
    stmt = stmt.order_by(Study.id, Series.id, Instance.id)
    return [MoveInstance(*row) for row in session.execute(stmt).all()]
