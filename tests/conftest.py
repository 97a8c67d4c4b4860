"""Shared fixtures: a real suite on real sockets, over SQLite or PostgreSQL.

PostgreSQL: ``DICOMLAB_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Each suite gets its own schema.
When ``CI`` is set, a missing PostgreSQL server or DCMTK tool fails the run
instead of skipping.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.dimse import DIMSEServiceProvider
from sqlalchemy import create_engine, text

from servers.core import config as config_mod
from servers.core import logs
from servers.core.declaration import StartupError
from servers.core.reactor import EventDrivenAssociation
from servers.core.runtime import UNDECLARED, Suite

IN_CI = bool(os.environ.get("CI"))
POSTGRES_URL = os.environ.get(
    "DICOMLAB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgres"]


def _leave_responses_to_their_sender() -> None:
    """Close a race in pynetdicom's requestor, for the tests' plain pynetdicom clients.

    A ``send_*`` call clears the association's checkpoint and waits for the reactor
    to say it is paused, but the reactor says so before every checkpoint wait: when
    the call clears it just after a wait returned, it sees the stale flag, sends,
    and the reactor thread may take the response off the queue; the call then
    waits out its DIMSE timeout and aborts. The faster our server answers, the more
    often that happens (1 in several thousand exchanges on a loaded 2-core host).
    Here the client's reactor thread leaves a response on the queue while a sender
    holds the checkpoint, as the server's own reactor does
    (``EventDrivenAssociation._take_request``). Only associations that are not
    dicomlab's are touched: the server under test keeps its own code.
    """
    original = DIMSEServiceProvider.get_msg

    def get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:
        assoc = self.assoc
        if (
            not block
            and threading.current_thread() is assoc
            and not isinstance(assoc, EventDrivenAssociation)
        ):
            _, head = self.peek_msg()
            responding = getattr(head, "MessageIDBeingRespondedTo", None) is not None
            if responding and not assoc._reactor_checkpoint.is_set():
                return None, None
        return original(self, block)

    DIMSEServiceProvider.get_msg = get_msg  # type: ignore[method-assign]


_leave_responses_to_their_sender()


def require(condition: bool, reason: str) -> None:
    """Skip locally, fail in CI: a required peer that is missing is a broken CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required test peer missing in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postgres_available() -> str | None:
    try:
        engine = create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_URL} unreachable: {exc.__class__.__name__}"


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    logs.configure("json", "warning")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite3'}"
        return
    problem = _postgres_available()
    require(problem is None, problem or "")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


SuiteFactory = Callable[..., Suite]


@pytest.fixture
def make_suite(tmp_path: Path, db_url: str) -> Iterator[SuiteFactory]:
    """Start suites with the embedded default plus ``overrides`` on free loopback ports."""
    started: list[Suite] = []

    def factory(overrides: dict[str, Any] | None = None, extra_plugins: tuple = ()) -> Suite:
        # A port free_port() found free can be taken before the suite binds it (it is in
        # the ephemeral range, where every outgoing connection on the machine draws its
        # local port): then start again on fresh ports, a bounded number of times.
        for attempt in range(3):
            raw: dict[str, Any] = {
                "data_dir": str(tmp_path / f"data{len(started)}"),
                "database_url": db_url,
                "host": "127.0.0.1",
                # Every listening AE of the embedded default, and the HL7 listener, on a
                # free port.
                "ae": {
                    key: {"port": free_port()}
                    for key, ae in config_mod.DEFAULTS["ae"].items()
                    if int(ae.get("port", 0)) > 0
                },
                # Test orders are scheduled in the past: no expiry unless a test asks for it.
                "services": {"worklist": {"hl7_port": free_port(), "expiry_minutes": 0}},
            }
            config = config_mod.load(
                path=None, environ={}, overrides=_deep_merge(raw, copy.deepcopy(overrides or {}))
            )
            suite = Suite.create(config, extra_plugins=extra_plugins)
            try:
                suite.start()
            except StartupError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                continue
            started.append(suite)
            return suite
        raise AssertionError("unreachable")

    undeclared_before = len(UNDECLARED)
    yield factory
    for suite in started:
        suite.stop()
    # A status the statement does not list is a bug (the brief), whatever the test checked.
    assert UNDECLARED[undeclared_before:] == [], "undeclared statuses sent"


@pytest.fixture
def suite(make_suite: SuiteFactory) -> Suite:
    """The embedded default archive, on free ports."""
    return make_suite()


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture(scope="session")
def dcmtk() -> Callable[[str], str]:
    """Path of a DCMTK tool; skips locally and fails in CI when it is missing."""

    def tool(name: str) -> str:
        path = shutil.which(name)
        require(path is not None, f"DCMTK tool {name} not installed (apt-get install dcmtk)")
        assert path is not None
        return path

    return tool


# --- Status coverage: every documented status row provoked over a real association ----
#
# servers.core.runtime.EMITTED counts every status the in-process servers answered. When
# the whole tests/ directory ran (no -k/-m, nothing deselected or failed), every status
# row the embedded default's services declare must be in it, or the session fails.

TESTS_DIR = Path(__file__).resolve().parent
_deselected: list[int] = [0]


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected[0] += len(items)


def partial_run_reason(
    args: list[str],
    invocation_dir: Path,
    *,
    keyword: str = "",
    markexpr: str = "",
    deselected: int = 0,
    failed: int = 0,
    collected: int = 1,
    narrowing_options: tuple[str, ...] = (),
) -> str | None:
    """Why this session cannot judge status coverage, or None when it ran everything."""
    if keyword or markexpr:
        return "tests were selected with -k/-m"
    if deselected:
        return f"{deselected} tests were deselected"
    if failed:
        return f"{failed} tests failed"
    if not collected:
        return "no tests ran"
    if narrowing_options:
        return "run narrowed by " + ", ".join(narrowing_options)
    paths = set()
    for arg in args:
        if "::" in arg:
            return f"only {arg} ran"
        path = Path(arg)
        paths.add((path if path.is_absolute() else invocation_dir / path).resolve())
    if not any(path == TESTS_DIR or path in TESTS_DIR.parents for path in paths):
        return "only part of tests/ ran"
    return None


def _narrowing_options(config: pytest.Config) -> tuple[str, ...]:
    flags = {
        "lf": "--last-failed",
        "stepwise": "--stepwise",
        "collectonly": "--collect-only",
        "deselect": "--deselect",
        "ignore": "--ignore",
        "ignore_glob": "--ignore-glob",
    }
    return tuple(name for option, name in flags.items() if config.getoption(option, None))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from servers.core.plugins import discover
    from servers.core.runtime import EMITTED
    from servers.core.statement import missing_status_rows

    config = session.config
    reason = partial_run_reason(
        [str(a) for a in config.args],
        config.invocation_params.dir,
        keyword=config.getoption("keyword", default="") or "",
        markexpr=config.getoption("markexpr", default="") or "",
        deselected=_deselected[0],
        failed=session.testsfailed or int(exitstatus != 0),
        collected=session.testscollected,
        narrowing_options=_narrowing_options(config),
    )
    if reason is not None:
        return
    declarations = discover(config_mod.load(path=None, environ={})).values()
    missing = missing_status_rows(declarations, EMITTED)
    if not missing:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        f"{service} {operation} {row.hex} {row.category} ({row.meaning}): {row.condition}"
        for service, operation, row in missing
    ]
    header = f"{len(missing)} documented status rows were never sent over an association"
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("=", header, red=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print(header, *lines, sep="\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- a small file system: a real ENOSPC (tests/test_reliability*.py) ------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    tool = shutil.which("mount")
    result = (
        subprocess.run(
            [tool, "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if tool and os.geteuid() == 0
        else None
    )
    require(
        result is not None and result.returncode == 0,
        f"cannot mount a small tmpfs (needs root): {result.stderr if result else 'not root'}",
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)
