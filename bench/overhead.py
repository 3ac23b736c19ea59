"""What the live status view costs: a compute-bound ``%%px`` cell with the status sidecar on vs
off, and the sidecar thread's CPU on every engine (and the head's receiver thread) while idle.

    python bench/overhead.py [reps]
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from typing import Any

import benchlib
from benchlib import compare

THREAD_NAME = "mlx-cluster-status"  # the sidecar's (engines) and the receiver's (head) thread
CELL_S = 3.0  # the compute-bound cell's target length
IDLE_S = 10.0  # the idle window for the CPU reading
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Square matmuls with an eval per step: compute-bound on the engines' cores.
CELL = """
_a = mx.random.normal((512, 512), key=mx.random.key(world.rank()))
for _ in range({steps}):
    _a = mx.tanh(_a @ _a)
    mx.eval(_a)
"""


# Run on the engines as code, not shipped as a function: the engines cannot import this module.
SIDECAR_IDS = """
import os as _os, threading as _th
_sidecar = ([t.native_id for t in _th.enumerate() if t.name == "mlx-cluster-status"] or [None])[0]
_ids = (_os.getpid(), _sidecar)
"""


def _sidecar_ids(cluster: Any) -> list[tuple[int, int | None]]:
    """Per engine: (pid, native thread id of the status sidecar or None)."""
    cluster.view.execute(SIDECAR_IDS)
    return cluster.view["_ids"]


def _cpu_s(path: str) -> float:
    """CPU seconds: a thread's ``.../schedstat`` (ns on CPU, precise), or a process's ``stat``
    (utime + stime of all its threads, in clock ticks)."""
    with open(path) as f:
        text = f.read()
    if path.endswith("schedstat"):
        return int(text.split()[0]) / 1e9
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class _CPUReader:
    """CPU time of every engine process, its status sidecar thread, and the head's receiver
    thread, between ``start()`` and ``stop()``: % of a core per process/thread."""

    def __init__(self, cluster: Any) -> None:
        ids = _sidecar_ids(cluster)
        self.paths = {
            "engine": [f"/proc/{pid}/stat" for pid, _ in ids],
            "sidecar": [f"/proc/{pid}/task/{tid}/schedstat" for pid, tid in ids if tid is not None],
        }
        self.n = cluster.n

    def start(self) -> None:
        self.t = time.monotonic()
        self.before = {k: [_cpu_s(p) for p in v] for k, v in self.paths.items()}

    def stop(self) -> dict[str, list[float]]:
        after = {k: [_cpu_s(p) for p in v] for k, v in self.paths.items()}
        dt = time.monotonic() - self.t
        return {
            k: [100.0 * (a - b) / dt for a, b in zip(after[k], self.before[k])] for k in self.paths
        }


def _tree_cpu_s() -> float:
    """CPU seconds of this process and every process it started (controller, mpiexec, the
    engines of both clusters): everything live status could cost, wherever it runs."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _head_receivers() -> list[str]:
    return [
        f"/proc/{os.getpid()}/task/{t.native_id}/schedstat"
        for t in threading.enumerate()
        if t.name == THREAD_NAME
    ]


def _calibrate(shell: Any) -> int:
    """Steps of the cell that take about CELL_S seconds on this machine."""
    shell.run_cell_magic("px", "", CELL.format(steps=5))  # warm-up
    t = time.perf_counter()
    shell.run_cell_magic("px", "", CELL.format(steps=20))
    per_step = (time.perf_counter() - t) / 20
    return max(20, int(CELL_S / per_step))


def bench_overhead(reps: int) -> list[dict[str, Any]]:
    """A compute-bound %%px cell (2 local ranks) with live status on vs off (3 alternating pairs
    per repetition, every run counted), its CPU time across every process taking part, and the
    sidecar thread's CPU per engine over an idle IDLE_S window.

    Per repetition both clusters are started (fresh), then the cell runs on, off, off, on, on, off
    (re-activating %%px for each), so that load from elsewhere hits both alike; the idle window
    reads both clusters at once.
    """
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic import MLXCluster

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    cell = {True: [], False: []}
    cell_cpu: dict[bool, list[float]] = {True: [], False: []}
    sidecar_idle: list[float] = []
    sidecar_busy: list[float] = []
    engine_idle = {True: [], False: []}
    receiver: list[float] = []
    steps = 0
    for rep in range(reps):
        clusters = {
            True: MLXCluster(n=2, live_status=True),
            False: MLXCluster(n=2, live_status=False),
        }
        try:
            for live in (True, False) if rep % 2 == 0 else (False, True):
                clusters[live].start()
            if not steps:
                clusters[False].activate()
                steps = _calibrate(shell)
            readers = {live: _CPUReader(c) for live, c in clusters.items()}
            times: dict[bool, list[float]] = {True: [], False: []}
            pattern = (True, False, False, True, True, False)
            for live in pattern if rep % 2 == 0 else tuple(not x for x in pattern):
                clusters[live].activate()
                shell.run_cell_magic("px", "", CELL.format(steps=5))  # warm-up
                readers[live].start()
                cpu0 = _tree_cpu_s()
                t = time.perf_counter()
                shell.run_cell_magic("px", "", CELL.format(steps=steps))
                times[live].append(time.perf_counter() - t)
                cell_cpu[live].append(_tree_cpu_s() - cpu0)
                busy = readers[live].stop()
                if live:
                    sidecar_busy.append(max(busy["sidecar"]))
            for live in (True, False):  # every run counts: 3 alternating pairs per repetition
                cell[live].extend(times[live])
            time.sleep(1.0)  # let the status settle to idle
            head = _head_receivers()
            head_before = [_cpu_s(p) for p in head]
            for r in readers.values():
                r.start()
            time.sleep(IDLE_S)
            idle = {live: r.stop() for live, r in readers.items()}
            receiver += [100.0 * (_cpu_s(p) - b) / IDLE_S for p, b in zip(head, head_before)]
            if len(idle[True]["sidecar"]) != 2:
                raise RuntimeError(f"status sidecar thread not found on every engine: {idle}")
            sidecar_idle.append(max(idle[True]["sidecar"]))
            for live in (True, False):
                engine_idle[live].append(statistics.median(idle[live]["engine"]))
        finally:
            for c in clusters.values():
                if c.running:
                    c.stop()
    print(
        f"overhead: cell = {steps} steps of 512x512 matmul+tanh; sidecar thread CPU while the "
        f"cell ran: {json.dumps([round(x, 3) for x in sidecar_busy])} % of a core; head "
        f"receiver thread idle CPU {json.dumps([round(x, 3) for x in receiver])} % of a core",
        flush=True,
    )
    return [
        compare(
            f"%%px compute-bound cell (~{CELL_S:g} s of MLX matmuls), 2 local ranks, live status "
            "on",
            cell[True],
            cell[False],
            "s",
            "<= 1.02x",
            "the same cell, live status off",
        ),
        compare(
            "CPU time of every process taking part (head, controller, engines) over that cell, "
            "live status on",
            cell_cpu[True],
            cell_cpu[False],
            "s",
            "<= 1.02x",
            "the same cell, live status off",
        ),
        compare(
            f"status sidecar thread CPU, idle {IDLE_S:g} s, busiest engine",
            sidecar_idle,
            engine_idle[False],
            "% of a core",
            "< 1% of a core (absolute)",
            "whole idle engine process, status off (for scale)",
        ),
        compare(
            f"idle engine process CPU over {IDLE_S:g} s, live status on",
            engine_idle[True],
            engine_idle[False],
            "% of a core",
            "report only",
            "idle engine process, status off",
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_overhead)
