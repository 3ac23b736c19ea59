"""Gather, rank side: summarise one of the user's variables on a rank for the head to compare.

Arrays (MLX or NumPy) are summarised here (shape, dtype, min/mean/max, a checksum); only arrays
up to ``limit_bytes`` travel in full. The head compares the ranks' summaries and renders them
(``views.gather_view``).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LIMIT_BYTES = 1 << 20
PREVIEW_CHARS = 120


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
    #: What a series' positions are: ``step`` for a list of numbers (a loss history),
    #: ``element`` for an array.
    axis: str = "step"


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
        series, axis = True, "step"
    else:
        axis = "element"
        # A series is numbers along one axis; strings, datetimes, objects are shown, not drawn.
        series = (
            isinstance(value, np.ndarray)
            and value.ndim == 1
            and value.size > 1
            and (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating))
        )
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        raw = pickle.dumps(arr) if arr.dtype.hasobject else arr.tobytes()
        digest = hashlib.sha1(f"{arr.dtype.str}{arr.shape}".encode() + raw).hexdigest()[:16]
        stats: dict[str, float] = {}
        numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
        if arr.size and numeric:
            stats = {"min": float(arr.min()), "mean": float(arr.mean()), "max": float(arr.max())}
        text = f"{arr.dtype}{list(arr.shape)}"
        if stats:
            text += f" min {stats['min']:.6g} mean {stats['mean']:.6g} max {stats['max']:.6g}"
        elif arr.size:
            preview = np.array2string(arr, threshold=8, edgeitems=3, max_line_width=10_000)
            text += " " + (
                preview if len(preview) <= PREVIEW_CHARS else preview[: PREVIEW_CHARS - 3] + "..."
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
            axis=axis,
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

    shell: Any = get_ipython()
    ns = shell.user_ns
    if name not in ns:
        return Summary(kind="missing", text=f"{name!r} is not defined", checksum="missing")
    return summarize(ns[name], limit_bytes)
