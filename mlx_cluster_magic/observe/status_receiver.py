"""Head-side live status: receives every rank's sidecar reports and turns them into node records.

One ZMQ PULL socket on its own context, bound to the controller's address (loopback for a
local cluster) on a random port, read by one daemon thread. Reports carry a random token
handed to the engines in their environment (compared in constant time); others, and messages
over ``MAX_MESSAGE_BYTES``, are dropped. No IPython import.

Liveness comes from evidence, never from silence alone: a rank is ``dead`` only when the
``evidence`` callback says its process is gone (local pid, mpiexec, the controller's heart).
A rank whose reports stopped while its process lives is ``unresponsive``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from ..fabric.placement import Placement
from .snapshot import MetricPoint, NodeStatus

#: A rank whose reports stopped this long ago (its process alive) is ``unresponsive``.
UNRESPONSIVE_AFTER_S = 2.0
#: Larger messages are dropped (a report is a few KiB; metrics at most a few hundred KiB).
MAX_MESSAGE_BYTES = 4 << 20
#: Head-side memory bounds for ``report()`` numbers.
POINTS_PER_SERIES = 5_000
SERIES_PER_RANK = 64

Evidence = Callable[[], Mapping[int, str]]


class StatusReceiver:
    """Collects the sidecars' reports; ``nodes()`` is the plain data every view is built from."""

    def __init__(
        self, bind_ip: str, placement: Placement, evidence: Evidence | None = None
    ) -> None:
        self.placement = placement
        self.token = secrets.token_hex(16)
        self._evidence: Evidence = evidence or (lambda: {})
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        host = f"[{bind_ip}]" if ":" in bind_ip else bind_ip
        if ":" in bind_ip:
            self._sock.setsockopt(zmq.IPV6, 1)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.url = f"tcp://{host}:{port}#{self.token}"
        self._token = self.token.encode()
        self._latest: dict[int, tuple[float, dict[str, Any]]] = {}
        self._series: dict[int, dict[str, deque[tuple[float, float | None, float]]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="mlx-cluster-status", daemon=True)
        self._thread.start()

    def set_evidence(self, evidence: Evidence) -> None:
        """Where proof of a rank's death comes from (set once the ranks' pids are known)."""
        self._evidence = evidence

    def on_update(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the receiver thread) about twice a second while running."""
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
        self._ctx.term()

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
            if not isinstance(msg, dict):
                continue
            token = msg.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
                continue
            rank = msg.get("rank")
            if isinstance(rank, int) and 0 <= rank < self.placement.size:
                points = msg.pop("metrics", None)
                with self._lock:
                    # A request's start/end notice carries only the state: merge it.
                    old = self._latest.get(rank)
                    if old is not None:
                        msg = {**old[1], **msg}
                    self._latest[rank] = (time.monotonic(), msg)
                    if isinstance(points, list):
                        self._store_points(rank, points)

    def _store_points(self, rank: int, points: list[Any]) -> None:
        series = self._series.setdefault(rank, {})
        for p in points:
            try:
                name, value, step, t = p
                line = series.get(name)
                if line is None:
                    if len(series) >= SERIES_PER_RANK:
                        continue
                    line = series[str(name)] = deque(maxlen=POINTS_PER_SERIES)
                if step is not None and type(step) is not int:
                    step = float(step)
                line.append((float(value), step, float(t)))
            except (TypeError, ValueError):
                continue

    def nodes(self) -> list[NodeStatus]:
        now = time.monotonic()
        with self._lock:
            latest = dict(self._latest)
        try:
            dead = dict(self._evidence())
        except Exception:
            dead = {}
        result = []
        for rank, host in enumerate(self.placement.ranks):
            seen, msg = latest.get(rank, (None, {}))
            last_seen = None if seen is None else now - seen
            silent = None
            why = None
            if rank in dead:
                state, why = "dead", dead[rank]
            elif seen is None:
                state = "starting"
            elif last_seen is not None and last_seen > UNRESPONSIVE_AFTER_S:
                state, silent = "unresponsive", last_seen
                why = "process alive; status reports stopped (a long C call holding the GIL?)"
            else:
                state = str(msg.get("state", "idle"))
            was_busy = msg.get("state") == "busy"
            busy = (
                float(msg.get("busy_s", 0.0)) + (last_seen or 0.0)
                if state == "busy" or (state == "unresponsive" and was_busy)
                else 0.0
            )
            result.append(
                NodeStatus(
                    rank=rank,
                    host=str(msg.get("host", host.ssh)),
                    state=state,
                    busy_s=busy,
                    last_seen_s=last_seen,
                    rss_bytes=msg.get("rss_bytes"),
                    mlx_active_bytes=msg.get("mlx_active_bytes"),
                    mlx_peak_bytes=msg.get("mlx_peak_bytes"),
                    device=msg.get("device"),
                    pid=msg.get("pid"),
                    silent_s=silent,
                    why=why,
                )
            )
        return result

    def latest(self, rank: int, key: str) -> Any:
        """The newest value of ``key`` that ``rank`` reported (e.g. its flight recorder)."""
        with self._lock:
            entry = self._latest.get(rank)
        return None if entry is None else entry[1].get(key)

    def requests(self, rank: int) -> int | None:
        """How many requests ``rank`` has started, as of its last report."""
        value = self.latest(rank, "requests")
        return value if isinstance(value, int) else None

    def metrics(self, last: int | None = None) -> list[MetricPoint]:
        """Every number the ranks reported (the newest ``last`` per series when given)."""
        with self._lock:
            copied = {
                rank: {name: list(line) for name, line in series.items()}
                for rank, series in self._series.items()
            }
        out = []
        for rank in sorted(copied):
            for name, line in copied[rank].items():
                for value, step, t in line[-last:] if last else line:
                    out.append(MetricPoint(rank, name, value, step, t))
        return out

    def close(self) -> None:
        self._stop.set()
        self._listeners.clear()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
