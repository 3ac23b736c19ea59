"""Every rank's Python stack on request, even while its main thread holds the GIL or waits in
native code.

``install()`` registers :mod:`faulthandler` on ``SIGUSR2``: its handler is plain C, runs at
signal delivery and writes all threads' Python frames to a private per-rank file, so it works
when no Python code can run (a native MLX/MPI collective, a long C call holding the GIL).
Neither ipyparallel nor Open MPI uses ``SIGUSR2`` in an engine process (the handler there is
``SIG_DFL`` before ``install``); ``mpiexec`` only forwards it when *it* receives one. The head
signals and reads the file back (``observe.stack_capture``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from typing import IO

from ..contract import STACK_SIGNAL as SIGNAL

#: The file this engine's dumps go to, once ``install`` has run.
STACK_FILE: str | None = None
_FILE: IO[str] | None = None


def install(path: str | None = None) -> str:
    """Dump every thread's stack to ``path`` (a new private file in the job's own directory by
    default) on ``SIGUSR2``.

    The file is opened for appending, so the head may truncate it before each capture.
    Returns the path; idempotent.
    """
    import faulthandler

    global STACK_FILE, _FILE
    if STACK_FILE is not None and path in (None, STACK_FILE):
        return STACK_FILE
    if path is None:
        # Open MPI's private (0700) directory of this process, which it removes with the job
        # even when the rank is killed and its atexit never runs; /tmp only outside mpiexec.
        where = os.environ.get("OMPI_FILE_LOCATION")
        fd, path = tempfile.mkstemp(
            prefix="mlx-cluster-stack-",
            suffix=".txt",
            dir=where if where and os.path.isdir(where) else None,
        )  # 0600
        os.close(fd)
    f = open(path, "a")  # noqa: SIM115 - faulthandler writes to this fd for the process's life
    faulthandler.register(SIGNAL, file=f, all_threads=True, chain=False)
    if _FILE is not None:
        _FILE.close()
    if STACK_FILE is None:
        atexit.register(uninstall)  # a clean exit leaves no file behind
    _FILE, STACK_FILE = f, path
    return path


def uninstall() -> None:
    """Stop dumping on ``SIGUSR2`` and remove the file."""
    import faulthandler

    global STACK_FILE, _FILE
    if STACK_FILE is None:
        return
    faulthandler.unregister(SIGNAL)
    if _FILE is not None:
        _FILE.close()
    if STACK_FILE is not None:
        with contextlib.suppress(OSError):
            os.unlink(STACK_FILE)
    _FILE = STACK_FILE = None
