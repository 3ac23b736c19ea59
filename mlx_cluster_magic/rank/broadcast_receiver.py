"""Broadcast, rank side: receive an array from the notebook and bind it on every rank.

The head (``broadcast_sender``) streams the array to the root rank over one TCP connection, and
the ranks pass it on with MPI's buffer broadcast, chunk by chunk as it arrives
(``receive_broadcast``, shipped to the engines by ``view.apply``). The listener binds the
root's cluster address only, accepts only the connection that proves it holds the random token
(``stream_auth``: the token itself never crosses the wire), checks every record of the data, and
is always closed.
"""

from __future__ import annotations

import socket

from . import stream_auth

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
    sock.listen(64)  # one is taken; the others must not wait in SYN retries
    sock.settimeout(ACCEPT_TIMEOUT_S)
    _listeners[token] = sock
    return int(sock.getsockname()[1])


def _accept(listener: socket.socket, token: str) -> tuple[socket.socket, bytes] | None:
    """Root: the first connection that proves it holds the token, with the stream's key; any
    other is closed, and none holds the others back."""
    found = stream_auth.accept(listener, token, ACCEPT_TIMEOUT_S)
    if found is not None:
        found[0].settimeout(ACCEPT_TIMEOUT_S)
    return found


def _fill(
    stream: stream_auth.RecordReader | None, chunk: memoryview
) -> stream_auth.RecordReader | None:
    """Root: read one chunk from the notebook, every record checked; on failure (a broken or
    altered stream), drop the connection (the chunk is then broadcast as it is, and the final
    status tells every rank it failed)."""
    if stream is None:
        return None
    view = chunk
    try:
        while len(view):
            view = view[stream.readinto(view) :]
    except OSError:
        stream.sock.close()
        return None
    return stream


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
    conn: stream_auth.RecordReader | None = None
    if comm.Get_rank() == root:
        found = _accept(_listeners.pop(token), token)
        conn = stream_auth.RecordReader(*found) if found is not None else None
    if not comm.bcast(conn is not None if comm.Get_rank() == root else None, root=root):
        raise ConnectionError("broadcast: the notebook did not connect, or did not hold the token")
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
        conn.sock.close()
    if not whole:
        raise ConnectionError(
            "broadcast: the notebook's connection broke or failed its check mid-transfer"
        )
    ns = get_ipython().user_ns
    if to_mlx:
        import mlx.core as mx

        ns[name] = mx.array(arr)
    else:
        ns[name] = arr
    return True
