"""Engine-side status sidecar: a daemon thread that reports this rank's state twice a second.

An engine runs one request at a time, so a status request would queue behind a long cell. This
thread runs beside the engine's main thread and pushes a small JSON record to the head over ZMQ:
busy or idle (read from the main thread's stack: idle means it waits in the event loop's
selector), how long the current request has run, RSS, and MLX's active and peak memory.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

PERIOD_S = 0.5

_IDLE_FUNCS = frozenset({"select", "poll", "_poll", "_run_once", "wait"})


def main_thread_idle() -> bool:
    """True when the main thread waits for work (inside the event loop's selector)."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return True
    code = frame.f_code
    return code.co_name in _IDLE_FUNCS and (
        code.co_filename.endswith(("selectors.py", "base_events.py", "threading.py"))
        or "zmq" in code.co_filename
        or "tornado" in code.co_filename
    )


def _device() -> str:
    import mlx.core as mx

    try:
        return str(mx.default_device())
    except Exception:
        return "unknown"


class Sidecar(threading.Thread):
    """Pushes ``{rank, state, busy_s, rss_bytes, mlx_*}`` to the head every ``PERIOD_S``."""

    def __init__(self, url: str, token: str, rank: int) -> None:
        super().__init__(name="mlx-cluster-status", daemon=True)
        self.url, self.token, self.rank = url, token, rank
        self.stopped = threading.Event()

    def sample(self, busy_since: float | None) -> dict[str, Any]:
        import mlx.core as mx
        import psutil

        now = time.time()
        return {
            "token": self.token,
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": now,
            "state": "busy" if busy_since is not None else "idle",
            "busy_s": 0.0 if busy_since is None else now - busy_since,
            "rss_bytes": psutil.Process().memory_info().rss,
            "mlx_active_bytes": int(mx.get_active_memory()),
            "mlx_peak_bytes": int(mx.get_peak_memory()),
            "device": self.device,
        }

    def run(self) -> None:
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.connect(self.url)
        self.device = _device()
        busy_since: float | None = None
        try:
            while not self.stopped.is_set():
                idle = main_thread_idle()
                if idle:
                    busy_since = None
                elif busy_since is None:
                    busy_since = time.time()
                try:
                    sock.send(json.dumps(self.sample(busy_since)).encode(), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self.stopped.wait(PERIOD_S)
        finally:
            sock.close(0)


def start_sidecar(address: str, rank: int) -> Sidecar:
    """``address`` is ``tcp://ip:port#token``, handed over in the environment (never argv)."""
    url, _, token = address.partition("#")
    sidecar = Sidecar(url, token, rank)
    sidecar.start()
    return sidecar
