"""The live status view and collective results, asserted headless on a real cluster."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.gather import GatherResult, summarize

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


def test_nodes_records_and_idle_state(cluster) -> None:
    nodes = _wait(lambda: all(n["state"] == "idle" for n in cluster.nodes()) and cluster.nodes())
    assert [set(n) for n in nodes] == [FIELDS, FIELDS]
    assert [n["rank"] for n in nodes] == [0, 1]
    assert [n["pid"] for n in nodes] == [r["pid"] for r in cluster.ranks]
    assert all(n["rss_bytes"] > 10_000_000 for n in nodes)
    assert all(n["last_seen_s"] < 2 for n in nodes)
    assert all("cpu" in n["device"] for n in nodes)


def test_busy_while_a_cell_runs_and_memory_moves(cluster) -> None:
    view = cluster.status_view()
    ar = cluster.view.execute(
        "import time\nbig = mx.zeros((2048, 2048)); mx.eval(big)\ntime.sleep(4)", block=False
    )
    busy = _wait(lambda: all(n["state"] == "busy" for n in cluster.nodes()), timeout=5)
    assert busy
    first = [n["busy_s"] for n in cluster.nodes()]
    rows_before = view.snapshot["nodes"]
    time.sleep(1.2)
    second = cluster.nodes()
    assert all(b["busy_s"] > a + 0.7 for a, b in zip(first, second))
    # the widget refreshed by itself (from the status thread), at least once a second
    assert view.snapshot["nodes"] != rows_before
    assert {n["state"] for n in view.snapshot["nodes"]} == {"busy"}
    assert "mlx-busy" in view.html()
    peak = _wait(lambda: all(n["mlx_active_bytes"] >= 2048 * 2048 * 4 for n in cluster.nodes()))
    assert peak
    ar.get()
    assert _wait(lambda: all(n["state"] == "idle" for n in cluster.nodes()))
    assert all(n["mlx_peak_bytes"] >= 2048 * 2048 * 4 for n in cluster.nodes())


def test_killed_rank_shows_dead_within_five_seconds(cluster) -> None:
    view = cluster.status_view()
    os.kill(cluster.ranks[1]["pid"], signal.SIGKILL)
    t = time.monotonic()
    assert _wait(lambda: cluster.nodes()[1]["state"] == "dead", timeout=5, step=0.05)
    assert time.monotonic() - t < 5
    assert _wait(lambda: view.snapshot["nodes"][1]["state"] == "dead", timeout=3)
    assert "mlx-dead" in view.html()


def test_display_bundle_and_text_fallback(cluster) -> None:
    bundle = cluster._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("MLX cluster (running): backend mpi, 2 ranks on 1 host")
    assert "state" in bundle["text/plain"].splitlines()[1]
    assert bundle["text/html"].count("class='mlx-node") == 2
    assert cluster.status_view() is cluster.status_view()  # cached, one live object


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


def test_gather_identical_diverged_and_series(cluster) -> None:
    cluster.view.execute(
        "same = mx.arange(6).reshape(2, 3)\n"
        "mine = mx.array([world.rank()])\n"
        "losses = [1.0 / (i + 1) + 0.1 * world.rank() for i in range(20)]\n"
        "big = mx.ones((1024, 1024))\n"
    )
    same = cluster.gather("same")
    assert same.agree and same.diverged == []
    assert repr(same).startswith("same: identical on 2/2 ranks: int32[2, 3]")
    assert "identical on 2/2 ranks" in same._repr_html_()
    assert [v.tolist() for v in same.values] == [[[0, 1, 2], [3, 4, 5]]] * 2

    mine = cluster.gather("mine")
    assert not mine.agree and mine.diverged == [1]
    html = mine._repr_html_()
    assert html.count("mlx-diverged") == 1 and "background:#ffebee" in html

    losses = cluster.gather("losses")
    assert losses.diverged == [1]
    assert losses._repr_html_().count("<polyline class='mlx-series'") == 2
    assert losses.values[1][0] == pytest.approx(1.1)

    big = cluster.gather("big", limit_bytes=1 << 16)  # 4 MiB each: summarised, not moved
    assert big.agree and big.values == [None, None]
    assert big.summaries[0].stats == {"min": 1.0, "mean": 1.0, "max": 1.0}
    assert big.summaries[0].shape == (1024, 1024)


def test_gather_errors(cluster) -> None:
    from mlx_cluster_magic import MLXClusterError

    with pytest.raises(MLXClusterError, match="'nope' is not defined on rank\\(s\\) \\[0, 1\\]"):
        cluster.gather("nope")
    with pytest.raises(MLXClusterError, match="takes a variable name"):
        cluster.gather("1+1")


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
