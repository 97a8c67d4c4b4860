"""``python -m bench``: run the workloads against every peer and print one table.

Peers are started fresh (or over a pre-loaded data directory for C-FIND and
C-MOVE), run one after another in an order that rotates between repetitions,
and stopped by PID. Every figure is the median over the repetitions; C-FIND
latencies are p50/p95 over all runs of a query. The ratio in each cell is
dicomlab's figure divided by that peer's (↑: higher is better, ↓: lower is
better). Results go to stdout, ``bench/results/latest.md`` and ``latest.json``.

A phase is a function ``(ctx) -> None`` that adds rows through ``ctx.record``
and ``ctx.na``; ``PHASES`` names them for ``--phases``. The RIS and print
workloads (MWL C-FIND, MPPS N-CREATE/N-SET, print) are in ``bench/services.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import clients, data, services
from bench.peers import (
    DEST_AE,
    FIND,
    MOVE,
    STORE,
    Peer,
    Running,
    all_peers,
    ensure_installed,
    free_port,
)

HERE = Path(__file__).parent
RESULTS = HERE / "results"
# The two queries that answer every study.
EVERYTHING = ("universal match", "all studies (Study Date 19000101-)")
DCMQRSCP_MAX_STUDIES = 500  # DB_UpperMaxStudies in DCMTK's dcmqrdb: the quota is capped there


@dataclass(frozen=True)
class Profile:
    name: str
    reps: int
    ct: int
    tiny: int
    parallel: tuple[tuple[int, str, int], ...]  # (associations, kind, instances)
    find_studies: tuple[int, ...]
    find_runs: int  # findscu runs per query per peer (split over two rounds)
    move: int
    move_reps: int
    echo_runs: int
    peers: tuple[str, ...] | None = None  # None: all
    # Runs of the two queries that return every study (they dominate the run time).
    find_all_runs: int = 6
    # Above this many studies only these kinds are loaded (C-STORE loads take too long).
    big_find: int = 10_000
    big_find_kinds: tuple[str, ...] = ("dicomlab", "orthanc")
    mwl_steps: int = 10_000  # scheduled procedure steps on the worklist
    mpps: int = 100  # N-CREATE + N-SET round trips per repetition
    print_films: int = 3  # films per repetition and bit depth
    print_bits: tuple[int, ...] = (8, 12)


PROFILES = {
    "quick": Profile(
        name="quick",
        reps=3,
        ct=40,
        tiny=200,
        parallel=((8, "ct", 80), (8, "tiny", 400), (32, "tiny", 640)),
        find_studies=(1000,),
        find_runs=6,
        move=50,
        move_reps=3,
        echo_runs=10,
    ),
    "full": Profile(
        name="full",
        reps=3,
        ct=400,
        tiny=1000,
        parallel=((8, "ct", 400), (8, "tiny", 2000), (32, "tiny", 3200)),
        find_studies=(10_000, 100_000),
        find_runs=10,
        find_all_runs=4,
        move=200,
        move_reps=5,
        echo_runs=30,
        mpps=300,
        print_films=6,
    ),
}


@dataclass
class Row:
    workload: str
    metric: str
    higher_is_better: bool
    values: dict[str, list[float]] = field(default_factory=dict)
    na: dict[str, str] = field(default_factory=dict)
    summary: str = "median"  # or "p50" / "p95" / "max" / "sum"

    def figure(self, peer: str) -> float | None:
        vals = self.values.get(peer)
        if not vals:
            return None
        if self.summary == "p95":
            return percentile(vals, 95)
        if self.summary == "max":
            return max(vals)
        if self.summary == "min":
            return min(vals)
        if self.summary == "sum":
            return sum(vals)
        return statistics.median(vals)


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Context:
    profile: Profile
    peers: list[Peer]
    cache: Path
    runs: Path
    dest_port: int
    dest_dir: Path
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    rss_kb: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verbose: bool = True

    def row(self, workload: str, metric: str, higher: bool, summary: str = "median") -> Row:
        key = (workload, metric)
        if key not in self.rows:
            self.rows[key] = Row(workload, metric, higher, summary=summary)
        return self.rows[key]

    def record(
        self,
        workload: str,
        metric: str,
        higher: bool,
        peer: str,
        value: float,
        summary: str = "median",
    ) -> None:
        self.row(workload, metric, higher, summary).values.setdefault(peer, []).append(value)

    def na(
        self, workload: str, metric: str, higher: bool, peer: str, why: str, summary: str = "median"
    ) -> None:
        self.row(workload, metric, higher, summary).na[peer] = why

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def stopped(self, running: Running) -> None:
        name = running.peer.name
        self.rss_kb[name] = max(self.rss_kb.get(name, 0), running.peak_rss_kb)

    def rotated(self, peers: Sequence[Peer], rep: int) -> list[Peer]:
        k = rep % len(peers) if peers else 0
        return list(peers[k:]) + list(peers[:k])


# --- phases -----------------------------------------------------------------------------


def _stored(running: Running, instance_set: data.InstanceSet, files_before: int) -> int:
    if FIND in running.peer.capabilities:
        m = instance_set.manifest
        return clients.count_images(running, str(m["study_uid"]), str(m["series_uid"]))
    return running.files_on_disk() - files_before


def phase_store(ctx: Context) -> None:
    """Echo, then C-STORE over one and over many associations, on a fresh server."""
    p = ctx.profile
    ct = data.image_series(ctx.cache, "ct", p.ct)
    tiny = data.image_series(ctx.cache, "tiny", p.tiny)
    parallel = [
        (n, kind, data.image_series(ctx.cache, kind, count, label=f"par{n}-"))
        for n, kind, count in p.parallel
    ]
    peers = [peer for peer in ctx.peers if STORE in peer.capabilities]
    for rep in range(p.reps):
        for peer in ctx.rotated(peers, rep):
            ctx.log(f"store rep {rep + 1}/{p.reps}: {peer.name}")
            running = peer.start(ctx.runs / peer.name, ctx.dest_port)
            try:
                _echo(ctx, running)
                for label, instance_set in (("CT 512×512", ct), ("tiny", tiny)):
                    before = running.files_on_disk()
                    run = clients.storescu(running, instance_set.files)
                    workload = f"C-STORE, 1 association, {len(instance_set.files)} {label}"
                    _store_rows(
                        ctx,
                        workload,
                        peer.name,
                        run,
                        instance_set,
                        _stored(running, instance_set, before),
                    )
                for n, kind, instance_set in parallel:
                    before = running.files_on_disk()
                    run = clients.storescu_parallel(running, instance_set.files, n)
                    label = "CT 512×512" if kind == "ct" else "tiny"
                    workload = f"C-STORE, {n} associations, {len(instance_set.files)} {label}"
                    _store_rows(
                        ctx,
                        workload,
                        peer.name,
                        run,
                        instance_set,
                        _stored(running, instance_set, before),
                    )
            finally:
                running.stop()
                ctx.stopped(running)


def _store_rows(
    ctx: Context,
    workload: str,
    peer: str,
    run: clients.ClientRun,
    instance_set: data.InstanceSet,
    stored: int,
) -> None:
    sent = len(instance_set.files)
    ctx.record(workload, "instances/s ↑", True, peer, run.successes / run.seconds)
    if "1 association" in workload:
        mb = instance_set.bytes_total * run.successes / sent / 1e6
        ctx.record(workload, "MB/s ↑", True, peer, mb / run.seconds)
    ctx.record(workload, "failed stores (sum over reps) ↓", False, peer, run.failures, "sum")
    lost = max(run.successes - stored, 0)
    ctx.record(workload, "lost after Success (sum) ↓", False, peer, lost, "sum")
    if run.failures or lost:
        ctx.log(f"  {peer} {workload}: {run.failures} failed, {lost} lost; {run.output[-300:]!r}")


def _echo(ctx: Context, running: Running) -> None:
    peer = running.peer.name
    runs = [clients.echoscu(running) for _ in range(ctx.profile.echo_runs)]
    ok = [r.seconds * 1000 for r in runs if r.returncode == 0]
    if ok:
        ctx.record("C-ECHO", "echoscu wall time p50, ms ↓", False, peer, statistics.median(ok))
    one = clients.echoscu(running, repeat=1)
    many = clients.echoscu(running, repeat=201)
    if one.returncode == 0 and many.returncode == 0:
        rtt = max(many.seconds - one.seconds, 0) / 200 * 1000
        ctx.record("C-ECHO", "round trip in an open association, ms ↓", False, peer, rtt)


def _prepared(
    ctx: Context,
    peer: Peer,
    template: Path,
    loader: Callable[[Running], None],
    reuse: dict[str, Path],
) -> Path:
    """A data directory of ``peer``'s kind, loaded once (by ``loader``) and reused."""
    if peer.kind in reuse:
        return reuse[peer.kind]
    work = template / peer.kind
    running = peer.start(work, ctx.dest_port)
    try:
        loader(running)
    finally:
        running.stop()
        ctx.stopped(running)
    reuse[peer.kind] = work
    return work


def phase_find(ctx: Context) -> None:
    p = ctx.profile
    peers = [peer for peer in ctx.peers if FIND in peer.capabilities]
    for studies in p.find_studies:
        instance_set = data.find_studies(ctx.cache, studies)
        workload = f"C-FIND, {studies:,} studies"
        loaded: dict[str, Path] = {}
        template = ctx.runs / f"find-{studies}"
        patients = studies // 2
        rng = random.Random(studies)
        exact = [f"P{rng.randrange(patients):07d}" for _ in range(p.find_runs)]
        accessions = [f"A{rng.randrange(studies):09d}" for _ in range(p.find_runs)]
        runs = range(p.find_runs)
        queries: list[tuple[str, list[dict[str, str]]]] = [
            ("exact Patient ID", [{"PatientID": exact[i]} for i in runs]),
            ("Patient's Name A*", [{"PatientName": "A*"} for i in runs]),
            ("one-month Study Date range", [{"StudyDate": "20230301-20230331"} for i in runs]),
            ("Accession Number", [{"AccessionNumber": accessions[i]} for i in runs]),
            (EVERYTHING[0], [{} for i in runs]),
            (EVERYTHING[1], [{"StudyDate": "19000101-"} for i in runs]),
        ]
        return_keys = {
            "StudyInstanceUID": "",
            "PatientName": "",
            "PatientID": "",
            "StudyDate": "",
            "AccessionNumber": "",
        }
        active = []
        for peer in peers:
            if peer.kind == "dcmqrscp" and studies > DCMQRSCP_MAX_STUDIES:
                for name, _ in queries:
                    why = f"n/a: dcmqrscp keeps at most {DCMQRSCP_MAX_STUDIES} studies"
                    ctx.na(workload, f"{name}, p50 ms ↓", False, peer.name, why)
                    ctx.na(workload, f"{name}, p95 ms ↓", False, peer.name, why, "p95")
                continue
            if studies > p.big_find and peer.kind not in p.big_find_kinds:
                for name, _ in queries:
                    why = f"not loaded at this size (C-STORE load of {studies:,} takes too long)"
                    ctx.na(workload, f"{name}, p50 ms ↓", False, peer.name, why)
                    ctx.na(workload, f"{name}, p95 ms ↓", False, peer.name, why, "p95")
                continue
            active.append(peer)
        for rnd in range(2):
            for peer in ctx.rotated(active, rnd):
                work = _find_loaded(ctx, peer, template, instance_set, loaded)
                ctx.log(f"find {studies}: round {rnd + 1}/2 {peer.name}")
                running = peer.start(work, ctx.dest_port, fresh=False)
                try:
                    half = range(rnd * p.find_runs // 2, (rnd + 1) * p.find_runs // 2)
                    for i in half:
                        for name, keys in queries:
                            returns_all = name in EVERYTHING
                            if returns_all and i % (p.find_runs // 2) >= p.find_all_runs // 2:
                                continue
                            if peer.kind == "dicomlab" and name == "universal match":
                                why = (
                                    "n/a: refused (C001) as its statement says; "
                                    "see the 19000101- row"
                                )
                                ctx.na(workload, f"{name}, p50 ms ↓", False, peer.name, why)
                                ctx.na(workload, f"{name}, p95 ms ↓", False, peer.name, why, "p95")
                                continue
                            run = clients.findscu(running, {**return_keys, **keys[i]})
                            if run.failures:
                                ctx.log(f"  {peer.name} {name} failed: {run.output[-300:]!r}")
                                continue
                            ms = run.seconds * 1000
                            ctx.record(workload, f"{name}, p50 ms ↓", False, peer.name, ms, "p50")
                            ctx.record(workload, f"{name}, p95 ms ↓", False, peer.name, ms, "p95")
                            ctx.record(
                                workload, f"{name}, matches", True, peer.name, run.successes, "max"
                            )
                finally:
                    running.stop()
                    ctx.stopped(running)


def _find_loaded(
    ctx: Context,
    peer: Peer,
    template: Path,
    instance_set: data.InstanceSet,
    loaded: dict[str, Path],
) -> Path:
    if peer.kind in loaded:
        return loaded[peer.kind]
    workload = f"C-FIND, {len(instance_set.files):,} studies"
    work = template / peer.kind
    started = time.perf_counter()
    if peer.kind == "dicomlab":
        from bench.load_dicomlab import load

        if work.exists():
            shutil.rmtree(work)
        ctx.log(f"bulk-loading {len(instance_set.files)} studies into dicomlab")
        load(work / "data", instance_set.files)
        how = "bulk loader"
    else:
        ctx.log(f"loading {len(instance_set.files)} studies into {peer.kind} by C-STORE")
        running = peer.start(work, ctx.dest_port, nodelay=True)
        try:
            run = clients.storescu_dir(running, instance_set.path)
            if run.failures or run.returncode:
                ctx.log(f"  load into {peer.kind}: {run.failures} failed: {run.output[-300:]!r}")
        finally:
            running.stop()
            ctx.stopped(running)
        how = "C-STORE, TCP_NODELAY"
    seconds = time.perf_counter() - started
    ctx.notes.append(
        f"{workload}: {peer.kind} loaded in {seconds:.0f} s ({how}, "
        f"{len(instance_set.files) / seconds:.0f} instances/s)"
    )
    loaded[peer.kind] = work
    return work


def phase_move(ctx: Context) -> None:
    p = ctx.profile
    instance_set = data.image_series(ctx.cache, "ct", p.move, label="move-")
    study_uid = str(instance_set.manifest["study_uid"])
    workload = f"C-MOVE of a {p.move}-instance CT study to storescp"
    peers = [peer for peer in ctx.peers if MOVE in peer.capabilities]
    loaded: dict[str, Path] = {}
    for rnd in range(p.move_reps):
        for peer in ctx.rotated(peers, rnd):
            if peer.kind not in loaded:
                work = ctx.runs / "move" / peer.kind
                running = peer.start(work, ctx.dest_port, nodelay=True)
                try:
                    clients.storescu(running, instance_set.files)
                finally:
                    running.stop()
                    ctx.stopped(running)
                loaded[peer.kind] = work
            ctx.log(f"move rep {rnd + 1}/{p.move_reps}: {peer.name}")
            running = peer.start(loaded[peer.kind], ctx.dest_port, fresh=False)
            try:
                shutil.rmtree(ctx.dest_dir, ignore_errors=True)
                ctx.dest_dir.mkdir(parents=True)
                run = clients.movescu(running, study_uid, DEST_AE)
                received = len(list(ctx.dest_dir.iterdir()))
                if received != p.move or run.failures:
                    ctx.log(f"  {peer.name}: moved {received}/{p.move}: {run.output[-300:]!r}")
                ctx.record(workload, "instances/s ↑", True, peer.name, received / run.seconds)
                ctx.record(
                    workload, "instances received (fewest)", True, peer.name, received, "min"
                )
            finally:
                running.stop()
                ctx.stopped(running)


PHASES: dict[str, Callable[[Context], None]] = {
    "store": phase_store,
    "find": phase_find,
    "move": phase_move,
    "mwl": services.phase_mwl,
    "mpps": services.phase_mpps,
    "print": services.phase_print,
}


# --- output ------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value == int(value) and abs(value) < 1e6:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return f"{os.cpu_count()} CPUs ({model}), {mem_kb / 1024 / 1024:.0f} GiB RAM, {platform.platform()}"


def versions() -> str:
    import pydicom
    import pynetdicom

    out = [
        f"Python {platform.python_version()}",
        f"pynetdicom {pynetdicom.__version__}",
        f"pydicom {pydicom.__version__}",
    ]
    for binary, flag in (("storescu", "--version"), ("Orthanc", "--version")):
        if shutil.which(binary) or shutil.which(binary, path="/usr/sbin"):
            try:
                text = subprocess.run(
                    [binary, flag], capture_output=True, text=True, check=False, timeout=10
                ).stdout
            except OSError:
                continue
            first = next((ln for ln in text.splitlines() if ln.strip()), "")
            out.append(first.replace("$dcmtk: ", "DCMTK ").strip(" $"))
    return ", ".join(out)


def render(ctx: Context, started: datetime, seconds: float) -> str:
    names = [peer.name for peer in ctx.peers]
    head = ["Workload", "Metric", *names]
    lines = [
        f"# dicomlab benchmark ({ctx.profile.name} profile)",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min, on {machine()}.",
        f"{versions()}.",
        "",
        "Each cell: the peer's figure, then dicomlab's figure divided by it (↑ higher is "
        "better, ↓ lower is better). Medians over "
        f"{ctx.profile.reps} fresh-server repetitions for C-STORE and C-ECHO, "
        f"{ctx.profile.move_reps} for C-MOVE; C-FIND p50/p95 over "
        f"{ctx.profile.find_runs} findscu runs per query (process start and association "
        "included). Clients: DCMTK storescu/findscu/movescu/echoscu with TCP_NODELAY=1. "
        "`+nodelay`: the peer runs with TCP_NODELAY=1 in its environment. "
        "Lost: acknowledged with Success but not in the peer's index (C-FIND at IMAGE "
        "level) or, for storescp, not on disk. MWL: `findscu -W` p50/p95 over the same "
        "number of runs; MPPS and print: pynetdicom SCUs, medians over the repetitions; "
        "a film is *rendered* when the SCP's Print Job DONE event report arrives "
        "(dicomlab sends it after the PNG is written).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in ctx.rows.values():
        ours = row.figure("dicomlab")
        cells = []
        for name in names:
            if name in row.na:
                cells.append(row.na[name])
                continue
            value = row.figure(name)
            cell = _fmt(value)
            is_ratio_metric = any(s in row.metric for s in ("/s", " ms", "MB"))
            if name != "dicomlab" and value and ours is not None and is_ratio_metric:
                cell += f" ({ours / value:.2f}×)"
            cells.append(cell)
        lines.append(f"| {row.workload} | {row.metric} | " + " | ".join(cells) + " |")
    rss = [_fmt(ctx.rss_kb[n] / 1024) if n in ctx.rss_kb else "—" for n in names]
    ours_rss = ctx.rss_kb.get("dicomlab")
    rss_cells = []
    for name, cell in zip(names, rss, strict=True):
        if name != "dicomlab" and ours_rss and ctx.rss_kb.get(name):
            cell += f" ({ours_rss / ctx.rss_kb[name]:.2f}×)"
        rss_cells.append(cell)
    lines.append("| all workloads | peak RSS, MB ↓ | " + " | ".join(rss_cells) + " |")
    if ctx.notes:
        lines += ["", *[f"- {note}" for note in ctx.notes]]
    return "\n".join(lines) + "\n"


def to_json(ctx: Context, started: datetime, seconds: float) -> dict[str, Any]:
    return {
        "profile": ctx.profile.name,
        "started": started.isoformat(),
        "seconds": seconds,
        "machine": machine(),
        "rows": [
            {
                "workload": r.workload,
                "metric": r.metric,
                "higher_is_better": r.higher_is_better,
                "figures": {n: r.figure(n) for n in r.values},
                "values": r.values,
                "na": r.na,
            }
            for r in ctx.rows.values()
        ],
        "peak_rss_kb": ctx.rss_kb,
        "notes": ctx.notes,
    }


# --- main -----------------------------------------------------------------------------


def run(
    profile: Profile,
    peer_names: Sequence[str] | None,
    phases: Sequence[str],
    out_dir: Path | None = RESULTS,
    verbose: bool = True,
) -> Context:
    peers = all_peers()
    wanted = peer_names or profile.peers
    if wanted:
        unknown = set(wanted) - {p.name for p in peers}
        if unknown:
            raise SystemExit(f"unknown peers: {', '.join(sorted(unknown))}")
        peers = [p for p in peers if p.name in wanted]
    if "dicomlab" not in [p.name for p in peers]:
        raise SystemExit("the peer list must include dicomlab")
    if ensure_installed("storescu") is None:
        raise SystemExit("DCMTK is needed: apt-get install dcmtk")
    available = []
    for peer in peers:
        if peer.available():
            available.append(peer)
        else:
            print(f"skipping {peer.name}: {peer.binary} is not installed", file=sys.stderr)
    root = Path(os.environ.get("DICOMLAB_BENCH_WORK", HERE / "runs"))
    runs = root / profile.name
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    dest_dir = runs / "dest"
    ctx = Context(
        profile, available, data.default_cache(), runs, free_port(), dest_dir, verbose=verbose
    )
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    dest_dir.mkdir()
    dest = subprocess.Popen(
        ["storescp", "-aet", DEST_AE, "--output-directory", str(dest_dir), str(ctx.dest_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for phase in (PHASES[name] for name in phases):
            phase(ctx)
            if out_dir is not None:  # a partial table survives an interrupted run
                out_dir.mkdir(parents=True, exist_ok=True)
                partial = render(ctx, started, time.perf_counter() - t0)
                (out_dir / "partial.md").write_text(partial)
    finally:
        dest.terminate()
        dest.wait(timeout=10)
    seconds = time.perf_counter() - t0
    table = render(ctx, started, seconds)
    print(table)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "latest.md").write_text(table)
        (out_dir / "latest.json").write_text(json.dumps(to_json(ctx, started, seconds), indent=1))
        if profile.name == "full":
            (out_dir / "full.md").write_text(table)
    if not os.environ.get("DICOMLAB_BENCH_KEEP"):
        shutil.rmtree(runs, ignore_errors=True)
    return ctx


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--peers", help="comma-separated peer names (default: all)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, of: {', '.join(PHASES)} (store includes C-ECHO)",
    )
    parser.add_argument("--reps", type=int, help="override the profile's repetitions")
    parser.add_argument("--find-studies", help="override, e.g. 10000,100000")
    parser.add_argument("--mwl-steps", type=int, help="override the worklist size")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.reps:
        profile = Profile(**{**profile.__dict__, "reps": args.reps})
    if args.find_studies:
        sizes = tuple(int(s) for s in args.find_studies.split(","))
        profile = Profile(**{**profile.__dict__, "find_studies": sizes})
    if args.mwl_steps:
        profile = Profile(**{**profile.__dict__, "mwl_steps": args.mwl_steps})
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases: {', '.join(unknown)}")
    peers = args.peers.split(",") if args.peers else None
    run(profile, peers, phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
