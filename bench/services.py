"""The RIS and print workloads: Modality Worklist C-FIND, MPPS N-CREATE/N-SET, print.

Each phase runs every selected peer that can do the workload and prints the
others as "n/a" with the reason from :data:`bench.peers.CANNOT`. Every workload
also gets a peak RSS row of its own (the server's, sampled while it ran), since
one print server's rendering says nothing about its worklist.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench import clients, data
from bench.peers import (
    CANNOT,
    MPPS,
    MWL,
    ORTHANC_WORKLISTS_PLUGIN,
    PRINT,
    WLMSCPFS_AE,
    Peer,
    Running,
)

if TYPE_CHECKING:
    from bench.run import Context

RSS = "peak RSS of the server, MB ↓"


def _split(
    ctx: Context, service: str, workload: str, metrics: Sequence[tuple[str, bool, str]]
) -> list[Peer]:
    """The peers that can do ``service``; the others get "n/a: why" in every metric row."""
    for metric, higher, summary in (*metrics, (RSS, False, "max")):
        ctx.row(workload, metric, higher, summary)  # rows print in this order
    able = []
    for peer in ctx.peers:
        if service in peer.capabilities:
            able.append(peer)
            continue
        why = CANNOT.get((peer.kind, service), f"no {service} service")
        for metric, higher, summary in (*metrics, (RSS, False, "max")):
            ctx.na(workload, metric, higher, peer.name, f"n/a: {why}", summary)
    return able


def _stop(ctx: Context, running: Running, workload: str) -> None:
    running.stop()
    ctx.stopped(running)
    ctx.record(workload, RSS, False, running.peer.name, running.peak_rss_kb / 1024, "max")


def _dicomlab(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMLAB_")}
    env["DICOMLAB_DATA_DIR"] = str(data_dir)
    binary = Path(sys.executable).with_name("dicomlab")
    return subprocess.run(
        [str(binary), *args], env=env, capture_output=True, text=True, check=False, timeout=1800
    )


def _import_worklist(ctx: Context, work: Path, entries: Path, what: str) -> None:
    """The product's own bulk path: ``dicomlab worklist import`` of a JSON file."""
    started = time.perf_counter()
    done = _dicomlab("worklist", "import", str(entries), data_dir=work / "data")
    if done.returncode:
        raise RuntimeError(f"dicomlab worklist import failed: {done.stderr[-1000:]}")
    seconds = time.perf_counter() - started
    if what:
        ctx.notes.append(
            f"{what}: dicomlab loaded by `dicomlab worklist import` in {seconds:.1f} s"
        )


def _linked_copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        os.link(file, target / file.name)


# --- Modality Worklist C-FIND -------------------------------------------------------------

RETURN_KEYS = {
    "PatientName": "",
    "PatientID": "",
    "AccessionNumber": "",
    "StudyInstanceUID": "",
    "RequestedProcedureDescription": "",
}
SPS = "ScheduledProcedureStepSequence[0]."
SPS_RETURN_KEYS = {
    SPS + "Modality": "",
    SPS + "ScheduledStationAETitle": "",
    SPS + "ScheduledProcedureStepStartDate": "",
    SPS + "ScheduledProcedureStepStartTime": "",
    SPS + "ScheduledProcedureStepID": "",
}


def phase_mwl(ctx: Context) -> None:
    p = ctx.profile
    steps = p.mwl_steps
    ws = data.worklist_steps(ctx.cache, steps)
    rows = json.loads(ws.entries.read_text())
    workload = f"MWL C-FIND, {steps:,} scheduled steps"
    rng = random.Random(steps)
    pairs = [
        (rng.choice(data.WORKLIST_STATIONS), f"202612{rng.randrange(data.WORKLIST_DAYS) + 1:02d}")
        for _ in range(p.find_runs)
    ]
    queries: list[tuple[str, list[dict[str, str]], list[int]]] = [
        (
            "station AE + date",
            [
                {SPS + "ScheduledStationAETitle": s, SPS + "ScheduledProcedureStepStartDate": d}
                for s, d in pairs
            ],
            [
                sum(
                    1
                    for r in rows
                    if r["ScheduledStationAETitle"] == s
                    and r["ScheduledProcedureStepStartDate"] == d
                )
                for s, d in pairs
            ],
        ),
        (
            "Patient's Name A*",
            [{"PatientName": "A*"} for _ in pairs],
            [sum(1 for r in rows if r["PatientName"].upper().startswith("A"))] * len(pairs),
        ),
    ]
    metrics = []
    for name, _, _ in queries:
        metrics += [(f"{name}, p50 ms ↓", False, "p50"), (f"{name}, p95 ms ↓", False, "p95"),
                    (f"{name}, matches", True, "max")]  # fmt: skip
    metrics.append(("wrong match counts (sum) ↓", False, "sum"))
    peers = _split(ctx, MWL, workload, metrics)
    if not ORTHANC_WORKLISTS_PLUGIN.exists():
        for peer in [p for p in peers if p.kind == "orthanc"]:
            for metric, higher, summary in metrics:
                why = f"n/a: no worklist plugin at {ORTHANC_WORKLISTS_PLUGIN}"
                ctx.na(workload, metric, higher, peer.name, why, summary)
            peers.remove(peer)
    loaded: dict[str, Path] = {}
    for rnd in range(2):
        for peer in ctx.rotated(peers, rnd):
            if peer.kind not in loaded:
                work = ctx.runs / f"mwl-{steps}" / peer.kind
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                if peer.kind == "dicomlab":
                    _import_worklist(ctx, work, ws.entries, workload)
                elif peer.kind == "wlmscpfs":
                    _linked_copy(ws.wl_dir, work / "wl" / WLMSCPFS_AE)
                    (work / "wl" / WLMSCPFS_AE / "lockfile").touch()
                elif peer.kind == "orthanc":
                    _linked_copy(ws.wl_dir, work / "worklists")
                loaded[peer.kind] = work
            ctx.log(f"mwl {steps}: round {rnd + 1}/2 {peer.name}")
            running = peer.start(loaded[peer.kind], ctx.dest_port, fresh=False)
            try:
                for i in range(rnd * p.find_runs // 2, (rnd + 1) * p.find_runs // 2):
                    for name, keys, expected in queries:
                        run = clients.findscu_worklist(
                            running, {**RETURN_KEYS, **SPS_RETURN_KEYS, **keys[i]}
                        )
                        wrong = int(bool(run.failures) or run.successes != expected[i])
                        ctx.record(workload, "wrong match counts (sum) ↓", False, peer.name,
                                   wrong, "sum")  # fmt: skip
                        if run.failures:
                            ctx.log(f"  {peer.name} {name} failed: {run.output[-300:]!r}")
                            continue
                        if wrong:
                            ctx.log(f"  {peer.name} {name}: {run.successes} matches, "
                                    f"expected {expected[i]}")  # fmt: skip
                        ms = run.seconds * 1000
                        ctx.record(workload, f"{name}, p50 ms ↓", False, peer.name, ms, "p50")
                        ctx.record(workload, f"{name}, p95 ms ↓", False, peer.name, ms, "p95")
                        ctx.record(workload, f"{name}, matches", True, peer.name,
                                   run.successes, "max")  # fmt: skip
            finally:
                _stop(ctx, running, workload)


# --- MPPS ---------------------------------------------------------------------------------


def phase_mpps(ctx: Context) -> None:
    """N-CREATE (IN PROGRESS) then N-SET (COMPLETED) of one instance, repeated over one
    association, each for a scheduled step of the worklist (so the RIS matches it)."""
    p = ctx.profile
    n = p.mpps
    ws = data.worklist_steps(ctx.cache, n)
    rows = json.loads(ws.entries.read_text())
    steps = [(r["AccessionNumber"], r["PatientID"], r["PatientName"]) for r in rows]
    workload = f"MPPS N-CREATE + N-SET (COMPLETED), {n} steps over 1 association"
    metrics = [("round trips/s ↑", True, "median"), ("failed round trips (sum) ↓", False, "sum")]
    peers = _split(ctx, MPPS, workload, metrics)
    for rep in range(p.reps):
        for peer in ctx.rotated(peers, rep):
            ctx.log(f"mpps rep {rep + 1}/{p.reps}: {peer.name}")
            work = ctx.runs / "mpps" / peer.kind
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            if peer.kind == "dicomlab":
                _import_worklist(ctx, work, ws.entries, workload if rep == 0 else "")
            running = peer.start(work, ctx.dest_port, fresh=False)
            try:
                run = clients.mpps_round_trips(running, steps)
                if run.failures:
                    ctx.log(f"  {peer.name}: {run.failures} failed: {run.detail}")
                ctx.record(
                    workload, "round trips/s ↑", True, peer.name, run.completed / run.seconds
                )
                ctx.record(workload, "failed round trips (sum) ↓", False, peer.name,
                           run.failures, "sum")  # fmt: skip
            finally:
                _stop(ctx, running, workload)


# --- print --------------------------------------------------------------------------------

RENDERED = "films/s to the film rendered ↑"
ACCEPTED = "films/s to N-ACTION Success ↑"
NOT_RENDERED = (
    "n/a: dcmprscp renders nothing; at N-ACTION it has written a Stored Print and the "
    "Hardcopy Grayscale objects for a separate spooler (see the other row)"
)


def _films_afterwards(running: Running) -> int:
    """Films the peer holds after the run: dicomlab's rendered PNGs, dcmprscp's Stored Print
    objects (not timed)."""
    if running.peer.kind == "dicomlab":
        return len(list((running.data_dir / "data" / "films").glob("job-*/film-*[0-9].png")))
    return len(list((running.data_dir / "database").glob("SP_*.dcm")))


def phase_print(ctx: Context) -> None:
    p = ctx.profile
    for bits in p.print_bits:
        workload = f"Print, STANDARD\\4,5 film of 20 512×512 {bits}-bit images"
        metrics = [(ACCEPTED, True, "median"), (RENDERED, True, "median"),
                   ("films missing afterwards (sum) ↓", False, "sum")]  # fmt: skip
        peers = _split(ctx, PRINT, workload, metrics)
        items = [clients.grayscale_item(512, 512, bits, seed) for seed in range(20)]
        for rep in range(p.reps):
            for peer in ctx.rotated(peers, rep):
                ctx.log(f"print {bits}-bit rep {rep + 1}/{p.reps}: {peer.name}")
                renders = peer.kind == "dicomlab"
                running = peer.start(ctx.runs / "print" / peer.name, ctx.dest_port)
                try:
                    films = [
                        clients.print_film(running, items, "STANDARD\\4,5", wait_job=renders)
                        for _ in range(p.print_films)
                    ]
                    ok = [f for f in films if f.ok]
                    for f in films:
                        if not f.ok:
                            ctx.log(f"  {peer.name}: film failed: {f.detail}")
                    held = _films_afterwards(running)
                    missing = len(films) - min(held, len(ok)) if ok else len(films)
                    ctx.record(workload, "films missing afterwards (sum) ↓", False, peer.name,
                               missing, "sum")  # fmt: skip
                    if ok:
                        accepted = sum(f.accepted for f in ok)
                        ctx.record(workload, ACCEPTED, True, peer.name, len(ok) / accepted)
                        if renders:
                            done = sum(f.seconds for f in ok)
                            ctx.record(workload, RENDERED, True, peer.name, len(ok) / done)
                        else:
                            ctx.na(workload, RENDERED, True, peer.name, NOT_RENDERED)
                finally:
                    _stop(ctx, running, workload)
