"""The status coverage check that closes every full test run (see ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from servers.core.declaration import FAILURE, SUCCESS, ServiceDeclaration, StatusRow, StatusTable
from servers.core.runtime import EMITTED
from servers.core.statement import missing_status_rows
from tests.conftest import TESTS_DIR, partial_run_reason
from tests.helpers import associate

VERIFICATION = "1.2.840.10008.1.1"

OK = StatusRow(0x0000, SUCCESS, "Success", "The operation succeeded.")
BUSY = StatusRow(0xA700, FAILURE, "Out of Resources", "The store is full.")
DECLARATION = ServiceDeclaration(
    name="demo",
    title="Demo",
    statuses={
        "C-STORE": StatusTable("C-STORE", [OK, BUSY]),
        "C-ECHO": StatusTable("C-ECHO", [OK]),
    },
)


def test_all_rows_emitted_means_nothing_missing() -> None:
    emitted = {("demo", "C-STORE", 0x0000): 3, ("demo", "C-STORE", 0xA700): 1}
    emitted[("demo", "C-ECHO", 0x0000)] = 1
    assert missing_status_rows([DECLARATION], emitted) == []


def test_a_row_never_emitted_is_reported() -> None:
    emitted = {("demo", "C-STORE", 0x0000): 3, ("demo", "C-ECHO", 0x0000): 1}
    assert missing_status_rows([DECLARATION], emitted) == [("demo", "C-STORE", BUSY)]


def test_same_code_for_another_operation_or_service_does_not_count() -> None:
    emitted = {
        ("demo", "C-ECHO", 0x0000): 1,
        ("other", "C-STORE", 0x0000): 1,
        ("demo", "C-FIND", 0xA700): 1,
        ("demo", "C-STORE", 0xA700): 0,
    }
    missing = missing_status_rows([DECLARATION], emitted)
    assert missing == [("demo", "C-STORE", OK), ("demo", "C-STORE", BUSY)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_emitted_counts_statuses_sent_over_a_real_association(suite) -> None:
    key = ("verification", "C-ECHO", 0x0000)
    before = EMITTED[key]
    with associate(suite, "query_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    assert EMITTED[key] == before + 2


ROOT = TESTS_DIR.parent


@pytest.mark.parametrize(
    ("args", "options", "expected"),
    [
        (["tests"], {}, None),
        ([str(TESTS_DIR)], {}, None),
        (["."], {}, None),
        (["tests/test_statement.py"], {}, "only part of tests/ ran"),
        (["tests/test_statement.py::test_x"], {}, "only tests/test_statement.py::test_x ran"),
        (["tests"], {"keyword": "echo"}, "tests were selected with -k/-m"),
        (["tests"], {"markexpr": "not postgres"}, "tests were selected with -k/-m"),
        (["tests"], {"deselected": 2}, "2 tests were deselected"),
        (["tests"], {"failed": 1}, "1 tests failed"),
        (["tests"], {"collected": 0}, "no tests ran"),
        (["tests"], {"narrowing_options": ("--last-failed",)}, "run narrowed by --last-failed"),
    ],
)
def test_partial_runs_do_not_judge_coverage(
    args: list[str], options: dict, expected: str | None
) -> None:
    assert partial_run_reason(args, ROOT, **options) == expected


def test_relative_paths_resolve_from_the_invocation_directory(tmp_path: Path) -> None:
    assert partial_run_reason(["tests"], tmp_path) == "only part of tests/ ran"
    assert partial_run_reason([str(TESTS_DIR)], tmp_path) is None
