"""CI regression guard: the quick profile, failing only on gross regressions.

Every check compares dicomlab with a peer measured in the same run (never an
absolute time), with a floor at about half of the ratio dicomlab reaches today,
so only a large slowdown fails it; plus checks that are not about time (nothing
lost after Success, no failed store with 32 associations, the worklist answers
the number of matches the data set holds, every printed film rendered).
Exit status 0 when every check passes, 1 otherwise. A peer that is not
installed (and cannot be installed with apt-get) fails the run under ``CI=true``;
elsewhere its checks are reported and skipped.

    python -m bench.smoke            # or: make bench-smoke
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.peers import all_peers
from bench.run import PROFILES, Context, Profile, run

SMOKE_PEERS = (
    "dicomlab",
    "storescp+nodelay",
    "orthanc+nodelay",
    "pynetdicom-storescp",
    "wlmscpfs+nodelay",
    "dcmprscp+nodelay",
)
SMOKE_PHASES = ("store", "find", "move", "mwl", "print")
# The quick profile, with a smaller worklist (generating 10,000 .wl files alone takes
# most of a minute on a cold cache) and 8-bit films only. MPPS has no peer to compare
# with, so it is not in the smoke.
SMOKE_PROFILE = Profile(
    **{**PROFILES["quick"].__dict__, "mwl_steps": 2000, "print_bits": (8,), "print_films": 2}
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class RatioCheck:
    """dicomlab ÷ peer must be at least ``floor`` (throughput) or at most ``ceiling`` (time)."""

    workload: str  # a prefix of the row's workload
    metric: str
    peer: str
    floor: float | None = None
    ceiling: float | None = None
    today: str = ""  # the ratio when the check was written, for the reader


@dataclass(frozen=True)
class ZeroCheck:
    workload: str
    metric: str


CHECKS: tuple[RatioCheck, ...] = (
    RatioCheck("C-STORE, 1 association", "instances/s ↑", "storescp+nodelay", floor=0.02,
               today="0.05-0.07 tiny, 0.12-0.16 CT"),
    RatioCheck("C-STORE, 1 association", "instances/s ↑", "pynetdicom-storescp", floor=0.2,
               today="0.6-1.3 (0.25 for tiny once, with the 2 cores loaded 4x)"),
    RatioCheck("C-STORE, 8 associations", "instances/s ↑", "orthanc+nodelay", floor=0.05,
               today="0.14-0.19"),
    RatioCheck("C-ECHO", "echoscu wall time p50, ms ↓", "storescp+nodelay", ceiling=3.0,
               today="1.5"),
    RatioCheck("C-FIND", "exact Patient ID, p50 ms ↓", "orthanc+nodelay", ceiling=3.5,
               today="1.5"),
    RatioCheck("C-FIND", "Accession Number, p50 ms ↓", "orthanc+nodelay", ceiling=3.5,
               today="1.6"),
    RatioCheck("C-MOVE", "instances/s ↑", "orthanc+nodelay", floor=0.1, today="0.26"),
    RatioCheck("MWL C-FIND", "station AE + date, p50 ms ↓", "wlmscpfs+nodelay", ceiling=1.6,
               today="0.5-0.8 at 2,000 steps"),
    RatioCheck("MWL C-FIND", "Patient's Name A*, p50 ms ↓", "wlmscpfs+nodelay", ceiling=6.0,
               today="1.9-2.8 at 2,000 steps"),
    RatioCheck("Print", "films/s to N-ACTION Success ↑", "dcmprscp+nodelay", floor=0.1,
               today="0.22"),
)  # fmt: skip
ZERO: tuple[ZeroCheck, ...] = (
    ZeroCheck("C-STORE", "lost after Success (sum) ↓"),
    ZeroCheck("C-STORE, 32 associations", "failed stores (sum over reps) ↓"),
    ZeroCheck("MWL C-FIND", "wrong match counts (sum) ↓"),
    ZeroCheck("Print", "films missing afterwards (sum) ↓"),
)


def missing_peers() -> list[str]:
    """Smoke peers that are not installed and could not be installed."""
    peers = {p.name: p for p in all_peers()}
    return [name for name in SMOKE_PEERS if not peers[name].available()]


def evaluate(ctx: Context, ci: bool = False) -> list[str]:
    """The failed checks, as sentences; skipped checks are printed (under CI a check whose
    peer was not measured fails)."""
    failures: list[str] = []
    for check in CHECKS:
        rows = [r for r in ctx.rows.values()
                if r.workload.startswith(check.workload) and r.metric == check.metric]  # fmt: skip
        if not rows:
            failures.append(f"no rows for {check.workload} / {check.metric}")
        for row in rows:
            ours, theirs = row.figure("dicomlab"), row.figure(check.peer)
            label = f"{row.workload}, {row.metric}: dicomlab vs {check.peer}"
            if theirs is None or not theirs:
                if ci:
                    failures.append(f"{label}: {check.peer} not measured")
                else:
                    print(f"skip  {label}: peer not measured", file=sys.stderr)
                continue
            if ours is None:
                failures.append(f"{label}: dicomlab not measured")
                continue
            ratio = ours / theirs
            bad = (check.floor is not None and ratio < check.floor) or (
                check.ceiling is not None and ratio > check.ceiling
            )
            bound = f">= {check.floor}" if check.floor is not None else f"<= {check.ceiling}"
            verdict = "FAIL" if bad else "ok"
            print(f"{verdict:<5} {label}: {ratio:.2f}× (needs {bound}; "
                  f"{check.today} when written)", file=sys.stderr)  # fmt: skip
            if bad:
                failures.append(f"{label}: {ratio:.2f}× (needs {bound})")
    for zero in ZERO:
        for row in ctx.rows.values():
            if row.workload.startswith(zero.workload) and row.metric == zero.metric:
                value = row.figure("dicomlab")
                if value:
                    failures.append(f"{row.workload}: dicomlab {row.metric} = {value:.0f}")
    return failures


def main() -> int:
    started = time.perf_counter()
    ci = in_ci()
    missing = missing_peers()
    if missing and ci:
        print(f"bench smoke FAILED: peers not installed under CI: {', '.join(missing)}",
              file=sys.stderr)  # fmt: skip
        return 1
    out = Path(__file__).parent / "results" / "smoke"
    ctx = run(SMOKE_PROFILE, SMOKE_PEERS, SMOKE_PHASES, out_dir=out)
    failures = evaluate(ctx, ci)
    took = time.perf_counter() - started
    if failures:
        print(f"bench smoke FAILED in {took:.0f} s:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"bench smoke passed in {took:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
