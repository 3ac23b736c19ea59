"""A farm's sweeps on three virtual Macs (``%mlx_cluster start --farm``).

throughput: tasks per second of one sweep over the three Macs, against the sum of what each Mac
does alone (a farm of that Mac only, the same tasks). The virtual Macs share this machine's two
cores, so the tasks wait (0.2 s, as a task waits on its Mac's GPU) instead of computing: what is
measured is the farm's own scheduling. Target >= 0.95x.

per-task overhead: the same farm's engines, 300 tasks that do nothing, each to its engine
through ``cluster.map`` against ipyparallel's own ``load_balanced_view().map`` on the same
engines (seconds per task). Target <= 1.05x.

lost Mac: the time from a Mac's lost verdict (the liveness keeper: no one reaches it) to its task
running on another engine (the engine's own start time of the new attempt), with an engine free;
beside it, the time from the network's drop to the verdict. Target: 1 s (the verdict + 1 s).

    python bench/farm.py [reps]
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipyparallel import interactive

import benchlib
from benchlib import compare

PREFIX, SUBNET = "farfb", "10.95.2.0/24"
TASK_S = 0.2


@contextlib.contextmanager
def _macs() -> Iterator[Any]:
    from vcluster import VirtualCluster

    vc = VirtualCluster(3, subnet=SUBNET, prefix=PREFIX)
    try:
        vc.start()
        yield vc
    finally:
        vc.stop()


def _farm(vc: Any, hosts: list[str], folder: str) -> Any:
    from mlx_cluster_magic import MLXCluster

    path = Path(folder) / f"hosts-{'-'.join(hosts)}.json"
    path.write_text(json.dumps([{"ssh": h, "ips": [vc.ip(h)]} for h in hosts]))
    return MLXCluster(hostfile=path, ssh=vc.rsh_agent, farm=True, grace=10).start()


@interactive
def wait_then(item: tuple[int, float]) -> int:
    """A task that waits ``item[1]`` seconds (as on its Mac's GPU) and returns ``item[0]``."""
    import time

    time.sleep(item[1])
    return item[0]


def _tasks(count: int, seconds: float) -> list[tuple[int, float]]:
    return [(x, seconds) for x in range(count)]


def _rate(cluster: Any, count: int) -> float:
    t = time.perf_counter()
    results = cluster.map(wait_then, _tasks(count, TASK_S))
    assert list(results) == list(range(count))
    return count / (time.perf_counter() - t)


def _throughput(vc: Any, folder: str, reps: int) -> dict[str, Any]:
    alone: dict[str, list[float]] = {h: [] for h in vc.hosts}
    for host in vc.hosts:
        cluster = _farm(vc, [host], folder)
        try:
            _rate(cluster, 10)  # warm
            alone[host] = [_rate(cluster, 40) for _ in range(reps)]
        finally:
            cluster.stop()
    cluster = _farm(vc, vc.hosts, folder)
    try:
        _rate(cluster, 30)
        together = [_rate(cluster, 120) for _ in range(reps)]
    finally:
        cluster.stop()
    summed = [sum(alone[h][i] for h in vc.hosts) for i in range(reps)]
    return compare(
        f"farm sweep throughput over 3 virtual Macs ({TASK_S:g} s tasks), tasks/s",
        together,
        summed,
        "tasks/s",
        ">= 0.95x",
        "the sum of each Mac alone",
        higher_is_better=True,
    )


def _overhead(vc: Any, folder: str, reps: int) -> dict[str, Any]:
    nothing = interactive(lambda x: x)
    count = 300
    ours: list[float] = []
    base: list[float] = []
    cluster = _farm(vc, vc.hosts, folder)
    try:
        lview = cluster.client.load_balanced_view()

        def mine() -> None:
            t = time.perf_counter()
            assert list(cluster.map(nothing, range(count))) == list(range(count))
            ours.append((time.perf_counter() - t) / count)

        def theirs() -> None:
            t = time.perf_counter()
            assert list(lview.map(nothing, range(count), block=True)) == list(range(count))
            base.append((time.perf_counter() - t) / count)

        mine()  # warm
        theirs()
        ours.clear()
        base.clear()
        benchlib.alternate(max(reps, 5), mine, theirs)
    finally:
        cluster.stop()
    return compare(
        "farm per-task overhead: cluster.map of tasks that do nothing, s per task",
        ours,
        base,
        "s",
        "<= 1.05x",
        "ipyparallel's load_balanced_view().map on the same engines",
    )


def _lost_once(vc: Any, folder: str) -> tuple[float, float]:
    """(verdict to the task running elsewhere, drop to verdict), both in seconds."""
    cluster = _farm(vc, vc.hosts, folder)
    victim = cluster._farm.members[0]
    try:
        sweep = cluster.map(wait_then, _tasks(2, 3.0), block=False)  # mac3 stays free
        slot = victim.slots[0].slot
        while not any(a.slot == slot for a in list(sweep.live.values())):
            time.sleep(0.01)
        item = next(a.item for a in list(sweep.live.values()) if a.slot == slot)
        time.sleep(0.5)  # it runs
        vc.drop(victim.host.ssh)
        dropped = time.time()
        mono = time.monotonic()
        sweep.result(timeout=60)
        started = sweep.counted[item].metadata["started"].timestamp()
        lost_wall = dropped + (victim.lost_at - mono)
        return started - lost_wall, victim.lost_at - mono
    finally:
        cluster.stop()
        vc.undrop(victim.host.ssh)


def _lost(vc: Any, folder: str, reps: int) -> dict[str, Any]:
    to_running: list[float] = []
    to_verdict: list[float] = []
    for _ in range(reps):
        a, b = _lost_once(vc, folder)
        to_running.append(a)
        to_verdict.append(b)
        time.sleep(25)  # the dropped Mac's engine ends (grace 10 s + 10 s) before the next
    return compare(
        "farm: a Mac lost mid-task, from the lost verdict to its task running elsewhere, s",
        to_running,
        to_verdict,
        "s",
        "<= 1 s",
        "from the network's drop to the lost verdict",
    )


def bench_farm(reps: int) -> list[dict[str, Any]]:
    if benchlib.vhost_skip_reason() or shutil.which("iptables") is None:
        print("farm: skipped (needs virtual hosts and iptables)", flush=True)
        return []
    folder = tempfile.mkdtemp(prefix="farfb-")
    try:
        with _macs() as vc:
            return [
                _throughput(vc, folder, reps),
                _overhead(vc, folder, reps),
                _lost(vc, folder, reps),
            ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    benchlib.main(bench_farm)
