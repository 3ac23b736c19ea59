"""Drops under the grace never kill, whenever they end: a drop that ends just after one of TCP's
retransmits (about 25 s and 51 s into an outage) left ipyparallel's heartbeat waiting for the
next one, past the grace, and every engine was unregistered.

Drops are each virtual host's own firewall (iptables DROP both ways on its management
interface), as in test_network.py; the default grace (60 s).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import no_leaks_on, our_processes, vhost_pids, virtual_macs

# (make test runs them in a session of their own: they mostly wait out drops)
pytestmark = [pytest.mark.multihost, pytest.mark.drops]

if shutil.which("iptables") is None:
    pytest.skip("the drop tests need iptables (Debian package iptables)", allow_module_level=True)


@pytest.fixture(scope="module")
def macs() -> Iterator[Any]:
    with virtual_macs(3, "10.213.22.0/24", "ndw") as vc:
        yield vc


def start(ip: Any, vc: Any, hostfile: Path) -> Any:
    line = f"start --hostfile {hostfile} --ssh '{vc.rsh_agent}' --timeout 60"
    return ip.run_line_magic("mlx_cluster", line)


#: Figures a row shows from the rank's last report: none is known of an unreachable rank now.
FIGURES = ("cpu_percent", "host_cpu_percent", "mem_percent", "rss_bytes", "mlx_active_bytes")


def watch(cluster: Any, seconds: float) -> set[str]:
    """Every rank state and cluster state seen over ``seconds`` (sampled 5 times a second);
    ``stale figures`` when an unreachable row showed a figure from before the silence."""
    seen: set[str] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        nodes = cluster.nodes()
        seen.update(n["state"] for n in nodes)
        seen.add(f"cluster {cluster.state}")
        if any(n["state"] == "unreachable" and any(n[f] is not None for f in FIGURES) for n in nodes):
            seen.add("stale figures")
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


def test_a_mac_lost_while_idle_breaks_the_cluster_at_once_and_every_call_says_so(
    ip: Any, macs: Any, tmp_path: Path, undrop_after: None
) -> None:
    """Its ssh names are addresses (an Open MPI hostfile), the views show hostnames: the advice
    names the host as the hostfile does, and restart --without takes either name."""
    cluster = start(ip, macs, macs.hostfile(tmp_path / "hosts", form="mpi"))
    mac3 = macs.ip("mac3")
    try:
        ip.run_cell_magic("px", "", "a = world.rank() + 1")
        macs.drop("mac3")
        t0 = time.monotonic()
        while cluster.state != "broken":
            assert time.monotonic() - t0 < 15, cluster.nodes()
            time.sleep(0.1)
        named = time.monotonic() - t0
        health = cluster.health
        assert health.cause == "lost" and health.hosts == (mac3,), health
        assert health.what.startswith(f"{mac3} cannot be reached: not from the notebook")
        assert health.advice.startswith(f"%mlx_cluster restart --without {mac3} starts on")
        snap = cluster.snapshot()
        assert (snap.state, snap.reason, snap.advice) == ("broken", health.what, health.advice)
        assert {n.host: n.state for n in snap.nodes} == {
            "mac1": "stopped", "mac2": "stopped", "mac3": "dead"
        }  # fmt: skip
        from mlx_cluster_magic.views.text import snapshot_text

        text = snapshot_text(snap)
        assert "MLX cluster (broken)" in text and f"restart --without {mac3}" in text
        assert "restart brings it back" not in text
        for call in (
            lambda: ip.run_cell_magic("px", "", "pass"),
            lambda: ip.run_line_magic("px", "pass"),
            lambda: cluster.gather("a"),
            lambda: cluster.view,
        ):
            with pytest.raises(Exception) as raised:
                call()
            line = str(raised.value)
            assert "\n" not in line and line.startswith("the MLX cluster is broken: "), line
            assert f"--without {mac3}" in line and line.count("restart") == 2, line
        ip.run_line_magic("mlx_cluster", "restart --without mac3")  # the name the views show
        assert [r["host"] for r in cluster.ranks] == ["mac1", "mac2"]
        ip.run_cell_magic("px", "", "s = mx.distributed.all_sum(mx.array(1.0)).item()")
        assert cluster.view["s"] == [2.0, 2.0]
        print(f"{mac3} named {named:.1f} s after its network dropped")
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        macs.undrop("mac3")
        no_leaks_on(macs, timeout=30)


def test_a_lost_mac_leaves_nothing_on_the_head_and_nothing_once_it_is_back(
    ip: Any, macs: Any, tmp_path: Path, undrop_after: None
) -> None:
    """Once the cluster has lost mac3 and goes on without it, the old cluster's ssh session to
    mac3 (it never ends by itself while mac3 cannot answer) is gone from the head; once mac3 is
    back, its daemon and rank end within 30 s."""
    cluster = start(ip, macs, macs.hostfile(tmp_path / "hosts.json"))
    mac3_pids = frozenset(macs._ns_pids(macs.namespace("mac3")))
    try:
        old = {p for p, _ in our_processes(vhost_pids(macs))}
        sessions = [cmd for _, cmd in our_processes() if re.match(r"\S*ssh\s", cmd)]
        assert sessions, our_processes()  # mpiexec's ssh sessions count as ours
        macs.drop("mac3")
        t0 = time.monotonic()
        while cluster.state != "broken":
            assert time.monotonic() - t0 < 20, cluster.nodes()
            time.sleep(0.2)
        ip.run_line_magic("mlx_cluster", "restart --without mac3")
        ip.run_cell_magic("px", "", "s = mx.distributed.all_sum(mx.array(1.0)).item()")
        assert cluster.view["s"] == [2.0, 2.0]
    finally:
        ip.run_line_magic("mlx_cluster", "stop")

    def left(where: frozenset[int]) -> list[tuple[int, str]]:
        return [p for p in our_processes(where) if p[0] in old]

    deadline = time.monotonic() + 10
    while left(frozenset()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left(frozenset()) == [], left(frozenset())  # the head: nothing, mac3 still away
    macs.undrop("mac3")
    mac3_pids |= frozenset(macs._ns_pids(macs.namespace("mac3")))
    deadline = time.monotonic() + 30
    while left(mac3_pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left(mac3_pids) == [], left(mac3_pids)
    no_leaks_on(macs, timeout=10)
