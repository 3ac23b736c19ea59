"""Hostfile parsing and rank placement, on the formats mlx.launch and Open MPI use."""

from __future__ import annotations

import json
import os

import pytest

from mlx_cluster_magic.errors import MLXClusterError
from mlx_cluster_magic.fabric.placement import (
    check_backend,
    local,
    parse_host_list,
    parse_hostfile_text,
    read_hostfile,
    with_ranks_per_host,
    write_hostfile,
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
    with pytest.raises(MLXClusterError, match="use one of mpi, ring, jaccl, jaccl-ring, any"):
        check_backend("gloo")


# --------------------------------------------------------------------------- MLX's own forms

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hostfiles")


def fixture(name: str):
    return read_hostfile(os.path.join(FIXTURES, name))


def test_every_form_mlx_writes_is_read() -> None:
    names = sorted(f for f in os.listdir(FIXTURES) if f.endswith(".json"))
    assert len(names) == 9
    for name in names:
        p = fixture(name)
        assert p.size == len(p.hosts) and p.size >= 2, name


def test_ethernet_form_has_an_empty_backend() -> None:
    p = fixture("ethernet-3.json")
    assert p.backend is None  # MLX writes "" when no backend was chosen
    assert p.envs == {"MLX_METAL_FAST_SYNCH": "1"}
    assert p.hosts[0].rdma == ()


def test_ring_forms_one_subnet_per_cable() -> None:
    p = fixture("ring-4.json")
    assert p.backend == "ring"
    assert [h.ips for h in p.hosts] == [
        ("192.168.0.5",),
        ("192.168.0.2",),
        ("192.168.0.10",),
        ("192.168.0.14",),
    ]
    assert [len(h.ips) for h in fixture("ring-4-two-cables.json").hosts] == [2, 2, 2, 2]


def test_jaccl_ring_form_with_device_lists() -> None:
    p = fixture("jaccl-ring-4-two-cables.json")
    assert p.backend == "jaccl-ring"
    assert p.hosts[0].rdma == (None, ("rdma_en1", "rdma_en3"), None, ("rdma_en2", "rdma_en4"))
    assert fixture("jaccl-ring-4.json").hosts[3].rdma == ("rdma_en2", None, "rdma_en1", None)
    assert fixture("jaccl-2-two-cables.json").hosts[1].rdma[0] == ("rdma_en1", "rdma_en2")
    assert check_backend("jaccl-ring") == "jaccl-ring"


@pytest.mark.parametrize("cell", ["", [], [None], ["rdma_en1", 3], 5, {"a": 1}])
def test_bad_rdma_cells(cell: object) -> None:
    text = json.dumps([{"ssh": "a", "rdma": [None, cell]}, {"ssh": "b"}])
    with pytest.raises(MLXClusterError, match='"rdma" cell .* must be null, a device name or'):
        parse_hostfile_text(text)


@pytest.mark.parametrize(
    "name",
    [
        "ethernet-3.json",
        "ring-4-two-cables.json",
        "jaccl-ring-4-two-cables.json",
        "jaccl-3.json",
    ],
)
def test_written_hostfiles_match_mlx_byte_for_byte(tmp_path, name: str) -> None:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        original = f.read()
    out = write_hostfile(tmp_path / name, fixture(name))
    assert out.read_text().rstrip("\n") == original.rstrip("\n")
    assert read_hostfile(out) == fixture(name)


def test_write_entries_list_and_full_form(tmp_path) -> None:
    entries = [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]
    plain = write_hostfile(tmp_path / "a.json", entries)
    assert json.loads(plain.read_text()) == entries
    full = write_hostfile(tmp_path / "b.json", entries, backend="ring", envs=["A=1"])
    p = read_hostfile(full)
    assert p.backend == "ring" and p.envs == {"A": "1"}
    with pytest.raises(MLXClusterError, match="not an IP address"):
        write_hostfile(tmp_path / "c.json", [{"ssh": "mac1", "ips": ["nope"]}])
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(
    "parse",
    [
        lambda name: parse_hostfile_text(f"{name} slots=1\n"),
        lambda name: parse_hostfile_text(json.dumps([{"ssh": name, "ips": ["10.0.0.1"]}])),
        lambda name: parse_hostfile_text(json.dumps({"hosts": [name]})),
        lambda name: parse_host_list(f"mac1,{name}"),
        lambda name: parse_host_list(f"{name}=10.0.0.2"),
    ],
)
@pytest.mark.parametrize("name", ["-oProxyCommand=touch${IFS}/tmp/x", "-oProxyCommand", "me@-F"])
def test_a_host_name_ssh_would_take_as_an_option_is_refused(parse: object, name: str) -> None:
    """``ssh -oProxyCommand=...`` runs a command: a hostfile or ``--hosts`` never hands ssh a
    host name that starts with ``-``."""
    with pytest.raises(MLXClusterError) as e:
        parse(name)  # type: ignore[operator]
    msg = str(e.value)
    assert "\n" not in msg and "starts with '-'" in msg and "real name" in msg, msg
