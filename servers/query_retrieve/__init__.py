"""Query/Retrieve SCP of the QUERY-RETRIEVE-SCP AE: C-FIND here, C-MOVE in ``move.py``.

Accepted contexts are Annex F Table F.4.2-15 (Verification is the separate
``verification`` plugin): FIND and MOVE of the Patient Root, Study Root and
Patient/Study Only models, Implicit VR Little Endian only, no extended negotiation.
With ``image_level = false`` only the Patient/Study Only classes are accepted
(§F.4.2.2.1; digest A5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pynetdicom import evt

from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import ContextRow, ServiceDeclaration, StatementSection
from servers.core.hookspecs import hookimpl
from servers.core.transfer_syntax import IMPLICIT_VR_LE
from servers.query_retrieve.find import C_FIND_STATUSES, make_find_handler
from servers.query_retrieve.find_scp import FindServiceClass
from servers.query_retrieve.keys import MODELS, InformationModel, key_table_markdown
from servers.query_retrieve.move import (
    C_MOVE_STATUSES,
    MOVE_SOP_CLASSES,
    MoveServiceClass,
    move_settings,
    move_statement,
    proposed_contexts,
)

NAME = "query_retrieve"


def enabled_models(image_level: bool) -> tuple[InformationModel, ...]:
    """The models whose SOP classes are accepted (digest A5)."""
    return tuple(m for m in MODELS.values() if image_level or not m.needs_image_level)


def handlers(ctx: ServiceContext) -> Mapping[Any, Callable[..., Any]]:
    return {evt.EVT_C_FIND: make_find_handler(ctx)}


def find_statement(
    config: Config, models: tuple[InformationModel, ...]
) -> tuple[StatementSection, ...]:
    title = config.ae("query_scp").title if "query_scp" in config.aes else "the AE's title"
    sections = [
        StatementSection(
            "C-FIND: query model",
            "Only hierarchical queries are supported (baseline behaviour of PS3.4 C.4.1.2.1). "
            "Relational queries and every other SOP Class Extended Negotiation are not "
            "accepted: no extended negotiation reply item is ever sent. Responses come from "
            "the archive database, never from the stored files. One pending response is sent "
            "per matching entity at the Query/Retrieve Level (patient, study, series or "
            "image), in the order the entities were first stored; no other sort order is "
            "promised. The identifier must hold a single value in the unique key of every "
            "level above the query level (Patient ID, Study Instance UID, Series Instance "
            "UID); a list of UIDs is accepted only in the unique key of the query level "
            "itself.",
        ),
    ]
    for model in models:
        sections.append(
            StatementSection(
                f"C-FIND: {model.title} keys (Table {model.table})",
                f"Levels: {', '.join(model.levels)}. `Yes (ext.)` marks a matching type "
                "accepted beyond the sample statement's table (see the matching rules).\n\n"
                + key_table_markdown(model),
            )
        )
    sections += [
        StatementSection(
            "C-FIND: matching rules",
            "- Single value matching compares the whole value. Wildcards `*` (any run of "
            "characters) and `?` (one character) apply to keys marked `*`; any other "
            "character in a value, including `%`, `_` and `'`, matches only itself.\n"
            "- A zero-length value, or a value made only of `*`, is universal matching.\n"
            "- Patient's Name and Referring Physician's Name are matched case-insensitively, "
            "on the first (alphabetic) component group only; trailing `^` and spaces in the "
            "query are ignored. The archive keeps Patient's Name as `family^given`, so only "
            "the first two components of a Patient's Name query are compared (middle names, "
            "prefixes and suffixes are ignored). All other string keys are case-sensitive, "
            "after removing leading and trailing spaces.\n"
            "- Study Date accepts `YYYYMMDD`, `d1-d2`, `d1-` and `-d2` (inclusive). The "
            "ACR-NEMA form `YYYY.MM.DD` is rejected with A900. Patient's Birth Date accepts "
            "single values only.\n"
            "- Study Time accepts ranges `t1-t2`, `t1-`, `-t2` and, beyond the sample "
            "table, a single time; a partial time such as `1015` stands for the whole "
            "period it denotes (10:15:00 to 10:15:59.999999). Study Date and Study Time "
            "are matched independently (no combined date-time matching).\n"
            "- Series Number and Instance Number (IS) accept `*`/`?` patterns on their "
            "decimal form, beyond PS3.4, as the sample table lists `*` for them. Modality "
            "accepts wildcards beyond the sample table.\n"
            "- UID keys accept single values and, on the query level's unique key, "
            "backslash-separated lists.\n"
            "- A stored value that is empty (unknown) matches every query value of that "
            "key (PS3.4 C.2.2.1.2). A patient stored with sex unknown is returned with an "
            "empty Patient's Sex, because 'U' is not an Enumerated Value of (0010,0040); "
            "such patients match every Patient's Sex value, and a query of `U` matches "
            "only them.\n"
            "- Keys marked NONE are returned with their stored values but never matched.",
        ),
        StatementSection(
            "C-FIND: partial values (status C001)",
            "At PATIENT level (Patient Root and Patient/Study Only models) the request is "
            "answered with C001 Unable to process, and no match, unless Patient's Name or "
            "Patient ID has a partial value: a value that is not zero-length and not only "
            "`*`. This covers Patient's Name absent with Patient ID empty or `*`, and both "
            "empty. At STUDY level of the Study Root model, if none of Study Date, Study "
            "Time, Accession Number, Study ID, Study Instance UID, Referring Physician's "
            "Name and Study Description has a partial value, Patient's Name or Patient ID "
            "must have one, or the answer is C001. Patient's Birth Date and Sex do not "
            "count. Series and image queries always carry a Study Instance UID.",
        ),
        StatementSection(
            "C-FIND: unsupported keys (status FF01)",
            "Every pending response of a request is FF01 instead of FF00 when the "
            "identifier holds any of: an attribute not in the model's key table (it is "
            "not returned); a sequence; a key of a level below the query level (ignored, "
            "not returned); a key of a level above the query level other than that "
            "level's unique key (ignored, not returned, as baseline hierarchical queries "
            "carry only unique keys above the query level); a value in a key whose "
            "matching type is NONE (the value is ignored and the stored value returned); "
            "a range or wildcard in Patient's Birth Date, or a wildcard in Patient's Sex "
            "(treated as universal matching). Specific Character Set, Query/Retrieve "
            "Level and Retrieve AE Title never cause FF01.",
        ),
        StatementSection(
            "C-FIND: returned attributes",
            "The sample statement says no attribute is returned unless requested; PS3.4 "
            "C.4.1.1.3.2 requires two, so every pending response carries Query/Retrieve "
            "Level and Retrieve AE Title (0008,0054), whose value is this AE's title "
            f"(`{title}`), the C-MOVE SCP for every level. Besides these, each requested "
            "supported key of the query level and the unique keys of the levels above "
            "are returned, zero-length when the database holds no value. Error Comment "
            "and Offending Element accompany A900 and C001 responses.",
        ),
        StatementSection(
            "C-FIND: character sets",
            "Key values are decoded with the identifier's Specific Character Set; values "
            "with bytes outside ASCII and no Specific Character Set are read as ISO_IR "
            "100. A value whose character set Python cannot decode, or whose bytes are "
            "invalid in it, is answered with C001. Responses use the default repertoire, "
            "or ISO_IR 100 (then Specific Character Set is returned) when a returned value "
            "needs it. A stored value outside ISO_IR 100 is returned zero-length and that "
            "response is FF01. Specific Character Set is returned zero-length when it was "
            "requested and no value needs it.",
        ),
        StatementSection(
            "C-FIND: cancel",
            "A C-CANCEL-FIND-RQ is checked for between matches. Once seen, the search "
            "stops and a final response FE00 without identifier is sent; no pending "
            "response follows it. A cancel arriving after the final response, or naming "
            "another Message ID, is ignored.",
        ),
    ]
    return tuple(sections)


def declaration(config: Config) -> ServiceDeclaration:
    raw = config.service_settings(NAME)
    image_level = bool(raw.get("image_level", True))
    models = enabled_models(image_level)
    accepted: list[ContextRow] = []
    for model in models:
        accepted.append(ContextRow(model.find_uid, (IMPLICIT_VR_LE,)))
        accepted.append(ContextRow(model.move_uid, (IMPLICIT_VR_LE,)))
    accepted_uids = {row.abstract_syntax for row in accepted}
    settings: dict[str, Any] = {
        "image_level": image_level,
        "transfer_syntaxes": [IMPLICIT_VR_LE],
    }
    settings.update(move_settings(config))
    return ServiceDeclaration(
        name=NAME,
        title="Query/Retrieve",
        accepted=tuple(accepted),
        proposed=proposed_contexts(config),
        statuses={"C-FIND": C_FIND_STATUSES, "C-MOVE": C_MOVE_STATUSES},
        handlers=handlers,
        service_classes={
            **{m.find_uid: FindServiceClass for m in models},
            **{uid: MoveServiceClass for uid in MOVE_SOP_CLASSES if uid in accepted_uids},
        },
        settings=settings,
        statement=find_statement(config, models) + tuple(move_statement(config)),
    )


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return [declaration(config)]
