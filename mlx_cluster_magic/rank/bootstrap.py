"""Engine start-up, run on every rank by mpiexec: ``python -m mlx_cluster_magic.rank.bootstrap``.

MLX calls plain ``MPI_Init`` and fails if mpi4py initialised MPI first, and ipyparallel's
``--mpi`` engines import mpi4py before any user code runs. So this module initialises MLX's
distributed group first, checks that it spans every rank (MLX silently falls back to a size-1
group when it cannot load libmpi), and only then hands over to ipyparallel's engine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from typing import Any, NoReturn

from ..contract import (
    BACKEND_VAR,
    ENGINE_FILE_KEY,
    EXIT_BAD_GROUP,
    IBV_DEVICES_VAR,
    RING_HOSTS_VAR,
    SECRETS_FILE_VAR,
    STATUS_SECRETS_KEY,
)

#: The MLX group of this rank, set before the engine starts; ``world`` in the engine namespace.
WORLD: Any = None
BACKEND: str = ""


def _mpi_rank_and_size() -> tuple[int, int]:
    """Open MPI's own per-rank variables: known before MPI_Init."""
    env = os.environ
    rank = env.get("OMPI_COMM_WORLD_RANK", env.get("PMIX_RANK", "0"))
    size = env.get("OMPI_COMM_WORLD_SIZE", "1")
    return int(rank), int(size)


def _write_private(content: str, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"mlx-cluster-{name}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return path


def prepare_backend_environment(backend: str, rank: int) -> list[str]:
    """Turn the forwarded variables into the files and variables MLX's backends read.

    Returns the temporary files written, so they can be removed once the group is formed.
    """
    written = []
    if backend in ("ring", "jaccl"):
        os.environ["MLX_RANK"] = str(rank)
    if os.environ.get(RING_HOSTS_VAR) and backend in ("ring", "any"):
        path = _write_private(os.environ[RING_HOSTS_VAR], "ring")
        os.environ["MLX_HOSTFILE"] = path
        os.environ.setdefault("MLX_RANK", str(rank))
        written.append(path)
    if os.environ.get(IBV_DEVICES_VAR) and backend == "jaccl":
        path = _write_private(os.environ[IBV_DEVICES_VAR], "ibv")
        os.environ["MLX_IBV_DEVICES"] = path
        written.append(path)
    return written


def init_group(backend: str, rank: int, size: int) -> Any:
    """Initialise MLX's group, or exit with a message the head shows the user."""
    import mlx.core as mx

    host = socket.gethostname()
    try:
        # MLX refuses a strict group of one process; a single rank is a valid cluster.
        group = mx.distributed.init(backend=backend, strict=size > 1)
    except Exception as e:
        hint = ""
        if backend in ("mpi", "any"):
            hint = f" (MLX_MPI_LIBNAME={os.environ.get('MLX_MPI_LIBNAME', '')!r})"
        if backend == "ring" and "bind" in str(e):
            hint = " (is the ring port in use? pass another --ring-port, below 32768)"
        _fail(f"rank {rank} on {host}: MLX {backend} backend failed to initialise: {e}{hint}")
    if group.size() != size or group.rank() != rank:
        _fail(
            f"rank {rank} on {host}: MLX formed a group of size {group.size()} (rank "
            f"{group.rank()}) but mpiexec started {size} ranks; MLX could not use the {backend} "
            "backend"
        )
    return group


def _fail(message: str) -> NoReturn:
    print(f"mlx_cluster_magic: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_GROUP)


def rank_report() -> dict[str, Any]:
    """What the head checks after start: ids, ranks and sizes must all agree. The pid and the
    stack file are what ``why()`` signals and reads: they come from this answer (ipyparallel's
    signed channel), never from a status record."""
    from mpi4py import MPI

    from . import stack_dump

    comm = MPI.COMM_WORLD
    return {
        "mlx_rank": WORLD.rank(),
        "mlx_size": WORLD.size(),
        "mpi_rank": comm.Get_rank(),
        "mpi_size": comm.Get_size(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "backend": BACKEND,
        "stack_file": stack_dump.STACK_FILE,
    }


def wait_for_connection_file(path: str, timeout: float = 60.0) -> None:
    """Wait until the controller has written the engines' connection file in full: the engine
    starts alongside the controller and must not read a file that is still being written."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            if "key" in json.load(f):
                return
        if time.monotonic() > deadline:
            _fail(f"the controller's connection file {path} did not appear in {timeout:g} s")
        time.sleep(0.02)


def read_secrets(path: str) -> tuple[str, dict[str, str] | None]:
    """(the engine's connection file, the status channel's keys) from this host's private
    secrets file, written over ssh before mpiexec started (``launch.host_secrets``). A
    relative path is under this login's home."""
    import json

    full = os.path.join(os.path.expanduser("~"), path)
    try:
        with open(full) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        _fail(f"cannot read the cluster's private connection file {full}: {e}")
    status = content.get(STATUS_SECRETS_KEY)
    return str(content.get(ENGINE_FILE_KEY) or full), status


_LINKS: list[Any] = []  # the LinkWatch, made by the sidecar thread on its first record


def _status_extra() -> dict[str, Any]:
    """What each status record carries beside the rank's state: the flight recorder's summary
    (read by ``cluster.why()`` and the hang banner) and the interfaces that lost their link
    (a pulled cable, named by the head)."""
    from . import flight_recorder
    from .link_state import LinkWatch
    from .status_sidecar import ACTIVITY

    if not _LINKS:
        _LINKS.append(LinkWatch())
    return {
        "recorder": flight_recorder.snapshot(busy=ACTIVITY.busy_since is not None),
        "links_down": _LINKS[0].down(),
    }


def main(argv: list[str] | None = None) -> None:
    global WORLD, BACKEND
    argv = sys.argv[1:] if argv is None else argv
    BACKEND = os.environ.get(BACKEND_VAR, "mpi")
    rank, size = _mpi_rank_and_size()
    written = prepare_backend_environment(BACKEND, rank)
    try:
        WORLD = init_group(BACKEND, rank, size)
    finally:
        # MLX reads these files only while it forms the group: remove them now, so a rank
        # that is later killed leaves nothing behind.
        for path in written:
            with contextlib.suppress(OSError):
                os.unlink(path)
    from . import flight_recorder, stack_dump
    from .request_hooks import hook_requests
    from .status_sidecar import ACTIVITY, start_sidecar

    # Always on: every collective recorded (about a microsecond each); the Python stack on
    # SIGUSR2, written by faulthandler even while the main thread holds the GIL.
    flight_recorder.install(WORLD)
    stack_dump.install()

    # busy/idle is the engine's own request handling, not a guess from stack frames.
    hook_requests(ACTIVITY.started, ACTIVITY.finished)
    engine_file, status = read_secrets(os.environ.get(SECRETS_FILE_VAR, ""))
    if status:
        start_sidecar(status, rank, extra=_status_extra)
    from ipyparallel.engine.app import main as ipengine_main

    from .reconnect import heartbeat_reconnects_promptly

    heartbeat_reconnects_promptly()

    # (ipengine is imported above while the controller may still be starting: the two overlap)
    wait_for_connection_file(engine_file)

    sys.argv = ["ipengine", *argv, f"--IPEngine.url_file={engine_file}"]
    ipengine_main()


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy, so ``WORLD`` is the one user code sees.
    from mlx_cluster_magic.rank import bootstrap

    bootstrap.main()
