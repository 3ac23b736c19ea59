"""What the live status view costs: a compute-bound ``%%px`` cell with the status sidecar on vs
off, and the sidecar thread's CPU on every engine (and the head's receiver thread) while idle.

    python bench/overhead.py [reps]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import benchlib  # sets PATH, sys.path, OMPI_ALLOW_RUN_AS_ROOT
from common import compare

THREAD_NAME = "mlx-cluster-status"  # the sidecar's (engines) and the receiver's (head) thread
CELL_S = 4.0  # the compute-bound cell's target length
IDLE_S = 10.0  # the idle window for the CPU reading
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Square matmuls with an eval per step: compute-bound on the engines' cores.
CELL = """
_a = mx.random.normal((512, 512), key=mx.random.key(world.rank()))
for _ in range({steps}):
    _a = mx.tanh(_a @ _a)
    mx.eval(_a)
"""


def _sidecar_ids() -> tuple[int, int | None]:
    """On an engine: (pid, native thread id of the status sidecar or None)."""
    import os
    import threading

    for t in threading.enumerate():
        if t.name == "mlx-cluster-status":
            return os.getpid(), t.native_id
    return os.getpid(), None


def _ticks(path: str) -> int:
    """utime + stime (clock ticks) from a /proc .../stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _idle_cpu(cluster: Any, window: float) -> dict[str, list[float]]:
    """% of a core over ``window`` idle seconds, per engine: whole process, sidecar thread; and
    the head's receiver thread."""
    ids = cluster.view.apply_sync(_sidecar_ids)
    head = [t.native_id for t in threading.enumerate() if t.name == THREAD_NAME]
    paths = {
        "engine": [f"/proc/{pid}/stat" for pid, _ in ids],
        "sidecar": [f"/proc/{pid}/task/{tid}/stat" for pid, tid in ids if tid is not None],
        "head receiver": [f"/proc/{os.getpid()}/task/{tid}/stat" for tid in head],
    }
    before = {k: [_ticks(p) for p in v] for k, v in paths.items()}
    t = time.monotonic()
    time.sleep(window)
    after = {k: [_ticks(p) for p in v] for k, v in paths.items()}
    dt = time.monotonic() - t
    return {k: [100.0 * (a - b) / CLK_TCK / dt for a, b in zip(after[k], before[k])] for k in paths}


def _calibrate(shell: Any) -> int:
    """Steps of the cell that take about CELL_S seconds on this machine."""
    shell.run_cell_magic("px", "", CELL.format(steps=20))  # warm-up
    t = time.perf_counter()
    shell.run_cell_magic("px", "", CELL.format(steps=100))
    per_step = (time.perf_counter() - t) / 100
    return max(50, int(CELL_S / per_step))


def bench_overhead(reps: int) -> list[dict[str, Any]]:
    """A compute-bound %%px cell (2 local ranks) with live status on vs off (a fresh cluster per
    run, alternating); the sidecar thread's idle CPU per engine over IDLE_S seconds."""
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic import MLXCluster

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    cell_on: list[float] = []
    cell_off: list[float] = []
    sidecar: list[float] = []
    engine_on: list[float] = []
    engine_off: list[float] = []
    receiver: list[float] = []
    steps = 0

    def run(live: bool) -> None:
        nonlocal steps
        cluster = MLXCluster(n=2, live_status=live)
        try:
            cluster.start()
            cluster.activate()
            if not steps:
                steps = _calibrate(shell)
            shell.run_cell_magic("px", "", CELL.format(steps=20))  # warm-up
            t = time.perf_counter()
            shell.run_cell_magic("px", "", CELL.format(steps=steps))
            (cell_on if live else cell_off).append(time.perf_counter() - t)
            time.sleep(1.0)  # let the status settle to idle
            cpu = _idle_cpu(cluster, IDLE_S)
            (engine_on if live else engine_off).append(statistics.median(cpu["engine"]))
            if live:
                if len(cpu["sidecar"]) != cluster.n:
                    raise RuntimeError(f"sidecar thread not found on every engine: {cpu}")
                sidecar.append(max(cpu["sidecar"]))
                receiver.extend(cpu["head receiver"])
        finally:
            if cluster.running:
                cluster.stop()

    benchlib.alternate(reps, lambda: run(True), lambda: run(False))
    print(
        f"overhead: cell = {steps} steps of 512x512 matmul+tanh; head receiver thread idle CPU "
        f"{json.dumps([round(x, 3) for x in receiver])} % of a core",
        flush=True,
    )
    return [
        compare(
            f"%%px compute-bound cell (~{CELL_S:g} s of MLX matmuls), 2 local ranks, live status "
            "on",
            cell_on,
            cell_off,
            "s",
            "<= 1.02x",
            "the same cell, live status off",
        ),
        compare(
            f"status sidecar thread CPU, idle {IDLE_S:g} s, busiest engine",
            sidecar,
            engine_off,
            "% of a core",
            "< 1% of a core (absolute)",
            "whole idle engine process, status off (for scale)",
        ),
        compare(
            f"idle engine process CPU over {IDLE_S:g} s, live status on",
            engine_on,
            engine_off,
            "% of a core",
            "report only",
            "idle engine process, status off",
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_overhead)
