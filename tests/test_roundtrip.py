"""The issue's 'done when': DCMTK tools store, find and move against `dicomlab serve`.

The suite runs as a real `dicomlab serve` process configured only through the
environment, as a user would start it; DCMTK's storescu, findscu, movescu and a
storescp destination are the independent clients. DCMTK has no Storage
Commitment SCU, so the commitment step uses pynetdicom.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from tests.conftest import free_port
from tests.helpers import CT, free_ports_env, make_image, write_part10

COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on {port} after {timeout}s")


@pytest.fixture
def served(tmp_path: Path, dcmtk) -> Iterator[dict[str, object]]:
    """`dicomlab serve` with a DCMTK storescp registered as move destination DEST."""
    storescp = dcmtk("storescp")
    dest_port, store_port, query_port = free_port(), free_port(), free_port()
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    dest = subprocess.Popen(
        [storescp, "-aet", "DEST", "-od", str(dest_dir), str(dest_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DICOMLAB_")},
        "DICOMLAB_DATA_DIR": str(tmp_path / "data"),
        "DICOMLAB_HOST": "127.0.0.1",
        **free_ports_env(),
        "DICOMLAB_AE__STORAGE_SCP__PORT": str(store_port),
        "DICOMLAB_AE__QUERY_SCP__PORT": str(query_port),
        "DICOMLAB_REMOTE__DEST__HOST": "127.0.0.1",
        "DICOMLAB_REMOTE__DEST__PORT": str(dest_port),
        "DICOMLAB_LOG_FORMAT": "json",
    }
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "servers.core.cli", "serve"], env=env, stdout=log, stderr=log
    )
    try:
        _wait_for_port(store_port, server)
        _wait_for_port(query_port, server)
        _wait_for_port(dest_port, dest)
        yield {
            "store_port": store_port,
            "query_port": query_port,
            "dest_dir": dest_dir,
            "log": tmp_path / "serve.log",
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=15) == 0, "dicomlab serve did not stop cleanly"
        finally:
            dest.terminate()
            dest.wait(timeout=10)
            log.close()


def test_store_find_move_commit_with_dcmtk(served, tmp_path: Path, dcmtk) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    files = []
    images = []
    for number in range(1, 4):
        ds = make_image(
            CT,
            patient_id="RT001",
            patient_name="ROUND^TRIP",
            study_uid=study_uid,
            series_uid=series_uid,
            InstanceNumber=number,
        )
        images.append(ds)
        files.append(write_part10(ds, tmp_path / f"ct{number}.dcm"))

    # Store with DCMTK storescu.
    store = subprocess.run(
        [
            dcmtk("storescu"),
            "-aec",
            "EX_STORE_SCP",
            "127.0.0.1",
            str(served["store_port"]),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert store.returncode == 0, store.stderr

    # Find at study level with DCMTK findscu, responses extracted to files.
    found_dir = tmp_path / "found"
    found_dir.mkdir()
    find = subprocess.run(
        [
            dcmtk("findscu"),
            "-S",
            "-aec",
            "EX_QUERY_SCP",
            "-X",
            "-od",
            str(found_dir),
            "127.0.0.1",
            str(served["query_port"]),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=RT001",
            "-k",
            "StudyInstanceUID",
            "-k",
            "PatientName",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert find.returncode == 0, find.stderr
    responses = [dcmread(p) for p in sorted(found_dir.iterdir())]
    assert [r.StudyInstanceUID for r in responses] == [study_uid]
    assert str(responses[0].PatientName) == "ROUND^TRIP"
    assert responses[0].RetrieveAETitle == "EX_QUERY_SCP"

    # Move the study to the DCMTK storescp destination.
    move = subprocess.run(
        [
            dcmtk("movescu"),
            "-S",
            "-aec",
            "EX_QUERY_SCP",
            "-aem",
            "DEST",
            "127.0.0.1",
            str(served["query_port"]),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert move.returncode == 0, move.stderr
    received = sorted(dcmread(p).SOPInstanceUID for p in Path(served["dest_dir"]).iterdir())
    assert received == sorted(ds.SOPInstanceUID for ds in images)

    # Ask for storage commitment and get the report on the same association.
    reports: list[Dataset] = []

    def on_report(event: evt.Event) -> int:
        reports.append(event.event_information)
        return 0x0000

    ae = AE(ae_title="RT_MODALITY")
    ae.add_requested_context(COMMITMENT)
    assoc = ae.associate(
        "127.0.0.1",
        int(served["store_port"]),
        ae_title="EX_STORE_SCP",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    request = Dataset()
    request.TransactionUID = generate_uid()
    request.ReferencedSOPSequence = []
    for ds in images:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        request.ReferencedSOPSequence.append(item)
    status, _ = assoc.send_n_action(request, 1, COMMITMENT, COMMITMENT_INSTANCE)
    assert status.Status == 0x0000
    deadline = time.monotonic() + 20
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)
    assoc.release()
    ae.shutdown()
    assert reports, "no N-EVENT-REPORT arrived"
    report = reports[0]
    assert report.TransactionUID == request.TransactionUID
    committed = sorted(i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence)
    assert committed == sorted(ds.SOPInstanceUID for ds in images)
    assert "FailedSOPSequence" not in report

    echo = subprocess.run(
        [dcmtk("echoscu"), "-aec", "EX_STORE_SCP", "127.0.0.1", str(served["store_port"])],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
