"""The live status view and collective results on one shared cluster: the tests that only read
it (start-up is the suite's main cost)."""

from __future__ import annotations

import re
import time

import pytest
from test_status import FIELDS, _wait

from mlx_cluster_magic import MLXCluster


@pytest.fixture(scope="module")
def shared():
    """One cluster for the tests that only read it (start-up is the suite's main cost)."""
    with MLXCluster(n=2) as c:
        yield c
    from conftest import wait_no_processes

    assert wait_no_processes() == []


def test_nodes_records_and_idle_state(shared) -> None:
    cluster = shared
    nodes = _wait(lambda: all(n["state"] == "idle" for n in cluster.nodes()) and cluster.nodes())
    assert [set(n) for n in nodes] == [FIELDS, FIELDS]
    assert [n["rank"] for n in nodes] == [0, 1]
    assert [n["pid"] for n in nodes] == [r["pid"] for r in cluster.ranks]
    assert all(n["rss_bytes"] > 10_000_000 for n in nodes)
    assert all(n["last_seen_s"] < 2 for n in nodes)
    assert all("cpu" in n["device"] for n in nodes)


def test_a_requests_numbers_are_on_the_head_as_it_returns(shared) -> None:
    """report() numbers leave with the request's end; reading them drains what arrived, so a
    script that reads right after the request finds them (the end notice follows the reply by
    microseconds, the reply crosses the controller: 50 ms is a generous bound, the periodic
    drain alone would take up to 100 ms)."""
    cluster = shared

    def steps(name: str) -> list[int]:
        records = cluster.metrics().to_dict("records")
        return sorted(r["step"] for r in records if r["name"] == name)

    for k in range(3):
        cluster.view.execute(f"for i in range(5): report(step=i, probe{k}=float(i))", block=True)
        t = time.monotonic()
        while len(steps(f"probe{k}")) < 10:
            assert time.monotonic() - t < 0.05, steps(f"probe{k}")
        assert steps(f"probe{k}") == sorted(list(range(5)) * 2)


def test_busy_while_a_cell_runs_and_memory_moves(shared) -> None:
    cluster = shared
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


def test_display_bundle_and_text_fallback(shared) -> None:
    cluster = shared
    bundle = cluster._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("MLX cluster (running): backend mpi, 2 ranks on 1 host")
    assert "state" in bundle["text/plain"].splitlines()[1]
    assert bundle["text/html"].count("class='mlx-node") == 2
    # what a saved notebook shows in the live view's place says it is a record, not a cluster
    # that runs now
    assert re.search(r"MLX cluster \(running at \d\d:\d\d:\d\d, when saved\)", bundle["text/html"])
    assert "the live view shows once this notebook's kernel runs the cluster" in bundle["text/html"]
    assert cluster.status_view() is cluster.status_view()  # cached, one live object


def test_gather_identical_diverged_and_series(shared) -> None:
    cluster = shared
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


def test_gather_errors(shared) -> None:
    cluster = shared
    from mlx_cluster_magic import MLXClusterError

    with pytest.raises(MLXClusterError, match="'nope' is not defined on rank\\(s\\) \\[0, 1\\]"):
        cluster.gather("nope")
    with pytest.raises(MLXClusterError, match="takes a variable name"):
        cluster.gather("1+1")
