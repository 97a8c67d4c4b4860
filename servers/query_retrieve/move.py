"""C-MOVE SCP (QUERY-RETRIEVE-SCP) driving STORAGE-SCU's C-STORE sub-operations.

pynetdicom's own C-MOVE SCP cannot behave as Annex F says (digest E14: no
initial pending response, continues after failures, B000, A801 for an
unreachable destination, wrong Move Originator AE Title), so
:class:`MoveServiceClass` answers C-MOVE-RQ itself, in this order (digest §5.4,
E1-E5):

1. identifier check (level, unique keys, UID lists)        -> A900
2. Move Destination in the remote AE table                  -> A801
3. matching instances from the index                        -> A701, or A702 above 65535
4. initial FF00 with Remaining = N
5. one association from STORAGE-SCU; one C-STORE per instance, FF00 after each
   success or warning while some remain; final 0000 after the last
6. first failed sub-operation or no association             -> final A702
7. C-CANCEL seen between sub-operations                      -> final FE00
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass
from sqlalchemy.exc import SQLAlchemyError

from db.queries.move import (
    IMAGE,
    PATIENT,
    SERIES,
    STUDY,
    MoveInstance,
    MoveKeys,
    instances_for_move,
)
from servers.core import logs
from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import (
    CANCEL,
    FAILURE,
    PENDING,
    REFUSED,
    SUCCESS,
    ContextRow,
    ServiceDeclaration,
    StatementSection,
    StatusRow,
    StatusTable,
)
from servers.core.network import DicomlabAE
from servers.core.runtime import check_status
from servers.query_retrieve.export import Export, SubOperation, table_rows

PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_STUDY_ONLY_MOVE = "1.2.840.10008.5.1.4.1.2.3.2"

MOVE_SOP_CLASSES: tuple[str, ...] = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE, PATIENT_STUDY_ONLY_MOVE)

# The levels of each information model, top down, with each level's unique key.
MODEL_LEVELS: dict[str, tuple[tuple[str, str], ...]] = {
    PATIENT_ROOT_MOVE: (
        (PATIENT, "PatientID"),
        (STUDY, "StudyInstanceUID"),
        (SERIES, "SeriesInstanceUID"),
        (IMAGE, "SOPInstanceUID"),
    ),
    STUDY_ROOT_MOVE: (
        (STUDY, "StudyInstanceUID"),
        (SERIES, "SeriesInstanceUID"),
        (IMAGE, "SOPInstanceUID"),
    ),
    PATIENT_STUDY_ONLY_MOVE: ((PATIENT, "PatientID"), (STUDY, "StudyInstanceUID")),
}
LOWER_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# Number of ... Sub-operations are US (PS3.7): a larger move cannot be counted.
MAX_SUBOPERATIONS = 65535

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

C_MOVE_STATUSES = StatusTable(
    "C-MOVE",
    [
        StatusRow(
            0x0000,
            SUCCESS,
            "Sub-operations Complete - No Failures",
            "Final response when every matching instance was sent and the destination "
            "answered each C-STORE with Success or a warning status (warnings are "
            "counted in Number of Warning Sub-operations); also when nothing matched "
            "(all counts zero).",
        ),
        StatusRow(
            0xA701,
            REFUSED,
            "Out of Resources - Unable to calculate number of matches",
            "The index database failed while the matching instances were being looked "
            "up; no sub-operation is started. No counts and no identifier are sent.",
        ),
        StatusRow(
            0xA702,
            REFUSED,
            "Out of Resources - Unable to perform sub-operations",
            "Final response when a sub-operation failed: a stored file could not be read "
            "or converted, the destination accepted no usable presentation context, the "
            "association to the destination could not be opened (refused, rejected or "
            "unreachable), or the destination answered a C-STORE with a failure status, "
            "did not answer within the DIMSE timeout, or aborted. The export stops at "
            "that instance; Completed and Warning count the instances sent before it, "
            "Failed counts it plus every instance not attempted, and Failed SOP Instance "
            "UID List names them. Also sent, with no counts and before any sub-operation, "
            "when more than 65535 instances match.",
        ),
        StatusRow(
            0xA801,
            REFUSED,
            "Move Destination unknown",
            "The Move Destination AE title is not in the configured remote AE table.",
        ),
        StatusRow(
            0xA900,
            FAILURE,
            "Identifier does not match SOP Class",
            "The identifier cannot be decoded; or Query/Retrieve Level is missing or not "
            "a level of the information model; or the unique key of the retrieve level "
            "is missing, empty or not a valid value; or a unique key of a higher level is "
            "missing, empty or holds more than one value; or a unique key of a lower "
            "level holds a value; or Patient ID at PATIENT level holds more than one "
            "value.",
        ),
        StatusRow(
            0xFE00,
            CANCEL,
            "Sub-operations terminated due to Cancel Indication",
            "Final response when a C-CANCEL-RQ for the C-MOVE arrived; it is acted on "
            "before the next sub-operation. Remaining counts the instances not sent.",
        ),
        StatusRow(
            0xFF00,
            PENDING,
            "Sub-operations are continuing",
            "Sent once after the request is accepted (Remaining = number of matches), "
            "then after each sub-operation that succeeded or warned while instances "
            "remain to be sent.",
        ),
    ],
)


class IdentifierError(ValueError):
    """The C-MOVE identifier is not valid for the model and level (A900)."""


def _values(ds: Dataset, keyword: str) -> list[str] | None:
    """The values of ``keyword``: ``None`` when absent, ``[]`` when empty."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(item).strip(" \0") for item in items]


def _uids(keyword: str, values: list[str] | None) -> tuple[str, ...]:
    if not values or any(not v for v in values):
        raise IdentifierError(f"{keyword} is missing or empty")
    for value in values:
        if len(value) > 64 or not UID_PATTERN.match(value):
            raise IdentifierError(f"{keyword} value {value!r} is not a UID")
    return tuple(dict.fromkeys(values))


def move_keys(model: str, identifier: Dataset) -> MoveKeys:
    """Validate ``identifier`` for ``model`` (digest §5.1, D11) into the keys to match."""
    levels = MODEL_LEVELS[model]
    level_values = _values(identifier, "QueryRetrieveLevel")
    if not level_values or len(level_values) != 1:
        raise IdentifierError("Query/Retrieve Level is missing or multi-valued")
    level = level_values[0].upper()
    names = [name for name, _ in levels]
    if level not in names:
        raise IdentifierError(f"level {level!r} is not a level of this information model")
    depth = names.index(level)
    found: dict[str, tuple[str, ...]] = {}
    for index, (_, keyword) in enumerate(levels[: depth + 1]):
        values = _values(identifier, keyword)
        own_level = index == depth
        if keyword == "PatientID":
            if not values or len(values) != 1 or not values[0]:
                raise IdentifierError("Patient ID must hold exactly one value")
            found[keyword] = (values[0],)
            continue
        uids = _uids(keyword, values)
        if not own_level and len(uids) != 1:
            raise IdentifierError(f"{keyword} above the retrieve level must be single-valued")
        found[keyword] = uids
    lower = {keyword for _, keyword in levels[depth + 1 :]} & set(LOWER_KEYS)
    for keyword in lower:
        if _values(identifier, keyword):
            raise IdentifierError(f"{keyword} is below the retrieve level {level}")
    return MoveKeys(
        level=level,
        patient_id=found["PatientID"][0] if "PatientID" in found else None,
        study_uids=found.get("StudyInstanceUID"),
        series_uids=found.get("SeriesInstanceUID"),
        sop_instance_uids=found.get("SOPInstanceUID"),
    )


def _service_name(service_class: MoveServiceClass) -> str:
    """The service whose declaration put this class on the AE (``query_retrieve``)."""
    contexts = cast(DicomlabAE, service_class.assoc.ae).service_contexts
    for name, ctx in contexts.items():
        declaration = ctx.suite.declarations.get(name)
        if declaration is not None and type(service_class) in declaration.service_classes.values():
            return name
    return "query_retrieve"


class MoveServiceClass(QueryRetrieveServiceClass):
    """C-MOVE SCP as the statement describes it; replaces pynetdicom's (digest E14)."""

    def SCP(self, req: Any, context: PresentationContext) -> None:
        if not isinstance(req, C_MOVE):
            super().SCP(req, context)
            return
        name = _service_name(self)
        ctx: ServiceContext = cast(DicomlabAE, self.assoc.ae).service_contexts[name]
        try:
            _MoveOperation(self, ctx, ctx.suite.declarations[name], req, context).run()
        finally:
            # pynetdicom restarts its idle timer only on a received PDU; without this a
            # move longer than the idle timeout would be aborted as soon as it ends
            # (digest B7). The "wait for the next request" starts now.
            self.assoc.dul._idle_timer.restart()


class _MoveOperation:
    """One C-MOVE-RQ from receipt to its final response."""

    def __init__(
        self,
        service: MoveServiceClass,
        ctx: ServiceContext,
        declaration: ServiceDeclaration,
        req: C_MOVE,
        context: PresentationContext,
    ) -> None:
        self.service = service
        self.assoc = service.assoc
        self.ctx = ctx
        self.declaration = declaration
        self.req = req
        self.context = context
        self.context_id = cast(int, context.context_id)
        self.syntax = context.transfer_syntax[0]
        self.message_id = cast(int, req.MessageID)
        self.destination_title = str(req.MoveDestination or "").strip()
        self.log = logs.assoc_logger(self.assoc).bind(
            operation="C-MOVE",
            message_id=self.message_id,
            sop_class=context.abstract_syntax,
            move_destination=self.destination_title,
        )
        self.completed = 0
        self.failed = 0
        self.warnings = 0
        self.failed_uids: list[str] = []
        self.requestor_lost = False

    # -- responses -----------------------------------------------------------

    def _requestor_gone(self) -> bool:
        if self.requestor_lost:
            return True
        acse = self.assoc.acse
        if acse.is_aborted() or not self.assoc.dul.is_alive():
            self.requestor_lost = True
            # Table F.4.2-21: the export carries on without the C-MOVE association.
            self.log.error("move_requestor_lost")
        return self.requestor_lost

    def respond(
        self,
        code: int,
        remaining: int | None = None,
        counts: bool = True,
        failed_uids: list[str] | None = None,
    ) -> None:
        row = C_MOVE_STATUSES[code]
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo = self.message_id
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = row.code
        if remaining is not None:
            rsp.NumberOfRemainingSuboperations = remaining
        if counts:
            rsp.NumberOfCompletedSuboperations = self.completed
            rsp.NumberOfFailedSuboperations = self.failed
            rsp.NumberOfWarningSuboperations = self.warnings
        if failed_uids:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = failed_uids
            encoded = encode(ds, self.syntax.is_implicit_VR, self.syntax.is_little_endian)
            rsp.Identifier = BytesIO(cast(bytes, encoded))
        check_status(self.declaration, "C-MOVE", row.code, self.log)
        if self._requestor_gone():
            self.log.warning("move_response_dropped", status=f"0x{row.code:04X}")
            return
        self.service.dimse.send_msg(rsp, self.context_id)

    def finish(self, code: int, **fields: Any) -> None:
        """Log the one canonical line for this C-MOVE."""
        level = "info" if code in (0x0000, 0xFE00) else "error"
        getattr(self.log, level)(
            "c_move_handled",
            status=f"0x{code:04X}",
            completed=self.completed,
            failed=self.failed,
            warning=self.warnings,
            **fields,
        )

    # -- the operation ---------------------------------------------------------

    def run(self) -> None:
        try:
            identifier = decode(
                cast(BytesIO, self.req.Identifier),
                self.syntax.is_implicit_VR,
                self.syntax.is_little_endian,
                self.syntax.is_deflated,
            )
            keys = move_keys(str(self.context.abstract_syntax), identifier)
        except Exception as exc:
            self.respond(0xA900, counts=False)
            self.finish(0xA900, reason=str(exc))
            return
        self.log = self.log.bind(level=keys.level)

        destination = self.ctx.config.remote(self.destination_title)
        if destination is None:
            self.respond(0xA801, counts=False)
            self.finish(0xA801, reason="move destination not in the remote AE table")
            return

        try:
            with self.ctx.db.read() as session:
                instances = instances_for_move(session, keys)
        except SQLAlchemyError as exc:
            self.respond(0xA701, counts=False)
            self.finish(0xA701, reason=f"database failure: {type(exc).__name__}: {exc}")
            return

        total = len(instances)
        if total > MAX_SUBOPERATIONS:
            self.respond(0xA702, counts=False)
            self.finish(0xA702, matches=total, reason="more matches than 65535 sub-operations")
            return

        self.respond(0xFF00, remaining=total)
        if total == 0:
            self.respond(0x0000)
            self.finish(0x0000, matches=0)
            return
        self.export(instances, destination)

    def export(self, instances: list[MoveInstance], destination: Any) -> None:
        settings = self.ctx.settings
        export = Export(
            self.ctx.suite.requestor(str(settings.get("initiator_ae", "storage_scu"))),
            destination,
            self.ctx.store,
            self.log,
            mode=str(settings.get("contexts_per_sop_class", "single")),
            retries=int(settings.get("association_retries", 0)),
            retry_delay=float(settings.get("association_retry_delay", 0)),
        )
        originator = (self.assoc.requestor.ae_title or "").strip()
        total = len(instances)
        try:
            reason = export.open(instance.sop_class_uid for instance in instances)
            if reason is not None:
                self.fail_from(instances, 0, reason)
                return
            for index, instance in enumerate(instances):
                if not self.requestor_lost and self.service.is_cancelled(self.message_id):
                    export.close()
                    remaining = total - index
                    self.respond(0xFE00, remaining=remaining, failed_uids=self.failed_uids)
                    self.finish(0xFE00, matches=total, remaining=remaining)
                    return
                result = export.send(instance, originator, self.message_id)
                self._log_sub(instance, result)
                if result.outcome == "failure":
                    # Table F.4.2-7/-8: released after a failure status, aborted after
                    # a timeout (pynetdicom has aborted already in that case).
                    export.close()
                    self.fail_from(instances, index, result.reason)
                    return
                if result.outcome == "warning":
                    self.warnings += 1
                else:
                    self.completed += 1
                if index + 1 < total:
                    self.respond(0xFF00, remaining=total - index - 1)
            export.close()
            self.respond(0x0000)
            self.finish(0x0000, matches=total)
        finally:
            export.close()

    def fail_from(self, instances: list[MoveInstance], index: int, reason: str) -> None:
        """Final A702: instance ``index`` failed and those after it were not attempted."""
        not_sent = [instance.sop_instance_uid for instance in instances[index:]]
        self.failed += len(not_sent)
        self.failed_uids.extend(not_sent)
        self.respond(0xA702, failed_uids=self.failed_uids)
        self.finish(0xA702, matches=len(instances), reason=reason)

    def _log_sub(self, instance: MoveInstance, result: SubOperation) -> None:
        fields = {
            "sop_instance": instance.sop_instance_uid,
            "outcome": result.outcome,
            "store_status": None if result.status is None else f"0x{result.status:04X}",
        }
        if result.outcome == "failure":
            self.log.error("move_suboperation", reason=result.reason, **fields)
        elif result.outcome == "warning":
            self.log.warning("move_suboperation", **fields)
        else:
            self.log.info("move_suboperation", **fields)


# -- declaration parts used by servers/query_retrieve/__init__.py ---------------


def move_settings(config: Config) -> dict[str, object]:
    """Effective C-MOVE / STORAGE-SCU settings from ``[services.query_retrieve]``."""
    raw = config.service_settings("query_retrieve")
    mode = str(raw.get("contexts_per_sop_class", "single"))
    if mode not in ("single", "multi"):
        from servers.core.declaration import StartupError

        raise StartupError(
            "[services.query_retrieve] contexts_per_sop_class must be 'single' or 'multi', "
            f"got {mode!r}"
        )
    initiator = str(raw.get("initiator_ae", "storage_scu"))
    if initiator not in config.aes:
        from servers.core.declaration import StartupError

        raise StartupError(
            f"[services.query_retrieve] initiator_ae = {initiator!r} names no [ae.*] table; "
            f"configured: {', '.join(sorted(config.aes))}"
        )
    return {
        # The local AE that sends the sub-operations: STORAGE-SCU (Annex F §F.4.2.1.3).
        # Give [ae.storage_scu] the Q/R AE's title to have them share one (§F.4.1.1).
        "initiator_ae": initiator,
        "contexts_per_sop_class": mode,
        "association_retries": int(raw.get("association_retries", 0)),
        "association_retry_delay": float(raw.get("association_retry_delay", 0)),
    }


def proposed_contexts(config: Config) -> tuple[ContextRow, ...]:
    """STORAGE-SCU's proposed contexts (Table F.4.2-6 plus NM Retired), for the statement."""
    return table_rows(str(move_settings(config)["contexts_per_sop_class"]))


TABLE_F_4_2_7 = """\
| Service status | Code | What STORAGE-SCU does | C-MOVE response that follows |
|---|---|---|---|
| Success | 0000 | Counts a completed sub-operation | FF00 (more to send) or final 0000 |
| Warning | B000-BFFF, 0001, 0107, 0116 | Counts a warning sub-operation (sent successfully) | FF00 (more to send) or final 0000 |
| Refused | A700-A7FF | Permanent failure: stops the export and releases the association | final A702 |
| Error | A900-A9FF | Permanent failure, as for A7xx | final A702 |
| Error | C000-CFFF | Permanent failure, as for A7xx | final A702 |
| Other | any other code | Permanent failure, as for A7xx | final A702 |
"""


def move_statement(config: Config) -> tuple[StatementSection, ...]:
    settings = move_settings(config)
    storage_scu = config.aes.get(str(settings["initiator_ae"]))
    scu_title = storage_scu.title if storage_scu else "EX_STORE_SCU"
    retries = settings["association_retries"]
    single = settings["contexts_per_sop_class"] == "single"
    return (
        StatementSection(
            "Retrieve (C-MOVE): levels and identifiers",
            "Patient Root MOVE retrieves at PATIENT, STUDY, SERIES and IMAGE level; Study "
            "Root MOVE at STUDY, SERIES and IMAGE; Patient/Study Only MOVE at PATIENT and "
            "STUDY. The identifier must hold the unique key of the retrieve level and a "
            "single value of the unique key of every level above it (Patient ID, Study "
            "Instance UID, Series Instance UID). A list of UIDs is accepted only in the "
            "unique key of the retrieve level itself: a SERIES level request with a list "
            "of Study Instance UIDs is refused with A900. Other attributes in the "
            "identifier are ignored. Matching is exact; no wildcards.",
        ),
        StatementSection(
            "Retrieve (C-MOVE): destination",
            "The Move Destination AE title is looked up in the configured remote AE table "
            "(host and port); a title not in the table is answered with A801. A known "
            "destination that cannot be associated with (unreachable, refused, rejected) "
            f"is answered with A702 after {retries} re-attempt(s), never A801.",
        ),
        StatementSection(
            "Retrieve (C-MOVE): sub-operations and responses",
            "After the identifier, destination and database lookup are checked, an "
            "initial Pending (FF00) response gives the number of matches in Number of "
            "Remaining Sub-operations. STORAGE-SCU (calling AE title "
            f"{scu_title}) then opens one new association to the destination and sends the "
            "instances one C-STORE at a time, each carrying Move Originator Application "
            "Entity Title = the calling AE title of the C-MOVE association and Move "
            "Originator Message ID = the C-MOVE's Message ID, priority MEDIUM. A Pending "
            "response follows each successful or warning sub-operation while instances "
            "remain; the last one is answered directly by the final response. Pending and "
            "Cancel responses carry Number of Remaining Sub-operations; final Success and "
            "Refused responses do not. Number of Completed, Failed and Warning "
            "Sub-operations are in every Pending and final response of a move that "
            "reached the initial Pending response. When nothing matches, the initial "
            "Pending response (Remaining 0) is followed by Success with all counts 0, and "
            "no association is opened. A C-CANCEL-RQ is acted on before the next "
            "sub-operation: the association to the destination is released and the final "
            "Cancel (FE00) response gives the instances not sent in Remaining (no "
            "identifier, as no sub-operation has failed at that point). At most 65535 "
            "instances can be moved by one request (the counts are US); a larger match "
            "is refused with A702 before any sub-operation.",
        ),
        StatementSection(
            "Retrieve (C-MOVE): deviations from PS3.4",
            "As the sample statement says, B000 (Sub-operations complete - One or more "
            "Failures) is never returned. The export stops at the first failed "
            "sub-operation and the final status is A702 even when some instances were "
            "sent before it: Number of Completed and Warning Sub-operations report them, "
            "Number of Failed Sub-operations counts the failed instance plus all not "
            "attempted, and Failed SOP Instance UID List (0008,0058) names those. PS3.4 "
            "C.4.2.3.1 would answer B000 here. Likewise, C-STORE warnings count as "
            "successful export and the final status is then Success (0000) with Number "
            "of Warning Sub-operations > 0, where PS3.4 would answer B000.",
        ),
        StatementSection(
            "STORAGE-SCU: presentation contexts and what is sent",
            "Only the rows of Table F.4.2-6 for the SOP classes of the instances being "
            "moved are proposed, plus Verification; NM Image Storage (Retired) is "
            "proposed with Implicit VR Little Endian when such instances are moved, and "
            "a SOP class outside the table with Implicit and Explicit VR Little Endian. "
            + (
                "Each proposed presentation context carries a single transfer syntax."
                if single
                else "Each SOP class is proposed in one presentation context listing "
                "all its transfer syntaxes."
            )
            + " For each instance the context with the stored transfer syntax is used and "
            "the stored data set is sent byte for byte as received. If only the other "
            "uncompressed syntax was accepted the data set is re-encoded between Explicit "
            "and Implicit VR Little Endian without other change. JPEG Baseline data is "
            "never decompressed: without an accepted JPEG Baseline context for it the "
            "sub-operation fails. The index's values replace the file's only where Table "
            "F.8.1-2 requires it: a Patient's Sex held as 'U' is sent empty, and a "
            "Patient ID coerced on receipt is sent as coerced; such instances are "
            "re-encoded and so are not bit-preserved. No other attribute is changed, "
            "and the SOP Instance UID is never changed.",
        ),
        StatementSection(
            "STORAGE-SCU: C-STORE response status handling (Table F.4.2-7)",
            TABLE_F_4_2_7,
        ),
        StatementSection(
            "Retrieve: exceptions",
            "STORAGE-SCU does not retry a failed instance or a failed export. A C-STORE "
            "response not received within STORAGE-SCU's DIMSE timeout aborts the "
            "association to the destination; an abort or connection loss from the "
            "destination ends the export; both give final A702. Each such event is "
            "logged as an error. If the C-MOVE association is aborted or lost while "
            "sub-operations are running, STORAGE-SCU carries on and tries to send every "
            "instance; the responses that can no longer be delivered are logged and "
            "dropped (Table F.4.2-21).",
        ),
    )
