"""Collective results: fetch one variable from every rank and show whether the ranks agree.

Arrays (MLX or NumPy) are summarised on the engines (shape, dtype, min/mean/max, a checksum);
only arrays up to ``limit_bytes`` travel in full. A numeric series per rank (a loss history)
is drawn as one line per rank. No IPython import.
"""

from __future__ import annotations

import hashlib
import html
import pickle
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LIMIT_BYTES = 1 << 20
SERIES_COLOURS = ("#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037")


@dataclass(frozen=True)
class Summary:
    """What one rank holds: a short description, a checksum to compare, maybe the value."""

    kind: str  # array, series, value, missing
    text: str
    checksum: str
    value: Any = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    stats: dict[str, float] = field(default_factory=dict)
    series: list[float] | None = None


def summarize(value: Any, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> Summary:
    """Runs on an engine: describe ``value`` without sending a large array back."""
    import numpy as np

    if type(value).__module__.startswith("mlx"):
        import mlx.core as mx

        if isinstance(value, mx.array):
            value = np.array(value.astype(mx.float32) if value.dtype == mx.bfloat16 else value)
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        value = np.asarray(value, dtype=np.float64)
        series = True
    else:
        series = isinstance(value, np.ndarray) and value.ndim == 1 and value.size > 1
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        digest = hashlib.sha1(f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()).hexdigest()[
            :16
        ]
        stats: dict[str, float] = {}
        if arr.size and np.issubdtype(arr.dtype, np.number):
            stats = {"min": float(arr.min()), "mean": float(arr.mean()), "max": float(arr.max())}
        text = f"{arr.dtype}{list(arr.shape)}" + (
            f" min {stats['min']:.6g} mean {stats['mean']:.6g} max {stats['max']:.6g}"
            if stats
            else ""
        )
        small = arr.nbytes <= limit_bytes
        return Summary(
            kind="series" if series else "array",
            text=text,
            checksum=digest,
            value=arr if small else None,
            shape=tuple(arr.shape),
            dtype=str(arr.dtype),
            stats=stats,
            series=[float(x) for x in arr[:10_000]] if series and small else None,
        )
    try:
        raw = pickle.dumps(value)
    except Exception:
        raw = repr(value).encode()
    text = repr(value)
    return Summary(
        kind="value",
        text=text if len(text) <= 200 else text[:197] + "...",
        checksum=hashlib.sha1(raw).hexdigest()[:16],
        value=value if len(raw) <= limit_bytes else None,
    )


def summarize_name(name: str, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> Summary:
    """Runs on an engine: summarise the user's variable ``name``."""
    from IPython import get_ipython

    ns = get_ipython().user_ns  # type: ignore[union-attr]
    if name not in ns:
        return Summary(kind="missing", text=f"{name!r} is not defined", checksum="missing")
    return summarize(ns[name], limit_bytes)


@dataclass(frozen=True)
class GatherResult:
    """One variable from every rank: ``.values`` by rank, ``.agree``, ``.diverged`` ranks."""

    name: str
    summaries: list[Summary]
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
        n = len(self.summaries)
        if self.agree:
            return f"{self.name}: identical on {n}/{n} ranks: {self.summaries[0].text}"
        lines = [f"{self.name}: differs on rank(s) {self.diverged} of {n}"]
        for r, s in enumerate(self.summaries):
            mark = "*" if r in self.diverged else " "
            lines.append(f"{mark} rank {r} ({self.hosts[r]}): {s.text}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        n = len(self.summaries)
        name = html.escape(self.name)
        parts = []
        if self.agree:
            parts.append(
                f"<div class='mlx-gather mlx-agree'><b>{name}</b>: "
                f"<span style='color:#2e7d32'>identical on {n}/{n} ranks</span>"
                f"<pre>{html.escape(self.summaries[0].text)}</pre></div>"
            )
        else:
            rows = []
            for r, s in enumerate(self.summaries):
                style = " style='background:#ffebee'" if r in self.diverged else ""
                cls = "mlx-diverged" if r in self.diverged else "mlx-same"
                rows.append(
                    f"<tr class='{cls}'{style}><td>{r}</td><td>{html.escape(self.hosts[r])}</td>"
                    f"<td><code>{html.escape(s.text)}</code></td></tr>"
                )
            parts.append(
                f"<div class='mlx-gather mlx-differ'><b>{name}</b>: "
                f"<span style='color:#c62828'>differs on {len(self.diverged)}/{n} ranks "
                f"{self.diverged}</span><table><tr><th>rank</th><th>host</th><th>value</th></tr>"
                f"{''.join(rows)}</table></div>"
            )
        if any(s.series for s in self.summaries):
            parts.append(series_svg([s.series or [] for s in self.summaries], self.name))
        return "".join(parts)


def series_svg(series: list[list[float]], title: str, width: int = 480, height: int = 220) -> str:
    """One line per rank, as inline SVG (no plotting library needed, renders anywhere)."""
    points = [v for s in series for v in s]
    if not points:
        return ""
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    longest = max(len(s) for s in series)
    pad = 30

    def xy(i: int, v: float) -> str:
        x = pad + (width - 2 * pad) * (i / max(longest - 1, 1))
        y = height - pad - (height - 2 * pad) * ((v - lo) / span)
        return f"{x:.1f},{y:.1f}"

    lines = []
    for rank, s in enumerate(series):
        colour = SERIES_COLOURS[rank % len(SERIES_COLOURS)]
        pts = " ".join(xy(i, v) for i, v in enumerate(s))
        lines.append(
            f"<polyline class='mlx-series' data-rank='{rank}' fill='none' stroke='{colour}' "
            f"stroke-width='1.5' points='{pts}'><title>rank {rank}</title></polyline>"
            f"<text x='{width - pad + 2}' y='{pad + 12 * rank}' font-size='10' "
            f"fill='{colour}'>rank {rank}</text>"
        )
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width + 40}' height='{height}' "
        f"class='mlx-series-plot'><text x='{pad}' y='14' font-size='12'>{html.escape(title)} "
        f"per rank</text><text x='2' y='{pad}' font-size='10'>{hi:.4g}</text>"
        f"<text x='2' y='{height - pad}' font-size='10'>{lo:.4g}</text>"
        f"<rect x='{pad}' y='{pad}' width='{width - 2 * pad}' height='{height - 2 * pad}' "
        f"fill='none' stroke='#ccc'/>{''.join(lines)}</svg>"
    )
