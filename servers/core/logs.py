"""structlog set-up and the per-association logger.

Every association gets one bound logger (``assoc_id``, ``peer``, ``calling_ae``,
``called_ae``, ``ae``) kept on the association object, because pynetdicom runs
DIMSE and PDU events on different threads and contextvars would not follow.
Lines are JSON when stderr is not a terminal, readable otherwise. ``trace``
adds the negotiation and each message's command set and identifier.
"""

from __future__ import annotations

import itertools
import logging
import sys
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import evt

from servers.core.declaration import uid_name

_assoc_ids = itertools.count(1)
_TRACE = False

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure(fmt: str = "auto", level: str = "info", trace: bool = False) -> None:
    """Configure structlog once per process. ``fmt``: auto, json or console."""
    global _TRACE
    _TRACE = trace
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if trace else LEVELS.get(level, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom's own logger is noisy and unstructured; we log what it does ourselves.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("dicomlab").bind(**bound)


def assoc_logger(assoc: Any) -> Any:
    """The bound logger of ``assoc``, created on first use."""
    log = getattr(assoc, "_dicomlab_log", None)
    if log is None:
        requestor = assoc.requestor
        acceptor = assoc.acceptor
        peer = requestor if assoc.is_acceptor else acceptor
        local = acceptor if assoc.is_acceptor else requestor
        address = getattr(peer, "address", "") or ""
        port = getattr(peer, "port", "") or ""
        # On an acceptor the titles are read from the A-ASSOCIATE-RQ before
        # pynetdicom copies them onto the requestor object.
        primitive = getattr(requestor, "primitive", None)
        calling = requestor.ae_title or getattr(primitive, "calling_ae_title", "") or ""
        called = getattr(primitive, "called_ae_title", "") or acceptor.ae_title or ""
        log = get_logger(
            assoc_id=next(_assoc_ids),
            peer=f"{address}:{port}",
            calling_ae=calling.strip(),
            called_ae=called.strip(),
            ae=(local.ae_title or "").strip(),
        )
        assoc._dicomlab_log = log
    return log


def _contexts(contexts: Any) -> list[dict[str, Any]]:
    out = []
    for cx in contexts:
        item: dict[str, Any] = {
            "id": cx.context_id,
            "abstract_syntax": f"{uid_name(cx.abstract_syntax)} ({cx.abstract_syntax})",
            "transfer_syntaxes": [uid_name(ts) for ts in cx.transfer_syntax],
        }
        if cx.result is not None:
            item["result"] = {
                0: "accepted",
                1: "user-rejection",
                2: "no-reason",
                3: "abstract-syntax-not-supported",
                4: "transfer-syntaxes-not-supported",
            }.get(cx.result, cx.result)
        out.append(item)
    return out


def _on_requested(event: Any) -> None:
    log = assoc_logger(event.assoc)
    rq = event.assoc.requestor
    if _TRACE and event.assoc.is_acceptor:
        primitive = rq.primitive
        log.debug(
            "association_proposed",
            application_context=str(primitive.application_context_name),
            max_pdu=rq.maximum_length,
            implementation_class_uid=rq.implementation_class_uid,
            implementation_version=rq.implementation_version_name,
            roles={uid: (i.scu_role, i.scp_role) for uid, i in rq.role_selection.items()},
            contexts=_contexts(primitive.presentation_context_definition_list),
        )


def _on_accepted(event: Any) -> None:
    assoc = event.assoc
    log = assoc_logger(assoc)
    fields: dict[str, Any] = {
        "accepted": len(assoc.accepted_contexts),
        "rejected": len(assoc.rejected_contexts),
        "peer_max_pdu": assoc.requestor.maximum_length
        if assoc.is_acceptor
        else assoc.acceptor.maximum_length,
    }
    if _TRACE:
        fields["accepted_contexts"] = _contexts(assoc.accepted_contexts)
        fields["rejected_contexts"] = _contexts(assoc.rejected_contexts)
        fields["roles"] = {
            cx.abstract_syntax: (cx.as_scp and "SCP") or "SCU" for cx in assoc.accepted_contexts
        }
    log.info("association_accepted", **fields)


def _on_rejected(event: Any) -> None:
    from servers.core.network import REJECT_REASONS

    rsd = getattr(event.assoc, "rejection", None)
    assoc_logger(event.assoc).warning(
        "association_rejected",
        result=rsd[0] if rsd else None,
        source=rsd[1] if rsd else None,
        reason=rsd[2] if rsd else None,
        meaning=REJECT_REASONS.get(rsd, "") if rsd else "",
    )


def _on_released(event: Any) -> None:
    assoc_logger(event.assoc).info("association_released")


def _on_aborted(event: Any) -> None:
    assoc_logger(event.assoc).warning("association_aborted")


def _message_fields(message: Any) -> dict[str, Any]:
    cs = message.command_set
    fields: dict[str, Any] = {"message": type(message).__name__.replace("_", "-")}
    for keyword, name in (
        ("MessageID", "message_id"),
        ("MessageIDBeingRespondedTo", "responding_to"),
        ("AffectedSOPClassUID", "sop_class"),
        ("RequestedSOPClassUID", "sop_class"),
        ("AffectedSOPInstanceUID", "sop_instance"),
        ("RequestedSOPInstanceUID", "sop_instance"),
        ("MoveDestination", "move_destination"),
    ):
        value = cs.get(keyword)
        if value is not None and value != "":
            fields[name] = str(value).strip()
    if "Status" in cs:
        fields["status"] = f"0x{int(cs.Status):04X}"
    for keyword, name in (
        ("NumberOfRemainingSuboperations", "remaining"),
        ("NumberOfCompletedSuboperations", "completed"),
        ("NumberOfFailedSuboperations", "failed"),
        ("NumberOfWarningSuboperations", "warning"),
    ):
        if keyword in cs:
            fields[name] = int(cs[keyword].value)
    return fields


def _trace_fields(message: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"command_set": str(message.command_set)}
    data = message.data_set
    if data is not None and data.getbuffer().nbytes < 65536:
        # Identifiers and N-service data sets are small; C-STORE data sets are not shown.
        from pydicom.filereader import read_dataset

        try:
            data.seek(0)
            ds: Dataset = read_dataset(data, is_implicit_VR=True, is_little_endian=True)
            fields["identifier"] = str(ds)
        except Exception:
            fields["identifier"] = "(not decodable as Implicit VR Little Endian)"
    return fields


def _on_dimse_recv(event: Any) -> None:
    fields = _message_fields(event.message)
    if _TRACE:
        fields.update(_trace_fields(event.message))
    assoc_logger(event.assoc).info("dimse_received", **fields)


def _on_dimse_sent(event: Any) -> None:
    fields = _message_fields(event.message)
    if _TRACE:
        fields.update(_trace_fields(event.message))
    assoc_logger(event.assoc).info("dimse_sent", **fields)


ASSOCIATION_HANDLERS = [
    (evt.EVT_REQUESTED, _on_requested),
    (evt.EVT_ACCEPTED, _on_accepted),
    (evt.EVT_REJECTED, _on_rejected),
    (evt.EVT_RELEASED, _on_released),
    (evt.EVT_ABORTED, _on_aborted),
    (evt.EVT_DIMSE_RECV, _on_dimse_recv),
    (evt.EVT_DIMSE_SENT, _on_dimse_sent),
]
