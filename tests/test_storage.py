"""Storage SCP (C-STORE) over real associations, on SQLite and PostgreSQL.

Every row of the C-STORE status table (Annex F Table F.4.2-31) is provoked with
its exact code; after each failure nothing is left in the store or the index
and the server keeps serving.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from sqlalchemy import func, select

from db.models import Instance, Patient, Series, Study
from db.queries.ingest import StoredFacts, index_instance, record_from_dataset
from servers.core import config as config_mod
from servers.core.declaration import StartupError
from servers.core.runtime import Suite
from servers.core.transfer_syntax import JPEG_BASELINE
from servers.storage import declaration, encoding
from servers.storage import scp as storage_scp
from storage import filestore
from tests.helpers import (
    CT,
    MR,
    NM_RETIRED,
    SC,
    US_RETIRED,
    associate,
    make_image,
    request_association,
    write_part10,
)

VERIFICATION = "1.2.840.10008.1.1"
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
STORE_PATH = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm$")


# -- helpers -----------------------------------------------------------------


def send_raw(
    assoc: Association,
    sop_class: str,
    sop_instance: str,
    data: bytes,
    transfer_syntax: str | None = None,
) -> Dataset:
    """Send a C-STORE-RQ whose data set is ``data`` verbatim; return the response status.

    This is what ``Association.send_c_store`` does after encoding, minus the encoding,
    so that unparseable or hand-made bytes reach the SCP unchanged.
    """
    context = next(
        cx
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class
        and (transfer_syntax is None or cx.transfer_syntax[0] == transfer_syntax)
    )
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(data)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assert context.context_id is not None
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert isinstance(rsp, C_STORE), "no C-STORE-RSP"
    status = Dataset()
    status.Status = rsp.Status
    if rsp.OffendingElement is not None:
        status.OffendingElement = rsp.OffendingElement
    if rsp.ErrorComment is not None:
        status.ErrorComment = rsp.ErrorComment
    assert rsp.AffectedSOPInstanceUID == sop_instance
    return status


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    data = encode(ds, implicit, True)
    assert data is not None
    return data


def store(suite: Suite, ds: Dataset, implicit: bool = False, **kwargs: Any) -> Dataset:
    """Store ``ds`` over a fresh association in one uncompressed transfer syntax."""
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    with associate(suite, "storage_scp", [(ds.SOPClassUID, [ts])], **kwargs) as assoc:
        return send_raw(assoc, ds.SOPClassUID, ds.SOPInstanceUID, encoded(ds, implicit))


def files_in(suite: Suite) -> list[Path]:
    """Every file under the store, temporary ones included."""
    return sorted(p for p in suite.store.root.rglob("*") if p.is_file())


def counts(suite: Suite) -> tuple[int, int, int, int]:
    with suite.db.read() as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Patient, Study, Series, Instance)
        )


def instances(suite: Suite) -> list[Instance]:
    with suite.db.read() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def assert_still_serving(suite: Suite) -> None:
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
    assert store(suite, make_image()).Status == 0x0000


def assert_nothing_kept_then_serving(suite: Suite) -> None:
    assert files_in(suite) == []
    assert counts(suite) == (0, 0, 0, 0)
    assert_still_serving(suite)


def split_part10(path: Path) -> tuple[Dataset, bytes]:
    """File Meta Information and the data set bytes that follow it."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    meta = dcmread(path, stop_before_pixels=True).file_meta
    group_length = int(meta.FileMetaInformationGroupLength)
    # Preamble, DICM, then the group length element itself (12 bytes) and the group.
    return meta, raw[132 + 12 + group_length :]


# -- Success, what is kept ---------------------------------------------------


def test_success_keeps_received_bytes_and_indexes(suite: Suite) -> None:
    ds = make_image(
        patient_name="Doe, Jane",
        PatientSex="f",
        study_time="1015",
        SeriesNumber="007",
    )
    ds.add_new(0x00091010, "LO", "PRIVATE VALUE")
    data = encoded(ds, implicit=False)
    with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
        assert send_raw(assoc, CT, ds.SOPInstanceUID, data).Status == 0x0000
    [path] = files_in(suite)
    meta, body = split_part10(path)
    assert body == data  # bit-preserving
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == CT
    ae = suite.config.ae("storage_scp")
    assert meta.ImplementationClassUID == ae.implementation_class_uid
    assert meta.ImplementationVersionName == ae.implementation_version_name
    assert meta.SourceApplicationEntityTitle == "TEST_SCU"
    [row] = instances(suite)
    assert row.file_path == path.relative_to(suite.store.root).as_posix()
    assert STORE_PATH.match(row.file_path)
    assert suite.store.verify(row.file_path, row.sha256)
    assert row.file_size == path.stat().st_size
    assert (row.sop_instance_uid, row.received_sop_instance_uid) == (ds.SOPInstanceUID,) * 2
    assert row.source_ae == "TEST_SCU"
    assert row.transfer_syntax_uid == ExplicitVRLittleEndian
    with suite.db.read() as session:
        patient = session.scalars(select(Patient)).one()
        study = session.scalars(select(Study)).one()
        series = session.scalars(select(Series)).one()
    assert (patient.patient_name, patient.patient_name_key) == ("Doe^Jane", "doe^jane")
    assert (patient.family_name, patient.given_name, patient.sex) == ("Doe", "Jane", "F")
    assert patient.patient_id == patient.received_patient_id == "PAT001"
    assert (study.study_time, study.study_date, study.accession_number) == (
        "101500",
        "20240105",
        "ACC001",
    )
    assert study.referring_physician_name == "WHO^DOCTOR"
    assert (series.series_number, series.modality, row.instance_number) == ("7", "CT", "1")


def test_implicit_vr_store_keeps_transfer_syntax(suite: Suite) -> None:
    ds = make_image(MR, modality="MR")
    data = encoded(ds, implicit=True)
    with associate(suite, "storage_scp", [(MR, [ImplicitVRLittleEndian])]) as assoc:
        assert send_raw(assoc, MR, ds.SOPInstanceUID, data).Status == 0x0000
    [path] = files_in(suite)
    meta, body = split_part10(path)
    assert body == data
    assert meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert dcmread(path).PatientName == "DOE^JOHN"


@pytest.mark.parametrize(
    ("sop_class", "modality"), [(US_RETIRED, "US"), ("1.2.840.10008.5.1.4.1.1.3", "US")]
)
def test_retired_us_classes_store(suite: Suite, sop_class: str, modality: str) -> None:
    ds = make_image(sop_class, modality=modality)
    assert store(suite, ds).Status == 0x0000
    [row] = instances(suite)
    assert row.sop_class_uid == sop_class


def test_retired_nm_stores_with_implicit_only(suite: Suite) -> None:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(NM_RETIRED, [ExplicitVRLittleEndian])
    assoc = request_association(
        ae, "127.0.0.1", suite.port_of("storage_scp"), ae_title=suite.config.ae("storage_scp").title
    )
    # Explicit VR is not listed for NM (Retired): the only context is rejected (B1).
    assert assoc.is_rejected
    ae.shutdown()
    ds = make_image(NM_RETIRED, modality="NM")
    assert store(suite, ds, implicit=True).Status == 0x0000
    assert counts(suite)[3] == 1


def test_nm_retired_switch_off(make_suite: Any) -> None:
    suite = make_suite({"services": {"storage": {"nm_retired": False}}})
    with associate(suite, "storage_scp", [VERIFICATION, (NM_RETIRED, UNCOMPRESSED)]) as assoc:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [VERIFICATION]


# -- transfer syntax selection -----------------------------------------------


def _accepted(suite: Suite, contexts: list[tuple[str, list[str]]]) -> list[str | None]:
    with associate(suite, "storage_scp", [VERIFICATION, *contexts]) as assoc:
        by_id = {cx.context_id: cx for cx in assoc.accepted_contexts}
        rq_ids = [cx.context_id for cx in assoc.requestor.requested_contexts][1:]
        return [by_id[i].transfer_syntax[0] if i in by_id else None for i in rq_ids]


def test_default_transfer_syntax_preference(suite: Suite) -> None:
    assert _accepted(
        suite,
        [
            (CT, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
            (CT, [JPEG_BASELINE, ImplicitVRLittleEndian]),
            (SC, [ImplicitVRLittleEndian, JPEG_BASELINE]),
            (CT, [JPEG_BASELINE]),
        ],
    ) == [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG_BASELINE, None]


def test_configured_transfer_syntax_preference(make_suite: Any) -> None:
    suite = make_suite(
        {
            "services": {
                "storage": {
                    "transfer_syntax_preference": [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
                }
            }
        }
    )
    assert _accepted(
        suite,
        [
            (CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
            (SC, [JPEG_BASELINE, ExplicitVRLittleEndian]),
            (SC, [JPEG_BASELINE]),
        ],
    ) == [ImplicitVRLittleEndian, ExplicitVRLittleEndian, None]


def _config(storage: dict[str, Any]) -> config_mod.Config:
    return config_mod.load(path=None, environ={}, overrides={"services": {"storage": storage}})


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"transfer_syntax_preference": [ExplicitVRLittleEndian]}, "must include Implicit"),
        ({"transfer_syntax_preference": ["1.2.840.10008.1.2.4.70"]}, "allowed"),
        ({"duplicate_policy": "keep_both"}, "duplicate_policy"),
        ({"extra_sop_classes": [CT]}, "extra_sop_classes"),
        ({"colour": "blue"}, "unknown settings"),
    ],
)
def test_bad_settings_stop_startup(storage: dict[str, Any], message: str) -> None:
    with pytest.raises(StartupError, match=message):
        declaration(_config(storage))


def test_declaration_matches_table_f_4_2_30() -> None:
    decl = declaration(_config({}))
    rows = {row.abstract_syntax: row.transfer_syntaxes for row in decl.accepted}
    jpeg = (JPEG_BASELINE, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    plain = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert rows == {
        US_RETIRED: jpeg,
        "1.2.840.10008.5.1.4.1.1.6.1": jpeg,
        "1.2.840.10008.5.1.4.1.1.3": jpeg,
        "1.2.840.10008.5.1.4.1.1.3.1": jpeg,
        "1.2.840.10008.5.1.4.1.1.1": plain,
        CT: plain,
        MR: plain,
        NM_RETIRED: (ImplicitVRLittleEndian,),
        SC: jpeg,
    }
    assert set(decl.service_classes) == {US_RETIRED, "1.2.840.10008.5.1.4.1.1.3", NM_RETIRED}
    assert sorted(decl.statuses["C-STORE"].codes) == [0x0000, 0xA700, 0xA900, 0xB000, 0xC000]


def test_extra_sop_class_is_accepted_and_stored(make_suite: Any) -> None:
    enhanced_ct = "1.2.840.10008.5.1.4.1.1.2.1"
    suite = make_suite({"services": {"storage": {"extra_sop_classes": [enhanced_ct]}}})
    assert store(suite, make_image(enhanced_ct)).Status == 0x0000
    # Still an image class: Pixel Data is required.
    bad = make_image(enhanced_ct)
    del bad.PixelData
    assert store(suite, bad).Status == 0xA900


# -- failures: A700, A900, C000 ----------------------------------------------


def test_no_space_is_a700_and_nothing_kept(make_suite: Any) -> None:
    suite = make_suite({"services": {"storage": {"min_free_bytes": 10**18}}})
    assert store(suite, make_image()).Status == 0xA700
    assert files_in(suite) == []
    assert counts(suite) == (0, 0, 0, 0)
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
    # The threshold can be lowered at run time (it is the FileStore's); then stores work.
    suite.store.min_free_bytes = 0
    assert store(suite, make_image()).Status == 0x0000


def test_index_failure_is_a700_and_file_removed(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(storage_scp, "index_instance", broken)
    assert store(suite, make_image()).Status == 0xA700
    assert files_in(suite) == []
    monkeypatch.undo()
    assert_nothing_kept_then_serving(suite)


def _without(keyword: str) -> Dataset:
    ds = make_image()
    delattr(ds, keyword)
    return ds


def _empty(keyword: str) -> Dataset:
    ds = make_image()
    setattr(ds, keyword, "")
    return ds


@pytest.mark.parametrize(
    "ds",
    [
        pytest.param(_without("StudyInstanceUID"), id="no-study-uid"),
        pytest.param(_empty("SeriesInstanceUID"), id="empty-series-uid"),
        pytest.param(_without("PixelData"), id="no-pixel-data"),
        pytest.param(_without("Rows"), id="no-rows"),
        pytest.param(_without("PhotometricInterpretation"), id="no-photometric"),
        pytest.param(make_image(MR), id="sop-class-mismatch"),
    ],
)
def test_data_set_not_matching_sop_class_is_a900(suite: Suite, ds: Dataset) -> None:
    with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
        # Always on the CT context: the MR data set mismatches the command's class.
        assert send_raw(assoc, CT, ds.SOPInstanceUID, encoded(ds)).Status == 0xA900
    assert_nothing_kept_then_serving(suite)


def test_sop_instance_uid_mismatch_and_overlong_uid_are_a900(suite: Suite) -> None:
    ds = make_image()
    with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
        assert send_raw(assoc, CT, generate_uid(), encoded(ds)).Status == 0xA900
        long_uid = "1." + "2" * 98
        ds.SOPInstanceUID = long_uid
        # The command cannot carry a 100-character UID; the data set can.
        assert send_raw(assoc, CT, "1.2.3", encoded(ds)).Status == 0xA900
    assert_nothing_kept_then_serving(suite)


@pytest.mark.parametrize(
    ("data", "implicit"),
    [
        pytest.param(b"garbage!" * 10, True, id="garbage-implicit"),
        pytest.param(b"garbage!" * 10, False, id="garbage-explicit"),
        pytest.param(b"\x08\x00\x18\x00\x40\x00\x00\x001.2\x00", True, id="value-past-end"),
        pytest.param(b"\x08\x00\x18\x00UI", False, id="truncated-header"),
        pytest.param(
            b"\x08\x00\x11\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff",
            False,
            id="unclosed-sequence",
        ),
    ],
)
def test_unparseable_data_set_is_c000(suite: Suite, data: bytes, implicit: bool) -> None:
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    with associate(suite, "storage_scp", [(CT, [ts])]) as assoc:
        assert send_raw(assoc, CT, generate_uid(), data).Status == 0xC000
        # The same association keeps working.
        ds = make_image()
        assert send_raw(assoc, CT, ds.SOPInstanceUID, encoded(ds, implicit)).Status == 0x0000
    assert len(files_in(suite)) == 1
    assert counts(suite)[3] == 1
    assert_still_serving(suite)


def test_undecodable_value_is_c000(suite: Suite) -> None:
    ds = make_image()
    rows = b"\x28\x00\x10\x00US\x02\x00\x04\x00"
    data = encoded(ds)
    assert data.count(rows) == 1
    # Structurally complete, but a US value of three bytes cannot be decoded.
    data = data.replace(rows, b"\x28\x00\x10\x00US\x03\x00\x04\x00\x00")
    with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
        assert send_raw(assoc, CT, ds.SOPInstanceUID, data).Status == 0xC000
    assert_nothing_kept_then_serving(suite)


# -- duplicates and coercion -------------------------------------------------


def test_duplicate_gets_new_uid_by_default(suite: Suite) -> None:
    ds = make_image()
    data = encoded(ds)
    assert store(suite, ds).Status == 0x0000
    assert store(suite, ds).Status == 0x0000  # B000 is off by default
    first, second = instances(suite)
    assert first.sop_instance_uid == ds.SOPInstanceUID
    assert second.sop_instance_uid != ds.SOPInstanceUID
    assert second.sop_instance_uid.startswith("2.25.")
    assert second.received_sop_instance_uid == ds.SOPInstanceUID
    path = suite.store.path(second.file_path)
    stored = dcmread(path)
    assert stored.SOPInstanceUID == second.sop_instance_uid
    assert stored.file_meta.MediaStorageSOPInstanceUID == second.sop_instance_uid
    assert stored.PixelData == ds.PixelData
    # Only the UID element changed: the body is the original encoding with the new UID.
    _, body = split_part10(path)
    ds.SOPInstanceUID = second.sop_instance_uid
    assert body == encoded(ds)
    assert body != data
    assert counts(suite) == (1, 1, 1, 2)


def test_duplicate_replaces_in_replace_mode(make_suite: Any) -> None:
    suite = make_suite({"services": {"storage": {"duplicate_policy": "replace"}}})
    ds = make_image()
    assert store(suite, ds).Status == 0x0000
    [old] = instances(suite)
    ds.InstanceNumber = 5
    assert store(suite, ds, calling_ae="OTHER_SCU").Status == 0x0000
    [new] = instances(suite)
    assert (new.id, new.sop_instance_uid) == (old.id, ds.SOPInstanceUID)
    assert (new.instance_number, new.source_ae) == ("5", "OTHER_SCU")
    assert new.file_path != old.file_path
    assert files_in(suite) == [suite.store.path(new.file_path)]
    _, body = split_part10(suite.store.path(new.file_path))
    assert body == encoded(ds)


def test_coercion_warning_b000_for_duplicate(make_suite: Any) -> None:
    suite = make_suite({"services": {"storage": {"return_coercion_warning": True}}})
    ds = make_image()
    assert store(suite, ds).Status == 0x0000
    status = store(suite, ds)
    assert status.Status == 0xB000
    assert status.OffendingElement == 0x00080018
    assert "new UID" in status.ErrorComment
    assert counts(suite)[3] == 2


def test_patient_id_coercion(make_suite: Any) -> None:
    suite = make_suite({"services": {"storage": {"return_coercion_warning": True}}})
    assert store(suite, make_image(patient_name="DOE^JOHN")).Status == 0x0000
    # Same ID, same name in another case: same patient, nothing coerced.
    assert store(suite, make_image(patient_name="doe^john^m")).Status == 0x0000
    status = store(suite, make_image(patient_name="ROE^RICHARD"))
    assert status.Status == 0xB000
    assert status.OffendingElement == 0x00100020
    # Later instances of that patient map to the same coerced ID.
    assert store(suite, make_image(patient_name="Roe^Richard")).Status == 0xB000
    assert store(suite, make_image(patient_name="POE^EDGAR")).Status == 0xB000
    with suite.db.read() as session:
        patients = session.execute(
            select(Patient.patient_id, Patient.received_patient_id, Patient.patient_name).order_by(
                Patient.id
            )
        ).all()
    assert [tuple(p) for p in patients] == [
        ("PAT001", "PAT001", "DOE^JOHN"),
        ("PAT001_1", "PAT001", "ROE^RICHARD"),
        ("PAT001_2", "PAT001", "POE^EDGAR"),
    ]
    # The files keep the received ID.
    assert {dcmread(p).PatientID for p in files_in(suite)} == {"PAT001"}


# -- hostile input -----------------------------------------------------------


def test_hostile_uid_never_reaches_the_file_system(suite: Suite) -> None:
    hostile = "../../../../etc/passwd/.."
    ds = make_image(sop_uid=hostile, study_uid="../x", series_uid="/tmp")
    assert store(suite, ds).Status == 0x0000
    [row] = instances(suite)
    assert row.sop_instance_uid == hostile
    assert STORE_PATH.match(row.file_path)
    [path] = files_in(suite)
    assert path.resolve().is_relative_to(suite.store.root.resolve())
    assert "passwd" not in str(path) and ".." not in row.file_path


# -- DCMTK, concurrency ------------------------------------------------------


def test_dcmtk_storescu(suite: Suite, dcmtk: Any, tmp_path: Path) -> None:
    storescu = dcmtk("storescu")
    study = generate_uid()
    files = [
        write_part10(make_image(study_uid=study, InstanceNumber=i), tmp_path / f"{i}.dcm")
        for i in range(3)
    ]
    files.append(write_part10(make_image(SC, modality="OT"), tmp_path / "sc.dcm", explicit=False))
    result = subprocess.run(
        [
            storescu,
            "-aet",
            "DCMTK_SCU",
            "-aec",
            suite.config.ae("storage_scp").title,
            "127.0.0.1",
            str(suite.port_of("storage_scp")),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = instances(suite)
    assert len(rows) == 4
    assert {r.source_ae for r in rows} == {"DCMTK_SCU"}
    sent = {dcmread(f).SOPInstanceUID for f in files}
    assert {r.sop_instance_uid for r in rows} == sent
    for row in rows:
        assert suite.store.verify(row.file_path, row.sha256)


def test_concurrent_stores_into_one_new_study(suite: Suite) -> None:
    study, series = generate_uid(), generate_uid()
    statuses: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            with associate(
                suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])], calling_ae=f"SCU{n}"
            ) as assoc:
                for i in range(10):
                    ds = make_image(study_uid=study, series_uid=series, InstanceNumber=i)
                    status = send_raw(assoc, CT, ds.SOPInstanceUID, encoded(ds))
                    with lock:
                        statuses.append(int(status.Status))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert statuses == [0x0000] * 40
    assert counts(suite) == (1, 1, 1, 40)
    assert len(files_in(suite)) == 40


# -- File Meta Information template, group commit ----------------------------


@pytest.mark.parametrize("source_ae", ["", "DCMTK_SCU", "ODD"])
@pytest.mark.parametrize("instance_uid", ["1.2.3.4", "1.2.3.45", "2.25." + "9" * 59])
@pytest.mark.parametrize("version", ["DICOMLAB_010", "DL1", ""])
def test_part10_header_template_is_what_pydicom_writes(
    source_ae: str, instance_uid: str, version: str
) -> None:
    for sop_class, ts in ((CT, ExplicitVRLittleEndian), (SC, ImplicitVRLittleEndian)):
        fields = {
            "sop_class_uid": sop_class,
            "sop_instance_uid": instance_uid,
            "transfer_syntax_uid": ts,
            "implementation_class_uid": "1.2.826.0.1.3680043.9.7433.1",
            "implementation_version_name": version,
            "source_ae_title": source_ae,
        }
        assert encoding.part10_header(**fields) == encoding.pydicom_part10_header(**fields)


def _job(suite: Suite, ds: Dataset) -> storage_scp.IndexJob:
    record = record_from_dataset(ds)
    stored = suite.store.write([encoded(ds)], sync_directory=False)
    facts = StoredFacts(stored.relative_path, stored.size, stored.sha256, "1.2.840.10008.1.2.1", "")
    return storage_scp.IndexJob(
        record, facts, record.sop_instance_uid, replace=False, check_duplicate=True
    )


def _commit_while_busy(
    suite: Suite, monkeypatch: pytest.MonkeyPatch, fail_uid: str | None, jobs: list[Any]
) -> storage_scp.IndexJob:
    """Hold a commit open until ``jobs`` all wait, then let them commit as one batch."""
    committer = storage_scp.GroupCommitter(suite.db, suite.store)
    release = threading.Event()
    real = index_instance

    def index(session: Any, record: Any, *args: Any, **kwargs: Any) -> Any:
        if record.sop_instance_uid == first.stored_uid:
            assert release.wait(timeout=60)
        if record.sop_instance_uid == fail_uid:
            raise RuntimeError("this instance's rows cannot be written")
        return real(session, record, *args, **kwargs)

    monkeypatch.setattr(storage_scp, "index_instance", index)
    first = _job(suite, make_image())
    threads = [threading.Thread(target=committer.submit, args=(first,))]
    threads[0].start()
    while not committer._busy:
        time.sleep(0.001)
    for job in jobs:
        threads.append(threading.Thread(target=committer.submit, args=(job,)))
        threads[-1].start()
    while len(committer._pending) < len(jobs):
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(timeout=60)
    assert all(job.done for job in [first, *jobs])
    return first


def test_group_commit_indexes_waiting_instances_in_one_transaction(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = generate_uid()
    dup = make_image(study_uid=study)
    assert store(suite, dup).Status == 0x0000
    jobs = [_job(suite, make_image(study_uid=study)) for _ in range(3)] + [_job(suite, dup)]
    first = _commit_while_busy(suite, monkeypatch, None, jobs)
    assert (first.group, first.error, first.duplicate) == (1, None, False)
    # The three new instances share one transaction; the duplicate is reported, not indexed.
    assert [(j.group, j.error, j.duplicate) for j in jobs] == [(4, None, False)] * 3 + [
        (4, None, True)
    ]
    assert counts(suite) == (1, 2, 5, 5)


def test_group_commit_failure_is_isolated_to_its_instance(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [_job(suite, make_image()) for _ in range(3)]
    _commit_while_busy(suite, monkeypatch, jobs[1].stored_uid, jobs)
    assert isinstance(jobs[1].error, RuntimeError)
    # The others are retried each in its own transaction after the shared one failed.
    assert [(j.group, j.error) for j in (jobs[0], jobs[2])] == [(1, None), (1, None)]
    with suite.db.read() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert jobs[1].stored_uid not in stored
    assert {jobs[0].stored_uid, jobs[2].stored_uid} <= stored


def test_directory_entries_are_durable_before_they_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = filestore._fsync_dir

    def record(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(filestore, "_fsync_dir", record)
    store = filestore.FileStore(tmp_path / "store")
    first = store.write([b"one"], "ab/cd/1.dcm", sync_directory=False)
    second = store.write([b"two"], "ab/cd/2.dcm", sync_directory=False)
    assert synced == []
    store.sync_directories([first.relative_path, second.relative_path])
    # The files' directory once, then each new directory's parent, deepest first.
    assert synced == [store.root / "ab/cd", store.root / "ab", store.root]
    synced.clear()
    store.sync_directories([first.relative_path])
    assert synced == [store.root / "ab/cd"]
    synced.clear()
    # A plain write syncs at once, new parents included.
    store.write([b"three"], "ab/ef/3.dcm")
    assert synced == [store.root / "ab/ef", store.root / "ab"]
