"""The same notebook workflow on three virtual Macs over ssh: mpi and ring backends."""

from __future__ import annotations

import json
import sys

import psutil
import pytest

from mlx_cluster_magic import MLXCluster, MLXClusterError

pytestmark = pytest.mark.multihost

COLLECTIVES = """
import socket
host = socket.gethostname()
s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * (world.rank() + 1)).tolist()
g = mx.distributed.all_gather(mx.array([world.rank()])).tolist()
peer = (world.rank() + 1) % world.size()
src = (world.rank() - 1) % world.size()
sent = mx.distributed.send(mx.array([100 + world.rank()]), peer)
mx.eval(sent)
got = mx.distributed.recv_like(mx.array([0]), src).item()
print(f"rank {world.rank()} on {host}")
"""


@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_collectives_across_three_hosts(vhosts, no_vhost_leaks, tmp_path, backend, capsys) -> None:
    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    cluster = MLXCluster(hostfile=hostfile, backend=backend, ssh=vhosts.rsh_agent, timeout=60)
    with cluster:
        assert cluster.controller_ip == vhosts.head_ip
        assert [r["host"] for r in cluster.ranks] == ["mac1", "mac2", "mac3"]
        assert cluster.view.targets == [0, 1, 2]
        assert [r["mpi_rank"] for r in cluster.ranks] == [0, 1, 2]
        cluster.view.execute(COLLECTIVES)
        assert cluster.view["host"] == ["mac1", "mac2", "mac3"]
        assert cluster.view["s"] == [[0.0, 6.0, 12.0, 18.0]] * 3
        assert cluster.view["g"] == [[0, 1, 2]] * 3
        assert cluster.view["got"] == [102, 100, 101]
        # each rank's output can be told apart by host
        result = cluster.view.execute("print(host)", block=True)
        assert [o.strip() for o in result.stdout] == ["mac1", "mac2", "mac3"]
    assert not cluster.running


def test_two_ranks_per_host_keep_hostfile_order(vhosts, no_vhost_leaks, tmp_path) -> None:
    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    with MLXCluster(2, hostfile=hostfile, ssh=vhosts.rsh_agent, live_status=False) as cluster:
        assert [r["host"] for r in cluster.ranks] == [
            "mac1",
            "mac1",
            "mac2",
            "mac2",
            "mac3",
            "mac3",
        ]
        cluster.view.execute("t = mx.distributed.all_sum(mx.array(1.0)).item()")
        assert cluster.view["t"] == [6.0] * 6


def test_forwarded_by_name_and_pinned_to_the_subnet(vhosts, no_vhost_leaks, tmp_path) -> None:
    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    with MLXCluster(hostfile=hostfile, ssh=vhosts.rsh_agent) as cluster:
        cmd = cluster.mpiexec_command()
        assert "-x IPP_CONNECTION_INFO" in cmd
        assert "IPP_CONNECTION_INFO=" not in cmd
        assert f"--mca btl_tcp_if_include {vhosts.subnet}" in cmd
        assert f"--mca oob_tcp_if_include {vhosts.subnet}" in cmd
        assert "--host mac1:1,mac2:1,mac3:1" in cmd
        key = cluster.client.session.key.decode()
        assert len(key) >= 16
        for pid in psutil.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    assert key.encode() not in f.read(), f"HMAC key on the command line of {pid}"
            except OSError:
                continue


def test_unknown_host_fails_fast_and_leaves_nothing(vhosts, no_vhost_leaks, tmp_path) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(
        json.dumps(
            [
                {"ssh": "mac1", "ips": [vhosts.ips[0]]},
                {"ssh": "nosuchmac", "ips": ["10.213.2.99"]},
            ]
        )
    )
    cluster = MLXCluster(hostfile=hostfile, ssh=vhosts.rsh_agent, timeout=30)
    with pytest.raises(MLXClusterError) as e:
        cluster.start()
    assert "nosuchmac" in str(e.value)
    assert not cluster.running


def test_python_missing_on_hosts(vhosts, no_vhost_leaks, tmp_path) -> None:
    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    cluster = MLXCluster(
        hostfile=hostfile, ssh=vhosts.rsh_agent, python="/nonexistent/python3", timeout=30
    )
    with pytest.raises(MLXClusterError, match="/nonexistent/python3"):
        cluster.start()
    assert sys.executable != "/nonexistent/python3"


def test_host_python_without_mlx_is_named_before_launch(vhosts, no_vhost_leaks, tmp_path) -> None:
    import subprocess

    bare = "/usr/bin/python3"
    probe = subprocess.run([bare, "-c", "import mlx"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{bare} has mlx")
    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    cluster = MLXCluster(hostfile=hostfile, ssh=vhosts.rsh_agent, python=bare)
    with pytest.raises(MLXClusterError, match=r"^mac1: mlx: .*fix: .*pip install") as e:
        cluster.start()
    assert "\n" not in str(e.value)


def test_doctor_magic_green_on_healthy_hosts(ip, vhosts, tmp_path) -> None:
    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    report = ip.run_line_magic(
        "mlx_cluster", f"doctor --hostfile {hostfile} --ssh '{vhosts.rsh_agent}' --timeout 10"
    )
    assert [r.host for r in report.rows] == ["mac1", "mac2", "mac3"]
    assert report.ok, repr(report)
    assert "mac2" in report._repr_html_()
