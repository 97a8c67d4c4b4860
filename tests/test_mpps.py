"""MPPS SCP over real associations: the state machine, every status, matching, storage."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.exc import OperationalError

from db.models import PpsState
from db.queries import mpps as q
from db.queries.worklist import list_steps
from servers.core.runtime import Suite
from servers.mpps import N_CREATE_STATUSES, N_SET_STATUSES
from tests.conftest import SuiteFactory
from tests.helpers import associate
from tests.ris_helpers import MPPS, add_entry, mpps_create, mpps_final

C, S = N_CREATE_STATUSES, N_SET_STATUSES


def snapshot(suite: Suite) -> list[tuple[str, str, int]]:
    with suite.db.read() as session:
        return [
            (s.sop_instance_uid, s.state.value, len(q.messages_of(session, s)))
            for s in q.list_steps(session)
        ]


def test_create_set_completed_and_final_state(suite: Suite) -> None:
    order = add_entry(suite)
    uid = generate_uid()
    with associate(suite, "ris_scp", [MPPS]) as assoc:
        status, _ = assoc.send_n_create(mpps_create(accession=order["accession"]), MPPS, uid)
        assert status.Status == C[0x0000].code
        # intermediate N-SET
        status, _ = assoc.send_n_set(_ds(PerformedProcedureStepDescription="HEAD CT"), MPPS, uid)
        assert status.Status == S[0x0000].code
        status, _ = assoc.send_n_set(mpps_final("COMPLETED"), MPPS, uid)
        assert status.Status == 0x0000
        before = snapshot(suite)
        status, _ = assoc.send_n_set(mpps_final("DISCONTINUED"), MPPS, uid)
        assert status.Status == S[0x0110].code
        assert status.ErrorID == 0xA710
        assert status.ErrorComment == "Performed Procedure Step Object may no longer be updated"
        assert snapshot(suite) == before
    assert before == [(uid, "COMPLETED", 3)]
    with suite.db.read() as session:
        step = q.get_step(session, uid)
        assert step is not None and step.matched
        assert q.list_exceptions(session) == []


def _ds(**values: Any) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def test_n_create_failures_change_nothing(suite: Suite) -> None:
    uid = generate_uid()
    with associate(suite, "ris_scp", [MPPS]) as assoc:
        status, _ = assoc.send_n_create(mpps_create(), MPPS, uid)
        assert status.Status == 0x0000
        before = snapshot(suite)
        status, _ = assoc.send_n_create(mpps_create(), MPPS, uid)
        assert status.Status == C[0x0111].code
        missing = mpps_create()
        del missing.PerformedStationAETitle
        status, _ = assoc.send_n_create(missing, MPPS, generate_uid())
        assert status.Status == C[0x0120].code
        assert "PerformedStationAETitle" in status.ErrorComment
        status, _ = assoc.send_n_create(mpps_create(status="COMPLETED"), MPPS, generate_uid())
        assert status.Status == C[0x0106].code
        status, _ = assoc.send_n_create(mpps_create(), MPPS, "1.2.03.x")
        assert status.Status == C[0x0117].code
        assert snapshot(suite) == before
        # the AE keeps serving
        status, _ = assoc.send_n_create(mpps_create(), MPPS, generate_uid())
        assert status.Status == 0x0000


def test_n_set_failures_change_nothing(suite: Suite) -> None:
    uid = generate_uid()
    with associate(suite, "ris_scp", [MPPS]) as assoc:
        status, _ = assoc.send_n_set(mpps_final(), MPPS, generate_uid())
        assert status.Status == S[0x0112].code
        assoc.send_n_create(mpps_create(), MPPS, uid)
        before = snapshot(suite)
        incomplete = mpps_final()
        del incomplete.PerformedProcedureStepEndTime
        status, _ = assoc.send_n_set(incomplete, MPPS, uid)
        assert status.Status == S[0x0120].code
        status, _ = assoc.send_n_set(_ds(PerformedProcedureStepStatus="FINISHED"), MPPS, uid)
        assert status.Status == S[0x0106].code
        assert snapshot(suite) == before
        status, _ = assoc.send_n_set(mpps_final("DISCONTINUED"), MPPS, uid)
        assert status.Status == 0x0000
    assert snapshot(suite)[0][1] == PpsState.DISCONTINUED.value


def test_0110_internal_error(suite: Suite, monkeypatch: pytest.MonkeyPatch) -> None:
    uid = generate_uid()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("INSERT", {}, Exception("disk full"))

    with associate(suite, "ris_scp", [MPPS]) as assoc:
        assoc.send_n_create(mpps_create(), MPPS, uid)
        monkeypatch.setattr(q, "add_message", broken)
        status, _ = assoc.send_n_create(mpps_create(), MPPS, generate_uid())
        assert status.Status == C[0x0110].code
        status, _ = assoc.send_n_set(mpps_final(), MPPS, uid)
        assert status.Status == S[0x0110].code
        assert "internal error" in status.ErrorComment
    assert [s[1:] for s in snapshot(suite)] == [("IN PROGRESS", 1)]


def test_unmatched_step_is_an_exception(suite: Suite) -> None:
    add_entry(suite, PatientID="PAT001")
    with associate(suite, "ris_scp", [MPPS]) as assoc:
        status, _ = assoc.send_n_create(mpps_create(accession="NOPE"), MPPS, generate_uid())
        assert status.Status == 0x0000
    with suite.db.read() as session:
        [step] = q.list_steps(session)
        assert not step.matched
        [exc] = q.list_exceptions(session)
        assert "NOPE" in exc.reason


def test_missing_affected_uid_is_assigned(suite: Suite) -> None:
    with associate(suite, "ris_scp", [MPPS]) as assoc:
        status, _ = assoc.send_n_create(mpps_create(), MPPS, None)
        assert status.Status == 0x0000
    with suite.db.read() as session:
        [step] = q.list_steps(session)
        assert step.sop_instance_uid.startswith("1.2.826.0.1.3680043")


def test_station_state_update_removes_the_step(make_suite: SuiteFactory) -> None:
    suite = make_suite(
        {
            "services": {
                "mpps": {
                    "procedure_states": {
                        "CT1": {"n_create": "PROCEDURE STARTED", "completed": "COMPLETED"}
                    }
                }
            }
        }
    )
    order = add_entry(suite)
    uid = generate_uid()
    with associate(suite, "ris_scp", [MPPS]) as assoc:
        assoc.send_n_create(mpps_create(accession=order["accession"]), MPPS, uid)
        with suite.db.read() as session:
            assert list_steps(session) == []
            [row] = list_steps(session, include_removed=True)
            assert row.procedure_state == "PROCEDURE STARTED"
        assoc.send_n_set(mpps_final(), MPPS, uid)
    with suite.db.read() as session:
        [row] = list_steps(session, include_removed=True)
        assert row.procedure_state == "COMPLETED" and row.removed


def test_purge(suite: Suite) -> None:
    from datetime import timedelta

    from db.models import utcnow

    with associate(suite, "ris_scp", [MPPS]) as assoc:
        uid = generate_uid()
        assoc.send_n_create(mpps_create(), MPPS, uid)
        assoc.send_n_set(mpps_final(), MPPS, uid)
    with suite.db.write() as session:
        assert (
            q.purge_steps(session, utcnow() - timedelta(days=30), utcnow() - timedelta(days=30))
            == 0
        )
        assert (
            q.purge_steps(session, utcnow() + timedelta(seconds=1), utcnow() - timedelta(days=30))
            == 1
        )
    with associate(suite, "ris_scp", [MPPS]) as assoc:
        status, _ = assoc.send_n_set(mpps_final(), MPPS, uid)
        assert status.Status == 0x0112
