"""The C-STORE handler: check, write the Part 10 file, index it, answer.

Order of work for one C-STORE-RQ, and the status each step can end in
(Annex F Table F.4.2-31; digest C1, C3, C4):

1. walk the received bytes in the negotiated transfer syntax (C000 if they are
   not complete data elements) and decode only the attributes the index and
   the A900 check need (C000 if one cannot be decoded);
2. the A900 check list (:func:`dataset_problem`);
3. write File Meta Information + the received bytes through the FileStore
   (atomic, file fsynced) under the received SOP Instance UID, then hand the
   index rows to the :class:`GroupCommitter`, which fsyncs the file's directory
   and commits the rows, possibly in one transaction with other associations'
   instances; a UID already indexed is found there and, under the ``new_uid``
   policy, the file is rewritten under a new UID and indexed again; if the
   directory or the index fails the new file is deleted (A700); a unique-key
   race with another association is retried in a fresh transaction;
4. 0000, or B000 when coercion warnings are switched on and something was coerced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, generate_uid
from pynetdicom import evt
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.engine import Database
from db.queries.ingest import (
    INDEX_KEYWORDS,
    UID_MAX,
    IndexRecord,
    IndexValueError,
    IngestResult,
    StoredFacts,
    index_instance,
    instance_exists,
    record_from_dataset,
)
from servers.core import logs
from servers.core.context import ServiceContext
from servers.core.declaration import StatusTable
from servers.storage.encoding import (
    MalformedDataSet,
    Span,
    part10_header,
    replace_value,
    walk,
)
from storage.filestore import FileStore, StoreError, StoreFull

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
COERCED = 0xB000

# Image Pixel attributes an image instance needs for display (Table F.8.1-2, C3).
IMAGE_KEYWORDS: tuple[str, ...] = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "Rows",
    "Columns",
)
UID_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
PIXEL_KEYWORDS: tuple[str, ...] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # a typo here is a programming error, not bad input
        raise KeyError(keyword)
    return tag


SOP_INSTANCE_UID = _tag("SOPInstanceUID")
PATIENT_ID = _tag("PatientID")
PIXEL_TAGS = tuple(_tag(k) for k in PIXEL_KEYWORDS)
_READ_TAGS: list[BaseTag | int] = [BaseTag(_tag(k)) for k in (*INDEX_KEYWORDS, *IMAGE_KEYWORDS)]
# A unique-key collision means another association committed the same patient,
# study, series or instance first; each retry therefore sees strictly more rows.
INDEX_ATTEMPTS = 3


@dataclass(frozen=True)
class StorageSettings:
    duplicate_policy: str
    return_coercion_warning: bool
    image_classes: frozenset[str]


class Rejected(Exception):
    """The C-STORE ends with ``code``; ``reason`` goes to the log."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Outcome:
    stored_uid: str
    relative_path: str
    patient_id: str
    coerced: list[int] = field(default_factory=list)
    group: int = 1


def decode(data: bytes, transfer_syntax: UID) -> tuple[Dataset, dict[int, Span]]:
    """Check the structure of ``data`` and read the attributes we use (C000 on failure)."""
    if not transfer_syntax.is_little_endian:
        raise Rejected(CANNOT_UNDERSTAND, f"unsupported transfer syntax {transfer_syntax}")
    implicit = transfer_syntax.is_implicit_VR
    try:
        spans = walk(data, implicit)
        ds = read_dataset(BytesIO(data), implicit, True, specific_tags=_READ_TAGS)
    except MalformedDataSet as exc:
        raise Rejected(CANNOT_UNDERSTAND, str(exc)) from exc
    except Exception as exc:  # pydicom's reader raises assorted types on bad input
        raise Rejected(CANNOT_UNDERSTAND, f"{type(exc).__name__}: {exc}") from exc
    return ds, spans


def _value(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise Rejected(CANNOT_UNDERSTAND, f"{keyword} cannot be decoded: {exc}") from exc
    return "" if value is None else str(value).strip(" \0")


def dataset_problem(
    ds: Dataset, spans: Mapping[int, Span], request: Any, image_classes: frozenset[str]
) -> str | None:
    """Why the data set does not match its SOP class (A900), or None.

    The check list of the statement's A900 row; see ``A900_CONDITION``.
    """
    for keyword in UID_KEYWORDS:
        value = _value(ds, keyword)
        if not value:
            return f"{keyword} is missing or empty"
        if len(value) > UID_MAX:
            return f"{keyword} is longer than {UID_MAX} characters"
    sop_class = _value(ds, "SOPClassUID")
    if sop_class != str(request.AffectedSOPClassUID).strip():
        return f"SOP Class UID {sop_class} differs from the command's {request.AffectedSOPClassUID}"
    sop_instance = _value(ds, "SOPInstanceUID")
    if sop_instance != str(request.AffectedSOPInstanceUID).strip():
        return "SOP Instance UID differs from the command's Affected SOP Instance UID"
    if sop_class in image_classes:
        for keyword in IMAGE_KEYWORDS:
            if not _value(ds, keyword):
                return f"image attribute {keyword} is missing or empty"
        pixels = [spans.get(tag) for tag in PIXEL_TAGS]
        if not any(span is not None and not span.empty for span in pixels):
            return "Pixel Data is missing or empty"
    return None


def _record(ds: Dataset) -> IndexRecord:
    try:
        return record_from_dataset(ds)
    except IndexValueError as exc:
        raise Rejected(CANNOT_UNDERSTAND, str(exc)) from exc


@dataclass
class IndexJob:
    """One written file waiting for its index rows; the committer fills in the outcome."""

    record: IndexRecord
    facts: StoredFacts
    stored_uid: str
    replace: bool
    check_duplicate: bool
    result: IngestResult | None = None
    # The SOP Instance UID is already indexed: store under a new UID (new_uid policy).
    duplicate: bool = False
    error: Exception | None = None
    # How many instances shared the transaction, for the log line.
    group: int = 0
    done: bool = False


def _index_job(session: Session, job: IndexJob) -> IngestResult | None:
    # The duplicate check reads in the write transaction that inserts: on SQLite
    # the writer lock is held from BEGIN IMMEDIATE, on PostgreSQL a concurrent
    # insert of the same UID fails the unique key and the retry sees it.
    if job.check_duplicate and instance_exists(session, job.stored_uid):
        return None
    return index_instance(
        session,
        job.record,
        job.facts,
        stored_sop_instance_uid=job.stored_uid,
        replace=job.replace,
    )


def _settle(job: IndexJob, result: IngestResult | None, group: int) -> None:
    job.result, job.duplicate, job.group = result, result is None, group


class GroupCommitter:
    """Index rows of instances from all associations, committed together.

    The first association thread to find no commit running becomes the leader:
    it fsyncs the directories of every waiting file once, inserts all their rows
    in one transaction (one WAL fsync or one PostgreSQL commit) and then wakes
    their threads, which answer Success only now. Instances that arrive while a
    commit runs wait and form the next batch, so a lone association commits its
    own instance at once, on its own thread, with no added delay, and many
    associations share the fsyncs. If the shared transaction fails, each
    instance is retried in its own, so one bad instance gets its own status and
    does not take the others down with it.
    """

    def __init__(self, db: Database, store: FileStore) -> None:
        self.db = db
        self.store = store
        self._cond = threading.Condition()
        self._pending: list[IndexJob] = []
        self._busy = False

    def submit(self, job: IndexJob) -> None:
        """Return once ``job`` is committed, found a duplicate, or failed."""
        with self._cond:
            self._pending.append(job)
            while not job.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                batch, self._pending = self._pending, []
                self._cond.release()
                try:
                    self._commit(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()

    def _commit(self, batch: list[IndexJob]) -> None:
        try:
            self._commit_batch(batch)
        except Exception as exc:
            for job in batch:
                if job.result is None and not job.duplicate and job.error is None:
                    job.error = exc
        finally:
            for job in batch:
                if job.result is None and not job.duplicate and job.error is None:
                    job.error = RuntimeError("index commit interrupted")
                job.done = True

    def _commit_batch(self, batch: list[IndexJob]) -> None:
        try:
            self.store.sync_directories(job.facts.relative_path for job in batch)
        except StoreError as exc:
            for job in batch:
                job.error = exc
            return
        if len(batch) > 1:
            try:
                with self.db.write() as session:
                    results = [_index_job(session, job) for job in batch]
            except Exception as exc:
                # Which instance broke the shared transaction is not known: retry each
                # alone so only that one fails, with its own status.
                logs.get_logger().warning(
                    "c_store_group_commit_failed", group=len(batch), error=repr(exc)
                )
            else:
                for job, result in zip(batch, results, strict=True):
                    _settle(job, result, len(batch))
                return
        for job in batch:
            try:
                with self.db.write() as session:
                    result = _index_job(session, job)
            except Exception as exc:
                job.error = exc
            else:
                _settle(job, result, 1)


def _write_file(
    ctx: ServiceContext,
    record: IndexRecord,
    stored_uid: str,
    body: bytes,
    transfer_syntax: UID,
    calling_ae: str,
) -> StoredFacts:
    header = part10_header(
        sop_class_uid=record.sop_class_uid,
        sop_instance_uid=stored_uid,
        transfer_syntax_uid=str(transfer_syntax),
        implementation_class_uid=ctx.ae.implementation_class_uid,
        implementation_version_name=ctx.ae.implementation_version_name,
        source_ae_title=calling_ae,
    )
    try:
        # The directory entry is made durable by the group commit, with others'.
        stored = ctx.store.write([header, body], sync_directory=False)
    except StoreFull as exc:
        raise Rejected(OUT_OF_RESOURCES, f"no space: {exc}") from exc
    except StoreError as exc:
        raise Rejected(OUT_OF_RESOURCES, f"file not written: {exc}") from exc
    return StoredFacts(
        relative_path=stored.relative_path,
        size=stored.size,
        sha256=stored.sha256,
        transfer_syntax_uid=str(transfer_syntax),
        source_ae=calling_ae,
    )


def store_instance(
    ctx: ServiceContext,
    settings: StorageSettings,
    committer: GroupCommitter,
    *,
    data: bytes,
    spans: Mapping[int, Span],
    record: IndexRecord,
    transfer_syntax: UID,
    calling_ae: str,
    log: Any,
) -> Outcome:
    """Write the file and its index rows durably, or leave nothing behind (A700).

    The file is written under the received UID first; the rare duplicate is
    found in the index transaction and rewritten under a new UID.
    """
    replace = settings.duplicate_policy == "replace"
    stored_uid = record.sop_instance_uid
    coerced: list[int] = []
    facts = _write_file(ctx, record, stored_uid, data, transfer_syntax, calling_ae)
    races = 0
    while True:
        job = IndexJob(
            record, facts, stored_uid, replace=replace, check_duplicate=not (replace or coerced)
        )
        committer.submit(job)
        if job.duplicate:
            ctx.store.delete(facts.relative_path)
            stored_uid = generate_uid(prefix=None)
            body = replace_value(
                data,
                dict(spans),
                SOP_INSTANCE_UID,
                stored_uid.encode("ascii"),
                transfer_syntax.is_implicit_VR,
            )
            coerced.append(SOP_INSTANCE_UID)
            facts = _write_file(ctx, record, stored_uid, body, transfer_syntax, calling_ae)
            continue
        if isinstance(job.error, IntegrityError):
            # Another association committed the same patient, study, series or
            # instance first; the file stays, the next attempt sees its rows.
            races += 1
            log.info("c_store_index_race", attempt=races, sop_instance=record.sop_instance_uid)
            if races < INDEX_ATTEMPTS:
                continue
            ctx.store.delete(facts.relative_path)
            raise Rejected(
                OUT_OF_RESOURCES,
                f"index not written after {INDEX_ATTEMPTS} attempts: {job.error.orig}",
            )
        if job.error is not None or job.result is None:
            ctx.store.delete(facts.relative_path)
            raise Rejected(OUT_OF_RESOURCES, f"index not written: {job.error}")
        result = job.result
        if result.replaced_path:
            try:
                ctx.store.delete(result.replaced_path)
            except (OSError, StoreError) as exc:
                log.warning("replaced_file_not_deleted", path=result.replaced_path, error=str(exc))
        if result.patient_id_coerced:
            coerced.append(PATIENT_ID)
        return Outcome(stored_uid, facts.relative_path, result.patient_id, coerced, job.group)


COERCION_COMMENTS = {
    SOP_INSTANCE_UID: "duplicate SOP Instance UID stored under a new UID",
    PATIENT_ID: "Patient ID coerced in the index",
}


def make_handler(
    ctx: ServiceContext, settings: StorageSettings, statuses: StatusTable
) -> Callable[[Any], int | Dataset]:
    committer = GroupCommitter(ctx.db, ctx.store)

    def handle_store(event: Any) -> int | Dataset:
        started = time.monotonic()
        log = logs.assoc_logger(event.assoc)
        request = event.request
        transfer_syntax = UID(event.context.transfer_syntax)
        calling_ae = (event.assoc.requestor.ae_title or "").strip()
        fields: dict[str, Any] = {
            "sop_class": str(request.AffectedSOPClassUID),
            "sop_instance": str(request.AffectedSOPInstanceUID),
            "transfer_syntax": str(transfer_syntax),
        }
        try:
            data = request.DataSet.getvalue() if request.DataSet is not None else b""
            fields["bytes"] = len(data)
            ds, spans = decode(data, transfer_syntax)
            problem = dataset_problem(ds, spans, request, settings.image_classes)
            if problem:
                raise Rejected(DOES_NOT_MATCH, problem)
            record = _record(ds)
            outcome = store_instance(
                ctx,
                settings,
                committer,
                data=data,
                spans=spans,
                record=record,
                transfer_syntax=transfer_syntax,
                calling_ae=calling_ae,
                log=log,
            )
        except Rejected as rejected:
            row = statuses[rejected.code]
            log.error(
                "c_store_handled",
                status=f"0x{row.code:04X}",
                reason=rejected.reason,
                elapsed_ms=round((time.monotonic() - started) * 1000, 1),
                **fields,
            )
            return row.code
        except Exception as exc:
            # Anything unforeseen happened before the instance was kept: out of resources.
            row = statuses[OUT_OF_RESOURCES]
            log.exception("c_store_handled", status=f"0x{row.code:04X}", reason=repr(exc), **fields)
            return row.code
        code = SUCCESS
        if outcome.coerced and settings.return_coercion_warning:
            code = COERCED
        row = statuses[code]
        log.info(
            "c_store_handled",
            status=f"0x{row.code:04X}",
            stored_uid=outcome.stored_uid,
            patient_id=outcome.patient_id,
            path=outcome.relative_path,
            group=outcome.group,
            coerced=[f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in outcome.coerced],
            elapsed_ms=round((time.monotonic() - started) * 1000, 1),
            **fields,
        )
        if code == COERCED:
            status = Dataset()
            status.Status = row.code
            status.OffendingElement = list(outcome.coerced)
            status.ErrorComment = "; ".join(COERCION_COMMENTS[t] for t in outcome.coerced)[:64]
            return status
        return row.code

    return handle_store


def handlers(
    ctx: ServiceContext, settings: StorageSettings, statuses: StatusTable
) -> Mapping[Any, Callable[..., Any]]:
    return {evt.EVT_C_STORE: make_handler(ctx, settings, statuses)}
