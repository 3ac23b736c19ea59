"""What the live status view costs: a compute-bound ``%%px`` cell with live status on vs off,
alternated pair by pair, with where every CPU second of the cell went (each process and thread
taking part), the sidecar thread's CPU on every engine while idle, and what the per-host usage
sampler costs at the view's rate.

    python bench/overhead.py [reps]
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import benchlib
from benchlib import compare, median_interval

THREAD_NAME = "mlx-cluster-status"  # the sidecar's (engines) and the receiver's (head) thread
CELL_S = 1.0  # the compute-bound cell's target length
PAIRS_PER_REP = 16  # on/off pairs per repetition (ABBA order), both clusters started afresh
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
THREADS = """
import os as _os, threading as _th
_threads = (_os.getpid(), {t.native_id: t.name for t in _th.enumerate()})
"""

#: Engine threads by their Python names (ipyparallel's and ours); unnamed ones are C threads.
ENGINE_THREADS = {
    "MainThread": "main thread (the cell)",
    THREAD_NAME: "status sidecar",
    "IOPub": "IOPub",
    "Control": "control",
}
#: Live status's own threads in the breakdown: the sidecars of the cell's ranks, the receiver.
OWN_ROWS = ("running cluster's engines: status sidecar", "head: receiver")
HEAD_THREADS = {"MainThread": "main thread (wait loop, progress line)", THREAD_NAME: "receiver"}


def _thread_label(name: str, known: dict[str, str]) -> str:
    if name in known:
        return known[name]
    if name.endswith("(run)"):
        return "heartbeat echo"  # the engine's Heart: a zmq device thread
    if "_watch_pipe_fd" in name:
        return "output capture"
    return "other Python threads"


def _task_cpu_s(pid: int, tid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of every thread a process has had, exited ones included."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CPUBreakdown:
    """CPU seconds per (role, thread) over a window, for every process a cluster runs.

    Roles: the head (this process), each cluster's controller (with its schedulers), mpiexec,
    the engines, their nannies and the watchdog; threads of the head and the engines are named
    by their Python names, C threads (zmq's I/O, MLX's) counted together as "C threads".
    Threads read from ``/proc/PID/task/TID/schedstat`` (nanoseconds); whole processes from
    ``/proc/PID/stat`` (clock ticks, exited threads included).
    """

    def __init__(self) -> None:
        self.procs: dict[int, str] = {}  # pid -> role
        self.names: dict[int, dict[int, str]] = {}  # pid -> tid -> label

    def add_cluster(
        self, tag: str, pids: Iterable[int], engines: dict[int, dict[int, str]]
    ) -> None:
        import psutil

        for pid in pids:
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                continue
            if pid in engines:
                role = "engines"
                self.names[pid] = {
                    tid: _thread_label(name, ENGINE_THREADS) for tid, name in engines[pid].items()
                }
            elif "ipyparallel.controller" in cmd:
                role = "controller"
            elif "engine.nanny" in cmd:
                role = "nannies"
            elif "prterun" in cmd or "mpiexec" in cmd or "prted" in cmd:
                role = "mpiexec"
            else:
                role = "watchdog"
            self.procs[pid] = f"{tag} {role}"

    def read(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        head = os.getpid()
        head_names = {
            t.native_id: _thread_label(t.name, HEAD_THREADS)
            for t in threading.enumerate()
            if t.native_id is not None
        }
        for pid, role in [(head, "head"), *self.procs.items()]:
            total = _proc_cpu_s(pid)
            if total is None:
                continue
            names = head_names if pid == head else self.names.get(pid)
            if names is None:
                out[role] += total
                continue
            named = 0.0
            for tid, label in names.items():
                cpu = _task_cpu_s(pid, tid)
                if cpu is not None:
                    out[f"{role}: {label}"] += cpu
                    named += cpu
            out[f"{role}: C threads and exited ones"] += total - named
        return out


def _role_in_cell(key: str, live: bool) -> str:
    """A breakdown row named by its part in the cell: the cluster running it or the idle one
    (``ours`` is the live-status cluster)."""
    if key.startswith("head"):
        return key
    tag, rest = key.split(" ", 1)
    return ("running" if (tag == "ours") == live else "idle") + f" cluster's {rest}"


def _cluster_pids(before: set[int]) -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)} - before


def _engine_threads(cluster: Any) -> dict[int, dict[int, str]]:
    cluster.view.execute(THREADS, block=True)
    return dict(cluster.view["_threads"])


def _calibrate(shell: Any) -> int:
    """Steps of the cell that take about CELL_S seconds on this machine."""
    shell.run_cell_magic("px", "", CELL.format(steps=2))  # warm-up
    t = time.perf_counter()
    shell.run_cell_magic("px", "", CELL.format(steps=20))
    per_step = (time.perf_counter() - t) / 20
    return max(20, int(CELL_S / per_step))


def _status_threads(threads: dict[int, dict[int, str]]) -> list[tuple[int, int]]:
    """(pid, tid) of the status thread of each process in ``threads`` that has one."""
    return [
        (pid, tid)
        for pid, names in threads.items()
        for tid, name in names.items()
        if name == THREAD_NAME
    ]


def _cpu_of(threads: list[tuple[int, int]]) -> list[float]:
    return [_task_cpu_s(pid, tid) or 0.0 for pid, tid in threads]


SAMPLER_CALLS = 2000  # host sampler reads timed in this process


def _sampler_cost() -> tuple[list[float], list[float]]:
    """CPU of one report's usage reading, as % of a core at the status view's rate: the host's
    sampler (its rank's process CPU, the host's CPU and memory; macmon, on a Mac, is its own
    process and not in this figure) and a second rank's (its own process CPU only). Five runs
    of ``SAMPLER_CALLS`` reads each."""
    from mlx_cluster_magic.rank.host_usage import UsageSampler
    from mlx_cluster_magic.rank.status_sidecar import PERIOD_S

    out: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(5):
        for host in (True, False):
            sampler = UsageSampler(samples_host=host, interval_s=PERIOD_S)
            try:
                t = time.thread_time()
                for _ in range(SAMPLER_CALLS):
                    sampler.sample()
                per_call = (time.thread_time() - t) / SAMPLER_CALLS
            finally:
                sampler.close()
            out[host].append(100.0 * per_call / PERIOD_S)
    return out[True], out[False]


def bench_overhead(reps: int) -> list[dict[str, Any]]:
    """A compute-bound %%px cell (2 local ranks) with live status on vs off, PAIRS_PER_REP
    pairs per repetition in ABBA order (on off off on ...), both clusters started afresh each
    repetition, every run counted; the CPU every process and thread spent over each cell; and
    the status threads' CPU over an idle IDLE_S window.
    """
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic import MLXCluster

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    wall: dict[bool, list[float]] = {True: [], False: []}
    ratios: list[float] = []
    cpu_total: dict[bool, list[float]] = {True: [], False: []}
    own_cpu: dict[bool, list[float]] = {True: [], False: []}
    where: dict[bool, dict[str, list[float]]] = {True: defaultdict(list), False: defaultdict(list)}
    sidecar_idle: list[float] = []
    engine_idle: dict[bool, list[float]] = {True: [], False: []}
    receiver_idle: list[float] = []
    steps = 0
    for rep in range(reps):
        clusters = {
            True: MLXCluster(n=2, live_status=True),
            False: MLXCluster(n=2, live_status=False),
        }
        try:
            clock = CPUBreakdown()
            threads: dict[bool, dict[int, dict[int, str]]] = {}
            for live in (True, False) if rep % 2 == 0 else (False, True):
                before = _cluster_pids(set())
                clusters[live].start()
                threads[live] = _engine_threads(clusters[live])
                tag = "ours" if live else "other"
                clock.add_cluster(tag, _cluster_pids(before), threads[live])
            if not steps:
                clusters[False].activate()
                steps = _calibrate(shell)
            for pair in range(PAIRS_PER_REP):
                order = (True, False) if (pair + rep) % 2 == 0 else (False, True)
                times: dict[bool, float] = {}
                for live in order:
                    clusters[live].activate()
                    shell.run_cell_magic("px", "", CELL.format(steps=2))  # warm-up
                    a = clock.read()
                    t = time.perf_counter()
                    shell.run_cell_magic("px", "", CELL.format(steps=steps))
                    times[live] = time.perf_counter() - t
                    b = clock.read()
                    spent = {k: b[k] - a.get(k, 0.0) for k in b}
                    cpu_total[live].append(sum(spent.values()))
                    rows = {_role_in_cell(k, live): v for k, v in spent.items()}
                    for k, v in rows.items():
                        where[live][k].append(v)
                    own_cpu[live].append(sum(rows.get(k, 0.0) for k in OWN_ROWS))
                for live in (True, False):
                    wall[live].append(times[live])
                ratios.append(times[True] / times[False])
            time.sleep(1.0)  # let the status settle to idle
            head = _status_threads(
                {os.getpid(): {t.native_id or 0: t.name for t in threading.enumerate()}}
            )
            sidecars = _status_threads(threads[True])
            engines = {live: list(threads[live]) for live in (True, False)}
            s0 = _cpu_of(sidecars)
            h0 = _cpu_of(head)
            e0 = {live: [_proc_cpu_s(p) or 0.0 for p in engines[live]] for live in engines}
            time.sleep(IDLE_S)
            s1 = _cpu_of(sidecars)
            h1 = _cpu_of(head)
            e1 = {live: [_proc_cpu_s(p) or 0.0 for p in engines[live]] for live in engines}
            if len(sidecars) != 2:
                raise RuntimeError(f"status sidecar thread not found on every engine: {threads}")
            sidecar_idle.append(max(100.0 * (b - a) / IDLE_S for a, b in zip(s0, s1)))
            receiver_idle += [100.0 * (b - a) / IDLE_S for a, b in zip(h0, h1)]
            for live in (True, False):
                engine_idle[live].append(
                    statistics.median(100.0 * (b - a) / IDLE_S for a, b in zip(e0[live], e1[live]))
                )
        finally:
            for c in clusters.values():
                if c.running:
                    c.stop()
    sampler_host, sampler_rank = _sampler_cost()
    print(
        f"overhead: usage sampler, % of a core at the view's rate: host's "
        f"{json.dumps([round(x, 4) for x in sampler_host])}, another rank's "
        f"{json.dumps([round(x, 4) for x in sampler_rank])}",
        flush=True,
    )
    lo, hi = median_interval(ratios)
    print(
        f"overhead: cell = {steps} steps of 512x512 matmul+tanh; {len(ratios)} on/off pairs; "
        f"per-pair ratio on/off: median {statistics.median(ratios):.3f}x, ~95% interval of the "
        f"median {lo:.3f}..{hi:.3f}x; pairs {json.dumps([round(r, 3) for r in ratios])}",
        flush=True,
    )
    print("overhead: CPU seconds per cell, median over the cells (on / off / on - off):")
    rows = sorted(
        set(where[True]) | set(where[False]),
        key=lambda k: -statistics.median(where[True].get(k, [0.0])),
    )
    for key in rows:
        on = statistics.median(where[True].get(key, [0.0]))
        off = statistics.median(where[False].get(key, [0.0]))
        print(f"  {key:<60} {on:8.4f} {off:8.4f} {on - off:+8.4f}")
    print(
        f"  {'total':<60} {statistics.median(cpu_total[True]):8.4f} "
        f"{statistics.median(cpu_total[False]):8.4f} "
        f"{statistics.median(cpu_total[True]) - statistics.median(cpu_total[False]):+8.4f}",
        flush=True,
    )
    print(
        f"overhead: head receiver thread idle CPU "
        f"{json.dumps([round(x, 3) for x in receiver_idle])} % of a core",
        flush=True,
    )
    return [
        compare(
            f"%%px compute-bound cell (~{CELL_S:g} s of MLX matmuls), 2 local ranks, live status "
            f"on vs off: per-pair ratio ({len(ratios)} alternating pairs; ~95% interval of the "
            f"median {lo:.3f}..{hi:.3f}x)",
            ratios,
            [1.0] * len(ratios),
            "x",
            "<= 1.02x",
            "live status off (ratio 1)",
        ),
        compare(
            f"%%px compute-bound cell (~{CELL_S:g} s of MLX matmuls), 2 local ranks, live status "
            "on",
            wall[True],
            wall[False],
            "s",
            "report",
            "the same cell, live status off",
        ),
        compare(
            "CPU time of every process taking part (head, controllers, mpiexec, engines) over "
            "that cell, live status on",
            cpu_total[True],
            cpu_total[False],
            "s",
            "<= 1.02x",
            "the same cell, live status off",
        ),
        compare(
            "CPU of live status's own threads over that cell (both engines' sidecars and the "
            "head's receiver), live status on",
            own_cpu[True],
            own_cpu[False],
            "s",
            "report",
            "the same rows in the live-status-off cells (no sidecar runs the cell; the receiver "
            "hears the idle cluster)",
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
            "usage sampler of a host (its rank's process CPU, the host's CPU and memory; "
            "macmon's own process on a Mac not included), CPU at the view's rate (2 reads/s)",
            sampler_host,
            sampler_rank,
            "% of a core",
            "< 0.5% of a core (absolute)",
            "another rank's reading on the same host (its own process CPU only)",
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
