"""Broadcast, head side: an array from the notebook to every rank as one variable.

The array is streamed straight to the root rank over one TCP connection (not through the
controller, which would copy it several times); the ranks pass it on with MPI's buffer
broadcast, chunk by chunk as it arrives (``rank.broadcast_receiver``). The head connects
*before* the ranks start waiting, so a connection that fails raises its real error at once; it
proves the listener's token and sends the bytes in checked records (``rank.stream_auth``).
"""

from __future__ import annotations

import socket
from typing import Any

from ..errors import MLXClusterError
from ..rank import stream_auth
from ..rank.broadcast_receiver import (
    ACCEPT_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    close_listener,
    open_listener,
    receive_broadcast,
)


def send_broadcast(client: Any, view: Any, name: str, value: Any, *, root: int, ip: str) -> None:
    """Head: bind ``value`` to ``name`` on every rank (see the module docstring)."""
    import numpy as np

    if not isinstance(name, str) or not name.isidentifier():
        raise MLXClusterError(f"broadcast takes a variable name, got {name!r}")
    to_mlx = type(value).__module__.startswith("mlx")
    if to_mlx and "bfloat16" in str(getattr(value, "dtype", "")):
        raise MLXClusterError("broadcast: bfloat16 has no NumPy type; send .astype(mx.float32)")
    arr = np.require(np.asarray(value), requirements="C")  # keeps 0-d arrays 0-d
    if arr.dtype.hasobject:
        raise MLXClusterError("broadcast sends numeric arrays; use view.push for objects")
    token = stream_auth.new_token()
    port = client[root].apply_sync(open_listener, ip, token)
    try:
        conn = socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        client[root].apply_sync(close_listener, token)
        raise MLXClusterError(
            f"broadcast: cannot connect to rank {root} at {ip}:{port}: {e}"
        ) from None
    with conn:
        ar = view.apply_async(
            receive_broadcast, name, arr.shape, arr.dtype.str, to_mlx, token, root
        )
        try:
            key = stream_auth.prove(conn, token, ACCEPT_TIMEOUT_S)
            conn.settimeout(ACCEPT_TIMEOUT_S)
            writer = stream_auth.RecordWriter(conn, key)
            writer.write(arr.reshape(-1).view(np.uint8).data)
            writer.flush()
        finally:
            ar.get()
