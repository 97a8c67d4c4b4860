"""Event-driven reactors for pynetdicom's DUL and association threads.

Why: pynetdicom runs two polling loops per association. The DUL thread
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever
it finds nothing to do, and the association thread (``Association._run_reactor``)
sleeps 1 ms on every loop before a non-blocking ``dimse.get_msg``. Every hand-off
between the peer, the DUL and the service therefore waits up to a millisecond,
several times per DIMSE exchange: a py-spy profile of a C-STORE load put ~25% of
the association thread's wall time in those sleeps, and a C-ECHO round trip in an
open association cost ~2.5 ms where DCMTK needs ~0.1 ms. Ending an association
adds more fixed waits (``time.sleep(0.1)`` in ``_abort_blocking``, ``kill()``
polling every 10 ms for the DUL to stop).

What: the same loops, the same PS3.8 state machine and the same checks in the
same order; only the waiting differs.

* :class:`ReactorDUL` (DUL thread). Where pynetdicom sleeps 1 ms it blocks in
  ``select()`` on the association socket and a wake-up socket pair. The wake-up
  side is written when a primitive is queued for the peer (``to_provider_queue``,
  including the requestor's T-CONNECT result), when an event is queued from
  another thread (``event_queue``) and when the DUL is told to stop
  (``_kill_thread``). The timeout is bounded by the ARTIM timer, so event 18
  fires on time, and by :data:`MAX_WAIT` as a safety net. It does not block at
  all while there is work: queued primitives or events, Sta13 (pynetdicom closes
  the connection there as soon as no data is waiting, and that is kept), an
  expired ARTIM timer, or bytes a TLS socket has already decrypted
  (``SSLSocket.pending()``, which ``select()`` cannot see). A write happens only
  while the DUL is actually waiting, so a busy DUL costs no extra system calls.
* :class:`EventDrivenAssociation` (association thread). Where pynetdicom sleeps
  1 ms it waits on a :class:`threading.Event` set when the DUL delivers anything
  to the service user (a DIMSE message on ``dimse.msg_queue``, an A-RELEASE or
  abort primitive on ``dul.to_user_queue``), when the DUL thread ends, and when a
  ``send_*`` method asks the reactor to pause (``_reactor_checkpoint.clear()``).
  The event is cleared before the checks, so a delivery during the checks wakes
  the next wait (no lost wake-up). The timeout is the time left on the idle
  (network) timer, so ``network_timeout`` still ends an idle association.
  ``kill()`` waits on the DUL's state changes instead of polling every 10 ms, and
  a blocking ``abort()`` no longer sleeps 0.1 s after the DUL has stopped.
  A thread that pauses the reactor to send a request of its own
  (``servers.core.dimse.send_event_report``) waits for
  :meth:`EventDrivenAssociation.is_parked`: the reactor at its checkpoint, not
  merely paused inside a request it is serving, so the request never overtakes
  that request's response.

How it maps onto pynetdicom: acceptor associations are
:class:`servers.core.network.DicomlabAssociation` (a subclass), whose
``PolicyDUL`` subclasses :class:`ReactorDUL`. Requestor associations are built
by pynetdicom's ``ApplicationEntity.associate`` as a plain ``Association``;
``DicomlabAE._create_socket`` hands each to :func:`adopt` before its socket is
attached, which makes it an :class:`EventDrivenAssociation` with a
:class:`ReactorDUL`. Nothing global is patched: pynetdicom SCUs outside our AEs
(the tests' clients) keep pynetdicom's loops. pynetdicom's ``send_*`` methods
still spin in 0.1 ms steps until the reactor reaches its checkpoint; with the
reactor woken at once by the ``clear()`` that is one step.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

# Longest wait with nothing due; only a missed wake-up would make it matter.
MAX_WAIT = 1.0

_T = TypeVar("_T")


class WakingQueue(queue.Queue[_T], Generic[_T]):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: _T, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _WakeSocket:
    """The wake-up side of a ``select()``: a non-blocking socket pair."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        # Held around write and close: a write after close must not reach a reused fd.
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            # BlockingIOError: the buffer is full of wake-ups already.
            with contextlib.suppress(OSError):
                self._writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._reader.recv(4096):
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._reader.close()
            self._writer.close()


class ReactorDUL(DULServiceProvider):
    """pynetdicom's DUL with ``select()`` where it sleeps 1 ms per idle loop.

    ``state_changed`` is set after every state machine action and when the thread
    ends, for :meth:`EventDrivenAssociation.kill` to wait on.
    """

    def __init__(self, assoc: Association) -> None:
        # Set before the base __init__, which assigns _kill_thread through the setter.
        self._kill_flag = False
        self._waker: _WakeSocket | None = None
        self._waiting = False
        self.finished = False
        self.state_changed = threading.Event()
        super().__init__(assoc)
        self.event_queue = WakingQueue(self.wake)
        self.to_provider_queue = WakingQueue(self.wake)

    @property
    def _kill_thread(self) -> bool:  # type: ignore[override]
        return self._kill_flag

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self._kill_flag = value
        if value:
            self.wake()

    def wake(self) -> None:
        """Interrupt the idle wait, if the DUL thread is in it (or about to be)."""
        waker = self._waker
        if self._waiting and waker is not None:
            waker.wake()

    def run_reactor(self) -> None:
        self._waker = _WakeSocket()
        try:
            self._run()
        finally:
            self.finished = True
            self.state_changed.set()
            wake_user = getattr(self.assoc, "wake_reactor", None)
            if wake_user is not None:
                wake_user()
            waker, self._waker = self._waker, None
            waker.close()

    def _run(self) -> None:
        # pynetdicom's run_reactor with its time.sleep() replaced by _wait_for_work().
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        idle = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True

            if idle:
                self._wait_for_work()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue

            self.state_machine.do_action(event)
            self.state_changed.set()
            idle = False

    def _wait_for_work(self) -> None:
        waker = self._waker
        if waker is None:
            return
        # Announce the wait before looking for work: a producer that queues after
        # the look sees _waiting and writes to the wake-up socket.
        self._waiting = True
        try:
            if self._has_work():
                return
            readers: list[Any] = [waker]
            sock = self._connected_socket()
            if sock is not None:
                readers.append(sock)
            try:
                ready, _, _ = select.select(readers, [], [], self._wait_timeout())
            except (OSError, ValueError):
                # The socket was closed under us: the transport check reports it.
                return
        finally:
            self._waiting = False
        if waker in ready:
            waker.drain()

    def _has_work(self) -> bool:
        if self._kill_thread or self.to_provider_queue.queue or self.event_queue.queue:
            return True
        if self.artim_timer.expired:
            return True
        sock = self._connected_socket()
        if sock is None:
            # Nothing to read. In Sta13 without a connection pynetdicom's close()
            # queues nothing; the ARTIM timer (bounding the wait) ends that state.
            return False
        # Sta13: pynetdicom reads what is left or closes the connection at once.
        if self.state_machine.current_state == "Sta13":
            return True
        return isinstance(sock, ssl.SSLSocket) and bool(sock.pending())

    def _connected_socket(self) -> socket.socket | None:
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None or not wrapper._is_connected:
            return None
        return wrapper.socket

    def _wait_timeout(self) -> float:
        artim = self.artim_timer
        running = (
            artim.timeout is not None and artim._start_time is not None and artim._end_time is None
        )
        if running:
            return max(0.0, min(MAX_WAIT, artim.remaining))
        return MAX_WAIT

    def stop_dul(self) -> bool:
        # pynetdicom polls is_alive() every 1 ms; joining returns as soon as it ends.
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        if self.ident is not None and threading.current_thread() is not self:
            self.join()
        return True


class _Checkpoint(threading.Event):
    """``_reactor_checkpoint`` whose ``clear()`` (a pause request) wakes the reactor."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


class EventDrivenAssociation(Association):
    """An association whose reactor waits for deliveries instead of polling."""

    dul_class: type[ReactorDUL] = ReactorDUL

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._make_event_driven()

    def _make_event_driven(self) -> None:
        self._wake = threading.Event()
        self._serving = False
        # Before a socket is attached (it queues event 5 on the DUL's event queue).
        self.dul = self.dul_class(self)
        # The timers live on the DUL: set them again on the replacement.
        self.acse_timeout = self._acse_timeout
        self.network_timeout = self._network_timeout
        self.dul.to_user_queue = WakingQueue(self._wake.set)
        self.dimse.msg_queue = WakingQueue(self._wake.set)
        checkpoint = _Checkpoint(self._wake)
        checkpoint.set()
        self._reactor_checkpoint = checkpoint

    def wake_reactor(self) -> None:
        self._wake.set()

    def is_parked(self) -> bool:
        """True while the reactor waits at its checkpoint, between requests.

        ``_is_paused`` is also true while a request is being served (pynetdicom sets
        it so a handler on the reactor thread can use ``send_*``). Another thread
        that paused the reactor to send a request of its own waits for this
        instead, so its request never overtakes the response being sent.
        """
        return self._is_paused and not self._serving

    def _dul_ended(self) -> bool:
        # is_alive() stays true for a moment after the DUL's last wake-up.
        return bool(getattr(self.dul, "finished", False)) or not self.dul.is_alive()

    def _wait_timeout(self) -> float:
        if self.network_timeout is None:
            return MAX_WAIT
        return max(0.0, min(MAX_WAIT, self.dul._idle_timer.remaining))

    def _run_reactor(self) -> None:
        # pynetdicom's loop and checks, in its order; the 1 ms sleep is a wait on _wake.
        self._is_paused = False
        busy = True
        while not self._kill:
            if not busy and not self.dimse.msg_queue.queue:
                self._wake.wait(self._wait_timeout())
            self._wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self._take_request()
            busy = msg is not None
            if msg:
                self._serving = True
                try:
                    self._serve_request(msg, cast(int, context_id))
                finally:
                    self._serving = False

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                DUL_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                DUL_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if self._dul_ended():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                DUL_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def _take_request(self) -> tuple[int | None, Any]:
        """The next message for this thread, leaving a response to the thread awaiting it.

        pynetdicom's pause is racy: the reactor marks itself paused before every
        checkpoint wait, so a thread that clears the checkpoint just after the wait
        returned sees the stale flag, sends its request, and the reactor can take the
        response off the queue; the sender then fails at its DIMSE timeout. A
        response is only taken here when no sender holds the checkpoint (a late
        response nobody awaits, dropped as pynetdicom drops it). The queue is looked
        at first: a response of an active sender is only there after that sender
        cleared the checkpoint, and it stays cleared until the sender has taken it.
        """
        _, head = self.dimse.peek_msg()
        if (
            head is not None
            and getattr(head, "MessageIDBeingRespondedTo", None) is not None
            and not self._reactor_checkpoint.is_set()
        ):
            return None, None
        return self.dimse.get_msg(block=False)

    def kill(self) -> None:
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        changed = cast(ReactorDUL, self.dul).state_changed
        while True:
            # Cleared before the look, so a change during it ends the next wait.
            changed.clear()
            if not self.dul.is_alive() or self.dul.stop_dul():
                return
            # Bounded as pynetdicom's 10 ms poll was, in case no change is signalled.
            changed.wait(0.01)

    def _abort_blocking(self, block: bool = True) -> None:
        # pynetdicom's, without the 0.1 s sleep at the end: kill() has already
        # waited for the DUL thread to end and the socket is closed below.
        if self._sent_abort or self.is_released:
            return
        self._sent_abort = True
        self._reactor_checkpoint.set()
        DUL_LOGGER.info("Aborting Association")
        self.acse.send_abort(0x00)
        evt.trigger(self, evt.EVT_ABORTED, {})
        if block is False:
            return
        self.kill()
        with contextlib.suppress(Exception):
            cast(AssociationSocket, self.dul.socket)._shutdown_socket()


def adopt(assoc: Association) -> EventDrivenAssociation:
    """Make ``assoc`` (a plain requestor ``Association``, not yet started) event-driven.

    pynetdicom's ``ApplicationEntity.associate`` constructs the ``Association``
    itself; this is called from the AE's ``_create_socket``, before the socket is
    attached and the DUL started. Only this instance changes class.
    """
    if isinstance(assoc, EventDrivenAssociation):
        return assoc
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("an association can only be adopted before it starts")
    assoc.__class__ = EventDrivenAssociation
    adopted = cast(EventDrivenAssociation, assoc)
    adopted._make_event_driven()
    return adopted
