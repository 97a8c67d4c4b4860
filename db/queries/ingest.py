"""A received composite instance becomes patient, study, series and instance rows.

Used by the Storage SCP for every C-STORE and meant for any bulk loader: build an
:class:`IndexRecord` with :func:`record_from_dataset`, then call :func:`index_instance`
inside one write transaction. What each column means is documented in
:mod:`db.models`; this module is where received values are normalised into them
(Annex F Table F.8.1-2; digest C5, C7, C11, C12):

* ``patient_name`` is ``family^given`` from the first component group
  (``last^first`` and ``last, first`` are parsed, anything else is all family
  name), ``patient_name_key`` its case-folded form;
* ``sex`` is M, F or O from the first character, otherwise U;
* ``study_time`` is :func:`db.values.normalize_time` of Study Time;
* ``series_number`` and ``instance_number`` are the decimal string without
  padding (``" 007"`` becomes ``"7"``); a value that is not an integer is kept
  trimmed;
* referring physician and operator names keep their first component group
  as received (trimmed), with a case-folded ``*_key``;
* multi-valued Other Patient IDs / Names are joined with ``\\``;
* every value is cut to its column's length; the file keeps the full value.

A Patient ID already held by a patient with a different name (family and given
name compared case-insensitively) is coerced to ``<id>_<n>``, the smallest
``n >= 1`` not in use (digest C7); later instances with the same ID and name
map to the same coerced ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from db.models import Instance, Patient, Series, Study, utcnow
from db.values import (
    LO_MAX,
    clean,
    name_key,
    normalize_sex,
    normalize_time,
    person_name,
    split_person_name,
)

UID_MAX = 64
SH_MAX = 16
DA_MAX = 8
TM_MAX = 16
IS_MAX = 12
PN_MAX = 320
# How many ``<id>_<n>`` candidates are tried before giving up on a Patient ID.
MAX_PATIENT_ID_SUFFIX = 100_000

# Every attribute the index reads from a received data set, for readers that
# decode only these (pydicom ``specific_tags``).
INDEX_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDs",
    "OtherPatientNames",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "OperatorsName",
    "SeriesDescription",
    "InstanceNumber",
)


class IndexValueError(ValueError):
    """A value the index needs cannot be decoded from the data set."""


@dataclass(frozen=True)
class IndexRecord:
    """The index columns of one received instance, already normalised."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    family_name: str
    given_name: str
    birth_date: str
    sex: str
    other_patient_ids: str
    other_patient_names: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    referring_physician_name: str
    study_description: str
    modality: str
    series_number: str
    operator_name: str
    series_description: str
    instance_number: str

    @property
    def patient_name(self) -> str:
        return person_name(self.family_name, self.given_name)


@dataclass(frozen=True)
class StoredFacts:
    """Where and how the instance's file was written."""

    relative_path: str
    size: int
    sha256: str
    transfer_syntax_uid: str
    source_ae: str


@dataclass(frozen=True)
class IngestResult:
    instance_pk: int
    # The Patient ID the archive answers with for this instance.
    patient_id: str
    # True when that differs from the received Patient ID (digest C7).
    patient_id_coerced: bool
    # The file of the instance row this one replaced; delete it after commit.
    replaced_path: str | None


def _text(value: Any) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(clean(v) for v in value)
    return clean(value)


def _get(ds: Dataset, keyword: str) -> str:
    try:
        return _text(ds.get(keyword))
    except Exception as exc:  # pydicom raises many types for undecodable values
        raise IndexValueError(f"{keyword} cannot be decoded: {exc}") from exc


def _first_group(raw: str) -> str:
    """The alphabetic component group of a PN value, without trailing ``^``."""
    return raw.split("=")[0].rstrip("^ ").strip()


def _integer_string(raw: str) -> str:
    text = raw.strip()
    try:
        return str(int(text))[:IS_MAX]
    except ValueError:
        return text[:IS_MAX]


def record_from_dataset(ds: Dataset) -> IndexRecord:
    """Normalise the index attributes of ``ds`` (see the module docstring).

    >>> from pydicom.dataset import Dataset
    >>> ds = Dataset()
    >>> ds.PatientName, ds.PatientSex, ds.SeriesNumber = "Doe, John", "female", "007"
    >>> record = record_from_dataset(ds)
    >>> record.patient_name, record.sex, record.series_number
    ('Doe^John', 'F', '7')

    Raises
    ------
    IndexValueError
        When a value cannot be decoded (for example, an unknown character set).
    """
    family, given = split_person_name(_get(ds, "PatientName"))
    return IndexRecord(
        sop_class_uid=_get(ds, "SOPClassUID"),
        sop_instance_uid=_get(ds, "SOPInstanceUID"),
        study_instance_uid=_get(ds, "StudyInstanceUID"),
        series_instance_uid=_get(ds, "SeriesInstanceUID"),
        patient_id=_get(ds, "PatientID")[:LO_MAX],
        family_name=family,
        given_name=given,
        birth_date=_get(ds, "PatientBirthDate")[:DA_MAX],
        sex=normalize_sex(_get(ds, "PatientSex")),
        other_patient_ids=_get(ds, "OtherPatientIDs"),
        other_patient_names=_get(ds, "OtherPatientNames"),
        study_date=_get(ds, "StudyDate")[:DA_MAX],
        study_time=normalize_time(_get(ds, "StudyTime"))[:TM_MAX],
        accession_number=_get(ds, "AccessionNumber")[:SH_MAX],
        study_id=_get(ds, "StudyID")[:SH_MAX],
        referring_physician_name=_first_group(_get(ds, "ReferringPhysicianName"))[:PN_MAX],
        study_description=_get(ds, "StudyDescription")[:LO_MAX],
        modality=_get(ds, "Modality")[:SH_MAX],
        series_number=_integer_string(_get(ds, "SeriesNumber")),
        operator_name=_first_group(_get(ds, "OperatorsName"))[:PN_MAX],
        series_description=_get(ds, "SeriesDescription")[:LO_MAX],
        instance_number=_integer_string(_get(ds, "InstanceNumber")),
    )


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The instance row stored under ``sop_instance_uid``, if any."""
    return session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    ).one_or_none()


# The statements every C-STORE runs, built once and on the tables rather than the
# mapped classes: the ORM's per-statement set-up and cache-key work cost more than
# SQLite's execution of them.
_PATIENT = cast(Table, Patient.__table__)
_STUDY = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCE = cast(Table, Instance.__table__)
_INSTANCE_BY_UID = select(_INSTANCE.c.id, _INSTANCE.c.file_path).where(
    _INSTANCE.c.sop_instance_uid == bindparam("uid")
)
_KNOWN_SERIES = (
    select(_SERIES.c.id, _PATIENT.c.patient_id)
    .select_from(
        _SERIES.join(_STUDY, _SERIES.c.study_pk == _STUDY.c.id).join(
            _PATIENT, _STUDY.c.patient_pk == _PATIENT.c.id
        )
    )
    .where(
        _SERIES.c.series_instance_uid == bindparam("series_uid"),
        _STUDY.c.study_instance_uid == bindparam("study_uid"),
    )
)
_INSERT_INSTANCE = insert(_INSTANCE).returning(_INSTANCE.c.id)
_UPDATE_INSTANCE = update(_INSTANCE).where(_INSTANCE.c.id == bindparam("pk"))


def instance_exists(session: Session, sop_instance_uid: str) -> bool:
    """Whether an instance row is stored under ``sop_instance_uid``."""
    found = session.connection().execute(_INSTANCE_BY_UID, {"uid": sop_instance_uid}).first()
    return found is not None


def coerced_patient_id(received: str, n: int) -> str:
    """``<received>_<n>``, with ``received`` shortened so the result fits LO (64).

    >>> coerced_patient_id("PAT001", 2)
    'PAT001_2'
    >>> len(coerced_patient_id("X" * 64, 1))
    64
    """
    suffix = f"_{n}"
    return received[: LO_MAX - len(suffix)] + suffix


def _same_name(patient: Patient, record: IndexRecord) -> bool:
    return (patient.family_name.casefold(), patient.given_name.casefold()) == (
        record.family_name.casefold(),
        record.given_name.casefold(),
    )


def _new_patient(session: Session, record: IndexRecord, patient_id: str) -> Patient:
    patient = Patient(
        patient_id=patient_id,
        received_patient_id=record.patient_id,
        family_name=record.family_name,
        given_name=record.given_name,
        patient_name=record.patient_name,
        patient_name_key=name_key(record.patient_name),
        birth_date=record.birth_date,
        sex=record.sex,
        other_patient_ids=record.other_patient_ids,
        other_patient_names=record.other_patient_names,
    )
    session.add(patient)
    session.flush()
    return patient


def resolve_patient(session: Session, record: IndexRecord) -> Patient:
    """The patient row for ``record``, created (with a coerced ID if needed) when new."""
    taken = session.scalar(select(Patient.id).where(Patient.patient_id == record.patient_id))
    # Read the candidates after the taken check: under READ COMMITTED each statement
    # sees what committed before it, so a patient another association committed is
    # among the candidates whenever it made the ID taken above (read the other way
    # round, the same patient was once coerced into a second row).
    candidates = session.scalars(
        select(Patient).where(Patient.received_patient_id == record.patient_id).order_by(Patient.id)
    ).all()
    for patient in candidates:
        if _same_name(patient, record):
            return patient
    if taken is None:
        return _new_patient(session, record, record.patient_id)
    for n in range(1, MAX_PATIENT_ID_SUFFIX):
        candidate = coerced_patient_id(record.patient_id, n)
        if session.scalar(select(Patient.id).where(Patient.patient_id == candidate)) is None:
            return _new_patient(session, record, candidate)
    raise IndexValueError(f"no free coerced Patient ID for {record.patient_id!r}")


def _study(session: Session, record: IndexRecord) -> Study:
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == record.study_instance_uid)
    ).one_or_none()
    if study is not None:
        return study
    patient = resolve_patient(session, record)
    study = Study(
        patient_pk=patient.id,
        study_instance_uid=record.study_instance_uid,
        study_date=record.study_date,
        study_time=record.study_time,
        accession_number=record.accession_number,
        study_id=record.study_id,
        referring_physician_name=record.referring_physician_name,
        referring_physician_name_key=name_key(record.referring_physician_name),
        study_description=record.study_description,
    )
    study.patient = patient
    session.add(study)
    session.flush()
    return study


def _series(session: Session, record: IndexRecord, study: Study) -> Series:
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == record.series_instance_uid)
    ).one_or_none()
    if series is not None:
        return series
    series = Series(
        study_pk=study.id,
        series_instance_uid=record.series_instance_uid,
        modality=record.modality,
        series_number=record.series_number,
        operator_name=record.operator_name,
        series_description=record.series_description,
    )
    session.add(series)
    session.flush()
    return series


def _known_series(session: Session, record: IndexRecord) -> tuple[int, str] | None:
    """(series pk, the study's Patient ID) when series and study are indexed as received."""
    row = (
        session.connection()
        .execute(
            _KNOWN_SERIES,
            {
                "series_uid": record.series_instance_uid,
                "study_uid": record.study_instance_uid,
            },
        )
        .first()
    )
    return None if row is None else (row[0], row[1])


def _series_pk(session: Session, record: IndexRecord) -> tuple[int, str]:
    known = _known_series(session, record)
    if known is not None:
        return known
    # First instance of its series (or a series filed under another study): the
    # ORM path, which creates what is missing and resolves the patient.
    study = _study(session, record)
    series = _series(session, record, study)
    return series.id, study.patient.patient_id


def index_instance(
    session: Session,
    record: IndexRecord,
    stored: StoredFacts,
    *,
    stored_sop_instance_uid: str,
    replace: bool,
) -> IngestResult:
    """Insert (or, with ``replace``, overwrite) the rows of one stored instance.

    An instance whose study or series is already indexed joins it, and the study
    keeps the patient it was first stored under. Raises
    :class:`sqlalchemy.exc.IntegrityError` when another transaction inserted the
    same patient, study, series or instance first: retry in a fresh transaction.

    An instance of a known series costs one joined look-up and one insert (Core
    statements: the ORM's unit of work was a fifth of a C-STORE).
    """
    series_pk, patient_id = _series_pk(session, record)
    values = {
        "series_pk": series_pk,
        "sop_class_uid": record.sop_class_uid,
        "received_sop_instance_uid": record.sop_instance_uid,
        "instance_number": record.instance_number,
        "transfer_syntax_uid": stored.transfer_syntax_uid,
        "file_path": stored.relative_path,
        "file_size": stored.size,
        "sha256": stored.sha256,
        "source_ae": stored.source_ae[:SH_MAX],
    }
    connection = session.connection()
    existing = (
        connection.execute(_INSTANCE_BY_UID, {"uid": stored_sop_instance_uid}).first()
        if replace
        else None
    )
    replaced_path: str | None = None
    if existing is None:
        instance_pk = connection.execute(
            _INSERT_INSTANCE,
            {"sop_instance_uid": stored_sop_instance_uid, "received_at": utcnow(), **values},
        ).scalar_one()
    else:
        instance_pk, replaced_path = existing[0], existing[1]
        connection.execute(_UPDATE_INSTANCE, {"pk": instance_pk, **values})
    return IngestResult(
        instance_pk=int(instance_pk),
        patient_id=patient_id,
        patient_id_coerced=patient_id != record.patient_id,
        replaced_path=replaced_path if replaced_path != stored.relative_path else None,
    )
