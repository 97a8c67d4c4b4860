"""deploy/: the systemd units are valid, and the suite runs the way the unit starts it.

The hardened run reproduces what the unit asks of the kernel, without needing
a booted systemd: a read-only file system except the state directory
(ProtectSystem=strict + StateDirectory=), no capabilities but
CAP_NET_BIND_SERVICE, held as an ambient capability by an unprivileged user
(User=, AmbientCapabilities=, CapabilityBoundingSet=), no_new_privs
(NoNewPrivileges=), no writable+executable memory (MemoryDenyWriteExecute=, via
the kernel's PR_SET_MDWE), a privileged port, and $NOTIFY_SOCKET/$WATCHDOG_USEC
as systemd sets them for Type=notify and WatchdogSec=.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE

from servers.core import config as config_mod
from servers.core import systemd
from tests.conftest import free_port, require
from tests.helpers import CT, free_ports_env, make_image

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "dicomlab.service"
INSTALLED_VENV = "/opt/dicomlab/.venv"
VERIFICATION = "1.2.840.10008.1.1"


def unit_service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT, encoding="utf-8")
    return unit["Service"]


def unit_text_for_this_checkout() -> str:
    """The unit with ExecStart pointing at this venv instead of /opt/dicomlab/.venv."""
    venv = str(Path(sys.executable).parent.parent)
    return UNIT.read_text(encoding="utf-8").replace(INSTALLED_VENV, venv)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze not installed (apt-get install systemd)")
    assert tool is not None
    unit = tmp_path / "dicomlab.service"
    unit.write_text(unit_text_for_this_checkout(), encoding="utf-8")
    result = subprocess.run(
        [tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys too, and only warns: any output is a finding.
    findings = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "sysinit.target" not in line
    ]
    assert result.returncode == 0 and not findings, "\n".join(findings)


def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze not installed (apt-get install systemd)")
    assert tool is not None
    unit = tmp_path / "dicomlab.service"
    unit.write_text(unit_text_for_this_checkout(), encoding="utf-8")
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for dicomlab.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure} (0 = fully sandboxed, 10 = none)")
    assert exposure <= 2.0


def test_unit_config_sysusers_and_tmpfiles_agree() -> None:
    service = unit_service()
    config = config_mod.load(path=DEPLOY / "dicomlab.toml.example", environ={})
    assert str(config.data_dir) == f"/var/lib/{service['StateDirectory']}"
    assert config.log_format == "json"
    assert service["Type"] == "notify"
    assert service["User"] == "dicomlab" and service["Group"] == "dicomlab"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    args = shlex.split(service["ExecStart"])
    assert args[1:] == ["serve", "--config", "/etc/dicomlab/dicomlab.toml"]
    assert Path(args[0]).parent.parent == Path(INSTALLED_VENV)
    sysusers = (DEPLOY / "dicomlab.sysusers.conf").read_text(encoding="utf-8")
    assert re.search(r"^u dicomlab - .* /var/lib/dicomlab ", sysusers, re.M)
    tmpfiles = (DEPLOY / "dicomlab.tmpfiles.conf").read_text(encoding="utf-8")
    assert re.search(r"^d /var/lib/dicomlab\s+0750 dicomlab dicomlab", tmpfiles, re.M)
    assert re.search(r"^d /etc/dicomlab\s+0750 root\s+dicomlab", tmpfiles, re.M)


# --- the service, started as the unit starts it ------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET; collects messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)  # the service runs as another user
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(
        self, state: str, timeout: float = 60, proc: subprocess.Popen[str] | None = None
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (proc is None or proc.poll() is None):
            if any(state in m.splitlines() for m in self.messages):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def privileged_port() -> int:
    """A free port below 1024: 104 itself when nothing holds it."""
    for port in (104, *range(1023, 900, -1)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


@pytest.fixture
def sandbox() -> Iterator[Path]:
    # Under /tmp with a traversable parent: the service's user is not root.
    root = Path(tempfile.mkdtemp(prefix="dicomlab-unit-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def write_config_like_etc(root: Path, store_port: int, query_port: int) -> Path:
    """deploy/dicomlab.toml.example with its paths and ports moved into ``root``."""
    text = (DEPLOY / "dicomlab.toml.example").read_text(encoding="utf-8")
    state = root / "var-lib-dicomlab"
    text = text.replace('"/var/lib/dicomlab"', f'"{state}"')
    text = re.sub(r"(\[ae\.storage_scp\][^\[]*?port = )\d+", rf"\g<1>{store_port}", text)
    text = re.sub(r"(\[ae\.query_scp\][^\[]*?port = )\d+", rf"\g<1>{query_port}", text)
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
    etc = root / "etc-dicomlab"
    etc.mkdir()
    config = etc / "dicomlab.toml"
    config.write_text(f'host = "127.0.0.1"\n{text}', encoding="utf-8")
    config.chmod(0o644)
    etc.chmod(0o755)
    return config


NOBODY = 65534


def with_transfer_syntax(ds: Dataset, syntax: str = ImplicitVRLittleEndian) -> Dataset:
    """``ds`` with the file meta pynetdicom's send_c_store reads its transfer syntax from."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def service_uid(setpriv: str) -> int:
    """The unprivileged user to run as: ``nobody``, if it can run this interpreter.

    A development venv may be built on an interpreter under /root (pyenv), which no
    other user can reach; the run then keeps uid 0 but holds no capability except
    CAP_NET_BIND_SERVICE, so file permissions are still those of an owner only.
    """
    interpreter = os.path.realpath(sys.executable)
    probe = subprocess.run(
        [
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "/bin/sh",
            "-c",
            'test -x "$1" && test -r "$2"',
            "sh",
            interpreter,
            str(UNIT),
        ],
        timeout=30,
    )
    if probe.returncode == 0:
        return NOBODY
    # CI runs on the developers' machine kind, whose Python lives under /root (pyenv):
    # there the run keeps uid 0, still without any capability but the bind one.
    print(f"nobody cannot run {interpreter}; running as uid 0 without capabilities")
    return 0


def test_hardened_service_starts_notifies_serves_and_stops(sandbox: Path) -> None:
    tools = {name: shutil.which(name) for name in ("unshare", "setpriv")}
    require(os.geteuid() == 0, "the sandbox needs root to set up (as systemd does)")
    require(all(tools.values()), "util-linux unshare/setpriv not installed")
    service = unit_service()
    args = shlex.split(unit_text_for_this_checkout().split("ExecStart=", 1)[1].splitlines()[0])
    store_port, query_port = privileged_port(), free_port()
    config = write_config_like_etc(sandbox, store_port, query_port)
    args[args.index("/etc/dicomlab/dicomlab.toml")] = str(config)
    uid = service_uid(str(tools["setpriv"]))
    state = sandbox / "var-lib-dicomlab"
    state.mkdir(mode=0o750)
    os.chown(state, uid, uid)  # StateDirectory= is owned by User=
    notify = NotifySocket(sandbox / "notify")

    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    for assignment in shlex.split(service["Environment"]):
        key, value = assignment.split("=", 1)
        env[key] = value
    env["NOTIFY_SOCKET"] = str(notify.path)
    env["WATCHDOG_USEC"] = "1000000"  # WatchdogSec=1s: a ping every 0.5 s
    # The AEs the example leaves on their default ports (RIS, print, HL7) get free ones:
    # a suite left running on this machine must not make the service fail to bind.
    env.update(
        free_ports_env({f"DICOMLAB_AE__{k}__PORT": "" for k in ("STORAGE_SCP", "QUERY_SCP")})
    )

    mdwe = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
        "    sys.exit('PR_SET_MDWE failed: errno %d' % ctypes.get_errno())\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    # ProtectSystem=strict: everything read-only but the state directory. Then the
    # unit's user, capabilities and no_new_privs; then MemoryDenyWriteExecute.
    setup = (
        "set -e; mount --make-rprivate /; "
        f"mount --bind {shlex.quote(str(state))} {shlex.quote(str(state))}; "
        "mount -o remount,bind,ro /; "
        'exec "$@"'
    )
    command = [
        str(tools["unshare"]),
        "--mount",
        "sh",
        "-c",
        setup,
        "sh",
        str(tools["setpriv"]),
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--no-new-privs",
        "--bounding-set=-all,+net_bind_service",
        "--inh-caps=-all,+net_bind_service",
        "--ambient-caps=-all,+net_bind_service",
        sys.executable,
        "-c",
        mdwe,
        *args,
    ]
    proc = subprocess.Popen(
        command,
        env=env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        ready = notify.wait_for("READY=1", proc=proc)
        assert ready, "no READY=1:\n" + "".join(output)
        assert notify.wait_for("WATCHDOG=1", timeout=10), notify.messages

        # unshare, sh and setpriv each exec the next: the service has the pid we started.
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caps = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        print(
            f"service uid={caps['Uid'].split()[0]} CapEff={caps['CapEff'].strip()} "
            f"NoNewPrivs={caps['NoNewPrivs'].strip()} port={store_port}"
        )
        assert caps["Uid"].split()[0] == str(uid)
        assert int(caps["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
        assert caps["NoNewPrivs"].strip() == "1"

        ae = AE(ae_title="UNIT_TEST")
        ae.add_requested_context(VERIFICATION)
        ae.add_requested_context(CT)
        assoc = ae.associate("127.0.0.1", store_port, ae_title="EX_STORE_SCP")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        # The state directory is writable: the instance's file and the SQLite index.
        assert assoc.send_c_store(with_transfer_syntax(make_image())).Status == 0x0000
        assoc.release()
        stored = [p for p in (state / "instances").rglob("*.dcm")]
        assert len(stored) == 1 and stored[0].stat().st_uid == uid

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(output)
        assert notify.wait_for("STOPPING=1", timeout=5), notify.messages
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
        notify.close()
    text = "".join(output)
    assert '"event": "suite_stopped"' in text
    # Journal-ready: every log line is one JSON object (the banner goes first, as text).
    json_lines = [line for line in text.splitlines() if line.startswith("{")]
    assert json_lines and all(line.endswith("}") for line in json_lines)
    watchdogs = sum(m.count("WATCHDOG=1") for m in notify.messages)
    print(f"notify messages: {len(notify.messages)} ({watchdogs} watchdog pings)")


def test_watchdog_is_withheld_when_an_acceptor_dies() -> None:
    received: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(2)
            alive = threading.Event()
            alive.set()
            env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
            interval = systemd.watchdog_interval(env)
            assert interval == pytest.approx(0.1)

            class Log:
                def error(self, event: str, **_: object) -> None:
                    received.append(event)

            dog = systemd.Watchdog(interval, alive.is_set, Log(), env)
            dog.start()
            assert sock.recv(64) == b"WATCHDOG=1"
            alive.clear()
            time.sleep(0.3)
            with pytest.raises(TimeoutError):  # drain what was sent before, then silence
                while True:
                    sock.settimeout(0.5)
                    sock.recv(64)
            dog.stop()
    assert received == ["watchdog_withheld"]
    assert systemd.watchdog_interval({"NOTIFY_SOCKET": "/x", "WATCHDOG_PID": "1"}) is None
    assert not systemd.notify("READY=1", {})
