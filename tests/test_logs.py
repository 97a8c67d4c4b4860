"""The structured log lines and the trace mode, read back from a real association."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE

from servers.core import logs
from servers.core.runtime import Suite
from tests.helpers import CT, associate, make_image
from tests.test_association import UNKNOWN_SOP_CLASS, VERIFICATION, rejection, wait_for

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IDENTITY = ("assoc_id", "peer", "calling_ae", "called_ae")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Logging does not depend on the database: SQLite only (overrides conftest)."""
    return f"sqlite:///{tmp_path / 'index.sqlite3'}"


class Captured:
    def __init__(self) -> None:
        self.stream = StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["event"] == name]

    def has(self, name: str) -> Callable[[], bool]:
        return lambda: bool(self.events(name))


@pytest.fixture
def captured() -> Iterator[Callable[..., Captured]]:
    """Point structlog at a buffer; restore the session's quiet set-up afterwards."""

    def start(fmt: str = "json", trace: bool = False) -> Captured:
        cap = Captured()
        logs.configure(fmt, "info", trace=trace, stream=cap.stream)
        return cap

    yield start
    logs.configure("json", "warning")


def test_association_and_dimse_lines(suite: Suite, captured: Callable[..., Captured]) -> None:
    cap = captured()
    with associate(suite, "storage_scp", [VERIFICATION], calling_ae="LOG_SCU") as assoc:
        assert assoc.send_c_echo().Status == 0x0000
    assert wait_for(cap.has("association_released"))

    accepted = cap.events("association_accepted")
    assert len(accepted) == 1
    line = accepted[0]
    assert line["calling_ae"] == "LOG_SCU"
    assert line["called_ae"] == "EX_STORE_SCP"
    assert line["peer"].startswith("127.0.0.1:")
    assert line["peer_max_pdu"] == 16382  # pynetdicom's requestor default
    assert line["local_max_pdu"] == 16384  # the statement's STORAGE-SCP value
    assert (line["accepted"], line["rejected"]) == (1, 0)

    received = cap.events("dimse_received")
    sent = cap.events("dimse_sent")
    assert [r["message"] for r in received] == ["C-ECHO-RQ"]
    assert [s["message"] for s in sent] == ["C-ECHO-RSP"]
    assert sent[0]["status"] == "0x0000"
    assert sent[0]["responding_to"] == received[0]["message_id"]
    # No trace fields unless asked for.
    assert "command_set" not in received[0]

    assoc_lines = accepted + received + sent + cap.events("association_released")
    for entry in assoc_lines:
        assert all(entry[key] == line[key] for key in IDENTITY), entry
    assert {entry["level"] for entry in received + sent} == {"info"}


def test_rejected_line_names_the_reason(suite: Suite, captured: Callable[..., Captured]) -> None:
    cap = captured()
    assert rejection(suite, "query_scp", called_ae="NOT_ME") == (1, 1, 7)
    assert wait_for(cap.has("association_rejected"))
    (line,) = cap.events("association_rejected")
    assert (line["result"], line["source"], line["reason"]) == (1, 1, 7)
    assert line["meaning"] == "called-AE-title-not-recognized"
    assert line["called_ae"] == "NOT_ME"
    assert line["calling_ae"] == "TEST_SCU"
    assert line["level"] == "warning"
    assert not cap.events("association_accepted")


def test_aborted_line(suite: Suite, captured: Callable[..., Captured]) -> None:
    cap = captured()
    ae = AE(ae_title="ABORT_SCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", suite.port_of("storage_scp"), ae_title="EX_STORE_SCP")
    assert assoc.is_established
    assoc.abort()
    ae.shutdown()
    assert wait_for(cap.has("association_aborted"))
    (line,) = cap.events("association_aborted")
    assert line["calling_ae"] == "ABORT_SCU"
    assert line["assoc_id"] == cap.events("association_accepted")[0]["assoc_id"]


def test_trace_shows_negotiation_and_messages(
    suite: Suite, captured: Callable[..., Captured]
) -> None:
    cap = captured(trace=True)
    contexts: list[str | tuple[str, Sequence[str]]] = [
        VERIFICATION,
        (UNKNOWN_SOP_CLASS, [ImplicitVRLittleEndian]),
        CT,
    ]
    with associate(suite, "storage_scp", contexts, max_pdu=32768) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        image = make_image(CT, rows=64, columns=64)
        image.file_meta = FileMetaDataset()
        image.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        status = assoc.send_c_store(image)
        assert "Status" in status
    assert wait_for(cap.has("association_released"))

    (proposed,) = cap.events("association_proposed")
    assert proposed["requestor_max_pdu"] == 32768
    names = [cx["abstract_syntax"] for cx in proposed["contexts"]]
    assert names[0] == "Verification SOP Class (1.2.840.10008.1.1)"
    assert names[2] == "CT Image Storage (1.2.840.10008.5.1.4.1.1.2)"
    assert proposed["contexts"][0]["transfer_syntaxes"] == [
        "Implicit VR Little Endian",
        "Explicit VR Little Endian",
    ]

    (accepted,) = cap.events("association_accepted")
    assert (accepted["local_max_pdu"], accepted["peer_max_pdu"]) == (16384, 32768)
    assert [cx["result"] for cx in accepted["accepted_contexts"]] == ["acceptance"] * 2
    (rejected_cx,) = accepted["rejected_contexts"]
    assert rejected_cx["result"] == "abstract-syntax-not-supported"
    assert accepted["roles"] == {"1 Verification SOP Class": "SCP", "5 CT Image Storage": "SCP"}

    echo_rq, store_rq = cap.events("dimse_received")
    assert "(0000,0100) Command Field" in echo_rq["command_set"]
    assert "identifier" not in echo_rq
    # A C-STORE data set is summarised, never printed.
    assert store_rq["data_set"].endswith("bytes (not shown)")
    assert "Pixel Data" not in cap.text
    assert "DOE^JOHN" not in cap.text
    store_rsp = cap.events("dimse_sent")[1]
    assert "(0000,0900) Status" in store_rsp["command_set"]


def test_trace_shows_a_query_identifier(suite: Suite, captured: Callable[..., Captured]) -> None:
    cap = captured(trace=True)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "TRACE_ME"
    identifier.StudyInstanceUID = ""
    with associate(suite, "query_scp", [STUDY_ROOT_FIND]) as assoc:
        for _status, _ in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
            pass
    assert wait_for(cap.has("association_released"))
    find_rq = cap.events("dimse_received")[0]
    assert find_rq["message"] == "C-FIND-RQ"
    assert "(0010,0020) Patient ID" in find_rq["identifier"]
    assert "TRACE_ME" in find_rq["identifier"]


def test_trace_on_a_rejection_shows_what_was_proposed(
    suite: Suite, captured: Callable[..., Captured]
) -> None:
    cap = captured(trace=True)
    contexts = [(UNKNOWN_SOP_CLASS, [ImplicitVRLittleEndian])]
    assert rejection(suite, "storage_scp", contexts=contexts) == (1, 1, 1)
    assert wait_for(cap.has("association_rejected"))
    (proposed,) = cap.events("association_proposed")
    assert proposed["contexts"][0]["abstract_syntax"].endswith(f"({UNKNOWN_SOP_CLASS})")
    assert cap.events("association_rejected")[0]["meaning"] == "no-reason-given"


def test_console_trace_is_readable(suite: Suite, captured: Callable[..., Captured]) -> None:
    cap = captured(fmt="console", trace=True)
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
    assert wait_for(lambda: "association_released" in cap.text)
    text = cap.text
    assert not text.lstrip().startswith("{")
    # Multi-line fields are indented blocks under their line, not escaped reprs.
    assert "\n  command_set:\n    (0000,0000) Command Group Length" in text
    assert "\n  accepted_contexts:\n    id=1, abstract_syntax=Verification SOP Class" in text
    assert "\\n" not in text


@pytest.mark.parametrize("trace", [False, True])
def test_pending_find_responses_are_counted_or_traced(
    suite: Suite, captured: Callable[..., Captured], trace: bool
) -> None:
    with associate(suite, "storage_scp", [CT]) as assoc:
        for _ in range(2):
            image = make_image(CT, patient_id="PENDING_LOG", StudyDescription="x" * 60)
            image.file_meta = FileMetaDataset()
            image.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            assert assoc.send_c_store(image).Status == 0x0000
    cap = captured(trace=trace)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "PENDING_LOG"
    query.StudyInstanceUID = ""
    query.StudyDescription = ""
    # A PDU smaller than one response: the command set and identifier are fragmented.
    with associate(suite, "query_scp", [STUDY_ROOT_FIND], max_pdu=96) as assoc:
        answers = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
    assert [status.Status for status, _ in answers] == [0xFF00, 0xFF00, 0x0000]
    assert all(ds.StudyDescription == "x" * 60 for _, ds in answers[:2])
    assert wait_for(cap.has("association_released"))
    (handled,) = cap.events("c_find_handled")
    assert handled["sent"] == 2
    sent = cap.events("dimse_sent")
    statuses = [line["status"] for line in sent]
    if trace:
        assert statuses == ["0xFF00", "0xFF00", "0x0000"]
        assert "PENDING_LOG" in sent[0]["identifier"]
    else:
        assert statuses == ["0x0000"]
