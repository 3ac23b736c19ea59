"""The same notebook workflow on three virtual Macs over ssh: mpi and ring backends."""

from __future__ import annotations

import json
import sys
import time

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


@pytest.fixture(scope="class")
def shared_on(vhosts, tmp_path_factory):
    """``shared_on(backend)``: one started cluster per backend on the virtual Macs, for the class
    below; both are stopped and the hosts checked for leftovers when the class ends."""
    hostfile = vhosts.hostfile(tmp_path_factory.mktemp("shared") / "hosts.json")
    started: dict[str, MLXCluster] = {}

    def cluster(backend: str) -> MLXCluster:
        if backend not in started:
            started[backend] = MLXCluster(
                hostfile=hostfile, backend=backend, ssh=vhosts.rsh_agent, timeout=60
            ).start()
        return started[backend]

    yield cluster
    for c in started.values():
        c.stop()
        assert not c.running
    from conftest import our_processes, vhost_pids

    deadline = time.monotonic() + 10
    while our_processes(vhost_pids(vhosts)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert our_processes(vhost_pids(vhosts)) == []


class TestSharedClusters:
    """Tests that only use a healthy cluster share one per backend (a start on the virtual hosts
    takes about 5 s); the class's fixture stops both and checks nothing is left, before the
    tests that break or reshape their own cluster."""

    @pytest.mark.parametrize("backend", ["mpi", "ring"])
    def test_collectives_across_three_hosts(self, shared_on, vhosts, backend) -> None:
        cluster = shared_on(backend)
        assert cluster.backend == backend
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

    def test_forwarded_by_name_and_pinned_to_the_subnet(self, shared_on, vhosts) -> None:
        cluster = shared_on("mpi")
        cmd = cluster.mpiexec_command()
        # the connection (HMAC key) reaches the hosts over ssh, never in mpiexec's environment
        assert "IPP_CONNECTION_INFO" not in cmd
        assert "-x MLX_CLUSTER_SECRETS_FILE" in cmd
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

    def test_broadcast_across_hosts(self, shared_on) -> None:
        import numpy as np

        cluster = shared_on("mpi")
        arr = np.arange(3_000_000, dtype=np.float32)
        cluster.broadcast("w", arr)
        cluster.view.execute("import numpy as np\ns = float(np.asarray(w, dtype=np.float64).sum())")
        assert cluster.view["s"] == [float(arr.astype(np.float64).sum())] * 3

    def test_status_and_sockets_on_virtual_hosts(self, shared_on, vhosts) -> None:
        import re
        import subprocess

        cluster = shared_on("ring")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            nodes = cluster.nodes()
            if all(n["state"] == "idle" for n in nodes):
                break
            time.sleep(0.2)
        assert [n["host"] for n in nodes] == ["mac1", "mac2", "mac3"]
        assert [n["state"] for n in nodes] == ["idle"] * 3
        # the head's sockets (controller, status) bind the bridge IP, or loopback if internal
        me = psutil.Process()
        pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
        ours = [
            ln.split()[3]
            for ln in out.splitlines()
            if any(int(p) in pids for p in re.findall(r"pid=(\d+)", ln)) and "python" in ln
        ]
        assert any(a.startswith(f"{vhosts.head_ip}:") for a in ours), ours
        assert all(a.startswith((f"{vhosts.head_ip}:", "127.0.0.1:")) for a in ours), ours
        for host, ip in zip(vhosts.hosts, vhosts.ips):
            # the ring's connections run over each host's own hostfile IP
            conns = vhosts.netns_exec(host, "ss", "-Htnp", "state", "established").stdout
            ring = [
                ln.split()[2:4] for ln in conns.splitlines() if "python" in ln and ":3232" in ln
            ]
            assert ring and all(
                local.startswith(f"{ip}:") and peer.startswith("10.213.2.") for local, peer in ring
            ), (host, ring)
            # the engines' ZMQ sockets bind loopback; the only wildcard listener is Open MPI's
            # TCP BTL (ports from 1024), whose traffic btl_tcp_if_include pins to the subnet
            listen = vhosts.netns_exec(host, "ss", "-Hltnp").stdout
            engine = [ln.split()[3] for ln in listen.splitlines() if "python" in ln]
            exposed = [
                a
                for a in engine
                if not a.startswith("127.0.0.1:") and not 1024 <= int(a.rsplit(":", 1)[1]) < 1100
            ]
            assert exposed == [], (host, engine)

    def test_soak_collective_cells_on_three_hosts(self, shared_on) -> None:
        import gc
        import os

        from IPython.core.interactiveshell import InteractiveShell

        ip = InteractiveShell.instance()
        cells = int(os.environ.get("MLX_CLUSTER_SOAK_CELLS", "500"))
        cluster = shared_on("mpi")
        cluster.activate()
        me = psutil.Process()
        rss = {}
        for i in range(1, cells + 1):
            ip.run_cell_magic(
                "px", "--no-stream", f"s = mx.distributed.all_sum(mx.array({i})).item()"
            )
            if i in (50, cells):
                gc.collect()
                rss[i] = me.memory_info().rss
        assert cluster.view["s"] == [3.0 * cells] * 3
        growth = rss[cells] / rss[50] - 1
        print(
            f"soak: {cells} cells, kernel RSS {rss[50] >> 20} MiB at cell 50, "
            f"{rss[cells] >> 20} MiB at cell {cells} ({growth:+.1%})"
        )
        assert growth < 0.05


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
    # stop returns once the hub has heard every rank's nanny say goodbye: none lingers (3 s, its
    # socket's LINGER) on its host
    from conftest import our_processes, vhost_pids

    deadline = time.monotonic() + 0.5
    while our_processes(vhost_pids(vhosts)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert our_processes(vhost_pids(vhosts)) == []


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


def test_backend_unavailable_on_the_hosts_is_found_before_launch(
    vhosts, no_vhost_leaks, tmp_path
) -> None:
    hostfile = tmp_path / "hosts.json"
    n = len(vhosts.hosts)
    hostfile.write_text(
        json.dumps(
            {
                "backend": "jaccl",
                "hosts": [
                    {
                        "ssh": h,
                        "ips": [ip],
                        "rdma": [None if j == i else f"rdma_en{j + 2}" for j in range(n)],
                    }
                    for i, (h, ip) in enumerate(zip(vhosts.hosts, vhosts.ips))
                ],
            }
        )
    )
    cluster = MLXCluster(hostfile=hostfile, ssh=vhosts.rsh_agent)
    assert cluster.backend == "jaccl"
    with pytest.raises(
        MLXClusterError, match=r"^mac1: backend: MLX's jaccl backend is not available"
    ):
        cluster.start()
    assert not cluster.running


def test_cable_pulled_mid_cell_ends_the_cell_naming_the_host(ip, vhosts, tmp_path) -> None:
    import threading
    import time

    from IPython.core.error import UsageError

    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    cluster = ip.run_line_magic(
        "mlx_cluster", f"start --hostfile {hostfile} --ssh '{vhosts.rsh_agent}'"
    )
    timer = threading.Timer(1.0, vhosts.cable_down, args=("mac2",))
    timer.start()
    t = time.monotonic()
    try:
        with pytest.raises(
            UsageError,
            match=r"^mac2 cannot be reached: not from the notebook, nor from mac1, mac3 \(tried "
            r"10\.213\.2\.12:22\): a pulled cable or a Mac that slept; the cell ended .*"
            r"restart --without mac2 starts on the others",
        ):
            ip.run_cell_magic("px", "", "import time\ntime.sleep(60)")
        assert time.monotonic() - t - 1.0 < 10
        assert not cluster.running
        # the lost Mac's rank reads dead; the two the cluster stopped on purpose, stopped
        assert [n.state for n in cluster.last_nodes] == ["stopped", "dead", "stopped"]
    finally:
        timer.join()
        vhosts.cable_up("mac2")
    # once the cable is back, the orphaned rank on mac2 notices and exits
    from conftest import our_processes, vhost_pids

    deadline = time.monotonic() + 30
    while our_processes(vhost_pids(vhosts)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert our_processes(vhost_pids(vhosts)) == []
    ip.run_line_magic("mlx_cluster", "restart")
    ip.run_cell_magic("px", "", "ok = mx.distributed.all_sum(mx.array(1.0)).item()")
    assert cluster.view["ok"] == [3.0] * 3


def test_head_as_one_of_the_hosts_and_remote_workdir(vhosts, no_vhost_leaks, tmp_path) -> None:
    import socket

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(
        json.dumps(
            [{"ssh": "head", "ips": [vhosts.head_ip]}]
            + [{"ssh": h, "ips": [ip]} for h, ip in zip(vhosts.hosts[:2], vhosts.ips[:2])]
        )
    )
    with MLXCluster(hostfile=hostfile, ssh=vhosts.rsh_agent, workdir="/tmp") as cluster:
        assert [r["host"] for r in cluster.ranks] == [socket.gethostname(), "mac1", "mac2"]
        cluster.view.execute(
            "import os\ncwd = os.getcwd()\nt = mx.distributed.all_sum(mx.array(2.0)).item()"
        )
        assert cluster.view["t"] == [6.0] * 3
        assert cluster.view["cwd"] == ["/tmp"] * 3
