"""C-FIND SCP over real associations: every Table F.4.2-19 status, every key type.

The archive is filled by C-STORE over the STORAGE-SCP AE; the queries go to the
QUERY-RETRIEVE-SCP AE, on SQLite and PostgreSQL (the ``suite`` fixture).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import text

from servers.core.runtime import Suite
from servers.query_retrieve import find as find_module
from servers.query_retrieve.find import C_FIND_STATUSES
from servers.query_retrieve.keys import MODELS
from tests.helpers import CT, MR, associate, make_image

VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT = MODELS["PATIENT_ROOT"].find_uid
STUDY_ROOT = MODELS["STUDY_ROOT"].find_uid
PATIENT_STUDY_ONLY = MODELS["PATIENT_STUDY_ONLY"].find_uid
FIND_CLASSES = [PATIENT_ROOT, STUDY_ROOT, PATIENT_STUDY_ONLY]

SUCCESS = C_FIND_STATUSES[0x0000].code
OUT_OF_RESOURCES = C_FIND_STATUSES[0xA700].code
IDENTIFIER_INVALID = C_FIND_STATUSES[0xA900].code
UNABLE_TO_PROCESS = C_FIND_STATUSES[0xC001].code
CANCELLED = C_FIND_STATUSES[0xFE00].code
PENDING = C_FIND_STATUSES[0xFF00].code
PENDING_WARNING = C_FIND_STATUSES[0xFF01].code

# UIDs are fixed so tests can name them.
ST1, ST2, ST3, ST4 = "1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"
SE1, SE2, SE3, SE4, SE5 = "1.2.4.1", "1.2.4.2", "1.2.4.3", "1.2.4.4", "1.2.4.5"
IM1, IM2, IM3, IM4, IM5, IM6 = (f"1.2.5.{n}" for n in range(1, 7))


def archive_images() -> list[Dataset]:
    """Four patients; values chosen so that each matching rule has a hit and a miss."""
    doe: dict[str, Any] = {
        "patient_id": "PAT001",
        "patient_name": "Doe^John^M",
        "PatientBirthDate": "19700101",
        "PatientSex": "M",
        "OtherPatientIDs": "OLD001",
    }
    return [
        make_image(
            CT,
            **doe,
            study_uid=ST1,
            series_uid=SE1,
            sop_uid=IM1,
            study_date="20240105",
            study_time="101500",
            accession="ACC%1",
            StudyID="S1",
            ReferringPhysicianName="Who^Doctor",
            StudyDescription="100% head",
            SeriesNumber=1,
            InstanceNumber=1,
            OperatorsName="Op^One",
        ),
        make_image(
            CT,
            **doe,
            study_uid=ST1,
            series_uid=SE1,
            sop_uid=IM2,
            study_date="20240105",
            study_time="101500",
            accession="ACC%1",
            StudyID="S1",
            ReferringPhysicianName="Who^Doctor",
            StudyDescription="100% head",
            SeriesNumber=1,
            InstanceNumber=12,
            OperatorsName="Op^One",
        ),
        make_image(
            MR,
            **doe,
            study_uid=ST1,
            series_uid=SE2,
            sop_uid=IM3,
            modality="MR",
            study_date="20240105",
            study_time="101500",
            accession="ACC%1",
            StudyID="S1",
            ReferringPhysicianName="Who^Doctor",
            StudyDescription="100% head",
            SeriesNumber=2,
            InstanceNumber=1,
        ),
        make_image(
            CT,
            **doe,
            study_uid=ST2,
            series_uid=SE3,
            sop_uid=IM4,
            study_date="20240210",
            study_time="143000",
            accession="ACCX1",
            StudyID="S2",
            ReferringPhysicianName="Other^Doc",
            StudyDescription="100x head",
            SeriesNumber=1,
            InstanceNumber=1,
        ),
        make_image(
            CT,
            patient_id="PAT_002",
            patient_name="Smith^Anna",
            PatientBirthDate="19851231",
            PatientSex="F",
            study_uid=ST3,
            series_uid=SE4,
            sop_uid=IM5,
            study_date="20231201",
            study_time="0800",
            accession="AC_X",
            StudyID="S3",
            ReferringPhysicianName="",
            StudyDescription="O'Brien study",
            SeriesNumber=3,
            InstanceNumber=1,
        ),
        make_image(
            CT,
            patient_id="PAT003",
            patient_name="Müller^Jürgen",
            PatientBirthDate="",
            PatientSex="",
            study_uid=ST4,
            series_uid=SE5,
            sop_uid=IM6,
            study_date="",
            study_time="",
            accession="ACC4",
            StudyID="S4",
            SpecificCharacterSet="ISO_IR 100",
            ReferringPhysicianName="",
            StudyDescription="unknown date",
            SeriesNumber=1,
            InstanceNumber=1,
        ),
    ]


def store(suite: Suite, images: list[Dataset]) -> None:
    """C-STORE ``images`` to the STORAGE-SCP AE; every one must succeed."""
    classes = sorted({str(ds.SOPClassUID) for ds in images})
    with associate(suite, "storage_scp", classes) as assoc:
        for ds in images:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000, f"C-STORE {ds.SOPInstanceUID}: {status}"


@pytest.fixture
def archive(suite: Suite) -> Suite:
    store(suite, archive_images())
    return suite


@pytest.fixture
def qr(archive: Suite) -> Iterator[Association]:
    with associate(archive, "query_scp", [*FIND_CLASSES, VERIFICATION]) as assoc:
        yield assoc


def identifier(level: str | list[str], **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(
    assoc: Association, model: str, ds: Dataset
) -> tuple[int, list[tuple[int, Dataset]], Dataset]:
    """(final status, [(pending status, identifier)], final status dataset)."""
    pending: list[tuple[int, Dataset]] = []
    final: Dataset | None = None
    for status, ident in assoc.send_c_find(ds, model):
        assert status, "no response (association aborted?)"
        if status.Status in (PENDING, PENDING_WARNING):
            assert ident is not None
            pending.append((int(status.Status), ident))
        else:
            assert ident is None, "a final response carries no identifier"
            final = status
    assert final is not None
    return int(final.Status), pending, final


def values(assoc: Association, model: str, level: str, keyword: str, **keys: Any) -> list[str]:
    """The ``keyword`` values of the matches (requested with zero length if not in keys)."""
    keys.setdefault(keyword, "")
    status, pending, _ = c_find(assoc, model, identifier(level, **keys))
    assert status == SUCCESS
    return [str(ident.get(keyword, "<absent>")) for _, ident in pending]


def offending_elements(status: Dataset) -> list[int]:
    value = status.get("OffendingElement", [])
    return [int(t) for t in value] if isinstance(value, list | MultiValue) else [int(value)]


def echo_ok(assoc: Association) -> None:
    assert assoc.send_c_echo().Status == 0x0000


# --- success and returned attributes ----------------------------------------------------


def test_patient_root_levels_return_requested_keys(qr: Association) -> None:
    status, pending, _ = c_find(
        qr,
        PATIENT_ROOT,
        identifier(
            "PATIENT",
            PatientName="doe*",
            PatientID="",
            PatientBirthDate="",
            PatientSex="",
            OtherPatientIDs="",
            OtherPatientNames="",
        ),
    )
    assert status == SUCCESS
    assert len(pending) == 1
    code, ds = pending[0]
    assert code == PENDING
    assert ds.QueryRetrieveLevel == "PATIENT"
    assert ds.RetrieveAETitle == "EX_QUERY_SCP"
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
        "Doe^John",
        "PAT001",
        "19700101",
        "M",
    )
    assert ds.OtherPatientIDs == "OLD001"
    assert ds.OtherPatientNames == ""  # requested, unknown: zero-length
    assert "StudyDate" not in ds and "SpecificCharacterSet" not in ds

    # STUDY: one response per study of the patient, unique key above returned.
    status, pending, _ = c_find(
        qr,
        PATIENT_ROOT,
        identifier(
            "STUDY",
            PatientID="PAT001",
            StudyInstanceUID="",
            StudyDate="",
            StudyTime="",
            AccessionNumber="",
            StudyID="",
            ReferringPhysicianName="",
            StudyDescription="",
        ),
    )
    assert status == SUCCESS
    studies = [ds for _, ds in pending]
    assert [ds.StudyInstanceUID for ds in studies] == [ST1, ST2]
    assert {code for code, _ in pending} == {PENDING}
    first = studies[0]
    assert first.PatientID == "PAT001"
    assert (first.StudyDate, first.StudyTime, first.AccessionNumber, first.StudyID) == (
        "20240105",
        "101500",
        "ACC%1",
        "S1",
    )
    assert first.ReferringPhysicianName == "Who^Doctor"
    assert first.StudyDescription == "100% head"
    assert "PatientName" not in first

    # SERIES and IMAGE.
    assert values(
        qr,
        PATIENT_ROOT,
        "SERIES",
        "SeriesInstanceUID",
        PatientID="PAT001",
        StudyInstanceUID=ST1,
        Modality="",
        SeriesNumber="",
        OperatorsName="",
    ) == [SE1, SE2]
    status, pending, _ = c_find(
        qr,
        PATIENT_ROOT,
        identifier(
            "IMAGE",
            PatientID="PAT001",
            StudyInstanceUID=ST1,
            SeriesInstanceUID=SE1,
            SOPInstanceUID="",
            InstanceNumber="",
        ),
    )
    assert status == SUCCESS
    assert [(ds.SOPInstanceUID, ds.InstanceNumber) for _, ds in pending] == [
        (IM1, 1),
        (IM2, 12),
    ]
    assert all(ds.SeriesInstanceUID == SE1 and ds.StudyInstanceUID == ST1 for _, ds in pending)


def test_study_root_and_patient_study_only_levels(qr: Association) -> None:
    # Study Root lists patient attributes at STUDY level: matched and returned there.
    status, pending, _ = c_find(
        qr,
        STUDY_ROOT,
        identifier("STUDY", PatientName="", PatientID="PAT001", PatientSex="", StudyInstanceUID=""),
    )
    assert status == SUCCESS
    assert [(ds.StudyInstanceUID, ds.PatientName, ds.PatientSex) for _, ds in pending] == [
        (ST1, "Doe^John", "M"),
        (ST2, "Doe^John", "M"),
    ]
    assert values(qr, STUDY_ROOT, "SERIES", "Modality", StudyInstanceUID=ST1) == ["CT", "MR"]
    assert values(
        qr,
        STUDY_ROOT,
        "IMAGE",
        "SOPInstanceUID",
        StudyInstanceUID=ST1,
        SeriesInstanceUID=SE2,
    ) == [IM3]
    assert values(qr, PATIENT_STUDY_ONLY, "PATIENT", "PatientID", PatientName="S*") == ["PAT_002"]
    assert values(qr, PATIENT_STUDY_ONLY, "STUDY", "StudyInstanceUID", PatientID="PAT_002") == [ST3]
    # No match at all: a lone Success.
    status, pending, _ = c_find(qr, STUDY_ROOT, identifier("STUDY", PatientID="NOBODY"))
    assert (status, pending) == (SUCCESS, [])


# --- matching ---------------------------------------------------------------------------


def test_wildcards_match_sql_metacharacters_literally(qr: Association) -> None:
    def accession(value: str) -> list[str]:
        return values(qr, STUDY_ROOT, "STUDY", "AccessionNumber", AccessionNumber=value)

    # '%' and '_' in a value match only themselves, with or without '*'.
    assert accession("ACC%1") == ["ACC%1"]
    assert accession("ACC%*") == ["ACC%1"]
    assert accession("AC_X") == ["AC_X"]
    assert accession("AC_*") == ["AC_X"]
    assert accession("ACC_1") == []
    assert accession("%") == []
    # '*' and '?' are the DICOM wildcards.
    assert accession("ACC*") == ["ACC%1", "ACCX1", "ACC4"]
    assert accession("ACC?1") == ["ACC%1", "ACCX1"]
    assert accession("*X*") == ["ACCX1", "AC_X"]
    # Quotes and the LIKE escape character are plain characters too.
    assert values(qr, STUDY_ROOT, "STUDY", "StudyDescription", StudyDescription="O'Brien*") == [
        "O'Brien study"
    ]
    assert values(qr, STUDY_ROOT, "STUDY", "StudyDescription", StudyDescription="100% *") == [
        "100% head"
    ]
    assert accession("ACC!1") == []
    # Case-sensitive for non-PN strings (digest D4).
    assert accession("acc*") == []
    assert values(qr, STUDY_ROOT, "STUDY", "StudyID", StudyID="s1") == []
    assert values(qr, STUDY_ROOT, "STUDY", "StudyID", StudyID="S?") == ["S1", "S2", "S3", "S4"]


def test_person_names_match_case_insensitively(qr: Association) -> None:
    def patients(value: str) -> list[str]:
        return values(qr, PATIENT_ROOT, "PATIENT", "PatientID", PatientName=value)

    assert patients("DOE^JOHN") == ["PAT001"]
    assert patients("doe^john^^^") == ["PAT001"]  # trailing '^' ignored
    assert patients("Doe^John^X") == ["PAT001"]  # middle name not kept in the index
    assert patients("DOE") == []  # single value matching compares the whole name
    assert patients("d?e*") == ["PAT001"]
    assert patients("*ANNA") == ["PAT_002"]
    assert patients("MÜLLER*") == ["PAT003"]
    # Referring Physician's Name: PN, case-insensitive; empty stored values match too.
    assert values(
        qr,
        STUDY_ROOT,
        "STUDY",
        "StudyInstanceUID",
        PatientID="PAT001",
        ReferringPhysicianName="WHO^DOCTOR",
    ) == [ST1]


def test_dates_times_and_numbers(qr: Association) -> None:
    def studies(**keys: Any) -> list[str]:
        return values(qr, STUDY_ROOT, "STUDY", "StudyInstanceUID", **keys)

    # ST4 has no Study Date or Time: an unknown value matches every query (D10).
    assert studies(StudyDate="20240105") == [ST1, ST4]
    assert studies(StudyDate="20240101-20240131") == [ST1, ST4]
    assert studies(StudyDate="20240106-") == [ST2, ST4]
    assert studies(StudyDate="-20240105") == [ST1, ST3, ST4]
    assert studies(StudyDate="20250101-") == [ST4]
    assert studies(StudyTime="1000-1100") == [ST1, ST4]
    assert studies(StudyTime="14-") == [ST2, ST4]
    assert studies(StudyTime="-08") == [ST3, ST4]  # 080000 is within hour 08
    assert studies(StudyTime="1015") == [ST1, ST4]  # single value: the minute 10:15
    assert studies(StudyTime="101501") == [ST4]
    # Birth Date: single value; unknown birth dates match as well.
    assert values(
        qr,
        PATIENT_ROOT,
        "PATIENT",
        "PatientID",
        PatientID="PAT*",
        PatientBirthDate="19851231",
    ) == ["PAT_002", "PAT003"]
    # IS keys: single value (numeric form) and lenient wildcards (D1).
    series = {"StudyInstanceUID": ST1}
    assert values(qr, STUDY_ROOT, "SERIES", "SeriesNumber", SeriesNumber="02", **series) == ["2"]
    image = {"StudyInstanceUID": ST1, "SeriesInstanceUID": SE1}
    status, pending, _ = c_find(
        qr,
        STUDY_ROOT,
        raw_identifier(
            "IMAGE",
            StudyInstanceUID=ST1.encode(),
            SeriesInstanceUID=SE1.encode(),
            InstanceNumber=b"1*",
        ),
    )
    assert status == SUCCESS
    assert [str(ds.InstanceNumber) for _, ds in pending] == ["1", "12"]
    assert values(qr, STUDY_ROOT, "IMAGE", "InstanceNumber", InstanceNumber="12", **image) == ["12"]
    # Modality: single value, plus wildcards beyond the table (D3).
    assert values(qr, STUDY_ROOT, "SERIES", "Modality", Modality="MR", **series) == ["MR"]
    assert values(qr, STUDY_ROOT, "SERIES", "Modality", Modality="?T", **series) == ["CT"]


def test_uid_single_values_and_lists(qr: Association) -> None:
    assert values(
        qr, STUDY_ROOT, "STUDY", "StudyInstanceUID", StudyInstanceUID=[ST1, ST3, "9.9"]
    ) == [ST1, ST3]
    assert values(qr, STUDY_ROOT, "STUDY", "StudyInstanceUID", StudyInstanceUID=ST2) == [ST2]
    assert values(
        qr,
        PATIENT_ROOT,
        "SERIES",
        "SeriesInstanceUID",
        PatientID="PAT001",
        StudyInstanceUID=ST1,
        SeriesInstanceUID=f"{SE2}\\{SE4}",
    ) == [SE2]
    assert values(
        qr,
        STUDY_ROOT,
        "IMAGE",
        "SOPInstanceUID",
        StudyInstanceUID=ST1,
        SeriesInstanceUID=SE1,
        SOPInstanceUID=[IM2, IM3],
    ) == [IM2]


def test_patient_sex_unknown_is_returned_empty_and_matches_all(qr: Association) -> None:
    def sexes(value: str) -> list[tuple[str, str]]:
        status, pending, _ = c_find(
            qr,
            PATIENT_ROOT,
            identifier("PATIENT", PatientName="*", PatientID="PAT*", PatientSex=value),
        )
        assert status == SUCCESS
        return [(ds.PatientID, ds.PatientSex) for _, ds in pending]

    assert sexes("") == [("PAT001", "M"), ("PAT_002", "F"), ("PAT003", "")]
    assert sexes("F") == [("PAT_002", "F"), ("PAT003", "")]
    assert sexes("U") == [("PAT003", "")]


def test_latin1_values_carry_specific_character_set(qr: Association) -> None:
    status, pending, _ = c_find(
        qr, PATIENT_ROOT, identifier("PATIENT", PatientName="m*", PatientID="")
    )
    assert status == SUCCESS
    [(code, ds)] = pending
    assert code == PENDING
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.PatientName == "Müller^Jürgen"
    # A query value in ISO_IR 100 is decoded before matching.
    ds = identifier("PATIENT", PatientID="")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "müller^jürgen"
    status, pending, _ = c_find(qr, PATIENT_ROOT, ds)
    assert (status, [d.PatientID for _, d in pending]) == (SUCCESS, ["PAT003"])
    # Requested but not needed: returned zero-length.
    ds = identifier("PATIENT", PatientName="Smith*", SpecificCharacterSet="")
    status, pending, _ = c_find(qr, PATIENT_ROOT, ds)
    assert status == SUCCESS
    assert pending[0][1].SpecificCharacterSet == ""


def test_value_outside_latin1_is_returned_empty_with_ff01(suite: Suite) -> None:
    ds = make_image(CT, patient_id="PAT_RU", patient_name="Иванов^Иван")
    ds.SpecificCharacterSet = "ISO_IR 192"
    store(suite, [ds])
    with associate(suite, "query_scp", [PATIENT_ROOT]) as assoc:
        status, pending, _ = c_find(
            assoc, PATIENT_ROOT, identifier("PATIENT", PatientID="PAT_RU", PatientName="")
        )
        assert status == SUCCESS
        [(code, ident)] = pending
        assert code == PENDING_WARNING
        assert ident.PatientName == ""


# --- failure statuses -------------------------------------------------------------------


def test_a900_identifier_does_not_match_sop_class(qr: Association) -> None:
    no_level = Dataset()
    no_level.PatientID = "PAT001"
    cases: list[tuple[str, Dataset, int | None]] = [
        (PATIENT_ROOT, no_level, 0x00080052),
        (PATIENT_ROOT, identifier("FRAME", PatientID="PAT001"), 0x00080052),
        (PATIENT_ROOT, identifier(["PATIENT", "STUDY"], PatientID="PAT001"), 0x00080052),
        (STUDY_ROOT, identifier("PATIENT", PatientID="PAT001"), 0x00080052),
        (
            PATIENT_STUDY_ONLY,
            identifier("SERIES", PatientID="PAT001", StudyInstanceUID=ST1),
            0x00080052,
        ),
        # Unique keys above the query level: missing, empty, wildcard, list.
        (PATIENT_ROOT, identifier("STUDY", StudyDate="20240105"), 0x00100020),
        (PATIENT_ROOT, identifier("STUDY", PatientID=""), 0x00100020),
        (PATIENT_ROOT, identifier("STUDY", PatientID="PAT*"), 0x00100020),
        (STUDY_ROOT, identifier("SERIES", StudyInstanceUID=[ST1, ST2]), 0x0020000D),
        (STUDY_ROOT, identifier("IMAGE", StudyInstanceUID=ST1), 0x0020000E),
        # Invalid values.
        (STUDY_ROOT, identifier("STUDY", StudyDate="2024.01.05"), 0x00080020),
        (STUDY_ROOT, identifier("STUDY", StudyDate="20240230"), 0x00080020),
        (STUDY_ROOT, identifier("STUDY", StudyDate="2024*"), 0x00080020),
        (STUDY_ROOT, identifier("STUDY", StudyDate="-"), 0x00080020),
        (STUDY_ROOT, identifier("STUDY", PatientID="X", StudyTime="25"), 0x00080030),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.2.*"), 0x0020000D),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.02.3"), 0x0020000D),
        (
            STUDY_ROOT,
            raw_identifier("SERIES", StudyInstanceUID=ST1.encode(), SeriesNumber=b"x1"),
            0x00200011,
        ),
        (
            STUDY_ROOT,
            raw_identifier("STUDY", PatientID=b"PAT001", StudyDate=b"2024\xe9"),
            0x00080020,
        ),
        # A list outside the query level's unique key.
        (STUDY_ROOT, identifier("STUDY", AccessionNumber=["A", "B"]), 0x00080050),
    ]
    for model, ds, offending in cases:
        status, pending, final = c_find(qr, model, ds)
        assert (status, pending) == (IDENTIFIER_INVALID, []), (ds, final)
        assert final.ErrorComment
        if offending is not None:
            assert offending in offending_elements(final), (ds, final)
    echo_ok(qr)
    assert values(qr, STUDY_ROOT, "STUDY", "StudyInstanceUID", StudyDate="20240210") == [
        ST2,
        ST4,
    ]


def test_c001_partial_value_rules(qr: Association) -> None:
    cases = [
        (PATIENT_ROOT, identifier("PATIENT", PatientName="", PatientID="")),
        (PATIENT_ROOT, identifier("PATIENT", PatientID="")),  # name absent, ID empty
        (PATIENT_ROOT, identifier("PATIENT", PatientID="*", PatientBirthDate="19700101")),
        (PATIENT_STUDY_ONLY, identifier("PATIENT", PatientName="**")),
        (STUDY_ROOT, identifier("STUDY", PatientName="", StudyDate="", PatientSex="M")),
        (STUDY_ROOT, identifier("STUDY", StudyDescription="*", PatientBirthDate="19700101")),
    ]
    for model, ds in cases:
        status, pending, _ = c_find(qr, model, ds)
        assert (status, pending) == (UNABLE_TO_PROCESS, []), ds
    # A single partial value is enough.
    assert values(qr, PATIENT_ROOT, "PATIENT", "PatientID", PatientID="PAT00?") == [
        "PAT001",
        "PAT003",
    ]
    assert values(qr, STUDY_ROOT, "STUDY", "StudyInstanceUID", StudyDescription="100*") == [
        ST1,
        ST2,
    ]
    echo_ok(qr)


def raw_identifier(level: str, charset: str | None = None, **raw: bytes) -> Dataset:
    """An identifier whose ``raw`` values go on the wire byte for byte (pydicom would
    otherwise validate or re-encode them)."""
    ds = identifier(level)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    for keyword, value in raw.items():
        if len(value) % 2:
            value += b" "
        tag = Tag(keyword)
        ds._dict[tag] = RawDataElement(tag, None, len(value), value, 0, True, True)
    ds.set_original_encoding(True, True, ds._character_set)
    return ds


def test_c001_for_undecodable_character_sets(qr: Association) -> None:
    # Bytes that are not UTF-8 under ISO_IR 192.
    ds = raw_identifier("PATIENT", "ISO_IR 192", PatientName=b"M\xfcller*")
    status, pending, final = c_find(qr, PATIENT_ROOT, ds)
    assert (status, pending) == (UNABLE_TO_PROCESS, [])
    assert 0x00100010 in offending_elements(final)
    # A character set nobody can decode, with a value that needs it.
    ds = raw_identifier("PATIENT", "ISO_IR 999", PatientName=b"M\xfcller*")
    status, pending, _ = c_find(qr, PATIENT_ROOT, ds)
    assert (status, pending) == (UNABLE_TO_PROCESS, [])
    # The same unknown set with ASCII values only is harmless.
    ds = identifier("PATIENT", PatientName="SMITH*")
    ds.SpecificCharacterSet = "ISO_IR 999"
    status, pending, _ = c_find(qr, PATIENT_ROOT, ds)
    assert (status, len(pending)) == (SUCCESS, 1)
    echo_ok(qr)


def test_ff01_when_optional_keys_are_not_supported(qr: Association) -> None:
    base = {"PatientID": "PAT001"}

    def statuses(level: str, model: str = PATIENT_ROOT, **keys: Any) -> tuple[set[int], Dataset]:
        status, pending, _ = c_find(qr, model, identifier(level, **keys))
        assert status == SUCCESS and pending
        return {code for code, _ in pending}, pending[0][1]

    # Baseline: every key supported.
    assert statuses("PATIENT", **base, PatientBirthDate="19700101")[0] == {PENDING}
    # Not in the table: not returned.
    codes, ds = statuses("PATIENT", **base, EthnicGroup="", IssuerOfPatientID="")
    assert codes == {PENDING_WARNING}
    assert "EthnicGroup" not in ds and ds.QueryRetrieveLevel == "PATIENT"
    # A sequence.
    seq = identifier("PATIENT", **base)
    seq.OtherPatientIDsSequence = [Dataset()]
    status, pending, _ = c_find(qr, PATIENT_ROOT, seq)
    assert status == SUCCESS and {c for c, _ in pending} == {PENDING_WARNING}
    # A key below the query level: ignored and not returned.
    codes, ds = statuses("PATIENT", **base, StudyDate="19000101")
    assert codes == {PENDING_WARNING} and "StudyDate" not in ds
    # A non-unique key above the query level.
    codes, ds = statuses("STUDY", **base, PatientName="nobody")
    assert codes == {PENDING_WARNING} and "PatientName" not in ds
    # A NONE key with a value: the value is ignored, the stored one returned.
    codes, ds = statuses("PATIENT", **base, OtherPatientIDs="NOPE")
    assert codes == {PENDING_WARNING} and ds.OtherPatientIDs == "OLD001"
    codes, ds = statuses(
        "SERIES",
        model=STUDY_ROOT,
        StudyInstanceUID=ST1,
        SeriesNumber="1",
        OperatorsName="X*",
    )
    assert codes == {PENDING_WARNING} and ds.OperatorsName == "Op^One"
    # Birth Date range or wildcard, Sex wildcard: universal, FF01.
    for birth in ("19000101-19100101", "1970*"):
        codes, ds = statuses("PATIENT", **base, PatientBirthDate=birth)
        assert codes == {PENDING_WARNING} and ds.PatientBirthDate == "19700101"
    codes, ds = statuses("PATIENT", **base, PatientSex="F*")
    assert codes == {PENDING_WARNING} and ds.PatientSex == "M"
    # Specific Character Set and Retrieve AE Title never cause FF01.
    codes, _ = statuses("PATIENT", **base, SpecificCharacterSet="ISO_IR 100", RetrieveAETitle="")
    assert codes == {PENDING}
    echo_ok(qr)


def test_a700_when_the_database_is_broken(archive: Suite) -> None:
    with associate(archive, "query_scp", [STUDY_ROOT, VERIFICATION]) as assoc:
        with archive.db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE study RENAME TO study_broken"))
        try:
            status, pending, _ = c_find(assoc, STUDY_ROOT, identifier("STUDY", PatientID="PAT001"))
            assert (status, pending) == (OUT_OF_RESOURCES, [])
            echo_ok(assoc)
        finally:
            with archive.db.engine.begin() as conn:
                conn.execute(text("ALTER TABLE study_broken RENAME TO study"))
        # Repaired, the same association answers again.
        assert values(assoc, STUDY_ROOT, "STUDY", "StudyInstanceUID", PatientID="PAT001") == [
            ST1,
            ST2,
        ]


def test_fe00_cancel_stops_the_search(archive: Suite, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = threading.Event()

    def wait_for_cancel(is_cancelled: Any) -> None:
        # Hold the search after the first match until the C-CANCEL has arrived, so the
        # test does not depend on how fast responses are sent.
        for _ in range(200):
            if is_cancelled():
                seen.set()
                return
            threading.Event().wait(0.05)

    monkeypatch.setattr(find_module, "between_matches", wait_for_cancel)
    with associate(archive, "query_scp", [PATIENT_ROOT, VERIFICATION]) as assoc:
        ds = identifier(
            "IMAGE",
            PatientID="PAT001",
            StudyInstanceUID=ST1,
            SeriesInstanceUID=SE1,
            SOPInstanceUID="",
        )
        responses = assoc.send_c_find(ds, PATIENT_ROOT, msg_id=7)
        status, first = next(responses)
        assert status.Status == PENDING and first is not None and first.SOPInstanceUID == IM1
        context_id = assoc._get_valid_context(PATIENT_ROOT, "", "scu").context_id
        assoc.send_c_cancel(7, context_id)
        rest = [(s.Status, i) for s, i in responses]
        assert seen.is_set()
        assert rest == [(CANCELLED, None)]
        echo_ok(assoc)
        # A cancel for a finished request changes nothing.
        assoc.send_c_cancel(7, context_id)
        monkeypatch.setattr(find_module, "between_matches", lambda is_cancelled: None)
        assert values(
            assoc,
            PATIENT_ROOT,
            "IMAGE",
            "SOPInstanceUID",
            PatientID="PAT001",
            StudyInstanceUID=ST1,
            SeriesInstanceUID=SE1,
        ) == [IM1, IM2]


# --- negotiation ------------------------------------------------------------------------


def test_image_level_off_accepts_only_patient_study_only(make_suite: Any) -> None:
    suite = make_suite({"services": {"query_retrieve": {"image_level": False}}})
    declaration = suite.declarations["query_retrieve"]
    assert set(declaration.sop_classes) == {
        MODELS["PATIENT_STUDY_ONLY"].find_uid,
        MODELS["PATIENT_STUDY_ONLY"].move_uid,
    }
    assert declaration.settings["image_level"] is False
    ae = AE(ae_title="TEST_SCU")
    for uid in (PATIENT_ROOT, STUDY_ROOT, PATIENT_STUDY_ONLY):
        ae.add_requested_context(uid)
    assoc = ae.associate(
        "127.0.0.1", suite.port_of("query_scp"), ae_title=suite.config.ae("query_scp").title
    )
    try:
        assert assoc.is_established
        results = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert results == {PATIENT_ROOT: 3, STUDY_ROOT: 3}
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [PATIENT_STUDY_ONLY]
    finally:
        assoc.release()
        ae.shutdown()


def test_find_contexts_accept_implicit_vr_only(suite: Suite) -> None:
    declaration = suite.declarations["query_retrieve"]
    assert len(declaration.accepted) == 6
    assert {row.transfer_syntaxes for row in declaration.accepted} == {("1.2.840.10008.1.2",)}
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(PATIENT_ROOT, ["1.2.840.10008.1.2.1"])
    ae.add_requested_context(STUDY_ROOT, ["1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", suite.port_of("query_scp"), ae_title="EX_QUERY_SCP")
    try:
        assert assoc.is_established
        assert [(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts] == [
            (PATIENT_ROOT, 4)
        ]
    finally:
        assoc.release()
        ae.shutdown()


# --- statement --------------------------------------------------------------------------


def test_statement_tables_come_from_the_key_tables(suite: Suite) -> None:
    declaration = suite.declarations["query_retrieve"]
    titles = [section.title for section in declaration.statement]
    for model in MODELS.values():
        title = f"C-FIND: {model.title} keys (Table {model.table})"
        assert title in titles
        body = declaration.statement[titles.index(title)].body
        # One table row per key, with its tag.
        for key in model.keys:
            assert f"| {key.tag_text} | {key.vr} |" in body
    assert declaration.statuses["C-FIND"] is C_FIND_STATUSES


# --- DCMTK -------------------------------------------------------------------------------


def test_findscu_patient_and_study_root(archive: Suite, dcmtk: Any) -> None:
    findscu = dcmtk("findscu")
    port = str(archive.port_of("query_scp"))
    common = [findscu, "-aet", "DCMTK_SCU", "-aec", "EX_QUERY_SCP", "127.0.0.1", port]
    out = subprocess.run(
        [
            *common,
            "-P",
            "-k",
            "QueryRetrieveLevel=PATIENT",
            "-k",
            "PatientName=DOE*",
            "-k",
            "PatientID",
            "-k",
            "PatientSex",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    log = out.stdout + out.stderr
    assert "PAT001" in log and "Doe^John" in log
    assert "EX_QUERY_SCP" in log  # Retrieve AE Title, returned unrequested
    assert "PAT_002" not in log
    out = subprocess.run(
        [
            *common,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "AccessionNumber=AC_*",
            "-k",
            "StudyInstanceUID",
            "-k",
            "SOPClassesInStudy",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    log = out.stdout + out.stderr
    assert ST3 in log and ST1 not in log
    assert "Pending: WarningUnsupportedOptionalKeys" in log  # FF01: SOPClassesInStudy
    with associate(archive, "query_scp", [VERIFICATION]) as assoc:
        echo_ok(assoc)


# --- pending identifiers encoded without pydicom -----------------------------------------


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("charset_requested", [False, True])
def test_encoded_identifier_is_what_pydicom_writes(implicit: bool, charset_requested: bool) -> None:
    from pynetdicom.dsutils import encode

    model = MODELS["PATIENT_ROOT"]
    query = find_module.FindQuery(
        model, "STUDY", returned=list(model.keys[1:14]), charset_requested=charset_requested
    )
    matches: list[dict[str, str]] = [
        {},
        {"PatientName": "Doe^John", "PatientID": "P1", "PatientSex": "U", "StudyDate": "20240101"},
        {"PatientName": "Müller^Jörg", "StudyInstanceUID": "1.2.3", "StudyTime": "101500.5"},
        {"PatientName": "Иванов", "PatientID": "ODD", "OtherPatientIDs": "A\\BC"},
        {"StudyDescription": "odd", "AccessionNumber": "A1", "PatientSex": "F"},
    ]
    for match in matches:
        template = find_module.ResponseTemplate.create(query, "QR_AE", implicit)
        encoded, dropped = template.encode(match)
        reference, reference_dropped = find_module.build_response(query, match, "QR_AE")
        assert encoded == encode(reference, implicit, True), match
        assert dropped == reference_dropped


def test_pending_sender_fragments_to_the_peer_maximum() -> None:
    from pydicom.filereader import read_dataset
    from pynetdicom.dimse_messages import C_FIND_RSP

    from servers.query_retrieve.find_scp import PendingSender

    sent: list[Any] = []

    class Fake:
        dul = type("Dul", (), {"send_pdu": staticmethod(sent.append)})()
        dimse = type("Dimse", (), {"maximum_pdu_size": 64})()

    identifier = find_module.encode_elements([(0x00100020, "LO", b"X" * 151)], implicit=True)
    # 64: command (80 bytes) and identifier (160) each fragmented; otherwise one PDU.
    for max_pdu, pdus in ((64, 2 + 3), (0, 1), (16384, 1)):
        sent.clear()
        Fake.dimse.maximum_pdu_size = max_pdu
        PendingSender(Fake(), 1, STUDY_ROOT, 9).send(PENDING, identifier)
        assert len(sent) == pdus
        for pdata in sent:
            # A PDV item is 4 length bytes, the context ID, then header byte and data.
            size = sum(4 + 1 + len(data) for _, data in pdata.presentation_data_value_list)
            assert size <= (max_pdu or size)
        message = C_FIND_RSP()
        for pdata in sent:
            complete = message.decode_msg(pdata)
        assert complete
        cs = message.command_set
        assert (cs.CommandField, cs.MessageIDBeingRespondedTo, cs.Status) == (0x8020, 9, PENDING)
        assert cs.AffectedSOPClassUID == STUDY_ROOT and cs.CommandDataSetType == 1
        assert message.data_set is not None
        data = message.data_set.getvalue()
        assert data == identifier
        assert read_dataset(BytesIO(data), True, True).PatientID == "X" * 151
