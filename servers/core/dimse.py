"""Sending a request to the peer on an association whose requests we serve.

pynetdicom's ``send_*`` methods take the next DIMSE message off the association's
queue as the response. When the SCP itself sends a request (an N-EVENT-REPORT of
Storage Commitment or Print), the peer may send a new request before it answers,
and that request would be consumed as the "response" and lost. Here the answer is
picked out by its Message ID Being Responded To; anything else that arrives
meanwhile is put back, in order, for the association to serve afterwards.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

# Message IDs for requests the SCP sends; kept apart from low numbers peers often use.
_message_ids = itertools.count(0x8000)
_ids_lock = threading.Lock()


def next_message_id() -> int:
    with _ids_lock:
        return next(_message_ids) % 0x10000 or 0x8000


def _sender_lock(assoc: Any) -> threading.Lock:
    # dict.setdefault is atomic in CPython: two workers get the same lock.
    return cast(threading.Lock, assoc.__dict__.setdefault("_dicomlab_send_lock", threading.Lock()))


def peer_closing(assoc: Any) -> bool:
    """True when the next PDU from the peer is an A-RELEASE-RQ or an abort."""
    pdu = assoc.dul.peek_next_pdu()
    if isinstance(pdu, (A_ABORT, A_P_ABORT)):
        return True
    return isinstance(pdu, A_RELEASE) and pdu.result is None


def await_response(
    assoc: Any, msg_type: type, msg_id: int, timeout: float | None, abort_on_timeout: bool
) -> tuple[int | None, str]:
    """The status of the ``msg_type`` response to ``msg_id``, or None and why there is none."""
    messages = assoc.dimse.msg_queue
    deadline = time.monotonic() + timeout if timeout else None
    held: list[Any] = []
    try:
        while True:
            if peer_closing(assoc):
                return None, "peer released or aborted before answering"
            if not assoc.dul.is_alive():
                return None, "connection lost"
            try:
                context_id, msg = cast(tuple[int, Any], messages.get(timeout=0.01))
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    if abort_on_timeout:
                        assoc.abort()
                    return None, "no response within the DIMSE timeout"
                continue
            status = getattr(msg, "Status", None)
            if (
                isinstance(msg, msg_type)
                and getattr(msg, "MessageIDBeingRespondedTo", None) == msg_id
                and status is not None
            ):
                return int(status), ""
            # A request the peer sent meanwhile: served after this exchange.
            held.append((context_id, msg))
    finally:
        if held:
            with messages.mutex:
                messages.queue.extendleft(reversed(held))
                messages.not_empty.notify()


def send_event_report(
    assoc: Any,
    dataset: Dataset | None,
    event_type: int,
    class_uid: str,
    instance_uid: str,
    meta_uid: str | None = None,
    abort_on_timeout: bool = False,
) -> tuple[int | None, str]:
    """Send an N-EVENT-REPORT from any thread; returns the peer's status or why none came.

    The association's reactor is held at its checkpoint while the exchange runs, as
    pynetdicom's own ``send_*`` methods do, so it cannot take the response first;
    from another thread, only once any request it is serving has been answered.
    """
    with _sender_lock(assoc):
        if not assoc.is_established:
            return None, "association not established"
        context = assoc._get_valid_context(meta_uid or class_uid, "", None)
        syntax = context.transfer_syntax[0]
        request = N_EVENT_REPORT()
        request.MessageID = next_message_id()
        request.AffectedSOPClassUID = UID(class_uid)
        request.AffectedSOPInstanceUID = UID(instance_uid)
        request.EventTypeID = event_type
        if dataset is not None:
            encoded = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian)
            if encoded is None:
                return None, "event information could not be encoded"
            request.EventInformation = BytesIO(encoded)
        on_reactor_thread = threading.current_thread() is assoc
        if not on_reactor_thread:
            assoc._reactor_checkpoint.clear()
            # Parked, not merely paused: while a request is being served _is_paused
            # is true too, and this request would go out before that response (a
            # print job's event before the N-ACTION-RSP that created the job).
            parked = getattr(assoc, "is_parked", lambda: assoc._is_paused)
            while not parked() and assoc.is_established:
                time.sleep(0.0005)
        try:
            assoc.dimse.send_msg(request, cast(int, context.context_id))
            return await_response(
                assoc,
                N_EVENT_REPORT,
                int(request.MessageID),
                assoc.dimse.dimse_timeout,
                abort_on_timeout,
            )
        finally:
            if not on_reactor_thread:
                assoc._reactor_checkpoint.set()


class CancelLatch:
    """``event.is_cancelled`` that stays true: pynetdicom forgets a cancel once asked."""

    def __init__(self, event: Any) -> None:
        self._event = event
        self._seen = False

    def __call__(self) -> bool:
        if not self._seen:
            self._seen = bool(self._event.is_cancelled)
        return self._seen
