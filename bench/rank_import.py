"""What a rank pays to import our code at start, against what it pays for MLX itself.

Each sample is a fresh interpreter that first imports ``mlx.core`` (every rank does), then the
modules the rank start-up loads (``mlx_cluster_magic.rank.bootstrap`` and what its ``main``
imports before handing over to ipyparallel), timing each part. Start-to-ready of 2 local ranks
is in the ``startup`` section.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import benchlib
from benchlib import compare

RANK_MODULES = (
    "mlx_cluster_magic.rank.bootstrap",
    "mlx_cluster_magic.rank.flight_recorder",
    "mlx_cluster_magic.rank.stack_dump",
    "mlx_cluster_magic.rank.request_hooks",
    "mlx_cluster_magic.rank.status_sidecar",
)

_CODE = (
    "import time\n"
    "t = time.perf_counter(); import mlx.core; mlx_s = time.perf_counter() - t\n"
    "t = time.perf_counter()\n"
    + "".join(f"import {m}\n" for m in RANK_MODULES)
    + "ours_s = time.perf_counter() - t\n"
    "print(mlx_s, ours_s)\n"
)


def bench_rank_import(reps: int) -> list[dict[str, Any]]:
    ours: list[float] = []
    mlx: list[float] = []

    for _ in range(max(reps, 5)):  # both parts timed in the same fresh interpreter
        out = subprocess.run(
            [sys.executable, "-c", _CODE], capture_output=True, text=True, check=True
        ).stdout.split()
        mlx.append(float(out[0]) * 1e3)
        ours.append(float(out[1]) * 1e3)
    return [
        compare(
            "rank start-up: importing our rank modules",
            ours,
            mlx,
            "ms",
            "report",
            "import mlx.core in the same interpreter",
        )
    ]


if __name__ == "__main__":
    benchlib.main(bench_rank_import)
