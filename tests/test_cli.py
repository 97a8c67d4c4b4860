"""The ``dicomlab`` command as an operator runs it: subprocesses, real ports, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from servers.core.cli import parser
from tests.conftest import free_port
from tests.helpers import free_ports_env

BIN = Path(sys.executable).with_name("dicomlab")
DICOMLAB = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "servers.core.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without DICOMLAB_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMLAB_")}
    env.update(extra)
    return env


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DICOMLAB, *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _commands(p: object, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for action in getattr(p, "_actions", []):
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            for name, sub in choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


COMMANDS = sorted(_commands(parser()))


def test_every_subcommand_is_covered() -> None:
    # New subcommands are picked up by introspection; this guards the introspection.
    assert {("serve",), ("config",), ("statement",), ("db",), ("db", "upgrade")} <= set(COMMANDS)


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "dicomlab")
def test_help_exits_0(command: tuple[str, ...], tmp_path: Path) -> None:
    done = run(*command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: dicomlab" in done.stdout


def _effective(output: str) -> dict:
    lines = output.splitlines()
    assert lines[0].startswith("# effective configuration, from ")
    return tomllib.loads("\n".join(lines[1:]))


def test_written_default_round_trips_to_the_same_effective_config(tmp_path: Path) -> None:
    target = tmp_path / "dicomlab.toml"
    written = run("config", "--write-default", str(target), cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert target.exists()
    assert "# " in target.read_text(encoding="utf-8")  # commented for people
    embedded = run("config", cwd=tmp_path)
    from_file = run("config", "--config", str(target), cwd=tmp_path)
    assert embedded.returncode == from_file.returncode == 0
    assert f"from {target}" in from_file.stdout.splitlines()[0]
    assert _effective(from_file.stdout) == _effective(embedded.stdout)
    # Writing over an existing file needs --force.
    again = run("config", "--write-default", str(target), cwd=tmp_path)
    assert again.returncode == 2
    assert "--force" in again.stderr


def test_environment_overrides_show_in_config(tmp_path: Path) -> None:
    env = clean_env(
        DICOMLAB_AE__STORAGE_SCP__PORT="4104",
        DICOMLAB_AE__QUERY_SCP__TITLE="MY_QUERY",
        DICOMLAB_REMOTE__VIEWER__HOST="127.0.0.1",
        DICOMLAB_REMOTE__VIEWER__PORT="11113",
    )
    done = run("config", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    effective = _effective(done.stdout)
    assert effective["ae"]["storage_scp"]["port"] == 4104
    assert effective["ae"]["query_scp"]["title"] == "MY_QUERY"
    assert effective["remote"]["VIEWER"] == {"host": "127.0.0.1", "port": 11113}
    assert _effective(run("config", cwd=tmp_path).stdout)["ae"]["storage_scp"]["port"] == 4000


def test_db_upgrade_on_a_fresh_sqlite_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "data"
    done = run("db", "upgrade", "--data-dir", str(data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (data / "dicomlab.sqlite3").exists()
    revision = done.stdout.strip().rsplit(" ", 1)[-1]
    assert revision and revision != "None"
    current = run("db", "current", "--data-dir", str(data), cwd=tmp_path)
    assert current.stdout.strip() == revision
    # Idempotent: a second upgrade is a no-op at the same revision.
    again = run("db", "upgrade", "--data-dir", str(data), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == done.stdout


def test_statement_check_detects_a_stale_file(tmp_path: Path) -> None:
    out = tmp_path / "statements"
    assert run("statement", "--output-dir", str(out), cwd=tmp_path).returncode == 0
    assert run("statement", "--output-dir", str(out), "--check", cwd=tmp_path).returncode == 0
    (out / "archive.md").write_text("stale\n", encoding="utf-8")
    stale = run("statement", "--output-dir", str(out), "--check", cwd=tmp_path)
    assert stale.returncode == 1
    assert "differs from the rendering" in stale.stderr


# --- dicomlab serve ---------------------------------------------------------------------


class Server:
    """``dicomlab serve`` in a subprocess; stderr collected on a thread."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*DICOMLAB, "serve"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("dicomlab serving"):
                self.ready.set()
        self.ready.set()  # EOF: the process ended

    def wait_ready(self) -> None:
        assert self.ready.wait(60), "dicomlab serve printed no banner within 60 s"
        assert self.proc.poll() is None, "dicomlab serve exited:\n" + self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(**env: str) -> Server:
        server = Server(
            tmp_path,
            clean_env(
                DICOMLAB_HOST="127.0.0.1",
                DICOMLAB_DATA_DIR=str(tmp_path / "data"),
                DICOMLAB_LOG_FORMAT="json",
                **free_ports_env(env),
                **env,
            ),
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.dcmtk
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_echoscu_on_both_aes_and_stops_on_signal(
    serve: Callable[..., Server], dcmtk: Callable[[str], str], signum: signal.Signals
) -> None:
    echoscu = dcmtk("echoscu")
    ports = {"EX_STORE_SCP": free_port(), "EX_QUERY_SCP": free_port()}
    server = serve(
        DICOMLAB_AE__STORAGE_SCP__PORT=str(ports["EX_STORE_SCP"]),
        DICOMLAB_AE__QUERY_SCP__PORT=str(ports["EX_QUERY_SCP"]),
    )
    server.wait_ready()
    for title, port in ports.items():
        echo = subprocess.run(
            [echoscu, "-aet", "CLI_TEST", "-aec", title, "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stdout + echo.stderr
    # The wrong called AE title is refused, as the statement says (1, 1, 7).
    wrong = subprocess.run(
        [echoscu, "-aec", "NOT_ME", "127.0.0.1", str(ports["EX_STORE_SCP"])],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode != 0
    server.proc.send_signal(signum)
    assert server.proc.wait(timeout=15) == 0, server.output
    server.stop()
    assert '"event": "shutdown_requested"' in server.output
    assert f'"signal": "{signum.name}"' in server.output
    assert '"event": "suite_stopped"' in server.output


def test_serve_on_a_port_in_use_exits_2_naming_the_variable(
    serve: Callable[..., Server],
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        server = serve(
            DICOMLAB_AE__STORAGE_SCP__PORT=str(free_port()),
            DICOMLAB_AE__QUERY_SCP__PORT=str(busy),
        )
        assert server.proc.wait(timeout=60) == 2
        server.stop()
    assert "DICOMLAB_AE__QUERY_SCP__PORT" in server.output
    assert f"127.0.0.1:{busy}" in server.output


# --- deploy/ ------------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_deploy_example_config_is_valid_and_matches_the_unit() -> None:
    import configparser

    from servers.core import config as config_mod

    config = config_mod.load(path=DEPLOY / "dicomlab.toml.example", environ={})
    assert str(config.data_dir) == "/var/lib/dicomlab"
    assert config.log_format == "json"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "dicomlab.service", encoding="utf-8")
    service = unit["Service"]
    assert service["ExecStart"].endswith("dicomlab serve --config /etc/dicomlab/dicomlab.toml")
    assert service["User"] == "dicomlab"
    assert f"/var/lib/{service['StateDirectory']}" == str(config.data_dir)
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    sysusers = (DEPLOY / "dicomlab.sysusers.conf").read_text(encoding="utf-8")
    assert "u dicomlab " in sysusers
