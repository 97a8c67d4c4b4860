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
from typing import Any, TextIO

import structlog
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import evt

from servers.core.declaration import uid_name

_assoc_ids = itertools.count(1)
_TRACE = False


def tracing() -> bool:
    """True when ``--trace`` asked for every message's command set and identifier."""
    return _TRACE


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


# Trace fields that are lists, mappings or multi-line text. In a terminal they
# are printed as indented blocks under the line instead of as one long repr.
_BLOCK_FIELDS = (
    "contexts",
    "accepted_contexts",
    "rejected_contexts",
    "roles",
    "command_set",
    "identifier",
)


class _ReadableRenderer:
    """structlog's ConsoleRenderer for the line, then the trace blocks, indented."""

    def __init__(self, colors: bool) -> None:
        self._line = structlog.dev.ConsoleRenderer(colors=colors)

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        blocks = {key: event_dict.pop(key) for key in _BLOCK_FIELDS if key in event_dict}
        text = str(self._line(logger, name, event_dict))
        for key, value in blocks.items():
            text += f"\n  {key}:\n" + "\n".join(f"    {line}" for line in _block_lines(value))
        return text


def _block_lines(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.splitlines() or [""]
    if isinstance(value, dict):
        return [f"{k}: {v}" for k, v in value.items()]
    if isinstance(value, list):
        lines: list[str] = []
        for item in value:
            if isinstance(item, dict):
                lines.append(", ".join(f"{k}={v}" for k, v in item.items()))
            else:
                lines.append(str(item))
        return lines or ["(none)"]
    return [str(value)]


def configure(
    fmt: str = "auto", level: str = "info", trace: bool = False, stream: TextIO | None = None
) -> None:
    """Configure structlog for the process. ``fmt``: auto, json or console.

    ``stream`` defaults to ``sys.stderr`` (looked up now, so pytest's capture works).
    """
    global _TRACE
    _TRACE = trace
    out = stream if stream is not None else sys.stderr
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    if fmt == "auto":
        fmt = "console" if is_tty else "json"
    renderer: Any = (
        _ReadableRenderer(colors=is_tty)
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
        logger_factory=structlog.PrintLoggerFactory(file=out),
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


CONTEXT_RESULTS = {
    0: "acceptance",
    1: "user-rejection",
    2: "no-reason (provider rejection)",
    3: "abstract-syntax-not-supported",
    4: "transfer-syntaxes-not-supported",
}


def _contexts(contexts: Any) -> list[dict[str, Any]]:
    out = []
    for cx in contexts:
        item: dict[str, Any] = {
            "id": cx.context_id,
            "abstract_syntax": f"{uid_name(cx.abstract_syntax)} ({cx.abstract_syntax})",
            "transfer_syntaxes": [uid_name(ts) for ts in cx.transfer_syntax],
        }
        if cx.result is not None:
            item["result"] = CONTEXT_RESULTS.get(cx.result, cx.result)
        out.append(item)
    return out


def _role_names(scu: Any, scp: Any) -> str:
    roles = [name for name, on in (("SCU", scu), ("SCP", scp)) if on]
    return "+".join(roles) or "none"


def _on_requested(event: Any) -> None:
    log = assoc_logger(event.assoc)
    rq = event.assoc.requestor
    if _TRACE and event.assoc.is_acceptor:
        primitive = rq.primitive
        log.debug(
            "association_proposed",
            application_context=str(primitive.application_context_name),
            requestor_max_pdu=rq.maximum_length,
            implementation_class_uid=rq.implementation_class_uid,
            implementation_version=rq.implementation_version_name,
            roles={
                uid_name(uid): f"requestor proposes {_role_names(i.scu_role, i.scp_role)}"
                for uid, i in rq.role_selection.items()
            },
            contexts=_contexts(primitive.presentation_context_definition_list),
        )


def _on_accepted(event: Any) -> None:
    assoc = event.assoc
    log = assoc_logger(assoc)
    local, peer = (
        (assoc.acceptor, assoc.requestor)
        if assoc.is_acceptor
        else (assoc.requestor, assoc.acceptor)
    )
    fields: dict[str, Any] = {
        "accepted": len(assoc.accepted_contexts),
        "rejected": len(assoc.rejected_contexts),
        "local_max_pdu": local.maximum_length,
        "peer_max_pdu": peer.maximum_length,
    }
    if _TRACE:
        fields["accepted_contexts"] = _contexts(assoc.accepted_contexts)
        fields["rejected_contexts"] = _contexts(assoc.rejected_contexts)
        # The roles this AE plays on each accepted context after role negotiation.
        fields["roles"] = {
            f"{cx.context_id} {uid_name(cx.abstract_syntax)}": _role_names(cx.as_scu, cx.as_scp)
            for cx in assoc.accepted_contexts
        }
    log.info("association_accepted", **fields)


def _on_rejected(event: Any) -> None:
    from servers.core.network import REJECT_REASONS

    rsd = getattr(event.assoc, "rejection", None)
    fields: dict[str, Any] = {
        "result": rsd[0] if rsd else None,
        "source": rsd[1] if rsd else None,
        "reason": rsd[2] if rsd else None,
        "meaning": REJECT_REASONS.get(rsd, "") if rsd else "",
    }
    detail = getattr(event.assoc.dul, "rejection_detail", "")
    if detail:
        fields["detail"] = detail
    assoc_logger(event.assoc).warning("association_rejected", **fields)


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


def _trace_fields(assoc: Any, message: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"command_set": str(message.command_set)}
    data = message.data_set
    if data is None or not data.getbuffer().nbytes:
        return fields
    size = data.getbuffer().nbytes
    if type(message).__name__.startswith("C_STORE"):
        # A C-STORE data set is an image: its size only, never the pixel data.
        fields["data_set"] = f"{size} bytes (not shown)"
        return fields
    context = assoc._accepted_cx.get(message.context_id)
    syntax = UID(context.transfer_syntax[0]) if context else ImplicitVRLittleEndian
    try:
        data.seek(0)
        ds: Dataset = read_dataset(
            data, is_implicit_VR=syntax.is_implicit_VR, is_little_endian=syntax.is_little_endian
        )
        fields["identifier"] = str(ds)
    except Exception:
        fields["identifier"] = f"({size} bytes, not decodable as {uid_name(syntax)})"
    finally:
        data.seek(0)
    return fields


def _on_dimse_recv(event: Any) -> None:
    fields = _message_fields(event.message)
    if _TRACE:
        fields.update(_trace_fields(event.assoc, event.message))
    assoc_logger(event.assoc).info("dimse_received", **fields)


def _on_dimse_sent(event: Any) -> None:
    fields = _message_fields(event.message)
    if _TRACE:
        fields.update(_trace_fields(event.assoc, event.message))
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
