"""C-FIND matching as SQL: one typed function over the archive index.

The caller (``servers/query_retrieve/find.py``) validates the identifier and hands
over :class:`Condition` objects naming attributes by DICOM keyword; this module
owns the keyword-to-column map and every SQL construct.

Wildcards: on PostgreSQL ``*``/``?`` become an escaped ``LIKE`` (``%``, ``_`` and
the escape character ``!`` in the value are escaped first, so they match
literally). SQLite's ``LIKE`` ignores ASCII case, so there the same pattern is a
``GLOB`` (case-sensitive), with ``[`` bracketed so it matches literally.

>>> like_pattern("100%_a*b?!")
'100!%!_a%b_!!'
>>> glob_pattern("a[1]*?")
'a[[]1]*?'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.models import Instance, Patient, Series, Study
from db.values import name_key

LIKE_ESCAPE = "!"

MatchKind = Literal["single", "wildcard", "range", "list"]


@dataclass(frozen=True)
class Condition:
    """One matching key of a C-FIND identifier, already validated and normalised.

    ``values``: ``(value,)`` for single and wildcard matching (wildcards as DICOM
    ``*``/``?``), ``(low, high)`` for a range with ``""`` for an open end, and the
    UIDs for list matching. Person names arrive as ``family^given``; this module
    case-folds them.
    """

    keyword: str
    kind: MatchKind
    values: tuple[str, ...]


@dataclass(frozen=True)
class _Column:
    entity: str
    returned: InstrumentedAttribute[str]
    matched: InstrumentedAttribute[str]
    casefold: bool = False
    # Stored values meaning "unknown": such rows match every query value (digest D10, D13).
    unknown: tuple[str, ...] = ("",)


def _col(entity: str, column: InstrumentedAttribute[str], **kwargs: Any) -> _Column:
    return _Column(entity, column, column, **kwargs)


COLUMNS: dict[str, _Column] = {
    "PatientName": _Column(
        "patient", Patient.patient_name, Patient.patient_name_key, casefold=True
    ),
    "PatientID": _col("patient", Patient.patient_id),
    "PatientBirthDate": _col("patient", Patient.birth_date),
    "PatientSex": _col("patient", Patient.sex, unknown=("", "U")),
    "OtherPatientIDs": _col("patient", Patient.other_patient_ids),
    "OtherPatientNames": _col("patient", Patient.other_patient_names),
    "StudyDate": _col("study", Study.study_date),
    "StudyTime": _col("study", Study.study_time),
    "AccessionNumber": _col("study", Study.accession_number),
    "StudyID": _col("study", Study.study_id),
    "StudyInstanceUID": _col("study", Study.study_instance_uid),
    "ReferringPhysicianName": _Column(
        "study",
        Study.referring_physician_name,
        Study.referring_physician_name_key,
        casefold=True,
    ),
    "StudyDescription": _col("study", Study.study_description),
    "Modality": _col("series", Series.modality),
    "SeriesNumber": _col("series", Series.series_number),
    "SeriesInstanceUID": _col("series", Series.series_instance_uid),
    "OperatorsName": _col("series", Series.operator_name),
    "InstanceNumber": _col("instance", Instance.instance_number),
    "SOPInstanceUID": _col("instance", Instance.sop_instance_uid),
}

# Query/Retrieve Level to the entities whose attributes a response may carry.
LEVEL_ENTITIES: dict[str, tuple[str, ...]] = {
    "PATIENT": ("patient",),
    "STUDY": ("patient", "study"),
    "SERIES": ("patient", "study", "series"),
    "IMAGE": ("patient", "study", "series", "instance"),
}


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as a LIKE pattern with escape character ``!``."""
    escaped = (
        value.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )
    return escaped.replace("*", "%").replace("?", "_")


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQLite GLOB pattern (``*``/``?`` kept, ``[`` literal)."""
    return value.replace("[", "[[]")


def _wildcard(column: InstrumentedAttribute[str], value: str, dialect: str) -> ColumnElement[bool]:
    if dialect == "sqlite":
        return column.op("GLOB")(glob_pattern(value))
    return column.like(like_pattern(value), escape=LIKE_ESCAPE)


def _condition(condition: Condition, dialect: str) -> ColumnElement[bool]:
    spec = COLUMNS[condition.keyword]
    column = spec.matched
    values = tuple(name_key(v) for v in condition.values) if spec.casefold else condition.values
    clause: ColumnElement[bool]
    if condition.kind == "single":
        clause = column == values[0]
    elif condition.kind == "wildcard":
        clause = _wildcard(column, values[0], dialect)
    elif condition.kind == "list":
        clause = column.in_(values)
    else:
        low, high = values
        bounds = []
        if low:
            bounds.append(column >= low)
        if high:
            bounds.append(column <= high)
        clause = and_(*bounds)
    return or_(clause, column.in_(spec.unknown))


def _statement(
    level: str, conditions: Sequence[Condition], dialect: str
) -> Select[*tuple[Any, ...]]:
    entities = LEVEL_ENTITIES[level]
    columns = [
        spec.returned.label(keyword) for keyword, spec in COLUMNS.items() if spec.entity in entities
    ]
    stmt = select(*columns).select_from(Patient)
    order: InstrumentedAttribute[int] = Patient.id
    if "study" in entities:
        stmt = stmt.join(Study, Study.patient_pk == Patient.id)
        order = Study.id
    if "series" in entities:
        stmt = stmt.join(Series, Series.study_pk == Study.id)
        order = Series.id
    if "instance" in entities:
        stmt = stmt.join(Instance, Instance.series_pk == Series.id)
        order = Instance.id
    for condition in conditions:
        if COLUMNS[condition.keyword].entity not in entities:
            raise ValueError(f"{condition.keyword} is below the {level} level")
        stmt = stmt.where(_condition(condition, dialect))
    # Joins only go upwards (many-to-one), so each row is one distinct entity.
    return stmt.order_by(order)


def find_matches(
    session: Session, level: str, conditions: Sequence[Condition]
) -> list[dict[str, str]]:
    """Every entity at ``level`` matching all ``conditions``, in stable (insertion) order.

    Each match maps attribute keywords of its entity and the entities above it to
    the stored value ("" when unknown).
    """
    dialect = session.get_bind().dialect.name
    rows = session.execute(_statement(level, conditions, dialect)).mappings().all()
    return [{key: value or "" for key, value in row.items()} for row in rows]
