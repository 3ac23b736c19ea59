"""What the hang doctor costs: the flight recorder (always on) and checked collectives (opt-in)
on a loop of 10,000 small ``all_sum``s, each evaluated, on 2 local ranks.

Both ranks run the loop with the recorder installed and uninstalled alternately in the same
cluster, so that machine load hits both alike; the figure is the median loop time and the
ratio on/off.

    python bench/recorder.py [reps]
"""

from __future__ import annotations

from typing import Any

import benchlib
from benchlib import compare

STEPS = 10_000

# Defined on the engines as code: the engines cannot import this file.
LOOP = """
import time as _time
from mlx_cluster_magic.rank import collective_checks as _checks
from mlx_cluster_magic.rank import flight_recorder as _recorder

def _hd_loop(n, mode):
    _checks.disable(); _recorder.uninstall()
    if mode != "off":
        _recorder.install(track_evaluation=mode == "tracked")
    if mode == "checks":
        _checks.enable(timeout=30.0)
    x = mx.ones(4)
    mx.eval(mx.distributed.all_sum(x))  # both ranks start together
    t = _time.perf_counter()
    for _ in range(n):
        mx.eval(mx.distributed.all_sum(x))
    dt = _time.perf_counter() - t
    t = _time.perf_counter()
    for _ in range(n):
        mx.distributed.all_sum(x)  # built, never evaluated: the call alone
    build = _time.perf_counter() - t
    _checks.disable(); _recorder.uninstall(); _recorder.install()
    return dt, build

def _hd_series(n, rounds):
    out = {"off": [], "on": [], "tracked": [], "checks": []}
    order = ("off", "on", "tracked", "checks")
    for i in range(rounds):
        for mode in order if i % 2 == 0 else order[::-1]:
            out[mode].append(_hd_loop(n, mode))
    return out
"""


def bench_recorder(reps: int) -> list[dict[str, Any]]:
    """Recorder on vs off and checks on vs off, alternating within one 2-rank cluster."""
    from mlx_cluster_magic import MLXCluster

    times: dict[str, list[float]] = {"off": [], "on": [], "tracked": [], "checks": []}
    build: dict[str, list[float]] = {"off": [], "on": []}
    with MLXCluster(n=2, live_status=False) as cluster:
        view = cluster.view
        view.execute(LOOP)
        view.execute(f"_hd_loop({STEPS // 10}, 'on'); _hd_loop({STEPS // 10}, 'off')")  # warm-up
        # Many short alternations inside one request: load from elsewhere hits all modes alike.
        for _ in range(max(reps, 1)):
            view.execute(f"_hd_out = _hd_series({STEPS}, 6)")
            per_rank = view["_hd_out"]
            for mode in times:
                samples = list(zip(*(r[mode] for r in per_rank)))  # per round: every rank
                times[mode] += [max(t for t, _b in s) for s in samples]
                if mode in build:
                    build[mode] += [max(b for _t, b in s) / STEPS * 1e6 for s in samples]
    return [
        compare(
            f"{STEPS:,} small all_sums, each evaluated, 2 local ranks (mpi), flight recorder on",
            times["on"],
            times["off"],
            "s",
            "<= 1.03x",
            "the same loop, recorder off",
        ),
        compare(
            "the same loop, recorder on with evaluations tracked (install(track_evaluation=True))",
            times["tracked"],
            times["off"],
            "s",
            "report",
            "the same loop, recorder off",
        ),
        compare(
            "one all_sum call, built and not evaluated, recorder on",
            build["on"],
            build["off"],
            "us",
            "report",
            "the same call, recorder off",
        ),
        compare(
            f"{STEPS:,} small all_sums, each evaluated, 2 local ranks (mpi), checked collectives",
            times["checks"],
            times["off"],
            "s",
            "report (opt-in)",
            "the same loop, recorder and checks off",
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_recorder)
