"""Hostile and broken peers on raw sockets: the acceptors answer or drop them, and keep serving.

Every case is bounded in time (socket timeouts, small ACSE and network
timeouts). After all cases each acceptor still answers a C-ECHO, nothing of
an aborted C-STORE is kept, and the process's thread count returns to what it
was before the cases (no association or DUL thread is left behind).
"""

from __future__ import annotations

import functools
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import func, select

from db.models import Instance
from servers.core.runtime import Suite
from tests.helpers import CT, make_image
from tests.test_association import (
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    VERIFICATION,
    associate_rq,
    echo_ok,
    presentation_context,
    recv_pdu,
    wait_for,
)

A_ABORT = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0)
A_RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + bytes(4)
SMALL_TIMEOUTS = {"acse_timeout": 1, "network_timeout": 1}


@dataclass
class Outcome:
    """What the server did: the PDU types it sent, and whether it closed the connection."""

    sent: list[int]
    closed: bool


def _drain(sock: socket.socket) -> Outcome:
    sent: list[int] = []
    try:
        while True:
            pdu = recv_pdu(sock)
            if pdu is None:
                return Outcome(sent, closed=True)
            sent.append(pdu[0])
    except ConnectionResetError:
        return Outcome(sent, closed=True)
    except TimeoutError:
        return Outcome(sent, closed=False)


def _connect(suite: Suite, key: str) -> socket.socket:
    # Every server-side timer in these cases is 1 s; 10 s bounds a hang.
    return socket.create_connection(("127.0.0.1", suite.port_of(key)), timeout=10)


def send_then(suite: Suite, key: str, payload: bytes, *, close: bool) -> Outcome:
    """Send ``payload``; either close our side at once, or wait for the server to act."""
    with _connect(suite, key) as sock:
        if payload:
            sock.sendall(payload)
        if close:
            sock.shutdown(socket.SHUT_WR)
        return _drain(sock)


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IB", len(data) + 2, context_id) + bytes([control]) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _c_store_pdus(max_pdu: int) -> list[bytes]:
    """A C-STORE-RQ of a small CT image, as P-DATA-TF PDUs of at most ``max_pdu``."""
    ds = make_image(CT, rows=32, columns=32)
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0
    encoded = encode(ds, True, True)
    assert encoded is not None
    primitive.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return [P_DATA_TF(p).encode() for p in message.encode_msg(1, max_pdu)]


def _c_echo_command() -> bytes:
    primitive = C_ECHO()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def _established(suite: Suite, key: str, contexts: bytes) -> socket.socket:
    sock = _connect(suite, key)
    sock.sendall(associate_rq(suite.config.ae(key).title, contexts=contexts))
    reply = recv_pdu(sock)
    assert reply is not None and reply[0] == PDU_ASSOCIATE_AC
    return sock


def abort_mid_message(suite: Suite, key: str) -> Outcome:
    """Established association, half a DIMSE message, then A-ABORT."""
    if key == "storage_scp":
        contexts = presentation_context(1, CT, [ImplicitVRLittleEndian])
        pdus = _c_store_pdus(512)
        assert len(pdus) > 3, "the data set must span several fragments"
        partial = b"".join(pdus[:-1])  # the command and all but the last data fragment
    else:
        contexts = presentation_context(1, VERIFICATION, [ImplicitVRLittleEndian])
        command = _c_echo_command()
        partial = _p_data(1, 0x01, command[:20])  # a command fragment, not the last
    with _established(suite, key, contexts) as sock:
        sock.sendall(partial + A_ABORT)
        return _drain(sock)


def request_then_close(suite: Suite, key: str) -> Outcome:
    with _connect(suite, key) as sock:
        sock.sendall(associate_rq(suite.config.ae(key).title))
        sock.shutdown(socket.SHUT_RDWR)
    return Outcome([], closed=True)


def release_after_garbage_pdata(suite: Suite, key: str) -> Outcome:
    """A P-DATA-TF whose PDV list is malformed, on an established association."""
    contexts = presentation_context(1, VERIFICATION, [ImplicitVRLittleEndian])
    with _established(suite, key, contexts) as sock:
        sock.sendall(struct.pack(">BBI", 0x04, 0, 6) + struct.pack(">IH", 1000, 0))
        return _drain(sock)


def cases(
    suite: Suite, key: str
) -> dict[str, tuple[Callable[[], Outcome], Callable[[Outcome], bool]]]:
    """Case name -> (run it, what the server must have done)."""
    rng = random.Random(20240105)
    title = suite.config.ae(key).title
    request = associate_rq(title)
    aborted = lambda o: o.closed and o.sent == [PDU_ABORT]  # noqa: E731
    closed = lambda o: o.closed and PDU_ASSOCIATE_AC not in o.sent  # noqa: E731
    out: dict[str, tuple[Callable[[], Outcome], Callable[[Outcome], bool]]] = {}
    for n in range(3):
        # A valid PDU type with a random length, or an unknown type: never an association.
        junk = bytes(rng.randrange(256) for _ in range(64))
        out[f"random_bytes_{n}"] = (
            functools.partial(send_then, suite, key, junk, close=False),
            closed,
        )
    out["random_bytes_then_close"] = (
        lambda: send_then(suite, key, bytes(rng.randrange(256) for _ in range(300)), close=True),
        closed,
    )
    out["truncated_associate_rq"] = (
        lambda: send_then(suite, key, request[: len(request) // 2], close=True),
        closed,
    )
    out["truncated_associate_rq_then_silence"] = (
        lambda: send_then(suite, key, request[: len(request) // 2], close=False),
        closed,
    )
    out["huge_declared_length_then_close"] = (
        lambda: send_then(
            suite, key, struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + request[6:40], close=True
        ),
        closed,
    )
    out["unknown_pdu_type"] = (
        lambda: send_then(suite, key, struct.pack(">BBI", 0x09, 0, 4) + bytes(4), close=False),
        aborted,
    )
    out["p_data_before_association"] = (
        lambda: send_then(suite, key, _p_data(1, 0x03, _c_echo_command()), close=False),
        aborted,
    )
    out["release_before_association"] = (
        lambda: send_then(suite, key, A_RELEASE_RQ, close=False),
        aborted,
    )
    out["abort_before_association"] = (lambda: send_then(suite, key, A_ABORT, close=False), closed)
    out["associate_rq_then_abrupt_close"] = (lambda: request_then_close(suite, key), closed)
    out["abort_mid_message"] = (lambda: abort_mid_message(suite, key), closed)
    out["malformed_p_data_on_association"] = (
        lambda: release_after_garbage_pdata(suite, key),
        lambda o: o.closed and PDU_ABORT in o.sent,
    )
    out["silent_peer_closed_by_artim"] = (lambda: send_then(suite, key, b"", close=False), closed)
    return out


# Raw peers never reach the database; one backend keeps the run short.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("key", ["storage_scp", "query_scp"])
def test_broken_peers_are_dropped_and_the_server_keeps_serving(
    make_suite: Callable[..., Suite], key: str
) -> None:
    suite = make_suite({"ae": {key: SMALL_TIMEOUTS}})
    assert echo_ok(suite, key)
    assert wait_for(lambda: not suite.aes[key].ae.active_associations)
    baseline = threading.active_count()

    ran = []
    for name, (run, expected) in cases(suite, key).items():
        outcome = run()
        assert expected(outcome), f"{name}: server sent {outcome.sent}, closed={outcome.closed}"
        ran.append(name)
        assert echo_ok(suite, key), f"no C-ECHO after {name}"
    assert len(ran) == 15

    # Association threads finish within the small timeouts; none leaks.
    assert wait_for(lambda: threading.active_count() <= baseline, timeout=10), (
        f"{threading.active_count()} threads, {baseline} before the cases"
    )
    assert not suite.aes[key].ae.active_associations
    with suite.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    assert not [p for p in suite.config.storage_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_silent_peer_is_closed_after_the_acse_timeout(make_suite: Callable[..., Suite]) -> None:
    """ARTIM: a TCP connection that never sends an A-ASSOCIATE-RQ is closed."""
    suite = make_suite({"ae": {"storage_scp": {"acse_timeout": 1}}})
    with socket.create_connection(("127.0.0.1", suite.port_of("storage_scp")), timeout=10) as sock:
        assert sock.recv(1) == b""  # closed by the server, not by our 10 s timeout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_stalled_pdu_is_dropped_after_the_network_timeout(
    make_suite: Callable[..., Suite],
) -> None:
    """A PDU that stops arriving half-way: the low-level timeout closes the connection."""
    suite = make_suite({"ae": {"storage_scp": {"acse_timeout": 30, "network_timeout": 1}}})
    request = associate_rq(suite.config.ae("storage_scp").title)
    with socket.create_connection(("127.0.0.1", suite.port_of("storage_scp")), timeout=10) as sock:
        sock.sendall(request[:20])
        assert sock.recv(1) == b""
    assert echo_ok(suite)
