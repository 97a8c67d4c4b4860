"""C-FIND SCP of the QUERY-RETRIEVE-SCP AE (Annex F §F.4.2.2.4.1.3, Table F.4.2-19).

Hierarchical queries only. The identifier is validated against the model's key
table (``keys.py``) before the database is touched; each rule below names the
digest resolution (``/work/shared/spec/qr-archive.md`` §8 D1-D15) it follows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from sqlalchemy.exc import SQLAlchemyError

from db.queries.find import Condition, find_matches
from db.values import clean, person_name, split_person_name, valid_date
from servers.core import logs
from servers.core.context import ServiceContext
from servers.core.declaration import (
    CANCEL,
    FAILURE,
    PENDING,
    REFUSED,
    SUCCESS,
    StatusRow,
    StatusTable,
)
from servers.core.dimse import CancelLatch
from servers.core.query_values import (
    TEXT_VRS,
    CharsetError,
    decode_text,
    query_encodings,
    time_bounds,
)
from servers.core.transfer_syntax import IMPLICIT_VR_LE
from servers.query_retrieve.find_scp import encode_elements
from servers.query_retrieve.keys import (
    CONTROL_KEYWORDS,
    UNIQUE_KEYS,
    InformationModel,
    Key,
    Level,
    model_for_uid,
)

C_FIND_STATUSES = StatusTable(
    "C-FIND",
    [
        StatusRow(
            0x0000,
            SUCCESS,
            "Success",
            "Matching is complete: sent after the last pending response, or alone when "
            "nothing matched. It carries no identifier.",
        ),
        StatusRow(
            0xA700,
            REFUSED,
            "Out of Resources",
            "The archive database could not be searched (connection lost, lock timeout, "
            "damaged schema) or memory ran out, so no match is sent; or a stored value "
            "could not be put into a response, which ends the search at that match. The "
            "cause is written to the service log.",
        ),
        StatusRow(
            0xA900,
            FAILURE,
            "Identifier does not match SOP Class",
            "The identifier cannot be decoded; Query/Retrieve Level is missing, "
            "multi-valued, unknown or not a level of the model; the unique key of a level "
            "above the query level is missing, empty, a wildcard or a list; a key other "
            "than the query level's unique key has several values; or a date, time, UID or "
            "Integer String value is invalid (including the ACR-NEMA date form YYYY.MM.DD). "
            "No pending responses are sent.",
        ),
        StatusRow(
            0xC001,
            FAILURE,
            "Unable to process",
            "The identifier is valid but cannot be used to search: at Patient level neither "
            "Patient's Name nor Patient ID has a partial value (a value that is not empty "
            "and not only '*'); at Study level of the Study Root model none of the study "
            "attributes, Patient's Name or Patient ID has a partial value; or a key value "
            "uses a Specific Character Set the archive cannot decode, or bytes invalid in "
            "its character set. No pending responses are sent.",
        ),
        StatusRow(
            0xFE00,
            CANCEL,
            "Matching terminated due to Cancel Request",
            "The SCU sent a C-CANCEL-FIND-RQ for this request before the last match was "
            "sent; the search stops and this final response carries no identifier.",
        ),
        StatusRow(
            0xFF00,
            PENDING,
            "Matches are continuing - Current Match is supplied and any Optional Keys "
            "were supported in the same manner as Required Keys",
            "Sent with each match when every key in the identifier is supported as used.",
        ),
        StatusRow(
            0xFF01,
            PENDING,
            "Matches are continuing - Warning that one or more Optional Keys were not "
            "supported for existence and/or matching for this Identifier",
            "Sent with each match when the identifier holds a key not in the model's key "
            "table, a sequence, a key of a level below the query level, a key of a level "
            "above it other than that level's unique key, a value in a key whose matching "
            "type is NONE, a range or wildcard in Patient's Birth Date, or a wildcard in "
            "Patient's Sex (these keys are then not returned or not matched); and with a "
            "match whose returned value cannot be encoded in ISO_IR 100 (that attribute "
            "is returned empty).",
        ),
    ],
)

SUCCESS_ROW = C_FIND_STATUSES[0x0000]
OUT_OF_RESOURCES = C_FIND_STATUSES[0xA700]
IDENTIFIER_INVALID = C_FIND_STATUSES[0xA900]
UNABLE_TO_PROCESS = C_FIND_STATUSES[0xC001]
CANCELLED = C_FIND_STATUSES[0xFE00]
PENDING_ALL_SUPPORTED = C_FIND_STATUSES[0xFF00]
PENDING_UNSUPPORTED = C_FIND_STATUSES[0xFF01]

# The one extended character set the statement declares (§F.6, digest D9).
RESPONSE_CHARSET = "ISO_IR 100"
RESPONSE_ENCODING = "latin_1"


# "Study attributes" of the Study Root partial-value rule (digest D6).
STUDY_ATTRIBUTES = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyInstanceUID",
    "ReferringPhysicianName",
    "StudyDescription",
)

UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
IS_RE = re.compile(r"[+-]?[0-9]{1,12}")
IS_PATTERN_RE = re.compile(r"[+\-0-9*?]{1,12}")


class FindError(Exception):
    """A C-FIND request answered with a failure status and no pending responses."""

    def __init__(self, row: StatusRow, comment: str, offending: Sequence[int] = ()) -> None:
        super().__init__(comment)
        self.row = row
        self.comment = comment
        self.offending = tuple(offending)

    def status(self) -> Dataset:
        """The status with Error Comment (LO, so at most 64 characters) and Offending Element."""
        ds = Dataset()
        ds.Status = self.row.code
        ds.ErrorComment = self.comment[:64]
        if self.offending:
            ds.OffendingElement = list(self.offending)
        return ds


@dataclass
class FindQuery:
    """A validated identifier: what to match, and what each response carries."""

    model: InformationModel
    level: Level
    conditions: list[Condition] = field(default_factory=list)
    returned: list[Key] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    charset_requested: bool = False


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def has_partial_value(values: Sequence[str] | None) -> bool:
    """Digest D5: non-empty and not only ``*`` characters."""
    return bool(values) and any(v.strip("*") for v in values or ())


# --- character sets (digest D9) ---------------------------------------------------


def _decode(raw: bytes, vr: str, encodings: list[str] | None, keyword: str, tag: int) -> str:
    """A raw value as text; C001 for undecodable text, A900 for non-ASCII elsewhere."""
    if vr not in TEXT_VRS:
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise FindError(IDENTIFIER_INVALID, f"{keyword} is not ASCII", [tag]) from None
    try:
        return decode_text(raw, vr, encodings)
    except CharsetError as error:
        if error.unsupported:
            raise FindError(
                UNABLE_TO_PROCESS, "Specific Character Set not supported", [0x00080005]
            ) from None
        raise FindError(
            UNABLE_TO_PROCESS, f"{keyword} invalid in its character set", [tag]
        ) from None


def _element_text(
    element: DataElement | RawDataElement, vr: str, encodings: list[str] | None, keyword: str
) -> list[str]:
    """The values of one element, split on backslash and trimmed; [] when zero-length."""
    tag = int(element.tag)
    value = element.value
    if value is None:
        return []
    if isinstance(value, bytes):
        text = _decode(value, vr, encodings, keyword, tag)
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = "\\".join(str(v) for v in value)
        except TypeError:
            text = str(value)
    values = [clean(v) for v in text.split("\\")]
    if values == [""]:
        return []
    return values


# --- value parsing --------------------------------------------------------------------


class _Unsupported(Exception):
    """A value this key cannot match on: treated as universal, answered with FF01."""


def _condition(key: Key, values: list[str], list_allowed: bool) -> Condition | None:
    """The matching condition for one key's values; None for universal matching."""
    keyword, tag = key.keyword, key.tag

    def invalid(what: str) -> FindError:
        return FindError(IDENTIFIER_INVALID, f"invalid {what} in {keyword}", [tag])

    if not values:
        return None
    if len(values) > 1:
        if not (list_allowed and "L" in key.supports):
            raise FindError(IDENTIFIER_INVALID, f"{keyword} has several values", [tag])
        for uid in values:
            if len(uid) > 64 or not UID_RE.fullmatch(uid):
                raise invalid("UID")
        return Condition(keyword, "list", tuple(values))
    value = values[0]
    if key.vr == "UI":
        if len(value) > 64 or not UID_RE.fullmatch(value):
            raise invalid("UID")
        return Condition(keyword, "single", (value,))
    if key.vr == "DA":
        if "R" not in key.supports and ("-" in value or _has_wildcard(value)):
            # Patient's Birth Date: S, U only (digest D3). A well-formed range or
            # any wildcard is a matching type we do not support, not an error.
            if _has_wildcard(value) or all(
                valid_date(part) for part in value.split("-", 1) if part
            ):
                raise _Unsupported(keyword)
            raise invalid("date")
        if "-" in value:
            low, _, high = value.partition("-")
            if not (low or high) or not all(valid_date(p) for p in (low, high) if p):
                raise invalid("date range")
            return Condition(keyword, "range", (low, high))
        if not valid_date(value):
            raise invalid("date")
        return Condition(keyword, "single", (value,))
    if key.vr == "TM":
        if "-" in value:
            low_text, _, high_text = value.partition("-")
            low_bounds = time_bounds(low_text) if low_text else ("", "")
            high_bounds = time_bounds(high_text) if high_text else ("", "")
            if not (low_text or high_text) or low_bounds is None or high_bounds is None:
                raise invalid("time range")
            return Condition(keyword, "range", (low_bounds[0], high_bounds[1]))
        bounds = time_bounds(value)
        if bounds is None:
            raise invalid("time")
        return Condition(keyword, "range", bounds)
    if key.vr == "IS":
        if not value.strip("*"):
            return None
        if _has_wildcard(value):
            # Digest D1: lenient pattern matching on the decimal string form.
            if not IS_PATTERN_RE.fullmatch(value):
                raise invalid("Integer String")
            return Condition(keyword, "wildcard", (value,))
        if not IS_RE.fullmatch(value):
            raise invalid("Integer String")
        return Condition(keyword, "single", (str(int(value)),))
    if key.keyword == "PatientName":
        # Digest D4: the index keeps family^given of the first component group only.
        value = person_name(*split_person_name(value))
    elif key.vr == "PN":
        # Other names are stored as their first component group (db/queries/ingest.py).
        value = value.split("=")[0].rstrip("^ ")
    if not value.strip("*"):
        return None
    if _has_wildcard(value):
        if "*" not in key.supports:
            raise _Unsupported(keyword)
        return Condition(keyword, "wildcard", (value,))
    return Condition(keyword, "single", (value,))


def _higher_unique(key: Key, values: list[str]) -> Condition:
    """A unique key of a level above the query level: exactly one value (digest D11)."""
    if len(values) != 1 or (key.vr != "UI" and _has_wildcard(values[0])):
        raise FindError(
            IDENTIFIER_INVALID,
            f"{key.keyword} must hold a single value above the query level",
            [key.tag],
        )
    condition = _condition(key, values, list_allowed=False)
    assert condition is not None
    return condition


def parse_identifier(identifier: Dataset, model: InformationModel) -> FindQuery:
    """Validate ``identifier`` for ``model``; raises :class:`FindError` with A900 or C001."""
    encodings = query_encodings(identifier)
    table = model.by_tag()
    present: dict[str, list[str]] = {}
    unsupported: list[str] = []
    charset_requested = False
    level_values: list[str] | None = None
    for tag in list(identifier.keys()):
        tag = BaseTag(tag)
        if tag.element == 0 or tag.group == 0x0002:
            continue  # group lengths and file meta carry no query
        element = identifier.get_item(tag)
        if element is None:
            continue
        keyword = keyword_for_tag(tag) or _tag_text(tag)
        raw_vr = element.VR
        try:
            vr = str(raw_vr or dictionary_VR(tag))
        except KeyError:
            vr = "UN"
        if keyword == "QueryRetrieveLevel":
            level_values = _element_text(element, "CS", encodings, keyword)
            continue
        if keyword == "SpecificCharacterSet":
            charset_requested = True
            continue
        if keyword in CONTROL_KEYWORDS:
            continue
        key = table.get(int(tag))
        if key is None or vr == "SQ":
            unsupported.append(keyword)
            continue
        present[key.keyword] = _element_text(element, key.vr, encodings, keyword)

    if not level_values or len(level_values) != 1:
        raise FindError(
            IDENTIFIER_INVALID, "Query/Retrieve Level missing or multi-valued", [0x00080052]
        )
    level_text = level_values[0]
    if level_text not in model.levels:
        raise FindError(
            IDENTIFIER_INVALID,
            f"level {level_text[:16]} not in {model.title} model",
            [0x00080052],
        )
    level: Level = model.levels[model.levels.index(level_text)]  # type: ignore[index]
    depth = model.levels.index(level)
    query = FindQuery(model, level, charset_requested=charset_requested)

    for above in model.levels[:depth]:
        unique = model.key(UNIQUE_KEYS[above])
        if unique.keyword not in present:
            raise FindError(
                IDENTIFIER_INVALID, f"{unique.keyword} missing above query level", [unique.tag]
            )

    for key in model.keys:
        if key.keyword not in present or key.level is None:
            continue
        values = present[key.keyword]
        key_depth = model.levels.index(key.level)
        if key_depth > depth:
            unsupported.append(key.keyword)  # below the query level (digest D11)
            continue
        if key_depth < depth:
            if key.keyword != UNIQUE_KEYS[key.level]:
                unsupported.append(key.keyword)  # baseline hierarchical: only unique keys above
                continue
            query.conditions.append(_higher_unique(key, values))
            query.returned.append(key)
            continue
        query.returned.append(key)
        if not key.matchable:
            if values:
                unsupported.append(key.keyword)  # NONE key with a value (digest D7)
            continue
        try:
            condition = _condition(key, values, list_allowed=key.keyword == UNIQUE_KEYS[level])
        except _Unsupported:
            unsupported.append(key.keyword)
            continue
        if condition is not None:
            query.conditions.append(condition)

    _check_partial_values(query, present)
    query.unsupported = unsupported
    return query


def _check_partial_values(query: FindQuery, present: dict[str, list[str]]) -> None:
    """The statement's "at least a partial value" rules (§F.4.2.2.4.1.3; digest D5, D6)."""
    patient_keys = ("PatientName", "PatientID")
    if query.level == "PATIENT":
        if not any(has_partial_value(present.get(k)) for k in patient_keys):
            raise FindError(
                UNABLE_TO_PROCESS,
                "Patient's Name or Patient ID needs a partial value",
                [0x00100010, 0x00100020],
            )
    elif query.level == "STUDY" and query.model.name == "STUDY_ROOT":
        keys = STUDY_ATTRIBUTES + patient_keys
        if not any(has_partial_value(present.get(k)) for k in keys):
            raise FindError(
                UNABLE_TO_PROCESS,
                "a study attribute, Patient's Name or ID needs a value",
                [0x00100010, 0x00100020],
            )


# --- responses ------------------------------------------------------------------------


@dataclass
class ResponseTemplate:
    """What every pending identifier of one request shares, worked out once.

    Elements in tag order as ``(tag, VR, value)``: Query/Retrieve Level and Retrieve
    AE Title with their encoded values (digest D8), each returned key with its
    keyword in place of the value, filled from each match.
    """

    query: FindQuery
    implicit: bool
    slots: list[tuple[int, str, bytes | str]]

    @classmethod
    def create(cls, query: FindQuery, retrieve_ae: str, implicit: bool) -> ResponseTemplate:
        slots: list[tuple[int, str, bytes | str]] = [
            (0x00080052, "CS", query.level.encode("ascii")),
            (0x00080054, "AE", retrieve_ae.encode("ascii")),
        ]
        slots += [(key.tag, key.vr, key.keyword) for key in query.returned]
        slots.sort(key=lambda slot: slot[0])
        return cls(query, implicit, slots)

    def encode(self, match: dict[str, str]) -> tuple[bytes, bool]:
        """The pending identifier for one match, and whether a value had to be dropped.

        Every requested supported key, zero-length when unknown; Specific Character
        Set ISO_IR 100 when a value needs it (D9); Patient's Sex 'U' returned empty
        (D13). The bytes are what pydicom writes for the same Dataset
        (tests/test_find.py compares them).
        """
        dropped = False
        wide = False
        elements: list[tuple[int, str, bytes]] = []
        for tag, vr, slot in self.slots:
            if isinstance(slot, bytes):
                elements.append((tag, vr, slot))
                continue
            value = match.get(slot, "")
            if slot == "PatientSex" and value == "U":
                value = ""
            if value.isascii():
                elements.append((tag, vr, value.encode("ascii")))
                continue
            try:
                elements.append((tag, vr, value.encode(RESPONSE_ENCODING)))
                wide = True
            except UnicodeEncodeError:
                elements.append((tag, vr, b""))
                dropped = True
        if wide:
            elements.insert(0, (0x00080005, "CS", RESPONSE_CHARSET.encode("ascii")))
        elif self.query.charset_requested:
            elements.insert(0, (0x00080005, "CS", b""))
        return encode_elements(elements, self.implicit), dropped


def build_response(
    query: FindQuery, match: dict[str, str], retrieve_ae: str
) -> tuple[Dataset, bool]:
    """The pending identifier for one match as a pydicom Dataset (the reference form).

    :class:`ResponseTemplate` encodes the same thing straight to bytes for the SCP;
    this is what those bytes are checked against.
    """
    ds = Dataset()
    dropped = False
    values: dict[Key, str] = {}
    for key in query.returned:
        value = match.get(key.keyword, "")
        if key.keyword == "PatientSex" and value == "U":
            value = ""
        if not value.isascii():
            try:
                value.encode(RESPONSE_ENCODING)
            except UnicodeEncodeError:
                value = ""
                dropped = True
        values[key] = value
    if any(not v.isascii() for v in values.values()):
        ds.SpecificCharacterSet = RESPONSE_CHARSET
    elif query.charset_requested:
        ds.SpecificCharacterSet = ""
    ds.QueryRetrieveLevel = query.level
    ds.RetrieveAETitle = retrieve_ae
    for key, value in values.items():
        ds.add_new(key.tag, key.vr, value)
    return ds, dropped


# --- handler --------------------------------------------------------------------------


def between_matches(is_cancelled: Callable[[], bool]) -> None:
    """Runs after each pending response is handed to pynetdicom, before the cancel check.

    A no-op; the cancel test replaces it to wait for its C-CANCEL deterministically.
    """


# Pending identifiers are encoded bytes: FindServiceClass (find_scp.py) sends them.
FindResult = tuple[Dataset | int, bytes | None]


def make_find_handler(ctx: ServiceContext) -> Callable[[Any], Iterator[FindResult]]:
    """The EVT_C_FIND handler bound to one QUERY-RETRIEVE-SCP AE."""
    retrieve_ae = ctx.ae.title

    def handle_find(event: Any) -> Iterator[FindResult]:
        sop_class = str(event.context.abstract_syntax)
        log = logs.assoc_logger(event.assoc).bind(operation="C-FIND", sop_class=sop_class)
        try:
            model = model_for_uid(sop_class)
            query = parse_identifier(event.identifier, model)
        except FindError as error:
            log.warning(
                "c_find_handled",
                status=f"0x{error.row.code:04X}",
                reason=error.comment,
                offending=[_tag_text(t) for t in error.offending],
            )
            yield error.status(), None
            return
        except Exception as exc:  # undecodable identifier: pydicom raises many kinds
            log.warning(
                "c_find_handled",
                status=f"0x{IDENTIFIER_INVALID.code:04X}",
                reason=f"identifier not decodable: {type(exc).__name__}",
            )
            yield FindError(IDENTIFIER_INVALID, "identifier cannot be decoded").status(), None
            return
        fields: dict[str, Any] = {
            "model": model.name,
            "level": query.level,
            "conditions": [c.keyword for c in query.conditions],
        }
        if query.unsupported:
            fields["unsupported"] = query.unsupported
        try:
            with ctx.db.read() as session:
                matches = find_matches(session, query.level, query.conditions)
        except (SQLAlchemyError, MemoryError, OSError) as exc:
            log.error(
                "c_find_handled",
                status=f"0x{OUT_OF_RESOURCES.code:04X}",
                reason=f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                **fields,
            )
            yield OUT_OF_RESOURCES.code, None
            return
        syntax = event.context.transfer_syntax
        template = ResponseTemplate.create(query, retrieve_ae, syntax == IMPLICIT_VR_LE)
        cancelled = CancelLatch(event)
        sent = 0
        for match in matches:
            if cancelled():
                log.info("c_find_handled", status=f"0x{CANCELLED.code:04X}", sent=sent, **fields)
                yield CANCELLED.code, None
                return
            try:
                response, dropped = template.encode(match)
            except Exception as exc:  # a stored value pydicom refuses: never crash the AE
                log.error(
                    "c_find_handled",
                    status=f"0x{OUT_OF_RESOURCES.code:04X}",
                    reason=f"response: {type(exc).__name__}: {exc}",
                    sent=sent,
                    **fields,
                )
                yield OUT_OF_RESOURCES.code, None
                return
            row = PENDING_UNSUPPORTED if query.unsupported or dropped else PENDING_ALL_SUPPORTED
            yield row.code, response
            sent += 1
            between_matches(cancelled)
        if sent and cancelled():
            # The cancel arrived while the last match was being sent: still honour it.
            log.info("c_find_handled", status=f"0x{CANCELLED.code:04X}", sent=sent, **fields)
            yield CANCELLED.code, None
            return
        log.info("c_find_handled", status=f"0x{SUCCESS_ROW.code:04X}", sent=sent, **fields)
        yield SUCCESS_ROW.code, None

    return handle_find
