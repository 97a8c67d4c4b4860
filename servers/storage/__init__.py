"""Storage SOP Classes (C-STORE) SCP of the STORAGE-SCP AE (Annex F §F.4.2.3).

The accepted contexts are Table F.4.2-30 without its Verification and Storage
Commitment rows (other plugins), with NM Image Storage (Retired) (digest A2)
and without the VL classes the prose mentions (A3). Settings, in
``[services.storage]``:

``transfer_syntax_preference``
    Accepted transfer syntaxes in preference order; a subset of JPEG Baseline,
    Explicit VR LE, Implicit VR LE that includes Implicit VR LE (§F.4.2.3.4.1.2).
``extra_sop_classes``
    Further Storage SOP Class UIDs, accepted with the uncompressed syntaxes.
``nm_retired``
    Accept NM Image Storage (Retired) (default true).
``duplicate_policy``
    ``new_uid`` (default) or ``replace`` (§3.4 of the digest, C1).
``return_coercion_warning``
    Answer B000 instead of 0000 when something was coerced (default false).
``min_free_bytes``
    Refuse (A700) when less than this is free under the store (default 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydicom.uid import UID
from pynetdicom.service_class import ServiceClass, StorageServiceClass

from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import (
    ERROR,
    REFUSED,
    SUCCESS,
    WARNING,
    ContextRow,
    ServiceDeclaration,
    StartupError,
    StatementSection,
    StatusRow,
    StatusTable,
    uid_name,
)
from servers.core.hookspecs import hookimpl
from servers.core.network import pynetdicom_service_class
from servers.core.sop_classes import (
    CR,
    CT,
    MR,
    NM_RETIRED,
    RETIRED_NAMES,
    SC,
    US,
    US_MULTIFRAME,
    US_MULTIFRAME_RETIRED,
    US_RETIRED,
)
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE, JPEG_BASELINE
from servers.storage import scp

ALL_SYNTAXES = (JPEG_BASELINE, EXPLICIT_VR_LE, IMPLICIT_VR_LE)
UNCOMPRESSED = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE})
WITH_JPEG = frozenset(ALL_SYNTAXES)

# Table F.4.2-30 storage rows in table order: class, statement name, syntaxes listed.
TABLE_F_4_2_30: tuple[tuple[str, str | None, frozenset[str]], ...] = (
    (US_RETIRED, RETIRED_NAMES[US_RETIRED], WITH_JPEG),
    (US, None, WITH_JPEG),
    (US_MULTIFRAME_RETIRED, RETIRED_NAMES[US_MULTIFRAME_RETIRED], WITH_JPEG),
    (US_MULTIFRAME, None, WITH_JPEG),
    (CR, None, UNCOMPRESSED),
    (CT, None, UNCOMPRESSED),
    (MR, None, UNCOMPRESSED),
    (NM_RETIRED, RETIRED_NAMES[NM_RETIRED], frozenset({IMPLICIT_VR_LE})),
    (SC, None, WITH_JPEG),
)
SYNTAX_NAMES = {
    JPEG_BASELINE: "JPEG Baseline (Process 1)",
    EXPLICIT_VR_LE: "Explicit VR Little Endian",
    IMPLICIT_VR_LE: "Implicit VR Little Endian",
}
DUPLICATE_POLICIES = ("new_uid", "replace")
SETTING_DEFAULTS: dict[str, Any] = {
    "transfer_syntax_preference": list(ALL_SYNTAXES),
    "extra_sop_classes": [],
    "nm_retired": True,
    "duplicate_policy": "new_uid",
    "return_coercion_warning": False,
    "min_free_bytes": 0,
}

A900_CONDITION = (
    "The data set parses but SOP Class UID, SOP Instance UID, Study Instance UID or "
    "Series Instance UID is missing, empty or longer than 64 characters; or SOP Class UID "
    "or SOP Instance UID differs from the command's Affected SOP Class/Instance UID; or, "
    "for an image SOP class, Photometric Interpretation, Bits Allocated, Bits Stored, "
    "Rows, Columns or Pixel Data is missing or empty. The check is not comprehensive. "
    "Nothing is kept."
)


def statuses(return_coercion_warning: bool) -> StatusTable:
    """The rows of Table F.4.2-31, with the conditions this implementation uses."""
    switch = "true" if return_coercion_warning else "false, so B000 is never sent"
    return StatusTable(
        "C-STORE",
        [
            StatusRow(
                scp.SUCCESS,
                SUCCESS,
                "Success",
                "The instance was received, checked, written as a Part 10 file and indexed; "
                "both are durable before the response is sent. Also sent when something was "
                "coerced while return_coercion_warning is false.",
            ),
            StatusRow(
                scp.OUT_OF_RESOURCES,
                REFUSED,
                "Out of Resources",
                "Free space under the store is below min_free_bytes, the disk is full, or the "
                "file or its index rows cannot be written (file system or database failure, "
                "or an internal error). The instance is not kept: no file, no index row.",
            ),
            StatusRow(
                scp.DOES_NOT_MATCH, ERROR, "Data Set does not match SOP Class", A900_CONDITION
            ),
            StatusRow(
                scp.CANNOT_UNDERSTAND,
                ERROR,
                "Cannot understand",
                "The data set cannot be parsed into elements in the negotiated transfer syntax "
                "(a truncated element, a value or item running past the end of the data, an "
                "invalid VR or an unclosed sequence), or an attribute the index needs cannot be "
                "decoded. Nothing is kept.",
            ),
            StatusRow(
                scp.COERCED,
                WARNING,
                "Coercion of Data Elements",
                "Only when return_coercion_warning is true (currently "
                f"{switch}): the instance was stored and indexed, and its SOP Instance UID was "
                "replaced because it duplicated a stored instance, or its Patient ID was coerced "
                "in the index. Offending Element lists the coerced attributes.",
            ),
        ],
    )


def _bool(settings: Mapping[str, Any], key: str) -> bool:
    value = settings[key]
    if not isinstance(value, bool):
        raise StartupError(f"[services.storage] {key} must be true or false, got {value!r}")
    return value


def effective_settings(config: Config) -> dict[str, Any]:
    """Validated settings with defaults; :class:`StartupError` says what to change."""
    raw = dict(config.service_settings("storage"))
    unknown = set(raw) - set(SETTING_DEFAULTS)
    if unknown:
        raise StartupError(
            f"[services.storage] has unknown settings: {', '.join(sorted(unknown))}; "
            f"known: {', '.join(SETTING_DEFAULTS)}"
        )
    settings = {**SETTING_DEFAULTS, **raw}
    preference = [str(uid) for uid in settings["transfer_syntax_preference"]]
    for uid in preference:
        if uid not in ALL_SYNTAXES:
            raise StartupError(
                f"[services.storage] transfer_syntax_preference names {uid!r}; allowed: "
                + ", ".join(f"{u} ({SYNTAX_NAMES[u]})" for u in ALL_SYNTAXES)
            )
    if len(set(preference)) != len(preference):
        raise StartupError("[services.storage] transfer_syntax_preference lists a syntax twice")
    if IMPLICIT_VR_LE not in preference:
        raise StartupError(
            "[services.storage] transfer_syntax_preference must include Implicit VR Little "
            f"Endian ({IMPLICIT_VR_LE}); the statement makes it mandatory (§F.4.2.3.4.1.2)"
        )
    settings["transfer_syntax_preference"] = preference
    extra = [str(uid).strip() for uid in settings["extra_sop_classes"]]
    table = {row[0] for row in TABLE_F_4_2_30}
    for uid in extra:
        if not UID(uid).is_valid or uid in table:
            raise StartupError(
                f"[services.storage] extra_sop_classes: {uid!r} is not a valid UID or is "
                "already accepted by default"
            )
    settings["extra_sop_classes"] = extra
    if settings["duplicate_policy"] not in DUPLICATE_POLICIES:
        raise StartupError(
            f"[services.storage] duplicate_policy must be one of {', '.join(DUPLICATE_POLICIES)}, "
            f"got {settings['duplicate_policy']!r}"
        )
    for key in ("nm_retired", "return_coercion_warning"):
        _bool(settings, key)
    try:
        settings["min_free_bytes"] = int(settings["min_free_bytes"])
    except (TypeError, ValueError):
        raise StartupError("[services.storage] min_free_bytes must be an integer") from None
    if settings["min_free_bytes"] < 0:
        raise StartupError("[services.storage] min_free_bytes must not be negative")
    return settings


def accepted_rows(settings: Mapping[str, Any]) -> tuple[ContextRow, ...]:
    preference: list[str] = settings["transfer_syntax_preference"]
    rows = []
    for uid, name, listed in TABLE_F_4_2_30:
        if uid == NM_RETIRED and not settings["nm_retired"]:
            continue
        syntaxes = tuple(ts for ts in preference if ts in listed)
        rows.append(ContextRow(uid, syntaxes, name=name))
    for uid in settings["extra_sop_classes"]:
        rows.append(ContextRow(uid, tuple(ts for ts in preference if ts in UNCOMPRESSED)))
    return tuple(rows)


def _is_image_class(uid: str) -> bool:
    return "Image" in uid_name(uid)


def statement(
    settings: Mapping[str, Any], rows: tuple[ContextRow, ...]
) -> tuple[StatementSection, ...]:
    preference = ", then ".join(SYNTAX_NAMES[ts] for ts in settings["transfer_syntax_preference"])
    duplicate = (
        "**new UID** (the default): a received instance whose SOP Instance UID is already "
        "stored is kept as a second instance under a new UID (`2.25.<uuid>`), written into "
        "SOP Instance UID (0008,0018) of the stored data set and Media Storage SOP Instance UID "
        "(0002,0003) of its File Meta Information; the received UID is recorded in the index. "
        "Any indexed instance with that UID counts as a duplicate, whatever its content."
        if settings["duplicate_policy"] == "new_uid"
        else "**replace**: a received instance whose SOP Instance UID is already stored "
        "replaces the stored file and its index row; the old file is deleted after the new "
        "one and its row are durable."
    )
    warning = "true" if settings["return_coercion_warning"] else "false (the default)"
    nm = (
        "NM Image Storage (Retired) (1.2.840.10008.5.1.4.1.1.5) is accepted with Implicit VR "
        "Little Endian only, as Table F.4.2-30 lists it although the SOP class tables omit it "
        "(switch `nm_retired`, currently " + ("on" if settings["nm_retired"] else "off") + "). "
    )
    return (
        StatementSection(
            "Storage SCP conformance",
            "The STORAGE-SCP AE is a **Level 2 (Full)** Storage SCP. Every received instance "
            "is kept whole as a DICOM Part 10 file: freshly written File Meta Information "
            "(this AE's Implementation Class UID and Version Name, Source AE Title = the "
            "calling AE title, Transfer Syntax UID = the negotiated one) followed by the data "
            "set bytes exactly as received, including all private and SOP Class extended "
            "elements. Nothing is decoded and re-encoded, so storage is bit-preserving, except "
            "for a duplicate stored under a new UID (below). Files are named by random "
            "identifiers, never by a UID or other received value. A C-STORE Success is sent "
            "only after the file (written atomically and fsynced, directory entry included) "
            "and its index rows (one database transaction, which may also hold the rows of "
            "instances other associations sent at the same moment) are durable. Instances are "
            "never deleted automatically. "
            "Several associations may store into the same patient, study or series at once.",
        ),
        StatementSection(
            "Duplicate SOP Instances",
            f"Duplicate policy (`duplicate_policy`): {duplicate} The C-STORE response always "
            "echoes the request's Affected SOP Instance UID.",
        ),
        StatementSection(
            "Coercion and the B000 warning",
            "The stored file is never changed except for a duplicate's new SOP Instance UID. "
            "In the index: a Patient ID that another patient (different family or given "
            "name, compared case-insensitively) already holds is coerced to `<ID>_<n>`, the "
            "smallest free n; later instances with the same ID and name get the same coerced "
            "ID, and the file keeps the received ID. Patient's Sex is indexed as M, F or O from "
            "its first character, otherwise U. Patient Name is indexed as last and first name "
            "only (`last^first` or `last, first`; anything else is all last name), up to 64 "
            "characters each. No default values are applied to absent attributes. An instance "
            "whose Study Instance UID is already indexed joins that study and its patient. "
            "Returning B000 (Coercion of Data Elements) for a new UID or a coerced Patient ID "
            f"is controlled by `return_coercion_warning`, currently {warning}; when false, "
            "such stores answer 0000, because some SCUs treat B000 as an error.",
        ),
        StatementSection(
            "Checks on received data sets",
            "C000 is returned when the data set cannot be parsed into elements in the "
            "negotiated transfer syntax, checked element by element (pydicom alone would "
            "silently accept a value running past the end of the data). A900 is returned by a "
            "check that is not comprehensive: " + A900_CONDITION + " "
            "Image SOP classes are all classes of the default table and any extra class whose "
            "name contains 'Image'. Display-related values (for example Bits Allocated other "
            "than 8 or 16) are not checked: such data are legal and are stored. Data sets that "
            "fail are not kept, not even temporarily: the sample statement's option to keep "
            "them for diagnosis is not provided.",
        ),
        StatementSection(
            "Transfer syntax selection",
            "When several transfer syntaxes are proposed in one presentation context, the one "
            f"accepted is the first of this preference list that was proposed: {preference} "
            "(`transfer_syntax_preference`, a subset of these three in any order that must "
            "include Implicit VR Little Endian). The requestor's order does not matter. JPEG "
            "Baseline is accepted only for the US (current and retired) and Secondary Capture "
            "classes. Each presentation context is negotiated on its own.",
        ),
        StatementSection(
            "SOP classes beyond the SOP class table",
            nm + "The VL Image and VL Multi-frame classes named in the JPEG prose of "
            "§F.4.2.3.4.1.2 appear in no table and are not accepted (digest A3); all JPEG "
            "names in the sample statement mean JPEG Baseline (Process 1), "
            "1.2.840.10008.1.2.4.50 (A4). Further storage classes can be added with "
            "`extra_sop_classes`"
            + (
                ": currently "
                + ", ".join(f"{uid_name(u)} ({u})" for u in settings["extra_sop_classes"])
                if settings["extra_sop_classes"]
                else " (none configured)"
            )
            + ".",
        ),
        StatementSection(
            "Character sets",
            "Instances in any Specific Character Set are accepted and stored unchanged. Values "
            "are decoded according to their Specific Character Set for the index; ISO_IR 100 "
            "(Latin-1) is supported as the statement requires (§F.6). A value that cannot be "
            "decoded answers C000.",
        ),
    )


def declaration(config: Config) -> ServiceDeclaration:
    settings = effective_settings(config)
    rows = accepted_rows(settings)
    table = statuses(settings["return_coercion_warning"])
    image_classes = frozenset(
        row.abstract_syntax
        for row in rows
        if row.abstract_syntax in {r[0] for r in TABLE_F_4_2_30}
        or _is_image_class(row.abstract_syntax)
    )
    runtime = scp.StorageSettings(
        duplicate_policy=settings["duplicate_policy"],
        return_coercion_warning=settings["return_coercion_warning"],
        image_classes=image_classes,
    )
    # pynetdicom does not know the retired classes (…1.1.6, …1.1.3, …1.1.5) and
    # would abort the association on a C-STORE for them (digest A12).
    service_classes: dict[str, type[ServiceClass]] = {
        row.abstract_syntax: StorageServiceClass
        for row in rows
        if pynetdicom_service_class(row.abstract_syntax) is ServiceClass
    }

    def handlers(ctx: ServiceContext) -> Mapping[Any, Callable[..., Any]]:
        return scp.handlers(ctx, runtime, table)

    return ServiceDeclaration(
        name="storage",
        title="Storage",
        accepted=rows,
        statuses={"C-STORE": table},
        handlers=handlers,
        service_classes=service_classes,
        settings=settings,
        statement=statement(settings, rows),
    )


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return [declaration(config)]
