"""C-MOVE SCP and STORAGE-SCU sub-operations over real associations (digest §5, E1-E14)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select, text

from db.models import Instance, Patient
from servers.core.runtime import Suite
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from servers.query_retrieve import move
from servers.query_retrieve.move import (
    C_MOVE_STATUSES,
    PATIENT_ROOT_MOVE,
    PATIENT_STUDY_ONLY_MOVE,
    STUDY_ROOT_MOVE,
    MoveServiceClass,
    move_statement,
    proposed_contexts,
)
from tests.conftest import free_port
from tests.helpers import CT, MR, associate, make_image

VERIFICATION = "1.2.840.10008.1.1"


# -- the service under test -------------------------------------------------------


@pytest.fixture
def archive(make_suite: Callable[..., Suite]) -> Callable[..., Suite]:
    """The default archive (query_retrieve serves C-MOVE with :class:`MoveServiceClass`)."""

    def factory(overrides: dict[str, Any] | None = None) -> Suite:
        suite = make_suite(overrides)
        declaration = suite.declarations["query_retrieve"]
        assert declaration.service_classes[PATIENT_ROOT_MOVE] is MoveServiceClass
        return suite

    return factory


# -- a destination storage SCP ------------------------------------------------------


@dataclass
class Received:
    calling_ae: str
    originator_ae: str
    originator_message_id: int
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes
    priority: int


@dataclass
class Destination:
    """A pynetdicom Storage SCP that keeps what it receives in memory."""

    port: int
    received: list[Received] = field(default_factory=list)
    # Status for the n-th C-STORE (1-based); default Success.
    statuses: dict[int, int] = field(default_factory=dict)
    # Called before answering the n-th C-STORE (to block, slow down, ...).
    before: dict[int, Callable[[], None]] = field(default_factory=dict)
    associations: int = 0

    def handle_store(self, event: Any) -> int:
        n = len(self.received) + 1
        request = event.request
        self.received.append(
            Received(
                calling_ae=event.assoc.requestor.ae_title.strip(),
                originator_ae=str(request.MoveOriginatorApplicationEntityTitle or "").strip(),
                originator_message_id=int(request.MoveOriginatorMessageID or 0),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                transfer_syntax=str(event.context.transfer_syntax),
                data=request.DataSet.getvalue(),
                priority=int(request.Priority),
            )
        )
        if n in self.before:
            self.before[n]()
        return self.statuses.get(n, 0x0000)

    def handle_established(self, event: Any) -> None:
        self.associations += 1


@pytest.fixture
def destination() -> Iterator[Callable[..., Destination]]:
    servers: list[Any] = []

    def start(
        transfer_syntaxes: list[str] | None = None, refuse: tuple[str, ...] = ()
    ) -> Destination:
        ae = AE(ae_title="DEST")
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 10
        syntaxes = transfer_syntaxes or [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
        for cx in StoragePresentationContexts:
            if cx.abstract_syntax not in refuse:
                ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(VERIFICATION)
        dest = Destination(port=free_port())
        server = ae.start_server(
            ("127.0.0.1", dest.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, dest.handle_store),
                (evt.EVT_ESTABLISHED, dest.handle_established),
            ],
        )
        servers.append(server)
        return dest

    yield start
    for server in servers:
        server.shutdown()


def remote(port: int, title: str = "DEST") -> dict[str, Any]:
    return {"remote": {title: {"host": "127.0.0.1", "port": port}}}


# -- seeding the archive ----------------------------------------------------------------


def seed_many(suite: Suite, datasets: list[Dataset], explicit: bool = True) -> dict[str, bytes]:
    """C-STORE ``datasets`` to STORAGE-SCP on one association; the stored data set bytes by UID."""
    syntax = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    with associate(suite, "storage_scp", [(uid, [syntax]) for uid in classes]) as assoc:
        for ds in datasets:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
            assert assoc.send_c_store(ds).Status == 0x0000
    stored: dict[str, bytes] = {}
    with suite.db.read() as session:
        for ds in datasets:
            path = session.scalar(
                select(Instance.file_path).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
            )
            assert path is not None
            full = suite.store.path(path)
            _, offset = split_dataset(full)
            stored[ds.SOPInstanceUID] = full.read_bytes()[offset:]
    return stored


def seed(suite: Suite, ds: Dataset, explicit: bool = True) -> bytes:
    return seed_many(suite, [ds], explicit)[ds.SOPInstanceUID]


@dataclass
class Tree:
    patient_id: str
    study_uid: str
    series_uids: list[str]
    sop_uids: list[list[str]]  # per series
    data: dict[str, bytes]

    @property
    def all_uids(self) -> list[str]:
        return [uid for uids in self.sop_uids for uid in uids]


def seed_study(
    suite: Suite, patient_id: str = "PAT001", per_series: tuple[int, ...] = (2, 1), **kw: Any
) -> Tree:
    explicit = kw.pop("explicit", True)
    sop_class = kw.pop("sop_class", CT)
    study_uid = generate_uid()
    tree = Tree(patient_id, study_uid, [], [], {})
    datasets = []
    for count in per_series:
        series_uid = generate_uid()
        tree.series_uids.append(series_uid)
        uids = []
        for _ in range(count):
            ds = make_image(
                sop_class, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, **kw
            )
            datasets.append(ds)
            uids.append(ds.SOPInstanceUID)
        tree.sop_uids.append(uids)
    tree.data = seed_many(suite, datasets, explicit)
    return tree


# -- the C-MOVE client -------------------------------------------------------------------------


def identifier(level: str | None, **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class Rsp:
    """One C-MOVE response: its status elements and the identifier, if any."""

    status: Dataset
    Identifier: Dataset | None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.status, name)

    def get(self, keyword: str) -> Any:
        return self.status.get(keyword)

    @property
    def failed_uids(self) -> list[str]:
        assert self.Identifier is not None, "no Failed SOP Instance UID List"
        value = self.Identifier.FailedSOPInstanceUIDList
        return [value] if isinstance(value, str) else list(value)


def c_move(
    suite: Suite,
    ds: Dataset,
    model: str = STUDY_ROOT_MOVE,
    dest: str = "DEST",
    on_response: Callable[[Any, int], None] | None = None,
) -> list[Rsp]:
    """Every C-MOVE response, in order."""
    responses: list[Rsp] = []
    with associate(suite, "query_scp", [model]) as assoc:
        for status, found in assoc.send_c_move(ds, dest, model, msg_id=7):
            assert status is not None and "Status" in status, "no C-MOVE response"
            responses.append(Rsp(status, found))
            if on_response is not None:
                on_response(assoc, len(responses))
    return responses


def codes(responses: list[Rsp]) -> list[int]:
    return [int(r.Status) for r in responses]


def counts(rsp: Rsp) -> tuple[Any, ...]:
    return tuple(
        rsp.get(k)
        for k in (
            "NumberOfRemainingSuboperations",
            "NumberOfCompletedSuboperations",
            "NumberOfFailedSuboperations",
            "NumberOfWarningSuboperations",
        )
    )


def still_serving(suite: Suite) -> None:
    with associate(suite, "query_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000


# -- tests ----------------------------------------------------------------------------------------


def test_statuses_match_pynetdicom_categories() -> None:
    from pynetdicom.status import QR_MOVE_SERVICE_CLASS_STATUS, code_to_category

    for row in C_MOVE_STATUSES:
        assert row.code in QR_MOVE_SERVICE_CLASS_STATUS or row.code == 0x0000
        assert code_to_category(row.code) in (row.category, "Failure"), row


def test_success_sequence_originator_and_bytes(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(2, 1))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))

    assert codes(rsps) == [0xFF00, 0xFF00, 0xFF00, 0x0000]
    assert [counts(r) for r in rsps] == [
        (3, 0, 0, 0),
        (2, 1, 0, 0),
        (1, 2, 0, 0),
        (None, 3, 0, 0),
    ]
    assert all(r.Identifier is None for r in rsps)
    assert dest.associations == 1
    assert [r.sop_instance_uid for r in dest.received] == tree.all_uids
    for got in dest.received:
        assert got.calling_ae == "EX_STORE_SCU"
        assert got.originator_ae == "TEST_SCU"
        assert got.originator_message_id == 7
        assert got.priority == 0
        assert got.transfer_syntax == EXPLICIT_VR_LE
        # Sent as stored, byte for byte (no re-encoding).
        assert got.data == tree.data[got.sop_instance_uid]
    still_serving(suite)


def test_implicit_only_destination_gets_converted_data(archive, destination) -> None:
    dest = destination([ImplicitVRLittleEndian])
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(1,))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0x0000]
    got = dest.received[0]
    assert got.transfer_syntax == IMPLICIT_VR_LE
    sent = read_dataset(BytesIO(got.data), is_implicit_VR=True, is_little_endian=True)
    stored = read_dataset(
        BytesIO(tree.data[got.sop_instance_uid]), is_implicit_VR=False, is_little_endian=True
    )
    assert sent == stored
    assert got.data != tree.data[got.sop_instance_uid]


def test_implicit_stored_explicit_only_destination(archive, destination) -> None:
    dest = destination([ExplicitVRLittleEndian])
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(1,), explicit=False)
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0x0000]
    got = dest.received[0]
    assert got.transfer_syntax == EXPLICIT_VR_LE
    sent = read_dataset(BytesIO(got.data), is_implicit_VR=False, is_little_endian=True)
    stored = read_dataset(
        BytesIO(tree.data[got.sop_instance_uid]), is_implicit_VR=True, is_little_endian=True
    )
    assert sent == stored


def test_coerced_patient_id_is_exported_as_coerced(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    seed_study(suite, "PAT_X", per_series=(1,), patient_name="FIRST^PERSON")
    # Same Patient ID, another name: the index coerces the ID (digest C7).
    tree = seed_study(suite, "PAT_X", per_series=(1,), patient_name="OTHER^PERSON")
    with suite.db.read() as session:
        coerced = session.scalar(
            select(Patient.patient_id).where(Patient.patient_name == "OTHER^PERSON")
        )
    assert coerced is not None and coerced != "PAT_X"
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0x0000]
    sent = read_dataset(BytesIO(dest.received[0].data), is_implicit_VR=False, is_little_endian=True)
    assert sent.PatientID == coerced
    assert sent.PatientName == "OTHER^PERSON"


def test_patient_sex_u_is_exported_empty(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(1,), PatientSex="U")
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0x0000]
    sent = read_dataset(BytesIO(dest.received[0].data), is_implicit_VR=False, is_little_endian=True)
    assert sent.PatientSex == ""
    assert sent.PixelData == make_image().PixelData


def test_warnings_count_as_success_final_0000(archive, destination) -> None:
    dest = destination()
    dest.statuses = {1: 0xB000, 2: 0x0107}
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(3,))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0xFF00, 0xFF00, 0x0000]
    assert [counts(r) for r in rsps] == [
        (3, 0, 0, 0),
        (2, 0, 0, 1),
        (1, 0, 0, 2),
        (None, 1, 0, 2),
    ]
    assert rsps[-1].Identifier is None


def test_no_match_initial_pending_then_success(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID="1.2.3.4"))
    assert codes(rsps) == [0xFF00, 0x0000]
    assert [counts(r) for r in rsps] == [(0, 0, 0, 0), (None, 0, 0, 0)]
    assert dest.associations == 0


LEVEL_CASES = [
    (PATIENT_ROOT_MOVE, "PATIENT", "patient"),
    (PATIENT_ROOT_MOVE, "STUDY", "study"),
    (PATIENT_ROOT_MOVE, "SERIES", "series"),
    (PATIENT_ROOT_MOVE, "IMAGE", "images"),
    (STUDY_ROOT_MOVE, "STUDY", "study"),
    (STUDY_ROOT_MOVE, "SERIES", "series"),
    (STUDY_ROOT_MOVE, "IMAGE", "images"),
    (PATIENT_STUDY_ONLY_MOVE, "PATIENT", "patient"),
    (PATIENT_STUDY_ONLY_MOVE, "STUDY", "study"),
]


def test_levels_of_each_model(archive, destination) -> None:
    # One suite for all nine cases keeps the run short; each case is checked on its own.
    dest = destination()
    suite = archive(remote(dest.port))
    tree = seed_study(suite, "PAT_A", per_series=(2, 1))
    other = seed_study(suite, "PAT_A", per_series=(1,))
    seed_study(suite, "PAT_B", per_series=(1,))
    for model, level, expected in LEVEL_CASES:
        dest.received.clear()
        keys: dict[str, Any] = {}
        if model != STUDY_ROOT_MOVE:
            keys["PatientID"] = "PAT_A"
        if level != "PATIENT":
            keys["StudyInstanceUID"] = tree.study_uid
        if level in ("SERIES", "IMAGE"):
            keys["SeriesInstanceUID"] = tree.series_uids[0]
        if level == "IMAGE":
            # A list of UIDs at the retrieve level's own key.
            keys["SOPInstanceUID"] = [tree.sop_uids[0][1], tree.sop_uids[0][0]]
        want = {
            "patient": tree.all_uids + other.all_uids,
            "study": tree.all_uids,
            "series": tree.sop_uids[0],
            "images": tree.sop_uids[0],
        }[expected]
        rsps = c_move(suite, identifier(level, **keys), model=model)
        case = (model, level)
        assert codes(rsps) == [0xFF00] * len(want) + [0x0000], case
        assert rsps[0].NumberOfRemainingSuboperations == len(want), case
        assert counts(rsps[-1]) == (None, len(want), 0, 0), case
        assert sorted(r.sop_instance_uid for r in dest.received) == sorted(want), case


def test_list_of_study_uids_at_study_level(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    one = seed_study(suite, per_series=(1,))
    two = seed_study(suite, per_series=(1,))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=[one.study_uid, two.study_uid]))
    assert codes(rsps) == [0xFF00, 0xFF00, 0x0000]
    assert len(dest.received) == 2


def a900_cases() -> dict[str, tuple[str, Dataset]]:
    return {
        # A list of Study UIDs in a SERIES level request: the statement's own example.
        "series-level-study-list": (
            STUDY_ROOT_MOVE,
            identifier("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"], SeriesInstanceUID="1.2.5"),
        ),
        "missing-level": (STUDY_ROOT_MOVE, identifier(None, StudyInstanceUID="1.2.3")),
        "level-not-in-model": (STUDY_ROOT_MOVE, identifier("PATIENT", PatientID="PAT001")),
        "series-in-patient-study-only": (
            PATIENT_STUDY_ONLY_MOVE,
            identifier("SERIES", PatientID="P", StudyInstanceUID="1.2", SeriesInstanceUID="1.3"),
        ),
        "empty-unique-key": (STUDY_ROOT_MOVE, identifier("STUDY", StudyInstanceUID="")),
        "wildcard-uid": (STUDY_ROOT_MOVE, identifier("STUDY", StudyInstanceUID="1.2.*")),
        "missing-higher-key": (STUDY_ROOT_MOVE, identifier("SERIES", SeriesInstanceUID="1.2.5")),
        "patient-root-missing-patient-id": (
            PATIENT_ROOT_MOVE,
            identifier("STUDY", StudyInstanceUID="1.2.3"),
        ),
        "patient-id-list": (PATIENT_ROOT_MOVE, identifier("PATIENT", PatientID=["A", "B"])),
        "lower-level-key": (
            STUDY_ROOT_MOVE,
            identifier("STUDY", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.4"),
        ),
    }


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a900_invalid_identifier(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    seed_study(suite, per_series=(1,))
    for case, (model, ident) in a900_cases().items():
        rsps = c_move(suite, ident, model=model)
        assert codes(rsps) == [0xA900], case
        assert counts(rsps[0]) == (None, None, None, None), case
    assert dest.associations == 0
    still_serving(suite)


def test_a801_unknown_destination(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(1,))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid), dest="NOBODY")
    assert codes(rsps) == [0xA801]
    assert dest.associations == 0
    still_serving(suite)


def test_a701_database_failure(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(1,))
    with suite.db.engine.begin() as conn:
        conn.execute(text("DROP TABLE instance"))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xA701]
    assert counts(rsps[0]) == (None, None, None, None)
    assert dest.associations == 0
    still_serving(suite)


def test_a702_destination_refuses_second_instance(archive, destination) -> None:
    dest = destination()
    dest.statuses = {2: 0xA700}
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(4,))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0xFF00, 0xA702]
    assert [counts(r) for r in rsps] == [(4, 0, 0, 0), (3, 1, 0, 0), (None, 1, 3, 0)]
    # The failed instance and the two never attempted.
    assert rsps[-1].failed_uids == tree.all_uids[1:]
    assert len(dest.received) == 2  # stopped at the first failure
    still_serving(suite)


def test_a702_destination_unreachable(archive) -> None:
    suite = archive(remote(free_port()))
    tree = seed_study(suite, per_series=(2,))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0xA702]
    assert counts(rsps[-1]) == (None, 0, 2, 0)
    assert rsps[-1].failed_uids == tree.all_uids
    still_serving(suite)


def test_a702_no_context_for_the_sop_class(archive, destination) -> None:
    dest = destination(refuse=(MR,))
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(1,))
    # An MR instance later in the same study; the destination refuses MR.
    mr = make_image(MR, study_uid=tree.study_uid, series_uid=generate_uid(), modality="MR")
    seed(suite, mr)
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0xFF00, 0xA702]
    assert counts(rsps[-1]) == (None, 1, 1, 0)
    assert rsps[-1].failed_uids == [mr.SOPInstanceUID]
    assert len(dest.received) == 1


def test_a702_stored_file_unreadable(archive, destination) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(2,))
    with suite.db.read() as session:
        path = session.scalar(
            select(Instance.file_path).where(Instance.sop_instance_uid == tree.all_uids[0])
        )
    suite.store.path(path).write_bytes(b"corrupted")
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0xA702]
    assert counts(rsps[-1]) == (None, 0, 2, 0)
    assert dest.received == []


def test_a702_destination_timeout(archive, destination) -> None:
    dest = destination()
    release = threading.Event()
    dest.before = {1: lambda: release.wait(10)}
    suite = archive({**remote(dest.port), "ae": {"storage_scu": {"dimse_timeout": 0.5}}})
    tree = seed_study(suite, per_series=(2,))
    try:
        rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    finally:
        release.set()
    assert codes(rsps) == [0xFF00, 0xA702]
    assert counts(rsps[-1]) == (None, 0, 2, 0)
    still_serving(suite)


def test_a702_more_than_65535_matches(archive, destination, monkeypatch) -> None:
    dest = destination()
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(2,))
    monkeypatch.setattr(move, "MAX_SUBOPERATIONS", 1)
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xA702]
    assert counts(rsps[0]) == (None, None, None, None)
    assert dest.associations == 0


def _wait_for_cancel(suite: Suite, msg_id: int) -> None:
    ae = suite.aes["query_scp"].ae
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(msg_id in a.dimse.cancel_req for a in ae.active_associations):
            return
        time.sleep(0.005)
    raise AssertionError("the C-CANCEL never reached the server")


def test_fe00_cancel_mid_move(archive, destination) -> None:
    dest = destination()
    arrived, release = threading.Event(), threading.Event()

    def hold_first() -> None:
        arrived.set()
        release.wait(10)

    dest.before = {1: hold_first}
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(3,))

    def cancel_after_initial(assoc: Any, n: int) -> None:
        if n == 1:
            # The first sub-operation is under way, so the cancel is seen before the second.
            assert arrived.wait(10)
            assoc.send_c_cancel(7, query_model=STUDY_ROOT_MOVE)
            _wait_for_cancel(suite, 7)
            release.set()

    try:
        rsps = c_move(
            suite,
            identifier("STUDY", StudyInstanceUID=tree.study_uid),
            on_response=cancel_after_initial,
        )
    finally:
        release.set()
    assert codes(rsps) == [0xFF00, 0xFF00, 0xFE00]
    assert counts(rsps[-1]) == (2, 1, 0, 0)
    # No data set: pynetdicom's SCU decodes the absent one as an empty Dataset.
    assert not rsps[-1].Identifier
    assert len(dest.received) == 1
    still_serving(suite)


def test_export_continues_after_move_association_aborts(archive, destination) -> None:
    dest = destination()
    release = threading.Event()
    dest.before = {1: lambda: release.wait(10)}
    suite = archive(remote(dest.port))
    tree = seed_study(suite, per_series=(3,))
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", suite.port_of("query_scp"), ae_title="EX_QUERY_SCP")
    assert assoc.is_established
    responses = assoc.send_c_move(
        identifier("STUDY", StudyInstanceUID=tree.study_uid), "DEST", STUDY_ROOT_MOVE
    )
    status, _ = next(responses)
    assert status.Status == 0xFF00
    assoc.abort()
    release.set()
    deadline = time.monotonic() + 10
    while len(dest.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    ae.shutdown()
    assert [r.sop_instance_uid for r in dest.received] == tree.all_uids
    still_serving(suite)


def test_multi_mode_proposes_one_context_per_class(archive, destination) -> None:
    dest = destination()
    suite = archive(
        {**remote(dest.port), "services": {"query_retrieve": {"contexts_per_sop_class": "multi"}}}
    )
    tree = seed_study(suite, per_series=(1,))
    rsps = c_move(suite, identifier("STUDY", StudyInstanceUID=tree.study_uid))
    assert codes(rsps) == [0xFF00, 0x0000]
    rows = proposed_contexts(suite.config)
    assert all(len(r.transfer_syntaxes) >= 1 for r in rows)
    assert len({r.abstract_syntax for r in rows}) == len(rows)


def test_statement_sections_and_proposed_table() -> None:
    from servers.core import config as config_mod

    config = config_mod.load(path=None, environ={}, overrides={})
    rows = proposed_contexts(config)
    # 22 rows of Table F.4.2-6 plus NM (Retired) with Implicit VR (digest A2).
    assert len(rows) == 23
    assert all(r.role == "SCU" for r in rows)
    text_ = "\n".join(s.body for s in move_statement(config))
    assert "B000" in text_ and "A702" in text_ and "EX_STORE_SCU" in text_


def test_dcmtk_movescu_to_storescp(archive, dcmtk, tmp_path: Path) -> None:
    movescu, storescp = dcmtk("movescu"), dcmtk("storescp")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [storescp, "-aet", "DCMTKDEST", "-od", str(out), "--exec-on-reception", "true", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        suite = archive(remote(port, "DCMTKDEST"))
        tree = seed_study(suite, per_series=(2,))
        # storescp needs a moment to listen; wait for its port instead of sleeping blindly.
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        result = subprocess.run(
            [
                movescu,
                "-S",
                "-aet",
                "DCMTK_SCU",
                "-aec",
                "EX_QUERY_SCP",
                "-aem",
                "DCMTKDEST",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={tree.study_uid}",
                "-v",
                "127.0.0.1",
                str(suite.port_of("query_scp")),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert result.returncode == 0, result.stderr + result.stdout
    log = result.stdout + result.stderr
    assert "Pending" in log and "Success" in log, log
    files = sorted(out.iterdir())
    assert len(files) == 2
    got = {dcmread(f).SOPInstanceUID for f in files}
    assert got == set(tree.all_uids)
    still_serving(suite)


def test_only_the_exporting_thread_takes_responses() -> None:
    """The destination association's reactor cannot swallow a C-STORE-RSP (export.py)."""
    import queue
    from types import SimpleNamespace

    from servers.query_retrieve import export as export_module

    messages: queue.Queue[tuple[int, str]] = queue.Queue()

    def get_msg(block: bool = False) -> tuple[int | None, str | None]:
        try:
            return messages.get(block=block, timeout=1)
        except queue.Empty:
            return None, None

    assoc: Any = SimpleNamespace(dimse=SimpleNamespace(get_msg=get_msg))
    export_module._keep_responses_for(assoc, threading.get_ident())
    messages.put((1, "C-STORE-RSP"))
    seen: list[Any] = []
    reactor = threading.Thread(
        target=lambda: seen.extend([assoc.dimse.get_msg(), assoc.dimse.get_msg(block=True)])
    )
    reactor.start()
    reactor.join()
    assert seen == [(None, None), (None, None)]
    assert assoc.dimse.get_msg(block=True) == (1, "C-STORE-RSP")
