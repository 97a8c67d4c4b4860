"""CI regression guard: the quick profile, failing only on gross regressions.

Every check compares dicomlab with a peer measured in the same run (never an
absolute time), with a floor at about half of the ratio dicomlab reaches today,
so only a large slowdown fails it; plus two durability checks that are not
about time (nothing lost after Success, no failed store with 32 associations).
Exit status 0 when every check passes, 1 otherwise; a check whose peer is not
installed is reported and skipped.

    python -m bench.smoke            # or: make bench-smoke
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.run import PROFILES, Context, run

SMOKE_PEERS = ("dicomlab", "storescp+nodelay", "orthanc+nodelay", "pynetdicom-storescp")


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
    RatioCheck("C-STORE, 1 association", "instances/s ↑", "pynetdicom-storescp", floor=0.3,
               today="0.6-1.3"),
    RatioCheck("C-STORE, 8 associations", "instances/s ↑", "orthanc+nodelay", floor=0.05,
               today="0.14-0.19"),
    RatioCheck("C-ECHO", "echoscu wall time p50, ms ↓", "storescp+nodelay", ceiling=3.0,
               today="1.5"),
    RatioCheck("C-FIND", "exact Patient ID, p50 ms ↓", "orthanc+nodelay", ceiling=3.5,
               today="1.5"),
    RatioCheck("C-FIND", "Accession Number, p50 ms ↓", "orthanc+nodelay", ceiling=3.5,
               today="1.6"),
    RatioCheck("C-MOVE", "instances/s ↑", "orthanc+nodelay", floor=0.1, today="0.26"),
)  # fmt: skip
ZERO: tuple[ZeroCheck, ...] = (
    ZeroCheck("C-STORE", "lost after Success (sum) ↓"),
    ZeroCheck("C-STORE, 32 associations", "failed stores (sum over reps) ↓"),
)


def evaluate(ctx: Context) -> list[str]:
    """The failed checks, as sentences; skipped checks are printed."""
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
    out = Path(__file__).parent / "results" / "smoke"
    ctx = run(PROFILES["quick"], SMOKE_PEERS, ["store", "find", "move"], out_dir=out)
    failures = evaluate(ctx)
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
