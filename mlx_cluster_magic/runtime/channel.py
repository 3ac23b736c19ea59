"""The runtime's one channel of ours: signed requests and replies over ZeroMQ.

The runtime binds a ROUTER on loopback (a notebook on another Mac reaches it through ssh's port
forwarding, never over the network in clear); each notebook connects a DEALER. Every message is
``[signature, body]``: the body a pickle of the request or reply, the signature its HMAC-SHA256
under the key in the runtime's record (0600, so only its owner has it), checked in constant time
before the body is read. Junk, a wrong signature or an oversized message is dropped and counted;
the listener never answers what it cannot verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..errors import MLXClusterError

#: Requests larger than this are junk (the largest real one is a cell's code).
MAX_REQUEST_BYTES = 16 * 2**20
#: How long a call waits for its reply unless told otherwise.
CALL_TIMEOUT_S = 30.0


def new_key() -> str:
    return os.urandom(32).hex()


def _sign(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


class ChannelServer:
    """The runtime's side: ``serve_once`` answers what arrived; ``handle(method, args, kwargs)``
    is called for each verified request (on a worker thread when it may be long)."""

    def __init__(self, key: str, host: str = "127.0.0.1") -> None:
        self._key = bytes.fromhex(key)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.url = f"tcp://{host}:{port}"
        self.dropped = 0
        self._replies: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._wake_in, self._wake_out = self._ctx.socket(zmq.PAIR), self._ctx.socket(zmq.PAIR)
        self._wake_in.bind(f"inproc://wake-{id(self)}")
        self._wake_out.connect(f"inproc://wake-{id(self)}")
        self._server_thread: threading.Thread | None = None

    def serve_once(
        self, handle: Callable[[bytes, str, tuple[Any, ...], dict[str, Any]], Any],
        long_calls: frozenset[str], timeout_ms: int = 200,
    ) -> None:  # fmt: skip
        """Wait up to ``timeout_ms`` for requests and answer them; long calls are answered from
        a thread of their own, so one notebook's stop never holds another's poll."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        if self._wake_in in events:
            while self._wake_in.poll(0):
                self._wake_in.recv()
        self._server_thread = threading.current_thread()
        self._flush()
        if self._sock not in events:
            return
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._flush()
                return
            request = self._verify(frames)
            if request is None:
                continue
            peer, (call_id, method, args, kwargs) = request
            if method in long_calls:
                threading.Thread(
                    target=self._answer, args=(handle, peer, call_id, method, args, kwargs),
                    daemon=True,
                ).start()  # fmt: skip
            else:
                self._answer(handle, peer, call_id, method, args, kwargs)

    def _verify(self, frames: list[bytes]) -> tuple[bytes, Any] | None:
        if len(frames) != 3:
            self.dropped += 1
            return None
        peer, signature, body = frames
        if not hmac.compare_digest(signature, _sign(self._key, body)):
            self.dropped += 1
            return None
        try:
            request = pickle.loads(body)  # signed by the record's owner: trusted as the record
            call_id, method, args, kwargs = request
            if not isinstance(method, str) or not isinstance(args, tuple):
                raise ValueError(method)
            if not isinstance(kwargs, dict):
                raise ValueError(kwargs)
        except Exception:
            self.dropped += 1
            return None
        return peer, (call_id, method, args, kwargs)

    def _answer(
        self, handle: Callable[..., Any], peer: bytes, call_id: int, method: str,
        args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        try:
            reply: tuple[Any, ...] = (call_id, True, handle(peer, method, args, kwargs))
            body = pickle.dumps(reply)
        except BaseException as e:  # the caller gets it as one line
            text = str(e) if isinstance(e, MLXClusterError) else f"{type(e).__name__}: {e}"
            body = pickle.dumps((call_id, False, (isinstance(e, MLXClusterError), text)))
        with self._lock:
            self._replies.append([peer, _sign(self._key, body), body])
        if threading.current_thread() is not self._server_thread:
            with self._lock, contextlib.suppress(zmq.ZMQError):
                self._wake_out.send(b"", zmq.NOBLOCK)  # the serving thread sends it

    def _flush(self) -> None:
        with self._lock:
            replies, self._replies = self._replies, []
        for frames in replies:
            self._sock.send_multipart(frames)

    def close(self) -> None:
        for s in (self._sock, self._wake_in, self._wake_out):
            s.close(linger=0)
        self._ctx.term()


class ChannelClient:
    """A notebook's side: ``call(method, *args)`` returns the runtime's answer or raises its
    error (one line); thread-safe (the kernel's cells and the view's poll share it)."""

    def __init__(self, url: str, key: str, gone: Callable[[], str | None] | None = None) -> None:
        self._key = bytes.fromhex(key)
        self._url = url
        #: Says why the runtime is known gone (its process ended), else None: a call waiting
        #: on a dead runtime ends at once instead of at its timeout.
        self._gone = gone
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket[bytes] | None = None
        self._connect()

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect(self._url)

    def notify(self, method: str, *args: Any) -> None:
        """Send a call whose answer nobody waits for (a later call skips it)."""
        with self._lock:
            assert self._sock is not None
            body = pickle.dumps((next(self._ids), method, args, {}))
            self._sock.send_multipart([_sign(self._key, body), body])

    def call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S, **kwargs: Any) -> Any:
        with self._lock:
            assert self._sock is not None
            call_id = next(self._ids)
            body = pickle.dumps((call_id, method, args, kwargs))
            self._sock.send_multipart([_sign(self._key, body), body])
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(int(min(left, 0.5) * 1000)):
                    why = self._gone() if self._gone is not None else None
                    if why is None and left > 0:
                        continue
                    self._connect()  # a late reply must not answer the next call
                    raise ChannelTimeout(method, timeout) if why is None else MLXClusterError(why)
                signature, reply = self._sock.recv_multipart()
                if not hmac.compare_digest(signature, _sign(self._key, reply)):
                    continue
                got_id, ok, value = pickle.loads(reply)
                if got_id == call_id:
                    break
        if ok:
            return value
        ours, text = value
        raise MLXClusterError(text) if ours else RuntimeFailure(text)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
        self._ctx.term()


class ChannelTimeout(MLXClusterError):
    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(f"the cluster's runtime did not answer {method} within {timeout:g} s")


class RuntimeFailure(MLXClusterError):
    """A bug on the runtime's side, in its own words."""
