"""A gathered variable as the notebook shows it: the ranks' summaries compared (``GatherResult``),
one verdict wording for text and HTML, series as charts.

The ranks' summaries (``rank.gather_summary.Summary``) are typed by their shape (a protocol),
so this module imports nothing of the rank side.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .charts import Line, fmt, is_constant, line_chart_svg

AGREE_COLOUR = "#2e7d32"
DIFFER_COLOUR = "#c62828"
NEUTRAL_COLOUR = "#555"


class SummaryLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def series(self) -> list[float] | None: ...
    @property
    def axis(self) -> str: ...
    @property
    def checksum(self) -> str: ...
    @property
    def value(self) -> Any: ...


class ResultLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def summaries(self) -> Sequence[SummaryLike]: ...
    @property
    def hosts(self) -> Sequence[str]: ...
    @property
    def diverged(self) -> list[int]: ...
    @property
    def agree(self) -> bool: ...


def ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def is_series(r: ResultLike) -> bool:
    return any(s.kind == "series" for s in r.summaries)


def verdict(r: ResultLike) -> str:
    """The one wording: ``identical on 2/2 ranks`` or ``differs from rank 0 on 1/2 ranks
    (rank 1)``; ``not defined on rank 0`` when rank 0 lacks it."""
    n = len(r.summaries)
    if r.summaries and r.summaries[0].kind == "missing":
        return "not defined on rank 0"
    if r.agree:
        return f"identical on {n}/{n} ranks"
    d = r.diverged
    return f"differs from rank 0 on {len(d)}/{n} ranks ({ranks_text(d)})"


def verdict_colour(r: ResultLike) -> str:
    """Green when identical; red when values differ; neutral for series (per-rank loss
    histories are expected to differ)."""
    if r.agree:
        return AGREE_COLOUR
    return NEUTRAL_COLOUR if is_series(r) else DIFFER_COLOUR


def axis(r: ResultLike) -> str:
    """``step`` for lists of numbers (a history), ``element`` for arrays."""
    kinds = {s.axis for s in r.summaries if s.series}
    return "step" if kinds == {"step"} else "element"


def constant_note(r: ResultLike) -> str | None:
    """``constant 3 at every step`` for a flat history, ``every element is 3`` for a flat
    array (or per rank) when every rank's series is flat."""
    series = [s.series for s in r.summaries]
    if not any(series) or not all(s and is_constant(s) for s in series if s is not None):
        return None
    values = [(rank, s[0]) for rank, s in enumerate(series) if s]
    same = len({v for _, v in values}) == 1
    per_rank = ", ".join(f"rank {r} {fmt(v)}" for r, v in values)
    if axis(r) == "element":
        return (
            f"every element is {fmt(values[0][1])}"
            if same
            else f"all elements equal on each rank: {per_rank}"
        )
    return (
        f"constant {fmt(values[0][1])} at every step"
        if same
        else f"constant at every step: {per_rank}"
    )


def gather_text(r: ResultLike) -> str:
    head = f"{r.name}: {verdict(r)}"
    note = constant_note(r)
    if r.agree:
        text = f"{head}: {r.summaries[0].text}"
        return f"{text} ({note})" if note else text
    lines = [head + (f"; {note}" if note else "")]
    for rank, s in enumerate(r.summaries):
        mark = "*" if rank in r.diverged else " "
        lines.append(f"{mark} rank {rank} ({r.hosts[rank]}): {s.text}")
    return "\n".join(lines)


def series_chart(r: ResultLike, width: int = 480, height: int = 220) -> str:
    """One line per rank (rank 0's alone when all agree) against the step or element; ""
    when flat."""
    if constant_note(r) is not None:
        return ""
    lines = [
        Line(rank, list(range(len(s.series))), s.series)
        for rank, s in enumerate(r.summaries)
        if s.series and (not r.agree or rank == 0)
    ]
    return line_chart_svg(
        lines,
        title=f"{r.name} per rank" if not r.agree else f"{r.name} (identical on every rank)",
        x_label=axis(r),
        y_label=r.name,
        width=width,
        height=height,
        line_class="mlx-series",
    )


def gather_html(r: ResultLike) -> str:
    name = html.escape(r.name)
    colour = verdict_colour(r)
    series = is_series(r)
    note = constant_note(r)
    note_html = f" <span class='mlx-constant'>({html.escape(note)})</span>" if note else ""
    head = (
        f"<b>{name}</b>: <span class='mlx-verdict' style='color:{colour}'>"
        f"{html.escape(verdict(r))}</span>{note_html}"
    )
    if r.agree:
        body = f"<pre>{html.escape(r.summaries[0].text)}</pre>"
        cls = "mlx-agree"
    else:
        rows = []
        for rank, s in enumerate(r.summaries):
            differs = rank in r.diverged
            style = ""
            if differs:
                style = " style='background:#f3f3f3'" if series else " style='background:#ffebee'"
            rows.append(
                f"<tr class='{'mlx-diverged' if differs else 'mlx-same'}'{style}><td>{rank}</td>"
                f"<td>{html.escape(r.hosts[rank])}</td>"
                f"<td><code>{html.escape(s.text)}</code></td></tr>"
            )
        body = (
            "<table><tr><th>rank</th><th>host</th><th>value</th></tr>" + "".join(rows) + "</table>"
        )
        cls = "mlx-differ mlx-neutral" if series else "mlx-differ"
    chart = series_chart(r) if any(s.series for s in r.summaries) else ""
    return f"<div class='mlx-gather {cls}'>{head}{body}{chart}</div>"


def many_text(results: Sequence[ResultLike]) -> str:
    return "\n".join(gather_text(r) for r in results)


def many_html(results: Sequence[ResultLike]) -> str:
    return "<div class='mlx-gather-many'>" + "".join(gather_html(r) for r in results) + "</div>"


@dataclass(frozen=True)
class GatherResult:
    """One variable from every rank: ``.values`` by rank, ``.agree``, ``.diverged`` ranks."""

    name: str
    summaries: Sequence[SummaryLike]
    hosts: list[str]

    @property
    def values(self) -> list[Any]:
        """The values by rank (``None`` where an array was over the size limit)."""
        return [s.value for s in self.summaries]

    @property
    def diverged(self) -> list[int]:
        """The ranks whose value differs from rank 0's."""
        ref = self.summaries[0].checksum
        return [r for r, s in enumerate(self.summaries) if s.checksum != ref]

    @property
    def agree(self) -> bool:
        return not self.diverged and self.summaries[0].kind != "missing"

    def __repr__(self) -> str:
        return gather_text(self)

    def _repr_html_(self) -> str:
        return gather_html(self)


class GatherResults(list[GatherResult]):
    """Several gathered variables (``gather a b``): a list that renders each view."""

    def __repr__(self) -> str:
        return many_text(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        return many_html(self)


def render_many(results: list[GatherResult]) -> GatherResults:
    """The results of ``gather a b ...`` as one displayable list."""
    return GatherResults(results)


def series_svg(series: list[list[float]], title: str, width: int = 480, height: int = 220) -> str:
    """One line per rank against the step, as inline SVG with axes and one legend."""
    lines = [Line(rank, list(range(len(s))), s) for rank, s in enumerate(series) if s]
    return line_chart_svg(
        lines,
        title=f"{title} per rank",
        x_label="step",
        y_label=title,
        width=width,
        height=height,
        line_class="mlx-series",
    )
