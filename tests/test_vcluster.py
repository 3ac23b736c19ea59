"""The virtual cluster fixture really behaves like several Macs on a bridge.

These tests need root, iproute2 and openssh-server; they skip otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import virtual_macs
from vcluster import VirtualCluster, skip_reason

pytestmark = pytest.mark.multihost

VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"
LIBMPI = Path(sys.prefix) / "lib" / "libmpi.so.40"

# Each rank contributes (rank + 1) * [0, 1, 2, 3]; with 3 ranks the sum is 6 * that.
ALL_SUM = """
import socket
import mlx.core as mx
g = mx.distributed.init(backend="mpi", strict=True)
x = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * (g.rank() + 1))
mx.eval(x)
print("RESULT", socket.gethostname(), g.rank(), g.size(), x.tolist(), flush=True)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[VirtualCluster]:
    with virtual_macs(3, "10.213.0.0/24", "mcm") as vc:
        yield vc


def _connects(ip: str, port: int = 22, timeout: float = 0.5) -> bool:
    try:
        socket.create_connection((ip, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def test_each_host_answers_ssh_with_its_own_hostname(cluster: VirtualCluster) -> None:
    for host, ip in zip(cluster.hosts, cluster.ips, strict=True):
        for name in (host, ip):
            r = cluster.ssh(name, "hostname")
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == host


def test_hosts_reach_each_other_over_the_bridge(cluster: VirtualCluster) -> None:
    hosts = cluster.hosts
    for i, host in enumerate(hosts):
        peer = hosts[(i + 1) % len(hosts)]
        # ssh from one "Mac" to the next, as PRRTE's tree spawn may do.
        r = cluster.ssh(host, f"ssh -F {cluster.ssh_config} {peer} hostname")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == peer
    probe = f"</dev/tcp/{cluster.head_ip}/22"
    r = cluster.netns_exec(hosts[0], "timeout", "3", "bash", "-c", probe)
    # Connected, or "connection refused" (no sshd on the head): either way it answered.
    assert r.returncode == 0 or "refused" in r.stderr, r.stderr


def test_hostfile_lists_hosts_and_ips(cluster: VirtualCluster, tmp_path: Path) -> None:
    path = cluster.hostfile(tmp_path / "hosts.json")
    assert json.loads(path.read_text()) == [
        {"ssh": h, "ips": [ip]} for h, ip in zip(cluster.hosts, cluster.ips, strict=True)
    ]
    mpi = cluster.hostfile(tmp_path / "hosts.txt", form="mpi")
    assert mpi.read_text().split("\n")[0] == f"{cluster.ips[0]} slots=1"


@pytest.mark.skipif(not MPIEXEC.exists(), reason="Open MPI's mpiexec not in the venv")
def test_mpiexec_mlx_all_sum_across_three_hosts(cluster: VirtualCluster, tmp_path: Path) -> None:
    script = tmp_path / "all_sum.py"
    script.write_text(ALL_SUM)
    cmd = [
        str(MPIEXEC),
        *cluster.mpiexec_args(prted=VENV_BIN / "prted"),
        "-x",
        "MLX_MPI_LIBNAME",
        "--host",
        ",".join(f"{h}:1" for h in cluster.hosts),
        "-n",
        "3",
        sys.executable,
        str(script),
    ]
    env = {**os.environ, "MLX_MPI_LIBNAME": str(LIBMPI)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = sorted(ln.split(" ", 4)[1:] for ln in r.stdout.splitlines() if "RESULT" in ln)
    expected = "[0.0, 6.0, 12.0, 18.0]"
    assert lines == [[h, str(i), "3", expected] for i, h in enumerate(cluster.hosts)]


def test_cable_down_cuts_one_host_only(cluster: VirtualCluster) -> None:
    host, other = cluster.hosts[-1], cluster.hosts[0]
    cluster.cable_down(host)
    try:
        assert not _connects(cluster.ip(host))
        assert _connects(cluster.ip(other))
    finally:
        cluster.cable_up(host)
    deadline = time.monotonic() + 10
    while not _connects(cluster.ip(host)):
        assert time.monotonic() < deadline, f"{host} did not come back"
        time.sleep(0.1)
    assert cluster.ssh(host, "hostname").stdout.strip() == host


def test_shape_rate_limits_every_cable(cluster: VirtualCluster) -> None:
    cluster.shape(rate="16gbit")
    try:
        for veth in cluster.veths:
            out = subprocess.run(
                ["tc", "qdisc", "show", "dev", veth], capture_output=True, text=True
            ).stdout
            assert "tbf" in out and "16Gbit" in out
        assert cluster.ssh(cluster.hosts[0], "hostname").returncode == 0
    finally:
        cluster.unshape()


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (killed orphans may stay ones)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Starts a cluster and exits without stop(), like a test run that was killed.
CRASH = """
import json, sys
from vcluster import VirtualCluster
vc = VirtualCluster(2, subnet="10.213.1.0/24", prefix="mcmt").start()
stray = vc.ssh(vc.hosts[0], "nohup sleep 300 >/dev/null 2>&1 & echo $!").stdout
print(json.dumps([*vc.sshd_pids, int(stray)]))
"""


def test_restart_after_crash_and_stop_leave_nothing() -> None:
    """A second cluster (own names and subnet) cleans up after a crashed run."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    vc = VirtualCluster(2, subnet="10.213.1.0/24", prefix="mcmt")
    try:
        crash = subprocess.run(
            [sys.executable, "-c", CRASH],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert crash.returncode == 0, crash.stderr
        old_pids = json.loads(crash.stdout)
        assert all(_running(p) for p in old_pids)  # sshds and a stray "rank" live on

        vc.start()
        assert not any(_running(p) for p in old_pids)
        assert vc.ssh(vc.hosts[1], "hostname").stdout.strip() == vc.hosts[1]
        new_pids = list(vc.sshd_pids)
    finally:
        vc.stop()
    assert vc.leftovers() == []
    assert not _netns_names() & set(vc.namespaces)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()}
    assert not names & {vc.bridge, *vc.veths}
    assert not any(_running(p) for p in new_pids)
    assert not vc.dir.exists()


# --------------------------------------------------------------------------- point to point

REACH = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=1).close()
except ConnectionRefusedError:
    print("reached")
except OSError as e:
    print("unreachable", e.errno)
"""


def _probe(vc: VirtualCluster | None, host: str | None, ip: str) -> str:
    """ "reached" when ``ip`` answers (a refusal counts) from ``host`` (None: the head)."""
    cmd = [sys.executable, "-c", REACH, ip]
    if vc is not None and host is not None:
        return vc.netns_exec(host, *cmd).stdout.strip()
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()


def test_point_to_point_cables_one_subnet_each() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    vc = VirtualCluster(
        4, subnet="10.77.3.0/24", prefix="fabt", cables="ring", cable_subnet="10.77.66.0/24"
    )
    try:
        vc.start()
        assert vc.cables == [(0, 1), (1, 2), (2, 3), (3, 0)]
        assert vc.cable_ips(0) == ("10.77.66.1", "10.77.66.2")
        assert vc.cable_ip("mac1", "mac4") == "10.77.66.14"
        addrs = vc.netns_exec("mac1", "ip", "-br", "addr").stdout
        assert "tb2" in addrs and "10.77.66.1/30" in addrs and "10.77.66.14/30" in addrs
        # Neighbours reach each other over their cable; mac1 and mac3 share none.
        assert _probe(vc, "mac1", vc.cable_ip("mac2", "mac1")) == "reached"
        assert _probe(vc, "mac1", vc.cable_ip("mac3", "mac2")).startswith("unreachable")
        # The head has no address on a cable: refused locally, never sent off the machine.
        assert _probe(None, None, "10.77.66.2") == "unreachable 113"
        # ssh goes over the management network.
        assert vc.ssh("mac3", "hostname").stdout.strip() == "mac3"
        ring = vc.mlx_config("ring")
        assert [h["ips"] for h in ring["hosts"]] == [
            ["10.77.66.14"],
            ["10.77.66.2"],
            ["10.77.66.6"],
            ["10.77.66.10"],
        ]
        jr = vc.mlx_config("jaccl-ring")
        assert jr["hosts"][0]["rdma"] == [None, "rdma_tb2", None, "rdma_tb4"]
        assert vc.mlx_config("ethernet")["backend"] == ""
        vc.shape_cable(1, "100mbit")
        out = vc.netns_exec("mac2", "tc", "qdisc", "show", "dev", "tb3").stdout
        assert "tbf" in out and "100Mbit" in out
        vc.unshape()
        assert "tbf" not in vc.netns_exec("mac2", "tc", "qdisc", "show", "dev", "tb3").stdout
    finally:
        vc.stop()
    assert vc.leftovers() == []
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert "10.77.66.0/24" not in routes
