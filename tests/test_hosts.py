"""Hostfile parsing and rank placement, on the formats mlx.launch and Open MPI use."""

from __future__ import annotations

import json
import os

import pytest

from mlx_cluster_magic.errors import MLXClusterError
from mlx_cluster_magic.hosts import (
    check_backend,
    local,
    parse_host_list,
    parse_hostfile_text,
    read_hostfile,
    with_ranks_per_host,
)

LIST_FORM = json.dumps(
    [
        {"ssh": "mac1", "ips": ["10.0.1.1"]},
        {"ssh": "mac2", "ips": ["10.0.1.2"]},
        {"ssh": "mac3", "ips": ["10.0.1.3"]},
    ]
)

# The shape mlx.distributed_config writes (backend, envs, hosts with rdma rows).
FULL_FORM = json.dumps(
    {
        "backend": "jaccl",
        "envs": ["MLX_METAL_FAST_SYNCH=1"],
        "hosts": [
            {"ssh": "m1", "ips": ["192.168.0.1"], "rdma": [None, "rdma_en5"]},
            {"ssh": "m2", "ips": ["192.168.0.2"], "rdma": ["rdma_en5", None]},
        ],
    }
)


def test_list_form_keeps_hostfile_order() -> None:
    p = parse_hostfile_text(LIST_FORM)
    assert [h.ssh for h in p.ranks] == ["mac1", "mac2", "mac3"]
    assert p.hosts[1].ips == ("10.0.1.2",)
    assert p.size == 3 and not p.is_local


def test_full_form_backend_envs_and_rdma() -> None:
    p = parse_hostfile_text(FULL_FORM)
    assert p.backend == "jaccl"
    assert p.envs == {"MLX_METAL_FAST_SYNCH": "1"}
    assert p.hosts[0].rdma == (None, "rdma_en5")


def test_openmpi_hostfile_slots_and_comments() -> None:
    p = parse_hostfile_text("# lab\nmac1 slots=2\n\nmac2 slots=1  # small one\n10.0.0.9\n")
    assert [h.ssh for h in p.ranks] == ["mac1", "mac1", "mac2", "10.0.0.9"]
    assert p.hosts[2].ips == ("10.0.0.9",)


def test_ranks_per_host_and_local_index() -> None:
    p = with_ranks_per_host(parse_host_list("a,b"), 2)
    assert [h.ssh for h in p.ranks] == ["a", "a", "b", "b"]
    assert [p.local_index(r) for r in range(4)] == [0, 1, 0, 1]


def test_hosts_with_ip() -> None:
    p = parse_host_list("mac1=10.0.0.1, mac2=10.0.0.2")
    assert [h.address for h in p.hosts] == ["10.0.0.1", "10.0.0.2"]


def test_local_placement() -> None:
    p = local(3)
    assert p.is_local and p.size == 3 and p.local_index(2) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"ssh": "a"},', "malformed JSON at line 1"),
        ("", "empty"),
        ("[]", "no hosts"),
        ('{"backend": "mpi"}', 'needs a "hosts" list'),
        ('[{"ips": ["10.0.0.1"]}]', 'missing "ssh"'),
        ('[{"ssh": "a", "ips": ["10.0.0.300"]}]', "not an IP address"),
        (
            '[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.1"]}]',
            "ip 10.0.0.1 is given for both",
        ),
        ('[{"ssh": "a"}, {"ssh": "a"}]', "listed twice"),
        ('[{"ssh": "a", "port": 22}]', "unknown key"),
        ('{"backend": "nccl", "hosts": ["a"]}', "unknown backend 'nccl'"),
        ('{"envs": ["NOEQUALS"], "hosts": ["a"]}', "NAME=value"),
        ("mac1 slots=x\n", "slots must be a positive number"),
        ("mac1 cpus=2\n", "unknown option"),
        ('[{"ssh": "bad host"}]', "not a valid host name"),
    ],
)
def test_bad_hostfiles_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(MLXClusterError, match=message) as e:
        parse_hostfile_text(text)
    assert "\n" not in str(e.value)


def test_malformed_json_names_line_and_column() -> None:
    with pytest.raises(MLXClusterError, match=r"line 3 column 1"):
        parse_hostfile_text('[\n {"ssh": "a"}\n')


def test_read_hostfile_errors(tmp_path) -> None:
    with pytest.raises(MLXClusterError, match="not found"):
        read_hostfile(tmp_path / "nope.json")
    with pytest.raises(MLXClusterError, match="is a directory"):
        read_hostfile(tmp_path)
    f = tmp_path / "h.json"
    f.write_text(LIST_FORM)
    assert read_hostfile(f).size == 3
    if os.geteuid() != 0:  # root reads anything
        f.chmod(0)
        with pytest.raises(MLXClusterError, match="not readable"):
            read_hostfile(f)


def test_n_must_fit_declared_slots() -> None:
    p = parse_hostfile_text("mac1 slots=2\nmac2 slots=2\n")
    assert with_ranks_per_host(p, 2).size == 4
    with pytest.raises(MLXClusterError, match="-n 3 does not fit: host 'mac1' has 2 slot"):
        with_ranks_per_host(p, 3)


@pytest.mark.parametrize("n", [0, -1, "2", 2.0, True])
def test_bad_rank_counts(n: object) -> None:
    with pytest.raises(MLXClusterError, match="-n must be"):
        local(n)  # type: ignore[arg-type]


def test_unknown_backend() -> None:
    assert check_backend("ring") == "ring"
    with pytest.raises(MLXClusterError, match="use one of mpi, ring, jaccl, any"):
        check_backend("gloo")
