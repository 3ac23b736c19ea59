"""The start-up check of who reaches whom, on 4 virtual Macs cabled in a ring (one subnet per
cable, the notebook's machine on the management network only, the hostfile as
``mlx.distributed_config`` writes it).

- the doctor with each host testing the peers the ring backend sends to, against the same
  doctor with no peers to test (backend ``any``): what the check adds (target: at most 1 s);
- start to ready of the ring of 4 through ``MLXCluster`` (the check included), reported beside
  the doctor's own time.

    python bench/cabling.py [reps]
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

RING_PORT = 31980


def bench_cabling(reps: int) -> list[dict[str, Any]]:
    reason = benchlib.vhost_skip_reason()
    if reason:
        print(f"cabling: skipped: {reason}", flush=True)
        return []
    from mlx_cluster_magic import MLXCluster
    from mlx_cluster_magic.fabric.doctor import run_doctor
    from mlx_cluster_magic.fabric.placement import read_hostfile

    from vcluster import VirtualCluster

    vc = VirtualCluster(
        4, subnet="10.77.12.0/24", prefix="mcmbr", cables="ring", cable_subnet="10.77.76.0/24"
    )
    with contextlib.ExitStack() as stack, benchlib.workdir("mcmb-cab-") as work:
        vc.start()
        stack.callback(vc.stop)
        hostfile = vc.hostfile(Path(work) / "ring.json", "ring")
        placement = read_hostfile(hostfile)
        with_check: list[float] = []
        without: list[float] = []
        starts: list[float] = []

        def doctor(backend: str, into: list[float]) -> None:
            t = time.perf_counter()
            report = run_doctor(placement, ssh=vc.rsh_agent, backend=backend, advice=False)
            into.append(time.perf_counter() - t)
            assert report.ok, repr(report)

        benchlib.alternate(
            max(reps, 5), lambda: doctor("ring", with_check), lambda: doctor("any", without)
        )
        for _ in range(max(reps // 2, 3)):
            t = time.perf_counter()
            cluster = MLXCluster(
                hostfile=hostfile, ssh=vc.rsh_agent, ring_port=RING_PORT, live_status=False
            )
            cluster.start()
            starts.append(time.perf_counter() - t)
            cluster.stop()
    added = [w - o for w, o in zip(with_check, without)]
    return [
        compare(
            "time the peer check adds to the doctor (ring of 4 virtual Macs, each host testing "
            "its ring peer)",
            added,
            without,
            "s",
            "<= 1 s",
            "the doctor with no peer to test (backend any)",
        ),
        compare(
            "start to ready, ring of 4 virtual Macs, notebook off the cables (check included)",
            starts,
            with_check,
            "s",
            "report",
            "the doctor alone (what the start runs before launching)",
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_cabling)
