"""The event-driven reactors (servers.core.reactor) over real sockets.

The reactors only change how the DUL and association threads wait; these tests
check that everything the waits must not miss still happens: DIMSE traffic, the
ARTIM and idle timers, peer release and abort, a request sent from another
thread, pipelined PDUs (over TLS too, where select() cannot see decrypted bytes)
and the requestor associations our AEs open. Bounds are generous functional
limits, not timings.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.pdu import A_ASSOCIATE_RQ, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    A_RELEASE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from servers.core import network, reactor
from servers.core.network import DicomlabAssociation, PolicyDUL
from servers.core.reactor import EventDrivenAssociation, ReactorDUL
from servers.core.runtime import Suite
from tests.conftest import free_port
from tests.helpers import CT, associate, make_image
from tests.test_commitment import Reports, commitment_assoc, request_ds, send_action, store
from tests.test_commitment import ref as commitment_ref
from tests.test_tls import Pki, client_context, pki, tls_settings  # noqa: F401 (fixture)

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
BOUND = 10.0


def wait_for(predicate: Callable[[], Any], timeout: float = BOUND) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def server_associations(suite: Suite, key: str) -> list[Association]:
    return list(suite.aes[key].server.active_associations)


def the_server_association(suite: Suite, key: str) -> DicomlabAssociation:
    assoc = wait_for(lambda: server_associations(suite, key))[0]
    assert isinstance(assoc, DicomlabAssociation)
    assert isinstance(assoc.dul, PolicyDUL) and isinstance(assoc.dul, ReactorDUL)
    return assoc


# -- raw PDUs, for a peer that pipelines ---------------------------------------------------


def association_rq(called: str, calling: str = "RAW_SCU") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 104)
    context = build_context(VERIFICATION, [ImplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = generate_uid()
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def echo_rq(message_id: int) -> bytes:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    out = b""
    for pdata in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        out += bytes(pdu.encode())
    return out


def release_rq() -> bytes:
    pdu = A_RELEASE_RQ()
    pdu.from_primitive(A_RELEASE())
    return bytes(pdu.encode())


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU (type, body); type 0 when the peer closed the connection."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    length = int.from_bytes(header[2:6], "big")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return 0, b""
        body += chunk
    return header[0], body


def pipelined_exchange(sock: socket.socket, called: str) -> list[int]:
    """Associate, then send a C-ECHO-RQ and the A-RELEASE-RQ in one write.

    Returns the types of the PDUs received until the server closed the connection.
    The reactor serves a DIMSE message before it looks for a release request, so
    the C-ECHO-RSP comes before the A-RELEASE-RP.
    """
    sock.settimeout(BOUND)
    sock.sendall(association_rq(called))
    kinds = [read_pdu(sock)[0]]
    assert kinds == [0x02], "association not accepted"
    sock.sendall(echo_rq(1) + release_rq())
    while kinds[-1] != 0:
        kinds.append(read_pdu(sock)[0])
    return kinds


# -- DIMSE traffic -----------------------------------------------------------------------------


def test_many_echoes_on_one_association_and_release(suite: Suite) -> None:
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        server_side = the_server_association(suite, "storage_scp")
        for message_id in range(1, 301):
            assert assoc.send_c_echo(msg_id=message_id).Status == 0x0000
    # The peer released: the server side answered and its threads ended.
    wait_for(lambda: not server_side.is_alive() and not server_side.dul.is_alive())
    assert server_side.is_released and not server_side.is_aborted


def test_dcmtk_echoscu_repeats_on_one_association(
    suite: Suite, dcmtk: Callable[[str], str]
) -> None:
    port = suite.port_of("storage_scp")
    title = suite.config.ae("storage_scp").title
    done = subprocess.run(
        [dcmtk("echoscu"), "--repeat", "100", "-aec", title, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=60,
        env={"TCP_NODELAY": "1"},
    )
    assert done.returncode == 0, done.stderr


def test_pipelined_requests_and_release_in_one_write(suite: Suite) -> None:
    title = suite.config.ae("storage_scp").title
    with socket.create_connection(("127.0.0.1", suite.port_of("storage_scp"))) as sock:
        kinds = pipelined_exchange(sock, title)
    # The C-ECHO-RSP (command only, one PDU), the A-RELEASE-RP, the close.
    assert kinds == [0x02, 0x04, 0x06, 0]


def test_stores_on_one_association(suite: Suite) -> None:
    images = [make_image(CT) for _ in range(20)]
    store(suite, *images)


# -- timers ----------------------------------------------------------------------------------


def test_silent_peer_is_closed_after_the_acse_timeout(make_suite: Any) -> None:
    suite = make_suite({"ae": {"storage_scp": {"acse_timeout": 1}}})
    with socket.create_connection(("127.0.0.1", suite.port_of("storage_scp"))) as sock:
        sock.settimeout(BOUND)
        # ARTIM (Sta2): the server closes the connection without a word.
        assert sock.recv(1) == b""
    wait_for(lambda: not server_associations(suite, "storage_scp"))
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000


def test_idle_association_is_ended_by_the_idle_timeout(make_suite: Any) -> None:
    suite = make_suite({"ae": {"storage_scp": {"idle_timeout": 1}}})
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        server_side = the_server_association(suite, "storage_scp")
        assert assoc.send_c_echo().Status == 0x0000
        # Nothing more is sent: pynetdicom's network timeout response is an A-ABORT.
        wait_for(lambda: assoc.is_aborted)
    wait_for(lambda: not server_side.is_alive())
    assert server_side.is_aborted


def test_idle_association_does_not_spin(suite: Suite) -> None:
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        server_side = the_server_association(suite, "storage_scp")
        assert assoc.send_c_echo().Status == 0x0000
        before = _thread_cpu(server_side, server_side.dul)
        time.sleep(2.0)
        after = _thread_cpu(server_side, server_side.dul)
        # pynetdicom's two polling threads use ~0.035 s of CPU per second here
        # (~0.07 s in these 2 s); waiting ones wake about twice each (MAX_WAIT).
        # The bound is three clock ticks.
        assert after - before < 0.03
        assert assoc.send_c_echo().Status == 0x0000


def _thread_cpu(*threads: threading.Thread) -> float:
    """CPU seconds used so far by ``threads`` (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for thread in threads:
        stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        # utime and stime, fields 14 and 15 of stat: 12 and 13 after the command name.
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


# -- peer release and abort --------------------------------------------------------------------


def test_peer_abort_ends_the_server_association(suite: Suite) -> None:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(
        "127.0.0.1", suite.port_of("storage_scp"), ae_title=suite.config.ae("storage_scp").title
    )
    assert assoc.is_established
    server_side = the_server_association(suite, "storage_scp")
    assert assoc.send_c_echo().Status == 0x0000
    assoc.abort()
    wait_for(lambda: not server_side.is_alive() and not server_side.dul.is_alive())
    assert server_side.is_aborted and not server_side.is_released
    ae.shutdown()
    with associate(suite, "storage_scp", [VERIFICATION]) as again:
        assert again.send_c_echo().Status == 0x0000


def test_peer_closing_the_connection_ends_the_server_association(suite: Suite) -> None:
    title = suite.config.ae("storage_scp").title
    with socket.create_connection(("127.0.0.1", suite.port_of("storage_scp"))) as sock:
        sock.settimeout(BOUND)
        sock.sendall(association_rq(title))
        assert read_pdu(sock)[0] == 0x02
        server_side = the_server_association(suite, "storage_scp")
    # A-P-ABORT (event 17 in Sta6).
    wait_for(lambda: not server_side.is_alive())
    assert server_side.is_aborted


# -- a request sent from another thread ------------------------------------------------------


def test_commitment_report_from_a_worker_thread_then_more_requests(suite: Suite) -> None:
    images = [make_image(CT), make_image(CT)]
    store(suite, *images)
    reports = Reports()
    tuid = generate_uid()
    with commitment_assoc(suite, reports) as assoc:
        status = send_action(assoc, request_ds(tuid, *(commitment_ref(ds) for ds in images)))
        assert status == 0x0000
        event_type, ds, _calling = reports.wait()[0]
        assert event_type == 1 and ds.TransactionUID == tuid
        # The server's reactor resumed after the worker's exchange.
        for message_id in range(10, 30):
            assert assoc.send_c_echo(msg_id=message_id).Status == 0x0000


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_suite(make_suite: Callable[..., Suite], pki: Pki) -> Suite:  # noqa: F811
    return make_suite({"ae": {"storage_scp": tls_settings(pki)}})


def test_tls_echoes_stores_and_pipelined_pdus(tls_suite: Suite, pki: Pki) -> None:  # noqa: F811
    ae = AE(ae_title="TLS_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = BOUND
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    port = tls_suite.port_of("storage_scp")
    title = tls_suite.config.ae("storage_scp").title
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=title, tls_args=(client_context(pki), "localhost")
    )
    assert assoc.is_established
    try:
        for message_id in range(1, 51):
            assert assoc.send_c_echo(msg_id=message_id).Status == 0x0000
        image = make_image(CT)
        image.file_meta = FileMetaDataset()
        image.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert assoc.send_c_store(image).Status == 0x0000
    finally:
        assoc.release()
    ae.shutdown()
    # Several PDUs in one TLS record: after the first is read the rest are decrypted
    # and buffered in the SSL object, where select() does not see them.
    raw = socket.create_connection(("127.0.0.1", port))
    with client_context(pki).wrap_socket(raw, server_hostname="localhost") as sock:
        kinds = pipelined_exchange(sock, title)
    assert kinds == [0x02, 0x04, 0x06, 0]


# -- requestor associations our AEs open -------------------------------------------------------


@pytest.fixture
def adopted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EventDrivenAssociation]]:
    """Every requestor association DicomlabAE.associate made event-driven."""
    made: list[EventDrivenAssociation] = []

    def recording(assoc: Association) -> EventDrivenAssociation:
        result = reactor.adopt(assoc)
        made.append(result)
        return result

    monkeypatch.setattr(network, "adopt", recording)
    yield made


def test_c_move_to_dcmtk_storescp_over_an_adopted_association(
    make_suite: Any, dcmtk: Callable[[str], str], tmp_path: Path, adopted: list[Any]
) -> None:
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(
        [dcmtk("storescp"), "--output-directory", str(received), "-aet", "DEST", str(port)],
        env={"TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port))
        suite = make_suite({"remote": {"DEST": {"host": "127.0.0.1", "port": port}}})
        study = generate_uid()
        images = [make_image(CT, study_uid=study) for _ in range(5)]
        store(suite, *images)
        ds = _study_identifier(study)
        with associate(suite, "query_scp", [STUDY_ROOT_MOVE]) as assoc:
            statuses = [int(s.Status) for s, _ in assoc.send_c_move(ds, "DEST", STUDY_ROOT_MOVE)]
        assert statuses[-1] == 0x0000
        wait_for(lambda: len(list(received.iterdir())) == len(images))
        assert len(adopted) == 1
        sub = adopted[0]
        assert isinstance(sub, EventDrivenAssociation) and isinstance(sub.dul, ReactorDUL)
        wait_for(lambda: not sub.is_alive() and not sub.dul.is_alive())
        assert sub.is_released
    finally:
        storescp.terminate()
        storescp.wait(timeout=BOUND)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _study_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def test_pynetdicom_clients_keep_their_own_association_class(suite: Suite) -> None:
    # Nothing global is patched: a plain AE still builds pynetdicom's Association.
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        assert type(assoc) is Association
        assert not isinstance(assoc.dul, ReactorDUL)


def test_adopt_refuses_a_started_association(suite: Suite) -> None:
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc, pytest.raises(RuntimeError):
        reactor.adopt(assoc)


def test_sta13_drops_a_local_primitive_from_the_provider_queue(suite: Suite) -> None:
    # The ACSE's answer to a request the DUL already aborted (Sta13) is moot; left
    # on the provider queue it would raise its event on every DUL loop.
    assoc = DicomlabAssociation(suite.aes["storage_scp"].ae, MODE_ACCEPTOR)
    machine = assoc.dul.state_machine
    machine.current_state = "Sta13"
    answer = A_ASSOCIATE()
    answer.result = 0x00
    assoc.dul.to_provider_queue.put(answer)
    machine.do_action("Evt7")
    assert assoc.dul.to_provider_queue.empty()
    assert machine.current_state == "Sta13"
