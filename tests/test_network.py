"""The network a laptop has: drops of the notebook's link are waited out up to the grace, a
host no one reaches and a cable pulled between two Macs are named at once, and past the grace
the cluster says it is lost and restarts, on every host or without the lost one.

Drops are made with each virtual host's own firewall (iptables DROP on its management
interface, both ways): the link stays up, as a Wi-Fi that roams does.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from test_pipeline_plan import fake_model

from conftest import cabled_macs, no_leaks_on, virtual_macs

pytestmark = pytest.mark.multihost

if shutil.which("iptables") is None:
    pytest.skip("the drop tests need iptables (Debian package iptables)", allow_module_level=True)

ALL_SUM = "s = mx.distributed.all_sum(mx.array(1.0)).item()"
#: A cell whose collectives run for about 8 s (on the ring rig: over the cables only).
COLLECTIVE_LOOP = """
import time
total = 0.0
for i in range(40):
    total += mx.distributed.all_sum(mx.array(1.0)).item()
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def bridge() -> Iterator[Any]:
    """Three Macs on one network (the notebook's too): a drop cuts everything, as on Wi-Fi."""
    with virtual_macs(3, "10.213.20.0/24", "ndb") as vc:
        yield vc


@pytest.fixture(scope="module")
def ring() -> Iterator[Any]:
    """Three Macs cabled in a ring, one subnet per cable, the notebook on the management
    network only (as ``mlx.distributed_config`` wires it)."""
    with cabled_macs(3, "ring", "10.77.20.0/24", "10.77.80.0/24", "ndr") as vc:
        yield vc


def start(ip: Any, vc: Any, hostfile: Path, *flags: str) -> Any:
    line = f"start --hostfile {hostfile} --ssh '{vc.rsh_agent}' --timeout 60 {' '.join(flags)}"
    return ip.run_line_magic("mlx_cluster", line.strip())


def states(cluster: Any) -> list[str]:
    return [n["state"] for n in cluster.nodes()]


def wait_for(check: Any, timeout: float) -> float:
    """Seconds until ``check()`` held (fails the test past ``timeout``)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout:g} s"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture
def undrop_after(bridge: Any, ring: Any) -> Iterator[None]:
    yield
    for vc in (bridge, ring):
        for host in vc.hosts:
            with_rules = vc.netns_exec(host, "iptables", "-S").stdout
            while "-j DROP" in with_rules:
                rule = next(ln for ln in with_rules.splitlines() if "-j DROP" in ln)
                vc.netns_exec(host, "iptables", *rule.replace("-A", "-D", 1).split())
                with_rules = vc.netns_exec(host, "iptables", "-S").stdout


def test_idle_drop_keeps_the_cluster_and_reads_unreachable(
    ip: Any, bridge: Any, tmp_path: Path, undrop_after: None
) -> None:
    cluster = start(ip, bridge, bridge.hostfile(tmp_path / "hosts.json"))
    try:
        ip.run_cell_magic("px", "", "x = world.rank() * 10\nimport os; pid = os.getpid()")
        pids, ids = cluster.view["pid"], list(cluster.client.ids)
        bridge.drop()
        time.sleep(4.0)
        nodes = cluster.nodes()
        assert [n["state"] for n in nodes] == ["unreachable"] * 3, nodes
        assert all(n["silent_s"] >= 2 for n in nodes)
        assert cluster.state == "running"
        shown = ip.run_line_magic("mlx_cluster", "nodes")
        assert "dead" not in repr(shown)
        bridge.undrop()
        back = wait_for(lambda: states(cluster) == ["idle"] * 3, 5.0)
        ip.run_cell_magic("px", "", "y = x + 1\n" + ALL_SUM)
        assert cluster.view["y"] == [1, 11, 21] and cluster.view["s"] == [3.0] * 3
        assert cluster.view["pid"] == pids and list(cluster.client.ids) == ids
        print(f"back to idle {back:.1f} s after the network returned")
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        no_leaks_on(bridge)


def test_cell_started_during_a_drop_waits_then_runs(
    ip: Any, bridge: Any, tmp_path: Path, capsys: Any, undrop_after: None
) -> None:
    cluster = start(ip, bridge, bridge.hostfile(tmp_path / "hosts.json"))
    try:
        bridge.drop()
        time.sleep(2.5)
        timer = threading.Timer(5.0, bridge.undrop)
        timer.start()
        t0 = time.monotonic()
        capsys.readouterr()
        ip.run_cell_magic("px", "", ALL_SUM)
        took = time.monotonic() - t0
        timer.join()
        assert cluster.view["s"] == [3.0] * 3
        assert 4.0 < took < 20.0
        out = capsys.readouterr().out
        assert re.search(r"rank \d unreachable since \d+ s \(the network; waiting\)", out), out
        assert cluster.state == "running"
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        no_leaks_on(bridge)


def test_one_host_dropped_is_named_and_restart_without_it_replays(
    ip: Any, bridge: Any, tmp_path: Path, undrop_after: None
) -> None:
    cluster = start(ip, bridge, bridge.hostfile(tmp_path / "hosts.json"))
    try:
        ip.run_cell_magic("px", "", "a = world.rank() + 1")
        model = fake_model(tmp_path / "model", 12, 2**20)
        caps = {"mac1": "1GB", "mac2": "1GB", "mac3": "1GB"}
        assert len(cluster.plan_pipeline(str(model), memory=caps).ranks) == 3
        timer = threading.Timer(1.0, bridge.drop, args=("mac3",))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(
            UsageError,
            match=r"^mac3 cannot be reached: not from the notebook, nor from mac1, mac2 \(tried "
            r"10\.213\.20\.13:22\): a pulled cable or a Mac that slept; the cell ended and the "
            r"cluster was stopped: %mlx_cluster restart --without mac3 starts on the others",
        ):
            ip.run_cell_magic("px", "", "import time\ntime.sleep(60)")
        named = time.monotonic() - t0 - 1.0
        timer.join()
        assert named < 10, named
        assert cluster.state == "broken" and "mac3 cannot be reached" in cluster.broken_reason
        with pytest.raises(UsageError, match=r"^the MLX cluster is broken: mac3 cannot be"):
            ip.run_cell_magic("px", "", "pass")
        with pytest.raises(UsageError, match=r"--without 'mac9': no such host in this cluster"):
            ip.run_line_magic("mlx_cluster", "restart --without mac9")
        ip.run_line_magic("mlx_cluster", "restart --without mac3 --replay")
        assert [r["host"] for r in cluster.ranks] == ["mac1", "mac2"]
        assert cluster.view["a"] == [1, 2]  # the cell replayed on the ranks left
        plan = cluster.pipeline_plan
        assert [r.host for r in plan.ranks] == ["mac1", "mac2"] and plan.fits
        assert "(planned again for the 2 ranks left, was 3)" in repr(plan).splitlines()[0]
        ip.run_cell_magic("px", "", ALL_SUM)
        assert cluster.view["s"] == [2.0, 2.0]
        print(f"mac3 named {named:.1f} s after its network dropped")
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        bridge.undrop("mac3")
        no_leaks_on(bridge, timeout=30)


def test_past_the_grace_the_cluster_is_lost_and_restart_brings_it_back(
    ip: Any, bridge: Any, tmp_path: Path, undrop_after: None
) -> None:
    cluster = start(ip, bridge, bridge.hostfile(tmp_path / "hosts.json"), "--grace 3")
    assert cluster.grace == 3.0
    try:
        bridge.drop()
        wait_for(lambda: cluster.state == "broken", 12.0)
        reason = cluster.broken_reason
        assert reason.startswith(
            "lost: no word from mac1, mac2, mac3 for more than the 3 s grace (the notebook's "
            "network is down?); %mlx_cluster restart brings it back once the network is back"
        ), reason
        with pytest.raises(UsageError, match=r"^the MLX cluster is broken: lost: no word from"):
            ip.run_cell_magic("px", "", "pass")
        bridge.undrop()
        ip.run_line_magic("mlx_cluster", "restart")
        ip.run_cell_magic("px", "", ALL_SUM)
        assert cluster.view["s"] == [3.0] * 3
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        no_leaks_on(bridge, timeout=30)


def test_management_drop_mid_cell_on_a_ring_finishes_the_cell(
    ip: Any, ring: Any, tmp_path: Path, capsys: Any, undrop_after: None
) -> None:
    hostfile = ring.cabled_hostfile(tmp_path / "ring.json", "ring")
    cluster = start(ip, ring, hostfile, "--backend ring")
    try:
        timer = threading.Timer(1.0, ring.drop)
        timer.start()
        later = threading.Timer(6.0, ring.undrop)
        later.start()
        capsys.readouterr()
        ip.run_cell_magic("px", "", COLLECTIVE_LOOP)
        timer.join()
        later.join()
        assert cluster.view["total"] == [120.0] * 3
        out = capsys.readouterr().out
        assert "unreachable since" in out, out
        assert "dead" not in out
        wait_for(lambda: states(cluster) == ["idle"] * 3, 5.0)
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        no_leaks_on(ring)


def test_cable_pulled_between_two_macs_ends_the_cell_naming_both(
    ip: Any, ring: Any, tmp_path: Path
) -> None:
    hostfile = ring.cabled_hostfile(tmp_path / "ring.json", "ring")
    cluster = start(ip, ring, hostfile, "--backend ring")
    k = ring.cable("mac1", "mac2")
    a, b = ring.cable_ips(k)
    try:
        timer = threading.Timer(1.0, ring.pull_cable, args=(k,))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(UsageError) as raised:
            ip.run_cell_magic("px", "", COLLECTIVE_LOOP.replace("range(40)", "range(600)"))
        named = time.monotonic() - t0 - 1.0
        timer.join()
        message = str(raised.value)
        assert re.match(
            rf"^the cable between (mac1 \({a}\) and mac2 \({b}\)|mac2 \({b}\) and mac1 \({a}\)) "
            r"is down \(no link on mac\d's \S+\): the cell's collectives cannot finish; the "
            r"cell ended and the cluster was stopped: %mlx_cluster restart brings it back once "
            r"the cable is back$",
            message,
        ), message
        assert named < 10, named
        assert cluster.state == "broken"
        ring.pull_cable(k, plug=True)
        ip.run_line_magic("mlx_cluster", "restart")
        ip.run_cell_magic("px", "", ALL_SUM)
        assert cluster.view["s"] == [3.0] * 3
        print(f"cable named {named:.1f} s after it was pulled")
    finally:
        ring.pull_cable(k, plug=True)
        ip.run_line_magic("mlx_cluster", "stop")
        no_leaks_on(ring, timeout=30)
