"""From "cabled, ssh works" to a right ``all_sum`` on every Mac: four virtual Macs in a ring as
macOS ships them (Thunderbolt ports in the Thunderbolt Bridge, no addresses; macOS's network
commands from ``tests/macos_shims.py`` on the hosts' PATH, passwordless sudo).

- ours, the cells a person runs: ``%mlx_cluster network --configure --write`` (read every Mac,
  plan, apply, hostfile, doctor), ``%mlx_cluster setup`` (nothing to copy here: the hosts share
  this machine's disk), ``%mlx_cluster start --hostfile``, and a ``%%px`` ``all_sum``;
- the baseline, the commands a person runs in a terminal: ``mlx.distributed_config --hosts ...
  --backend ring --auto-setup --output-hostfile F``, then ``mlx.launch --hostfile F`` of a
  script that runs the same ``all_sum`` and prints it.

Each run starts from a rebooted rig (every Mac back to its network preferences; ours is undone
first, as its addresses persist). Both use 192.168.0.0/24 for the cables (mlx's range, given to
ours with ``--subnets``), which the head routes to ``unreachable`` while the rig exists.

    python bench/cabled.py [reps]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

RING_PORT = 31720
HOSTS = "mac1,mac2,mac3,mac4"
ALL_SUM = (
    "import mlx.core as mx\n"
    "world = mx.distributed.init()\n"
    "s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * (world.rank() + 1))\n"
    "print('MCMB_SUM', world.rank(), s.tolist(), flush=True)\n"
)
RIGHT = [0.0, 10.0, 20.0, 30.0]


def _reboot_all(vc: Any) -> None:
    from macos_state import reboot

    for host in vc.hosts:
        reboot(vc, host)


CELLS: dict[str, list[float]] = {"network": [], "setup": [], "start": [], "all_sum": []}


def _ours(vc: Any, work: Path) -> tuple[float, float]:
    from mlx_cluster_magic import MLXCluster
    from mlx_cluster_magic.cluster.environment import setup
    from mlx_cluster_magic.fabric.network import network

    hostfile = work / "ours.json"
    t = time.perf_counter()
    done = network(
        HOSTS, configure=True, subnets="192.168.0.0/24", write=hostfile, ssh=vc.rsh_agent
    )
    assert done.applied and "every Mac reaches" in str(done), str(done)
    configured = time.perf_counter() - t
    setup(hostfile=hostfile, ssh=vc.rsh_agent, progress=False)
    set_up = time.perf_counter() - t
    cluster = MLXCluster(
        hostfile=str(hostfile), ssh=vc.rsh_agent, ring_port=RING_PORT, live_status=False, timeout=60
    )
    cluster.start()
    started = time.perf_counter() - t
    try:
        cluster.view.execute(
            "s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * (world.rank() + 1))"
            ".tolist()"
        )
        assert cluster.view["s"] == [RIGHT] * 4
        elapsed = time.perf_counter() - t
        marks = (configured, set_up, started, elapsed)
        for times, a, b in zip(CELLS.values(), (0.0, *marks[:3]), marks, strict=True):
            times.append(b - a)
    finally:
        cluster.stop()
    network(HOSTS, undo=True, write=hostfile, ssh=vc.rsh_agent)
    return elapsed, configured


def _baseline(vc: Any, work: Path, env: dict[str, str]) -> tuple[float, float]:
    hostfile = work / "mlx.json"
    script = work / "all_sum.py"
    script.write_text(ALL_SUM)
    config = str(Path(benchlib.BIN) / "mlx.distributed_config")
    t = time.perf_counter()
    subprocess.run(
        [
            config,
            "--hosts",
            HOSTS,
            "--over",
            "thunderbolt",
            "--backend",
            "ring",
            "--auto-setup",
            "--output-hostfile",
            str(hostfile),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    configured = time.perf_counter() - t
    out = subprocess.run(
        benchlib.mlx_launch("--hostfile", str(hostfile), program=[str(script)]),
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    ).stdout
    elapsed = time.perf_counter() - t
    sums = [line for line in out.splitlines() if line.startswith("MCMB_SUM")]
    assert len(sums) == 4 and all(str(RIGHT) in line for line in sums), out
    return elapsed, configured


def bench_cabled(reps: int) -> list[dict[str, Any]]:
    reason = benchlib.vhost_skip_reason()
    if reason:
        print(f"cabled: skipped: {reason}", flush=True)
        return []
    from vcluster import VirtualCluster

    vc = VirtualCluster(
        4,
        subnet="10.91.5.0/24",
        prefix="netnb",
        cables="ring",
        cable_subnet="192.168.0.0/24",
        macos=True,
    )
    ours: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack, benchlib.workdir("netnb-") as work:
        vc.start()
        stack.callback(vc.stop)
        sshbin = benchlib.ssh_wrapper_dir(vc, work)
        env = dict(os.environ, PATH=f"{sshbin}{os.pathsep}{os.environ['PATH']}")

        def one_of_ours() -> None:
            _reboot_all(vc)
            ours.append(_ours(vc, Path(work)))

        def one_baseline() -> None:
            _reboot_all(vc)
            base.append(_baseline(vc, Path(work), env))

        benchlib.alternate(max(reps, 3), one_of_ours, one_baseline)
    each = ", ".join(f"{cell} {statistics.median(t):.2f} s" for cell, t in CELLS.items())
    print(f"cabled: our cells, medians: {each}", flush=True)
    return [
        compare(
            "cabled and ssh working to a right all_sum, ring of 4 virtual Macs (ours: network "
            "--configure, setup, start, %%px all_sum: 4 cells)",
            [o[0] for o in ours],
            [b[0] for b in base],
            "s",
            "report",
            "mlx.distributed_config --backend ring --auto-setup, then mlx.launch of an all_sum "
            "script: 2 terminal commands and a script file",
        ),
        compare(
            "the addresses alone: network --configure (read, plan, apply, verify, hostfile, "
            "doctor across the new addresses)",
            [o[1] for o in ours],
            [b[1] for b in base],
            "s",
            "report",
            "mlx.distributed_config --backend ring --auto-setup (no check afterwards)",
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_cabled)
