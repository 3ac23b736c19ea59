"""cluster.broadcast: one stream from the notebook to the root, then MPI to every rank."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from mlx_cluster_magic import MLXCluster, MLXClusterError
from mlx_cluster_magic.rank.broadcast_receiver import CHUNK_BYTES


@pytest.fixture(scope="module")
def cluster():
    with MLXCluster(n=2) as c:
        yield c


def _sums(cluster, name: str) -> list[float]:
    cluster.view.execute(f"import numpy as np\n_s = float(np.asarray({name}, dtype=np.float64).sum())")
    return cluster.view["_s"]


def test_numpy_array_reaches_every_rank(cluster) -> None:
    cluster.view.execute("import numpy as np")
    arr = np.random.default_rng(1).standard_normal(CHUNK_BYTES // 4 * 2 + 123, dtype=np.float32)
    cluster.broadcast("w", arr)
    assert _sums(cluster, "w") == [pytest.approx(float(arr.astype(np.float64).sum()))] * 2
    cluster.view.execute("t = type(w).__name__, w.shape, str(w.dtype)")
    assert cluster.view["t"] == [("ndarray", arr.shape, "float32")] * 2


def test_mlx_array_stays_mlx_and_root_can_be_any_rank(cluster) -> None:
    import mlx.core as mx

    x = mx.arange(12, dtype=mx.int32).reshape(3, 4)
    cluster.broadcast("m", x, root=1)
    cluster.view.execute("info = (type(m).__module__, m.shape, m.sum().item())")
    assert cluster.view["info"] == [("mlx.core", (3, 4), 66)] * 2


def test_empty_and_scalar_arrays(cluster) -> None:
    cluster.broadcast("e", np.zeros((0, 3)))
    cluster.broadcast("z", np.float64(2.5))
    cluster.view.execute("ez = (e.shape, float(z))")
    assert cluster.view["ez"] == [((0, 3), 2.5)] * 2


def test_bad_arguments(cluster) -> None:
    with pytest.raises(MLXClusterError, match="root must be a rank from 0 to 1"):
        cluster.broadcast("w", np.zeros(3), root=2)
    with pytest.raises(MLXClusterError, match="takes a variable name"):
        cluster.broadcast("not a name", np.zeros(3))
    with pytest.raises(MLXClusterError, match="numeric arrays"):
        cluster.broadcast("o", np.array([object()]))


def test_a_wrong_token_is_dropped_and_only_the_sender_gets_through(cluster) -> None:
    from mlx_cluster_magic.rank import stream_auth
    from mlx_cluster_magic.rank.broadcast_receiver import open_listener, receive_broadcast

    token = stream_auth.new_token()
    port = cluster.client[0].apply_sync(open_listener, "127.0.0.1", token)
    ar = cluster.view.apply_async(receive_broadcast, "x", (4,), "<f4", False, token, 0)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as intruder:
        stream_auth.prove(intruder, stream_auth.new_token())  # answers for another token
        assert intruder.recv(1) == b""  # closed by the root
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        writer = stream_auth.RecordWriter(conn, stream_auth.prove(conn, token))
        writer.write(np.arange(4, dtype="<f4").tobytes())
        writer.flush()
        ar.get(timeout=30)
    assert cluster.view["x"][1].tolist() == [0.0, 1.0, 2.0, 3.0]
    cluster.broadcast("after", np.ones(3))  # the cluster is still healthy
    assert _sums(cluster, "after") == [3.0, 3.0]


def test_a_listener_the_notebook_cannot_reach_is_closed(cluster) -> None:
    from mlx_cluster_magic.rank.broadcast_receiver import close_listener, open_listener

    port = cluster.client[0].apply_sync(open_listener, "127.0.0.1", "c" * 32)
    cluster.client[0].apply_sync(close_listener, "c" * 32)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
