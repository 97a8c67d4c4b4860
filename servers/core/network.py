"""A thin, tested layer over pynetdicom's acceptor and requestor.

What it changes, and why:

* TCP_NODELAY on every socket accepted or opened. pynetdicom leaves Nagle's
  algorithm on, and on loopback every DIMSE exchange then waits ~40 ms for a
  delayed ACK.
* Accepted sockets get the low-level ``network_timeout``, so a peer that
  stops sending in the middle of a PDU is dropped instead of holding two
  threads forever (pynetdicom leaves accepted sockets blocking).
* The whole A-ASSOCIATE-RQ must arrive within ``acse_timeout`` of the
  connection (a slow-loris peer trickling bytes just under the network timeout
  is dropped), and no PDU may declare more than ``max(max_pdu, 1 MiB)`` bytes
  (a peer cannot make the server buffer gigabytes): pynetdicom checks neither.
* Association acceptance follows the statements' rejection tables
  (Annex F Tables F.4.2-14/-29): application context, calling AE allow-list,
  called AE title, IP allow-list, total and per-calling-AE limits, and a
  request whose presentation contexts are all rejected is itself rejected
  (1, 1, 1) instead of accepted with nothing usable. The limits are counted
  under a lock, so simultaneous requests cannot both slip under a limit.
* A complete A-ASSOCIATE-RQ PDU whose content cannot be decoded is rejected
  (1, 2, 1) as the statement says, where pynetdicom would send an A-ABORT; a
  protocol version without bit 0 is rejected (1, 2, 2) through the same path,
  so both are logged like every other rejection.
* DICOM TLS (``servers.core.tls``): an AE with a certificate accepts TLS only;
  the handshake runs on the connection's own thread and must finish within
  ``acse_timeout`` (each read under the network timeout), so a peer that
  stalls or trickles it never holds up the accept loop or a thread for long. An AE
  initiating to a remote with ``tls = true`` uses TLS (:meth:`DicomlabAE.associate`).
* User Identity negotiation (``servers.core.identity``) per the AE's policy.
* Event-driven reactors (``servers.core.reactor``) for every association our
  AEs accept or open: the DUL and association threads wait in ``select()`` and
  on an event instead of pynetdicom's 1 ms polling sleeps, which cost a C-ECHO
  ~2.5 ms per round trip and a C-STORE about a quarter of its wall time.
* DIMSE requests are dispatched to the service class a plugin declared for the
  SOP class, before pynetdicom's own table, so a service can replace
  pynetdicom's behaviour (C-MOVE, Storage Commitment) or add a SOP class.
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.acse import ACSE
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, UserIdentityNegotiation
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.service_class import ServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from servers.core import identity, tls
from servers.core.config import AEConfig, RemoteAE
from servers.core.logs import assoc_logger
from servers.core.reactor import EventDrivenAssociation, ReactorDUL, adopt

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ (result, source, reason) as the archive statement's Table F.4.2-14 lists them.
REJECT_LIMIT = (2, 3, 2)
REJECT_APPLICATION_CONTEXT = (1, 1, 2)
REJECT_CALLED_AE = (1, 1, 7)
REJECT_CALLING_AE = (1, 1, 3)
REJECT_NO_REASON = (1, 1, 1)
REJECT_UNPARSABLE = (1, 2, 1)
REJECT_PROTOCOL_VERSION = (1, 2, 2)
# PS3.7 D.3.3.7.2: an authorisation failure is rejected-permanent by the ACSE-related
# service provider. Same code as an unparsable request; a row of its own explains it.
REJECT_USER_IDENTITY = (1, 2, 1)


@dataclass(frozen=True)
class RejectionRow:
    """One row of a statement's association rejection table."""

    result: int
    source: int
    reason: int
    meaning: str
    condition: str

    @property
    def rsd(self) -> tuple[int, int, int]:
        return (self.result, self.source, self.reason)


REJECTION_ROWS: tuple[RejectionRow, ...] = (
    RejectionRow(
        *REJECT_LIMIT,
        "local-limit-exceeded",
        "The AE already has its maximum number of simultaneous associations, in total "
        "or from this calling AE title. A later request may succeed.",
    ),
    RejectionRow(
        *REJECT_APPLICATION_CONTEXT,
        "application-context-name-not-supported",
        "The request names an application context other than 1.2.840.10008.3.1.1.1.",
    ),
    RejectionRow(
        *REJECT_CALLED_AE,
        "called-AE-title-not-recognized",
        "The called AE title is not this AE's title (the requestor is misconfigured).",
    ),
    RejectionRow(
        *REJECT_CALLING_AE,
        "calling-AE-title-not-recognized",
        "A calling AE allow-list is configured and the calling AE title is not on it.",
    ),
    RejectionRow(
        *REJECT_NO_REASON,
        "no-reason-given",
        "None of the proposed presentation contexts is acceptable, or an IP allow-list "
        "is configured and the peer's address is not on it. The sample rejects both "
        "cases without naming a code; this is PS3.8's generic service-user rejection.",
    ),
    RejectionRow(
        *REJECT_UNPARSABLE,
        "no-reason-given",
        "The A-ASSOCIATE-RQ PDU arrived complete but its content could not be parsed "
        "(malformed items, lengths or AE titles). A request with the same format will "
        "not succeed later.",
    ),
    RejectionRow(
        *REJECT_PROTOCOL_VERSION,
        "protocol-version-not-supported",
        "Bit 0 of the A-ASSOCIATE-RQ protocol version is not set, so the requestor does "
        "not offer version 1 of the DICOM Upper Layer protocol (PS3.8 9.3.2). Added from "
        "PS3.8: the sample statement's table has no row for this case.",
    ),
    RejectionRow(
        *REJECT_USER_IDENTITY,
        "no-reason-given",
        "The AE's user_identity policy is optional or required and the request's User "
        "Identity does not satisfy it: an unknown username, a wrong passcode, or (when "
        "required) no username and passcode. This is the rejection PS3.7 D.3.3.7.2 names "
        "for an authorisation failure; the sample statement has no User Identity "
        "negotiation. Never sent while user_identity is ignore.",
    ),
)
REJECT_REASONS: Mapping[tuple[int, int, int], str] = {
    row.rsd: row.meaning for row in REJECTION_ROWS
}


def set_nodelay(sock: socket.socket) -> None:
    # OSError: not a TCP socket (a test's socketpair); nothing to do.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelaySocket(AssociationSocket):
    """Requestor socket with TCP_NODELAY."""

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = super()._create_socket(address)
        set_nodelay(sock)
        return sock


# No PDU may declare a longer body than this, or the AE's maximum PDU length if larger.
PDU_LENGTH_LIMIT = 1 << 20


class GuardedSocket(AssociationSocket):
    """Acceptor socket with a deadline for the association request and a PDU length cap.

    ``deadline`` (a ``time.monotonic()`` value) bounds the time until the first PDU
    is complete; :class:`PolicyDUL` clears it once that PDU is read. A read the DUL
    asks for beyond ``max_read`` bytes fails as a closed connection (event 17).
    """

    def __init__(
        self, assoc: Association, client_socket: socket.socket, deadline: float, max_read: int
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.deadline: float | None = deadline
        self.max_read = max_read
        self.network_timeout = client_socket.gettimeout()

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_read:
            raise OSError(f"PDU length {nr_bytes} exceeds the limit of {self.max_read} bytes")
        if self.deadline is None:
            return super().recv(nr_bytes)
        sock = cast(socket.socket, self.socket)
        data = bytearray()
        while len(data) < nr_bytes:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("association request not complete within acse_timeout")
            timeout = self.network_timeout
            sock.settimeout(remaining if timeout is None else min(timeout, remaining))
            chunk = sock.recv(min(4096, nr_bytes - len(data)))
            if not chunk:
                break
            data.extend(chunk)
        return data

    def end_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline = None
            if self.socket is not None:
                self.socket.settimeout(self.network_timeout)


class DicomlabAE(ApplicationEntity):
    """A pynetdicom AE that knows its configuration and declared service classes."""

    def __init__(
        self,
        config: AEConfig,
        service_classes: Mapping[str, type[ServiceClass]],
        remotes: Mapping[str, RemoteAE] | None = None,
    ):
        super().__init__(ae_title=config.title)
        self.config = config
        # The remote AE table: which peers this AE reaches over TLS.
        self.remotes: Mapping[str, RemoteAE] = dict(remotes or {})
        self.service_classes = dict(service_classes)
        self.maximum_pdu_size = config.max_pdu
        self.maximum_associations = config.max_associations
        self.implementation_class_uid = config.implementation_class_uid
        self.implementation_version_name = config.implementation_version_name
        self.acse_timeout = config.acse_timeout
        self.connection_timeout = config.connection_timeout
        self.dimse_timeout = config.dimse_timeout
        # pynetdicom has one idle timer, restarted on every received PDU; it
        # stands for the statements' DIMSE-level "wait for the next request".
        self.network_timeout = config.idle_timeout
        self.require_called_aet = config.require_called_ae
        # Filled by the Suite: service name -> ServiceContext, for declared service classes.
        self.service_contexts: dict[str, Any] = {}
        # Associations that passed the limits and still hold a slot. pynetdicom's
        # ``active_associations`` also counts requests still being negotiated and
        # ones already rejected, and two simultaneous requests would both read
        # the count before either is established.
        self._slots_lock = threading.Lock()
        self._slots: set[Association] = set()

    def tls_args_for(self, remote: RemoteAE | None) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for an association to ``remote``; ``None`` without TLS.

        The context presents this AE's certificate (if it has one) and checks the
        remote's against this AE's ``tls_ca``.
        """
        if remote is None or not remote.tls:
            return None
        return (tls.client_context(self.config), remote.host)

    def associate(  # type: ignore[override]
        self, addr: str, port: int, *args: Any, **kwargs: Any
    ) -> Association:
        """pynetdicom's ``associate``, over TLS when ``ae_title`` is a remote with ``tls = true``.

        The remote is looked up by AE title and must be at the configured address,
        so a service that opens associations (C-MOVE, Storage Commitment reports)
        needs no TLS code of its own.
        """
        if kwargs.get("tls_args") is None:
            title = kwargs.get("ae_title", args[1] if len(args) > 1 else "")
            remote = self.remotes.get(str(title).strip())
            if remote is not None and (remote.host, remote.port) == (addr, port):
                kwargs["tls_args"] = self.tls_args_for(remote)
        return super().associate(addr, port, *args, **kwargs)

    def take_slot(self, assoc: Association, calling_ae: str) -> bool:
        """Admit ``assoc`` under the total and per-calling-AE limits, atomically."""
        with self._slots_lock:
            held = [a for a in self._slots if a is not assoc and a.is_alive()]
            self._slots = set(held)
            if len(held) >= self.config.max_associations:
                return False
            per_ae = self.config.max_associations_per_calling_ae
            if per_ae:
                same = [a for a in held if a.requestor.ae_title.strip() == calling_ae]
                if len(same) >= per_ae:
                    return False
            self._slots.add(assoc)
            return True

    def release_slot(self, assoc: Association) -> None:
        with self._slots_lock:
            self._slots.discard(assoc)

    def _create_socket(  # type: ignore[override]
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        # pynetdicom's associate() built a plain Association; the socket attaches next.
        sock = NoDelaySocket(adopt(assoc), address=address)
        sock.tls_args = tls_args
        return sock


def _ip_allowed(address: str, allow: tuple[str, ...]) -> bool:
    if not allow:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    for entry in allow:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


# Local service primitives: A-ASSOCIATE response (accept, reject), P-DATA, A-RELEASE
# request and response, A-ABORT request.
_LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


class TolerantStateMachine(StateMachine):
    """PS3.8's state machine, dropping a local primitive that arrives in Sta13.

    A peer that sends an A-ASSOCIATE-RQ followed at once by garbage gets an A-ABORT
    (Sta13, awaiting the close) while the ACSE is still deciding on the request; its
    answer (event 8) then has no transition and pynetdicom's DUL thread dies with
    ``InvalidEventError``. PS3.8 Table 9-10 gives Sta13 no local events: the answer
    is moot, so it is dropped and the connection closes as it should. Dropped
    means taken off the provider queue too: left there, it would raise the same
    event on every DUL loop and keep the DUL from reading the transport.
    """

    def do_action(self, event: str) -> None:
        if self.current_state == "Sta13" and event in _LOCAL_PRIMITIVE_EVENTS:
            with contextlib.suppress(queue.Empty):
                self.dul.to_provider_queue.get(block=False)
            return
        super().do_action(event)


class PolicyDUL(ReactorDUL):
    """DUL that turns an undecodable A-ASSOCIATE-RQ into a rejectable request.

    pynetdicom answers an A-ASSOCIATE-RQ it cannot decode with an A-ABORT
    (state machine event 19), and a protocol version other than exactly 1 with
    an A-ASSOCIATE-RJ that no event reports. Here both reach :class:`PolicyACSE`
    as a placeholder request carrying the rejection, so the normal reject path
    sends the statement's A-ASSOCIATE-RJ and the rejection is logged.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.state_machine = TolerantStateMachine(self)
        self.rejection: tuple[int, int, int] | None = None
        self.rejection_detail = ""

    def _read_pdu_data(self) -> None:
        super()._read_pdu_data()
        # The first PDU is in (or the connection is gone): the request deadline is over.
        if isinstance(self.socket, GuardedSocket):
            self.socket.end_deadline()

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        # Sta1 as well: the PDU can be read before event 5 (connection open) is processed.
        awaiting_request = self.state_machine.current_state in ("Sta1", "Sta2")
        if bytestream[:1] != b"\x01" or not awaiting_request:
            return super()._decode_pdu(bytestream)
        try:
            pdu, event = super()._decode_pdu(bytestream)
            rq = cast(A_ASSOCIATE_RQ, pdu)
            # Decoding is lazy in places; what the ACSE reads must decode too.
            primitive = rq.to_primitive()
            str(primitive.application_context_name)
            _ = primitive.presentation_context_definition_list
            _ = primitive.user_information
        except Exception as exc:
            self.rejection = REJECT_UNPARSABLE
            self.rejection_detail = f"{type(exc).__name__}: {exc}"[:200]
            return _placeholder_request(bytes(bytestream)), "Evt6"
        if not rq.protocol_version & 1:
            self.rejection = REJECT_PROTOCOL_VERSION
            self.rejection_detail = f"protocol version 0x{rq.protocol_version:04X}"
        # PS3.8 9.3.2: a version-1 receiver tests bit 0 only; pynetdicom's AE-6
        # compares the whole field, so it is normalised before AE-6 reads it.
        rq.protocol_version = 1
        return rq, event


def _placeholder_request(raw: bytes) -> A_ASSOCIATE_RQ:
    """An empty A-ASSOCIATE-RQ with the AE titles of ``raw`` where they decode."""
    rq = A_ASSOCIATE_RQ()
    for attr, start in (("called_ae_title", 10), ("calling_ae_title", 26)):
        field = raw[start : start + 16]
        try:
            title = field.decode("ascii").strip(" \x00")
        except UnicodeDecodeError:
            title = ""
        if len(field) == 16 and title.isprintable() and title:
            setattr(rq, attr, title)
        else:
            setattr(rq, attr, "UNPARSABLE")
    return rq


class PolicyACSE(ACSE):
    """Acceptor negotiation following the statement's association policies."""

    def association_policy_rejection(self) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ a request earns before its contexts are looked at.

        The limits are checked last, and passing them takes a slot: a request
        rejected for any other reason never holds one.
        """
        ae = cast(DicomlabAE, self.assoc.ae)
        policy = ae.config
        dul_rejection = getattr(self.dul, "rejection", None)
        if dul_rejection:
            return cast(tuple[int, int, int], dul_rejection)
        rq = cast(A_ASSOCIATE, self.requestor.primitive)
        if str(rq.application_context_name) != APPLICATION_CONTEXT_NAME:
            return REJECT_APPLICATION_CONTEXT
        calling = rq.calling_ae_title.strip()
        if policy.calling_ae_allow and calling not in policy.calling_ae_allow:
            return REJECT_CALLING_AE
        if (
            policy.require_called_ae
            and rq.called_ae_title.strip() != self.acceptor.ae_title.strip()
        ):
            return REJECT_CALLED_AE
        if not _ip_allowed(self.requestor.address, policy.ip_allow):
            # No row of the rejection table names the peer's address; the digest's
            # B2 resolution answers with the generic service-user rejection.
            return REJECT_NO_REASON
        if not self._identity_accepted():
            return REJECT_USER_IDENTITY
        if not ae.take_slot(self.assoc, calling):
            return REJECT_LIMIT
        return None

    def _identity_accepted(self) -> bool:
        """Apply the AE's user_identity policy; log who the peer is."""
        policy = cast(DicomlabAE, self.assoc.ae).config
        if policy.user_identity == "ignore":
            return True
        item = self.requestor.user_identity
        decision = identity.decide(
            policy.user_identity,
            policy.users,
            item.user_identity_type if item is not None else None,
            bytes(item.primary_field or b"") if item is not None else b"",
            bytes(item.secondary_field or b"") if item is not None else b"",
        )
        log = assoc_logger(self.assoc)
        if decision.user:
            log = log.bind(user=decision.user)
            self.assoc._dicomlab_log = log  # type: ignore[attr-defined]
        self.assoc.user_identity_accepted = decision.accepted and bool(decision.user)  # type: ignore[attr-defined]
        if decision.accepted:
            log.info("user_identity_accepted", reason=decision.reason)
        else:
            log.warning("user_identity_rejected", reason=decision.reason)
            if self.dul is not None:
                cast(PolicyDUL, self.dul).rejection_detail = decision.reason
        return decision.accepted

    def _reject(self, rsd: tuple[int, int, int]) -> None:
        self.assoc.rejection = rsd  # type: ignore[attr-defined]
        cast(DicomlabAE, self.assoc.ae).release_slot(self.assoc)
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

    def _negotiate_as_acceptor(self) -> None:
        assoc_rq = cast(A_ASSOCIATE, self.requestor.primitive)
        self.requestor.ae_title = assoc_rq.calling_ae_title

        rejection = self.association_policy_rejection()
        if rejection:
            self._reject(rejection)
            return

        # With user_identity = "ignore" (digest 7.2) a User Identity item gets no
        # response, as PS3.7 D.3.3.7 allows. An accepted username (and passcode)
        # is confirmed when the peer asks, with an empty server response
        # (D.3.3.7.2: types 1 and 2 have no server response value).
        requested = self.requestor.user_identity
        if (
            getattr(self.assoc, "user_identity_accepted", False)
            and requested is not None
            and requested.positive_response_requested
        ):
            response = UserIdentityNegotiation()
            response.server_response = b""
            self.acceptor.add_negotiation_item(response)
        # SOP class extended negotiation is answered as pynetdicom does (no items bound).
        for item in self._check_sop_class_extended():
            self.acceptor.add_negotiation_item(item)
        self.acceptor._common_ext = self._check_sop_class_common_extended()
        if self.requestor.asynchronous_operations != (1, 1):
            async_rsp = self._check_async_ops()
            if async_rsp:
                self.acceptor.add_negotiation_item(async_rsp)

        rq_roles = {
            uid: (item.scu_role, item.scp_role)
            for uid, item in self.requestor.role_selection.items()
        }
        result, ac_roles = negotiate_as_acceptor(
            assoc_rq.presentation_context_definition_list,
            self.acceptor.supported_contexts,
            rq_roles,
        )
        self.assoc._accepted_cx = {
            cast(int, cx.context_id): cx for cx in result if cx.result == 0x00
        }
        self.assoc._rejected_cx = [cx for cx in result if cx.result != 0x00]
        if not self.assoc._accepted_cx:
            # "If none of the requested Presentation Contexts are accepted then the
            # Association Request itself is rejected" (Annex F; digest B1).
            self._reject(REJECT_NO_REASON)
            return

        for role_item in ac_roles:
            self.acceptor.add_negotiation_item(role_item)
        self.send_accept()
        evt.trigger(self.assoc, evt.EVT_ACCEPTED, {})
        self.assoc.is_established = True
        evt.trigger(self.assoc, evt.EVT_ESTABLISHED, {})


class DicomlabAssociation(EventDrivenAssociation):
    """Acceptor association with policy negotiation and declared-service dispatch."""

    dul_class = PolicyDUL

    def __init__(self, ae: DicomlabAE, mode: str) -> None:
        super().__init__(ae, mode)
        self.acse = PolicyACSE(self)

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            cast(DicomlabAE, self.ae).release_slot(self)

    def _serve_request(self, msg: Any, context_id: int) -> None:
        ae = cast(DicomlabAE, self.ae)
        context = self._accepted_cx.get(context_id)
        declared = ae.service_classes.get(str(context.abstract_syntax)) if context else None
        if context is None or declared is None or not msg.is_valid_request or self._sent_release:
            super()._serve_request(msg, context_id)
            return
        service_class = declared(self)
        try:
            self.dimse.cancel_req = {}
            self._is_paused = True
            service_class.SCP(msg, context)
            self._is_paused = False
            self.dimse.cancel_req = {}
        except Exception:
            # The association cannot continue in a known state; other associations can.
            assoc_logger(self).exception("service_class_failed", service_class=declared.__name__)
            self._is_paused = False
            self.abort()


class DicomlabRequestHandler(RequestHandler):
    def handle(self) -> None:
        """Finish the TLS handshake (if any) on this connection's thread, then associate."""
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            ae = cast(DicomlabAE, self.ae)
            try:
                tls.handshake(sock, ae.config.acse_timeout, ae.config.network_timeout)
            except (ssl.SSLError, OSError) as exc:
                host, port = self.client_address[:2]
                tls_log = assoc_logger_for_connection(ae, f"{host}:{port}")
                tls_log.warning("tls_handshake_failed", reason=f"{type(exc).__name__}: {exc}"[:300])
                with contextlib.suppress(OSError):
                    sock.close()
                return
        super().handle()

    def _create_association(self) -> Association:
        ae = cast(DicomlabAE, self.ae)
        assoc = DicomlabAssociation(ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = GuardedSocket(
            assoc,
            client_socket=cast(socket.socket, self.request),
            deadline=time.monotonic() + ae.config.acse_timeout,
            # max_pdu 0 is "no limit" (PS3.8 D.1): then neither is there a cap.
            max_read=max(ae.maximum_pdu_size, PDU_LENGTH_LIMIT) if ae.maximum_pdu_size else 1 << 32,
        )
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def assoc_logger_for_connection(ae: DicomlabAE, peer: str) -> Any:
    from servers.core.logs import get_logger

    return get_logger(peer=peer, ae=ae.config.title)


class NoDelayServer(ThreadedAssociationServer):
    """Threaded acceptor that sets TCP_NODELAY on every accepted socket."""

    daemon_threads = True
    thread: threading.Thread | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Not super(): it would run the TLS handshake here, on the accept loop.
        client, address = cast(socket.socket, self.socket).accept()
        set_nodelay(client)
        # "Time-out waiting for data between TCP/IP packets" (Table F.4.4-2): a
        # PDU that stops arriving half-way ends the connection (event 17).
        client.settimeout(cast(DicomlabAE, self.ae).config.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


def start_acceptor(
    ae: DicomlabAE,
    host: str,
    handlers: list[tuple[Any, Callable[..., Any]] | tuple[Any, Callable[..., Any], list[Any]]],
) -> NoDelayServer:
    """Bind and serve ``ae`` on ``host:ae.config.port`` in a background thread.

    With a certificate configured the port speaks TLS only (:mod:`servers.core.tls`).
    """
    server = ae.make_server(
        (host, ae.config.port),
        ae_title=ae.config.title,
        evt_handlers=handlers,
        ssl_context=tls.server_context(ae.config),
        server_class=NoDelayServer,
        request_handler=DicomlabRequestHandler,
    )
    thread = threading.Thread(
        target=server.serve_forever, name=f"acceptor-{ae.config.key}", daemon=True
    )
    cast(NoDelayServer, server).thread = thread
    thread.start()
    ae._servers.append(server)
    return cast(NoDelayServer, server)


def pynetdicom_service_class(uid: str) -> type[ServiceClass]:
    return uid_to_service_class(uid)
