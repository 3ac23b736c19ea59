"""The status view as text and as static HTML, from a ``ClusterSnapshot`` alone.

These are the fallbacks of the live widget (terminal IPython, nbconvert, a notebook opened
without its kernel) and what ``repr`` shows; they word everything as the widget does.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..observe.snapshot import LIVE_NODE_STATES, ClusterSnapshot, MetricPoint, NodeStatus
from .charts import Line, fmt, line_chart_svg, rank_colour

STATE_COLOURS = {
    "starting": "#8a8a8a",
    "idle": "#2e7d32",
    "busy": "#1565c0",
    "unresponsive": "#ef6c00",
    "unreachable": "#8e24aa",
    "dead": "#c62828",
    "stopped": "#616161",
}
#: States whose busy time still counts (the rank was busy when it went silent).
BUSY_TIMED = ("busy", "unresponsive", "unreachable")
CLUSTER_COLOURS = {
    "running": "#2e7d32",
    "starting": "#8a8a8a",
    "restarting": "#8a8a8a",
    "stopping": "#616161",
    "stopped": "#616161",
    "broken": "#c62828",
}
COLUMNS = ("rank", "host", "state", "busy", "heartbeat", "RSS", "MLX active", "MLX peak", "device")
#: How hard each rank and host works, shown where some rank has the figure (GPU, power and
#: temperature only on a Mac with macmon); the widget adds "last minute" (a sparkline).
USAGE_COLUMNS = ("CPU", "host CPU", "GPU", "power", "temp")
RESTART_HINT = "`%mlx_cluster restart` brings it back"
#: Above metrics kept from a run that has ended.
PREVIOUS_RUN = "from the previous run"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def heartbeat_cell(node: NodeStatus) -> str:
    """How fresh the rank's reports are; an unresponsive rank says how long it has been silent
    and that its process is alive (a C call holding the GIL, not a crash). A rank that is not
    live (starting, stopped, dead) has no heartbeat: ``-``."""
    if node.state == "unresponsive":
        silent = node.silent_s if node.silent_s is not None else node.last_seen_s
        return f"silent {human_seconds(silent)}, process alive"
    if node.state == "unreachable":
        return f"since {node.silent_s or 0.0:.0f} s"
    if node.last_seen_s is None or node.state not in LIVE_NODE_STATES:
        return "-"
    return f"{node.last_seen_s:.1f} s ago"


def node_cells(node: NodeStatus) -> list[str]:
    """The row's cells; a stopped or dead rank's last report is not shown as if live (``-``
    for its busy time, heartbeat, RSS and MLX memory)."""
    live = node.state in LIVE_NODE_STATES
    return [
        str(node.rank),
        node.host,
        node.state,
        human_seconds(node.busy_s) if node.state in BUSY_TIMED else "-",
        heartbeat_cell(node),
        human_bytes(node.rss_bytes if live else None),
        human_bytes(node.mlx_active_bytes if live else None),
        human_bytes(node.mlx_peak_bytes if live else None),
        node.device or "-",
    ]


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{math.floor(v + 0.5)} %"  # halves up, as the widget's JS


def _pair(a: float | None, b: float | None, unit: str, digits: int) -> str:
    if a is None and b is None:
        return "-"

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    return f"{f(a)} / {f(b)} {unit}"


def usage_cells(node: NodeStatus) -> dict[str, str]:
    """The usage columns' text by name: the rank's process CPU (100 % is one core), its host's
    CPU and GPU use, CPU / GPU power and temperature; ``-`` for a rank that is not live."""
    n = node if node.state in LIVE_NODE_STATES else None

    def get(name: str) -> float | None:
        return None if n is None else getattr(n, name)

    return {
        "CPU": _percent(get("cpu_percent")),
        "host CPU": _percent(get("host_cpu_percent")),
        "GPU": _percent(get("gpu_percent")),
        "power": _pair(get("cpu_w"), get("gpu_w"), "W", 1),
        "temp": _pair(get("cpu_temp_c"), get("gpu_temp_c"), "°C", 0),
    }


def usage_columns(nodes: Sequence[NodeStatus]) -> list[str]:
    """The usage columns some rank has a figure for; a column nobody can fill is absent."""
    fields = {
        "CPU": ("cpu_percent",),
        "host CPU": ("host_cpu_percent",),
        "GPU": ("gpu_percent",),
        "power": ("cpu_w", "gpu_w"),
        "temp": ("cpu_temp_c", "gpu_temp_c"),
    }
    return [
        c for c in USAGE_COLUMNS if any(getattr(n, f) is not None for n in nodes for f in fields[c])
    ]


def header_text(s: ClusterSnapshot) -> str:
    """``MLX cluster (running): backend mpi, 2 ranks on 1 host, uptime 3.2 s``."""
    uptime = human_seconds(s.uptime_s) if s.state == "running" else "-"
    kept = f", kept {s.kept}" if s.kept else ""  # (it outlives the kernel: attach ID)
    return (
        f"MLX cluster ({s.state}): backend {s.backend}, {s.n} ranks on "
        f"{s.hosts} host{'s' if s.hosts != 1 else ''}, uptime {uptime}{kept}"
    )


def broken_text(s: ClusterSnapshot) -> str | None:
    """Why the cluster broke and how to bring it back; for a stopped cluster, who stopped it
    (``stopped from the status view``); else None."""
    if s.state == "stopped" and s.reason:
        return s.reason.rstrip(". ")
    if s.state != "broken":
        return None
    reason = (s.reason or "the cluster was aborted").rstrip(". ")
    return f"broken: {reason}; {s.advice or RESTART_HINT}."


def _rows(nodes: Sequence[NodeStatus]) -> tuple[list[str], list[list[str]]]:
    usage = usage_columns(nodes)
    rows = []
    for n in nodes:
        cells = usage_cells(n)
        rows.append([*node_cells(n), *(cells[c] for c in usage)])
    return [*COLUMNS, *usage], rows


def nodes_text(nodes: Sequence[NodeStatus]) -> str:
    columns, rows = _rows(nodes)
    table = [columns, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"rank {n.rank}: {n.why}" for n in nodes if n.why]
    hint = next((n.usage_hint for n in nodes if n.usage_hint), None)
    if hint:
        lines.append(f"GPU, power and temperature: {hint}")
    return "\n".join(lines)


def nodes_html(nodes: Sequence[NodeStatus]) -> str:
    columns, texts = _rows(nodes)
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{c}</th>" for c in columns)
    rows = []
    for node, text in zip(nodes, texts):
        cells = [html.escape(c) for c in text]
        colour = STATE_COLOURS.get(node.state, "#000")
        cells[2] = f"<span style='color:{colour};font-weight:bold'>&#9679; {cells[2]}</span>"
        tds = "".join(f"<td style='padding:2px 8px'>{c}</td>" for c in cells)
        title = f" title='{html.escape(node.why, quote=True)}'" if node.why else ""
        rows.append(
            f"<tr class='mlx-node mlx-{node.state}' data-rank='{node.rank}'{title}>{tds}</tr>"
        )
    return (
        "<table class='mlx-cluster-nodes' style='border-collapse:collapse;font-family:monospace'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Series:
    """One metric of one rank, in the order it was reported."""

    name: str
    rank: int
    steps: tuple[float | None, ...]
    times: tuple[float, ...]
    values: tuple[float, ...]

    @property
    def by_step(self) -> bool:
        return all(s is not None for s in self.steps)


def group_metrics(points: Iterable[MetricPoint]) -> list[Series]:
    """The records grouped by metric name, then rank (names in first-reported order)."""
    groups: dict[tuple[str, int], list[MetricPoint]] = {}
    for p in points:
        groups.setdefault((p.name, p.rank), []).append(p)
    order = {name: i for i, name in enumerate(dict.fromkeys(name for name, _ in groups))}
    return [
        Series(
            name=name,
            rank=rank,
            steps=tuple(p.step for p in pts),
            times=tuple(p.time for p in pts),
            values=tuple(p.value for p in pts),
        )
        for (name, rank), pts in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
    ]


def _chart_lines(series: Sequence[Series]) -> tuple[list[Line], str]:
    """x = step when every rank gave one, else seconds since the metric's first record."""
    if all(s.by_step for s in series):
        lines = [Line(s.rank, [float(x or 0) for x in s.steps], s.values) for s in series]
        return lines, "step"
    t0 = min(t for s in series for t in s.times)
    return [Line(s.rank, [t - t0 for t in s.times], s.values) for s in series], "time (s)"


def metrics_text(points: Sequence[MetricPoint], previous: bool = False) -> str:
    """One line per metric: each rank's latest value (and step); ``previous``: headed
    ``metrics from the previous run:``."""
    lines = [f"metrics {PREVIOUS_RUN}:"] if previous and points else []
    by_name: dict[str, list[Series]] = {}
    for s in group_metrics(points):
        by_name.setdefault(s.name, []).append(s)
    for name, series in by_name.items():
        latest = []
        for s in series:
            step = s.steps[-1]
            at = f" (step {fmt(step)})" if step is not None else ""
            latest.append(f"rank {s.rank} {fmt(s.values[-1])}{at}")
        lines.append(f"{name}: {', '.join(latest)}")
    return "\n".join(lines)


def metrics_html(points: Sequence[MetricPoint], previous: bool = False) -> str:
    by_name: dict[str, list[Series]] = {}
    for s in group_metrics(points):
        by_name.setdefault(s.name, []).append(s)
    charts = []
    for name, series in by_name.items():
        lines, x_label = _chart_lines(series)
        charts.append(line_chart_svg(lines, title=name, x_label=x_label, y_label=name))
    if not charts:
        return ""
    caption = (
        f"<div class='mlx-previous-note' style='color:#616161'>metrics {PREVIOUS_RUN}</div>"
        if previous
        else ""
    )
    return f"<div class='mlx-metrics'>{caption}{''.join(charts)}</div>"


# --------------------------------------------------------------------------- the whole view
def snapshot_text(s: ClusterSnapshot) -> str:
    """Header line, then the table; then why it broke, the banner and the latest metrics."""
    parts = [header_text(s), nodes_text(s.nodes)]
    broken = broken_text(s)
    if broken:
        parts.append(broken)
    if s.banner:
        parts.append(f"! {s.banner}")
    if s.metrics:
        parts.append(metrics_text(s.metrics, previous=s.metrics_previous))
    return "\n".join(parts)


def snapshot_html(s: ClusterSnapshot, saved_at: str | None = None) -> str:
    """The same as static HTML: header, why it broke, banner, table, metric charts, topology.

    ``saved_at`` marks it as what a notebook keeps beside a live view (shown where the live view
    cannot be: a notebook opened before its cells run, the docs site): a record of the moment,
    not a cluster that runs now."""
    colour = CLUSTER_COLOURS.get(s.state, "#000")
    header = header_text(s)
    if saved_at is not None:
        header = header.replace(f"({s.state})", f"({s.state} at {saved_at}, when saved)", 1)
    parts = [
        f"<div class='mlx-cluster-status mlx-static mlx-cluster-{html.escape(s.state)}'>",
        f"<div class='mlx-header'><span style='color:{colour}'>&#9679;</span> "
        f"<b>{html.escape(header)}</b></div>",
    ]
    if saved_at is not None:
        parts.append(
            "<div class='mlx-saved' style='color:#616161'>a record of this cell's output; the "
            "live view shows once this notebook's kernel runs the cluster</div>"
        )
    broken = broken_text(s)
    if broken:
        colour = "#c62828" if s.state == "broken" else "#616161"
        parts.append(f"<div class='mlx-broken' style='color:{colour}'>{html.escape(broken)}</div>")
    if s.banner:
        parts.append(
            "<div class='mlx-banner' style='background:#fff3e0;border-left:4px solid #ef6c00;"
            f"padding:4px 8px;margin:4px 0'>{html.escape(s.banner)}</div>"
        )
    parts.append(nodes_html(s.nodes))
    if s.metrics:
        parts.append(metrics_html(s.metrics, previous=s.metrics_previous))
    if s.topology_svg:
        parts.append(f"<div class='mlx-topology'>{s.topology_svg}</div>")
    parts.append("</div>")
    return "".join(parts)


__all__ = [
    "COLUMNS",
    "PREVIOUS_RUN",
    "STATE_COLOURS",
    "Series",
    "broken_text",
    "group_metrics",
    "header_text",
    "human_bytes",
    "human_seconds",
    "metrics_html",
    "metrics_text",
    "nodes_html",
    "nodes_text",
    "rank_colour",
    "snapshot_html",
    "snapshot_text",
]
