"""The common clients: DCMTK's storescu, findscu, movescu and echoscu.

Every client runs with ``TCP_NODELAY=1``: with Nagle's algorithm on at either end,
each DIMSE exchange on loopback waits ~40 ms for a delayed ACK, and the client
would then measure itself rather than the server. Counting what a server holds
(not timed) uses a pynetdicom SCU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from bench.peers import CLIENT_AE, MPPS, MWL, PRINT, Running

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


def findscu_worklist(running: Running, keys: dict[str, str], timeout: float = 600) -> ClientRun:
    """A Modality Worklist C-FIND (``findscu -W``); ``keys`` as in :func:`findscu`."""
    port, aet = running.endpoint(MWL)
    cmd = ["findscu", "-v", "-W", "-aet", CLIENT_AE, "-aec", aet]
    for keyword, value in keys.items():
        cmd += ["-k", f"{keyword}={value}" if value else keyword]
    cmd += ["127.0.0.1", str(port)]
    seconds, rc, out = _run(cmd, timeout)
    matches = out.count("(Pending)")
    failed = int(rc != 0 or "Final Find Response (Success)" not in out)
    return ClientRun(seconds, matches, failed, rc, out[-1500:])


def _nodelay(assoc: Any) -> None:
    """TCP_NODELAY on a pynetdicom SCU's socket, as for the DCMTK clients: pynetdicom
    writes a message's command and data set as separate PDUs, and with Nagle's
    algorithm on the second waits ~40 ms for the server's delayed ACK."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- MPPS -------------------------------------------------------------------------------

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"


def mpps_in_progress(accession: str, patient_id: str, patient_name: str) -> Dataset:
    """An N-CREATE data set for the performed step of the scheduled step ``accession``."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    item = Dataset()
    item.StudyInstanceUID = generate_uid()
    item.AccessionNumber = accession
    item.RequestedProcedureID = accession
    item.ReferencedStudySequence = []
    item.ScheduledProcedureStepID = ""
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = CLIENT_AE
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20261201"
    ds.PerformedProcedureStepStartTime = "100500"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = ""
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = ""
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def mpps_completed() -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = "20261201"
    ds.PerformedProcedureStepEndTime = "103000"
    series = Dataset()
    series.PerformingPhysicianName = ""
    series.ProtocolName = "HEAD"
    series.OperatorsName = ""
    series.SeriesInstanceUID = generate_uid()
    series.SeriesDescription = ""
    series.RetrieveAETitle = ""
    series.ReferencedImageSequence = []
    series.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds.PerformedSeriesSequence = [series]
    return ds


@dataclass(frozen=True)
class MppsRun:
    seconds: float
    completed: int  # N-CREATE and N-SET both answered Success
    failures: int
    detail: str


def mpps_round_trips(running: Running, steps: Sequence[tuple[str, str, str]]) -> MppsRun:
    """One association: per (accession, patient id, name) an N-CREATE (IN PROGRESS) and an
    N-SET (COMPLETED) of the same instance, one after the other."""
    port, aet = running.endpoint(MPPS)
    ae = AE(ae_title=CLIENT_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MPPS_SOP_CLASS)
    # Built before the clock starts: the client's own encoding is not the server's time.
    creates = [mpps_in_progress(*step) for step in steps]
    finals = [mpps_completed() for _ in steps]
    uids = [str(generate_uid()) for _ in steps]
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        return MppsRun(time.perf_counter() - started, 0, len(steps), "association refused")
    _nodelay(assoc)
    ok, detail = 0, ""
    try:
        for create, final, uid in zip(creates, finals, uids, strict=True):
            if not assoc.is_established:
                # pynetdicom aborts when a response misses its DIMSE timeout; the
                # remaining steps count as failed rather than ending the whole run.
                detail = "association aborted (no response within the DIMSE timeout)"
                break
            status, _ = assoc.send_n_create(create, MPPS_SOP_CLASS, uid)
            if not status or status.Status != 0x0000:
                detail = f"N-CREATE status {status.get('Status', 'none') if status else 'none'}"
                continue
            if not assoc.is_established:
                continue
            status, _ = assoc.send_n_set(final, MPPS_SOP_CLASS, uid)
            if not status or status.Status != 0x0000:
                detail = f"N-SET status {status.get('Status', 'none') if status else 'none'}"
                continue
            ok += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return MppsRun(time.perf_counter() - started, ok, len(steps) - ok, detail)


# --- print ------------------------------------------------------------------------------

PRINT_META = "1.2.840.10008.5.1.1.9"
FILM_SESSION = "1.2.840.10008.5.1.1.1"
FILM_BOX = "1.2.840.10008.5.1.1.2"
IMAGE_BOX = "1.2.840.10008.5.1.1.4"
PRINT_JOB = "1.2.840.10008.5.1.1.14"
JOB_DONE, JOB_FAILURE = 3, 4  # Print Job event type IDs (PS3.4 H.4.7.1)


def grayscale_item(rows: int, columns: int, bits: int, seed: int) -> Dataset:
    """A Basic Grayscale Image Sequence item of noise-free ramps (8 or 12 bits stored)."""
    item = Dataset()
    item.SamplesPerPixel = 1
    item.PhotometricInterpretation = "MONOCHROME2"
    item.Rows = rows
    item.Columns = columns
    item.PixelAspectRatio = [1, 1]
    item.BitsAllocated = 8 if bits == 8 else 16
    item.BitsStored = bits
    item.HighBit = bits - 1
    item.PixelRepresentation = 0
    top = (1 << bits) - 1
    values = [((x + y + seed * 37) * top // (rows + columns)) % (top + 1)
              for y in range(rows) for x in range(columns)]  # fmt: skip
    if bits == 8:
        item.PixelData = bytes(values)
        item["PixelData"].VR = "OB"
    else:
        item.PixelData = b"".join(v.to_bytes(2, "little") for v in values)
        item["PixelData"].VR = "OW"
    return item


@dataclass(frozen=True)
class FilmRun:
    accepted: float  # N-CREATE film session to the N-ACTION (print) Success response
    seconds: float  # to "done": the DONE event report when waited for, else ``accepted``
    ok: bool
    job_uid: str
    detail: str


def print_film(
    running: Running,
    items: Sequence[Dataset],
    display_format: str,
    wait_job: bool,
    timeout: float = 30,
) -> FilmRun:
    """One association, one film: N-CREATE film session and film box, N-SET every image
    box, N-ACTION print. Done is the Print Job's DONE N-EVENT-REPORT when ``wait_job``
    (the SCP reports the film rendered), else the N-ACTION's Success response."""
    port, aet = running.endpoint(PRINT)
    events: list[tuple[int, str]] = []
    lock = threading.Lock()

    def on_event(event: Any) -> tuple[int, None]:
        with lock:
            events.append((int(event.event_type), str(event.request.AffectedSOPInstanceUID)))
        return 0x0000, None

    ae = AE(ae_title=CLIENT_AE)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = timeout
    ae.maximum_pdu_size = 0
    for cx in (PRINT_META, PRINT_JOB):
        ae.add_requested_context(cx)
    started = time.perf_counter()
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=aet, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_event)]
    )
    if not assoc.is_established:
        return FilmRun(0, 0, False, "", "association refused")
    _nodelay(assoc)
    try:
        return _print_session(
            assoc, items, display_format, wait_job, timeout, started, events, lock
        )
    except RuntimeError as exc:  # a send after pynetdicom aborted on a DIMSE timeout
        return FilmRun(0, 0, False, "", f"association aborted: {exc}")
    finally:
        if assoc.is_established:
            assoc.release()


def _print_session(
    assoc: Any,
    items: Sequence[Dataset],
    display_format: str,
    wait_job: bool,
    timeout: float,
    started: float,
    events: list[tuple[int, str]],
    lock: threading.Lock,
) -> FilmRun:
    ok_codes = (0x0000, 0xB600, 0xB602, 0xB603, 0x0107, 0x0116)
    job_uid, detail = "", ""
    session = Dataset()
    session.NumberOfCopies = 1
    session_uid = str(generate_uid())
    status, _ = assoc.send_n_create(session, FILM_SESSION, session_uid, meta_uid=PRINT_META)
    if not status or status.Status not in ok_codes:
        return FilmRun(0, 0, False, "", f"film session: {status}")
    box = Dataset()
    box.ImageDisplayFormat = display_format
    ref = Dataset()
    ref.ReferencedSOPClassUID = FILM_SESSION
    ref.ReferencedSOPInstanceUID = session_uid
    box.ReferencedFilmSessionSequence = [ref]
    box_uid = str(generate_uid())
    status, attrs = assoc.send_n_create(box, FILM_BOX, box_uid, meta_uid=PRINT_META)
    if not status or status.Status not in ok_codes or attrs is None:
        return FilmRun(0, 0, False, "", f"film box: {status}")
    boxes = [str(b.ReferencedSOPInstanceUID) for b in attrs.ReferencedImageBoxSequence]
    for position, (image_box, item) in enumerate(zip(boxes, items, strict=False), start=1):
        ds = Dataset()
        ds.ImageBoxPosition = position
        ds.BasicGrayscaleImageSequence = [item]
        status, _ = assoc.send_n_set(ds, IMAGE_BOX, image_box, meta_uid=PRINT_META)
        if not status or status.Status not in ok_codes:
            return FilmRun(0, 0, False, "", f"image box {position}: {status}")
    status, reply = assoc.send_n_action(None, 1, FILM_BOX, box_uid, meta_uid=PRINT_META)
    if not status or status.Status not in ok_codes:
        return FilmRun(0, 0, False, "", f"print: {status}")
    # (2100,0500): pydicom calls it ReferencedPrintJobSequencePullStoredPrint.
    accepted = time.perf_counter() - started
    if reply is not None and 0x21000500 in reply and reply[0x21000500].value:
        job_uid = str(reply[0x21000500].value[0].ReferencedSOPInstanceUID)
    if wait_job and not job_uid:
        return FilmRun(0, 0, False, "", "N-ACTION reply names no print job")
    if wait_job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                final = [e for e, uid in events if uid == job_uid and e in (JOB_DONE, JOB_FAILURE)]
            if final:
                break
            time.sleep(0.002)
        else:
            return FilmRun(0, 0, False, job_uid, "no DONE event report in time")
        if final[0] != JOB_DONE:
            return FilmRun(0, 0, False, job_uid, "print job FAILURE")
    seconds = time.perf_counter() - started
    assoc.send_n_delete(FILM_SESSION, session_uid, meta_uid=PRINT_META)
    return FilmRun(accepted, seconds, True, job_uid, detail)
