"""The fabric on virtual Macs cabled point to point: one subnet per cable, ssh on a separate
management network, as ``mlx.distributed_config`` sets up Macs for jaccl and jaccl-ring.

A shaped (slow) cable is flagged by ``links``; a ring of 4 whose hosts share no subnet with
the head starts and runs ring collectives with its control traffic on the management network;
the hostfile forms MLX writes start a cluster.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.fabric import links, topology
from mlx_cluster_magic.fabric.placement import read_hostfile
from mlx_cluster_magic.launch import mpi_job as launch

from conftest import cabled_macs, no_leaks_on

pytestmark = pytest.mark.multihost

RING_PORT = 31900

# Remote addresses of this host's established TCP connections on MLX's ring ports.
RING_PEERS = """
import psutil
peers = sorted(
    c.raddr.ip
    for c in psutil.net_connections("tcp")
    if c.raddr and c.status == "ESTABLISHED"
    and ({port} <= c.raddr.port < {port} + 16 or {port} <= c.laddr.port < {port} + 16)
)
"""


@pytest.fixture(scope="module")
def mesh3() -> Iterator[Any]:
    """Three Macs, every pair joined by its own cable (a /30 each), ssh over a bridge."""
    with cabled_macs(3, "mesh", "10.77.1.0/24", "10.77.64.0/24", "fabm") as vc:
        yield vc


@pytest.fixture(scope="module")
def ring4() -> Iterator[Any]:
    """Four Macs in a ring of cables: mac1 and mac3 share no cable (nor do mac2 and mac4)."""
    with cabled_macs(4, "ring", "10.77.2.0/24", "10.77.65.0/24", "fabr") as vc:
        yield vc


def start(ip: Any, vc: Any, hostfile: Path, *flags: str) -> MLXCluster:
    """``%mlx_cluster start --hostfile ...`` exactly as a user types it: the controller's
    address, MPI's networks and the pre-flight (each host reaching the peers it sends to) are
    the product's own choices."""
    cluster = ip.run_line_magic("mlx_cluster", vc.start_line(hostfile, *flags, ring_port=RING_PORT))
    assert isinstance(cluster, MLXCluster) and cluster.running
    return cluster


def test_control_plane_of_point_to_point_cabling(mesh3: Any, tmp_path: Path) -> None:
    placement = read_hostfile(mesh3.hostfile(tmp_path / "ring.json", "ring"))
    assert [h.ips for h in placement.hosts] == [("10.77.64.5",), ("10.77.64.2",), ("10.77.64.10",)]
    peers = launch.ssh_addresses(placement, mesh3.rsh_agent)
    assert peers == dict(zip(mesh3.hosts, mesh3.ips))
    cp = launch.control_plane(placement, launch.local_interfaces(), peers)
    assert (cp.address, cp.network, cp.on_cables) == (mesh3.head_ip, mesh3.subnet, False)
    assert launch.mpi_subnets(placement, cp) == [mesh3.subnet]


def test_links_flag_exactly_the_slow_cable(
    ip: Any, mesh3: Any, tmp_path: Path, artifacts: Path
) -> None:
    hostfile = mesh3.hostfile(tmp_path / "ring.json", "ring")
    slow = mesh3.cable("mac2", "mac3")
    mesh3.shape_cable(slow, "300mbit")
    try:
        with start(ip, mesh3, hostfile, "--no-live-status") as cluster:
            t0 = time.monotonic()
            report = links.measure(cluster.view, cluster.placement, cluster.ranks, timeout=10)
            took = time.monotonic() - t0
    finally:
        mesh3.shape_cable(slow, None)
        no_leaks_on(mesh3)
    (artifacts / "links-mesh3.txt").write_text(report.text() + "\n")
    svg = topology.topology_svg(cluster.placement, report.records)
    (artifacts / "links-mesh3.svg").write_text(svg)
    (artifacts / "links-mesh3.json").write_text(json.dumps(report.as_dicts(), indent=2))
    assert took < 12, report.text()
    assert report.hosts == ["mac1", "mac2", "mac3"]
    assert len(report.records) == 3
    assert [(r.src, r.dst) for r in report.flagged()] == [("mac2", "mac3")], report.text()
    bad = report.record("mac2", "mac3")
    assert bad is not None and bad.tcp_gbit_s is not None and bad.gbit_s is not None
    assert bad.tcp_gbit_s < 0.4 and bad.gbit_s < 0.4, report.text()
    for r in report.records:  # every pair measured on its own cable
        assert r.interface and r.interface.startswith("tb"), report.text()
        assert r.address and r.address.startswith("10.77.64."), report.text()
        assert r.latency_s and r.latency_s < 0.05
    ET.fromstring(svg)
    assert svg.count('class="flagged"') == 1
    assert report.picture and "mlx-topology" in report.html()
    assert "mac2 -- mac3" in topology.topology_text(cluster.placement, report.records)


def test_ring_of_four_with_control_on_the_management_network(
    ip: Any, ring4: Any, tmp_path: Path, artifacts: Path
) -> None:
    hostfile = ring4.hostfile(tmp_path / "ring.json", "ring")
    placement = read_hostfile(hostfile)
    assert all(ip.startswith("10.77.65.") for h in placement.hosts for ip in h.ips)
    try:
        with start(ip, ring4, hostfile, "--backend ring") as cluster:
            assert cluster.controller_ip == ring4.head_ip  # the management network
            cluster.view.execute(
                "s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * (world.rank() + 1))"
                ".tolist()\n"
                "g = mx.distributed.all_gather(mx.array([world.rank()])).tolist()\n"
                "import socket; host = socket.gethostname()\n"
            )
            assert cluster.view["host"] == ["mac1", "mac2", "mac3", "mac4"]
            assert cluster.view["s"] == [[0.0, 10.0, 20.0, 30.0]] * 4
            assert cluster.view["g"] == [[0, 1, 2, 3]] * 4
            # MLX's ring connections run over the cables: each rank's peers are cable addresses.
            cluster.view.execute(RING_PEERS.format(port=RING_PORT))
            conns = cluster.view["peers"]
            for peers in conns:
                assert peers and all(p.startswith("10.77.65.") for p in peers), conns
            report = links.measure(cluster.view, cluster.placement, cluster.ranks, timeout=10)
            (artifacts / "links-ring4.txt").write_text(report.text() + "\n")
            assert len(report.records) == 6
            assert report.hub is None  # a ring: no host is the centre
            far = report.record("mac1", "mac3")
            assert far is not None and far.gbit_s is None  # no cable, no MLX send
            near = report.record("mac1", "mac2")
            assert near is not None and near.gbit_s and near.interface == "tb2"
    finally:
        no_leaks_on(ring4)


@pytest.mark.parametrize("form", ["ethernet", "ring"])
def test_hostfile_forms_mlx_writes_start(ip: Any, mesh3: Any, tmp_path: Path, form: str) -> None:
    hostfile = mesh3.hostfile(tmp_path / f"{form}.json", form)
    try:
        with start(ip, mesh3, hostfile, "--no-live-status") as cluster:
            assert cluster.backend == ("mpi" if form == "ethernet" else "ring")
            cluster.view.execute("t = mx.distributed.all_sum(mx.array(1.0)).item()")
            assert cluster.view["t"] == [3.0] * 3
            if form == "ethernet":  # MPI's send/recv between every pair, over the bridge
                report = links.measure(cluster.view, cluster.placement, cluster.ranks)
                assert len(report.records) == 3, report.text()
                for r in report.records:
                    assert r.gbit_s and r.tcp_gbit_s and r.interface == "eth0", report.text()
                    assert r.address in mesh3.ips
    finally:
        no_leaks_on(mesh3)


def test_ring_form_with_two_cables_per_neighbour_starts(ip: Any, tmp_path: Path) -> None:
    """mlx.distributed_config's ring form where neighbours share two cables: two IPs a host."""
    pairs = [(0, 1), (1, 2), (2, 0)]
    with cabled_macs(3, pairs + pairs, "10.77.4.0/24", "10.77.67.0/24", "fabd") as vc:
        hostfile = vc.hostfile(tmp_path / "ring.json", "ring")
        assert [len(h.ips) for h in read_hostfile(hostfile).hosts] == [2, 2, 2]
        try:
            with start(ip, vc, hostfile, "--no-live-status") as cluster:
                cluster.view.execute(RING_PEERS.format(port=RING_PORT))
                cluster.view.execute("t = mx.distributed.all_sum(mx.ones(1 << 16)).sum().item()")
                assert cluster.view["t"] == [3.0 * (1 << 16)] * 3
                # Two connections to each neighbour, all on cable addresses.
                for peers in cluster.view["peers"]:
                    assert len(peers) == 4 and all(p.startswith("10.77.67.") for p in peers)
        finally:
            no_leaks_on(vc)


def test_ring_connections_per_ip_and_verbose(ip: Any, mesh3: Any, tmp_path: Path) -> None:
    hostfile = mesh3.hostfile(tmp_path / "ring.json", "ring")
    try:
        with start(ip, mesh3, hostfile, "--no-live-status --connections-per-ip 2 --verbose") as c:
            c.view.execute(
                "import json, os\n"
                "v = os.environ.get('MLX_RING_VERBOSE')\n"
                f"mine = json.loads(os.environ['{launch.RING_HOSTS_VAR}'])[world.rank()]\n"
                "t = mx.distributed.all_sum(mx.ones(1 << 16)).sum().item()"
            )
            if c.view["v"] == [None] * 3:
                pytest.skip("MLXCluster does not pass verbose/connections_per_ip on yet")
            assert c.view["v"] == ["1"] * 3
            assert c.view["mine"][1] == ["10.77.64.2:31900", "10.77.64.2:31901"]
            assert c.view["t"] == [3.0 * (1 << 16)] * 3
    finally:
        no_leaks_on(mesh3)


@pytest.mark.parametrize("form", ["jaccl", "jaccl-ring"])
def test_jaccl_forms_build_their_environment(mesh3: Any, tmp_path: Path, form: str) -> None:
    # RDMA cannot run here: the environment mlx.launch would give is built and checked.
    placement = read_hostfile(mesh3.hostfile(tmp_path / f"{form}.json", form))
    assert placement.backend == form
    env = launch.backend_environment(placement, form)
    assert env["MLX_JACCL_COORDINATOR"] == f"{mesh3.ips[0]}:{launch.DEFAULT_JACCL_PORT}"
    assert json.loads(env[launch.IBV_DEVICES_VAR])[0] == [None, "rdma_tb2", "rdma_tb3"]
    assert ("MLX_JACCL_RING" in env) == (form == "jaccl-ring")


# What the engines do with the ring environment, without the cluster around it.
RING_SUM = """
import json, os, socket, sys
os.environ["MLX_RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
import mlx.core as mx
g = mx.distributed.init(backend="ring", strict=True)
x = mx.distributed.all_sum(mx.ones(1 << 18) * (g.rank() + 1))
mx.eval(x)
print("RESULT", socket.gethostname(), g.rank(), x[0].item(), flush=True)
"""


def test_mlx_ring_takes_several_connections_per_ip(mesh3: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    placement = read_hostfile(mesh3.hostfile(tmp_path / "ring.json", "ring"))
    ring = launch.ring_hosts(placement, RING_PORT + 20, connections_per_ip=2)
    assert [len(r) for r in ring] == [2, 2, 2]
    hostfile = tmp_path / "mlx-ring.json"
    hostfile.write_text(json.dumps(ring))
    script = tmp_path / "ring_sum.py"
    script.write_text(RING_SUM)
    venv = Path(sys.executable).parent
    cmd = [
        str(venv / "mpiexec"),
        "--allow-run-as-root",
        "--host", "mac1:1,mac2:1,mac3:1",
        "--prtemca", "plm_ssh_agent", mesh3.rsh_agent,
        "--prtemca", "prte_launch_agent", str(venv / "prted"),
        "--mca", "btl_tcp_if_include", mesh3.subnet,
        "--mca", "oob_tcp_if_include", mesh3.subnet,
        "-x", f"MLX_HOSTFILE={hostfile}",
        "-x", "MLX_RING_VERBOSE=1",
        "-n", "3", sys.executable, str(script),
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    finally:
        no_leaks_on(mesh3)
    results = sorted(ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith("RESULT"))
    assert results == [["mac1", "0", "6.0"], ["mac2", "1", "6.0"], ["mac3", "2", "6.0"]], (
        out.stdout + out.stderr[-2000:]
    )
    assert "[ring]" in out.stdout + out.stderr  # MLX's own verbose lines
