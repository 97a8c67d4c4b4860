"""The C-FIND key tables of the sample statement (Annex F Tables F.4.2-16, -17, -18) as data.

Everything else reads these tables: identifier validation, the SQL column map,
the statement's markdown tables and the C-MOVE level checks. Matching types use
the statement's legend: ``S`` single value, ``R`` range, ``*`` wildcard, ``U``
universal, ``L`` list of UIDs, ``NONE`` returned but never matched.

>>> MODELS["PATIENT_ROOT"].levels
('PATIENT', 'STUDY', 'SERIES', 'IMAGE')
>>> MODELS["STUDY_ROOT"].key("PatientName").level
'STUDY'
>>> UNIQUE_KEYS["SERIES"]
'SeriesInstanceUID'
>>> model_for_uid("1.2.840.10008.5.1.4.1.2.3.2").name
'PATIENT_STUDY_ONLY'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydicom.datadict import dictionary_description, tag_for_keyword

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
MatchType = Literal["S", "R", "*", "U", "L", "NONE"]
MATCH_TYPES: tuple[MatchType, ...] = ("S", "R", "*", "U", "L", "NONE")

# The entity (database table) an attribute lives on, independent of the level the
# model lists it at: the Study Root model lists patient attributes at STUDY level.
Entity = Literal["patient", "study", "series", "instance"]

# The unique key of each level (PS3.4 C.6.1.1 / C.6.2.1), the same in every model.
UNIQUE_KEYS: Mapping[Level, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

# Attributes that are part of every identifier's machinery rather than search keys:
# they are never "unsupported", and never matched.
CONTROL_KEYWORDS: frozenset[str] = frozenset(
    {"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet"}
)


@dataclass(frozen=True)
class Key:
    """One row of a key table.

    ``matching`` is what the sample statement prints; ``extended`` lists the
    matching types the archive accepts beyond it (digest D1-D3), so the statement
    can show both honestly.
    """

    keyword: str
    level: Level | None  # None: the "SOP Common" row (Specific Character Set)
    vr: str
    entity: Entity | None
    matching: frozenset[MatchType]
    extended: frozenset[MatchType] = frozenset()

    @property
    def tag(self) -> int:
        tag = tag_for_keyword(self.keyword)
        assert tag is not None, self.keyword
        return tag

    @property
    def tag_text(self) -> str:
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"

    @property
    def name(self) -> str:
        return str(dictionary_description(self.tag))

    @property
    def supports(self) -> frozenset[MatchType]:
        return self.matching | self.extended

    @property
    def matchable(self) -> bool:
        return "NONE" not in self.matching and self.level is not None


@dataclass(frozen=True)
class InformationModel:
    """A Query/Retrieve information model: its SOP classes, levels and key table."""

    name: str
    title: str
    table: str
    find_uid: str
    move_uid: str
    levels: tuple[Level, ...]
    keys: tuple[Key, ...]
    # True for the models that need image-level support in the database (digest A5).
    needs_image_level: bool = field(default=True)

    def key(self, keyword: str) -> Key:
        for key in self.keys:
            if key.keyword == keyword:
                return key
        raise KeyError(keyword)

    def keys_at(self, level: Level) -> tuple[Key, ...]:
        return tuple(key for key in self.keys if key.level == level)

    def by_tag(self) -> dict[int, Key]:
        return {key.tag: key for key in self.keys}


def _set(*types: MatchType) -> frozenset[MatchType]:
    return frozenset(types)


SWU = _set("S", "*", "U")
SU = _set("S", "U")
SUL = _set("S", "U", "L")
NONE = _set("NONE")


def _rows(patient_level: Level) -> tuple[Key, ...]:
    """Rows common to all three tables; patient attributes sit at ``patient_level``."""
    p = patient_level
    return (
        Key("SpecificCharacterSet", None, "CS", None, NONE),
        Key("PatientName", p, "PN", "patient", SWU),
        Key("PatientID", p, "LO", "patient", SWU),
        Key("PatientBirthDate", p, "DA", "patient", SU),
        Key("PatientSex", p, "CS", "patient", SU),
        Key("OtherPatientIDs", p, "LO", "patient", NONE),
        Key("OtherPatientNames", p, "PN", "patient", NONE),
        # Study Time: the table prints "R, U"; single value is accepted too (D2).
        Key("StudyDate", "STUDY", "DA", "study", _set("S", "R", "U")),
        Key("StudyTime", "STUDY", "TM", "study", _set("R", "U"), _set("S")),
        Key("AccessionNumber", "STUDY", "SH", "study", SWU),
        Key("StudyID", "STUDY", "SH", "study", SWU),
        Key("StudyInstanceUID", "STUDY", "UI", "study", SUL),
        Key("ReferringPhysicianName", "STUDY", "PN", "study", SWU),
        Key("StudyDescription", "STUDY", "LO", "study", SWU),
    )


def _lower_rows() -> tuple[Key, ...]:
    return (
        # Modality: the table prints "S, U"; wildcards are accepted too (D3).
        Key("Modality", "SERIES", "CS", "series", SU, _set("*")),
        Key("SeriesNumber", "SERIES", "IS", "series", SWU),
        Key("SeriesInstanceUID", "SERIES", "UI", "series", SUL),
        Key("OperatorsName", "SERIES", "PN", "series", NONE),
        Key("InstanceNumber", "IMAGE", "IS", "instance", SWU),
        Key("SOPInstanceUID", "IMAGE", "UI", "instance", SUL),
    )


PATIENT_ROOT = InformationModel(
    name="PATIENT_ROOT",
    title="Patient Root",
    table="F.4.2-16",
    find_uid="1.2.840.10008.5.1.4.1.2.1.1",
    move_uid="1.2.840.10008.5.1.4.1.2.1.2",
    levels=("PATIENT", "STUDY", "SERIES", "IMAGE"),
    keys=_rows("PATIENT") + _lower_rows(),
)
STUDY_ROOT = InformationModel(
    name="STUDY_ROOT",
    title="Study Root",
    table="F.4.2-17",
    find_uid="1.2.840.10008.5.1.4.1.2.2.1",
    move_uid="1.2.840.10008.5.1.4.1.2.2.2",
    levels=("STUDY", "SERIES", "IMAGE"),
    keys=_rows("STUDY") + _lower_rows(),
)
PATIENT_STUDY_ONLY = InformationModel(
    name="PATIENT_STUDY_ONLY",
    title="Patient/Study Only",
    table="F.4.2-18",
    find_uid="1.2.840.10008.5.1.4.1.2.3.1",
    move_uid="1.2.840.10008.5.1.4.1.2.3.2",
    levels=("PATIENT", "STUDY"),
    keys=_rows("PATIENT"),
    needs_image_level=False,
)

MODELS: Mapping[str, InformationModel] = {
    m.name: m for m in (PATIENT_ROOT, STUDY_ROOT, PATIENT_STUDY_ONLY)
}
LEVELS: Mapping[str, tuple[Level, ...]] = {name: m.levels for name, m in MODELS.items()}

_BY_UID: Mapping[str, InformationModel] = {
    uid: m for m in MODELS.values() for uid in (m.find_uid, m.move_uid)
}


def model_for_uid(uid: str) -> InformationModel:
    """The model of a FIND or MOVE SOP Class UID; ``KeyError`` for any other UID."""
    return _BY_UID[str(uid)]


def key_table_markdown(model: InformationModel) -> str:
    """The model's key table for the statement, one column per matching type.

    ``Yes`` is a type the sample statement lists; ``Yes (ext.)`` one the archive
    accepts beyond it.
    """
    header = "| Level | Attribute | Tag | VR | " + " | ".join(MATCH_TYPES) + " |"
    lines = [header, "|" + "---|" * (4 + len(MATCH_TYPES))]
    for key in model.keys:
        level = key.level.title() if key.level else "SOP Common"
        cells = []
        for match in MATCH_TYPES:
            if match in key.matching:
                cells.append("Yes")
            elif match in key.extended:
                cells.append("Yes (ext.)")
            else:
                cells.append("")
        lines.append(
            f"| {level} | {key.name} | {key.tag_text} | {key.vr} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)
