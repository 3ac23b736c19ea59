"""``%mlx_cluster network`` on virtual Macs unpacked as macOS ships them: ssh works, the
Thunderbolt ports sit in the Thunderbolt Bridge without addresses, and macOS's own commands
(system_profiler, networksetup, ifconfig, netstat, sudo, sw_vers, ibv_devices) print their
real formats and apply what they are told to the namespace's veths (tests/macos_shims.py,
generated from the captures in tests/fixtures/macos/).

- a ring of four, one cable through a device between two Macs, one Mac on a LAN that the
  pool's first subnet would collide with: the bridged ring named as a loop, a star over it
  refused, ``--configure`` from the notebook, the hostfile checked by the doctor, then
  ``start --hostfile`` and a right ``all_sum`` over the cables; the addresses back after a
  reboot; ``--undo``;
- a mesh of three with RDMA (jaccl), one Mac without passwordless sudo: commands printed,
  nothing changed, nothing waits; pasted, then the same cell again; ``--over lan``;
- a star of one master and three: the master's bridge, mpi.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic import MLXCluster

from conftest import cabled_macs

pytestmark = pytest.mark.multihost

RING_PORT = 31990
SUM = (
    "s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * (world.rank() + 1)).tolist()\n"
    "import socket; host = socket.gethostname()\n"
)
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
def ring() -> Iterator[Any]:
    """Four Macs in a ring; mac2 reaches mac3 through a device; mac1 is also on a LAN."""
    options = {"mac2": {"dock": ["mac3"]}, "mac1": {"lan": "10.91.60.20/24"}}
    with cabled_macs(4, "ring", "10.91.1.0/24", "10.91.60.0/22", "netnr", macos=options) as vc:
        yield vc


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    """Three Macs, every pair cabled, RDMA on (macOS 26.2); mac3 asks for a sudo password."""
    on = {"macos": "26.2", "rdma": True}
    options = {"mac1": on, "mac2": on, "mac3": {**on, "sudo": False}}
    with cabled_macs(3, "mesh", "10.91.2.0/24", "10.91.64.0/24", "netnm", macos=options) as vc:
        yield vc


@pytest.fixture(scope="module")
def star() -> Iterator[Any]:
    """mac1 cabled to three others, its ports in its Thunderbolt Bridge."""
    with cabled_macs(
        4, "star", "10.91.3.0/24", "10.91.65.0/24", "netns", bridged=True, macos=True
    ) as vc:
        yield vc


def line(vc: Any, *words: str) -> str:
    return " ".join([*words, "--ssh", shlex.quote(vc.rsh_agent)])


def ifconfig(vc: Any, host: str, device: str) -> str:
    done = vc.ssh(host, f"ifconfig {device}")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_ring_from_ssh_to_a_right_all_sum(ip: Any, ring: Any, tmp_path: Path) -> None:
    hosts = "--hosts mac1,mac2,mac3,mac4 --subnets 10.91.60.0/22"
    seen = ip.run_line_magic("mlx_cluster", line(ring, "network", hosts))
    text = str(seen)
    assert "ring: complete: mac1-mac2-mac3-mac4-mac1" in text
    assert "mac2 Thunderbolt 2 (en2) -- mac3 Thunderbolt 1 (en1)  80 Gb/s  Envoy Ultra" in text
    assert text.count("a layer-2 loop, a broadcast storm") == 4  # each Mac bridges its two
    assert "<svg" in seen._repr_html_() and "en1/en1" in seen.picture()
    assert "mac2 - mac3 (en2/en1 through Envoy Ultra)" in seen.picture()
    # a star over the bridges of a ring is refused, with the per-cable plan as the fix
    with pytest.raises(UsageError, match=r"broadcast storm\): use --layout ring") as refused:
        ip.run_line_magic("mlx_cluster", line(ring, "network", hosts, "--configure --layout star"))
    assert "\n" not in str(refused.value)
    hostfile = tmp_path / "hosts.json"
    done = ip.run_line_magic(
        "mlx_cluster", line(ring, "network", hosts, "--configure --write", str(hostfile))
    )
    assert done.applied and "doctor: every Mac reaches its peers" in str(done), str(done)
    # the LAN's 10.91.60.0/24 (mac1's en0) is skipped: the first free /30 comes after it
    nets = {str(a.network) for a in done.plan.assignments}
    assert len(nets) == 4 and all(n.startswith("10.91.61.") for n in nets), nets
    assert re.findall(r"member: (\S+)", ifconfig(ring, "mac1", "bridge0")) == []
    written = json.loads(hostfile.read_text())
    assert written["backend"] == "ring"
    assert [h["ips"][0] for h in written["hosts"]] == [
        done.plan.address(0, 3), done.plan.address(1, 0), done.plan.address(2, 1),
        done.plan.address(3, 2),
    ]  # fmt: skip
    cluster = ip.run_line_magic("mlx_cluster", ring.start_line(hostfile, ring_port=RING_PORT))
    assert isinstance(cluster, MLXCluster) and cluster.backend == "ring"
    with cluster:
        cluster.view.execute(SUM + RING_PEERS)
        assert cluster.view["s"] == [[0.0, 10.0, 20.0, 30.0]] * 4
        assert cluster.view["host"] == ring.hosts
        for peers in cluster.view["peers"]:
            assert peers and all(p.startswith("10.91.61.") for p in peers), peers
    _persists_and_undoes(ip, ring, hostfile, hosts, done.plan.address(0, 1) or "")


def _persists_and_undoes(ip: Any, ring: Any, hostfile: Path, hosts: str, address: str) -> None:
    from macos_state import reboot

    reboot(ring, "mac1")  # networksetup's preferences hold the address
    assert f"inet {address} " in ifconfig(ring, "mac1", "en1")
    again = ip.run_line_magic(
        "mlx_cluster", line(ring, "network", hosts, "--configure --write", str(hostfile))
    )
    assert "nothing to change" in str(again) and not again.applied
    record = hostfile.with_name(hostfile.name + ".undo.json")
    assert record.stat().st_mode & 0o777 == 0o600
    undone = ip.run_line_magic(
        "mlx_cluster", line(ring, "network --hostfile", str(hostfile), "--undo")
    )
    assert "undone on mac1, mac2, mac3, mac4" in str(undone)
    assert not record.exists()
    assert "inet 10.91.61." not in ifconfig(ring, "mac1", "en1")
    assert re.findall(r"member: (\S+)", ifconfig(ring, "mac1", "bridge0")) == ["en1", "en2"]
    services = ring.ssh("mac1", "networksetup -listallnetworkservices").stdout.splitlines()
    assert services[1:] == ["Ethernet", "Thunderbolt Bridge"]
    with pytest.raises(UsageError, match="no record of a change to these Macs"):
        ip.run_line_magic("mlx_cluster", line(ring, "network", hosts, "--undo --write",
                                              str(hostfile)))  # fmt: skip


def test_without_passwordless_sudo_commands_are_printed(ip: Any, mesh: Any, tmp_path: Path) -> None:
    hosts = "--hosts mac1,mac2,mac3 --subnets 10.91.64.0/24"
    hostfile = tmp_path / "mesh.json"
    t0 = time.monotonic()
    shown = ip.run_line_magic(
        "mlx_cluster", line(mesh, "network", hosts, "--configure --write", str(hostfile))
    )
    assert time.monotonic() - t0 < 15  # nothing waits on input
    assert shown.pasted and not shown.applied and not hostfile.exists()
    assert "inet 10.91.64." not in ifconfig(mesh, "mac1", "en1")  # nothing changed anywhere
    text = str(shown)
    assert "paste each block into that Mac's terminal" in text and "survive a reboot" in text
    assert shown.plan.backend == "jaccl" and shown.plan.layout == "ring"
    assert [h["rdma"] for h in shown.plan.hostfile["hosts"]] == [
        [None, "rdma_en1", "rdma_en2"], ["rdma_en1", None, "rdma_en2"],
        ["rdma_en1", "rdma_en2", None],
    ]  # fmt: skip
    for host in mesh.hosts:  # a person pastes each block (typing the password on mac3)
        block = text.split(f"--- on {host} ---\n", 1)[1].split("\n# check: ", 1)
        commands, check = block[0], block[1].splitlines()[0]
        assert check.startswith("ping -c 1 -t 2 ")
        pasted = mesh.ssh(host, "sed -i 's/\"sudo\": false/\"sudo\": true/' $MACOS_SHIM_STATE\n"
                          + commands)  # fmt: skip
        assert pasted.returncode == 0, pasted.stderr
    again = ip.run_line_magic(
        "mlx_cluster", line(mesh, "network", hosts, "--configure --write", str(hostfile))
    )
    assert "nothing to change" in str(again), str(again)
    assert json.loads(hostfile.read_text())["backend"] == "jaccl"
    lan = ip.run_line_magic(
        "mlx_cluster",
        line(mesh, "network", hosts, "--over lan --write", str(tmp_path / "lan.json")),
    )
    assert [h["ips"] for h in lan.hostfile_json["hosts"]] == [[a] for a in mesh.ips]
    assert "%mlx_cluster links measures every pair" in str(lan)


def test_a_star_over_the_masters_bridge(ip: Any, star: Any, tmp_path: Path) -> None:
    hostfile = tmp_path / "star.json"
    done = ip.run_line_magic(
        "mlx_cluster",
        line(star, "network --hosts mac1,mac2,mac3,mac4 --subnets 10.91.65.0/24 --configure",
             "--write", str(hostfile)),
    )  # fmt: skip
    assert done.plan.layout == "star" and done.plan.backend == "mpi", str(done)
    assert "star: complete: mac1 is cabled to every other Mac" in str(done)
    assert "inet 10.91.65.1 " in ifconfig(star, "mac1", "bridge0")
    assert "doctor: every Mac reaches its peers" in str(done), str(done)
    assert [h["ips"] for h in json.loads(hostfile.read_text())["hosts"]] == [
        ["10.91.65.1"], ["10.91.65.2"], ["10.91.65.3"], ["10.91.65.4"]
    ]  # fmt: skip
    # before setup, a Mac has no python for the doctor to test who reaches whom: said, not passed
    from mlx_cluster_magic.fabric.network import network

    bare = network("mac1,mac2,mac3,mac4", subnets="10.91.65.0/24", configure=True,
                   write=hostfile, ssh=star.rsh_agent, python="/nonexistent/bin/python")  # fmt: skip
    assert "nothing to change" in str(bare)
    assert bare.doctor == [
        "doctor: the addresses are in place; who reaches whom could not be tested on mac1, mac2, "
        "mac3, mac4 (no python there yet): %mlx_cluster setup, then start tests it"
    ]
