"""The TCP figure of ``links`` for one pair of hosts against ``iperf3`` on the same pair, in the
same run: two virtual Macs (network namespaces with sshd) on a management bridge and joined by
one point-to-point cable of their own; ``links.measure`` streams over the cable, and so does
``iperf3 -c`` from the first host to an ``iperf3 -s`` bound to the second host's cable address.

    python bench/links.py [reps]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

SECONDS = 2.0  # each stream, ours and iperf3's alike
PREFIX, SUBNET, CABLES = "fabb", "10.77.9.0/24", "10.77.72.0/24"
RING_PORT = 31730
# The cable shaped below what this machine's CPUs can push through a veth (so both tools
# measure the cable, as on a real Thunderbolt link), then as it is.
SHAPES = ("2gbit", None)


def _iperf3(vc: Any, src: str, dst: str, ip: str, seconds: float) -> float:
    """Gb/s of one iperf3 TCP stream from ``src`` to ``dst``'s ``ip`` (the receiver's figure)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", vc.namespace(dst), "iperf3", "-s", "-B", ip, "-p", "5301"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        data: dict[str, Any] = {}
        for _ in range(50):  # until the server listens
            out = vc.netns_exec(
                src, "iperf3", "-c", ip, "-p", "5301", "-t", f"{seconds:g}", "-l", "1M", "-J",
                timeout=seconds + 20,
            )  # fmt: skip
            data = json.loads(out.stdout or "{}")
            if out.returncode == 0 and "sum_received" in data.get("end", {}):
                return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 failed: {data.get('error') or out.stderr[-300:]}")
    finally:
        server.kill()
        server.wait()


def bench_links(reps: int) -> list[dict[str, Any]]:
    from mlx_cluster_magic import MLXCluster
    from mlx_cluster_magic.fabric import links
    from mlx_cluster_magic.fabric.placement import read_hostfile
    from mlx_cluster_magic.launch import mpi_job as launch

    from vcluster import VirtualCluster

    if benchlib.vhost_skip_reason() or shutil.which("iperf3") is None:
        print(f"links: skipped ({benchlib.vhost_skip_reason() or 'iperf3 not installed'})")
        return []
    vc = VirtualCluster(2, subnet=SUBNET, prefix=PREFIX, cables=[(0, 1)], cable_subnet=CABLES)
    work = Path(tempfile.mkdtemp(prefix="mcmb-links-"))
    figures: list[dict[str, Any]] = []
    try:
        vc.start()
        hostfile = vc.hostfile(work / "ring.json", "ring")  # each host's cable address
        placement = read_hostfile(hostfile)
        peers = launch.ssh_addresses(placement, vc.rsh_agent)
        cp = launch.control_plane(placement, launch.local_interfaces(), peers)
        cluster = MLXCluster(
            hostfile=hostfile,
            ssh=vc.rsh_agent,
            controller_ip=cp.address,
            ring_port=RING_PORT,
            live_status=False,
            timeout=60,
        )
        nets = ",".join(launch.mpi_subnets(placement, cp))
        if cluster.subnet != nets and hasattr(cluster, "spec"):
            cluster.spec = dataclasses.replace(cluster.spec, subnet=nets)
        if not cp.on_cables and hasattr(cluster, "_preflight"):
            cluster._preflight = lambda: None  # its head-to-cable check does not apply here
        dst_ip = vc.cable_ip("mac2", "mac1")
        with cluster.start():
            for rate in SHAPES:
                vc.shape_cable(0, rate)
                ours: list[float] = []
                base: list[float] = []

                def run_ours(ours: list[float] = ours) -> None:
                    r = links.measure(
                        cluster.view, cluster.placement, cluster.ranks, seconds=SECONDS, timeout=30
                    )
                    (rec,) = r.records
                    if rec.address != dst_ip or rec.tcp_gbit_s is None:
                        raise RuntimeError(f"links measured {rec}")
                    ours.append(rec.tcp_gbit_s)

                def run_base(base: list[float] = base) -> None:
                    base.append(_iperf3(vc, "mac1", "mac2", dst_ip, SECONDS))

                benchlib.alternate(max(reps, 3), run_ours, run_base)
                figures.append(
                    compare(
                        f"links TCP Gb/s, one cable between 2 virtual hosts, "
                        f"{'shaped to ' + rate if rate else 'unshaped (CPU-bound)'}",
                        ours,
                        base,
                        "Gb/s",
                        "0.90x..1.10x" if rate else "report",
                        f"iperf3 -c <cable ip> -t {SECONDS:g} -l 1M on the same pair",
                        higher_is_better=True,
                    )
                )
    finally:
        vc.stop()
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    benchlib.main(bench_links)
