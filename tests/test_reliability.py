"""Nothing acknowledged is lost: crashes, full disks, a vanished database, two processes.

* ``kill -9`` of ``dicomlab serve`` in the middle of a C-STORE stream: after a
  restart every instance that got Success is indexed, its file is present,
  readable and matches its checksum, and no temporary file is left.
* A real ENOSPC on a small tmpfs: A700, nothing kept; storing works again as
  soon as space is freed, without a restart.
* PostgreSQL unreachable (a proxy the test cuts): C-STORE and C-FIND answer
  A700, C-MOVE A701, Storage Commitment N-ACTION 0110, as the statement says;
  when the database is back every service works again by itself.
* Two ``dicomlab serve`` processes on one PostgreSQL index and one store,
  storing into the same studies and committing concurrently: no lost or
  duplicated rows.

Figures are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from db.engine import Database
from db.models import CommitmentRequest, CommitmentState, Instance, Patient, Series, Study
from servers.core.runtime import Suite
from storage.filestore import TMP_SUFFIX, FileStore
from tests.conftest import free_port
from tests.helpers import CT, associate, free_ports_env, make_image
from tests.test_cli import Server, clean_env
from tests.test_commitment import COMMITMENT, Reports, ref, request_ds, send_action
from tests.test_deploy import with_transfer_syntax

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


def serve(tmp_path: Path, db_url: str, data_dir: Path, name: str = "a") -> tuple[Server, int]:
    """``dicomlab serve`` in a subprocess; returns it with its STORAGE-SCP port."""
    store_port = free_port()
    workdir = tmp_path / f"cwd-{name}"
    workdir.mkdir(exist_ok=True)
    server = Server(
        workdir,
        clean_env(
            DICOMLAB_HOST="127.0.0.1",
            DICOMLAB_DATA_DIR=str(data_dir),
            DICOMLAB_DATABASE_URL=db_url,
            DICOMLAB_LOG_FORMAT="json",
            DICOMLAB_LOG_LEVEL="warning",
            **free_ports_env({"DICOMLAB_AE__STORAGE_SCP__PORT": ""}),
            DICOMLAB_AE__STORAGE_SCP__PORT=str(store_port),
        ),
    )
    server.wait_ready()
    return server, store_port


def store_ae() -> AE:
    ae = AE(ae_title="RELIABLE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(COMMITMENT, [ExplicitVRLittleEndian])
    return ae


# --- kill -9 in the middle of a C-STORE stream ------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_kill_9_mid_stream_loses_nothing_acknowledged(tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "data"
    server, port = serve(tmp_path, db_url, data_dir)
    acknowledged: list[str] = []
    sent: list[str] = []

    def stream() -> None:
        assoc = store_ae().associate("127.0.0.1", port, ae_title="EX_STORE_SCP")
        try:
            while assoc.is_established:
                ds = with_transfer_syntax(make_image(rows=64, columns=64), ExplicitVRLittleEndian)
                sent.append(ds.SOPInstanceUID)
                rsp = assoc.send_c_store(ds)
                if rsp is not None and rsp.get("Status") == 0x0000:
                    acknowledged.append(ds.SOPInstanceUID)
        except Exception:  # the server vanished under the request
            pass

    client = threading.Thread(target=stream)
    client.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    client.join(30)
    server.stop()
    store_root = data_dir / "instances"
    leftovers = list(store_root.rglob(f"*{TMP_SUFFIX}"))
    assert len(acknowledged) >= 40

    restarted, port = serve(tmp_path, db_url, data_dir, name="b")
    try:
        assoc = store_ae().associate("127.0.0.1", port, ae_title="EX_STORE_SCP")
        assert assoc.send_c_echo().Status == 0x0000
        extra = with_transfer_syntax(make_image(), ExplicitVRLittleEndian)
        assert assoc.send_c_store(extra).Status == 0x0000
        assoc.release()
    finally:
        restarted.proc.send_signal(signal.SIGTERM)
        restarted.proc.wait(30)
        restarted.stop()

    db = Database(db_url)
    store = FileStore(store_root)
    try:
        with db.read() as session:
            rows = {
                i.sop_instance_uid: i
                for i in session.scalars(
                    select(Instance).where(Instance.sop_instance_uid.in_(sent))
                ).all()
            }
            indexed_paths = set(session.scalars(select(Instance.file_path)).all())
    finally:
        db.dispose()
    missing = [uid for uid in acknowledged if uid not in rows]
    assert missing == [], f"{len(missing)} acknowledged instances lost"
    for uid in acknowledged:
        row = rows[uid]
        assert store.verify(row.file_path, row.sha256), f"{uid}: file missing or damaged"
        assert dcmread(store.path(row.file_path)).SOPInstanceUID == uid
    # Nothing half-written is visible: no temporary file after the restart's sweep,
    # and every indexed file is whole (checked above for the acknowledged ones).
    assert list(store_root.rglob(f"*{TMP_SUFFIX}")) == []
    files = {str(p.relative_to(store_root)) for p in store_root.rglob("*.dcm")}
    orphans = files - indexed_paths
    in_flight = len(sent) - len(acknowledged)
    print(
        f"\nkill -9 ({make_url(db_url).get_backend_name()}): {len(acknowledged)} acknowledged, "
        f"all present and verified; {in_flight} in flight at the kill, "
        f"{len(rows) - len(acknowledged)} of them indexed; {len(leftovers)} temporary files "
        f"swept at restart; {len(orphans)} complete unindexed files (never acknowledged)"
    )
    assert len(orphans) <= in_flight


# --- disk full -------------------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_disk_full_is_a700_nothing_kept_and_recovers_when_space_is_freed(
    small_fs: Path, make_suite: Callable[..., Suite]
) -> None:
    suite = make_suite({"data_dir": str(small_fs)})  # the index stays outside, on tmp_path
    filler = small_fs / "filler"
    free = shutil.disk_usage(small_fs).free
    filler.write_bytes(bytes(max(free - 120 * 1024, 0)))
    stored = 0
    statuses: list[int] = []
    with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian]), VERIFICATION]) as assoc:
        for _ in range(40):
            ds = with_transfer_syntax(make_image(rows=64, columns=64), ExplicitVRLittleEndian)
            status = int(assoc.send_c_store(ds).Status)
            statuses.append(status)
            if status != 0x0000:
                break
            stored += 1
        assert statuses[-1] == 0xA700, [hex(s) for s in statuses]
        # The server still answers, and kept nothing of the refused instance.
        assert assoc.send_c_echo().Status == 0x0000
        assert list(suite.store.root.rglob(f"*{TMP_SUFFIX}")) == []
        with suite.db.read() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == stored
        # Space comes back: the next store succeeds on the same association.
        filler.unlink()
        again = with_transfer_syntax(make_image(), ExplicitVRLittleEndian)
        assert assoc.send_c_store(again).Status == 0x0000
    print(f"\ndisk full: {stored} stored, then A700 on ENOSPC; Success again once space was freed")


# --- database unavailable --------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy to PostgreSQL that the test can cut (and restore) at will."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.up = True
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def c_find_statuses(suite: Suite) -> list[int]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "PAT001"
    query.StudyInstanceUID = ""
    with associate(suite, "query_scp", [STUDY_ROOT_FIND]) as assoc:
        return [int(s.Status) for s, _ in assoc.send_c_find(query, STUDY_ROOT_FIND)]


def c_move_status(suite: Suite, study_uid: str) -> int:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    with associate(suite, "query_scp", [STUDY_ROOT_MOVE]) as assoc:
        return [int(s.Status) for s, _ in assoc.send_c_move(query, "DEST", STUDY_ROOT_MOVE)][-1]


def commit_status(suite: Suite, image: Dataset) -> int:
    with associate(suite, "storage_scp", [COMMITMENT]) as assoc:
        return send_action(assoc, request_ds(generate_uid(), ref(image)))


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_database_unavailable_gives_documented_statuses_then_recovers(
    make_suite: Callable[..., Suite], db_url: str
) -> None:
    url = make_url(db_url)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        suite = make_suite(
            {
                "database_url": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
                    hide_password=False
                ),
                "remote": {"DEST": {"host": "127.0.0.1", "port": free_port()}},
            }
        )
        first = with_transfer_syntax(make_image(), ExplicitVRLittleEndian)
        with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
            assert assoc.send_c_store(first).Status == 0x0000

        proxy.cut()
        refused = with_transfer_syntax(make_image(), ExplicitVRLittleEndian)
        with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
            assert assoc.send_c_store(refused).Status == 0xA700
        assert c_find_statuses(suite) == [0xA700]
        assert c_move_status(suite, first.StudyInstanceUID) == 0xA701
        assert commit_status(suite, first) == 0x0110
        # The refused instance's file was removed with its failed index write.
        files = [p for p in suite.store.root.rglob("*") if p.is_file()]
        assert len(files) == 1

        proxy.restore()  # no restart: the pool's pre-ping replaces the dead connections
        again = with_transfer_syntax(make_image(), ExplicitVRLittleEndian)
        with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
            assert assoc.send_c_store(again).Status == 0x0000
        assert c_find_statuses(suite)[-1] == 0x0000
        assert commit_status(suite, first) == 0x0000
        print(
            "\ndatabase cut: C-STORE A700, C-FIND A700, C-MOVE A701, N-ACTION 0110; "
            "restored: C-STORE, C-FIND and N-ACTION succeed without a restart"
        )
    finally:
        proxy.close()


# --- two processes, one PostgreSQL store ----------------------------------------------------


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_processes_on_one_postgres_store_lose_no_updates(tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "data"  # one store for both, as with a shared volume
    first, port_a = serve(tmp_path, db_url, data_dir, name="a")
    second, port_b = serve(tmp_path, db_url, data_dir, name="b")
    studies = [generate_uid() for _ in range(3)]
    series = {study: [generate_uid() for _ in range(2)] for study in studies}
    per_client, clients = 12, 4
    results: list[tuple[str, int]] = []
    lock = threading.Lock()

    def client(n: int, port: int) -> None:
        assoc = store_ae().associate("127.0.0.1", port, ae_title="EX_STORE_SCP")
        assert assoc.is_established
        for i in range(per_client):
            study = studies[(n + i) % 3]
            ds = make_image(study_uid=study, series_uid=series[study][i % 2])
            status = int(
                assoc.send_c_store(with_transfer_syntax(ds, ExplicitVRLittleEndian)).Status
            )
            with lock:
                results.append((ds.SOPInstanceUID, status))
        assoc.release()

    try:
        threads = [
            threading.Thread(target=client, args=(n, port_a if n % 2 else port_b))
            for n in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == per_client * clients
        assert {status for _, status in results} == {0x0000}
        uids = [uid for uid, _ in results]

        # Both processes commit every instance at once, each to its own requestor.
        reports = [Reports(), Reports()]
        transactions = [generate_uid(), generate_uid()]
        statuses: list[int] = [0, 0]

        def commit(n: int, port: int) -> None:
            ae = store_ae()
            assoc = ae.associate(
                "127.0.0.1",
                port,
                ae_title="EX_STORE_SCP",
                evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports[n].handle)],
            )
            statuses[n] = send_action(
                assoc, request_ds(transactions[n], *((CT, uid) for uid in uids))
            )
            reports[n].wait()
            assoc.release()

        committers = [
            threading.Thread(target=commit, args=(n, port))
            for n, port in enumerate((port_a, port_b))
        ]
        for thread in committers:
            thread.start()
        for thread in committers:
            thread.join(60)
        assert statuses == [0x0000, 0x0000]
        for report in reports:
            event_type, ds, _ = report.received[0]
            assert event_type == 1 and len(ds.ReferencedSOPSequence) == len(uids)
    finally:
        for server in (first, second):
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
                server.proc.wait(30)
            server.stop()

    db = Database(db_url)
    try:
        with db.read() as session:
            count = lambda model: session.scalar(select(func.count()).select_from(model))  # noqa: E731
            instances, series_rows, study_rows, patients = (
                count(Instance),
                count(Series),
                count(Study),
                count(Patient),
            )
            delivered = session.scalars(
                select(CommitmentRequest.state).where(
                    CommitmentRequest.transaction_uid.in_(transactions)
                )
            ).all()
    finally:
        db.dispose()
    print(
        f"\ntwo processes: {len(uids)} instances stored concurrently into 3 studies; index has "
        f"{instances} instances, {series_rows} series, {study_rows} studies, {patients} patient; "
        f"both commitment transactions {[s.name for s in delivered]}"
    )
    assert (instances, series_rows, study_rows, patients) == (len(uids), 6, 3, 1)
    assert sorted(s.name for s in delivered) == [CommitmentState.DELIVERED.name] * 2
