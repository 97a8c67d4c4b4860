"""Modality Worklist C-FIND SCP over real associations: keys, matching, every status."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.exc import OperationalError

from servers.core.runtime import Suite
from servers.worklist import find as find_module
from servers.worklist.find import C_FIND_STATUSES
from tests.conftest import SuiteFactory
from tests.helpers import associate
from tests.ris_helpers import MWL, add_entry, mwl_find, mwl_identifier

S = C_FIND_STATUSES


@pytest.fixture
def ris(suite: Suite) -> Suite:
    add_entry(
        suite,
        PatientID="PAT001",
        PatientName="DOE^JOHN",
        ScheduledPerformingPhysicianName="HOUSE^GREG",
    )
    add_entry(
        suite,
        PatientID="PAT002",
        PatientName="Müller^Jürgen",
        Modality="MR",
        ScheduledStationAETitle="MR1",
        ScheduledProcedureStepStartDate="20240106",
        ScheduledProcedureStepStartTime="1400",
    )
    add_entry(
        suite,
        PatientID="PAT003",
        PatientName="山田^太郎",
        ScheduledProcedureStepStartDate="20240107",
        ScheduledProcedureStepStartTime="0900",
    )
    return suite


def statuses(results: list[tuple[int, Dataset | None]]) -> list[int]:
    return [s for s, _ in results]


def test_ff00_and_0000_one_item_per_response(ris: Suite) -> None:
    results = mwl_find(ris, mwl_identifier())
    assert statuses(results) == [S[0xFF00].code] * 3 + [S[0x0000].code]
    for _, ds in results[:-1]:
        assert ds is not None
        assert len(ds.ScheduledProcedureStepSequence) == 1
        assert ds.AccessionNumber == ds.RequestedProcedureID
        assert ds.SpecificCharacterSet in ("ISO_IR 100", "ISO_IR 192")
    assert results[-1][1] is None


def test_patient_name_case_insensitive_and_accented(ris: Suite) -> None:
    results = mwl_find(ris, mwl_identifier(PatientName="doe^john"))
    assert statuses(results) == [0xFF00, 0x0000]
    results = mwl_find(
        ris, mwl_identifier(PatientName="MÜLLER*", SpecificCharacterSet="ISO_IR 100")
    )
    assert statuses(results) == [0xFF00, 0x0000]
    ds = results[0][1]
    assert ds is not None and str(ds.PatientName) == "Müller^Jürgen"
    assert ds.SpecificCharacterSet == "ISO_IR 100"


def test_non_latin_name_returned_in_utf8(ris: Suite) -> None:
    results = mwl_find(ris, mwl_identifier(PatientID="PAT003"))
    ds = results[0][1]
    assert ds is not None and str(ds.PatientName) == "山田^太郎"
    assert ds.SpecificCharacterSet == "ISO_IR 192"


def test_performing_physician_is_case_sensitive(ris: Suite) -> None:
    exact = mwl_find(ris, mwl_identifier(sps={"ScheduledPerformingPhysicianName": "HOUSE^GREG"}))
    assert statuses(exact) == [0xFF00, 0x0000]
    folded = mwl_find(ris, mwl_identifier(sps={"ScheduledPerformingPhysicianName": "house^greg"}))
    assert statuses(folded) == [0x0000]


def test_date_time_and_station_matching(ris: Suite) -> None:
    assert (
        len(mwl_find(ris, mwl_identifier(sps={"ScheduledProcedureStepStartDate": "20240106-"})))
        == 3
    )
    combined = mwl_find(
        ris,
        mwl_identifier(
            sps={
                "ScheduledProcedureStepStartDate": "20240105-20240106",
                "ScheduledProcedureStepStartTime": "1200-1500",
            }
        ),
    )
    # 2024-01-05 10:00 is before 12:00 on the first day; 2024-01-06 14:00 is inside.
    assert [ds.PatientID for _, ds in combined if ds is not None] == ["PAT002"]
    assert statuses(mwl_find(ris, mwl_identifier(sps={"ScheduledStationAETitle": "MR1"}))) == [
        0xFF00,
        0x0000,
    ]
    assert statuses(mwl_find(ris, mwl_identifier(sps={"Modality": "C?"}))) == [0xFF00] * 2 + [
        0x0000
    ]


def test_ff01_optional_matching_key_is_not_matched(ris: Suite) -> None:
    results = mwl_find(ris, mwl_identifier(AccessionNumber="NOT-THERE"))
    assert statuses(results) == [S[0xFF01].code] * 3 + [0x0000]


def test_ff01_unsupported_model_attribute_not_returned(ris: Suite) -> None:
    results = mwl_find(ris, mwl_identifier(PatientID="PAT001", PatientSize=""))
    assert statuses(results) == [0xFF01, 0x0000]
    assert "PatientSize" not in results[0][1]  # type: ignore[operator]


def test_a900_key_outside_the_model(ris: Suite) -> None:
    results = mwl_find(ris, mwl_identifier(StudyDescription=""))
    assert statuses(results) == [S[0xA900].code]
    # garbage: a private tag
    ds = mwl_identifier()
    ds.add_new(0x00091010, "LO", "junk")
    assert statuses(mwl_find(ris, ds)) == [0xA900]
    # invalid date value
    bad = mwl_identifier(sps={"ScheduledProcedureStepStartDate": "2024-13-45"})
    assert statuses(mwl_find(ris, bad)) == [0xA900]
    # the AE still serves
    assert statuses(mwl_find(ris, mwl_identifier(PatientID="PAT001"))) == [0xFF00, 0x0000]


def test_a700_more_matches_than_the_limit(make_suite: SuiteFactory) -> None:
    suite = make_suite({"services": {"worklist": {"max_matches": 3}}})
    for i in range(3):
        add_entry(suite, PatientID=f"P{i}")
    assert statuses(mwl_find(suite, mwl_identifier())) == [0xFF00] * 3 + [0x0000]
    add_entry(suite, PatientID="P9")
    results = mwl_find(suite, mwl_identifier())
    assert statuses(results) == [S[0xA700].code]


def test_c001_unsupported_character_set(ris: Suite) -> None:
    ds = mwl_identifier()
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.PatientName = "M\xfcller"
    with associate(ris, "ris_scp", [MWL]) as assoc:
        # pydicom cannot encode with an unknown character set: send raw Latin-1 bytes.
        ds["PatientName"].value = "Müller".encode("latin_1")
        results = [int(s.Status) for s, _ in assoc.send_c_find(ds, MWL)]
    assert results == [S[0xC001].code]


def test_c001_database_failure(ris: Suite, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("database is gone"))

    monkeypatch.setattr(find_module, "candidate_steps", broken)
    assert statuses(mwl_find(ris, mwl_identifier())) == [0xC001]


def test_fe00_cancel(ris: Suite, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = threading.Event()

    def wait_for_cancel(is_cancelled: Any) -> None:
        for _ in range(200):
            if is_cancelled():
                seen.set()
                return
            threading.Event().wait(0.05)

    monkeypatch.setattr(find_module, "between_matches", wait_for_cancel)
    with associate(ris, "ris_scp", [MWL]) as assoc:
        responses = assoc.send_c_find(mwl_identifier(), MWL, msg_id=7)
        first_status, _ = next(responses)
        assert first_status.Status == 0xFF00
        context_id = assoc.accepted_contexts[0].context_id
        assoc.send_c_cancel(7, context_id)
        rest = [int(s.Status) for s, _ in responses]
    assert rest == [S[0xFE00].code]
    assert seen.is_set()


def test_findscu_worklist_query(ris: Suite, dcmtk: Any, tmp_path: Path) -> None:
    findscu = dcmtk("findscu")
    proc = subprocess.run(
        [
            findscu,
            "-W",
            "-aec",
            "DICOMSRV",
            "-aet",
            "MODALITY",
            "-k",
            "PatientName=DOE*",
            "-k",
            "PatientID",
            "-k",
            "AccessionNumber",
            "-k",
            "ScheduledProcedureStepSequence[0].Modality=CT",
            "-k",
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
            "-k",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
            "-X",
            "-od",
            str(tmp_path),
            "127.0.0.1",
            str(ris.port_of("ris_scp")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("rsp*.dcm"))
    assert len(files) == 1
    ds = dcmread(files[0])
    assert ds.PatientID == "PAT001"
    assert ds.ScheduledProcedureStepSequence[0].Modality == "CT"


def test_expired_steps_leave_the_worklist(suite: Suite) -> None:
    from datetime import datetime

    from servers.worklist import WorklistWorker

    add_entry(suite, PatientID="OLD", ScheduledProcedureStepStartDate="20240101")
    add_entry(suite, PatientID="NEW", ScheduledProcedureStepStartDate="20240110")
    worker = next(w for w in suite._background if isinstance(w, WorklistWorker))
    worker.settings = {**worker.settings, "expiry_minutes": 2880}
    assert worker.run_once(now=datetime(2024, 1, 5, 12, 0)) == 1
    results = mwl_find(suite, mwl_identifier())
    assert [ds.PatientID for _, ds in results if ds is not None] == ["NEW"]


def test_cli_add_import_list_remove_mpps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from servers.core.cli import main

    data = ["--data-dir", str(tmp_path / "cli")]
    for command in ("add", "import", "list", "remove", "mpps"):
        with pytest.raises(SystemExit) as exit_info:
            main(["worklist", command, "--help"])
        assert exit_info.value.code == 0
    assert (
        main(
            [
                "worklist",
                "add",
                *data,
                "--patient-id",
                "P1",
                "--patient-name",
                "Renée^Zoë",
                "--modality",
                "CT",
                "--station",
                "CT1",
                "--date",
                "20300101",
                "--time",
                "0900",
                "--accession",
                "ACC1",
            ]
        )
        == 0
    )
    source = tmp_path / "orders.json"
    source.write_text(
        json.dumps(
            [
                {
                    "PatientID": "P2",
                    "PatientName": "ROE^JANE",
                    "Modality": "MR",
                    "ScheduledStationAETitle": "MR1",
                    "ScheduledProcedureStepStartDate": "20300102",
                    "ScheduledProcedureStepStartTime": "1000",
                    "ScheduledProcedureStepID": "SPS2",
                }
            ]
        ),
        encoding="utf-8",
    )
    assert main(["worklist", "import", *data, str(source)]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("PatientID,Modality\nP3,CT\n", encoding="utf-8")
    assert main(["worklist", "import", *data, str(bad)]) == 2  # missing keys: nothing added
    assert main(["worklist", "remove", *data, "SPS2"]) == 0
    assert main(["worklist", "remove", *data, "SPS2"]) == 1
    capsys.readouterr()
    assert main(["worklist", "list", *data]) == 0
    out = capsys.readouterr().out
    assert "ACC1" in out and "Renée^Zoë" in out and "SPS2" not in out and "P3" not in out
    assert main(["worklist", "mpps", *data]) == 0
    assert main(["worklist", "mpps", "--exceptions", *data]) == 0


def test_wildcards_and_sql_characters_match_literally(suite: Suite) -> None:
    """``%``, ``_``, ``[`` and ``!`` in values are ordinary characters; only ``*`` and ``?``
    are wildcards, and Patient's Name folds case while the other keys do not."""
    add_entry(suite, PatientID="P%1", PatientName="O'NEIL_X^ANN", ScheduledStationAETitle="CT[1]")
    add_entry(suite, PatientID="PX1", PatientName="ONEILXX^ANN", ScheduledStationAETitle="CT11")
    add_entry(suite, PatientID="p!1", PatientName="Straße^Eva^^", ScheduledStationAETitle="ct1")

    def ids(identifier: Dataset) -> list[str]:
        return sorted(str(ds.PatientID) for _, ds in mwl_find(suite, identifier) if ds is not None)

    assert ids(mwl_identifier(PatientID="P%*")) == ["P%1"]
    assert ids(mwl_identifier(PatientID="P?1")) == ["P%1", "PX1"]
    assert ids(mwl_identifier(PatientID="p*")) == ["p!1"]
    assert ids(mwl_identifier(PatientID="P!?")) == []
    assert ids(mwl_identifier(PatientName="o'neil_*")) == ["P%1"]
    assert ids(mwl_identifier(PatientName="O?NEIL?X^ANN")) == ["P%1"]
    assert ids(mwl_identifier(PatientName="*^ann")) == ["P%1", "PX1"]
    # Case folding before matching: ß folds to "ss", the trailing ^ are not compared.
    assert ids(mwl_identifier(PatientName="STRASSE^EVA")) == ["p!1"]
    assert ids(mwl_identifier(PatientName="stra?e*")) == []
    assert ids(mwl_identifier(sps={"ScheduledStationAETitle": "CT[1]"})) == ["P%1"]
    assert ids(mwl_identifier(sps={"ScheduledStationAETitle": "CT[*"})) == ["P%1"]
    assert ids(mwl_identifier(sps={"ScheduledStationAETitle": "C*1"})) == ["PX1"]


def test_performing_physician_matched_on_alphabetic_group(suite: Suite) -> None:
    add_entry(suite, PatientID="P1", ScheduledPerformingPhysicianName="HOUSE^GREG^^=ハウス")
    add_entry(suite, PatientID="P2", ScheduledPerformingPhysicianName="HOUSEMAN^AL")

    def ids(physician: str) -> list[str]:
        identifier = mwl_identifier(sps={"ScheduledPerformingPhysicianName": physician})
        identifier.SpecificCharacterSet = "ISO_IR 192"
        return sorted(str(ds.PatientID) for _, ds in mwl_find(suite, identifier) if ds is not None)

    assert ids("HOUSE^GREG") == ["P1"]
    assert ids("HOUSE*") == ["P1", "P2"]
    assert ids("*GREG") == ["P1"]
    assert ids("HOUSE^GREG^^=ハウス") == ["P1"]
    assert ids("*ハウス") == []
