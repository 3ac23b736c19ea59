"""Broadcast, rank side: receive an array from the notebook and bind it on every rank.

The head (``broadcast_sender``) streams the array to the root rank over one TCP connection, and
the ranks pass it on with MPI's buffer broadcast, chunk by chunk as it arrives
(``receive_broadcast``, shipped to the engines by ``view.apply``). The listener binds the
root's cluster address only, accepts only the connection that presents the random token, and is
always closed.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
import time

CHUNK_BYTES = 4 << 20
ACCEPT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0

_listeners: dict[str, socket.socket] = {}


def close_listener(token: str) -> None:
    """Root: drop a listener the notebook could not reach."""
    listener = _listeners.pop(token, None)
    if listener is not None:
        listener.close()


def open_listener(bind_ip: str, token: str) -> int:
    """Root rank: listen for the notebook's one connection; return the port."""
    family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((bind_ip, 0))
    sock.listen(1)
    sock.settimeout(ACCEPT_TIMEOUT_S)
    _listeners[token] = sock
    return int(sock.getsockname()[1])


def _accept(listener: socket.socket, token: str) -> socket.socket | None:
    """Root: the first connection that presents the token in time; any other is closed."""
    deadline = time.monotonic() + ACCEPT_TIMEOUT_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            listener.settimeout(left)
            try:
                conn, _ = listener.accept()
            except OSError:
                return None
            conn.settimeout(min(left, CONNECT_TIMEOUT_S))
            got = b""
            with contextlib.suppress(OSError):
                while len(got) < len(token):
                    part = conn.recv(len(token) - len(got))
                    if not part:
                        break
                    got += part
            if hmac.compare_digest(got, token.encode()):
                conn.settimeout(ACCEPT_TIMEOUT_S)
                return conn
            conn.close()
        return None
    finally:
        listener.close()


def _fill(conn: socket.socket | None, chunk: memoryview) -> socket.socket | None:
    """Root: read one chunk from the notebook; on failure, drop the connection (the chunk
    is then broadcast as it is, and the final status tells every rank it failed)."""
    if conn is None:
        return None
    view = chunk
    try:
        while len(view):
            n = conn.recv_into(view)
            if n == 0:
                raise ConnectionError("closed early")
            view = view[n:]
    except OSError:
        conn.close()
        return None
    return conn


def receive_broadcast(
    name: str, shape: tuple[int, ...], dtype: str, to_mlx: bool, token: str, root: int = 0
) -> bool:
    """Every rank: receive the array (the root from the notebook, the others by MPI) and bind
    it to ``name`` in the user namespace."""
    import numpy as np
    from IPython import get_ipython
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    arr = np.empty(shape, dtype=np.dtype(dtype))
    buf = arr.reshape(-1).view(np.uint8).data
    conn = None
    if comm.Get_rank() == root:
        conn = _accept(_listeners.pop(token), token)
    if not comm.bcast(conn is not None if comm.Get_rank() == root else None, root=root):
        raise ConnectionError("broadcast: the notebook did not connect, or sent a wrong token")
    # Every rank takes part in every chunk's broadcast, whatever happens on the root's socket,
    # so no rank is left waiting; the final status says whether the data arrived whole. The
    # root reads the next chunk from the socket while the previous one is being broadcast.
    pending = None
    for start in range(0, len(buf), CHUNK_BYTES):
        chunk = buf[start : start + CHUNK_BYTES]
        if comm.Get_rank() == root:
            conn = _fill(conn, chunk)
        if pending is not None:
            pending.Wait()
        pending = comm.Ibcast(chunk, root=root)
    if pending is not None:
        pending.Wait()
    whole = comm.bcast(conn is not None if comm.Get_rank() == root else None, root=root)
    if conn is not None:
        conn.close()
    if not whole:
        raise ConnectionError("broadcast: the notebook's connection broke mid-transfer")
    ns = get_ipython().user_ns
    if to_mlx:
        import mlx.core as mx

        ns[name] = mx.array(arr)
    else:
        ns[name] = arr
    return True
