"""Head-side live status: receives every rank's sidecar reports and turns them into node records.

One ZMQ PULL socket, bound to the controller's address (loopback for a local cluster) on a
random port, read by one daemon thread. Reports carry a random token handed to the engines in
their environment; others are dropped. No IPython import.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import zmq

from .hosts import Placement

#: A rank silent for this long (and not known to be alive) is shown ``dead``.
DEAD_AFTER_S = 3.0


@dataclass(frozen=True)
class NodeStatus:
    """One rank, as ``cluster.nodes()`` returns it and the status view shows it."""

    rank: int
    host: str
    state: str  # starting, idle, busy, dead
    busy_s: float
    last_seen_s: float | None
    rss_bytes: int | None
    mlx_active_bytes: int | None
    mlx_peak_bytes: int | None
    device: str | None
    pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StatusReceiver:
    """Collects the sidecars' reports; ``nodes()`` is the plain data every view is built from."""

    def __init__(self, bind_ip: str, placement: Placement) -> None:
        self.placement = placement
        self.token = secrets.token_hex(16)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        host = f"[{bind_ip}]" if ":" in bind_ip else bind_ip
        if ":" in bind_ip:
            self._sock.setsockopt(zmq.IPV6, 1)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.url = f"tcp://{host}:{port}#{self.token}"
        self._latest: dict[int, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._local_procs: dict[int, psutil.Process] = {}
        self._listeners: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="mlx-cluster-status", daemon=True)
        self._thread.start()

    def attach(self, cluster: Any) -> None:
        """Watch the local ranks' processes too: a dead local pid is ``dead`` at once."""
        for r in cluster.ranks:
            if cluster.placement.is_local or cluster.placement.ranks[r["rank"]].is_local:
                with contextlib.suppress(psutil.Error):
                    self._local_procs[r["rank"]] = psutil.Process(r["pid"])

    def on_update(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the receiver thread) about once a second while running."""
        self._listeners.append(callback)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last_tick = 0.0
        while not self._stop.is_set():
            with contextlib.suppress(zmq.ZMQError):
                if poller.poll(100):
                    self._receive()
            now = time.monotonic()
            if now - last_tick >= 0.5:
                last_tick = now
                for callback in list(self._listeners):
                    with contextlib.suppress(Exception):
                        callback()
        self._sock.close(0)

    def _receive(self) -> None:
        while True:
            try:
                raw = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict) or msg.get("token") != self.token:
                continue
            rank = msg.get("rank")
            if isinstance(rank, int) and 0 <= rank < self.placement.size:
                with self._lock:
                    self._latest[rank] = (time.monotonic(), msg)

    def nodes(self) -> list[NodeStatus]:
        now = time.monotonic()
        with self._lock:
            latest = dict(self._latest)
        result = []
        for rank, host in enumerate(self.placement.ranks):
            seen, msg = latest.get(rank, (None, {}))
            last_seen = None if seen is None else now - seen
            proc = self._local_procs.get(rank)
            if proc is not None and not _alive(proc):
                state = "dead"
            elif seen is None:
                state = "starting"
            elif last_seen is not None and last_seen > DEAD_AFTER_S:
                state = "dead"
            else:
                state = msg.get("state", "idle")
            busy = float(msg.get("busy_s", 0.0)) + (last_seen or 0.0) if state == "busy" else 0.0
            result.append(
                NodeStatus(
                    rank=rank,
                    host=msg.get("host", host.ssh),
                    state=state,
                    busy_s=busy,
                    last_seen_s=last_seen,
                    rss_bytes=msg.get("rss_bytes"),
                    mlx_active_bytes=msg.get("mlx_active_bytes"),
                    mlx_peak_bytes=msg.get("mlx_peak_bytes"),
                    device=msg.get("device"),
                    pid=msg.get("pid"),
                )
            )
        return result

    def close(self) -> None:
        self._stop.set()
        self._listeners.clear()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
