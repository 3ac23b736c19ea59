"""A farm on virtual Macs: ``%mlx_cluster start --farm`` over three hosts (a fourth is added
mid-sweep), sweeps of 40 tasks with one Mac's network dropped for good (its task runs elsewhere,
40 results, each counted once), ``remove --drain`` and ``remove``, a failing task with and
without retries, and the idle policy read from ``ioreg`` on each host: a shim first on the
virtual hosts' PATH (theirs only, through their sshd) prints the real capture of
``tests/fixtures/macos`` with that host's idle time. Nothing of ours is left after any test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ipyparallel import interactive

from conftest import no_leaks_on, virtual_macs

pytestmark = pytest.mark.multihost

CAPTURE = Path(__file__).parent / "fixtures" / "macos" / "ioreg-c-IOHIDSystem_mac-mini_notes-2026-05-18.txt"  # fmt: skip
#: The shim: the real capture, with this host's idle time (nanoseconds, from a file per host).
IOREG_SHIM = """#!/bin/sh
ns=$(cat "{dir}/idle-$(hostname)" 2>/dev/null || echo 0)
sed "s/\\"HIDIdleTime\\" = [0-9]*/\\"HIDIdleTime\\" = $ns/" "{capture}"
"""


@pytest.fixture(scope="module")
def shim() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="farf-shim-"))
    (folder / "ioreg").write_text(IOREG_SHIM.format(dir=folder, capture=CAPTURE))
    (folder / "ioreg").chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def macs(shim: Path) -> Iterator[Any]:
    if shutil.which("iptables") is None:
        pytest.skip("the farm's drop test needs iptables (Debian package iptables)")
    with virtual_macs(4, "10.95.1.0/24", "farf", path_first=str(shim)) as vc:
        yield vc


@pytest.fixture
def farm(ip: Any, macs: Any, tmp_path: Path) -> Iterator[Any]:
    """``start(*flags)``: a farm on mac1..mac3 through the magic; stopped, the drops undone and
    every host checked for leftovers after the test."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(
        "[" + ", ".join(f'{{"ssh": "{h}", "ips": ["{macs.ip(h)}"]}}' for h in macs.hosts[:3]) + "]"
    )

    def start(*flags: str) -> Any:
        line = f"start --farm --hostfile {hostfile} --ssh '{macs.rsh_agent}' --grace 10 "
        return ip.run_line_magic("mlx_cluster", line + " ".join(flags))

    try:
        yield start
    finally:
        ip.run_line_magic("mlx_cluster", "stop")
        for host in macs.hosts:
            rules = macs.netns_exec(host, "iptables", "-S").stdout
            if "-j DROP" in rules:
                macs.undrop(host)
        no_leaks_on(macs, timeout=40)


@interactive
def square_slowly(x: int) -> tuple[int, str]:
    import socket
    import time

    from mlx_cluster_magic import report

    time.sleep(0.4)
    report(step=x, x_squared=float(x * x))
    return x * x, socket.gethostname()


@interactive
def square_in_1s(x: int) -> tuple[int, str]:
    import socket
    import time

    from mlx_cluster_magic import report

    time.sleep(1.0)
    report(step=x, x_squared=float(x * x))
    return x * x, socket.gethostname()


@interactive
def square_in_4s(x: int) -> tuple[int, str]:
    import socket
    import time

    time.sleep(4)
    return x * x, socket.gethostname()


def wait_for(what: Any, timeout: float, why: str) -> None:
    t0 = time.monotonic()
    while not what():
        assert time.monotonic() - t0 < timeout, why
        time.sleep(0.05)


def test_a_farm_is_independent_engines_with_a_group_of_one(farm: Any, macs: Any) -> None:
    cluster = farm()
    assert [r["host"] for r in cluster.ranks] == ["mac1", "mac2", "mac3"]
    assert [h["state"] for h in cluster.farm_hosts()] == ["lent"] * 3
    sizes = cluster.view.apply_sync(interactive(lambda: (world.rank(), world.size())))  # noqa: F821
    assert sizes == [(0, 1)] * 3
    # no mpiexec anywhere: each engine is its own ssh session's process
    assert cluster.client.ids == [0, 1, 2]
    nodes = {n["host"]: n["state"] for n in cluster.nodes()}
    assert nodes == {"mac1": "idle", "mac2": "idle", "mac3": "idle"}


def test_forty_tasks_with_a_mac_lost_and_one_added_mid_sweep(farm: Any, macs: Any, ip: Any) -> None:
    """The issue's "done when": 40 results, each once, mac3 unplugged (its network dropped for
    good) while it runs a task, mac4 added meanwhile and taking tasks."""
    cluster = farm()
    # 1 s tasks: mac4 (its doctor's checks and its engine's start take seconds) joins in time
    # and mac3 is dropped while it runs one
    sweep = cluster.map(square_in_1s, range(40), block=False)
    mac3 = cluster._farm.members[2]
    wait_for(lambda: sum(sweep.done) >= 3, 30, "no progress")
    t_add = time.monotonic()
    ip.run_line_magic("mlx_cluster", "add mac4")
    print(f"add took {time.monotonic() - t_add:.1f} s, {sum(sweep.done)} done by then")
    assert not all(sweep.done)
    wait_for(
        lambda: any(a.slot == mac3.slots[0].slot for a in list(sweep.live.values())), 10, "idle"
    )
    on_mac3 = [a.item for a in list(sweep.live.values()) if a.slot == mac3.slots[0].slot]
    macs.drop("mac3")
    dropped = time.monotonic()
    results = sweep.result(timeout=120)
    assert [r[0] for r in results] == [x * x for x in range(40)]
    assert len(sweep.counted) == 40 and all(sweep.done)
    assert mac3.state == "lost" and "cannot be reached" in mac3.why, mac3
    assert mac3.lost_at is not None and mac3.lost_at - dropped < 15
    moved = [m for m in sweep.moved if m[3] == "lost"]
    assert {m[1] for m in moved} >= set(on_mac3[:1]), (moved, on_mac3)
    for item in {m[1] for m in moved}:  # each task of mac3's ran again elsewhere, counted once
        assert results.hosts[item] != "mac3" and results[item][1] == results.hosts[item]
    assert "mac4" in results.hosts, results.hosts  # the added Mac took tasks
    assert results.rerun >= 1 and results.errors == {}
    states = {h["host"]: h["state"] for h in cluster.farm_hosts()}
    assert states == {"mac1": "lent", "mac2": "lent", "mac3": "lost", "mac4": "lent"}
    # the live view says which Macs take tasks
    assert cluster.snapshot().banner == "farm: mac1 lent, mac2 lent, mac3 lost, mac4 lent"
    progress = results.progress
    assert (progress.done, progress.total, progress.failed) == (40, 40, 0)
    # report() from inside the tasks, as on every cluster: one point per counted task at least
    metrics = cluster.metrics()
    assert set(metrics["name"]) == {"x_squared"} and len(metrics) >= 40
    print(f"mac3 lost {mac3.lost_at - dropped:.1f} s after its network dropped")
    macs.undrop("mac3")  # back: it may rejoin, with new engines
    ip.run_line_magic("mlx_cluster", "add mac3")
    assert [h["state"] for h in cluster.farm_hosts()] == ["lent", "lent", "lost", "lent", "lent"]
    again = cluster.map(square_slowly, range(12))
    assert [r[0] for r in again] == [x * x for x in range(12)] and "mac3" in again.hosts
    # %%px runs on every engine of the farm now, the lost Mac's old one left out
    ip.run_cell_magic("px", "", "import socket\nwhere = (socket.gethostname(), world.size())")
    assert cluster.client[[0, 1, 3, 4]]["where"] == [
        ("mac1", 1), ("mac2", 1), ("mac4", 1), ("mac3", 1)
    ]  # fmt: skip


def test_remove_drain_lets_the_task_finish_and_remove_hands_it_back(farm: Any, ip: Any) -> None:
    cluster = farm()
    members = cluster._farm.members
    sweep = cluster.map(square_slowly, range(24), block=False)
    mac2 = members[1].slots[0].slot
    wait_for(lambda: any(a.slot == mac2 for a in list(sweep.live.values())), 20, "mac2 idle")
    running = min(
        (a for a in list(sweep.live.values()) if a.slot == mac2), key=lambda a: a.submitted
    )
    done_before = sum(1 for h in sweep.hosts if h == "mac2")
    ip.run_line_magic("mlx_cluster", "remove mac2 --drain")
    wait_for(lambda: members[1].state == "left", 20, "mac2 never left")
    ip.run_line_magic("mlx_cluster", "remove mac3")  # at once: its task runs elsewhere
    assert members[2].state == "left"
    results = sweep.result(timeout=120)
    assert [r[0] for r in results] == [x * x for x in range(24)] and len(sweep.counted) == 24
    assert results.hosts[running.item] == "mac2"  # the task it ran when told to drain
    assert sum(1 for h in results.hosts if h == "mac2") <= done_before + 1
    assert results.hosts[-1] == "mac1"
    assert cluster.client.ids == [0]
    with pytest.raises(Exception, match="mac2 is not a Mac of this farm"):
        ip.run_line_magic("mlx_cluster", "remove mac2")
    with pytest.raises(Exception) as refused:  # the doctor's word, before any engine
        ip.run_line_magic("mlx_cluster", "add mac9")
    line = str(refused.value)
    assert line.startswith("mac9: ssh: ") and "\n" not in line, line
    assert [h["host"] for h in cluster.farm_hosts()] == ["mac1", "mac2", "mac3"]
    ip.run_line_magic("mlx_cluster", "restart")  # on the Macs that are in the farm now
    assert [r["host"] for r in cluster.ranks] == ["mac1"] and cluster.client.ids == [0]
    assert list(cluster.map(square_slowly, range(3))) == [(x * x, "mac1") for x in range(3)]


@interactive
def fails_once(x: int) -> int:
    """Item 5 fails on its first try (a marker file, shared by every host, says it was tried)."""
    import os
    import socket

    marker = os.environ.get("FARF_MARKER", "/tmp/farf-tried")
    if x == 5 and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(socket.gethostname())
        raise ValueError("learning rate too high")
    return x + 100


def test_a_failing_task_with_and_without_retries(farm: Any, capsys: Any) -> None:
    cluster = farm()
    marker = Path("/tmp/farf-tried")
    marker.unlink(missing_ok=True)
    try:
        plain = cluster.map(fails_once, range(10))
        assert list(plain[:5]) == [100, 101, 102, 103, 104] and list(plain[6:]) == [
            106, 107, 108, 109
        ]  # fmt: skip
        assert set(plain.errors) == {5} and plain[5].ename == "ValueError"
        shown = capsys.readouterr().out
        assert "failed: item 5 on mac" in shown and "ValueError: learning rate too high" in shown
        marker.unlink()
        retried = cluster.map(fails_once, range(10), retries=1)
        assert list(retried) == [x + 100 for x in range(10)] and retried.errors == {}
        assert retried.hosts[5] != marker.read_text()  # re-run on another Mac
    finally:
        marker.unlink(missing_ok=True)


def set_idle(shim: Path, host: str, seconds: float) -> None:
    (shim / f"idle-{host}").write_text(str(int(seconds * 1e9)))


@pytest.mark.parametrize("policy", ["requeue", "finish"])
def test_only_idle_macs_take_tasks(farm: Any, shim: Path, policy: str) -> None:
    """mac3's owner is at it (2 s idle), mac1 and mac2 were left alone (10 min); mac1's owner
    comes back mid-sweep: it takes no new task, and hands back (requeue) or finishes (finish)
    the one it runs."""
    for host, idle in (("mac1", 600), ("mac2", 600), ("mac3", 2)):
        set_idle(shim, host, idle)
    try:
        cluster = farm("--when-idle 5m", f"--yield {policy}")
        states = {h["host"]: (h["state"], h["idle_s"]) for h in cluster.farm_hosts()}
        assert states == {"mac1": ("lent", 600), "mac2": ("lent", 600), "mac3": ("in use", 2)}
        sweep = cluster.map(square_in_4s, range(8), block=False)
        mac1 = cluster._farm.members[0].slots[0].slot
        wait_for(lambda: any(a.slot == mac1 for a in list(sweep.live.values())), 20, "mac1 idle")
        running = min(
            (a for a in list(sweep.live.values()) if a.slot == mac1), key=lambda a: a.submitted
        )
        done_before = sum(1 for h in sweep.hosts if h == "mac1")
        set_idle(shim, "mac1", 0.5)
        wait_for(lambda: cluster._farm.members[0].state == "in use", 10, "mac1 still lent")
        results = sweep.result(timeout=120)
        assert [r[0] for r in results] == [x * x for x in range(8)] and len(sweep.counted) == 8
        assert "mac3" not in results.hosts
        on_mac1 = sum(1 for h in results.hosts if h == "mac1")
        if policy == "requeue":  # handed back: it ran again on mac2
            assert results.hosts[running.item] == "mac2" and on_mac1 == done_before
            assert any(m[1] == running.item and m[3] == "in use" for m in sweep.moved)
        else:  # finished where it ran; nothing new after it
            assert results.hosts[running.item] == "mac1" and on_mac1 == done_before + 1
        shown = {h["host"]: h["state"] for h in cluster.farm_hosts()}
        assert shown == {"mac1": "in use", "mac2": "lent", "mac3": "in use"}
        banner = cluster.snapshot().banner
        assert banner.startswith("farm: mac1 in use (its owner is using it), mac2 lent, "), banner
        assert "in use" in results.progress.hosts[0].state
    finally:
        for host in ("mac1", "mac2", "mac3"):
            (shim / f"idle-{host}").unlink(missing_ok=True)


def test_the_shim_is_on_the_virtual_hosts_path_only(macs: Any, shim: Path) -> None:
    set_idle(shim, "mac2", 61.5)
    try:
        out = macs.ssh("mac2", "ioreg -c IOHIDSystem").stdout
        assert '"HIDIdleTime" = 61500000000' in out and "IOHIDParamUserClient" in out
        assert shutil.which("ioreg", path=os.environ.get("PATH")) is None
    finally:
        (shim / "idle-mac2").unlink(missing_ok=True)


def test_a_farm_on_this_machine_streams_its_results_in_item_order(ip: Any) -> None:
    """Two engines here (no hostfile): the sweep's results as they come, in item order, a
    failing task named in one line, and nothing left after the stop (the ``ip`` fixture)."""
    cluster = ip.run_line_magic("mlx_cluster", "start --farm -n 2")
    assert cluster.view.apply_sync(interactive(lambda: world.size())) == [1, 1]  # noqa: F821
    sweep = cluster.map(square_slowly, range(10), block=False)
    streamed = []
    for result in sweep:  # each as soon as it and those before it are in
        streamed.append((result[0], sum(sweep.done)))
    assert [r for r, _ in streamed] == [x * x for x in range(10)]
    assert streamed[0][1] < 10  # the first came before the last was done
    assert sweep.result().errors == {}
    cluster.map(square_in_4s, range(4), block=False)
    with pytest.raises(Exception, match="a sweep is still running on this farm"):
        cluster.map(square_in_4s, range(4))


@pytest.mark.kernel
def test_the_sweep_table_is_replaced_in_place_in_a_real_kernel(no_leaks: None) -> None:
    """Through a real ipykernel (jupyter_client, as a notebook runs it): one display, then
    updates of that display only, the last one the finished sweep."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        start = "%load_ext mlx_cluster_magic\nc = %mlx_cluster start --farm -n 2"
        assert kc.execute_interactive(start, timeout=120)["content"]["status"] == "ok"
        seen: list[dict[str, Any]] = []
        cell = (
            "import time\n"
            "def wait(x):\n    import time; time.sleep(0.3); return x\n"
            "r = c.map(wait, range(8))"
        )
        reply = kc.execute_interactive(cell, timeout=120, output_hook=seen.append)
        assert reply["content"]["status"] == "ok"
        kinds = [m["msg_type"] for m in seen if m["msg_type"].endswith("display_data")]
        assert kinds[0] == "display_data" and set(kinds[1:]) == {"update_display_data"}, kinds
        ids = {m["content"]["transient"]["display_id"] for m in seen if "transient" in m["content"]}
        assert len(ids) == 1 and len(kinds) >= 3
        last = [m for m in seen if m["msg_type"].endswith("display_data")][-1]["content"]["data"]
        assert "sweep 8/8 done" in last["text/plain"] and "finished" in last["text/plain"]
        assert "mlx-cluster-sweep" in last["text/html"]
        kc.execute_interactive("%mlx_cluster stop", timeout=60)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
