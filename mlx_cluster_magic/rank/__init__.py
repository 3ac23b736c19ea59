"""Code that runs on every rank, imported by the engines: start-up, the status sidecar and
``report()``, the flight recorder, stack dumps, checked collectives, the broadcast receiver,
gather summaries, the link probe and the mlx-lm helpers.

It must stay small and quick to import, and it imports nothing of the head's: only ``rank``
modules and ``mlx_cluster_magic.contract`` (checked by tests/test_architecture.py).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """``WORLD`` (this rank's MLX group) and ``BACKEND``, read from the start-up module when
    asked for, so that importing ``rank`` alone starts nothing."""
    if name in ("WORLD", "BACKEND"):
        from . import bootstrap

        return getattr(bootstrap, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
