"""A fuzz corpus of malformed PDUs and data sets, a slow-loris peer and an association flood.

Every case ends in a documented answer: an A-ASSOCIATE-RJ with a row of the
rejection table, an A-ABORT, a closed connection, or a C-STORE status the
statement lists (the fixture fails on any undeclared status). Between batches a
well-formed peer must still get its C-ECHO, and the process's resident memory
must stay bounded. The corpus is generated from a fixed seed; the figures are
printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import errno
import gc
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND, N_CREATE, N_SET
from sqlalchemy import func, select

from db.models import Instance
from db.queries import mpps as mpps_q
from servers.core.network import REJECT_LIMIT, REJECTION_ROWS
from servers.core.runtime import Suite
from servers.print import tables as p
from tests.helpers import CT, associate, make_image, request_association
from tests.ris_helpers import MPPS, MWL, mpps_create, mpps_final, mwl_identifier
from tests.test_association import (
    associate_rq,
    echo_ok,
    presentation_context,
    recv_pdu,
    wait_for,
)
from tests.test_storage import encoded, send_raw

VERIFICATION = "1.2.840.10008.1.1"
DOCUMENTED_RSD = {row.rsd for row in REJECTION_ROWS}
SEED = 20241123
TIMEOUTS = {"acse_timeout": 2, "network_timeout": 1}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Hostile peers are a network matter: SQLite only (overrides conftest)."""
    return f"sqlite:///{tmp_path / 'index.sqlite3'}"


def vm_rss_kib() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- PDU level -----------------------------------------------------------------------------


def outcome(sock: socket.socket) -> str:
    """What the server did with what we sent: its first PDU, or the connection closing."""
    try:
        pdu = recv_pdu(sock)
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    except TimeoutError:
        return "timeout"
    if pdu is None:
        return "closed"
    kind, body = pdu
    if kind == 0x03:
        rsd = (body[1], body[2], body[3])
        return f"rejected {rsd}" if rsd in DOCUMENTED_RSD else f"UNDOCUMENTED rejection {rsd}"
    return {0x02: "accepted", 0x07: "aborted"}.get(kind, f"UNEXPECTED pdu 0x{kind:02X}")


def send_case(port: int, payload: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return "closed"
        except OSError as exc:
            # ENOTCONN: the server already closed the connection on what it had read.
            if exc.errno != errno.ENOTCONN:
                raise
            return "closed"
        return outcome(sock)


def pdu_corpus(title: str, rng: random.Random, abstract: str = CT) -> list[tuple[str, bytes]]:
    request = associate_rq(
        title,
        contexts=presentation_context(1, VERIFICATION, [ImplicitVRLittleEndian])
        + presentation_context(3, abstract, [ExplicitVRLittleEndian]),
    )
    cases: list[tuple[str, bytes]] = []
    for _ in range(40):
        cases.append(("truncated", request[: rng.randrange(1, len(request))]))
    for _ in range(60):
        data = bytearray(request)
        for _ in range(rng.randrange(1, 9)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(("bit flips", bytes(data)))
    # Lengths: the PDU length, and the item lengths of the variable part.
    for _ in range(30):
        data = bytearray(request)
        value = rng.choice([0, 1, 5, len(request) * 2, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])
        struct.pack_into(">I", data, 2, value)
        cases.append(("wrong PDU length", bytes(data)))
    for _ in range(40):
        data = bytearray(request)
        offset = rng.randrange(74, len(data) - 4)  # inside the items
        struct.pack_into(">H", data, offset, rng.choice([0, 1, 0xFFFF, rng.randrange(0x10000)]))
        cases.append(("wrong item length", bytes(data)))
    for _ in range(10):
        huge = struct.pack(">BBI", rng.choice([1, 4]), 0, 0xFFFFFFF0) + request[6:200]
        cases.append(("huge declared length", huge))
    for _ in range(40):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        first = rng.choice([b"", b"\x01", b"\x04", b"\x07"])
        cases.append(("random bytes", first + junk))
    return cases


# --- data set level ------------------------------------------------------------------------


def dataset_corpus(rng: random.Random) -> list[tuple[str, bytes]]:
    return mutations(encoded(make_image(rows=8, columns=8), implicit=False), rng)


def mutations(valid: bytes, rng: random.Random, scale: float = 1.0) -> list[tuple[str, bytes]]:
    """Malformed versions of ``valid`` (an explicit VR little endian data set)."""

    def times(n: int) -> range:
        return range(max(1, round(n * scale)))

    cases: list[tuple[str, bytes]] = []
    for _ in times(30):
        cases.append(("truncated data set", valid[: rng.randrange(1, len(valid))]))
    # Element headers: group(2) element(2) VR(2) length(2) in explicit VR little endian.
    headers = []
    i = 0
    while i + 8 <= len(valid):
        vr = valid[i + 4 : i + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR"):
            length = struct.unpack_from("<I", valid, i + 8)[0]
            headers.append((i, True))
            if length == 0xFFFFFFFF:  # undefined length: mutate the top level only
                break
            i += 12 + length
        else:
            length = struct.unpack_from("<H", valid, i + 6)[0]
            headers.append((i, False))
            i += 8 + length
    for _ in times(40):
        data = bytearray(valid)
        at, _long = rng.choice(headers)
        data[at + 4 : at + 6] = bytes(
            rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ?!\x00") for _ in range(2)
        )
        cases.append(("bad VR", bytes(data)))
    for _ in times(40):
        data = bytearray(valid)
        at, long = rng.choice(headers)
        if long:
            struct.pack_into(
                "<I", data, at + 8, rng.choice([1, 3, 0xFFFFFFF0, rng.randrange(1 << 31)])
            )
        else:
            struct.pack_into("<H", data, at + 6, rng.choice([1, 3, 0xFFFF, rng.randrange(1 << 16)]))
        cases.append(("wrong element length", bytes(data)))
    for _ in times(10):
        # An undefined-length sequence that is never closed.
        open_sequence = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
        cases.append(("unclosed sequence", valid + open_sequence + b"\xfe\xff\x00\xe0" + bytes(4)))
    for _ in times(30):
        cases.append(
            ("random bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        )
    return cases


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
def test_fuzz_corpus_every_case_documented_and_server_keeps_serving(
    make_suite: Callable[..., Suite],
) -> None:
    suite = make_suite({"ae": {"storage_scp": TIMEOUTS}})
    port = suite.port_of("storage_scp")
    rng = random.Random(SEED)
    assert echo_ok(suite)
    assert wait_for(lambda: not suite.aes["storage_scp"].ae.active_associations)
    threads_start = threading.active_count()
    rss_start = vm_rss_kib()
    started = time.monotonic()

    results: Counter[str] = Counter()
    pdu_cases = pdu_corpus("EX_STORE_SCP", rng)
    for n, (kind, payload) in enumerate(pdu_cases, start=1):
        result = send_case(port, payload)
        results[f"PDU {kind}: {result}"] += 1
        assert not result.startswith(("UNDOCUMENTED", "UNEXPECTED", "timeout")), (kind, result)
        if n % 50 == 0:
            assert echo_ok(suite), f"no C-ECHO after {n} PDU cases"
    rss_after_pdus = vm_rss_kib()

    data_cases = dataset_corpus(rng)
    statuses: Counter[int] = Counter()
    uid = make_image().SOPInstanceUID
    remaining = list(data_cases)
    while remaining:
        with associate(suite, "storage_scp", [(CT, [ExplicitVRLittleEndian])]) as assoc:
            while remaining and assoc.is_established:
                kind, data = remaining.pop(0)
                try:
                    rsp = send_raw(assoc, CT, uid, data)
                    code = int(rsp.Status) if "Status" in rsp else -1
                except Exception:  # the association went away under the request
                    code = -1
                label = f"0x{code:04X}" if code >= 0 else "aborted"
                statuses[code] += 1
                results[f"data set {kind}: {label}"] += 1
    rss_end = vm_rss_kib()
    elapsed = time.monotonic() - started

    assert echo_ok(suite)
    total = len(pdu_cases) + len(data_cases)
    print(
        f"\nfuzz: {total} cases ({len(pdu_cases)} PDU, {len(data_cases)} data set) in {elapsed:.1f} s"
    )
    for label, count in sorted(results.items()):
        print(f"  {count:4d}  {label}")
    print(
        f"VmRSS: {rss_start} KiB at start, {rss_after_pdus} KiB after PDUs, {rss_end} KiB at end "
        f"(+{rss_end - rss_start} KiB)"
    )
    assert total >= 350
    # Data set cases answer only with C-STORE statuses the statement lists (the fixture
    # checks each against the table) or end the association.
    assert set(statuses) <= {0x0000, 0xA900, 0xC000, 0xB000, -1}, statuses
    assert rss_end - rss_start < 64 * 1024, "resident memory grew by more than 64 MiB"
    # No association or DUL thread is left behind by any case.
    assert wait_for(lambda: threading.active_count() <= threads_start, timeout=15), (
        f"{threading.active_count()} threads, {threads_start} before the corpus"
    )
    # Whatever was not accepted left nothing behind; what was accepted is indexed.
    with suite.db.read() as session:
        indexed = session.scalar(select(func.count()).select_from(Instance)) or 0
    files = [p for p in suite.config.storage_dir.rglob("*") if p.is_file()]
    assert len(files) == indexed == statuses[0x0000] + statuses[0xB000]


# --- the RIS (DICOMSRV) and the printer (PRINT_SCP) -----------------------------------------


def send_raw_request(assoc: Association, abstract: str, req: Any) -> list[int]:
    """Send ``req`` (its data set already bytes) on ``abstract``'s context; every status
    answered until the final one, or [-1] when the association ended under it."""
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == abstract)
    assert context.context_id is not None
    statuses: list[int] = []
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context.context_id)
        while len(statuses) < 1000:
            _, rsp = assoc.dimse.get_msg(block=True)
            if rsp is None:
                return [*statuses, -1]
            statuses.append(int(rsp.Status))
            if statuses[-1] not in (0xFF00, 0xFF01):
                return statuses
    except Exception:  # the association went away under the request
        return [*statuses, -1]
    finally:
        assoc._reactor_checkpoint.set()
    return statuses


def ris_print_requests(rng: random.Random) -> list[tuple[str, str, str, Callable[[bytes], Any]]]:
    """(AE key, abstract syntax, label, request factory) per malformed data set."""
    cases: list[tuple[str, str, str, Callable[[bytes], Any]]] = []

    def c_find(data: bytes) -> Any:
        req = C_FIND()
        req.MessageID, req.AffectedSOPClassUID, req.Priority = 3, MWL, 2
        req.Identifier = BytesIO(data)
        return req

    def n_create(cls: str) -> Callable[[bytes], Any]:
        def make(data: bytes) -> Any:
            req = N_CREATE()
            req.MessageID, req.AffectedSOPClassUID = 4, cls
            req.AffectedSOPInstanceUID = generate_uid()
            req.AttributeList = BytesIO(data)
            return req

        return make

    def n_set(cls: str, uid: str) -> Callable[[bytes], Any]:
        def make(data: bytes) -> Any:
            req = N_SET()
            req.MessageID, req.RequestedSOPClassUID, req.RequestedSOPInstanceUID = 5, cls, uid
            req.ModificationList = BytesIO(data)
            return req

        return make

    session = Dataset()
    session.NumberOfCopies = 1
    session.FilmSessionLabel = "FUZZ"
    session.MediumType = "BLUE FILM"
    plut = Dataset()
    plut.PresentationLUTShape = "IDENTITY"
    sources: list[tuple[str, str, str, Dataset, Callable[[bytes], Any]]] = [
        ("ris_scp", MWL, "MWL C-FIND", mwl_identifier(PatientID="PAT*"), c_find),
        ("ris_scp", MPPS, "MPPS N-CREATE", mpps_create(), n_create(MPPS)),
        ("ris_scp", MPPS, "MPPS N-SET", mpps_final(), n_set(MPPS, FUZZ_STEP)),
        ("print_scp", p.META, "Film Session N-CREATE", session, n_create(p.FILM_SESSION)),
        ("print_scp", p.PLUT, "Presentation LUT N-CREATE", plut, n_create(p.PLUT)),
    ]
    for key, abstract, label, ds, make in sources:
        for kind, data in mutations(encoded(ds, implicit=False), rng, scale=0.5):
            cases.append((key, abstract, f"{label} {kind}", partial_request(make, data)))
    rng.shuffle(cases)
    return cases


def partial_request(make: Callable[[bytes], Any], data: bytes) -> Callable[[bytes], Any]:
    return lambda _unused: make(data)


FUZZ_STEP = "1.2.826.0.1.3680043.10.511.77.1"
RIS_PRINT_CONTEXTS = {
    "ris_scp": [(MWL, [ExplicitVRLittleEndian]), (MPPS, [ExplicitVRLittleEndian])],
    "print_scp": [(p.META, [ExplicitVRLittleEndian]), (p.PLUT, [ExplicitVRLittleEndian])],
}


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
def test_fuzz_corpus_against_the_ris_and_the_printer(make_suite: Callable[..., Suite]) -> None:
    """The archive's corpus, aimed at DICOMSRV (MWL, MPPS) and PRINT_SCP (print management):
    every case ends in a status the statements list (the fixture checks each), an
    A-ASSOCIATE-RJ of the table, an abort or a close, and both keep serving."""
    suite = make_suite({"ae": {"ris_scp": TIMEOUTS, "print_scp": TIMEOUTS}})
    rng = random.Random(SEED + 1)
    with associate(suite, "ris_scp", [MPPS]) as assoc:  # an IN PROGRESS step for the N-SETs
        assert assoc.send_n_create(mpps_create(), MPPS, FUZZ_STEP)[0].Status == 0x0000
    for key in RIS_PRINT_CONTEXTS:
        assert echo_ok(suite, key)
    threads_start = threading.active_count()
    rss_start = vm_rss_kib()
    started = time.monotonic()
    results: Counter[str] = Counter()
    pdu_total = 0
    for key, abstract in (("ris_scp", MWL), ("print_scp", p.META)):
        title = suite.config.ae(key).title
        cases = pdu_corpus(title, rng, abstract)[::2]  # half the archive's PDU corpus per AE
        pdu_total += len(cases)
        for n, (kind, payload) in enumerate(cases, start=1):
            result = send_case(suite.port_of(key), payload)
            results[f"{title} PDU {kind}: {result}"] += 1
            assert not result.startswith(("UNDOCUMENTED", "UNEXPECTED", "timeout")), (kind, result)
            if n % 50 == 0:
                assert echo_ok(suite, key), f"{title}: no C-ECHO after {n} PDU cases"
    requests = ris_print_requests(rng)
    for key in RIS_PRINT_CONTEXTS:
        remaining = [case for case in requests if case[0] == key]
        while remaining:
            with associate(suite, key, RIS_PRINT_CONTEXTS[key]) as assoc:
                while remaining and assoc.is_established:
                    _key, abstract, label, make = remaining.pop(0)
                    statuses = send_raw_request(assoc, abstract, make(b""))
                    final = statuses[-1]
                    answer = f"0x{final:04X}" if final >= 0 else "aborted"
                    results[f"{label}: {answer}"] += 1
    rss_end = vm_rss_kib()
    for key in RIS_PRINT_CONTEXTS:
        assert echo_ok(suite, key)
    total = pdu_total + len(requests)
    print(
        f"\nfuzz RIS and print: {total} cases ({pdu_total} PDU, {len(requests)} data set) "
        f"in {time.monotonic() - started:.1f} s"
    )
    for label, count in sorted(results.items()):
        print(f"  {count:4d}  {label}")
    print(f"VmRSS: {rss_start} KiB at start, {rss_end} KiB at end (+{rss_end - rss_start} KiB)")
    assert total >= 350
    assert rss_end - rss_start < 64 * 1024, "resident memory grew by more than 64 MiB"
    assert wait_for(lambda: threading.active_count() <= threads_start, timeout=15), (
        f"{threading.active_count()} threads, {threads_start} before the corpus"
    )
    # The step the N-SETs aimed at is still consistent: IN PROGRESS or final, never torn.
    with suite.db.read() as session:
        step = mpps_q.get_step(session, FUZZ_STEP)
        assert step is not None and step.state.value in ("IN PROGRESS", "COMPLETED", "DISCONTINUED")


# --- slow loris and flood -------------------------------------------------------------------


def test_slow_loris_is_dropped_at_the_acse_timeout_and_others_are_served(
    make_suite: Callable[..., Suite],
) -> None:
    suite = make_suite({"ae": {"storage_scp": TIMEOUTS}})
    port = suite.port_of("storage_scp")
    request = associate_rq("EX_STORE_SCP")
    lasted: list[float] = []

    def loris() -> None:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            try:
                for byte in request:  # one byte every 0.3 s: always under network_timeout
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                pass
            else:
                pytest.fail("the whole trickled request was read")
            lasted.append(time.monotonic() - start)

    peers = [threading.Thread(target=loris) for _ in range(20)]
    for peer in peers:
        peer.start()
    time.sleep(0.5)
    assert echo_ok(suite)  # while 20 peers trickle
    for peer in peers:
        peer.join(30)
    print(
        f"\nslow loris: 20 peers dropped after {min(lasted):.1f}-{max(lasted):.1f} s (acse_timeout 2 s)"
    )
    assert len(lasted) == 20 and max(lasted) < 10
    assert echo_ok(suite)


def test_association_flood_gets_2_3_2_and_the_server_recovers(
    make_suite: Callable[..., Suite],
) -> None:
    limit, flood = 4, 24
    suite = make_suite({"ae": {"storage_scp": {"max_associations": limit}}})
    port = suite.port_of("storage_scp")
    results: list[str] = []
    hold = threading.Event()
    lock = threading.Lock()

    def peer(n: int) -> None:
        ae = AE(ae_title=f"FLOOD{n:02d}")
        ae.acse_timeout = ae.network_timeout = 20
        ae.add_requested_context(VERIFICATION)
        assoc = request_association(ae, "127.0.0.1", port, ae_title="EX_STORE_SCP")
        if assoc.is_established:
            with lock:
                results.append("accepted")
            hold.wait(20)
            assoc.release()
        elif assoc.is_rejected:
            rj = assoc.acceptor.primitive
            with lock:
                results.append(str((rj.result, rj.result_source, rj.diagnostic)))
        else:
            with lock:
                results.append("aborted")

    threads = [threading.Thread(target=peer, args=(n,)) for n in range(flood)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(results) < flood and time.monotonic() < deadline:
        time.sleep(0.05)
    hold.set()
    for thread in threads:
        thread.join(30)
    counts = Counter(results)
    print(f"\nflood: {flood} simultaneous requests, limit {limit}: {dict(counts)}")
    assert counts["accepted"] == limit
    assert counts[str(REJECT_LIMIT)] == flood - limit
    time.sleep(0.2)
    # Slots are given back: a full set of associations is accepted again.
    for _ in range(limit):
        assert echo_ok(suite)
