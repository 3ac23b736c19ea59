"""Shared by the benchmark sections: figures with median and spread, and their ratio."""

from __future__ import annotations

import statistics
from typing import Any


def stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def compare(
    name: str,
    ours: list[float],
    base: list[float],
    unit: str,
    target: str,
    baseline: str,
    higher_is_better: bool = False,
) -> dict[str, Any]:
    o, b = stats(ours), stats(base)
    ratio = o["median"] / b["median"] if b["median"] else float("nan")
    return {
        "name": name,
        "unit": unit,
        "ours": o,
        "baseline": b,
        "baseline_name": baseline,
        "ratio": ratio,
        "target": target,
        "higher_is_better": higher_is_better,
    }
