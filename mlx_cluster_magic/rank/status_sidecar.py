"""Engine-side status: what each rank tells the head, beside (not through) the engine's queue.

An engine runs one request at a time, so a status request would queue behind a long cell. A
daemon thread here pushes a small JSON record to the head over ZMQ twice a second, and the main
thread sends a one-line notice (a UDP datagram) when a request starts or ends: busy or idle
(from the engine's own request handling: the moment an execute/apply request starts and ends),
how long the current request has run, RSS, MLX's memory, the numbers user code passed to
``report()``, the flight recorder's summary, and how hard the host works (``host_usage``).

A C call that holds the GIL silences this thread; the head then shows the rank
``unresponsive``, never ``dead`` (see observe.status_receiver).

Both channels are protected with keys that reached this host over ssh only: the ZMQ records
are CurveZMQ (encrypted, with the ranks' client key the head admits) and every notice opens
with an HMAC-SHA256 of its bytes keyed by the token, which never travels in clear.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import operator
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

from .host_usage import UsageSampler, first_on_host
from .reconnect import reconnect_promptly

PERIOD_S = 0.5
#: Numbers ``report()`` keeps until the next send; the oldest go first when full.
REPORT_BUFFER = 20_000
#: At most this many numbers per message (the rest go in the next one).
POINTS_PER_MESSAGE = 2_000


class Activity:
    """The engine's request state, set from its main thread by the request hooks.

    Each change is also sent to the head at once, from the main thread: a cell that holds the
    GIL from its first line still shows ``busy`` before the sidecar thread is starved. A change
    is one UDP datagram to the status address's port (a single ``sendto``: no other thread of
    the engine or the head wakes for it, so a short request's round trip does not pay for its
    notices); a request's ``report()`` numbers leave with its end over the sidecar's reliable
    ZMQ channel instead. A lost datagram costs nothing lasting: the next periodic record (every
    ``PERIOD_S``) carries the state, and ``requests`` orders records from both channels.
    """

    def __init__(self) -> None:
        #: (requests started, when the running one started or None): one tuple, so that the
        #: sidecar thread reads both at once (a request's count is never paired with the
        #: previous request's end).
        self.now: tuple[int, float | None] = (0, None)
        self._target: tuple[Mapping[str, str], int] | None = None
        self._sock: Any = None
        self._udp: socket.socket | None = None
        self._udp_to: tuple[str, int] | None = None
        self._mac_key = b""
        self._prefix = b""  # a notice's constant part, encoded once

    def connect(self, credentials: Mapping[str, str], rank: int) -> None:
        """``credentials``: the head's ``StatusReceiver.credentials`` (read from this host's
        private file)."""
        self._target = (credentials, rank)
        host, port = notice_address(credentials["url"])
        udp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        # connect(): bound to this host's address on the route to the head (never 0.0.0.0),
        # and answers from anyone but the head's port are not let in.
        try:
            udp.connect((host, port))
            self._udp_to = None  # macOS refuses a sendto() address on a connected socket
        except OSError:  # no route yet: each send says where instead
            self._udp_to = (host, port)
        udp.setblocking(False)
        self._udp = udp
        self._mac_key = credentials["token"].encode()
        self._prefix = json.dumps({"rank": rank, "busy_s": 0.0})[:-1].encode()

    @property
    def busy_since(self) -> float | None:
        return self.now[1]

    @property
    def requests(self) -> int:
        return self.now[0]

    def started(self) -> None:
        self.now = (self.now[0] + 1, time.time())
        self._send("busy")

    def finished(self) -> None:
        self.now = (self.now[0], None)
        self._send("idle")

    def _send(self, state: str) -> None:
        if self._target is None:
            return
        # A request's numbers leave with its end, so they are on the head when the cell is.
        points = _drain(POINTS_PER_MESSAGE) if state == "idle" and _POINTS else []
        if points:
            credentials, rank = self._target
            msg = {"token": credentials["token"], "rank": rank, "state": state, "busy_s": 0.0}
            msg["requests"] = self.requests
            self._send_reliably(msg, points)
        elif self._udp is not None:
            notice = b'%s, "state": "%s", "requests": %d}' % (
                self._prefix,
                state.encode(),
                self.requests,
            )
            mac = hmac.digest(self._mac_key, notice, "sha256")  # (OpenSSL's one-shot path)
            with contextlib.suppress(OSError):
                if self._udp_to is None:
                    self._udp.send(mac + notice)
                else:
                    self._udp.sendto(mac + notice, self._udp_to)

    def _send_reliably(self, msg: dict[str, Any], points: list[Any]) -> None:
        import zmq

        if self._sock is None:
            assert self._target is not None
            self._sock = curve_push(zmq.Context(), self._target[0])
        while points:
            msg["metrics"] = points
            try:
                self._sock.send(json.dumps(msg).encode(), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            points = _drain(POINTS_PER_MESSAGE)


def curve_push(ctx: Any, credentials: Mapping[str, str], latest_word: bool = False) -> Any:
    """A PUSH socket to the head's status receiver, encrypted with CurveZMQ; ``latest_word``
    for the periodic records, whose connection is made again at once after a drop."""
    import zmq

    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 16)
    sock.setsockopt(zmq.CURVE_SERVERKEY, credentials["server_key"].encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, credentials["public_key"].encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, credentials["secret_key"].encode())
    if latest_word:
        # each record replaces the last: after a drop, a new connection at once beats the
        # records queued in the old one, which TCP would deliver only at its next retransmit
        reconnect_promptly(sock.setsockopt)
    sock.connect(credentials["url"])
    return sock


def notice_address(url: str) -> tuple[str, int]:
    """(host, port) of ``tcp://host:port`` or ``tcp://[v6]:port``: where request notices go, as
    UDP datagrams (the head listens for them on the reports' port number)."""
    hostport = url.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


ACTIVITY = Activity()
_POINTS: deque[tuple[str, float, float | None, float]] = deque(maxlen=REPORT_BUFFER)


def report(step: float | None = None, **values: float) -> None:
    """Record numbers for the live view, e.g. ``report(step=i, loss=loss, tok_s=rate)``.

    Each keyword is one metric (a chart in the status view, one line per rank); ``step`` is
    its x value (else the time), kept an integer when given as one. Costs a few microseconds;
    never blocks on the network.
    """
    now = time.time()
    if step is not None and type(step) is not int and type(step) is not float:
        try:
            step = operator.index(cast(Any, step))  # NumPy and MLX integers stay integers
        except TypeError:
            step = float(step)
    append = _POINTS.append
    for name, value in values.items():
        append((name, float(value), step, now))


def _drain(limit: int) -> list[tuple[str, float, float | None, float]]:
    out = []
    popleft = _POINTS.popleft
    for _ in range(min(limit, len(_POINTS))):
        try:
            out.append(popleft())
        except IndexError:
            break
    return out


def _device() -> str:
    import mlx.core as mx

    try:
        return str(mx.default_device())
    except Exception:
        return "unknown"


class Sidecar(threading.Thread):
    """Pushes this rank's record to the head every ``PERIOD_S`` and on every request change."""

    def __init__(
        self,
        credentials: Mapping[str, str],
        rank: int,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(name="mlx-cluster-status", daemon=True)
        self.credentials, self.token, self.rank = credentials, credentials["token"], rank
        self.extra = extra
        self.stopped = threading.Event()
        self.device = "unknown"
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self.usage: UsageSampler | None = None

    def sample(self) -> dict[str, Any]:
        import mlx.core as mx
        import psutil

        now = time.time()
        requests, busy_since = ACTIVITY.now
        msg: dict[str, Any] = {
            "token": self.token,
            "rank": self.rank,
            "host": self._host,
            "pid": self._pid,
            "time": now,
            "state": "busy" if busy_since is not None else "idle",
            "busy_s": 0.0 if busy_since is None else max(0.0, now - busy_since),
            "requests": requests,
            "rss_bytes": psutil.Process().memory_info().rss,
            "mlx_active_bytes": int(mx.get_active_memory()),
            "mlx_peak_bytes": int(mx.get_peak_memory()),
            "device": self.device,
        }
        points = _drain(POINTS_PER_MESSAGE)
        if points:
            msg["metrics"] = points
        if self.usage is not None:
            with contextlib.suppress(Exception):
                msg.update(self.usage.sample())
        if self.extra is not None:
            try:
                msg.update(self.extra())
            except Exception:
                pass
        return msg

    def run(self) -> None:
        import zmq

        # Our own context: user code that terminates zmq.Context.instance() cannot blind us.
        ctx = zmq.Context()
        sock = curve_push(ctx, self.credentials, latest_word=True)
        self.device = _device()
        with contextlib.suppress(Exception):  # CPU (and macmon's) figures; one host rank samples
            self.usage = UsageSampler(first_on_host(), PERIOD_S)
        try:
            while not self.stopped.is_set():
                try:
                    sock.send(json.dumps(self.sample()).encode(), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                # (request starts and ends reach the head at once from the main thread; waking
                # this thread for them too would compete for the GIL with every short request)
                self.stopped.wait(PERIOD_S)
        finally:
            if self.usage is not None:
                self.usage.close()
            sock.close(0)
            ctx.term()


def start_sidecar(
    credentials: Mapping[str, str],
    rank: int,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> Sidecar:
    """``credentials`` come from this host's private secrets file (never the environment)."""
    sidecar = Sidecar(credentials, rank, extra)
    sidecar.start()
    ACTIVITY.connect(credentials, rank)
    return sidecar
