"""Truthful states across three virtual Macs: a C call holding the GIL on every host keeps the
cluster alive (the controller's heartbeat needs no GIL); remote ranks show busy/unresponsive."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.multihost


def test_a_gil_holding_cell_keeps_a_three_host_cluster_alive(ip, vhosts, tmp_path) -> None:
    hostfile = vhosts.hostfile(tmp_path / "hosts.json")
    cluster = ip.run_line_magic(
        "mlx_cluster", f"start --hostfile {hostfile} --ssh '{vhosts.rsh_agent}'"
    )
    seen: set[str] = set()
    busy_ranks: set[int] = set()
    halt = threading.Event()

    def watch() -> None:
        while not halt.is_set():
            nodes = cluster.nodes()
            seen.update(n["state"] for n in nodes)
            busy_ranks.update(n["rank"] for n in nodes if n["state"] == "busy")
            halt.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ip.run_cell_magic("px", "--no-stream", "x = sum(range(250_000_000))")
    finally:
        halt.set()
        watcher.join()
    assert cluster.running
    assert "dead" not in seen and {"busy", "unresponsive"} <= seen, seen
    # The GIL is held from the cell's first line, so the sidecars are starved from then on: every
    # rank's busy came from its request notice, a datagram from that host to the notebook's.
    assert busy_ranks == {0, 1, 2}, busy_ranks
    ip.run_cell_magic("px", "", "ok = mx.distributed.all_sum(mx.array(1.0)).item()")
    assert cluster.view["ok"] == [3.0, 3.0, 3.0]
