"""A sweep's progress as a table: plain data in (``SweepProgress``), HTML or text out.

One row per Mac of the farm: its state (``lent``, ``in use`` by its owner, ``draining``,
``lost``, ``left``, ``starting``), tasks done and running there; above it the sweep's totals
(done / running / queued / failed), the time left at the pace so far, the last result, and one
line per task that failed. Nothing of the cluster is imported: ``cluster.sweep`` fills it in.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

#: How a Mac's state reads, and its colour in the HTML table.
STATE_COLOURS = {
    "lent": "#2e7d32",
    "in use": "#ef6c00",
    "draining": "#1565c0",
    "lost": "#c62828",
    "left": "#757575",
    "starting": "#757575",
}


@dataclass(frozen=True)
class HostProgress:
    """One Mac in a sweep: its farm state and its share of the tasks."""

    host: str
    state: str
    engines: int
    done: int
    running: int
    #: Seconds its owner has left it alone (``--when-idle`` farms), when read.
    idle_s: float | None = None


@dataclass(frozen=True)
class SweepProgress:
    """Everything the table shows, at one moment."""

    total: int
    done: int
    running: int
    queued: int
    failed: int
    elapsed_s: float
    #: Seconds left at the pace so far; None before the first result.
    eta_s: float | None
    last_result: str | None
    hosts: tuple[HostProgress, ...] = ()
    failures: tuple[str, ...] = ()
    #: Tasks re-run elsewhere because their Mac was lost, removed or taken back.
    rerun: int = 0
    finished: bool = False


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summary_line(p: SweepProgress) -> str:
    """``sweep 12/40 done, 3 running, 25 queued, 0 failed; 1m05s left``."""
    left = "finished" if p.finished else f"{_duration(p.eta_s)} left"
    rerun = f", {p.rerun} re-run elsewhere" if p.rerun else ""
    return (
        f"sweep {p.done}/{p.total} done, {p.running} running, {p.queued} queued, "
        f"{p.failed} failed{rerun}; {_duration(p.elapsed_s)} so far, {left}"
    )


def text(p: SweepProgress) -> str:
    """The table for terminals and nbconvert."""
    lines = [summary_line(p)]
    if p.last_result is not None:
        lines.append(f"last result: {p.last_result}")
    width = max([4, *(len(h.host) for h in p.hosts)])
    lines.append(f"{'host':<{width}}  {'state':<9} engines  done  running  idle")
    for h in p.hosts:
        idle = "" if h.idle_s is None else _duration(h.idle_s)
        lines.append(
            f"{h.host:<{width}}  {h.state:<9} {h.engines:>7}  {h.done:>4}  {h.running:>7}  {idle}"
        )
    lines += [f"failed: {f}" for f in p.failures]
    return "\n".join(lines)


def render_html(p: SweepProgress) -> str:
    """The table as HTML, for the cell's output (replaced in place while the sweep runs)."""
    rows = []
    for h in p.hosts:
        colour = STATE_COLOURS.get(h.state, "#000")
        idle = "" if h.idle_s is None else _duration(h.idle_s)
        rows.append(
            f"<tr><td>{html.escape(h.host)}</td>"
            f"<td style='color:{colour};font-weight:600'>{html.escape(h.state)}</td>"
            f"<td>{h.engines}</td><td>{h.done}</td><td>{h.running}</td><td>{idle}</td></tr>"
        )
    done_pct = 100.0 * p.done / p.total if p.total else 100.0
    last = (
        f"<div>last result: <code>{html.escape(p.last_result)}</code></div>"
        if p.last_result is not None
        else ""
    )
    failures = "".join(
        f"<div style='color:#c62828'>failed: {html.escape(f)}</div>" for f in p.failures
    )
    return (
        "<div class='mlx-cluster-sweep'>"
        f"<div><b>{html.escape(summary_line(p))}</b></div>"
        f"<div style='background:#eee;width:24em;height:0.6em'><div style='background:#2e7d32;"
        f"width:{done_pct:.1f}%;height:100%'></div></div>{last}"
        "<table><tr><th>host</th><th>state</th><th>engines</th><th>done</th><th>running</th>"
        f"<th>idle</th></tr>{''.join(rows)}</table>{failures}</div>"
    )


@dataclass
class SweepTable:
    """The last progress shown, as IPython displays it (``_repr_html_`` and text)."""

    progress: SweepProgress
    extra: list[str] = field(default_factory=list)

    def _repr_html_(self) -> str:
        return render_html(self.progress)

    def __repr__(self) -> str:
        return text(self.progress)
