"""Drops under the grace never kill, whenever they end: a drop that ends just after one of TCP's
retransmits (about 25 s and 51 s into an outage) left ipyparallel's heartbeat waiting for the
next one, past the grace, and every engine was unregistered.

Drops are each virtual host's own firewall (iptables DROP both ways on its management
interface), as in test_network.py; the default grace (60 s).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import no_leaks_on, virtual_macs

pytestmark = pytest.mark.multihost

if shutil.which("iptables") is None:
    pytest.skip("the drop tests need iptables (Debian package iptables)", allow_module_level=True)


@pytest.fixture(scope="module")
def macs() -> Iterator[Any]:
    with virtual_macs(3, "10.213.22.0/24", "ndw") as vc:
        yield vc


def start(ip: Any, vc: Any, hostfile: Path) -> Any:
    line = f"start --hostfile {hostfile} --ssh '{vc.rsh_agent}' --timeout 60"
    return ip.run_line_magic("mlx_cluster", line)


def watch(cluster: Any, seconds: float) -> set[str]:
    """Every rank state and cluster state seen over ``seconds`` (sampled 5 times a second)."""
    seen: set[str] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen.update(n["state"] for n in cluster.nodes())
        seen.add(f"cluster {cluster.state}")
        time.sleep(0.2)
    return seen


def idle_again(cluster: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while [n["state"] for n in cluster.nodes()] != ["idle"] * 3:
        assert time.monotonic() - t0 < timeout, cluster.nodes()
        time.sleep(0.1)
    return time.monotonic() - t0


def same_engines_answer(ip: Any, cluster: Any, pids: list[int], ids: list[int]) -> None:
    ip.run_cell_magic("px", "", "y = x + 1\ns = mx.distributed.all_sum(mx.array(1.0)).item()")
    assert cluster.view["y"] == [1, 11, 21] and cluster.view["s"] == [3.0] * 3
    assert cluster.view["pid"] == pids and list(cluster.client.ids) == ids


@pytest.fixture
def undrop_after(macs: Any) -> Iterator[None]:
    yield
    for host in macs.hosts:
        rules = macs.netns_exec(host, "iptables", "-S").stdout
        while "-j DROP" in rules:
            rule = next(ln for ln in rules.splitlines() if "-j DROP" in ln)
            macs.netns_exec(host, "iptables", *rule.replace("-A", "-D", 1).split())
            rules = macs.netns_exec(host, "iptables", "-S").stdout


@pytest.mark.parametrize(
    "drops",
    [
        pytest.param([56.0], id="56s-just-under-the-grace"),
        pytest.param([32.0, 8.0], id="32s-then-8s"),
    ],
)
def test_drops_under_the_grace_keep_every_engine(
    ip: Any, macs: Any, tmp_path: Path, undrop_after: None, drops: list[float]
) -> None:
    cluster = start(ip, macs, macs.hostfile(tmp_path / "hosts.json"))
    try:
        ip.run_cell_magic("px", "", "x = world.rank() * 10\nimport os; pid = os.getpid()")
        pids, ids = cluster.view["pid"], list(cluster.client.ids)
        backs = []
        for i, seconds in enumerate(drops):
            macs.drop()
            seen = watch(cluster, seconds)
            macs.undrop()
            assert seen <= {"idle", "unreachable", "cluster running"}, seen
            backs.append(idle_again(cluster, 10.0))
            if i < len(drops) - 1:
                assert watch(cluster, 20.0) == {"idle", "cluster running"}
        # ipyparallel unregistered every engine at grace + 10 s of missed heartbeats: past that
        # point, and past the next retransmit of a connection that stayed open through the drop.
        after = watch(cluster, 20.0)
        assert after == {"idle", "cluster running"}, after
        same_engines_answer(ip, cluster, pids, ids)
        print(f"idle again {', '.join(f'{b:.1f}' for b in backs)} s after the network returned")
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        no_leaks_on(macs)
