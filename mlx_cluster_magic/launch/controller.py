"""``python -m mlx_cluster_magic.launch.controller [ipcontroller's options]``: ipyparallel's
controller, with a heartbeat that survives network drops (``ipp_adapter.run_controller``)."""

from __future__ import annotations

from .ipp_adapter import run_controller

if __name__ == "__main__":
    run_controller()
