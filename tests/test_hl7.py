"""HL7 orders over a real MLLP socket, and the whole scheduled workflow."""

from __future__ import annotations

import socket

import pytest
from pydicom.uid import generate_uid

from db.queries import mpps as q
from db.queries.worklist import list_steps
from servers.core.declaration import StartupError
from servers.core.runtime import Suite
from tests.conftest import SuiteFactory
from tests.helpers import associate
from tests.ris_helpers import (
    MPPS,
    mpps_create,
    mpps_final,
    mwl_find,
    mwl_identifier,
    send_hl7,
    send_raw,
)


def orm(
    control_id: str = "MSG1",
    name: str = "Müller^Jürgen",
    pid: str = "PAT100",
    placer: str = "ORD1",
    start: str = "202401051000",
    charset: str = "UNICODE UTF-8",
    order_control: str = "NW",
    kind: str = "ORM^O01",
) -> str:
    return "\r".join(
        [
            f"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240101120000||{kind}|{control_id}|P|2.5||||||{charset}",
            f"PID|1||{pid}^^^HOSP||{name}||19700101|F",
            "PV1|1|O|||||||^WHO^DOCTOR",
            f"ORC|{order_control}|{placer}|||||^^^{start}",
            f"OBR|1|{placer}||CT-HEAD^CT Head^99DICOMRIS||||||||||||^REQ^DOC||||||||CT|||^^^{start}^^R|||||||TECH^TOM",
        ]
    )


def hl7_port(suite: Suite) -> int:
    return int(suite.config.service_settings("worklist")["hl7_port"])


def msa(reply: str) -> list[str]:
    line = next(s for s in reply.split("\r") if s.startswith("MSA"))
    return line.split("|")


def test_orm_is_scheduled_and_acknowledged(suite: Suite) -> None:
    reply = send_hl7(hl7_port(suite), orm())
    assert msa(reply)[1:3] == ["AA", "MSG1"]
    results = mwl_find(suite, mwl_identifier(PatientID="PAT100", RequestedProcedureDescription=""))
    assert [s for s, _ in results] == [0xFF00, 0x0000]
    ds = results[0][1]
    assert ds is not None
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert ds.RequestedProcedureDescription == "CT Head"
    assert ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "1000"


def test_latin1_and_non_latin_names_round_trip(suite: Suite) -> None:
    reply = send_hl7(
        hl7_port(suite),
        orm("M2", name="Çelik^Ayşe", pid="P2", placer="O2", charset="UNICODE UTF-8"),
    )
    assert msa(reply)[1] == "AA"
    reply = send_hl7(
        hl7_port(suite),
        orm("M3", name="Renée^Zoë", pid="P3", placer="O3", charset="8859/1"),
        encoding="latin-1",
    )
    assert msa(reply)[1] == "AA"
    reply = send_hl7(hl7_port(suite), orm("M4", name="Иванов^Иван", pid="P4", placer="O4"))
    assert msa(reply)[1] == "AA"
    names = {}
    for _, ds in mwl_find(suite, mwl_identifier()):
        if ds is not None:
            names[ds.PatientID] = (str(ds.PatientName), ds.SpecificCharacterSet)
    assert names["P2"] == ("Çelik^Ayşe", "ISO_IR 192")
    assert names["P3"] == ("Renée^Zoë", "ISO_IR 100")
    assert names["P4"] == ("Иванов^Иван", "ISO_IR 192")


def test_negative_acknowledgements_change_nothing(suite: Suite) -> None:
    port = hl7_port(suite)
    assert msa(send_hl7(port, orm(kind="ADT^A01")))[1] == "AR"
    assert msa(send_hl7(port, orm(order_control="XO")))[1] == "AR"
    assert msa(send_hl7(port, orm(start="")))[1] == "AE"
    assert msa(send_hl7(port, orm(pid="")))[1] == "AE"
    assert msa(send_hl7(port, orm(charset="ISO IR87")))[1] == "AR"
    assert msa(send_hl7(port, "this is not HL7"))[1] == "AR"
    assert b"MSA|AR" in send_raw(port, b"no start block\x1c\r")
    with suite.db.read() as session:
        assert list_steps(session, include_removed=True) == []
    # a valid order afterwards still works; a duplicate accession is refused
    assert msa(send_hl7(port, orm()))[1] == "AA"


def test_cancel_removes_the_order(suite: Suite) -> None:
    port = hl7_port(suite)
    assert msa(send_hl7(port, orm()))[1] == "AA"
    assert msa(send_hl7(port, orm("C1", order_control="CA")))[1] == "AA"
    assert msa(send_hl7(port, orm("C2", order_control="CA", placer="UNKNOWN")))[1] == "AE"
    assert [s for s, _ in mwl_find(suite, mwl_identifier())] == [0x0000]


def test_omi_o23(suite: Suite) -> None:
    message = orm(kind="OMI^O23") + "\rIPC|ACC777|RP1|1.2.3.4|SPS777|MR||||MR_ROOM1"
    assert msa(send_hl7(hl7_port(suite), message))[1] == "AA"
    [(_, ds), _end] = mwl_find(suite, mwl_identifier(PatientID="PAT100"))
    assert ds is not None and ds.AccessionNumber == "ACC777"
    assert ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "MR_ROOM1"


def test_whole_scheduled_workflow(make_suite: SuiteFactory) -> None:
    """Order in over HL7, worklist query, MPPS IN PROGRESS, COMPLETED, SPS state updated."""
    suite = make_suite(
        {
            "services": {
                "worklist": {"hl7_stations": {"CT": "CT1"}},
                "mpps": {
                    "procedure_states": {
                        "CT1": {"n_create": "PROCEDURE STARTED", "completed": "COMPLETED"}
                    }
                },
            }
        }
    )
    assert msa(send_hl7(hl7_port(suite), orm()))[1] == "AA"
    results = mwl_find(suite, mwl_identifier(sps={"ScheduledStationAETitle": "CT1"}))
    [(_, item), _end] = results
    assert item is not None
    accession = item.AccessionNumber
    uid = generate_uid()
    with associate(suite, "ris_scp", [MPPS], calling_ae="CT1") as assoc:
        status, _ = assoc.send_n_create(
            mpps_create(patient_id="PAT100", accession=accession), MPPS, uid
        )
        assert status.Status == 0x0000
        assert [s for s, _ in mwl_find(suite, mwl_identifier())] == [0x0000]
        status, _ = assoc.send_n_set(mpps_final(), MPPS, uid)
        assert status.Status == 0x0000
    with suite.db.read() as session:
        [row] = list_steps(session, include_removed=True)
        assert (row.procedure_state, row.removed) == ("COMPLETED", True)
        [step] = q.list_steps(session)
        assert step.matched and step.state.value == "COMPLETED"


def test_hl7_port_taken_is_a_clear_startup_error(make_suite: SuiteFactory) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(StartupError) as raised:
            make_suite({"services": {"worklist": {"hl7_port": taken}}})
    message = str(raised.value)
    assert f"127.0.0.1:{taken}" in message
    assert "DICOMLAB_SERVICES__WORKLIST__HL7_PORT" in message
