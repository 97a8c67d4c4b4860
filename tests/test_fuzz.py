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
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from db.models import Instance
from servers.core.network import REJECT_LIMIT, REJECTION_ROWS
from servers.core.runtime import Suite
from tests.helpers import CT, associate, make_image
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


def pdu_corpus(title: str, rng: random.Random) -> list[tuple[str, bytes]]:
    request = associate_rq(
        title,
        contexts=presentation_context(1, VERIFICATION, [ImplicitVRLittleEndian])
        + presentation_context(3, CT, [ExplicitVRLittleEndian]),
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
    image = make_image(rows=8, columns=8)
    valid = encoded(image, implicit=False)
    cases: list[tuple[str, bytes]] = []
    for _ in range(30):
        cases.append(("truncated data set", valid[: rng.randrange(1, len(valid))]))
    # Element headers: group(2) element(2) VR(2) length(2) in explicit VR little endian.
    headers = []
    i = 0
    while i + 8 <= len(valid):
        vr = valid[i + 4 : i + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR"):
            length = struct.unpack_from("<I", valid, i + 8)[0]
            headers.append((i, True))
            i += 12 + length
        else:
            length = struct.unpack_from("<H", valid, i + 6)[0]
            headers.append((i, False))
            i += 8 + length
    for _ in range(40):
        data = bytearray(valid)
        at, _long = rng.choice(headers)
        data[at + 4 : at + 6] = bytes(
            rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ?!\x00") for _ in range(2)
        )
        cases.append(("bad VR", bytes(data)))
    for _ in range(40):
        data = bytearray(valid)
        at, long = rng.choice(headers)
        if long:
            struct.pack_into(
                "<I", data, at + 8, rng.choice([1, 3, 0xFFFFFFF0, rng.randrange(1 << 31)])
            )
        else:
            struct.pack_into("<H", data, at + 6, rng.choice([1, 3, 0xFFFF, rng.randrange(1 << 16)]))
        cases.append(("wrong element length", bytes(data)))
    for _ in range(10):
        # An undefined-length sequence that is never closed.
        open_sequence = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
        cases.append(("unclosed sequence", valid + open_sequence + b"\xfe\xff\x00\xe0" + bytes(4)))
    for _ in range(30):
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
        assoc = ae.associate("127.0.0.1", port, ae_title="EX_STORE_SCP")
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
