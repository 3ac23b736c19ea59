"""A farm's engine: ``python -m mlx_cluster_magic.rank.farm_engine``, one process per slot.

A farm's engines are independent: no ``mpiexec``, no group spanning them. Each is a plain
ipyparallel engine with ``world`` an MLX group of one (this Mac's GPU, all of it), the same
status sidecar, flight recorder and stack dump as a rank of an SPMD cluster, and the engine id
and status rank of its slot (``FARM_SLOT_VAR``). Started over ssh, it is tied to its session
(``FARM_TIED_VAR``): when the head ends the session, or the session ends with the head, stdin
closes and the engine exits, so nothing of the farm outlives its ssh connection.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any

from ..contract import FARM_SLOT_VAR, FARM_TIED_VAR, SECRETS_FILE_VAR
from . import bootstrap


def _exit_when_untied() -> None:
    """Exit at once when stdin (the ssh session) closes: the head ended it, or is gone."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os._exit(0)


def farm_report() -> dict[str, Any]:
    """What the head checks after start, in the shape of ``bootstrap.rank_report``: a group
    of one, and the slot this engine was started for."""
    from . import stack_dump

    world = bootstrap.WORLD
    slot = int(os.environ.get(FARM_SLOT_VAR, "-1"))
    return {
        "mlx_rank": world.rank(),
        "mlx_size": world.size(),
        "mpi_rank": slot,
        "mpi_size": 1,
        "slot": slot,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "backend": bootstrap.BACKEND,
        "stack_file": stack_dump.STACK_FILE,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(FARM_TIED_VAR):
        threading.Thread(target=_exit_when_untied, name="mlx-farm-tie", daemon=True).start()
    slot = int(os.environ.get(FARM_SLOT_VAR, "0"))
    import mlx.core as mx

    # No hostfile and no MPI job: the ring backend forms a group of one (this process).
    bootstrap.BACKEND = "ring"
    bootstrap.WORLD = mx.distributed.init(backend="ring", strict=False)
    from . import flight_recorder, stack_dump
    from .request_hooks import hook_requests
    from .status_sidecar import ACTIVITY, start_sidecar

    flight_recorder.install(bootstrap.WORLD)
    stack_dump.install()
    hook_requests(ACTIVITY.started, ACTIVITY.finished)
    engine_file, status = bootstrap.read_secrets(os.environ.get(SECRETS_FILE_VAR, ""))
    if status:
        start_sidecar(status, slot, extra=bootstrap._status_extra)
    from ipyparallel.engine.app import main as ipengine_main

    from .reconnect import heartbeat_reconnects_promptly

    heartbeat_reconnects_promptly()
    bootstrap.wait_for_connection_file(engine_file)
    sys.argv = ["ipengine", *argv, f"--IPEngine.url_file={engine_file}", f"--IPEngine.id={slot}"]
    ipengine_main()


if __name__ == "__main__":
    from mlx_cluster_magic.rank import farm_engine

    farm_engine.main()
