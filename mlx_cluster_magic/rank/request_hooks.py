"""busy/idle from the engine's own request handling: a hook around every request a rank's
kernel handles (execute, apply, ...), feeding the status sidecar and the flight recorder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def hook_requests(started: Callable[[], None], finished: Callable[[], None]) -> None:
    """Call ``started``/``finished`` around every request the engine's kernel handles.

    ipykernel calls ``pre_handler_hook``/``post_handler_hook`` (public methods) on its main
    thread right before and after each shell request's handler (execute, apply, ...).
    """
    from ipyparallel.engine.kernel import IPythonParallelKernel as Kernel

    pre, post = Kernel.pre_handler_hook, Kernel.post_handler_hook

    def pre_handler_hook(self: Any) -> None:
        started()
        pre(self)

    def post_handler_hook(self: Any) -> None:
        try:
            post(self)
        finally:
            finished()

    Kernel.pre_handler_hook = pre_handler_hook  # type: ignore[method-assign,unused-ignore]
    Kernel.post_handler_hook = post_handler_hook  # type: ignore[method-assign,unused-ignore]
