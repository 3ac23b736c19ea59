"""Functions that run on the engines (shipped by ``view.apply``): moving data between ranks.

``cluster.broadcast`` streams an array from the notebook straight to the root rank over one TCP
connection (not through the controller, which would copy it several times), and the ranks pass
it on with MPI's buffer broadcast, chunk by chunk as it arrives. The listener binds the root's
cluster address only, takes one connection, and checks a random token first.
"""

from __future__ import annotations

import hmac
import socket

CHUNK_BYTES = 4 << 20
ACCEPT_TIMEOUT_S = 30.0

_listeners: dict[str, socket.socket] = {}


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
    """Root: the notebook's connection, if it arrives in time and starts with the token."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return None
    finally:
        listener.close()
    conn.settimeout(ACCEPT_TIMEOUT_S)
    got = b""
    try:
        while len(got) < len(token):
            part = conn.recv(len(token) - len(got))
            if not part:
                break
            got += part
    except OSError:
        pass
    if hmac.compare_digest(got, token.encode()):
        return conn
    conn.close()
    return None


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
    buf = memoryview(arr.reshape(-1).view(np.uint8))
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
    ns = get_ipython().user_ns  # type: ignore[union-attr]
    if to_mlx:
        import mlx.core as mx

        ns[name] = mx.array(arr)
    else:
        ns[name] = arr
    return True
