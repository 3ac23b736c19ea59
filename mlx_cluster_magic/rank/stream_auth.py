"""Streams between hosts that a stranger on the network can neither join nor alter.

Broadcast, sync and the links' TCP measure open a listener on a rank and let one peer connect
over the cluster's network, where anyone may listen and connect. Each listener gets a random
token of its own (a token per hop) through the engines' channel, never on the stream itself:

1. the listener sends a random nonce; the peer answers with a nonce of its own and
   HMAC(token, both nonces), so the token never crosses the wire and a sniffed answer is worth
   nothing on the next connection;
2. the data then travels in records, each with an HMAC-SHA256 under a key derived from the
   token and both nonces, over its sequence number, length and bytes: a byte changed, dropped,
   replayed or added by anyone without the token fails the check and the stream is refused.
   The bytes are authenticated, not encrypted.

``accept`` handles every pending handshake at once with a short deadline each, so silent or
wrong connections never hold the real peer back. Standard library only (runs on the ranks).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import selectors
import socket
import struct
import time
from collections.abc import Callable

NONCE_BYTES = 16
TAG_BYTES = 32
#: The largest record a reader takes (the writer's size); a longer length is refused unread.
RECORD_BYTES = 1 << 20
#: Seconds a connection may take to answer the challenge before it is dropped.
HANDSHAKE_S = 3.0
#: Handshakes in progress at once; beyond it the oldest is dropped.
MAX_PENDING = 256
_LENGTH = struct.Struct("!I")
_SEQ = struct.Struct("!Q")
#: Writes up to this size are gathered into one record (many small files).
_GATHER_BYTES = 64 << 10


class StreamForged(ConnectionError):
    """A record failed its check: the stream was altered or did not come from the peer."""


def new_token() -> str:
    """A fresh token for one hop."""
    return secrets.token_hex(32)


def _mac(token: str, label: bytes, listener_nonce: bytes, peer_nonce: bytes) -> bytes:
    return hmac.digest(token.encode(), label + listener_nonce + peer_nonce, "sha256")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or ``ConnectionError`` when the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    while len(view):
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("closed early")
        view = view[got:]
    return bytes(buf)


def prove(sock: socket.socket, token: str, timeout: float = HANDSHAKE_S) -> bytes:
    """Connecting side: answer the listener's challenge; returns the stream's key."""
    sock.settimeout(timeout)
    theirs = recv_exact(sock, NONCE_BYTES)
    mine = os.urandom(NONCE_BYTES)
    sock.sendall(mine + _mac(token, b"mcm-hello", theirs, mine))
    return _mac(token, b"mcm-data", theirs, mine)


class _Pending:
    """A connection whose answer to the challenge is still on its way."""

    def __init__(self, conn: socket.socket, nonce: bytes, deadline: float) -> None:
        self.conn, self.nonce, self.deadline = conn, nonce, deadline
        self.got = b""


def accept(
    listener: socket.socket,
    token: str,
    timeout: float,
    give_up: Callable[[], bool] | None = None,
    handshake_s: float = HANDSHAKE_S,
) -> tuple[socket.socket, bytes] | None:
    """Listening side: the first connection that answers the challenge within ``handshake_s``,
    with the stream's key; None after ``timeout`` or when ``give_up()`` says so. Every other
    connection is closed without a word; the listener is closed on return."""
    answer = NONCE_BYTES + TAG_BYTES
    deadline = time.monotonic() + timeout
    pending: dict[socket.socket, _Pending] = {}
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)

    def drop(conn: socket.socket) -> None:
        pending.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        conn.close()

    try:
        while (now := time.monotonic()) < deadline and not (give_up and give_up()):
            for conn in [c for c, p in pending.items() if p.deadline < now]:
                drop(conn)
            for key, _ in sel.select(min(0.05, deadline - now)):
                if key.fileobj is listener:
                    _take_new(listener, sel, pending, now + handshake_s, drop)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                p = pending[conn]
                try:
                    part = conn.recv(answer - len(p.got))
                except OSError:
                    part = b""
                if not part:
                    drop(conn)
                    continue
                p.got += part
                if len(p.got) < answer:
                    continue
                peer_nonce, proof = p.got[:NONCE_BYTES], p.got[NONCE_BYTES:]
                if hmac.compare_digest(proof, _mac(token, b"mcm-hello", p.nonce, peer_nonce)):
                    pending.pop(conn)
                    sel.unregister(conn)
                    conn.setblocking(True)
                    return conn, _mac(token, b"mcm-data", p.nonce, peer_nonce)
                drop(conn)
        return None
    finally:
        for conn in list(pending):
            drop(conn)
        sel.close()
        listener.close()


def _take_new(
    listener: socket.socket,
    sel: selectors.BaseSelector,
    pending: dict[socket.socket, _Pending],
    deadline: float,
    drop: Callable[[socket.socket], None],
) -> None:
    """Every connection waiting on the listener: challenged at once (the oldest pending one
    is dropped when too many wait)."""
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        conn.setblocking(False)
        nonce = os.urandom(NONCE_BYTES)
        try:
            conn.send(nonce)  # a fresh socket's buffer takes 16 bytes at once
        except OSError:
            conn.close()
            continue
        if len(pending) >= MAX_PENDING:
            drop(next(iter(pending)))
        pending[conn] = _Pending(conn, nonce, deadline)
        sel.register(conn, selectors.EVENT_READ)


class RecordWriter:
    """The sending half: bytes in records of at most ``RECORD_BYTES``, each with its tag."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        self.sock, self.key, self.seq = sock, key, 0
        self._gathered = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if len(view) < _GATHER_BYTES and len(self._gathered) + len(view) <= RECORD_BYTES:
            self._gathered += view
            if len(self._gathered) >= _GATHER_BYTES:
                self.flush()
            return
        self.flush()
        for start in range(0, len(view), RECORD_BYTES):
            self._record(view[start : start + RECORD_BYTES])

    def flush(self) -> None:
        if self._gathered:
            data, self._gathered = self._gathered, bytearray()
            self._record(memoryview(data))

    def _record(self, payload: memoryview) -> None:
        length = _LENGTH.pack(len(payload))
        mac = hmac.new(self.key, _SEQ.pack(self.seq) + length, "sha256")
        mac.update(payload)
        self.seq += 1
        if len(payload) <= _GATHER_BYTES:
            self.sock.sendall(b"".join((length, payload, mac.digest())))
        else:
            self.sock.sendall(length)
            self.sock.sendall(payload)
            self.sock.sendall(mac.digest())


class RecordReader:
    """The receiving half: hands out only bytes whose record passed its check."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        self.sock, self.key, self.seq = sock, key, 0
        self._left = memoryview(b"")

    def _header(self) -> int:
        length: int = _LENGTH.unpack(recv_exact(self.sock, _LENGTH.size))[0]
        if length == 0 or length > RECORD_BYTES:
            raise StreamForged(f"a record of {length} bytes (at most {RECORD_BYTES})")
        return length

    def _check(self, length: int, payload: memoryview) -> None:
        mac = hmac.new(self.key, _SEQ.pack(self.seq) + _LENGTH.pack(length), "sha256")
        mac.update(payload)
        if not hmac.compare_digest(mac.digest(), recv_exact(self.sock, TAG_BYTES)):
            raise StreamForged("a record failed its check: the stream was altered on the way")
        self.seq += 1

    def _fill(self, view: memoryview) -> None:
        while len(view):
            got = self.sock.recv_into(view)
            if got == 0:
                raise ConnectionError("closed early")
            view = view[got:]

    def readinto(self, target: memoryview) -> int:
        """Some checked bytes into ``target`` (at least one); a whole record lands there
        directly when it fits."""
        if not len(self._left):
            length: int = self._header()
            if length <= len(target):
                self._fill(target[:length])
                self._check(length, target[:length])
                return length
            buf = memoryview(bytearray(length))
            self._fill(buf)
            self._check(length, buf)
            self._left = buf
        n = min(len(target), len(self._left))
        target[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        while len(view):
            view = view[self.readinto(view) :]
        return bytes(buf)
