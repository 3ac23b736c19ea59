"""Cabled as people cable Macs, started through ``%mlx_cluster start --hostfile`` as a user does.

- a star: a master cabled to three workers, with the master's Thunderbolt Bridge on (one subnet
  for every cable: mpi and ring run) and off (one subnet per cable: the workers share no path,
  so ring is refused before launch, naming each pair);
- a ring of four where the notebook's machine is one of the Macs and runs rank 0;
- a star whose master is the notebook's machine.

The ring of four with the notebook off the cables is in test_fabric.py. Each start runs the
product's own pre-flight: every host tests, from where it stands, that it reaches the peers the
backend sends to (nothing here replaces a step; test_architecture guards that).
"""

from __future__ import annotations

import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic import MLXCluster

from conftest import cabled_macs, no_leaks_on

pytestmark = pytest.mark.multihost

RING_PORT = 31960
SUM = (
    "s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * (world.rank() + 1)).tolist()\n"
    "import socket; host = socket.gethostname()\n"
)
# The remote addresses of this rank's MLX ring connections.
RING_PEERS = f"""
import psutil
peers = sorted(
    c.raddr.ip
    for c in psutil.net_connections("tcp")
    if c.raddr and c.status == "ESTABLISHED"
    and ({RING_PORT} <= c.raddr.port < {RING_PORT} + 16 or {RING_PORT} <= c.laddr.port < {RING_PORT} + 16)
)
"""


@pytest.fixture(scope="module")
def bridged_star() -> Iterator[Any]:
    """mac1 bridges its three cables (Thunderbolt Bridge on): one subnet for all four."""
    with cabled_macs(4, "star", "10.77.6.0/24", "10.77.70.0/24", "fabsb", bridged=True) as vc:
        yield vc


@pytest.fixture(scope="module")
def split_star() -> Iterator[Any]:
    """mac1 cabled to three workers, the bridge off: one /30 per cable."""
    with cabled_macs(4, "star", "10.77.7.0/24", "10.77.71.0/24", "fabss") as vc:
        yield vc


@pytest.fixture(scope="module")
def ring_with_head() -> Iterator[Any]:
    """The notebook's machine and three Macs in a ring of cables, one /30 each."""
    with cabled_macs(3, "ring-head", "10.77.8.0/24", "10.77.72.0/24", "fabrh") as vc:
        yield vc


@pytest.fixture(scope="module")
def star_with_head() -> Iterator[Any]:
    """The notebook's machine is the star's master, bridging its cables to three Macs."""
    with cabled_macs(3, "star-head", "10.77.9.0/24", "10.77.73.0/24", "fabsh", bridged=True) as vc:
        yield vc


def start(ip: Any, vc: Any, hostfile: Path, *flags: str) -> MLXCluster:
    cluster = ip.run_line_magic("mlx_cluster", vc.start_line(hostfile, *flags, ring_port=RING_PORT))
    assert isinstance(cluster, MLXCluster) and cluster.running
    return cluster


def sums_right(cluster: MLXCluster, hosts: list[str]) -> None:
    cluster.view.execute(SUM)
    n = len(hosts)
    total = n * (n + 1) / 2
    assert cluster.view["s"] == [[0.0, total, 2 * total, 3 * total]] * n
    assert cluster.view["host"] == hosts


@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_bridged_star_runs(
    ip: Any, bridged_star: Any, tmp_path: Path, artifacts: Path, backend: str
) -> None:
    hostfile = bridged_star.cabled_hostfile(tmp_path / "star.json", backend)
    try:
        with start(ip, bridged_star, hostfile, "--no-live-status") as cluster:
            assert cluster.backend == backend
            sums_right(cluster, bridged_star.hosts)
            if backend == "ring":  # MLX's ring runs over the cables, workers through mac1
                cluster.view.execute(RING_PEERS)
                for peers in cluster.view["peers"]:
                    assert peers and all(p.startswith("10.77.70.") for p in peers)
            else:  # links measures every pair, the workers' through mac1's bridge
                report = cluster.links(timeout=10)
                assert len(report.records) == 6, report.text()
                assert all(r.gbit_s for r in report.records), report.text()
                # the picture: mac1 (its bridge holds three cables) at the centre of the star
                assert report.hub == "mac1"
                svg = ET.fromstring(report.picture or "")
                ns = "{http://www.w3.org/2000/svg}"
                centre = next(
                    t for t in svg.iter(f"{ns}text") if t.text == "mac1" and t.get("x") == "180.0"
                )
                assert centre.get("y") == "184.0"
                assert len(list(svg.iter(f"{ns}line"))) == 3  # a cable from mac1 to each
                (artifacts / "topology-bridged-star.svg").write_text(report.picture or "")
            report = cluster.doctor(advice=False)
            assert report.ok, repr(report)
            assert "FAIL" not in report.reach_text()
    finally:
        no_leaks_on(bridged_star)


def test_split_star_refuses_ring_naming_each_worker_pair(
    ip: Any, split_star: Any, tmp_path: Path
) -> None:
    hostfile = split_star.cabled_hostfile(tmp_path / "star.json", "ring")
    t0 = time.monotonic()
    try:
        with pytest.raises(UsageError) as e:
            ip.run_line_magic("mlx_cluster", split_star.start_line(hostfile, ring_port=RING_PORT))
        took = time.monotonic() - t0
    finally:
        no_leaks_on(split_star)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("no path between hosts: "), msg
    # The ring sends mac1 -> mac2 -> mac3 -> mac4 -> mac1: the two worker-to-worker hops fail.
    pairs, _, fix = msg.partition("; fix: ")
    assert "mac2 -> mac3: 10.77.71.6 Network is unreachable (no interface of mac2" in pairs, msg
    assert "mac3 -> mac4: 10.77.71.10 " in pairs, msg
    assert "mac1 -> mac2" not in pairs and "mac4 -> mac1" not in pairs, msg
    assert "turn on the Thunderbolt Bridge on mac1" in fix, msg
    assert took < 5, took
    magics = ip.magics_manager.registry["MLXClusterMagics"]
    assert magics.cluster is None or not magics.cluster.running


def test_split_star_doctor_shows_who_reaches_whom(ip: Any, split_star: Any, tmp_path: Path) -> None:
    hostfile = split_star.cabled_hostfile(tmp_path / "star.json", "ring")
    report = ip.run_line_magic(
        "mlx_cluster", f"doctor --hostfile {hostfile} --ssh '{split_star.rsh_agent}' --timeout 5"
    )
    assert not report.ok
    matrix = report.reach_text()
    rows = {line.split()[0]: line.split()[1:] for line in matrix.splitlines()[2:]}
    # from mac2 to mac3 fails; mac1 reaches mac2 by its own cable; pairs ring does not use: "."
    assert rows["mac2"][2] == "FAIL" and rows["mac3"][3] == "FAIL", matrix
    assert rows["mac1"][1] == "tb2" and rows["mac4"][0] == "tb1", matrix
    assert rows["mac1"][2] == ".", matrix
    html = report._repr_html_()
    assert "who reaches whom" in html and "mac2 -&gt; mac3" in html
    assert "who reaches whom" in repr(report)


def test_split_star_doctor_never_advises_a_route_to_the_management_network(
    ip: Any, split_star: Any, tmp_path: Path
) -> None:
    """MPI on one subnet per cable: a worker reaches another worker's cable address only by the
    management network. Changing that route would cut the ssh the notebook drives it by: the
    advice is the bridge or the ring backend, as the start's warning says."""
    hostfile = split_star.cabled_hostfile(tmp_path / "star.json", "mpi")
    report = ip.run_line_magic(
        "mlx_cluster", f"doctor --hostfile {hostfile} --ssh '{split_star.rsh_agent}' --timeout 5"
    )
    routes = [(h, c) for h, c in report.problems() if c.name == "route"]
    assert {h for h, _ in routes} >= {"mac2", "mac3", "mac4"}, repr(report)
    for _, check in routes:
        assert "route del" not in check.fix and "remove" not in check.fix, check.fix
        assert "Thunderbolt Bridge" in check.fix and "--backend ring" in check.fix, check.fix
        assert "leave its routes as they are" in check.fix
    assert "route del" not in repr(report) and "route del" not in report._repr_html_()


def test_split_star_mpi_runs_over_the_management_network(
    ip: Any, split_star: Any, tmp_path: Path
) -> None:
    """MPI is pinned to the network the notebook's machine shares with every host (the head is
    on no cable), so the workers reach each other there: the star starts, and says where."""
    hostfile = split_star.cabled_hostfile(tmp_path / "star.json", "mpi")
    try:
        with start(ip, split_star, hostfile, "--no-live-status") as cluster:
            assert cluster.subnet == split_star.subnet
            sums_right(cluster, split_star.hosts)
    finally:
        no_leaks_on(split_star)


@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_ring_with_the_notebook_on_one_mac(
    ip: Any, ring_with_head: Any, tmp_path: Path, backend: str
) -> None:
    hostfile = ring_with_head.cabled_hostfile(tmp_path / "ring.json", backend)
    try:
        with start(ip, ring_with_head, hostfile, "--no-live-status") as cluster:
            assert cluster.placement.hosts[0].is_local
            sums_right(cluster, [socket.gethostname(), *ring_with_head.hosts])
            if backend == "ring":
                cluster.view.execute(RING_PEERS)
                for peers in cluster.view["peers"]:
                    assert peers and all(p.startswith("10.77.72.") for p in peers)
    finally:
        no_leaks_on(ring_with_head)


def test_star_with_the_notebook_on_the_master(ip: Any, star_with_head: Any, tmp_path: Path) -> None:
    hostfile = star_with_head.cabled_hostfile(tmp_path / "star.json", "mpi")
    try:
        with start(ip, star_with_head, hostfile, "--no-live-status") as cluster:
            # The head bridges every cable: control and MPI stay on the cables.
            assert cluster.controller_ip == star_with_head.cable_ips(0)[0]
            assert cluster.subnet == "10.77.73.0/24"
            sums_right(cluster, [socket.gethostname(), *star_with_head.hosts])
    finally:
        no_leaks_on(star_with_head)
