"""The live status view and collective results, asserted headless on a real cluster."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.rank.gather_summary import summarize
from mlx_cluster_magic.views.gather_view import GatherResult

FIELDS = {
    "rank",
    "host",
    "state",
    "busy_s",
    "last_seen_s",
    "rss_bytes",
    "mlx_active_bytes",
    "mlx_peak_bytes",
    "device",
    "pid",
    "silent_s",
    "why",
    "cpu_percent",
    "host_cpu_percent",
    "mem_percent",
    "gpu_percent",
    "cpu_w",
    "gpu_w",
    "cpu_temp_c",
    "gpu_temp_c",
    "usage_hint",
    "waiting",
}


def _wait(predicate, timeout: float = 10.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.fixture
def cluster(no_leaks):
    with MLXCluster(n=2) as c:
        yield c


def test_killed_rank_shows_dead_within_five_seconds(cluster) -> None:
    view = cluster.status_view()
    os.kill(cluster.ranks[1]["pid"], signal.SIGKILL)
    t = time.monotonic()
    assert _wait(lambda: cluster.nodes()[1]["state"] == "dead", timeout=5, step=0.05)
    assert time.monotonic() - t < 5
    assert _wait(lambda: view.snapshot["nodes"][1]["state"] == "dead", timeout=3)
    assert "mlx-dead" in view.html()


def test_stop_button_stops_and_refresh_thread_ends(no_leaks) -> None:
    cluster = MLXCluster(n=2).start()
    view = cluster.status_view()
    assert any(t.name == "mlx-cluster-status" for t in threading.enumerate())
    view.click("stop")
    assert not cluster.running
    assert "(stopped)" in view.text()
    assert view.snapshot["state"] == "stopped"
    assert [n["state"] for n in view.snapshot["nodes"]] == ["stopped", "stopped"]
    assert _wait(lambda: not any(t.name == "mlx-cluster-status" for t in threading.enumerate()))
    assert "stopped" in cluster._repr_mimebundle_()["text/plain"]


def test_gather_and_status_magics(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    ip.run_cell_magic("px", "", "v = world.rank() * 0 + 7")
    result = ip.run_line_magic("mlx_cluster", "gather v")
    assert isinstance(result, GatherResult) and result.agree and result.values == [7, 7]
    both = ip.run_line_magic("mlx_cluster", "gather v v")
    assert len(both) == 2
    assert ip.run_line_magic("mlx_cluster", "status") is cluster.status_view()
    nodes = ip.run_line_magic("mlx_cluster", "nodes")
    assert [n["rank"] for n in nodes] == [0, 1]


def test_summarize_numpy_without_a_cluster() -> None:
    s = summarize(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    assert s.kind == "series" and s.text.startswith("float32[3] min 1 mean 2 max 3")
    assert summarize(np.zeros(3)).checksum != summarize(np.zeros(4)).checksum
    assert summarize({"a": 1}).kind == "value"
