"""Deprecated name of the rank start-up: use ``mlx_cluster_magic.rank`` (``WORLD``) and
``python -m mlx_cluster_magic.rank.bootstrap``. Kept so that code written for earlier releases
(``from mlx_cluster_magic.engine import WORLD``) still runs, with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from .rank import bootstrap

    if name.startswith("__"):
        raise AttributeError(name)
    warnings.warn(
        f"mlx_cluster_magic.engine.{name} moved: use `from mlx_cluster_magic.rank import {name}`",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(bootstrap, name)


if __name__ == "__main__":
    from mlx_cluster_magic.rank import bootstrap

    bootstrap.main()
