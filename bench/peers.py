"""The servers under test: how each is installed, configured, started and stopped.

Every peer runs as its own process on its own loopback port(s) and data
directory, is started fresh for each measurement (so stores always go into an
empty archive) and stopped by PID. A peer lists the workloads it can do; the
others are reported as "n/a", never faked.

DCMTK tools and Orthanc honour the ``TCP_NODELAY`` environment variable (Orthanc's
DICOM network layer is DCMTK's); as shipped they leave Nagle's algorithm on, so
each is run twice: as shipped and with ``TCP_NODELAY=1``. pynetdicom has no such
switch and runs as shipped. dicomlab sets TCP_NODELAY itself on every socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Workload capabilities.
STORE = "store"
FIND = "find"
MOVE = "move"
ECHO = "echo"
MWL = "mwl"  # Modality Worklist C-FIND
MPPS = "mpps"  # Modality Performed Procedure Step N-CREATE/N-SET
PRINT = "print"  # Basic Grayscale Print Management

CLIENT_AE = "BENCHSCU"
DEST_AE = "BENCHDEST"
APT_PACKAGES = {
    "dcmqrscp": "dcmtk",
    "storescp": "dcmtk",
    "storescu": "dcmtk",
    "wlmscpfs": "dcmtk",
    "dcmprscp": "dcmtk",
    "Orthanc": "orthanc",
}
ORTHANC_WORKLISTS_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
# What a peer cannot do, and why (printed as "n/a: ..." in the table).
CANNOT: dict[tuple[str, str], str] = {
    ("orthanc", MPPS): "Orthanc has no MPPS SCP",
    ("orthanc", PRINT): "Orthanc has no print SCP",
    ("dcmqrscp", MWL): "Q/R SCP only (DCMTK's worklist SCP is wlmscpfs)",
    ("dcmqrscp", MPPS): "DCMTK has no MPPS SCP",
    ("dcmqrscp", PRINT): "Q/R SCP only (DCMTK's print SCP is dcmprscp)",
    ("storescp", MWL): "storage SCP only",
    ("storescp", MPPS): "storage SCP only; DCMTK has no MPPS SCP",
    ("storescp", PRINT): "storage SCP only",
    ("pynetdicom-qrscp", MWL): "pynetdicom's qrscp app has no worklist model",
    ("pynetdicom-qrscp", MPPS): "pynetdicom bundles no MPPS SCP app",
    ("pynetdicom-qrscp", PRINT): "pynetdicom bundles no print SCP app",
    ("pynetdicom-storescp", MWL): "storage SCP only",
    ("pynetdicom-storescp", MPPS): "storage SCP only; pynetdicom bundles no MPPS SCP app",
    ("pynetdicom-storescp", PRINT): "storage SCP only",
    ("wlmscpfs", MPPS): "worklist SCP only; DCMTK has no MPPS SCP",
    ("wlmscpfs", PRINT): "worklist SCP only",
    ("dcmprscp", MWL): "print SCP only",
    ("dcmprscp", MPPS): "print SCP only; DCMTK has no MPPS SCP",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_installed(binary: str, log: Callable[[str], None] = print) -> str | None:
    """Path of ``binary``, installing its Debian package with apt-get when missing."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found:
        return found
    package = APT_PACKAGES.get(binary)
    if package is None or shutil.which("apt-get") is None:
        return None
    log(f"installing {package} (for {binary}) with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "--no-install-recommends", package],
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
    )
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")


def _status_kb(pid: int, field_name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


class RssSampler:
    """Peak memory of a server: its VmHWM, or for forking servers (dcmqrscp) the
    peak sum of VmRSS over the process tree, sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_tree_kb = 0
        self.hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        self.hwm_kb = max(self.hwm_kb, _status_kb(self.pid, "VmHWM"))
        total = sum(_status_kb(p, "VmRSS") for p in _tree(self.pid))
        self.peak_tree_kb = max(self.peak_tree_kb, total)

    def stop(self) -> int:
        self.sample()
        self._stop.set()
        self._thread.join()
        return max(self.hwm_kb, self.peak_tree_kb)


@dataclass
class Running:
    """A started peer: where to reach it and how to count what it holds."""

    peer: Peer
    proc: subprocess.Popen[bytes]
    data_dir: Path
    store_port: int
    store_aet: str
    qr_port: int
    qr_aet: str
    http_port: int = 0
    sampler: RssSampler | None = None
    peak_rss_kb: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    # Service (MWL, MPPS, PRINT) -> (port, called AE title), where not the Q/R port.
    services: dict[str, tuple[int, str]] = field(default_factory=dict)

    def endpoint(self, service: str) -> tuple[int, str]:
        return self.services.get(service, (self.qr_port, self.qr_aet))

    def stop(self) -> None:
        if self.sampler is not None:
            self.peak_rss_kb = self.sampler.stop()
            self.sampler = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)

    def files_on_disk(self) -> int:
        root = self.data_dir / self.peer.files_under
        count = 0
        for _dirpath, _dirs, files in os.walk(root):
            count += sum(
                1
                for f in files
                if not f.endswith((".partial", ".json", ".sqlite", ".sqlite3", ".dat", ".log"))
                and not f.startswith((".", "index"))
            )
        return count


@dataclass
class Peer:
    """One server configuration under test."""

    name: str
    kind: str
    binary: str
    capabilities: frozenset[str]
    nodelay_env: bool = False
    note: str = ""
    # Sub-directory of the data directory holding one file per stored instance.
    files_under: str = "."

    def available(self, log: Callable[[str], None] = print) -> bool:
        if self.binary in ("python", "dicomlab"):
            return True
        return ensure_installed(self.binary, log) is not None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMLAB_")}
        env.pop("TCP_NODELAY", None)
        if self.nodelay_env:
            env["TCP_NODELAY"] = "1"
        return env

    def start(
        self, work: Path, dest_port: int, *, fresh: bool = True, nodelay: bool = False
    ) -> Running:
        """Start on ``work`` (emptied first unless ``fresh`` is false).

        ``nodelay`` runs even an as-shipped variant with TCP_NODELAY=1 (for loading).
        """
        if fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        starter = STARTERS[self.kind]
        peer = Peer(**{**self.__dict__, "nodelay_env": True}) if nodelay else self
        running = starter(peer, work, dest_port)
        running.peer = self
        try:
            _wait_listening(running)
        except Exception:
            running.stop()
            raise
        running.sampler = RssSampler(running.proc.pid)
        return running


def _popen(cmd: list[str], env: dict[str, str], work: Path) -> subprocess.Popen[bytes]:
    log = open(work / "server.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_listening(running: Running, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    ports = {running.store_port, running.qr_port, *(p for p, _ in running.services.values())}
    ports -= {0}
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            log = (running.data_dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{running.peer.name} exited at start:\n{log}")
        ok = True
        for port in ports:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
            except OSError:
                ok = False
        if ok and running.http_port:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{running.http_port}/system", timeout=1)
            except OSError:
                ok = False
        if ok:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{running.peer.name} did not start listening within {timeout:.0f} s")


# --- starters -------------------------------------------------------------------------


def _start_dicomlab(peer: Peer, work: Path, dest_port: int) -> Running:
    store_port, qr_port, ris_port, print_port = (free_port() for _ in range(4))
    env = peer.env()
    env.update(
        {
            "DICOMLAB_DATA_DIR": str(work / "data"),
            "DICOMLAB_HOST": "127.0.0.1",
            "DICOMLAB_LOG_FORMAT": "json",
            "DICOMLAB_AE__STORAGE_SCP__PORT": str(store_port),
            "DICOMLAB_AE__QUERY_SCP__PORT": str(qr_port),
            # Free ports for the RIS and print AEs too: their defaults may be taken.
            "DICOMLAB_AE__RIS_SCP__PORT": str(ris_port),
            "DICOMLAB_AE__PRINT_SCP__PORT": str(print_port),
            "DICOMLAB_SERVICES__WORKLIST__HL7_PORT": str(free_port()),
            # The MWL workload's "A*" query matches ~390 of 10,000 steps; the default
            # limit (100, answered A700) would refuse it.
            "DICOMLAB_SERVICES__WORKLIST__MAX_MATCHES": "100000",
            # 32 concurrent associations is a workload; the default limit is 10.
            "DICOMLAB_AE__STORAGE_SCP__MAX_ASSOCIATIONS": "40",
            "DICOMLAB_AE__QUERY_SCP__MAX_ASSOCIATIONS": "40",
            f"DICOMLAB_REMOTE__{DEST_AE}__HOST": "127.0.0.1",
            f"DICOMLAB_REMOTE__{DEST_AE}__PORT": str(dest_port),
        }
    )
    dicomlab = Path(sys.executable).with_name("dicomlab")
    proc = _popen([str(dicomlab), "serve"], env, work)
    services = {
        MWL: (ris_port, "DICOMSRV"),
        MPPS: (ris_port, "DICOMSRV"),
        PRINT: (print_port, "PRINT_SCP"),
    }
    return Running(
        peer, proc, work, store_port, "EX_STORE_SCP", qr_port, "EX_QUERY_SCP", services=services
    )


def dicomlab_env_for(work: Path) -> dict[str, str]:
    """The environment the bulk loader needs to write into a dicomlab data dir."""
    return {"DICOMLAB_DATA_DIR": str(work / "data")}


DCMQRSCP_CONFIG = """\
NetworkTCPPort  = {port}
MaxPDUSize      = 16384
MaxAssociations = 64

HostTable BEGIN
benchdest = ({dest_ae}, 127.0.0.1, {dest_port})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
DCMQRSCP   {db}   RW   (250000, 100000mb)   ANY
AETable END
"""


def _start_dcmqrscp(peer: Peer, work: Path, dest_port: int) -> Running:
    port = free_port()
    db = work / "db"
    db.mkdir(exist_ok=True)
    cfg = work / "dcmqrscp.cfg"
    cfg.write_text(DCMQRSCP_CONFIG.format(port=port, dest_ae=DEST_AE, dest_port=dest_port, db=db))
    proc = _popen(["dcmqrscp", "-c", str(cfg)], peer.env(), work)
    return Running(peer, proc, work, port, "DCMQRSCP", port, "DCMQRSCP")


def _start_storescp(peer: Peer, work: Path, dest_port: int) -> Running:
    port = free_port()
    out = work / "out"
    out.mkdir(exist_ok=True)
    proc = _popen(
        ["storescp", "-aet", "STORESCP", "--output-directory", str(out), str(port)],
        peer.env(),
        work,
    )
    return Running(peer, proc, work, port, "STORESCP", 0, "")


def _start_orthanc(peer: Peer, work: Path, dest_port: int) -> Running:
    port, http_port = free_port(), free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {
            "benchdest": [DEST_AE, "127.0.0.1", dest_port],
            "benchscu": [CLIENT_AE, "127.0.0.1", 104],
        },
        "SaveJobs": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "SynchronousCMove": True,
    }
    worklists = work / "worklists"
    if worklists.is_dir():
        # Only for the MWL workload: the sample plugin Orthanc ships, over a folder of .wl files.
        config["Plugins"] = [str(ORTHANC_WORKLISTS_PLUGIN)]
        config["Worklists"] = {"Enable": True, "Database": str(worklists)}
        config["DicomAlwaysAllowFindWorklist"] = True
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    binary = ensure_installed("Orthanc") or "Orthanc"
    proc = _popen([binary, str(cfg)], peer.env(), work)
    return Running(peer, proc, work, port, "ORTHANC", port, "ORTHANC", http_port=http_port)


WLMSCPFS_AE = "WLMSCPFS"


def _start_wlmscpfs(peer: Peer, work: Path, dest_port: int) -> Running:
    """DCMTK's worklist SCP over ``work/wl/WLMSCPFS/*.wl`` (the called AE names the folder)."""
    port = free_port()
    (work / "wl" / WLMSCPFS_AE).mkdir(parents=True, exist_ok=True)
    proc = _popen(["wlmscpfs", "-dfp", str(work / "wl"), str(port)], peer.env(), work)
    return Running(peer, proc, work, port, WLMSCPFS_AE, port, WLMSCPFS_AE)


DCMPRSCP_PRINTER = "IHEFULL"


def dcmprscp_config(port: int, work: Path) -> str:
    """DCMTK's shipped dcmpstat.cfg with its directories under ``work`` and a free port.

    The printer is the shipped "IHEFULL" entry (display formats up to 4,5, 12-bit).
    """
    text = Path("/etc/dcmtk/dcmpstat.cfg").read_text()
    out, section = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            section = stripped.strip("[]")
        key = stripped.split("=", 1)[0].strip()
        if key in ("Directory", "LogDirectory") and "=" in stripped:
            name = stripped.split("=", 1)[1].strip()
            target = work / name
            target.mkdir(parents=True, exist_ok=True)
            line = f"{key} = {target}"
        elif section == DCMPRSCP_PRINTER and key == "Port":
            line = f"Port = {port}"
        elif section == DCMPRSCP_PRINTER and key == "Hostname":
            line = "Hostname = 127.0.0.1"
        out.append(line)
    return "\n".join(out) + "\n"


def _start_dcmprscp(peer: Peer, work: Path, dest_port: int) -> Running:
    port = free_port()
    cfg = work / "dcmpstat.cfg"
    cfg.write_text(dcmprscp_config(port, work))
    proc = _popen(["dcmprscp", "-c", str(cfg), "-p", DCMPRSCP_PRINTER], peer.env(), work)
    services = {PRINT: (port, DCMPRSCP_PRINTER)}
    return Running(peer, proc, work, port, DCMPRSCP_PRINTER, 0, "", services=services)


QRSCP_CONFIG = """\
[DEFAULT]
    ae_title: QRSCP
    port: {port}
    max_pdu: 16382
    acse_timeout: 30
    dimse_timeout: 30
    network_timeout: 30
    bind_address: 127.0.0.1
    instance_location: {instances}
    database_location: {db}
    log_identifier: False

[{dest_ae}]
    address: 127.0.0.1
    port: {dest_port}
"""


def _start_pynetdicom_qrscp(peer: Peer, work: Path, dest_port: int) -> Running:
    port = free_port()
    cfg = work / "qrscp.ini"
    cfg.write_text(
        QRSCP_CONFIG.format(
            port=port,
            instances=work / "instances",
            db=work / "instances.sqlite",
            dest_ae=DEST_AE,
            dest_port=dest_port,
        )
    )
    proc = _popen([sys.executable, "-m", "pynetdicom", "qrscp", "-c", str(cfg)], peer.env(), work)
    return Running(peer, proc, work, port, "QRSCP", port, "QRSCP")


def _start_pynetdicom_storescp(peer: Peer, work: Path, dest_port: int) -> Running:
    port = free_port()
    out = work / "out"
    out.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pynetdicom",
        "storescp",
        "-ba",
        "127.0.0.1",
        "-aet",
        "STORESCP",
        "-od",
        str(out),
        str(port),
    ]
    proc = _popen(cmd, peer.env(), work)
    return Running(peer, proc, work, port, "STORESCP", 0, "")


STARTERS: dict[str, Callable[[Peer, Path, int], Running]] = {
    "dicomlab": _start_dicomlab,
    "dcmqrscp": _start_dcmqrscp,
    "storescp": _start_storescp,
    "orthanc": _start_orthanc,
    "pynetdicom-qrscp": _start_pynetdicom_qrscp,
    "pynetdicom-storescp": _start_pynetdicom_storescp,
    "wlmscpfs": _start_wlmscpfs,
    "dcmprscp": _start_dcmprscp,
}

ALL = frozenset({STORE, FIND, MOVE, ECHO})
DICOMLAB = ALL | {MWL, MPPS, PRINT}
STORE_ONLY = frozenset({STORE, ECHO})


def all_peers() -> list[Peer]:
    return [
        Peer(
            "dicomlab",
            "dicomlab",
            "dicomlab",
            DICOMLAB,
            files_under="data/instances",
            note="durable: file fsynced and index row committed before Success",
        ),
        Peer("dcmqrscp", "dcmqrscp", "dcmqrscp", ALL, files_under="db"),
        Peer("dcmqrscp+nodelay", "dcmqrscp", "dcmqrscp", ALL, nodelay_env=True, files_under="db"),
        Peer("orthanc", "orthanc", "Orthanc", ALL | {MWL}, files_under="storage"),
        Peer(
            "orthanc+nodelay",
            "orthanc",
            "Orthanc",
            ALL | {MWL},
            nodelay_env=True,
            files_under="storage",
        ),
        Peer("storescp", "storescp", "storescp", STORE_ONLY, files_under="out", note="no index"),
        Peer(
            "storescp+nodelay",
            "storescp",
            "storescp",
            STORE_ONLY,
            nodelay_env=True,
            files_under="out",
            note="no index",
        ),
        Peer("pynetdicom-qrscp", "pynetdicom-qrscp", "python", ALL, files_under="instances"),
        Peer(
            "pynetdicom-storescp",
            "pynetdicom-storescp",
            "python",
            STORE_ONLY,
            files_under="out",
            note="no index",
        ),
        Peer("wlmscpfs", "wlmscpfs", "wlmscpfs", frozenset({MWL, ECHO})),
        Peer("wlmscpfs+nodelay", "wlmscpfs", "wlmscpfs", frozenset({MWL, ECHO}), nodelay_env=True),
        Peer("dcmprscp", "dcmprscp", "dcmprscp", frozenset({PRINT})),
        Peer("dcmprscp+nodelay", "dcmprscp", "dcmprscp", frozenset({PRINT}), nodelay_env=True),
    ]


def orthanc_instance_count(running: Running) -> int:
    url = f"http://127.0.0.1:{running.http_port}/statistics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(json.load(response)["CountInstances"])


@contextlib.contextmanager
def started(peer: Peer, work: Path, dest_port: int) -> Iterator[Running]:
    running = peer.start(work, dest_port)
    try:
        yield running
    finally:
        running.stop()
