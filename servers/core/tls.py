"""DICOM TLS: the BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.9).

An AE with ``tls_cert`` and ``tls_key`` speaks TLS only on its port. The
profile as implemented:

* TLS 1.2 or 1.3; SSL, TLS 1.0 and 1.1 are refused (BCP 195, RFC 8996).
* TLS 1.2 cipher suites: the four RFC 7525 section 4.2 recommends (ECDHE or
  DHE key exchange, AES-GCM), nothing else; TLS 1.3 suites as OpenSSL offers
  them (all AEAD). No compression, no renegotiation.
* The peer's certificate must chain to ``tls_ca``. An acceptor asks for a
  client certificate and, with ``tls_require_client_cert`` (the default),
  refuses a peer without one.
* As requestor (C-MOVE sub-operations, Storage Commitment reports), the
  remote's certificate must also name the remote's configured ``host`` (a DNS
  name or an IP address in its subject alternative names): a certificate the
  CA issued to another machine is refused, and the refusal is logged
  (``tls_connect_failed``) with OpenSSL's reason.
* As acceptor, the whole handshake must finish within ``acse_timeout`` of the
  connection, each read waiting at most ``network_timeout``: a peer trickling
  handshake bytes cannot hold a thread longer (:func:`handshake`).
"""

from __future__ import annotations

import selectors
import ssl
import time
from pathlib import Path
from typing import Any

from servers.core.config import AEConfig
from servers.core.declaration import StartupError
from servers.core.logs import get_logger

PROFILE = "BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.9)"
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# RFC 7525 section 4.2, in OpenSSL's names and the RFC's order of preference.
TLS12_CIPHERS = (
    "DHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
)
TLS12_CIPHER_NAMES = (
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
)
TLS13_CIPHER_NAMES = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
)


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(":".join(TLS12_CIPHERS))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load(context: ssl.SSLContext, ae: AEConfig) -> ssl.SSLContext:
    for setting in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(ae, setting)
        if path and not Path(path).is_file():
            raise StartupError(f"[ae.{ae.key}] {setting} = {path!r}: no such file")
    try:
        if ae.tls_cert:
            context.load_cert_chain(ae.tls_cert, ae.tls_key)
        if ae.tls_ca:
            context.load_verify_locations(cafile=ae.tls_ca)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(
            f"[ae.{ae.key}] cannot load its TLS certificate, key or CA: {exc}"
        ) from None
    return context


def server_context(ae: AEConfig) -> ssl.SSLContext | None:
    """The acceptor's context for ``ae``, or ``None`` when the AE has no certificate."""
    if not ae.tls:
        return None
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load(context, ae)
    context.verify_mode = ssl.CERT_REQUIRED if ae.tls_require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(ae: AEConfig) -> ssl.SSLContext:
    """The requestor's context: ``ae``'s certificate if it has one, peers checked against tls_ca."""
    if not ae.tls_ca:
        raise StartupError(
            f"[ae.{ae.key}] initiates TLS but has no tls_ca to check the peer's certificate"
        )
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    # pynetdicom wraps the socket with server_hostname = the remote's configured host.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.sslsocket_class = _LoggedClientSocket
    return _load(context, ae)


class _LoggedClientSocket(ssl.SSLSocket):
    """An initiating TLS socket that logs why a handshake failed.

    pynetdicom reports only that the association could not be opened; the log
    line says which remote refused which check (a wrong host name, an unknown CA).
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "verify_message", None) or f"{type(exc).__name__}: {exc}"
            try:
                peer = "{}:{}".format(*self.getpeername()[:2])
            except OSError:
                peer = "?"
            get_logger(peer=peer).warning(
                "tls_connect_failed", server_hostname=self.server_hostname, reason=reason[:300]
            )
            raise


class HandshakeTimeout(OSError):
    """The peer did not finish the TLS handshake within the deadline."""


def handshake(sock: ssl.SSLSocket, deadline_s: float, gap_s: float | None) -> None:
    """Complete the server side of ``sock``'s handshake within ``deadline_s`` seconds.

    A blocking ``do_handshake`` bounds only each read (the socket's timeout), so a
    peer sending a byte just inside it could hold the thread for the length of its
    ClientHello times the network timeout. Here the socket is driven non-blocking
    and every wait is bounded by what is left of ``deadline_s`` (and by ``gap_s``,
    the network timeout between packets). The socket's timeout is restored.
    """
    deadline = time.monotonic() + deadline_s
    previous = sock.gettimeout()
    sock.setblocking(False)
    try:
        with selectors.DefaultSelector() as selector:
            while True:
                try:
                    sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    events: Any = selectors.EVENT_READ
                except ssl.SSLWantWriteError:
                    events = selectors.EVENT_WRITE
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HandshakeTimeout(f"handshake not complete within {deadline_s:g} s")
                wait = min(left, gap_s) if gap_s else left
                selector.register(sock, events)
                ready = selector.select(wait)
                selector.unregister(sock)
                if not ready:
                    if time.monotonic() >= deadline:
                        raise HandshakeTimeout(f"handshake not complete within {deadline_s:g} s")
                    raise HandshakeTimeout(f"no handshake data for {wait:g} s")
    finally:
        sock.settimeout(previous)
