"""Head-side live status: receives every rank's sidecar reports and turns them into node records.

One ZMQ PULL socket on its own context, bound to the controller's address (loopback for a
local cluster) on a random port, for the sidecars' periodic records and a request's numbers;
a UDP socket on the same address and port number for the notices every request's start and
end sends. One daemon thread takes what both queued every ``DRAIN_PERIOD_S``. The reports'
socket is a CurveZMQ server (encrypted; ZAP admits only the ranks' own client key) and every
notice carries an HMAC-SHA256 of its bytes: the keys and the token reach the ranks only over ssh
(``launch.host_secrets``), so a sniffer learns no secret and cannot forge. Reports carry the
random token too, first in the message (compared in constant time before anything is parsed);
a message over ``MAX_MESSAGE_BYTES``, nested too deep, with a field of the wrong type or range
(``record_schema``), for a rank or host not in the placement, or whose request count leaps
ahead, is dropped and counted (``dropped``). No message stops the receiving thread. No IPython
import.

Liveness comes from evidence, never from silence alone: a rank is ``dead`` only when the
``evidence`` callback says its process is gone (local pid, mpiexec, the controller's heart).
A rank whose reports stopped while its process lives is ``unresponsive``; one whose host the
head cannot reach either (the ``reachability`` callback, from ``liveness``) is ``unreachable``.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import zmq
import zmq.auth.thread

from ..fabric.placement import Host, Placement
from .record_schema import BadField, checked, nesting_ok
from .snapshot import MetricPoint, NodeStatus
from .utilisation import UsageStore, network_wait

#: A rank whose reports stopped this long ago (its process alive) is ``unresponsive``.
UNRESPONSIVE_AFTER_S = 2.0
#: Larger messages are dropped (a report is a few KiB; metrics at most a few hundred KiB).
MAX_MESSAGE_BYTES = 1 << 20
#: How fast a rank's request count may grow (requests per second, plus a start): a record that
#: claims more is forged, and would otherwise win the ordering against every true one.
MAX_REQUEST_RATE = 10_000
REQUEST_SLACK = 1_000
#: The receiving thread wakes this often and takes every queued report (the kernel and ZMQ's
#: I/O thread queue them, without the GIL): it never wakes per message, so the notices every
#: request sends do not compete with the client waiting for that request's reply.
DRAIN_PERIOD_S = 0.1
#: Kernel buffer for notices between drains (Linux caps it at net.core.rmem_max).
NOTICE_BUFFER_BYTES = 1 << 20
#: Tries at a port free for both the reports (TCP) and the notices (UDP).
BIND_TRIES = 50
#: Bytes of the HMAC-SHA256 that opens every notice datagram.
NOTICE_MAC_BYTES = 32
#: Head-side memory bounds for ``report()`` numbers.
POINTS_PER_SERIES = 5_000
SERIES_PER_RANK = 64

Evidence = Callable[[], Mapping[int, str]]
#: Host -> (seconds since it went silent, what is known) for hosts the head cannot reach.
Reachability = Callable[[], Mapping[str, tuple[float, str]]]

#: What a record says of the rank's request state (the rest describes the rank).
_STATE_KEYS = ("state", "busy_s", "requests")


class _OneKey:
    """ZAP's verdict on a CurveZMQ client: only the ranks' own public key is let in."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.allowed)  # (z85, as ZAP hands it over)


def _only_key(ctx: zmq.Context[Any], allowed: bytes) -> zmq.auth.thread.ThreadAuthenticator:
    """A ZAP handler on ``ctx`` (every CURVE server socket of it asks it) admitting ``allowed``."""
    auth = zmq.auth.thread.ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_OneKey(allowed))
    return auth


def _progress(msg: Mapping[str, Any]) -> int:
    """How far a record is in the rank's requests: twice the requests started, plus one once
    the last of them has ended (idle after request 3 is later than busy in it)."""
    requests = msg.get("requests")
    if not isinstance(requests, int):
        return -1
    return 2 * requests + (msg.get("state") == "idle")


class StatusReceiver:
    """Collects the sidecars' reports; ``nodes()`` is the plain data every view is built from."""

    def __init__(
        self, bind_ip: str, placement: Placement, evidence: Evidence | None = None
    ) -> None:
        self.placement = placement
        self.token = secrets.token_hex(16)
        self._evidence: Evidence = evidence or (lambda: {})
        self._reachability: Reachability = lambda: {}
        self._remote_evidence = False
        self._quiet: Callable[[], Mapping[str, str]] = lambda: {}
        self._ctx = zmq.Context()
        self._server_public, server_secret = zmq.curve_keypair()
        self._client_public, self._client_secret = zmq.curve_keypair()
        self._auth = _only_key(self._ctx, self._client_public)
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self._sock.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        host = f"[{bind_ip}]" if ":" in bind_ip else bind_ip
        if ":" in bind_ip:
            self._sock.setsockopt(zmq.IPV6, 1)
        port, self._udp = self._bind(bind_ip, host)
        self.url = f"tcp://{host}:{port}#{self.token}"
        #: How every message the sidecars send starts (``json.dumps`` keeps the token first).
        self._prefix = json.dumps({"token": self.token})[:-1].encode()
        self._started = time.monotonic()
        #: Rank -> the host name it gave over ipyparallel (``expect_hosts``), once known.
        self._hosts: list[str] | None = None
        #: Why messages were dropped, and how many for each reason.
        self._dropped: Counter[str] = Counter()
        self._token = self.token.encode()
        self._address = f"tcp://{host}:{port}"
        # A checked notice is handled as a report that carried the token.
        self._notice_prefix = b'{"token": "%s", ' % self._token
        #: rank -> (when last heard, merged record, when its state was set)
        self._latest: dict[int, tuple[float, dict[str, Any], float]] = {}
        self._series: dict[int, dict[str, deque[tuple[float, float | None, float]]]] = {}
        self._lock = threading.Lock()
        #: How hard each host works (CPU, GPU, power, temperature), kept bounded.
        self.usage = UsageStore(max_hosts=len(placement.hosts))
        #: Held while the sockets are read or closed: readers drain too (ZMQ sockets may move
        #: between threads only across a lock), so what arrived is in what they read.
        self._io_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="mlx-cluster-status", daemon=True)
        self._thread.start()

    def _bind(self, bind_ip: str, host: str) -> tuple[int, socket.socket]:
        """A random TCP port for the reports whose number is free for UDP too (the notices)."""
        family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
        for _ in range(BIND_TRIES):
            port = self._sock.bind_to_random_port(f"tcp://{host}")
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.bind((bind_ip, port))
            except OSError as e:
                udp.close()
                self._sock.unbind(f"tcp://{host}:{port}")
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            udp.setblocking(False)
            with contextlib.suppress(OSError):
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NOTICE_BUFFER_BYTES)
            return port, udp
        raise OSError(errno.EADDRINUSE, f"no port free for both TCP and UDP on {bind_ip}")

    @property
    def dropped(self) -> int:
        """How many messages were dropped (junk, forged, wrong token, too large...)."""
        with self._lock:
            return sum(self._dropped.values())

    def dropped_reasons(self) -> dict[str, int]:
        """Dropped messages by reason (``token``, ``size``, ``nesting``, ``json``, ``field``,
        ``rank``, ``host``, ``requests``, ``mac`` (a notice whose MAC fails), ``error``)."""
        with self._lock:
            return dict(self._dropped)

    def expect_hosts(self, hosts: list[str]) -> None:
        """The host name each rank gave in its answer over ipyparallel (authenticated): from
        now on a record naming another host for that rank is dropped, and host figures of any
        other host are forgotten."""
        if len(hosts) != self.placement.size:
            return
        self._hosts = [str(h) for h in hosts]
        self.usage.keep_only(set(self._hosts))

    @property
    def credentials(self) -> dict[str, str]:
        """What a rank needs to report (``rank.status_sidecar``): the address, the server's
        public key, the ranks' client key pair and the token (also the notices' MAC key).
        Secret: it travels only over ssh."""
        return {
            "url": self._address,
            "server_key": self._server_public.decode(),
            "public_key": self._client_public.decode(),
            "secret_key": self._client_secret.decode(),
            "token": self.token,
        }

    def set_evidence(self, evidence: Evidence) -> None:
        """Where proof of a rank's death comes from (set once the ranks' pids are known)."""
        self._evidence = evidence

    def set_reachability(
        self, reachability: Reachability, quiet: Callable[[], Mapping[str, str]] | None = None
    ) -> None:
        """Where the hosts the head cannot reach come from (``liveness.LivenessKeeper``), and
        the silent remote hosts whose ranks' processes were seen running (``quiet``): only
        those read ``unresponsive``; a remote rank silent without that evidence reads
        ``unreachable``."""
        self._reachability = reachability
        self._remote_evidence = quiet is not None
        if quiet is not None:
            self._quiet = quiet

    def silence(self) -> dict[int, float | None]:
        """Rank -> seconds since its last report (None before its first)."""
        self._receive()
        now = time.monotonic()
        with self._lock:
            return {
                r: (now - self._latest[r][0] if r in self._latest else None)
                for r in range(self.placement.size)
            }

    def on_update(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the receiver thread) about twice a second while running."""
        self._listeners.append(callback)

    def _run(self) -> None:
        last_tick = 0.0
        while not self._stop.wait(DRAIN_PERIOD_S):
            try:
                self._receive()
            except Exception:  # a bug, never a message: count it, keep receiving
                self._drop("error")
            now = time.monotonic()
            if now - last_tick >= 0.5:
                last_tick = now
                for callback in list(self._listeners):
                    with contextlib.suppress(Exception):
                        callback()
        with self._io_lock:
            self._closed = True
            self._sock.close(0)
            self._udp.close()
        with contextlib.suppress(Exception):
            self._auth.stop()
        self._ctx.term()

    def _receive(self) -> None:
        """Take every queued report and notice (from the receiver's thread, and from any
        reader's before it reads)."""
        with self._io_lock:
            if self._closed:
                return
            with contextlib.suppress(zmq.ZMQError):
                while True:
                    self._handle(self._sock.recv(zmq.NOBLOCK))
            while True:
                try:
                    notice = self._checked_notice(self._udp.recv(65536))
                except OSError:  # nothing queued (or an ICMP error): the next drain goes on
                    break
                if notice is not None:
                    self._handle(notice)

    def _checked_notice(self, datagram: bytes) -> bytes | None:
        """A notice whose MAC (keyed by the token) holds, as a report carrying the token."""
        mac, body = datagram[:NOTICE_MAC_BYTES], datagram[NOTICE_MAC_BYTES:]
        expected = hmac.digest(self._token, body, "sha256")
        if not hmac.compare_digest(mac, expected) or not body.startswith(b"{"):
            self._drop("mac")
            return None
        return self._notice_prefix + body[1:]

    def _drop(self, why: str) -> None:
        with self._lock:
            self._dropped[why] += 1

    def _handle(self, raw: bytes) -> None:
        """Keep one message, or drop and count it; never raises."""
        try:
            why = self._take(raw)
        except Exception:  # whatever a message holds, the receiver goes on
            why = "error"
        if why:
            self._drop(why)

    def _admit(self, raw: bytes) -> dict[str, Any] | str:
        """The checked record in ``raw``, or why it is dropped. The token (first, as the
        sidecars send it) is compared before anything is parsed; the nesting before
        ``json.loads``; every field after (``record_schema``)."""
        if len(raw) > MAX_MESSAGE_BYTES:
            return "size"
        if not hmac.compare_digest(raw[: len(self._prefix)], self._prefix):
            return "token"
        if not nesting_ok(raw):
            return "nesting"
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):
            return "json"
        try:
            record = checked(msg)
        except BadField:
            return "field"
        rank = record.get("rank")
        if rank is None or not 0 <= rank < self.placement.size:
            return "rank"
        hosts, host = self._hosts, record.get("host")
        if host is not None and hosts is not None and host != hosts[rank]:
            return "host"
        return record

    def _plausible(
        self, record: dict[str, Any], old: tuple[float, dict[str, Any], float] | None, now: float
    ) -> bool:
        """Whether the record's request count could have grown to what it says since the
        rank's last record (or since the receiver started)."""
        requests = record.get("requests")
        if requests is None:
            return True
        before, since = 0, self._started
        if old is not None and isinstance(old[1].get("requests"), int):
            before, since = old[1]["requests"], old[0]
        return bool(requests - before <= REQUEST_SLACK + MAX_REQUEST_RATE * (now - since))

    def _take(self, raw: bytes) -> str | None:
        """Store one message's record; None, or why it was dropped."""
        msg = self._admit(raw)
        if isinstance(msg, str):
            return msg
        rank = msg["rank"]
        now = time.monotonic()
        with self._lock:
            if not self._plausible(msg, self._latest.get(rank), now):
                return "requests"
        points = msg.pop("metrics", None)
        self.usage.add(rank, msg)
        with self._lock:
            old = self._latest.get(rank)
            state_at = now
            if old is not None:
                # Records and notices travel on two channels: the one that says less of the
                # rank's requests is older, so it may not set the state.
                if _progress(msg) < _progress(old[1]):
                    msg = {**msg, **{k: old[1][k] for k in _STATE_KEYS if k in old[1]}}
                    state_at = old[2]
                # A request's start/end notice carries only the state: merge it.
                msg = {**old[1], **msg}
            self._latest[rank] = (now, msg, state_at)
            if isinstance(points, list):
                self._store_points(rank, points)
        return None

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
        self._receive()
        now = time.monotonic()
        with self._lock:
            latest = dict(self._latest)
        try:
            dead = dict(self._evidence())
        except Exception:
            dead = {}
        try:
            unreachable = dict(self._reachability())
            quiet = dict(self._quiet())
        except Exception:
            unreachable, quiet = {}, {}
        result = []
        for rank, host in enumerate(self.placement.ranks):
            seen, msg, state_at = latest.get(rank, (None, {}, None))
            last_seen = None if seen is None else now - seen
            state_age = None if state_at is None else now - state_at
            silent = None
            why = None
            if rank in dead:
                state, why = "dead", dead[rank]
            elif seen is None:
                state = "starting"
            elif last_seen is not None and last_seen > UNRESPONSIVE_AFTER_S:
                state, silent, why = self._silent(host, last_seen, unreachable, quiet)
            else:
                state = str(msg.get("state", "idle"))
            if state == "unreachable":  # nothing the head heard lately: no figures to show
                msg = {k: msg[k] for k in ("host", "state", "busy_s", "pid", "device") if k in msg}
            was_busy = msg.get("state") == "busy"
            busy = (
                float(msg.get("busy_s", 0.0)) + (state_age or 0.0)
                if state == "busy" or (state in ("unresponsive", "unreachable") and was_busy)
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
                    cpu_percent=msg.get("cpu_percent"),
                    **(
                        {}
                        if state == "unreachable"
                        else self.usage.host_fields(str(msg.get("host", host.ssh)))
                    ),
                    waiting=network_wait(self.usage, str(msg.get("host", host.ssh)), msg, state),
                )
            )
        return result

    def _silent(
        self,
        host: Host,
        last_seen: float,
        unreachable: Mapping[str, tuple[float, str]],
        quiet: Mapping[str, str],
    ) -> tuple[str, float, str]:
        """(state, silent seconds, why) of a rank whose reports stopped: ``unresponsive`` only
        with evidence that its process runs (a local pid, or its host answering for it)."""
        if host.ssh in unreachable:
            since, detail = unreachable[host.ssh]
            return "unreachable", since, f"no word from {host.ssh}: {detail}"
        if host.is_local or not self._remote_evidence:
            why = "process alive; status reports stopped (a long C call holding the GIL?)"
            return "unresponsive", last_seen, why
        if host.ssh in quiet:
            return "unresponsive", last_seen, quiet[host.ssh]
        return "unreachable", last_seen, f"no word from {host.ssh}; asking whether it answers"

    def latest(self, rank: int, key: str) -> Any:
        """The newest value of ``key`` that ``rank`` reported (e.g. its flight recorder)."""
        self._receive()
        with self._lock:
            entry = self._latest.get(rank)
        return None if entry is None else entry[1].get(key)

    def requests(self, rank: int) -> int | None:
        """How many requests ``rank`` has started, as of its last report."""
        value = self.latest(rank, "requests")
        return value if isinstance(value, int) else None

    def metrics(self, last: int | None = None) -> list[MetricPoint]:
        """Every number the ranks reported (the newest ``last`` per series when given)."""
        self._receive()
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
