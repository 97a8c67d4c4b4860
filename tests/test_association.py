"""Association policies: every row of the rejection table, over real sockets.

Each rejection is read from the A-ASSOCIATE-RJ the server sent (pynetdicom's
requestor, or a raw socket where pynetdicom cannot build the request), and
after each one the server must still accept a good association.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from servers.core.network import (
    APPLICATION_CONTEXT_NAME,
    REJECT_APPLICATION_CONTEXT,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LIMIT,
    REJECT_NO_REASON,
    REJECT_PROTOCOL_VERSION,
    REJECT_UNPARSABLE,
    REJECTION_ROWS,
)
from servers.core.runtime import Suite
from tests.helpers import associate, request_association


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Negotiation does not touch the database: SQLite only (overrides conftest)."""
    return f"sqlite:///{tmp_path / 'index.sqlite3'}"


VERIFICATION = "1.2.840.10008.1.1"
UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.1"
PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_ABORT = 0x07

RSD = tuple[int, int, int]


# --- raw PDUs ---------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def presentation_context(context_id: int, abstract: str, transfer: Sequence[str]) -> bytes:
    body = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, abstract.encode())
    for ts in transfer:
        body += _item(0x40, ts.encode())
    return _item(0x20, body)


def associate_rq(
    called: str,
    calling: str = "RAW_SCU",
    *,
    app_context: str = APPLICATION_CONTEXT_NAME,
    contexts: bytes | None = None,
    protocol_version: int = 1,
    max_pdu: int = 16384,
) -> bytes:
    """A hand-encoded A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""
    if contexts is None:
        contexts = presentation_context(1, VERIFICATION, [ImplicitVRLittleEndian])
    user_info = _item(
        0x50,
        _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999.2"),
    )
    body = (
        struct.pack(">HH", protocol_version, 0)
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + _item(0x10, app_context.encode())
        + contexts
        + user_info
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def recv_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU as (type, body), or None when the peer closed the connection."""
    header = _recv_exactly(sock, 6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBI", header)
    body = _recv_exactly(sock, length)
    return None if body is None else (pdu_type, body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def connection_closed(sock: socket.socket) -> bool:
    """True once the peer has closed (reads EOF, or the connection was reset)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@contextmanager
def raw_connection(suite: Suite, key: str, timeout: float = 10) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", suite.port_of(key)), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def raw_rejection(suite: Suite, key: str, pdu: bytes) -> RSD:
    """Send ``pdu`` on a fresh connection; the (result, source, reason) of the RJ."""
    with raw_connection(suite, key) as sock:
        sock.sendall(pdu)
        reply = recv_pdu(sock)
        assert reply is not None, "connection closed without an A-ASSOCIATE-RJ"
        pdu_type, body = reply
        assert pdu_type == PDU_ASSOCIATE_RJ, f"expected A-ASSOCIATE-RJ, got PDU type {pdu_type}"
        _, result, source, reason = body
        # The acceptor closes the connection after the RJ (ARTIM, PS3.8 9.2).
        assert connection_closed(sock)
        return (result, source, reason)


# --- pynetdicom requestor helpers -----------------------------------------------


def request(
    suite: Suite,
    key: str,
    contexts: Sequence[tuple[str, Sequence[str]]] = ((VERIFICATION, [ImplicitVRLittleEndian]),),
    *,
    calling_ae: str = "TEST_SCU",
    called_ae: str | None = None,
) -> tuple[AE, Association]:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for abstract, transfer in contexts:
        ae.add_requested_context(abstract, list(transfer))
    title = called_ae or suite.config.ae(key).title
    return ae, request_association(ae, "127.0.0.1", suite.port_of(key), ae_title=title)


def rejection(suite: Suite, key: str, **kwargs: Any) -> RSD:
    ae, assoc = request(suite, key, **kwargs)
    try:
        assert assoc.is_rejected, "association was not rejected"
        rj = assoc.acceptor.primitive
        assert rj is not None
        return (rj.result, rj.result_source, rj.diagnostic)  # type: ignore[return-value]
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def echo_ok(suite: Suite, key: str = "storage_scp", calling_ae: str = "TEST_SCU") -> bool:
    with associate(suite, key, [VERIFICATION], calling_ae=calling_ae) as assoc:
        return bool(assoc.send_c_echo().Status == 0x0000)


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def no_associations(suite: Suite, key: str) -> Callable[[], bool]:
    return lambda: not suite.aes[key].ae.active_associations


# --- the table ------------------------------------------------------------------


def test_every_rejection_row_is_a_legal_ps3_8_combination() -> None:
    legal = {1: {1, 2, 3, 7}, 2: {1, 2}, 3: {1, 2}}
    for row in REJECTION_ROWS:
        assert row.result in (1, 2)
        assert row.reason in legal[row.source], row
        # Transient results are the provider's limits; permanent ones the rest.
        assert (row.result == 2) == (row.source == 3), row


@pytest.mark.parametrize("key", ["storage_scp", "query_scp"])
def test_total_limit_rejects_2_3_2(make_suite: Callable[..., Suite], key: str) -> None:
    suite = make_suite({"ae": {key: {"max_associations": 1}}})
    with associate(suite, key, [VERIFICATION]) as held:
        assert rejection(suite, key) == REJECT_LIMIT
        assert rejection(suite, key, calling_ae="OTHER_SCU") == REJECT_LIMIT
        assert held.send_c_echo().Status == 0x0000
    assert wait_for(no_associations(suite, key))
    assert echo_ok(suite, key)


def test_per_calling_ae_limit_rejects_2_3_2(make_suite: Callable[..., Suite]) -> None:
    suite = make_suite({"ae": {"storage_scp": {"max_associations_per_calling_ae": 1}}})
    with associate(suite, "storage_scp", [VERIFICATION], calling_ae="SCU_A"):
        assert rejection(suite, "storage_scp", calling_ae="SCU_A") == REJECT_LIMIT
        # Another calling AE is counted separately.
        assert echo_ok(suite, calling_ae="SCU_B")
    assert wait_for(no_associations(suite, "storage_scp"))
    assert echo_ok(suite, calling_ae="SCU_A")


def test_simultaneous_requests_cannot_both_pass_a_limit_of_one(
    make_suite: Callable[..., Suite],
) -> None:
    suite = make_suite({"ae": {"storage_scp": {"max_associations": 1}}})
    attempts = 4
    start = threading.Barrier(attempts)
    done = threading.Barrier(attempts)
    outcomes: list[str] = []

    def attempt(n: int) -> None:
        start.wait(timeout=10)
        ae, assoc = request(suite, "storage_scp", calling_ae=f"SCU_{n}")
        try:
            if assoc.is_established:
                outcomes.append("accepted")
            elif assoc.is_rejected:
                rj = assoc.acceptor.primitive
                assert rj is not None
                outcomes.append(str((rj.result, rj.result_source, rj.diagnostic)))
            else:
                outcomes.append("other")
            # Hold every association until all attempts have their answer.
            done.wait(timeout=20)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == sorted(["accepted"] + [str(REJECT_LIMIT)] * (attempts - 1))
    assert wait_for(no_associations(suite, "storage_scp"))
    assert echo_ok(suite)


def test_calling_ae_allow_list_rejects_1_1_3(make_suite: Callable[..., Suite]) -> None:
    suite = make_suite({"ae": {"query_scp": {"calling_ae_allow": ["GOOD_SCU"]}}})
    assert rejection(suite, "query_scp", calling_ae="BAD_SCU") == REJECT_CALLING_AE
    assert echo_ok(suite, "query_scp", calling_ae="GOOD_SCU")


@pytest.mark.parametrize("key", ["storage_scp", "query_scp"])
def test_wrong_called_ae_rejects_1_1_7(suite: Suite, key: str) -> None:
    assert rejection(suite, key, called_ae="NOT_ME") == REJECT_CALLED_AE
    assert echo_ok(suite, key)


def test_called_ae_check_can_be_switched_off(make_suite: Callable[..., Suite]) -> None:
    suite = make_suite({"ae": {"storage_scp": {"require_called_ae": False}}})
    ae, assoc = request(suite, "storage_scp", called_ae="ANY_TITLE")
    try:
        assert assoc.is_established
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.parametrize("key", ["storage_scp", "query_scp"])
def test_other_application_context_rejects_1_1_2(suite: Suite, key: str) -> None:
    title = suite.config.ae(key).title
    pdu = associate_rq(title, app_context="1.2.826.0.1.3680043.9.9999.3")
    assert raw_rejection(suite, key, pdu) == REJECT_APPLICATION_CONTEXT
    assert echo_ok(suite, key)


def test_raw_request_with_the_right_context_is_accepted(suite: Suite) -> None:
    """The raw encoder itself is sound: the same PDU with the DICOM context is accepted."""
    with raw_connection(suite, "storage_scp") as sock:
        sock.sendall(associate_rq(suite.config.ae("storage_scp").title))
        reply = recv_pdu(sock)
        assert reply is not None and reply[0] == PDU_ASSOCIATE_AC


def test_only_unknown_abstract_syntaxes_rejects_1_1_1(suite: Suite) -> None:
    contexts = [(UNKNOWN_SOP_CLASS, [ImplicitVRLittleEndian])]
    assert rejection(suite, "storage_scp", contexts=contexts) == REJECT_NO_REASON
    assert echo_ok(suite)


def test_only_unsupported_transfer_syntaxes_rejects_1_1_1(suite: Suite) -> None:
    # Verification is Implicit VR Little Endian only on both SCPs (digest A10).
    contexts = [(VERIFICATION, [ExplicitVRLittleEndian])]
    assert rejection(suite, "query_scp", contexts=contexts) == REJECT_NO_REASON
    assert echo_ok(suite, "query_scp")


def test_ip_allow_list_rejects_1_1_1(make_suite: Callable[..., Suite]) -> None:
    suite = make_suite(
        {
            "ae": {
                "storage_scp": {"ip_allow": ["10.0.0.0/8"]},
                "query_scp": {"ip_allow": ["10.0.0.0/8", "127.0.0.1/32"]},
            }
        }
    )
    assert rejection(suite, "storage_scp") == REJECT_NO_REASON
    assert rejection(suite, "storage_scp") == REJECT_NO_REASON
    # Each SCP has its own list; the process keeps serving.
    assert echo_ok(suite, "query_scp")


def test_unparsable_request_rejects_1_2_1(suite: Suite) -> None:
    title = suite.config.ae("storage_scp").title
    good = associate_rq(title)
    # A presentation context item whose declared length overruns the PDU.
    broken_context = struct.pack(">BBH", 0x20, 0, 400) + bytes(8)
    bad = associate_rq(title, contexts=broken_context)
    assert raw_rejection(suite, "storage_scp", bad) == REJECT_UNPARSABLE
    # An unknown variable item type.
    body = good[6:] + _item(0x77, b"junk")
    unknown_item = struct.pack(">BBI", 0x01, 0, len(body)) + body
    assert raw_rejection(suite, "storage_scp", unknown_item) == REJECT_UNPARSABLE
    assert echo_ok(suite)


def test_protocol_version_without_bit_0_rejects_1_2_2(suite: Suite) -> None:
    title = suite.config.ae("query_scp").title
    pdu = associate_rq(title, protocol_version=2)
    assert raw_rejection(suite, "query_scp", pdu) == REJECT_PROTOCOL_VERSION
    assert echo_ok(suite, "query_scp")


def test_protocol_version_bit_0_is_all_a_version_1_acceptor_tests(suite: Suite) -> None:
    with raw_connection(suite, "query_scp") as sock:
        sock.sendall(associate_rq(suite.config.ae("query_scp").title, protocol_version=3))
        reply = recv_pdu(sock)
        assert reply is not None and reply[0] == PDU_ASSOCIATE_AC


def test_unknown_abstract_syntax_next_to_a_good_one(suite: Suite) -> None:
    """Per-context results: 3 for an unknown abstract syntax, 4 for transfer syntaxes."""
    contexts = [
        (VERIFICATION, [ImplicitVRLittleEndian]),
        (UNKNOWN_SOP_CLASS, [ImplicitVRLittleEndian]),
        (VERIFICATION, [ExplicitVRLittleEndian]),
    ]
    ae, assoc = request(suite, "storage_scp", contexts=contexts)
    try:
        assert assoc.is_established
        accepted = [(cx.context_id, cx.abstract_syntax) for cx in assoc.accepted_contexts]
        assert accepted == [(1, VERIFICATION)]
        results = {cx.context_id: cx.result for cx in assoc.rejected_contexts}
        assert results == {3: 3, 5: 4}
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
        ae.shutdown()


def test_idle_association_is_aborted_after_idle_timeout(make_suite: Callable[..., Suite]) -> None:
    suite = make_suite({"ae": {"storage_scp": {"idle_timeout": 1}}})
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        # The timer restarts on every PDU; with nothing sent, the SCP aborts.
        assert wait_for(lambda: assoc.is_aborted, timeout=10)
    assert wait_for(no_associations(suite, "storage_scp"))
    assert echo_ok(suite)


def test_echo_resets_the_idle_timer(make_suite: Callable[..., Suite]) -> None:
    suite = make_suite({"ae": {"storage_scp": {"idle_timeout": 1}}})
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert assoc.send_c_echo().Status == 0x0000
            time.sleep(0.3)
        assert assoc.is_established


# --- TCP_NODELAY ----------------------------------------------------------------


def _nodelay(assoc: Association) -> int:
    sock = assoc.dul.socket
    assert sock is not None and sock.socket is not None
    return int(sock.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.mark.parametrize("key", ["storage_scp", "query_scp"])
def test_accepted_sockets_have_tcp_nodelay(suite: Suite, key: str) -> None:
    with associate(suite, key, [VERIFICATION]) as assoc:
        server_side = suite.aes[key].ae.active_associations
        assert len(server_side) == 1
        assert _nodelay(server_side[0]) == 1
        # Control: pynetdicom's own requestor leaves Nagle on, so the probe can tell.
        assert _nodelay(assoc) == 0


def test_opened_sockets_have_tcp_nodelay(suite: Suite) -> None:
    from tests.conftest import free_port

    peer = AE(ae_title="PEER_SCP")
    peer.add_supported_context(VERIFICATION)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False)
    try:
        ae = suite.requestor("storage_scu")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", port, ae_title="PEER_SCP")
        try:
            assert assoc.is_established
            assert _nodelay(assoc) == 1
            assert wait_for(lambda: bool(peer.active_associations))
            assert _nodelay(peer.active_associations[0]) == 0
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
            ae.shutdown()
    finally:
        assert server is not None
        server.shutdown()
        peer.shutdown()
