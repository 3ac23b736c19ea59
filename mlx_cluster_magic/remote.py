"""Functions that run on the engines (shipped by ``view.apply``): moving data between ranks."""

from __future__ import annotations

from typing import Any


def broadcast_from_root(name: str, root: int = 0) -> tuple[tuple[int, ...], str]:
    """Every rank: make the user variable ``name`` that ``root`` holds exist on every rank.

    Uses MPI's buffer broadcast (``Bcast``), so a large array crosses each link once instead of
    travelling from the notebook to every engine. MLX arrays stay MLX arrays.
    """
    import numpy as np
    from IPython import get_ipython
    from mpi4py import MPI

    ns = get_ipython().user_ns  # type: ignore[union-attr]
    comm = MPI.COMM_WORLD
    meta = None
    if comm.Get_rank() == root:
        value = ns[name]
        is_mlx = type(value).__module__.startswith("mlx")
        arr = np.ascontiguousarray(np.array(value, copy=False) if is_mlx else np.asarray(value))
        meta = (arr.shape, arr.dtype.str, is_mlx)
    shape, dtype, is_mlx = comm.bcast(meta, root=root)
    if comm.Get_rank() != root:
        arr = np.empty(shape, dtype=np.dtype(dtype))
    comm.Bcast(arr, root=root)
    if comm.Get_rank() != root:
        ns[name] = _as_mlx(arr) if is_mlx else arr
    return tuple(shape), dtype


def _as_mlx(arr: Any) -> Any:
    import mlx.core as mx

    return mx.array(arr)
