"""The common clients: DCMTK's storescu, findscu, movescu and echoscu.

Every client runs with ``TCP_NODELAY=1``: with Nagle's algorithm on at either end,
each DIMSE exchange on loopback waits ~40 ms for a delayed ACK, and the client
would then measure itself rather than the server. Counting what a server holds
(not timed) uses a pynetdicom SCU.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from bench.peers import CLIENT_AE, Running

CLIENT_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class ClientRun:
    seconds: float
    successes: int
    failures: int
    returncode: int
    output: str


def _run(cmd: Sequence[str], timeout: float) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.run(
        list(cmd),
        env=CLIENT_ENV,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    return time.perf_counter() - started, proc.returncode, proc.stdout + proc.stderr


def _store_cmd(running: Running, files: Sequence[Path]) -> list[str]:
    return [
        "storescu",
        "-v",
        "-aet",
        CLIENT_AE,
        "-aec",
        running.store_aet,
        "127.0.0.1",
        str(running.store_port),
        *map(str, files),
    ]


def _count_store(output: str, sent: int) -> tuple[int, int]:
    ok = output.count("Received Store Response (Success)")
    ok += output.count("Received Store Response (Warning")
    return ok, sent - ok


def storescu(running: Running, files: Sequence[Path], timeout: float = 1800) -> ClientRun:
    """One association sending ``files`` in order."""
    seconds, rc, out = _run(_store_cmd(running, files), timeout)
    ok, failed = _count_store(out, len(files))
    return ClientRun(seconds, ok, failed, rc, out[-2000:])


def storescu_dir(running: Running, directory: Path, timeout: float = 7200) -> ClientRun:
    """One association sending every ``*.dcm`` under ``directory`` (large loads)."""
    cmd = [
        "storescu",
        "-aet",
        CLIENT_AE,
        "-aec",
        running.store_aet,
        "+sd",
        "+r",
        "+sp",
        "*.dcm",
        "127.0.0.1",
        str(running.store_port),
        str(directory),
    ]
    seconds, rc, out = _run(cmd, timeout)
    return ClientRun(seconds, 0, out.count("Store SCU Failed"), rc, out[-2000:])


def storescu_parallel(
    running: Running, files: Sequence[Path], associations: int, timeout: float = 1800
) -> ClientRun:
    """``associations`` storescu processes at once, each sending its share of ``files``."""
    shares = [list(files[i::associations]) for i in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            _store_cmd(running, share),
            env=CLIENT_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for share in shares
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    seconds = time.perf_counter() - started
    ok = failed = 0
    for share, out in zip(shares, outputs, strict=True):
        s, f = _count_store(out, len(share))
        ok, failed = ok + s, failed + f
    rc = max(p.returncode for p in procs)
    errors = [o for o in outputs if "E:" in o or "F:" in o]
    return ClientRun(seconds, ok, failed, rc, (errors[0] if errors else "")[-2000:])


def findscu(running: Running, keys: dict[str, str], timeout: float = 600) -> ClientRun:
    """A Study Root C-FIND at STUDY level; ``keys`` values may be empty (return keys)."""
    cmd = [
        "findscu",
        "-v",
        "-S",
        "-aet",
        CLIENT_AE,
        "-aec",
        running.qr_aet,
        "-k",
        "QueryRetrieveLevel=STUDY",
    ]
    for keyword, value in keys.items():
        cmd += ["-k", f"{keyword}={value}" if value else keyword]
    cmd += ["127.0.0.1", str(running.qr_port)]
    seconds, rc, out = _run(cmd, timeout)
    matches = out.count("(Pending)")
    failed = int(rc != 0 or "Final Find Response (Success)" not in out)
    return ClientRun(seconds, matches, failed, rc, out[-1500:])


def movescu(running: Running, study_uid: str, dest_ae: str, timeout: float = 1800) -> ClientRun:
    cmd = [
        "movescu",
        "-S",
        "-aet",
        CLIENT_AE,
        "-aec",
        running.qr_aet,
        "-aem",
        dest_ae,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(running.qr_port),
    ]
    seconds, rc, out = _run(cmd, timeout)
    return ClientRun(seconds, 0, int(rc != 0), rc, out[-1500:])


def echoscu(
    running: Running, repeat: int = 1, port: int | None = None, aet: str | None = None
) -> ClientRun:
    cmd = ["echoscu", "-aet", CLIENT_AE, "-aec", aet or running.store_aet]
    if repeat > 1:
        cmd += ["--repeat", str(repeat)]
    cmd += ["127.0.0.1", str(port or running.store_port)]
    seconds, rc, out = _run(cmd, 60)
    return ClientRun(seconds, int(rc == 0), int(rc != 0), rc, out[-500:])


def count_images(running: Running, study_uid: str, series_uid: str) -> int:
    """How many instances of one series the peer's index answers for (IMAGE level)."""
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", running.qr_port, ae_title=running.qr_aet)
    if not assoc.is_established:
        return -1
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = ""
    found = 0
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                found += 1
    finally:
        assoc.release()
    return found
