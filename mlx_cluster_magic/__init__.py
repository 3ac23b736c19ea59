"""Thunderbolt-cabled Apple-silicon Macs as one interactive MLX machine, from a notebook.

``%load_ext mlx_cluster_magic`` registers ``%mlx_cluster``; the Python API is ``MLXCluster``;
on the engines, ``report(step=i, loss=...)`` sends numbers to the live view.
"""

from typing import TYPE_CHECKING, Any

from .rank.status_sidecar import report

if TYPE_CHECKING:
    from .cluster import MLXCluster
    from .errors import MLXClusterError

__version__ = "0.1.0"
__all__ = ["MLXCluster", "MLXClusterError", "__version__", "load_ipython_extension", "report"]


def __getattr__(name: str) -> Any:
    # Imported on first use: every rank imports this package (its start-up, ``report``)
    # and needs none of the head's modules.
    if name == "MLXCluster":
        from .cluster import MLXCluster

        return MLXCluster
    if name == "MLXClusterError":
        from .errors import MLXClusterError

        return MLXClusterError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:  # type: ignore[no-untyped-def]
    from .cluster.magics import MLXClusterMagics

    if "MLXClusterMagics" in ipython.magics_manager.registry:
        return  # loaded already (by the kernel spec, or before): keep its cluster

    ipython.register_magics(MLXClusterMagics)
    if "px" not in ipython.magics_manager.magics["cell"]:
        from .cluster.px import MLXParallelMagics

        # %%px before any start says, in one line, what to type.
        ipython.register_magics(MLXParallelMagics(ipython, None, None))


def unload_ipython_extension(ipython) -> None:  # type: ignore[no-untyped-def]
    from .cluster.magics import MLXClusterMagics

    magics = ipython.magics_manager.registry.get(MLXClusterMagics.__name__)
    if magics is not None and magics.cluster is not None and magics.cluster.running:
        magics.cluster.stop()
