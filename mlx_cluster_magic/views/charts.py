"""Small line charts as inline SVG: one line per rank, axes with ticks, one legend.

Lines that coincide (every rank reports the same values) are dashed in turn, each rank one dash
of its colour, and a chart where all of them coincide says "all ranks identical".

Drawn in Python for the static views (gather results, the HTML fallback of the status view),
which must render anywhere a notebook's HTML does, with no plotting library. The live widget
draws the same charts in its ES module (``status_widget.js``) with the same rules.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: One colour per rank, shared with ``status_widget.js``.
RANK_COLOURS = ("#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037")
#: A range spanning at least this ratio (two decades) of positive values is drawn on a log axis.
LOG_RATIO = 100.0
#: Length of one rank's dash where several ranks' lines coincide.
DASH = 6


@dataclass(frozen=True)
class Line:
    """One rank's series: x and y of equal length."""

    rank: int
    xs: Sequence[float]
    ys: Sequence[float]


def rank_colour(rank: int) -> str:
    return RANK_COLOURS[rank % len(RANK_COLOURS)]


def wants_log(values: Sequence[float]) -> bool:
    """Log scale when every value is positive and the range spans two decades or more."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_RATIO


def is_constant(values: Sequence[float]) -> bool:
    return len(set(values)) <= 1


def fmt(v: float) -> str:
    """A tick or value label: short, no float noise."""
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten within [lo, hi] (lo > 0)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0**k for k in range(a, b + 1) if lo * (1 - 1e-9) <= 10.0**k <= hi * (1 + 1e-9)]


def overlapping(drawn: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[int, int]]:
    """For each drawn line (its points in pixels): its place among the lines drawn over it
    (the same points, to the pixel) and how many they are; ``(0, 1)`` for a line alone."""
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    keys = []
    for i, pts in enumerate(drawn):
        key = tuple((round(x), round(y)) for x, y in pts)
        keys.append(key)
        groups.setdefault(key, []).append(i)
    return [(groups[key].index(i), len(groups[key])) for i, key in enumerate(keys)]


def dashes(k: int, m: int) -> str:
    """The dash attributes of the ``k``-th of ``m`` lines drawn over each other: each draws
    one dash in turn, so every rank's colour stays visible; "" for a line alone."""
    if m < 2:
        return ""
    return f" stroke-dasharray='{DASH} {DASH * (m - 1)}' stroke-dashoffset='{-DASH * k}'"


@dataclass(frozen=True)
class _Frame:
    """Where a chart's plot area sits and how data maps into it."""

    left: float
    top: float
    pw: float  # plot width
    ph: float  # plot height
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    log: bool

    def tx(self, x: float) -> float:
        return self.left + self.pw * (x - self.x_lo) / (self.x_hi - self.x_lo)

    def ty(self, y: float) -> float:
        if self.log:
            lo, hi = math.log10(self.y_lo), math.log10(self.y_hi)
            frac = (math.log10(y) - lo) / (hi - lo)
        else:
            frac = (y - self.y_lo) / (self.y_hi - self.y_lo)
        return self.top + self.ph * (1 - frac)


def _frame(lines: Sequence[Line], width: int, height: int, legend_w: int) -> _Frame | None:
    """The plot area and data ranges (log y when the values span decades); None when there
    is nothing finite to draw."""
    xs = [x for ln in lines for x in ln.xs if math.isfinite(x)]
    ys = [y for ln in lines for y in ln.ys if math.isfinite(y)]
    if not xs or not ys:
        return None
    log = wants_log(ys)
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if y_lo == y_hi:
        y_lo, y_hi = (y_lo * 0.9, y_hi * 1.1) if log else (y_lo - 1, y_hi + 1)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    left, right, top, bottom = 52, 12, 22, 34
    pw, ph = width - left - right - legend_w, height - top - bottom
    return _Frame(left, top, pw, ph, x_lo, x_hi, y_lo, y_hi, log)


def _axes(f: _Frame, height: int, x_label: str, y_label: str) -> list[str]:
    """Tick lines and labels on both axes, and the axes' names."""
    parts = []
    for t in log_ticks(f.y_lo, f.y_hi) if f.log else nice_ticks(f.y_lo, f.y_hi):
        y = f.ty(t)
        parts.append(
            f"<line x1='{f.left - 3}' x2='{f.left + f.pw}' y1='{y:.1f}' y2='{y:.1f}' "
            f"stroke='#eee'/><text x='{f.left - 5}' y='{y + 3:.1f}' text-anchor='end'>"
            f"{fmt(t)}</text>"
        )
    bottom = f.top + f.ph
    for t in nice_ticks(f.x_lo, f.x_hi):
        x = f.tx(t)
        parts.append(
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{bottom}' y2='{bottom + 3}' stroke='#888'/>"
            f"<text x='{x:.1f}' y='{bottom + 13}' text-anchor='middle'>{fmt(t)}</text>"
        )
    y_axis = html.escape(y_label + (" (log)" if f.log else ""))
    mid = f.top + f.ph / 2
    parts.append(
        f"<text x='{f.left + f.pw / 2:.1f}' y='{height - 4}' text-anchor='middle' "
        f"class='mlx-x-label'>{html.escape(x_label)}</text>"
        f"<text x='10' y='{mid:.1f}' text-anchor='middle' class='mlx-y-label' "
        f"transform='rotate(-90 10 {mid:.1f})'>{y_axis}</text>"
    )
    return parts


def _polylines(f: _Frame, lines: Sequence[Line], line_class: str) -> list[str]:
    """One polyline per rank; ranks whose lines coincide are dashed in turn, and a chart where
    all coincide says so."""
    drawn = [
        [
            (f.tx(x), f.ty(y))
            for x, y in zip(ln.xs, ln.ys)
            if math.isfinite(x) and math.isfinite(y) and (y > 0 or not f.log)
        ]
        for ln in lines
    ]
    overlaps = overlapping(drawn)
    parts = []
    if len(lines) > 1 and all(m == len(lines) for _, m in overlaps):
        parts.append(
            f"<text x='{f.left + f.pw}' y='13' text-anchor='end' class='mlx-identical' "
            f"fill='#555'>all ranks identical</text>"
        )
    for ln, pts, (k, m) in zip(lines, drawn, overlaps):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(
            f"<polyline class='{line_class}' data-rank='{ln.rank}' fill='none' "
            f"stroke='{rank_colour(ln.rank)}' stroke-width='1.5'{dashes(k, m)} "
            f"points='{points}'><title>rank {ln.rank}</title></polyline>"
        )
    return parts


def _legend(lines: Sequence[Line], x: float, top: float) -> list[str]:
    parts = []
    for i, ln in enumerate(sorted(lines, key=lambda ln: ln.rank)):
        y = top + 8 + 14 * i
        colour = rank_colour(ln.rank)
        parts.append(
            f"<g class='mlx-legend'><line x1='{x}' x2='{x + 14}' y1='{y - 3}' y2='{y - 3}' "
            f"stroke='{colour}' stroke-width='2'/><text x='{x + 18}' y='{y}' "
            f"fill='{colour}'>rank {ln.rank}</text></g>"
        )
    return parts


def line_chart_svg(
    lines: Sequence[Line],
    *,
    title: str,
    x_label: str,
    y_label: str = "",
    width: int = 420,
    height: int = 200,
    line_class: str = "mlx-line",
    legend: bool = True,
) -> str:
    """One polyline per rank with axes (ticks on x and y, log y when it spans decades) and one
    legend on the right. Empty string when there is nothing to draw."""
    lines = [ln for ln in lines if len(ln.xs) and len(ln.xs) == len(ln.ys)]
    legend_w = 70 if legend else 0
    f = _frame(lines, width, height, legend_w)
    if f is None:
        return ""
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"class='mlx-chart' font-family='sans-serif' font-size='10'>",
        f"<text x='{f.left}' y='13' font-size='12' font-weight='bold'>{html.escape(title)}</text>",
        f"<rect x='{f.left}' y='{f.top}' width='{f.pw}' height='{f.ph}' fill='none' "
        "stroke='#bbb'/>",
        *_axes(f, height, x_label, y_label),
        *_polylines(f, lines, line_class),
        *(_legend(lines, width - legend_w + 6, f.top) if legend else []),
        "</svg>",
    ]
    return "".join(parts)
