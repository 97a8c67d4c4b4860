"""DICOM TLS per AE (BCP 195 profile): certificates from configuration, peers checked.

A throwaway PKI is made with the ``openssl`` command line for the session: a CA,
a server and a client certificate it signed, and a second ("rogue") CA with a
client certificate of its own.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.association import Association

from db.models import CommitmentState
from servers.core import config as config_mod
from servers.core import tls
from servers.core.declaration import StartupError
from servers.core.runtime import Suite
from servers.core.statement import render
from tests.conftest import free_port, require
from tests.helpers import CT, make_image
from tests.test_commitment import (
    COMMITMENT,
    Reports,
    commitment_assoc,
    final_state,
    request_ds,
    send_action,
)
from tests.test_deploy import with_transfer_syntax

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    elsewhere_cert: Path  # the right CA, but issued to another host
    elsewhere_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, ca: str, cn: str, san: str = "IP:127.0.0.1,DNS:localhost") -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={cn}", cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require(shutil.which("openssl") is not None, "openssl not installed (apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=dicomlab test {ca}", cwd=d,
        )  # fmt: skip
    _issue(d, "server", "ca", "EX_STORE_SCP")
    _issue(d, "client", "ca", "TLS_SCU")
    _issue(d, "rogue", "rogue-ca", "ROGUE")
    _issue(d, "elsewhere", "ca", "EX_STORE_SCP", san="DNS:elsewhere.example,IP:192.0.2.7")
    return Pki(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        rogue_cert=d / "rogue.crt",
        rogue_key=d / "rogue.key",
        elsewhere_cert=d / "elsewhere.crt",
        elsewhere_key=d / "elsewhere.key",
    )


def tls_settings(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
        "tls_ca": str(pki.ca),
        **extra,
    }


def client_context(
    pki: Pki,
    *,
    cert: bool = True,
    rogue: bool = False,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=pki.ca)
    if cert:
        pair = (pki.rogue_cert, pki.rogue_key) if rogue else (pki.client_cert, pki.client_key)
        context.load_cert_chain(*pair)
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def tls_associate(suite: Suite, context: ssl.SSLContext, key: str = "storage_scp") -> Association:
    ae = AE(ae_title="TLS_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT, [ImplicitVRLittleEndian])
    return ae.associate(
        "127.0.0.1",
        suite.port_of(key),
        ae_title=suite.config.ae(key).title,
        tls_args=(context, "localhost"),
    )


def echo_over_tls(suite: Suite, context: ssl.SSLContext) -> bool:
    assoc = tls_associate(suite, context)
    if not assoc.is_established:
        return False
    try:
        return bool(assoc.send_c_echo().Status == 0x0000)
    finally:
        assoc.release()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """TLS does not touch the database: SQLite only (overrides conftest)."""
    return f"sqlite:///{tmp_path / 'index.sqlite3'}"


@pytest.fixture
def tls_suite(make_suite: Callable[..., Suite], pki: Pki) -> Suite:
    return make_suite({"ae": {"storage_scp": tls_settings(pki, network_timeout=2)}})


def test_tls_echo_and_store_with_a_client_certificate(tls_suite: Suite, pki: Pki) -> None:
    assoc = tls_associate(tls_suite, client_context(pki))
    assert assoc.is_established
    try:
        raw = assoc.dul.socket.socket
        assert isinstance(raw, ssl.SSLSocket)
        version, cipher = raw.version(), raw.cipher()
        print(f"negotiated {version} {cipher[0] if cipher else None}")
        assert version in ("TLSv1.2", "TLSv1.3")
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(with_transfer_syntax(make_image())).Status == 0x0000
    finally:
        assoc.release()


def test_tls_1_2_with_a_profile_cipher_is_accepted(tls_suite: Suite, pki: Pki) -> None:
    context = client_context(
        pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES256-GCM-SHA384"
    )
    assert echo_over_tls(tls_suite, context)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
@pytest.mark.parametrize(
    "variant",
    ["no-client-certificate", "rogue-ca-certificate", "tls-1.1", "cipher-outside-profile", "plain"],
)
def test_peers_outside_the_profile_never_get_an_association(
    tls_suite: Suite, pki: Pki, variant: str
) -> None:
    if variant == "plain":
        ae = AE(ae_title="PLAIN")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", tls_suite.port_of("storage_scp"), ae_title="EX_STORE_SCP")
        assert not assoc.is_established
    else:
        context = {
            "no-client-certificate": lambda: client_context(pki, cert=False),
            "rogue-ca-certificate": lambda: client_context(pki, rogue=True),
            "tls-1.1": lambda: client_context(pki, maximum=ssl.TLSVersion.TLSv1_1),
            "cipher-outside-profile": lambda: client_context(
                pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA256:AES256-SHA"
            ),
        }[variant]()
        # TLS 1.3 reports a refused client certificate after the handshake: the
        # association request then gets no answer but a closed connection.
        with contextlib.suppress(ssl.SSLError, OSError):
            assert not echo_over_tls(tls_suite, context)
    assert echo_over_tls(tls_suite, client_context(pki)), f"no TLS service after {variant}"


def test_client_certificate_can_be_optional(make_suite: Callable[..., Suite], pki: Pki) -> None:
    suite = make_suite({"ae": {"storage_scp": tls_settings(pki, tls_require_client_cert=False)}})
    assert echo_over_tls(suite, client_context(pki, cert=False))
    with contextlib.suppress(ssl.SSLError, OSError):
        assert not echo_over_tls(suite, client_context(pki, rogue=True))


def test_a_stalled_handshake_does_not_block_other_peers(tls_suite: Suite, pki: Pki) -> None:
    """The handshake runs on the connection's thread: a silent peer holds nothing else up."""
    port = tls_suite.port_of("storage_scp")
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    try:
        assert echo_over_tls(tls_suite, client_context(pki))
        # network_timeout (2 s) ends each stalled handshake: the server closes.
        for sock in silent:
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()


def client_hello(pki: Pki) -> bytes:
    """A real TLS ClientHello, as the first flight a client sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_a_trickled_handshake_is_cut_at_the_acse_timeout(
    make_suite: Callable[..., Suite], pki: Pki
) -> None:
    """Bytes every 0.25 s keep each read inside network_timeout (2 s); acse_timeout
    (3 s) bounds the whole handshake, long before the ClientHello is complete."""
    suite = make_suite(
        {"ae": {"storage_scp": tls_settings(pki, network_timeout=2, acse_timeout=3)}}
    )
    hello = client_hello(pki)
    sent = 0
    closed = False
    with (
        structlog.testing.capture_logs() as logged,
        socket.create_connection(("127.0.0.1", suite.port_of("storage_scp")), timeout=10) as sock,
    ):
        # Bounded: 120 bytes take 30 s, ten times the deadline.
        while sent < min(len(hello), 120) and not closed:
            try:
                sock.sendall(hello[sent : sent + 1])
            except OSError:
                closed = True
                break
            sent += 1
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:  # the server sends nothing before the whole ClientHello: a close
                with contextlib.suppress(OSError):
                    closed = sock.recv(1) == b""
                closed = True
        # Meanwhile, and after, a well-formed peer is served.
        assert echo_over_tls(suite, client_context(pki))
    print(f"\ntrickled handshake: closed after {sent} of {len(hello)} ClientHello bytes")
    assert closed and sent < len(hello)
    failed = [e for e in logged if e["event"] == "tls_handshake_failed"]
    assert failed and "within 3 s" in failed[0]["reason"], failed


def test_the_other_ae_stays_plain(tls_suite: Suite) -> None:
    ae = AE(ae_title="PLAIN")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", tls_suite.port_of("query_scp"), ae_title="EX_QUERY_SCP")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


# --- requestors: C-MOVE sub-operations to a TLS destination ---------------------------


@contextlib.contextmanager
def tls_store_scp(cert: Path, key: Path, ca: Path) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom Storage SCP speaking TLS with ``cert``, requiring a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    context.verify_mode = ssl.CERT_REQUIRED
    received: list[str] = []

    def on_store(event: Any) -> int:
        peer = event.assoc.dul.socket.socket.getpeercert()
        subject = dict(x[0] for x in peer["subject"])
        received.append(f"{event.request.AffectedSOPInstanceUID} from {subject['commonName']}")
        return 0x0000

    ae = AE(ae_title="TLS_DEST")
    for cx in StoragePresentationContexts:
        ae.add_supported_context(
            cx.abstract_syntax, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
        )
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=context,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        yield port, received
    finally:
        server.shutdown()


@pytest.fixture
def tls_destination(pki: Pki) -> Iterator[tuple[int, list[str]]]:
    with tls_store_scp(pki.server_cert, pki.server_key, pki.ca) as destination:
        yield destination


def move_to_tls_dest(
    make_suite: Callable[..., Suite], pki: Pki, port: int
) -> tuple[str, list[int]]:
    """Store one image, C-MOVE it to TLS_DEST at ``port``: its UID and the C-MOVE statuses."""
    suite = make_suite(
        {
            "ae": {
                "storage_scu": {
                    "tls_cert": str(pki.client_cert),
                    "tls_key": str(pki.client_key),
                    "tls_ca": str(pki.ca),
                }
            },
            "remote": {"TLS_DEST": {"host": "127.0.0.1", "port": port, "tls": True}},
        }
    )
    image = make_image()
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", suite.port_of("storage_scp"), ae_title="EX_STORE_SCP")
    assert assoc.send_c_store(with_transfer_syntax(image, ExplicitVRLittleEndian)).Status == 0
    assoc.release()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = image.StudyInstanceUID
    assoc = ae.associate("127.0.0.1", suite.port_of("query_scp"), ae_title="EX_QUERY_SCP")
    statuses = [int(s.Status) for s, _ in assoc.send_c_move(query, "TLS_DEST", STUDY_ROOT_MOVE)]
    assoc.release()
    return str(image.SOPInstanceUID), statuses


def test_c_move_sub_operations_use_tls_to_a_tls_remote(
    make_suite: Callable[..., Suite], pki: Pki, tls_destination: tuple[int, list[str]]
) -> None:
    port, received = tls_destination
    uid, statuses = move_to_tls_dest(make_suite, pki, port)
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    # The destination saw our client certificate: the sub-association was TLS.
    assert received == [f"{uid} from TLS_SCU"]


def test_c_move_refuses_a_destination_certificate_for_another_host(
    make_suite: Callable[..., Suite], pki: Pki
) -> None:
    """The CA is trusted but the certificate names elsewhere.example, not 127.0.0.1."""
    with (
        tls_store_scp(pki.elsewhere_cert, pki.elsewhere_key, pki.ca) as (port, received),
        structlog.testing.capture_logs() as logged,
    ):
        _uid, statuses = move_to_tls_dest(make_suite, pki, port)
    assert received == []
    assert statuses[-1] == 0xA702, [hex(s) for s in statuses]
    refused = [e for e in logged if e["event"] == "tls_connect_failed"]
    assert refused and refused[0]["server_hostname"] == "127.0.0.1"
    assert "IP address mismatch" in refused[0]["reason"], refused[0]


def test_commitment_report_refuses_a_peer_certificate_for_another_host(
    make_suite: Callable[..., Suite], pki: Pki
) -> None:
    """The report is never sent to the wrong host: attempts run out, the transaction FAILED."""
    reports = Reports()
    listener_ae = AE(ae_title="TEST_SCU")
    listener_ae.add_supported_context(
        COMMITMENT, [ImplicitVRLittleEndian, ExplicitVRLittleEndian], scu_role=False, scp_role=True
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.elsewhere_cert, pki.elsewhere_key)
    port = free_port()
    server = listener_ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=context,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)],
    )
    try:
        suite = make_suite(
            {
                "ae": {"storage_scp": {"tls_ca": str(pki.ca)}},
                "remote": {"TEST_SCU": {"host": "127.0.0.1", "port": port, "tls": True}},
                "services": {
                    "storage_commitment": {
                        "always_new_association": True,
                        "max_attempts": 2,
                        "retry_interval": 0.2,
                    }
                },
            }
        )
        tuid = generate_uid()
        with (
            structlog.testing.capture_logs() as logged,
            commitment_assoc(suite) as assoc,
        ):
            assert send_action(assoc, request_ds(tuid, (CT, generate_uid()))) == 0x0000
            request = final_state(suite, tuid)
    finally:
        server.shutdown()
        listener_ae.shutdown()
    assert (request.state, request.attempts) == (CommitmentState.FAILED, 2)
    assert reports.received == []
    refused = [e for e in logged if e["event"] == "tls_connect_failed"]
    assert len(refused) == 2 and all("IP address mismatch" in e["reason"] for e in refused)


def test_requestor_without_tls_remote_stays_plain(make_suite: Callable[..., Suite]) -> None:
    suite = make_suite({"remote": {"PLAIN": {"host": "127.0.0.1", "port": 1}}})
    ae = suite.requestor("storage_scu")
    assert ae.tls_args_for(suite.config.remote("PLAIN")) is None
    assert ae.tls_args_for(None) is None


# --- configuration and the statement ---------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert": "/x.crt"}, "tls_cert and tls_key go together"),
        ({"tls_cert": "/x.crt", "tls_key": "/x.key"}, "needs tls_ca"),
    ],
)
def test_incomplete_tls_settings_stop_startup(settings: dict[str, str], message: str) -> None:
    with pytest.raises(StartupError, match=message):
        config_mod.load(environ={}, overrides={"ae": {"storage_scp": settings}})


def test_missing_certificate_file_stops_startup(tmp_path: Path) -> None:
    config = config_mod.load(
        environ={},
        overrides={
            "ae": {
                "storage_scp": {
                    "tls_cert": str(tmp_path / "none.crt"),
                    "tls_key": str(tmp_path / "none.key"),
                    "tls_ca": str(tmp_path / "ca.crt"),
                }
            }
        },
    )
    with pytest.raises(StartupError, match=r"tls_cert = .*no such file"):
        tls.server_context(config.ae("storage_scp"))


def test_statement_security_section_names_the_profile(pki: Pki) -> None:
    config = config_mod.load(environ={}, overrides={"ae": {"storage_scp": tls_settings(pki)}})
    text = render(config, "archive")
    section = text[text.index("## 7 Security") :]
    assert tls.PROFILE in section
    assert "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" in section
    assert "| EX_STORE_SCP | TLS" in section
    assert "complete within the AE's `acse_timeout`" in section
    assert "must also name the remote's configured `host`" in section
    plain = render(config_mod.load(environ={}), "archive")
    assert "No AE uses TLS" in plain[plain.index("## 7 Security") :]


@pytest.mark.dcmtk
def test_dcmtk_echoscu_over_tls(tls_suite: Suite, pki: Pki, dcmtk: Callable[[str], str]) -> None:
    """An independent TLS client: DCMTK's echoscu with the test CA's client certificate."""
    echoscu = dcmtk("echoscu")
    port = str(tls_suite.port_of("storage_scp"))
    common = [echoscu, "-aet", "TLS_SCU", "-aec", "EX_STORE_SCP", "+cf", str(pki.ca)]
    good = subprocess.run(
        [*common[:1], "+tls", str(pki.client_key), str(pki.client_cert), *common[1:],
         "-pem", "127.0.0.1", port],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    rogue = subprocess.run(
        [*common[:1], "+tls", str(pki.rogue_key), str(pki.rogue_cert), *common[1:],
         "-pem", "127.0.0.1", port],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rogue.returncode != 0
