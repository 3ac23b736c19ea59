"""Sending a large array from the notebook to every rank: ``cluster.broadcast`` (one direct
stream to the root, then an MPI broadcast between the ranks) against ipyparallel's
``view.push`` (the notebook sends the array to every engine).

    python bench/broadcast.py [reps]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

NBYTES = 64 * 1024 * 1024  # 64 MiB of float32


# Run on the engines as code, not shipped as functions: the engines cannot import this module.
def _checksums(cluster: Any, name: str) -> list[float]:
    """Per rank: the float64 sum of the variable ``name`` (numpy or MLX)."""
    code = f"import numpy as _np\n_sum = float(_np.asarray({name}, _np.float64).sum())"
    cluster.view.execute(code)
    return cluster.view["_sum"]


def _drop(cluster: Any, name: str) -> None:
    cluster.view.execute(f"globals().pop({name!r}, None)")


def _verify(cluster: Any, name: str, expected: float) -> None:
    sums = _checksums(cluster, name)
    if any(abs(s - expected) > 1e-6 * abs(expected) for s in sums):
        raise RuntimeError(f"{name}: checksums {sums} on the ranks, expected {expected}")


def _measure(cluster: Any, where: str, reps: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    arr = rng.standard_normal(NBYTES // 4, dtype=np.float32)
    expected = float(arr.astype(np.float64).sum())
    ours: list[float] = []
    base: list[float] = []

    # One untimed round of each, checked: every rank holds the same array afterwards.
    cluster.broadcast("w_ours", arr)
    _verify(cluster, "w_ours", expected)
    cluster.view.push({"w_base": arr}, block=True)
    _verify(cluster, "w_base", expected)
    _drop(cluster, "w_ours")
    _drop(cluster, "w_base")

    def run_ours() -> None:
        t = time.perf_counter()
        cluster.broadcast("w", arr)
        ours.append(time.perf_counter() - t)
        _drop(cluster, "w")

    def run_base() -> None:
        t = time.perf_counter()
        cluster.view.push({"w": arr}, block=True)
        base.append(time.perf_counter() - t)
        _drop(cluster, "w")

    benchlib.alternate(reps, run_ours, run_base)
    return [
        compare(
            f"broadcast 64 MiB float32 to every rank, {where}",
            [x * 1e3 for x in ours],
            [x * 1e3 for x in base],
            "ms",
            "<= 0.33x",
            "view.push({'w': arr}, block=True)",
        )
    ]


def bench_broadcast(reps: int) -> list[dict[str, Any]]:
    """cluster.broadcast vs view.push of a 64 MiB float32 numpy array, call to every rank
    holding it; 2 local ranks, and 3 virtual hosts when root."""
    from mlx_cluster_magic import MLXCluster

    figures: list[dict[str, Any]] = []
    with MLXCluster(n=2) as cluster:
        figures += _measure(cluster, "2 local ranks", reps)
    reason = benchlib.vhost_skip_reason()
    if reason:
        print(f"broadcast: virtual-host part skipped: {reason}", flush=True)
        return figures
    work = benchlib.tmpdir("mcmb-bc-")
    try:
        with benchlib.vhosts(3) as vc:
            hf = benchlib.write_hostfile(vc, 3, Path(work) / "hosts.json")
            cluster = MLXCluster(hostfile=hf, ssh=vc.rsh_agent, timeout=60)
            with cluster:
                figures += _measure(cluster, "3 virtual hosts", reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    benchlib.main(bench_broadcast)
