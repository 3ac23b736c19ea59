"""How hard each host works, kept on the head: the newest figures per host and rank, and a
bounded series per (host, field) for ``cluster.utilisation()`` and the view's sparklines.

Fed by the status receiver with every record a sidecar sends (``rank.host_usage`` says what
they carry). Times are the head's clock when the record arrived, so hosts whose clocks differ
still line up. No IPython, no ZMQ: plain data in, plain data out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..rank.host_usage import HOST_FIELDS, RANK_FIELDS

#: Points kept per (host, field) series: as many as the receiver keeps per metric series.
POINTS_PER_SERIES = 5_000
#: The sparkline's window.
SPARK_WINDOW_S = 60.0
#: Points per sparkline (the window's newest, thinned evenly).
SPARK_POINTS = 60
#: A GPU under this (%) is idle for ``waiting_on_network``.
GPU_IDLE_PERCENT = 10.0


@dataclass(frozen=True)
class UsagePoint:
    """One figure: ``field`` of ``host`` (or of ``rank``'s process, for ``cpu_percent``)."""

    host: str
    time: float  # seconds since the epoch, the head's clock
    field: str
    value: float
    rank: int | None = None


#: Hosts a store keeps figures of when not told how many the cluster has.
MAX_HOSTS = 64


class UsageStore:
    """Newest figures and bounded series, fed by ``add`` from the receiver's thread: at most
    ``max_hosts`` hosts (the cluster's), so records naming invented hosts cannot grow it."""

    def __init__(
        self, points_per_series: int = POINTS_PER_SERIES, max_hosts: int = MAX_HOSTS
    ) -> None:
        self._cap = points_per_series
        self._max_hosts = max(1, max_hosts)
        self._lock = threading.Lock()
        self._host_latest: dict[str, dict[str, Any]] = {}
        self._series: dict[tuple[str, str, int | None], deque[tuple[float, float]]] = {}

    def add(self, rank: int, msg: Mapping[str, Any], now: float | None = None) -> None:
        """Take what one record says (a notice without figures changes nothing)."""
        host = msg.get("host")
        if not isinstance(host, str):
            return
        t = time.time() if now is None else now
        with self._lock:
            known = self._hosts()
            if host not in known and len(known) >= self._max_hosts:
                return
            for name in RANK_FIELDS:
                self._append(host, name, rank, msg.get(name), t)
            if msg.get("samples_host"):
                latest: dict[str, Any] = {k: msg[k] for k in HOST_FIELDS if _number(msg.get(k))}
                if isinstance(msg.get("usage_hint"), str):
                    latest["usage_hint"] = msg["usage_hint"]
                self._host_latest[host] = latest
                for name in HOST_FIELDS:
                    self._append(host, name, None, msg.get(name), t)

    def _hosts(self) -> set[str]:
        return set(self._host_latest) | {host for host, _, _ in self._series}

    def keep_only(self, hosts: set[str]) -> None:
        """Forget every host but ``hosts`` (the cluster's, once its ranks named them)."""
        with self._lock:
            for host in [h for h in self._host_latest if h not in hosts]:
                del self._host_latest[host]
            for key in [k for k in self._series if k[0] not in hosts]:
                del self._series[key]

    def _append(self, host: str, name: str, rank: int | None, value: Any, t: float) -> None:
        if not _number(value):
            return
        line = self._series.get((host, name, rank))
        if line is None:
            line = self._series[(host, name, rank)] = deque(maxlen=self._cap)
        line.append((t, float(value)))

    def host_fields(self, host: str) -> dict[str, Any]:
        """The newest host figures of ``host`` (every field of ``HOST_FIELDS``, None where
        unknown) and its ``usage_hint``."""
        with self._lock:
            latest = dict(self._host_latest.get(host, {}))
        fields: dict[str, Any] = {name: latest.get(name) for name in HOST_FIELDS}
        fields["usage_hint"] = latest.get("usage_hint")
        return fields

    def points(self) -> list[UsagePoint]:
        """Every kept figure, by host, field, rank, then time."""
        with self._lock:
            copied = {k: list(v) for k, v in self._series.items()}
        out: list[UsagePoint] = []
        for (host, name, rank), line in sorted(copied.items(), key=_series_order):
            out.extend(UsagePoint(host, t, name, v, rank) for t, v in line)
        return out

    def recent(
        self, host: str, name: str, window_s: float, now: float | None = None
    ) -> list[float]:
        """``host``'s ``name`` figures of the last ``window_s`` seconds, oldest first."""
        t0 = (time.time() if now is None else now) - window_s
        with self._lock:
            line = list(self._series.get((host, name, None), ()))
        return [v for t, v in line if t >= t0]

    def sparklines(self, hosts: list[str], now: float | None = None) -> list[dict[str, Any]]:
        """Per host: GPU use over the last minute where it is known, else the host's CPU use:
        ``{"host", "field", "values"}`` (at most ``SPARK_POINTS`` values, 0-100)."""
        out = []
        for host in dict.fromkeys(hosts):
            for name in ("gpu_percent", "host_cpu_percent"):
                values = self.recent(host, name, SPARK_WINDOW_S, now)
                if values:
                    out.append({"host": host, "field": name, "values": _thin(values)})
                    break
        return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _series_order(item: tuple[tuple[str, str, int | None], Any]) -> tuple[str, str, int]:
    (host, name, rank), _ = item
    return (host, name, -1 if rank is None else rank)


def _thin(values: list[float], limit: int = SPARK_POINTS) -> list[float]:
    if len(values) <= limit:
        return [round(v, 1) for v in values]
    step = (len(values) - 1) / (limit - 1)
    return [round(values[round(i * step)], 1) for i in range(limit)]


def gpu_idle_for(
    store: UsageStore, host: str, seconds: float, now: float | None = None
) -> float | None:
    """``host``'s newest GPU use when every GPU figure of the last ``seconds`` (at least two)
    was under ``GPU_IDLE_PERCENT``; else None (busy, or GPU use unknown)."""
    values = store.recent(host, "gpu_percent", seconds, now)
    if len(values) < 2 or max(values) >= GPU_IDLE_PERCENT:
        return None
    return values[-1]


#: How long a rank must wait in a collective, its host's GPU idle, to be said to wait on the
#: network.
NETWORK_WAIT_S = 2.0


def network_wait(
    store: UsageStore, host: str, record: Mapping[str, Any], state: str, now: float | None = None
) -> str | None:
    """``mac2 waits on the network (GPU 3 %)`` when the rank whose ``record`` this is has been
    busy in one collective for more than ``NETWORK_WAIT_S`` (its flight recorder says so) and
    every GPU figure of ``host`` over that time was idle; else None (GPU use unknown included).
    """
    if state != "busy":
        return None
    recorder = record.get("recorder")
    if not isinstance(recorder, Mapping) or not recorder.get("blocked"):
        return None
    waited = recorder.get("blocked_s")
    if not isinstance(waited, (int, float)) or waited <= NETWORK_WAIT_S:
        return None
    gpu = gpu_idle_for(store, host, NETWORK_WAIT_S, now)
    return None if gpu is None else f"{host} waits on the network (GPU {gpu:.0f} %)"
