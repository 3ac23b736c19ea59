"""The network a laptop has, on three virtual Macs (each host's own firewall drops its traffic).

lost host: the time from one host's network dropping (both ways) to the cluster broken with that
host named lost (idle: the watch decides; a running cell ends within its next poll), against the
time from that host's rank being killed outright to its death being known (mpiexec's report):
silence needs the peers' word, a death does not. Absolute target: 10 s.

back to idle: the time from the network returning after a drop of every host to every rank
reading ``idle`` again, against the time from a cell's end to every rank reading ``idle`` on a
healthy cluster; a 5 s drop, and a 30 s one, which ends just after TCP's retransmit at about
25 s (a connection that stayed open through it carried nothing until the next one, about 51 s
in: 21.7 s after a 32.5 s drop). Absolute target: 5 s.

    python bench/network.py [reps]
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import benchlib
from benchlib import compare

DROP_S = 5.0
LONG_DROP_S = 30.0


def _until(check: Any, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("not within the benchmark's bound")
        time.sleep(0.02)
    return time.monotonic() - t0


def _idle(cluster: Any) -> bool:
    return all(n["state"] == "idle" for n in cluster.nodes())


def bench_network(reps: int) -> list[dict[str, Any]]:
    if benchlib.vhost_skip_reason() or shutil.which("iptables") is None:
        print("network: skipped (needs virtual hosts and iptables)", flush=True)
        return []
    from mlx_cluster_magic import MLXCluster

    reps = max(reps, 5)
    named: list[float] = []
    killed: list[float] = []
    back: list[float] = []
    back_long: list[float] = []
    settle: list[float] = []
    with benchlib.vhosts(3) as vc:
        hostfile = benchlib.write_hostfile(vc, 3, vc.dir / "hosts.json")
        cluster = MLXCluster(hostfile=hostfile, ssh=vc.rsh_agent).start()
        try:
            for rep in range(reps):
                _until(lambda: _idle(cluster))
                vc.drop("mac3")
                named.append(_until(lambda: cluster.state == "broken"))
                assert cluster.health is not None and cluster.health.cause == "lost"
                vc.undrop("mac3")
                cluster.restart()
                _until(lambda: _idle(cluster))

                drops = [(DROP_S, back)] + ([(LONG_DROP_S, back_long)] if rep < 2 else [])
                for seconds, into in drops:
                    vc.drop()
                    time.sleep(seconds)
                    vc.undrop()
                    into.append(_until(lambda: _idle(cluster), timeout=60))

                cluster.view.execute("pass")
                settle.append(_until(lambda: _idle(cluster)))

                pid = cluster.ranks[2]["pid"]
                t0 = time.monotonic()
                vc.ssh("mac3", f"kill -9 {pid}")
                _until(lambda: bool(cluster.dead_ranks()))
                killed.append(time.monotonic() - t0)
                cluster.restart()
        finally:
            cluster.stop()
    return [
        compare(
            "a host's network dropped: named lost (its peers cannot reach it either)",
            named,
            killed,
            "s",
            "<= 10 s (absolute)",
            "that host's rank killed: its death known from mpiexec",
        ),
        compare(
            f"every host's network dropped {DROP_S:g} s: back to idle after it returns",
            back,
            settle,
            "s",
            "<= 5 s (absolute)",
            "a cell's end to every rank idle, healthy network",
        ),
        compare(
            f"every host's network dropped {LONG_DROP_S:g} s: back to idle after it returns",
            back_long,
            settle,
            "s",
            "<= 5 s (absolute)",
            "a cell's end to every rank idle, healthy network",
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_network)
