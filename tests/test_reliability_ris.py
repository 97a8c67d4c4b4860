"""The RIS and the virtual printer under faults, as the archive in test_reliability.py.

* Two ``dicomlab serve`` processes on one PostgreSQL database: racing N-SETs
  COMPLETED / DISCONTINUED of one step give one Success and one 0110 (A710),
  racing N-CREATEs of one SOP Instance UID one Success and one 0111, and the
  final rows are consistent (one step, its state the winner's, one message per
  accepted request). Storage Commitment on both processes for instances stored
  through either commits them all.
* PostgreSQL unreachable: MWL C-FIND C001, MPPS N-CREATE / N-SET 0110, print
  N-ACTION 0110 (nothing queued); everything works again when it comes back.
* A job in progress waits while the database is unavailable, then prints.
* A full disk while the printer renders: the job ends FAILURE (ELEC SW ERROR),
  no temporary file is left, and the next job prints once space is freed.
* ``kill -9`` during MPPS traffic and during printing: after a restart every
  acknowledged step is there in the state last acknowledged, and a job the
  killed process was printing ends FAILURE instead of blocking the queue.

Figures are printed (``-s``).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from db.engine import Database
from db.models import (
    CommitmentRequest,
    CommitmentState,
    PerformedStep,
    PerformedStepMessage,
    PpsState,
    PrintJob,
    PrintJobState,
)
from db.queries import mpps as mpps_q
from db.queries import print as print_q
from servers.core.runtime import Suite
from servers.mpps import ERROR_ID_FINAL
from servers.print import tables as p
from tests.conftest import free_port
from tests.helpers import CT, associate, free_ports_env, make_image
from tests.print_helpers import Scu, image_box_set, image_item, print_scu, wait_job
from tests.ris_helpers import MPPS, MWL, add_entry, mpps_create, mpps_final, mwl_identifier
from tests.test_cli import Server, clean_env
from tests.test_commitment import Reports, request_ds, send_action
from tests.test_deploy import with_transfer_syntax
from tests.test_reliability import CuttableProxy, store_ae

KEYS = ("storage_scp", "ris_scp", "print_scp")


def serve(tmp_path: Path, db_url: str, data_dir: Path, name: str) -> tuple[Server, dict[str, int]]:
    """``dicomlab serve`` in a subprocess; returns it with the ports of ``KEYS``."""
    ports = {key: free_port() for key in KEYS}
    given = {f"DICOMLAB_AE__{key.upper()}__PORT": str(port) for key, port in ports.items()}
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
            **free_ports_env(given),
            **given,
        ),
    )
    server.wait_ready()
    return server, ports


def stop(*servers: Server) -> None:
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(30)
        server.stop()


def mpps_assoc(port: int) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMSRV")
    assert assoc.is_established
    return assoc


def race(*calls: Callable[[], int]) -> list[int]:
    """Run ``calls`` at the same moment (a barrier), each on its own thread."""
    barrier = threading.Barrier(len(calls))
    results: list[int] = [-1] * len(calls)

    def run(n: int) -> None:
        barrier.wait(30)
        results[n] = calls[n]()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


# --- two processes, one PostgreSQL database -------------------------------------------------


def race_one_step(
    assoc_a: Association, assoc_b: Association, finals: tuple[str, str]
) -> tuple[tuple[int, int], tuple[int, int], list[Dataset], dict[str, str]]:
    """Racing N-CREATEs of one new step, then racing N-SETs of ``finals`` to it.

    Returns both outcomes as (lower, higher) status pairs, the losing N-SET
    responses and {uid: the final state that won}.
    """
    uid = generate_uid()
    created = race(
        lambda: int(assoc_a.send_n_create(mpps_create(), MPPS, uid)[0].Status),
        lambda: int(assoc_b.send_n_create(mpps_create(), MPPS, uid)[0].Status),
    )
    responses: list[Dataset] = []
    winner: dict[str, str] = {}

    def n_set(assoc: Association, final: str) -> int:
        status = assoc.send_n_set(mpps_final(final), MPPS, uid)[0]
        responses.append(status)
        if int(status.Status) == 0:
            winner[uid] = final
        return int(status.Status)

    outcome = race(lambda: n_set(assoc_a, finals[0]), lambda: n_set(assoc_b, finals[1]))
    losers = [s for s in responses if int(s.Status) != 0]
    return (
        (min(created), max(created)),
        (min(outcome), max(outcome)),
        losers,
        winner,
    )


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_processes_race_mpps_and_commit_without_lost_updates(
    tmp_path: Path, db_url: str
) -> None:
    data_dir = tmp_path / "data"
    first, ports_a = serve(tmp_path, db_url, data_dir, "a")
    second, ports_b = serve(tmp_path, db_url, data_dir, "b")
    rounds = 15
    set_outcomes: dict[tuple[int, int], int] = {}
    create_outcomes: dict[tuple[int, int], int] = {}
    winners: dict[str, str] = {}
    try:
        assoc_a, assoc_b = mpps_assoc(ports_a["ris_scp"]), mpps_assoc(ports_b["ris_scp"])
        for n in range(rounds):
            finals = ("COMPLETED", "DISCONTINUED") if n % 2 else ("DISCONTINUED", "COMPLETED")
            created, outcome, losers, winner = race_one_step(assoc_a, assoc_b, finals)
            create_outcomes[created] = create_outcomes.get(created, 0) + 1
            set_outcomes[outcome] = set_outcomes.get(outcome, 0) + 1
            assert len(losers) == 1, f"round {n}: N-SET statuses {outcome} (a lost update)"
            assert int(losers[0].Status) == 0x0110 and losers[0].ErrorID == ERROR_ID_FINAL
            winners.update(winner)
        assoc_a.release()
        assoc_b.release()

        # Storage Commitment on both processes, for instances stored through either.
        uids: list[str] = []
        for port in (ports_a["storage_scp"], ports_b["storage_scp"]):
            with associate_store(port) as assoc:
                for _ in range(5):
                    ds = with_transfer_syntax(make_image(), ExplicitVRLittleEndian)
                    assert assoc.send_c_store(ds).Status == 0x0000
                    uids.append(ds.SOPInstanceUID)
        reports = [Reports(), Reports()]
        transactions = [generate_uid(), generate_uid()]

        def commit(n: int, port: int) -> int:
            assoc = store_ae().associate(
                "127.0.0.1",
                port,
                ae_title="EX_STORE_SCP",
                evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports[n].handle)],
            )
            status = send_action(assoc, request_ds(transactions[n], *((CT, u) for u in uids)))
            reports[n].wait()
            assoc.release()
            return status

        commit_statuses = race(
            lambda: commit(0, ports_a["storage_scp"]), lambda: commit(1, ports_b["storage_scp"])
        )
        assert commit_statuses == [0x0000, 0x0000]
        for report in reports:
            event_type, ds, _ = report.received[0]
            assert event_type == 1 and len(ds.ReferencedSOPSequence) == len(uids)
    finally:
        stop(first, second)

    db = Database(db_url)
    try:
        with db.read() as session:
            steps = session.scalars(select(PerformedStep)).all()
            messages = {
                step.sop_instance_uid: session.scalar(
                    select(func.count())
                    .select_from(PerformedStepMessage)
                    .where(PerformedStepMessage.step_pk == step.id)
                )
                for step in steps
            }
            delivered = session.scalars(
                select(CommitmentRequest.state).where(
                    CommitmentRequest.transaction_uid.in_(transactions)
                )
            ).all()
    finally:
        db.dispose()
    print(
        f"\ntwo processes, {rounds} races each: N-CREATE outcomes "
        f"{ {f'{a:04X}/{b:04X}': c for (a, b), c in create_outcomes.items()} }, "
        f"N-SET COMPLETED vs DISCONTINUED outcomes "
        f"{ {f'{a:04X}/{b:04X}': c for (a, b), c in set_outcomes.items()} }; "
        f"{len(steps)} steps, {sum(int(m or 0) for m in messages.values())} messages stored; "
        f"{len(uids)} instances committed by both processes: {[s.name for s in delivered]}"
    )
    assert create_outcomes == {(0x0000, 0x0111): rounds}
    assert set_outcomes == {(0x0000, 0x0110): rounds}
    assert len(steps) == rounds
    for step in steps:
        # The stored state is the winner's, and exactly the winning N-CREATE and N-SET
        # were stored: the losers changed nothing.
        assert step.state is PpsState(winners[step.sop_instance_uid])
        assert step.dataset["00400252"]["Value"] == [winners[step.sop_instance_uid]]
        assert messages[step.sop_instance_uid] == 2
    assert sorted(s.name for s in delivered) == [CommitmentState.DELIVERED.name] * 2


class associate_store:
    """A storage association to a subprocess' STORAGE-SCP port."""

    def __init__(self, port: int) -> None:
        self.port = port

    def __enter__(self) -> Association:
        self.assoc = store_ae().associate("127.0.0.1", self.port, ae_title="EX_STORE_SCP")
        assert self.assoc.is_established
        return self.assoc

    def __exit__(self, *_: object) -> None:
        if self.assoc.is_established:
            self.assoc.release()


# --- database unavailable ---------------------------------------------------------------------


def print_film(scu: Scu) -> tuple[int, str | None]:
    """One film: session, 1x1 film box, an image, Film Box N-ACTION; (status, job UID)."""
    session = scu.session()
    status, attrs, film_box = scu.film_box(session)
    assert status.Status == 0x0000, hex(status.Status)
    box = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
    image = image_item(64, 64, [n % 256 for n in range(64 * 64)])
    assert scu.set(p.IMAGE_BOX, box, image_box_set(1, image))[0].Status == 0x0000
    status, reply = scu.action(p.FILM_BOX, film_box)
    if status.Status != 0x0000:
        return int(status.Status), None
    return 0, str(reply.ReferencedPrintJobSequencePullStoredPrint[0].ReferencedSOPInstanceUID)


def ris_and_print_statuses(suite: Suite, step: str) -> dict[str, list[int]]:
    """What each RIS and print operation answers now."""
    got: dict[str, list[int]] = {}
    with associate(suite, "ris_scp", [MWL, MPPS]) as assoc:
        got["MWL C-FIND"] = [
            int(s.Status) for s, _ in assoc.send_c_find(mwl_identifier(PatientID="PAT001"), MWL)
        ]
        got["MPPS N-CREATE"] = [
            int(assoc.send_n_create(mpps_create(), MPPS, generate_uid())[0].Status)
        ]
        got["MPPS N-SET"] = [int(assoc.send_n_set(mpps_final(), MPPS, step)[0].Status)]
    with print_scu(suite, contexts=(p.META, p.PRINT_JOB)) as scu:
        got["Printer N-GET"] = [int(scu.get(p.PRINTER, p.PRINTER_INSTANCE)[0].Status)]
        got["Print Job N-GET"] = [int(scu.get(p.PRINT_JOB, str(generate_uid()))[0].Status)]
        status, _ = scu.create(p.FILM_SESSION, film_session_ds(), str(generate_uid()))
        got["Film Session N-CREATE"] = [int(status.Status)]
    return got


def hexed(statuses: dict[str, list[int]]) -> str:
    return "; ".join(f"{k} {' '.join(f'{c:04X}' for c in v)}" for k, v in statuses.items())


def film_session_ds() -> Dataset:
    ds = Dataset()
    ds.NumberOfCopies = 1
    return ds


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_database_unavailable_ris_and_print_give_documented_statuses_then_recover(
    make_suite: Callable[..., Suite], db_url: str
) -> None:
    url = make_url(db_url)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        suite = make_suite(
            {
                "database_url": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
                    hide_password=False
                )
            }
        )
        add_entry(suite)
        step = generate_uid()
        with associate(suite, "ris_scp", [MPPS]) as assoc:
            assert assoc.send_n_create(mpps_create(), MPPS, step)[0].Status == 0x0000
        with print_scu(suite, contexts=(p.META, p.PRINT_JOB)) as scu:
            # The print association is open before the cut: its film session lives in memory.
            session = scu.session()
            status, attrs, film_box = scu.film_box(session)
            box = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
            image = image_item(64, 64, [n % 256 for n in range(64 * 64)])
            assert scu.set(p.IMAGE_BOX, box, image_box_set(1, image))[0].Status == 0x0000

            proxy.cut()
            action = int(scu.action(p.FILM_BOX, film_box)[0].Status)
            cut = ris_and_print_statuses(suite, step)
            cut["Film Box N-ACTION"] = [action]
            proxy.restore()
            status, reply = scu.action(p.FILM_BOX, film_box)
            assert status.Status == 0x0000
            job_uid = str(
                reply.ReferencedPrintJobSequencePullStoredPrint[0].ReferencedSOPInstanceUID
            )
        print(f"\ndatabase cut: {hexed(cut)}")
        with suite.db.read() as session_:
            assert mpps_q.get_step(session_, step).state is PpsState.IN_PROGRESS  # type: ignore[union-attr]
            assert session_.scalar(select(func.count()).select_from(PrintJob)) == 1
        back = ris_and_print_statuses(suite, step)
        print(f"database back: {hexed(back)}; the print job queued after it printed")
        assert wait_job(suite, job_uid).state is PrintJobState.DONE
    finally:
        proxy.close()
    assert cut == {
        "MWL C-FIND": [0xC001],
        "MPPS N-CREATE": [0x0110],
        "MPPS N-SET": [0x0110],
        "Printer N-GET": [0x0110],
        "Print Job N-GET": [0x0110],
        "Film Session N-CREATE": [0x0110],
        "Film Box N-ACTION": [0x0110],
    }
    assert back["MWL C-FIND"] == [0xFF00, 0x0000]
    assert {k: v for k, v in back.items() if k != "MWL C-FIND"} == {
        "MPPS N-CREATE": [0x0000],
        "MPPS N-SET": [0x0000],
        "Printer N-GET": [0x0000],
        "Print Job N-GET": [0x0112],  # a UID no job has
        "Film Session N-CREATE": [0x0000],
    }


# --- disk full while the printer renders -------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_disk_full_while_rendering_fails_the_job_keeps_nothing_and_recovers(
    small_fs: Path, make_suite: Callable[..., Suite]
) -> None:
    suite = make_suite({"data_dir": str(small_fs)})  # the index stays outside, on tmp_path
    films = small_fs / "films"
    filler = small_fs / "filler"
    free = shutil.disk_usage(small_fs).free
    filler.write_bytes(bytes(max(free - 40 * 1024, 0)))  # the films fit, the PDF does not
    with print_scu(suite, contexts=(p.META, p.PRINT_JOB)) as scu:
        status, job_uid = print_film(scu)
        assert status == 0x0000 and job_uid is not None  # queued: rendering comes after
        failed = wait_job(suite, job_uid)
        event = scu.wait_event(lambda e: e[0] == 4 and e[1] == p.PRINT_JOB)
    assert (failed.state, failed.status_info) == (PrintJobState.FAILURE, "ELEC SW ERROR")
    assert event[2] is not None and event[2].ExecutionStatusInfo == "ELEC SW ERROR"
    left = [f for f in films.rglob("*") if f.is_file()] if films.exists() else []
    assert left == [], f"files of the failed job left behind: {left}"
    assert failed.films == []

    filler.unlink()
    with print_scu(suite, contexts=(p.META, p.PRINT_JOB)) as scu:
        status, job_uid = print_film(scu)
        assert status == 0x0000 and job_uid is not None
        done = wait_job(suite, job_uid)
    assert done.state is PrintJobState.DONE
    written = sorted(f.name for f in films.rglob("*") if f.is_file())
    assert written == ["film-01-density.png", "film-01.json", "film-01.png", "job.pdf"]
    print(
        f"\ndisk full while rendering: job FAILURE (ELEC SW ERROR), Failure event sent, "
        f"0 files left; space freed: next job DONE with {len(written)} files"
    )


# --- kill -9 during MPPS traffic and printing ---------------------------------------------------


def subprocess_print_scu(port: int) -> Scu:
    events: list[tuple[int, str, Dataset | None]] = []

    def on_event(event: Any) -> tuple[int, None]:
        events.append((int(event.event_type), str(event.request.AffectedSOPClassUID), None))
        return 0x0000, None

    ae = AE(ae_title="PRINT_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in (p.META, p.PRINT_JOB):
        ae.add_requested_context(cx)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="PRINT_SCP", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_event)]
    )
    assert assoc.is_established
    return Scu(assoc, events)


def set_printer(db_url: str, status: str, info: str) -> None:
    db = Database(db_url)
    try:
        with db.write() as session:
            print_q.set_printer_state(session, status, info)
    finally:
        db.dispose()


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_kill_9_during_mpps_and_printing_leaves_consistent_state(
    tmp_path: Path, db_url: str
) -> None:
    data_dir = tmp_path / "data"
    server, ports = serve(tmp_path, db_url, data_dir, "a")
    # The printer is down: queued jobs wait PENDING, so some are unfinished at the kill.
    set_printer(db_url, "FAILURE", "PRINTER DOWN")
    queued: list[str] = []
    for _ in range(3):
        scu = subprocess_print_scu(ports["print_scp"])
        status, job_uid = print_film(scu)
        assert status == 0x0000 and job_uid is not None
        queued.append(job_uid)
        scu.assoc.release()

    acknowledged: dict[str, str] = {}  # uid -> the state the last Success acknowledged
    sent: list[str] = []

    def modality() -> None:
        try:
            assoc = mpps_assoc(ports["ris_scp"])
            while assoc.is_established:
                uid = generate_uid()
                sent.append(uid)
                if assoc.send_n_create(mpps_create(), MPPS, uid)[0].Status == 0x0000:
                    acknowledged[uid] = "IN PROGRESS"
                final = "COMPLETED" if len(sent) % 2 else "DISCONTINUED"
                if assoc.send_n_set(mpps_final(final), MPPS, uid)[0].Status == 0x0000:
                    acknowledged[uid] = final
        except Exception:  # the server vanished under the request
            pass

    client = threading.Thread(target=modality)
    client.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    client.join(30)
    server.stop()
    assert len(acknowledged) >= 30

    restarted, ports = serve(tmp_path, db_url, data_dir, "b")
    try:
        db = Database(db_url)
        try:
            with db.read() as session:
                steps = {s.sop_instance_uid: s for s in session.scalars(select(PerformedStep))}
                messages = {
                    uid: session.scalar(
                        select(func.count())
                        .select_from(PerformedStepMessage)
                        .where(PerformedStepMessage.step_pk == step.id)
                    )
                    for uid, step in steps.items()
                }
                jobs = {
                    j.job_uid: (j.state, j.status_info) for j in session.scalars(select(PrintJob))
                }
        finally:
            db.dispose()
        # The queue is not blocked: with the printer back, a new job prints.
        set_printer(db_url, "NORMAL", "NORMAL")
        scu = subprocess_print_scu(ports["print_scp"])
        status, job_uid = print_film(scu)
        assert status == 0x0000 and job_uid is not None
        scu.wait_event(lambda e: e[0] in (3, 4))
        scu.assoc.release()
        db = Database(db_url)
        try:
            with db.read() as session:
                after = session.scalar(select(PrintJob.state).where(PrintJob.job_uid == job_uid))
        finally:
            db.dispose()
    finally:
        stop(restarted)

    lost = [uid for uid in acknowledged if uid not in steps]
    regressed = [
        uid
        for uid, state in acknowledged.items()
        if uid in steps and state != "IN PROGRESS" and steps[uid].state.value != state
    ]
    in_flight = len(sent) - len(acknowledged)
    print(
        f"\nkill -9 ({make_url(db_url).get_backend_name()}): {len(acknowledged)} MPPS steps "
        f"acknowledged, all present in their acknowledged state (stored: "
        f"{dict(Counter(s.state.value for s in steps.values()))}); {in_flight} N-CREATE in "
        "flight; "
        f"{len(queued)} queued print jobs after restart: "
        f"{sorted({f'{s.value} ({i})' for s, i in jobs.values()})}; a new job {after.value}"
    )
    assert lost == [] and regressed == []
    for uid, step in steps.items():
        # Every stored step is whole: its state and its stored messages agree.
        assert messages[uid] == (1 if step.state is PpsState.IN_PROGRESS else 2), uid
    assert {jobs[uid] for uid in queued} == {(PrintJobState.FAILURE, "PRINTER DOWN")}
    assert after is PrintJobState.DONE


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_job_in_progress_waits_while_the_database_is_down(
    make_suite: Callable[..., Suite], db_url: str
) -> None:
    """The printer is down, so the job re-reads its status every 0.2 s; the database goes
    away under it, comes back, the printer too: the job prints instead of dying."""
    url = make_url(db_url)
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        suite = make_suite(
            {
                "database_url": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
                    hide_password=False
                ),
                "services": {"print": {"retry_delay_s": 0.2, "retry_count": 10000}},
            }
        )
        with suite.db.write() as session:
            print_q.set_printer_state(session, "FAILURE", "PRINTER DOWN")
        with (
            structlog.testing.capture_logs() as logged,
            print_scu(suite, contexts=(p.META, p.PRINT_JOB)) as scu,
        ):
            status, job_uid = print_film(scu)
            assert status == 0x0000 and job_uid is not None
            scu.wait_event(lambda e: e[0] == 1 and e[1] == p.PRINT_JOB)  # PENDING
            proxy.cut()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                e["event"] == "print_database_unavailable" for e in logged
            ):
                time.sleep(0.05)
            proxy.restore()
            with suite.db.write() as session:
                print_q.set_printer_state(session, "NORMAL", "NORMAL")
            job = wait_job(suite, job_uid)
    finally:
        proxy.close()
    waits = sum(e["event"] == "print_database_unavailable" for e in logged)
    print(
        f"\ndatabase cut under a job: the print worker waited {waits} time(s) for the "
        f"database, then the job ended {job.state.value}"
    )
    assert waits >= 1
    assert job.state is PrintJobState.DONE
