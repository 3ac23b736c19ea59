"""The live status view: one cached ipywidget per cluster, refreshed from ``cluster.nodes()``.

The same rows render as HTML and plain text for front ends without widgets (terminal IPython,
nbconvert, static renders).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .status import NodeStatus

if TYPE_CHECKING:
    from .cluster import MLXCluster

STATE_COLOURS = {"starting": "#8a8a8a", "idle": "#2e7d32", "busy": "#1565c0", "dead": "#c62828"}
COLUMNS = ("rank", "host", "state", "busy", "heartbeat", "RSS", "MLX active", "MLX peak", "device")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _cells(node: NodeStatus) -> list[str]:
    return [
        str(node.rank),
        node.host,
        node.state,
        human_seconds(node.busy_s) if node.state == "busy" else "-",
        "-" if node.last_seen_s is None else f"{node.last_seen_s:.1f} s ago",
        human_bytes(node.rss_bytes),
        human_bytes(node.mlx_active_bytes),
        human_bytes(node.mlx_peak_bytes),
        node.device or "-",
    ]


def header_text(cluster: MLXCluster) -> str:
    p = cluster.placement
    hosts = len({h.ssh for h in p.hosts})
    state = "running" if cluster.running else "stopped"
    uptime = (
        human_seconds(time.time() - cluster.started_at)
        if cluster.running and cluster.started_at
        else "-"
    )
    return (
        f"MLX cluster ({state}): backend {cluster.backend}, {cluster.n} ranks on "
        f"{hosts} host{'s' if hosts != 1 else ''}, uptime {uptime}"
    )


def nodes_html(nodes: Sequence[NodeStatus]) -> str:
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{c}</th>" for c in COLUMNS)
    rows = []
    for node in nodes:
        cells = [html.escape(c) for c in _cells(node)]
        colour = STATE_COLOURS.get(node.state, "#000")
        cells[2] = f"<span style='color:{colour};font-weight:bold'>&#9679; {cells[2]}</span>"
        tds = "".join(f"<td style='padding:2px 8px'>{c}</td>" for c in cells)
        rows.append(f"<tr class='mlx-node mlx-{node.state}' data-rank='{node.rank}'>{tds}</tr>")
    return (
        "<table class='mlx-cluster-nodes' style='border-collapse:collapse;font-family:monospace'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def nodes_text(nodes: Sequence[NodeStatus]) -> str:
    table = [list(COLUMNS), *(_cells(n) for n in nodes)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


class StatusView:
    """The widget: a header with Stop/Restart buttons and a table with one row per rank."""

    def __init__(self, cluster: MLXCluster) -> None:
        import ipywidgets as w

        self.cluster = cluster
        self.header = w.HTML()
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop")
        self.restart_button = w.Button(
            description="Restart", button_style="warning", icon="refresh"
        )
        self.stop_button.on_click(lambda _b: self._stop())
        self.restart_button.on_click(lambda _b: self._restart())
        self.table = w.HTML()
        self.widget = w.VBox(
            [w.HBox([self.header, self.stop_button, self.restart_button]), self.table]
        )
        self.widget.add_class("mlx-cluster-status")
        self.refresh()

    def _stop(self) -> None:
        if self.cluster.running:
            self.cluster.stop()
        self.refresh()

    def _restart(self) -> None:
        self.cluster.restart(activate=True)
        self.refresh()

    def refresh(self) -> None:
        nodes = self.cluster._node_records() if self.cluster.running else self.cluster.last_nodes
        self.header.value = f"<b>{html.escape(header_text(self.cluster))}</b>"
        self.table.value = nodes_html(nodes)
        self.stop_button.disabled = not self.cluster.running

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = f"{header_text(self.cluster)}\n{nodes_text(self.cluster.last_nodes)}"
        return bundle
