"""Checked collectives on a real 2-rank cluster: each deliberate bug raises a Python exception
within the timeout, names the ranks and lines, and the next cell runs on the same cluster."""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path
from typing import Any

import hangdoc
import psutil
import pytest
from ipyparallel import error

from mlx_cluster_magic import MLXCluster

from conftest import wait_no_processes

TIMEOUT = 3.0


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory):
    where = tmp_path_factory.mktemp("checks")
    with MLXCluster(2, live_status=False) as cluster:
        hangdoc.setup(cluster.view, where)
        cluster.view.execute(
            f"from mlx_cluster_magic.rank import collective_checks as _checks; _checks.enable(timeout={TIMEOUT})"
        )
        cluster.view.execute("mx.eval(mx.distributed.all_sum(mx.ones(4)))")
        yield cluster, where
    assert not wait_no_processes(), "processes left running"


def _errors(ar: Any, timeout: float = 60) -> tuple[dict[int, tuple[str, str]], float]:
    """Per engine id: (exception name, message) of the ranks that failed; and the wall time."""
    t = time.monotonic()
    ar.wait(timeout)
    assert ar.ready(), "the cell did not finish"
    elapsed = time.monotonic() - t
    try:
        ar.get()
    except error.CompositeError as e:
        return {info["engine_id"]: (name, str(value)) for name, value, _tb, info in e.elist}, (
            elapsed
        )
    return {}, elapsed


def _healthy(cluster: MLXCluster) -> None:
    cluster.view.execute("_ok = mx.distributed.all_sum(mx.ones(2) * (world.rank() + 1)).tolist()")
    assert cluster.view["_ok"] == [[3.0, 3.0], [3.0, 3.0]]


def _seq(cluster: MLXCluster) -> int:
    """The next world sequence number (the same on every rank while they agree)."""
    cluster.view.execute("_next = _recorder.next_seq('world')")
    nexts = cluster.view["_next"]
    assert len(set(nexts)) == 1, nexts
    return int(nexts[0])


def test_a_rank_that_skips_a_collective(checked) -> None:
    cluster, _where = checked
    s = _seq(cluster)
    cell = "if world.rank() != 1:\n    z = mx.distributed.all_sum(mx.ones(3))\n    mx.eval(z)\n"
    errors, elapsed = _errors(cluster.view.execute(cell, block=False))
    assert set(errors) == {0}
    name, message = errors[0]
    assert name == "CollectiveTimeout"
    assert message.startswith(
        f"collective #{s} all_sum float32[3] (cell line 2): rank 1 did not arrive within 3 s "
        f"(rank 1's last was #{s - 1} all_sum float32[4] at cell line 1)"
    ), message
    assert elapsed < TIMEOUT + 5
    _healthy(cluster)  # rank 1 moves past the collective it skipped at the next cell


def test_a_rank_in_a_long_sleep(checked) -> None:
    cluster, where = checked
    s = _seq(cluster)
    g = hangdoc.gate(where, "sleep")
    cell = hangdoc.late_rank_cell(g)
    ar = cluster.view.execute(cell, block=False)
    t = time.monotonic()
    rank0 = ar._children[0]
    futures.wait([rank0], timeout=TIMEOUT + 10)
    assert rank0.done() and time.monotonic() - t < TIMEOUT + 5
    Path(g).touch()  # rank 1 wakes up and reaches the collective the others gave up on
    errors, _elapsed = _errors(ar)
    assert errors[0][0] == "CollectiveTimeout"
    assert errors[0][1].startswith(
        f"collective #{s} all_sum float32[4] (cell line 3): rank 1 did not arrive"
    )
    assert errors[1][0] == "CollectiveAbandoned"
    assert errors[1][1].startswith(
        f"collective #{s} all_sum float32[4] (cell line 3) was abandoned by rank 0"
    ), errors[1][1]
    _healthy(cluster)


@pytest.mark.parametrize(
    "expr, theirs",
    [
        ("mx.distributed.all_gather(mx.ones(4))", "all_gather float32[4]"),
        ("mx.distributed.all_sum(mx.ones(5))", "all_sum float32[5]"),
        ("mx.distributed.all_sum(mx.ones(4, dtype=mx.int32))", "all_sum int32[4]"),
    ],
)
def test_ranks_that_issue_different_ops_or_shapes(checked, expr: str, theirs: str) -> None:
    cluster, _where = checked
    s = _seq(cluster)
    cell = f"x = mx.distributed.all_sum(mx.ones(4)) if world.rank() == 0 else {expr}\nmx.eval(x)\n"
    errors, elapsed = _errors(cluster.view.execute(cell, block=False))
    expected = (
        f"mismatch at collective #{s}: rank 0 all_sum float32[4] (cell line 1); "
        f"rank 1 {theirs} (cell line 1)"
    )
    assert set(errors) == {0, 1}
    for name, message in errors.values():
        assert name == "CollectiveMismatch"
        assert message.startswith(expected), message
    assert elapsed < TIMEOUT
    _healthy(cluster)


def test_a_send_without_its_recv(checked) -> None:
    cluster, _where = checked
    cell = "if world.rank() == 0:\n    mx.eval(mx.distributed.send(mx.ones(8), 1))\n"
    errors, elapsed = _errors(cluster.view.execute(cell, block=False))
    assert set(errors) == {0}
    assert errors[0][0] == "CollectiveTimeout"
    assert errors[0][1].startswith(
        "collective #1 send float32[8] to rank 1 (cell line 2): rank 1 did not arrive within 3 s"
    ), errors[0][1]
    assert elapsed < TIMEOUT + 5
    # The pair lines up again: a matching send/recv, then a collective.
    cluster.view.execute(
        "if world.rank() == 0:\n"
        "    mx.eval(mx.distributed.send(mx.arange(3), 1))\n"
        "else:\n"
        "    got = mx.distributed.recv_like(mx.arange(3), 0).tolist()\n"
    )
    assert cluster.client[1]["got"] == [0, 1, 2]
    _healthy(cluster)


def test_checks_off_again(checked) -> None:
    cluster, _where = checked
    cluster.view.execute("_checks.disable(); _st = _checks.status()")
    assert [s["enabled"] for s in cluster.view["_st"]] == [False, False]
    _healthy(cluster)
    cluster.view.execute(f"_checks.enable(timeout={TIMEOUT})")
    _healthy(cluster)


@pytest.mark.cluster
def test_three_ranks_one_behind(tmp_path: Path) -> None:
    """With three ranks: why names the two waiting ranks and the late one; with checks on,
    both waiting ranks fail naming it, and the next cell runs."""
    with MLXCluster(3, live_status=False) as cluster:
        hangdoc.setup(cluster.view, tmp_path)
        cluster.view.execute("mx.eval(mx.distributed.all_sum(mx.ones(4)))")
        g = hangdoc.gate(tmp_path, "late")
        cell = hangdoc.late_rank_cell(g)
        ar = cluster.view.execute(cell, block=False)
        try:
            report = hangdoc.analyze(tmp_path, 3, ["h"] * 3, settle=1.5)
            assert report.verdict.startswith(
                "rank 1 is behind: ranks 0,2 wait in all_sum #2 (cell line 3); rank 1 issued 1 "
                "collective and is in time.sleep (cell line "
            ), report.verdict
        finally:
            Path(g).touch()
            ar.get(timeout=30)
        cluster.view.execute(f"from mlx_cluster_magic.rank import collective_checks as checks; checks.enable({TIMEOUT})")
        cell = "if world.rank() != 1:\n    mx.eval(mx.distributed.all_sum(mx.ones(3)))\n"
        errors, elapsed = _errors(cluster.view.execute(cell, block=False))
        assert sorted(errors) == [0, 2] and elapsed < TIMEOUT + 5
        for name, message in errors.values():
            assert name == "CollectiveTimeout"
            assert message.startswith(
                "collective #3 all_sum float32[3] (cell line 2): rank 1 did not arrive within 3 s"
            ), message
        cluster.view.execute("_ok = mx.distributed.all_sum(mx.ones(2)).tolist()")
        assert cluster.view["_ok"] == [[3.0, 3.0]] * 3
        # Which waiting rank gives up first is chance: one that started waiting a second after
        # the other (and so finds its abort first) still names rank 1, not itself.
        cell = (
            "import time\nif world.rank() == 2:\n    time.sleep(1)\n"
            "if world.rank() != 1:\n    mx.eval(mx.distributed.all_sum(mx.ones(5)))\n"
        )
        errors, _ = _errors(cluster.view.execute(cell, block=False))
        assert sorted(errors) == [0, 2]
        for name, message in errors.values():
            assert name == "CollectiveTimeout", message
            assert "rank 1 did not arrive within 3 s" in message, message
        cluster.view.execute("_ok = mx.distributed.all_sum(mx.ones(2)).tolist()")
        assert cluster.view["_ok"] == [[3.0, 3.0]] * 3
        pids = [r["pid"] for r in cluster.ranks]
    # (another module's cluster may be running: check this one's ranks only)
    gone = psutil.wait_procs([p for p in map(_proc, pids) if p is not None], timeout=10)[1]
    assert not gone, f"ranks left running: {gone}"


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
