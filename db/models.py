"""The archive index: patient, study, series, instance, and commitment transactions.

Every attribute of the statement's C-FIND tables (Annex F Tables F.4.2-16..18)
is a column here, because responses come from the database, not from files.
String values are kept as received (trimmed); ``*_key`` columns hold the
case-folded form that case-insensitive PN matching compares against.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

intpk = Annotated[int, mapped_column(Integer, primary_key=True, autoincrement=True)]
Uid = Annotated[str, mapped_column(String(64))]
# VR lengths: LO/PN components 64, SH 16, CS 16, DA 8, TM 16, IS 12. PN may hold
# several component groups and we keep up to 320 characters to be safe.
PersonName = Annotated[str, mapped_column(String(320), default="")]
LongString = Annotated[str, mapped_column(String(64), default="")]
ShortString = Annotated[str, mapped_column(String(16), default="")]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Patient(Base):
    __tablename__ = "patient"

    id: Mapped[intpk]
    # The Patient ID the archive answers with; coerced when a different patient
    # already holds the received one (Table F.8.1-2, digest C7).
    patient_id: Mapped[LongString] = mapped_column(unique=True)
    received_patient_id: Mapped[LongString]
    family_name: Mapped[LongString]
    given_name: Mapped[LongString]
    # ``family^given`` as returned in C-FIND responses, and its case-folded key.
    patient_name: Mapped[PersonName]
    patient_name_key: Mapped[PersonName] = mapped_column(index=True)
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    # M, F, O or U ('U' when the received value was anything else).
    sex: Mapped[str] = mapped_column(String(1), default="U")
    other_patient_ids: Mapped[str] = mapped_column(Text, default="")
    other_patient_names: Mapped[str] = mapped_column(Text, default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[intpk]
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_instance_uid: Mapped[Uid] = mapped_column(unique=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    # Normalised to HHMMSS.ffffff so that string order is time order.
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[ShortString] = mapped_column(index=True)
    study_id: Mapped[ShortString]
    referring_physician_name: Mapped[PersonName]
    referring_physician_name_key: Mapped[PersonName]
    study_description: Mapped[LongString]

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[intpk]
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_instance_uid: Mapped[Uid] = mapped_column(unique=True)
    modality: Mapped[ShortString]
    series_number: Mapped[str] = mapped_column(String(12), default="")
    operator_name: Mapped[PersonName]
    series_description: Mapped[LongString]

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[intpk]
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[Uid] = mapped_column(unique=True)
    sop_class_uid: Mapped[Uid]
    # The UID the sender used; differs from sop_instance_uid after a duplicate
    # was stored under a new UID (Annex F duplicate policy "new UID").
    received_sop_instance_uid: Mapped[Uid] = mapped_column(index=True)
    instance_number: Mapped[str] = mapped_column(String(12), default="")
    transfer_syntax_uid: Mapped[Uid]
    # Relative to the file store root; never derived from a UID (see storage/).
    file_path: Mapped[str] = mapped_column(String(255), unique=True)
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    source_ae: Mapped[ShortString]
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class CommitmentState(enum.Enum):
    PENDING = "pending"  # checked, report not yet delivered
    DELIVERED = "delivered"  # peer answered the N-EVENT-REPORT with 0000/0107
    FAILED = "failed"  # attempts exhausted or peer unknown


class CommitmentRequest(Base):
    """A Storage Commitment transaction, kept so reports survive a restart."""

    __tablename__ = "commitment_request"

    id: Mapped[intpk]
    transaction_uid: Mapped[Uid] = mapped_column(unique=True)
    calling_ae: Mapped[ShortString]
    called_ae: Mapped[ShortString]
    state: Mapped[CommitmentState] = mapped_column(
        Enum(CommitmentState, native_enum=False, length=16), default=CommitmentState.PENDING
    )
    event_type_id: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    items: Mapped[list[CommitmentItem]] = relationship(
        back_populates="request", order_by="CommitmentItem.id"
    )


class CommitmentItem(Base):
    __tablename__ = "commitment_item"
    __table_args__ = (UniqueConstraint("request_pk", "sop_instance_uid"),)

    id: Mapped[intpk]
    request_pk: Mapped[int] = mapped_column(ForeignKey("commitment_request.id"), index=True)
    sop_class_uid: Mapped[Uid]
    sop_instance_uid: Mapped[Uid]
    # None when committed; a PS3.3 C.14.1.1 Failure Reason otherwise.
    failure_reason: Mapped[int | None] = mapped_column(Integer)

    request: Mapped[CommitmentRequest] = relationship(back_populates="items")


# --- RIS: Modality Worklist and MPPS (PS3.2 Annex C "DICOMRis") ----------------------


class ScheduledStep(Base):
    """One worklist entry: a scheduled procedure step with its requested procedure,
    imaging service request, visit and patient (one MWL response per row).

    ``dataset`` is the whole entry as the DICOM JSON model (PS3.18 F.2), as returned
    in responses; the matching keys are also columns so that the database can filter.
    Accession Number and Requested Procedure ID are the same value (§C.4.2.1.4.1.1).
    """

    __tablename__ = "scheduled_step"

    id: Mapped[intpk]
    sps_id: Mapped[ShortString] = mapped_column(unique=True)
    accession_number: Mapped[ShortString] = mapped_column(index=True)
    patient_id: Mapped[LongString] = mapped_column(index=True)
    patient_name: Mapped[PersonName]
    # Case-folded alphabetic component group: Patient's Name matches case-insensitively.
    patient_name_key: Mapped[PersonName]
    modality: Mapped[ShortString]
    station_ae: Mapped[ShortString]
    start_date: Mapped[str] = mapped_column(String(8), index=True)
    # Normalised to HHMMSS[.ffffff] so that string order is time order.
    start_time: Mapped[str] = mapped_column(String(16))
    performing_physician: Mapped[PersonName]
    study_instance_uid: Mapped[Uid]
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The parent requested procedure's state (SCHEDULED, PROCEDURE STARTED, ...).
    procedure_state: Mapped[str] = mapped_column(String(32), default="SCHEDULED")
    # Logically removed from the worklist: state, cancel, expiry or a user's removal.
    removed: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    removed_reason: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(16), default="")
    placer_order_number: Mapped[LongString]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PpsState(enum.Enum):
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class PerformedStep(Base):
    """One MPPS instance: its state, its merged attributes and how it matched orders."""

    __tablename__ = "performed_step"

    id: Mapped[intpk]
    sop_instance_uid: Mapped[Uid] = mapped_column(unique=True)
    state: Mapped[PpsState] = mapped_column(Enum(PpsState, native_enum=False, length=16))
    patient_id: Mapped[LongString]
    # Backslash-separated Accession Numbers of the Scheduled Step Attribute Sequence.
    accession_numbers: Mapped[str] = mapped_column(Text, default="")
    performed_station_ae: Mapped[ShortString]
    calling_ae: Mapped[ShortString]
    matched: Mapped[bool] = mapped_column(Boolean, default=False)
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    final_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PerformedStepMessage(Base):
    """Every accepted N-CREATE and N-SET, as received (DICOM JSON model)."""

    __tablename__ = "performed_step_message"

    id: Mapped[intpk]
    step_pk: Mapped[int] = mapped_column(ForeignKey("performed_step.id"), index=True)
    operation: Mapped[str] = mapped_column(String(8))
    calling_ae: Mapped[ShortString]
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MppsException(Base):
    """A performed step that did not match the orders, or matched with other demographics."""

    __tablename__ = "mpps_exception"

    id: Mapped[intpk]
    step_pk: Mapped[int] = mapped_column(ForeignKey("performed_step.id"), index=True)
    sop_instance_uid: Mapped[Uid]
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# --- Print server (PS3.2 Annex E): print jobs, their films, and the printer's state -------


class PrintJobState(enum.StrEnum):
    """Execution Status of a Print Job (PS3.3 C.13.8)."""

    PENDING = "PENDING"
    PRINTING = "PRINTING"
    DONE = "DONE"
    FAILURE = "FAILURE"


class PrintJob(Base):
    """A print job queued by a Film Session or Film Box N-ACTION; survives its association."""

    __tablename__ = "print_job"

    id: Mapped[intpk]
    job_uid: Mapped[Uid] = mapped_column(unique=True)
    # Print Job ID (2100,0010), a short decimal number the sample sends in events.
    job_number: Mapped[ShortString]
    state: Mapped[PrintJobState] = mapped_column(
        Enum(PrintJobState, native_enum=False, length=16), default=PrintJobState.PENDING
    )
    status_info: Mapped[ShortString]
    priority: Mapped[ShortString]
    originator: Mapped[ShortString]
    called_ae: Mapped[ShortString]
    film_session_uid: Mapped[Uid]
    film_session_label: Mapped[LongString]
    source: Mapped[ShortString]  # "FILM SESSION" or "FILM BOX"
    copies: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    pdf_path: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    films: Mapped[list[PrintFilm]] = relationship(
        back_populates="job", order_by="PrintFilm.sheet", cascade="all, delete-orphan"
    )


class PrintFilm(Base):
    """One printed film sheet (one copy of one film box) and its rendered files."""

    __tablename__ = "print_film"
    __table_args__ = (UniqueConstraint("job_pk", "sheet"),)

    id: Mapped[intpk]
    job_pk: Mapped[int] = mapped_column(ForeignKey("print_job.id"), index=True)
    sheet: Mapped[int] = mapped_column(Integer)
    film_box_uid: Mapped[Uid]
    copy: Mapped[int] = mapped_column(Integer, default=1)
    film_size: Mapped[ShortString]
    orientation: Mapped[ShortString]
    display_format: Mapped[LongString]
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    png_path: Mapped[str] = mapped_column(String(255))
    density_path: Mapped[str] = mapped_column(String(255))
    sidecar_path: Mapped[str] = mapped_column(String(255))

    job: Mapped[PrintJob] = relationship(back_populates="films")


class PrinterState(Base):
    """The virtual printer's status; one row, set by `dicomlab print status`."""

    __tablename__ = "printer_state"

    id: Mapped[intpk]
    status: Mapped[ShortString]
    status_info: Mapped[ShortString]
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
