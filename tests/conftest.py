"""Shared fixtures: a real suite on real sockets, over SQLite or PostgreSQL.

PostgreSQL: ``DICOMLAB_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Each suite gets its own schema.
When ``CI`` is set, a missing PostgreSQL server or DCMTK tool fails the run
instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from servers.core import config as config_mod
from servers.core import logs
from servers.core.runtime import UNDECLARED, Suite

IN_CI = bool(os.environ.get("CI"))
POSTGRES_URL = os.environ.get(
    "DICOMLAB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgres"]


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
        raw: dict[str, Any] = {
            "data_dir": str(tmp_path / f"data{len(started)}"),
            "database_url": db_url,
            "host": "127.0.0.1",
            "ae": {
                "storage_scp": {"port": free_port()},
                "query_scp": {"port": free_port()},
            },
        }
        config = config_mod.load(path=None, environ={}, overrides=_deep_merge(raw, overrides or {}))
        suite = Suite.create(config, extra_plugins=extra_plugins)
        suite.start()
        started.append(suite)
        return suite

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
