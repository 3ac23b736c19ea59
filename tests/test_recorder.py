"""The flight recorder on a real 2-rank cluster: every op, what ``nn.average_gradients`` and
the sharded layers issue (at the user's cell line), sequence numbers per group and per pair,
the bounded ring, and a snapshot that is small JSON."""

from __future__ import annotations

import json

import pytest

from mlx_cluster_magic import MLXCluster

from conftest import wait_no_processes

SETUP = """
from mlx_cluster_magic.rank import flight_recorder as _recorder
_recorder.install()
_recorder.reset()
"""


@pytest.fixture(scope="module")
def cluster():
    with MLXCluster(2, live_status=False) as c:
        c.view.execute(SETUP)
        yield c
    assert not wait_no_processes(), "processes left running"


def _records(cluster: MLXCluster, cell: str) -> list[list[dict]]:
    cluster.view.execute("_recorder.reset()")
    cluster.view.execute(cell)
    cluster.view.execute("_snap = _recorder.snapshot()")
    snaps = cluster.view["_snap"]
    for s in snaps:
        assert json.loads(json.dumps(s)) == s  # plain JSON
    return [s["recent"] for s in snaps]


def _short(rec: dict) -> tuple:
    return (rec["group"], rec["seq"], rec["op"], tuple(rec["shape"]), rec["dtype"], rec["where"])


def test_every_op_is_recorded_with_its_cell_line(cluster) -> None:
    cell = (
        "x = mx.ones((2, 3))\n"
        "a = mx.distributed.all_sum(x)\n"
        "b = mx.distributed.all_gather(x)\n"
        "c = mx.distributed.all_max(x); d = mx.distributed.all_min(x)\n"
        "e = mx.distributed.sum_scatter(mx.ones(4))\n"
        "mx.eval(a, b, c, d)\n"
        "peer = 1 - world.rank()\n"
        "if world.rank() == 0:\n"
        "    mx.eval(mx.distributed.send(mx.arange(3), peer))\n"
        "    got = mx.distributed.recv((2,), mx.float16, peer).tolist()\n"
        "else:\n"
        "    got = mx.distributed.recv_like(mx.arange(3), peer).tolist()\n"
        "    mx.eval(mx.distributed.send(mx.ones(2, dtype=mx.float16), peer))\n"
    )
    r0, r1 = _records(cluster, cell)
    collectives = [
        ("world", 1, "all_sum", (2, 3), "float32", "cell line 2"),
        ("world", 2, "all_gather", (2, 3), "float32", "cell line 3"),
        ("world", 3, "all_max", (2, 3), "float32", "cell line 4"),
        ("world", 4, "all_min", (2, 3), "float32", "cell line 4"),
        ("world", 5, "sum_scatter", (4,), "float32", "cell line 5"),
    ]
    assert [_short(r) for r in r0] == [
        *collectives,
        ("world:0>1", 1, "send", (3,), "int32", "cell line 9"),
        ("world:1>0", 1, "recv", (2,), "float16", "cell line 10"),
    ]
    assert [_short(r) for r in r1] == [
        *collectives,
        ("world:0>1", 1, "recv_like", (3,), "int32", "cell line 12"),
        ("world:1>0", 1, "send", (2,), "float16", "cell line 13"),
    ]
    assert r0[-2]["peer"] == 1 and r1[-1]["peer"] == 0
    assert all(r["cell"] for r in r0 + r1)


def test_average_gradients_and_sharded_layers_are_recorded_at_the_cell_line(cluster) -> None:
    cell = (
        "import mlx.nn as nn\n"
        "from mlx.nn.layers.distributed import shard_linear\n"
        "grads = {'w': mx.ones((4, 4)), 'b': mx.ones(4)}\n"
        "avg = nn.average_gradients(grads)\n"
        "mx.eval(avg)\n"
        "mx.random.seed(0)\n"
        "lin = shard_linear(nn.Linear(8, 8), 'sharded-to-all')\n"
        "out = lin(mx.ones((1, lin.weight.shape[1])))\n"
        "mx.eval(out)\n"
    )
    r0, r1 = _records(cluster, cell)
    ops = [(r["op"], r["where"]) for r in r0]
    # average_gradients joins the gradients into one buffer: one all_sum, at line 4
    assert ops[0] == ("all_sum", "cell line 4")
    assert r0[0]["shape"] == [20]
    # the sharded-to-all layer sums its partial outputs: an all_sum at the call (line 8)
    assert ("all_sum", "cell line 8") in ops
    assert [_short(r) for r in r0] == [_short(r) for r in r1]


def test_the_ring_is_bounded_and_the_snapshot_small(cluster) -> None:
    cluster.view.execute("_recorder.reset()")
    cluster.view.execute("ys = [mx.distributed.all_sum(mx.ones(2)) for _ in range(300)]")
    cluster.view.execute(
        "_snap = _recorder.snapshot(); _ring = len(_recorder._ring); import json as _j; "
        "_size = len(_j.dumps(_snap))"
    )
    snap = cluster.view["_snap"][0]
    assert snap["count"] == 300 and snap["seq"] == {"world": 300}
    assert len(snap["recent"]) == 16 and snap["recent"][-1]["seq"] == 300
    assert cluster.view["_ring"] == [256, 256]
    assert max(cluster.view["_size"]) < 16_000
    # Taken by the main thread itself: busy at that line, in no evaluation.
    assert snap["busy"] is True and snap["blocked"] is None
    assert (snap["where"]["where"], snap["where"]["call"]) == ("cell line 1", "_recorder.snapshot")
    cluster.view.execute("mx.eval(ys); del ys")


def test_subgroups_count_apart(cluster) -> None:
    cell = (
        "sub = world.split(world.rank())\n"
        "s = mx.distributed.all_sum(mx.ones(2), group=sub)\n"
        "w = mx.distributed.all_sum(mx.ones(2), group=world)\n"
        "mx.eval(s, w)\n"
    )
    r0, _r1 = _records(cluster, cell)
    assert [(r["group"], r["seq"]) for r in r0] == [("g1", 1), ("world", 1)]


def test_uninstall_puts_mlx_back(cluster) -> None:
    cluster.view.execute(
        "_recorder.uninstall()\n"
        "_orig = getattr(mx.distributed.all_sum, '__wrapped__', None) is None\n"
        "_recorder.install()\n"
        "_wrapped = mx.distributed.all_sum.__wrapped__ is not None\n"
    )
    assert cluster.view["_orig"] == [True, True]
    assert cluster.view["_wrapped"] == [True, True]


def test_tracked_evaluation_settles_collectives(cluster) -> None:
    cluster.view.execute(
        "_recorder.uninstall(); _recorder.install(track_evaluation=True)\n"
        "p = mx.distributed.all_sum(mx.ones(2))\n"
        "_before = _recorder.snapshot()['pending']\n"
        "p.tolist()\n"
        "_after = _recorder.snapshot()['pending']\n"
        "_recorder.uninstall(); _recorder.install()\n"
    )
    assert cluster.view["_before"] == [1, 1]
    assert cluster.view["_after"] == [0, 0]
