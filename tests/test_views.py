"""The views from hand-built snapshots: text and HTML fallbacks, the live widget's traits and
its buttons, the side panel's choice. No cluster, no browser (see test_browser.py for those)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlx_cluster_magic.observe.snapshot import NODE_STATES, ClusterSnapshot, MetricPoint, NodeStatus
from mlx_cluster_magic.views import side_panel as side
from mlx_cluster_magic.views.charts import Line, line_chart_svg, nice_ticks, wants_log
from mlx_cluster_magic.views.status_widget import MAX_CHART_POINTS, StatusWidget, metrics_series
from mlx_cluster_magic.views.text import (
    STATE_COLOURS,
    header_text,
    node_cells,
    nodes_html,
    snapshot_html,
    snapshot_text,
)

VIEWS = Path(__file__).parents[1] / "mlx_cluster_magic" / "views"


def node(rank: int, state: str, **kw: object) -> NodeStatus:
    base: dict[str, object] = dict(
        rank=rank,
        host=f"mac{rank // 2 + 1}",
        state=state,
        busy_s=3.5 if state in ("busy", "unresponsive") else 0.0,
        last_seen_s=0.3,
        rss_bytes=200 * 2**20,
        mlx_active_bytes=16 * 2**20,
        mlx_peak_bytes=2**30,
        device="Device(gpu, 0)",
        pid=1000 + rank,
    )
    base.update(kw)
    return NodeStatus(**base)  # type: ignore[arg-type]


def every_state() -> tuple[NodeStatus, ...]:
    return tuple(
        node(
            i,
            st,
            silent_s={"unresponsive": 12.5, "unreachable": 7.0}.get(st),
            why="killed by signal 9" if st == "dead" else None,
        )
        for i, st in enumerate(NODE_STATES)
    )


def snap(state: str = "running", **kw: object) -> ClusterSnapshot:
    base: dict[str, object] = dict(
        state=state, backend="mpi", n=6, hosts=3, uptime_s=75.0, nodes=every_state()
    )
    base.update(kw)
    return ClusterSnapshot(**base)  # type: ignore[arg-type]


def metrics(steps: int = 30, ranks: int = 2) -> tuple[MetricPoint, ...]:
    loss = [
        MetricPoint(r, "loss", 2.0 / (i + 1) + 0.05 * r, float(i), 1000.0 + i)
        for i in range(steps)
        for r in range(ranks)
    ]
    tok = [
        MetricPoint(r, "tok_s", 100.0 + r + i, None, 1000.5 + i)
        for i in range(5)
        for r in range(ranks)
    ]
    return tuple(loss + tok)


# --------------------------------------------------------------------------- text and HTML
def test_header_and_table_text_for_every_state() -> None:
    text = snapshot_text(snap())
    lines = text.splitlines()
    assert lines[0] == "MLX cluster (running): backend mpi, 6 ranks on 3 hosts, uptime 1:15"
    assert lines[1].split() == [
        "rank", "host", "state", "busy", "heartbeat", "RSS", "MLX", "active", "MLX", "peak", "device",
    ]  # fmt: skip
    rows = {ln.split()[0]: ln for ln in lines[2 : 2 + len(NODE_STATES)]}
    for rank, state in enumerate(NODE_STATES):
        assert f" {state} " in rows[str(rank)]
    assert "silent 12.5 s, process alive" in rows["3"]
    unreachable = NODE_STATES.index("unreachable")
    assert "since 7 s" in rows[str(unreachable)]
    assert "3.5 s" in rows["2"] and "200.0 MiB" in rows["1"] and "1.0 GiB" in rows["1"]
    assert f"rank {NODE_STATES.index('dead')}: killed by signal 9" in text
    one_host = snap(n=1, hosts=1, nodes=(node(0, "idle"),))
    assert (
        header_text(one_host)
        == "MLX cluster (running): backend mpi, 1 ranks on 1 host, uptime 1:15"
    )


def test_broken_header_says_why_and_how_to_recover() -> None:
    s = snap("broken", reason="rank 1 died during a cell (exit code -9).")
    text = snapshot_text(s)
    assert text.startswith("MLX cluster (broken): backend mpi, 6 ranks on 3 hosts, uptime -")
    assert (
        "broken: rank 1 died during a cell (exit code -9); `%mlx_cluster restart` brings it back."
        in text
    )
    html = snapshot_html(s)
    assert "mlx-broken" in html and "`%mlx_cluster restart` brings it back" in html
    # No reason kept: still says broken and how to recover.
    assert "broken: the cluster was aborted; `%mlx_cluster restart`" in snapshot_text(
        snap("broken")
    )
    assert "broken:" not in snapshot_text(snap("stopped"))
    by_view = snap("stopped", reason="stopped from the status view")
    assert snapshot_text(by_view).splitlines()[-1] == "stopped from the status view"
    assert "stopped from the status view" in snapshot_html(by_view)


def test_html_rows_classes_and_colours() -> None:
    html = snapshot_html(snap())
    assert html.count("class='mlx-node") == len(NODE_STATES)
    for rank, state in enumerate(NODE_STATES):
        assert f"<tr class='mlx-node mlx-{state}' data-rank='{rank}'" in html
        assert STATE_COLOURS[state] in html
    assert "class='mlx-cluster-nodes'" in html and "mlx-cluster-status" in html
    assert "title='killed by signal 9'" in html
    assert "silent 12.5 s, process alive" in html
    # escaping: a host name is data, never markup
    assert "&lt;b&gt;" in nodes_html([node(0, "idle", host="<b>")])


def test_rows_that_are_not_live_show_no_live_figures() -> None:
    """A stopped or dead rank's last report is not shown as if live: no busy time, heartbeat,
    RSS or MLX memory (its host and device stay); a starting rank has none yet."""
    for state in ("stopped", "dead", "starting"):
        cells = node_cells(node(0, state, last_seen_s=0.2))
        assert cells[3:8] == ["-"] * 5, (state, cells)
        assert cells[1] == "mac1" and cells[8] == "Device(gpu, 0)"
    for state in ("idle", "busy", "unresponsive"):
        cells = node_cells(node(0, state, silent_s=4.0 if state == "unresponsive" else None))
        assert cells[5:8] == ["200.0 MiB", "16.0 MiB", "1.0 GiB"], (state, cells)
        assert cells[4] != "-"
    # After an abort: dead rows, no fresh heartbeat (the text view says the same).
    aborted = snap("broken", reason="rank 1 died", nodes=(node(0, "dead"), node(1, "dead")))
    assert "0.3 s ago" not in snapshot_text(aborted)
    assert "200.0 MiB" not in snapshot_text(aborted)


def test_restarting_header_and_previous_metrics_in_text_and_html() -> None:
    starting = tuple(node(i, "starting", last_seen_s=None) for i in range(2))
    s = snap("restarting", n=2, hosts=1, uptime_s=None, nodes=starting)
    assert header_text(s) == "MLX cluster (restarting): backend mpi, 2 ranks on 1 host, uptime -"
    kept = snap("stopped", metrics=metrics(), metrics_previous=True)
    text = snapshot_text(kept)
    assert "metrics from the previous run:" in text and "loss: rank 0" in text
    assert "metrics from the previous run" in snapshot_html(kept)
    assert "previous run" not in snapshot_text(snap(metrics=metrics()))


def test_banner_in_text_and_html() -> None:
    s = snap(banner="rank 1 is behind: ranks 0,2 wait in all_sum #5 (cell line 3)")
    assert "! rank 1 is behind: ranks 0,2 wait in all_sum #5 (cell line 3)" in snapshot_text(s)
    html = snapshot_html(s)
    assert "class='mlx-banner'" in html and "wait in all_sum #5" in html
    assert "mlx-banner" not in snapshot_html(snap())


def test_metrics_in_text_and_html() -> None:
    s = snap(metrics=metrics())
    text = snapshot_text(s)
    assert "loss: rank 0 0.06667 (step 29), rank 1 0.1167 (step 29)" in text
    assert "tok_s: rank 0 104, rank 1 105" in text
    html = snapshot_html(s)
    assert html.count("class='mlx-chart'") == 2  # one chart per metric name
    assert html.count("<polyline class='mlx-line'") == 4  # one line per rank in each
    assert ">step</text>" in html and ">time (s)</text>" in html  # x = step when given
    assert snapshot_html(snap(topology_svg="<svg class='topo'></svg>")).count("class='topo'") == 1


def test_chart_axes_ticks_log_scale_and_legend() -> None:
    lines = [
        Line(0, [0, 1, 2, 3], [10.0, 1.0, 0.1, 0.01]),
        Line(1, [0, 1, 2, 3], [9.0, 2.0, 0.2, 0.02]),
    ]
    svg = line_chart_svg(lines, title="loss", x_label="step", y_label="loss")
    assert wants_log([10.0, 0.01]) and not wants_log([1.0, 5.0]) and not wants_log([0.0, 100.0])
    assert "loss (log)" in svg
    assert [t for t in ("0.01", "0.1", "1", "10") if f">{t}</text>" in svg] == [
        "0.01",
        "0.1",
        "1",
        "10",
    ]
    assert svg.count("class='mlx-legend'") == 2 and ">rank 1</text>" in svg
    assert nice_ticks(0, 49) == [0, 20, 40] and nice_ticks(0.5, 1.0) == [0.6, 0.8, 1.0]
    assert line_chart_svg([], title="x", x_label="step") == ""


def test_coinciding_lines_stay_visible() -> None:
    """Every rank reporting the same values: each line is dashed in turn (one dash of each
    rank's colour) and the chart says all ranks are identical; distinct lines stay solid."""
    same = [Line(r, [0, 1, 2], [1.0, 2.0, 3.0]) for r in range(3)]
    svg = line_chart_svg(same, title="loss", x_label="step")
    lines = re.findall(r"<polyline [^>]*>", svg)
    assert len(lines) == 3 and "all ranks identical" in svg
    assert [re.search(r"stroke-dasharray='([^']*)' stroke-dashoffset='([^']*)'", ln).groups()
            for ln in lines] == [("6 12", "0"), ("6 12", "-6"), ("6 12", "-12")]  # fmt: skip
    apart = line_chart_svg(
        [Line(0, [0, 1, 2], [1.0, 2.0, 3.0]), Line(1, [0, 1, 2], [1.0, 2.5, 3.0])],
        title="loss",
        x_label="step",
    )
    assert "stroke-dasharray" not in apart and "all ranks identical" not in apart
    # two of three coincide: those two are dashed, no "all ranks identical"
    two = line_chart_svg([*same[:2], Line(2, [0, 1, 2], [3.0, 2.0, 1.0])], title="l", x_label="s")
    assert two.count("stroke-dasharray='6 6'") == 2 and "all ranks identical" not in two


# --------------------------------------------------------------------------- the live widget
def test_widget_traits_are_the_snapshot_data() -> None:
    s = snap(banner="careful", metrics=metrics(), topology_svg="<svg></svg>")
    w = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=s)
    expected = s.as_dict()
    assert w.snapshot == {
        **{k: v for k, v in expected.items() if k not in ("metrics", "topology_svg")},
        "nodes": list(expected["nodes"]),
        "sparklines": list(expected["sparklines"]),
    }
    assert w.topology_svg == "<svg></svg>"
    # metrics: one entry per (name, rank), the records as columns
    assert [(m["name"], m["rank"]) for m in w.metrics] == [
        ("loss", 0), ("loss", 1), ("tok_s", 0), ("tok_s", 1),
    ]  # fmt: skip
    loss0 = [p for p in s.metrics if p.name == "loss" and p.rank == 0]
    assert w.metrics[0]["value"] == [p.value for p in loss0]
    assert w.metrics[0]["step"] == [p.step for p in loss0]
    assert w.metrics[0]["time"] == [p.time for p in loss0]
    assert w.metrics[2]["step"] == [None] * 5
    json.dumps(w.get_state())  # everything synced is plain JSON

    # update: a new snapshot replaces the data; the same one sends nothing
    sent: list[dict[str, object]] = []
    w.observe(lambda change: sent.append(change), names=["snapshot", "metrics", "topology_svg"])
    w.update(s)
    assert sent == []
    stopped = snap("stopped", nodes=tuple(node(i, "stopped") for i in range(6)))
    w.update(stopped)
    assert (
        w.snapshot["state"] == "stopped"
        and [n["state"] for n in w.snapshot["nodes"]] == ["stopped"] * 6
    )
    assert w.metrics == [] and w.topology_svg == ""
    assert {c["name"] for c in sent} == {"snapshot", "metrics", "topology_svg"}


def test_widget_previous_metrics_flag_and_clear() -> None:
    kept = snap("stopped", metrics=metrics(), metrics_previous=True)
    cleared: list[str] = []
    w = StatusWidget(
        on_stop=lambda: None,
        on_restart=lambda replay: None,
        on_clear=lambda: cleared.append("clear"),
        snapshot=kept,
    )
    assert w.snapshot["metrics_previous"] is True and len(w.metrics) == 4
    w.click("clear")
    assert cleared == ["clear"]
    # Without a callback the widget drops the charts it holds.
    alone = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=kept)
    alone.click("clear")
    assert alone.metrics == []


def test_widget_metrics_are_thinned_and_json_safe() -> None:
    n = MAX_CHART_POINTS * 3
    points = tuple(MetricPoint(0, "loss", float(i), float(i), float(i)) for i in range(n))
    (series,) = metrics_series((*points, MetricPoint(0, "loss", float("nan"), float(n), 0.0)))
    assert len(series["value"]) <= MAX_CHART_POINTS
    assert series["value"][0] == 0.0 and series["value"][-1] is None  # first and last kept
    assert series["step"][-1] == float(n)


def _click(w: StatusWidget, content: dict[str, object]) -> None:
    """A custom message as ipywidgets delivers it from the browser's ``model.send``."""
    w._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})


def test_buttons_call_the_callbacks_and_answer() -> None:
    calls: list[object] = []
    w = StatusWidget(
        on_stop=lambda: calls.append("stop"),
        on_restart=lambda replay: calls.append(("restart", replay)),
        on_side=lambda: calls.append("side"),
        snapshot=snap(),
    )
    answers: list[dict[str, object]] = []
    w.send = lambda content, buffers=None: answers.append(content)  # type: ignore[method-assign]
    _click(w, {"action": "stop"})
    _click(w, {"action": "restart", "replay": False})
    _click(w, {"action": "replay", "replay": True})
    _click(w, {"action": "side", "view": "v1"})
    assert calls == ["stop", ("restart", False), ("restart", True), "side"]
    # Each click is taken at once ("got", before the callback runs), then answered.
    assert [a.get("got") for a in answers[::2]] == ["stop", "restart", "replay", "side"]
    acks = answers[1::2]
    assert [a["ack"] for a in acks] == ["stop", "restart", "replay", "side"]
    assert all(a["error"] is None for a in acks)
    # The answer names the view that was clicked (only that view shows it).
    assert answers[-2] == {"got": "side", "view": "v1"} and acks[-1]["view"] == "v1"
    w.click("stop")
    assert calls[-1] == "stop"


def test_a_failing_callback_is_one_line_in_the_view() -> None:
    def boom() -> None:
        raise RuntimeError("the cluster is already stopping\nsecond line")

    w = StatusWidget(on_stop=boom, on_restart=lambda replay: None, snapshot=snap())
    answers: list[dict[str, object]] = []
    w.send = lambda content, buffers=None: answers.append(content)  # type: ignore[method-assign]
    _click(w, {"action": "stop"})
    assert answers[-1] == {
        "ack": "stop", "error": "the cluster is already stopping", "message": None, "view": None,
    }  # fmt: skip
    _click(w, {"something": "else"})  # not ours: ignored
    assert len(answers) == 2


def test_widget_display_bundle_has_text_and_html_fallbacks() -> None:
    w = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=snap())
    data, _meta = w._repr_mimebundle_()
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
    assert data["text/plain"].startswith("MLX cluster (running): backend mpi, 6 ranks on 3 hosts")
    assert "state" in data["text/plain"].splitlines()[1]
    assert data["text/html"].count("class='mlx-node") == len(NODE_STATES)
    assert w.mimebundle() == data


def test_es_module_and_css_ship_in_the_package() -> None:
    w = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None)
    assert "export default" in w._esm and "model.send" in w._esm
    assert ".mlx-cluster-status" in w._css
    # package data: pyproject ships the front-end files with the package
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"mlx_cluster_magic.views" = ["*.js", "*.css"]' in pyproject
    assert '"mlx_cluster_magic.views"' in pyproject.split("[tool.setuptools]")[1].split("\n\n")[0]


def test_notebook7_extension_ships_whole_with_the_package() -> None:
    """The front-end extension that lets sidecar's panel open in Notebook 7: every file of it
    is a data file of the package, at the place Jupyter looks (``share/jupyter/labextensions``),
    and its package.json names the script that is there."""
    import tomllib

    root = Path(__file__).parents[1]
    source = root / "jupyter-config" / "labextensions" / "mlx-cluster-magic"
    data_files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    shipped = {
        f"{dest}/{Path(f).name}": f
        for dest, files in data_files.items()
        if dest.startswith("share/jupyter/labextensions/")
        for f in files
    }
    expected = {
        f"share/jupyter/labextensions/mlx-cluster-magic/{p.relative_to(source).as_posix()}": (
            p.relative_to(root).as_posix()
        )
        for p in source.rglob("*")
        if p.is_file()
    }
    assert shipped == expected
    meta = json.loads((source / "package.json").read_text())
    assert meta["name"] == "mlx-cluster-magic"
    script = (source / meta["jupyterlab"]["_build"]["load"]).read_text()
    assert 'window._JUPYTERLAB = window._JUPYTERLAB || {})["mlx-cluster-magic"]' in script
    assert meta["jupyterlab"]["_build"]["extension"] in script


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_es_module_renders_the_same_words(tmp_path: Path) -> None:
    """The browser-side formatting matches the Python fallbacks (run under node)."""
    s = snap()
    script = tmp_path / "check.mjs"
    script.write_text(
        f"import * as m from {json.dumps((VIEWS / 'status_widget.js').as_uri())};\n"
        f"const s = {json.dumps({**s.as_dict(), 'nodes': list(s.as_dict()['nodes'])})};\n"
        "console.log(JSON.stringify({header: m.headerText(s), rows: s.nodes.map(m.cells),\n"
        "  broken: m.brokenText({...s, state: 'broken', reason: 'rank 1 died.'}),\n"
        "  chart: m.lineChart([{rank: 0, xs: [0, 1, 2], ys: [10, 1, 0.01]}], 'loss', 'step'),\n"
        "  same: m.lineChart([0, 1].map((rank) => ({rank, xs: [0, 1], ys: [2, 3]})), 'l', 's')}));\n"
    )
    out = json.loads(
        subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout
    )
    from mlx_cluster_magic.views.text import node_cells

    assert out["header"] == header_text(s)
    assert out["rows"] == [node_cells(n) for n in s.nodes]
    assert out["broken"] == "broken: rank 1 died; `%mlx_cluster restart` brings it back."
    assert out["chart"].count("<polyline") == 1 and "log scale" in out["chart"]
    assert re.search(r">step</text>", out["chart"])
    assert "all ranks identical" in out["same"] and "all ranks identical" not in out["chart"]
    assert re.findall(r'stroke-dasharray="(\d+ \d+)" stroke-dashoffset="(-?\d+)"', out["same"]) == [
        ("6 6", "0"),
        ("6 6", "-6"),
    ]


# --------------------------------------------------------------------------- side panel
def test_side_panel_outside_a_kernel_falls_back_inline() -> None:
    w = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=snap())
    assert side.detect_frontend(w)[0] == "terminal"
    said = side.open_side_panel(w)
    assert said.startswith("shown inline: the side panel needs JupyterLab or Notebook 7 (terminal:")
    assert w.side_panel is None


def test_side_panel_title_names_the_notebook_and_the_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=snap())
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert side.panel_title(w) == "notebook: MLX cluster, 6 ranks"
    # The kernel's session name (jupyter_server sets it to the notebook's path) ...
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/work/train.ipynb")
    assert side.panel_title(w) == "train.ipynb: MLX cluster, 6 ranks"
    # ... and better, the name the view in the browser reports.
    w.notebook = "renamed.ipynb"
    assert side.panel_title(w) == "renamed.ipynb: MLX cluster, 6 ranks"
    w.update(snap(n=1, nodes=(node(0, "idle"),)))
    assert side.panel_title(w) == "renamed.ipynb: MLX cluster, 1 rank"


def test_side_panel_is_open_as_its_views_report() -> None:
    """Whether this notebook's panel is still open: from the page that was clicked when there
    is one (it knows which panels it shows), else from the side views' own reports."""
    shown = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=snap())
    asking = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=snap())
    assert shown.key != asking.key and len(shown.key) == 32
    assert not side._is_open(shown, asking)
    _click(shown, {"event": "side_view", "open": True})
    assert shown.side_views == 1 and side._is_open(shown, asking)
    asking.page_side_keys = []  # the page clicked shows no panel: it was closed there
    assert not side._is_open(shown, asking)
    asking.page_side_keys = [shown.key]
    assert side._is_open(shown, asking)
    asking.page_side_keys = None
    _click(shown, {"event": "side_view", "open": False})
    _click(shown, {"event": "side_view", "open": False})  # never below zero
    assert shown.side_views == 0 and not side._is_open(shown, asking)


# --------------------------------------------------------------------------- a real cluster
@pytest.mark.cluster
def test_cluster_views_through_stop_restart_and_abort(no_leaks: None) -> None:
    """What the views get from a real cluster: metrics kept (marked previous) through stop and
    restart until the new run reports or they are cleared; `restarting` with every rank
    `starting` from the moment restart is called; stopped and dead rows without live figures."""
    import time

    from mlx_cluster_magic import MLXCluster

    def wait_for(what: str, check: object, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    report = "for i in range(5): report(step=i, loss=1.0 / (i + 1))"
    with MLXCluster(n=2) as cluster:
        widget = cluster.status_view()
        cluster.view.execute(report)
        wait_for("the metrics", lambda: len(cluster.snapshot().metrics) == 10)
        assert not cluster.snapshot().metrics_previous
        cluster.stop()
        s = cluster.snapshot()
        assert s.state == "stopped" and s.metrics_previous and len(s.metrics) == 10
        assert [node_cells(n)[4:8] for n in s.nodes] == [["-"] * 4] * 2
        assert widget.snapshot["metrics_previous"] and len(widget.metrics) == 2

        seen: list[tuple[str, list[str], bool]] = []
        widget.observe(
            lambda ch: seen.append(
                (
                    ch["new"]["state"],
                    [n["state"] for n in ch["new"]["nodes"]],
                    ch["new"]["metrics_previous"],
                )
            ),
            names=["snapshot"],
        )
        cluster.restart()
        assert seen[0] == ("restarting", ["starting", "starting"], True), seen
        assert seen[-1][0] == "running" and seen[-1][2], seen  # kept until the new run reports
        assert all(state in ("restarting", "running") for state, _, _ in seen), seen
        cluster.view.execute("report(step=0, loss=3.0)")
        wait_for("the new run's metric", lambda: len(cluster.snapshot().metrics) == 2)
        assert not cluster.snapshot().metrics_previous

        cluster.stop()
        assert cluster.snapshot().metrics_previous
        widget.click("clear")  # the view's Clear button
        assert cluster.snapshot().metrics == () and widget.metrics == []

        cluster.restart()
        cluster.abort("aborted by the test")
        s = cluster.snapshot()
        assert s.state == "broken" and [n.state for n in s.nodes] == ["stopped", "stopped"]
        assert [node_cells(n)[3:8] for n in s.nodes] == [["-"] * 5] * 2


# --------------------------------------------------------------------------- clicks mid-cell
def test_ipykernel_names_the_own_thread_relies_on() -> None:
    """The kernel internals behind ``own_subshell``: an upgrade that renames one fails here
    instead of silently queueing clicks behind the running cell again."""
    import ipykernel
    from ipykernel.comm.comm import BaseComm
    from ipykernel.kernelbase import Kernel
    from ipykernel.subshell_manager import SubshellManager

    assert int(ipykernel.__version__.split(".")[0]) >= 7
    assert callable(BaseComm._reply_subshell_for)
    assert callable(SubshellManager._create_subshell) and callable(SubshellManager._delete_subshell)
    assert "shell_channel_thread" in Kernel.class_traits()


@pytest.mark.kernel
def test_a_click_acts_while_the_kernel_runs_a_cell() -> None:
    """A real kernel sleeps in a cell; the Stop message (as the browser sends it) is handled at
    once on the widget's own subshell thread, not after the cell."""
    import ast
    import queue
    import time

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:

        def run(code: str, timeout: float = 30) -> str:
            msg_id = kc.execute(code)
            out = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    m = kc.get_iopub_msg(timeout=1)
                except queue.Empty:
                    continue
                if m["parent_header"].get("msg_id") != msg_id:
                    continue
                if m["msg_type"] == "stream":
                    out.append(m["content"]["text"])
                elif m["msg_type"] == "error":
                    raise AssertionError("\n".join(m["content"]["traceback"]))
                elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    return "".join(out)
            raise AssertionError(f"no answer to {code!r}")

        model_id, subshell = run(
            "import threading, time\n"
            "from mlx_cluster_magic.observe.snapshot import ClusterSnapshot\n"
            "from mlx_cluster_magic.views.status_widget import StatusWidget\n"
            "got = []\n"
            "w = StatusWidget(on_stop=lambda: got.append((time.monotonic(), "
            "threading.current_thread().name)), on_restart=lambda replay: None,\n"
            "                 snapshot=ClusterSnapshot('running', 'mpi', 1, 1, 1.0, ()))\n"
            "print(w.model_id, w.subshell_id)"
        ).split()
        assert subshell != "None"
        cell = kc.execute(
            "t0 = time.monotonic(); time.sleep(4)\n"
            "print([(round(t - t0, 1), name.startswith('subshell')) for t, name in got])"
        )
        time.sleep(1)
        click = kc.session.msg(
            "comm_msg",
            {"comm_id": model_id, "data": {"method": "custom", "content": {"action": "stop"}}},
        )
        kc.shell_channel.send(click)
        sent = time.monotonic()
        acked_after = None
        said = ""
        while time.monotonic() - sent < 20:
            try:
                m = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            data = m["content"].get("data", {})
            if m["msg_type"] == "comm_msg" and data.get("content", {}).get("ack") == "stop":
                acked_after = time.monotonic() - sent
            if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == cell:
                said = m["content"]["text"]
                break
        assert acked_after is not None and acked_after < 2, acked_after  # not after the cell
        (handled,) = ast.literal_eval(said)
        assert handled[1] is True and handled[0] < 3, said  # inside the sleep, on the subshell
        assert "subshell-" not in run(
            "w.close(); time.sleep(0.5); print(sorted(t.name for t in threading.enumerate()))"
        )
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
