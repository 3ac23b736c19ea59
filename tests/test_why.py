"""``why``: on a real 2-rank cluster with deliberate bugs, the analysis names the right rank,
op and cell line; stacks are captured while a rank sits in a native collective."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import hangdoc
import pytest

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.observe import hang_verdict as why
from mlx_cluster_magic.observe import stack_capture as stacks

from conftest import wait_no_processes

ALL_SUM = "mx.eval(mx.distributed.all_sum(mx.ones(4)))"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory):
    where = tmp_path_factory.mktemp("why")
    with MLXCluster(2, live_status=False) as cluster:
        hangdoc.setup(cluster.view, where)
        cluster.view.execute(ALL_SUM)
        yield cluster, where
    assert not wait_no_processes(), "processes left running"


def _hosts(cluster: MLXCluster) -> list[str]:
    return [r["host"] for r in cluster.ranks]


def _healthy(cluster: MLXCluster) -> None:
    cluster.view.execute("_ok = mx.distributed.all_sum(mx.ones(2) * (world.rank() + 1)).tolist()")
    assert cluster.view["_ok"] == [[3.0, 3.0], [3.0, 3.0]]


def test_a_rank_in_a_long_sleep(two_ranks) -> None:
    cluster, where = two_ranks
    g = hangdoc.gate(where, "sleep")
    cell = (
        f"{ALL_SUM}\n"
        "if world.rank() == 1:\n"
        f"    _hd_gate({g!r})\n"
        "y = mx.distributed.all_sum(mx.ones(4)).sum().item()\n"
    )
    ar = cluster.view.execute(cell, block=False)
    try:
        report = hangdoc.analyze(where, 2, _hosts(cluster), settle=1.5, name="sleep")
        issued = report.ranks[1].issued["world"]
        assert report.verdict.startswith(
            f"rank 1 is behind: rank 0 waits in all_sum #{issued + 1} (cell line 4); "
            f"rank 1 issued {issued} collectives and is in time.sleep (cell line "
        ), report.verdict
        assert report.suspects == [1]
        r0 = report.ranks[0]
        assert r0.state == "blocked" and r0.blocked_in is not None
        assert (r0.blocked_in.op, r0.blocked_in.where) == ("all_sum", "cell line 4")
        assert r0.recent[-1].seq == issued + 1
        # The stack of a rank inside a native collective: the cell's frame at line 4.
        assert r0.stack and r0.stack[0].where == "cell line 4", r0.stack
        assert any(f.func == "_hd_gate" for f in report.ranks[1].stack)
        text = str(report)
        assert "rank 0 (" in text and "blocked in #" in text
        # The status view's banner: the same verdict once a rank has waited long enough.
        snaps = hangdoc.snapshots(where, 2)
        assert why.stuck(snaps, threshold_s=0.5) == why.analyze(snaps).verdict
        assert why.stuck(snaps, threshold_s=1000) is None
        assert "<table>" in report._repr_html_()
    finally:
        Path(g).touch()
        ar.get(timeout=30)
    _healthy(cluster)


def test_a_rank_that_skips_a_collective(two_ranks) -> None:
    cluster, where = two_ranks
    cell = "if world.rank() != 1:\n    z = mx.distributed.all_sum(mx.ones(3))\n    mx.eval(z)\n"
    ar = cluster.view.execute(cell, block=False)
    try:
        report = hangdoc.analyze(where, 2, _hosts(cluster), settle=1.5, name="skip")
        n = report.ranks[1].issued["world"]
        assert report.verdict == (
            f"rank 1 is behind: rank 0 waits in all_sum #{n + 1} (cell line 2); "
            f"rank 1 issued {n} collectives and is idle"
        ), report.verdict
        assert report.ranks[1].state == "idle"
    finally:
        cluster.client[1].execute("mx.eval(mx.distributed.all_sum(mx.ones(3)))", block=True)
        ar.get(timeout=30)
    _healthy(cluster)


def test_ranks_that_issue_different_ops_or_shapes(two_ranks) -> None:
    cluster, where = two_ranks
    # Built and never evaluated: the records differ, nothing runs (so nothing hangs).
    cluster.view.execute(
        "x = mx.ones(4)\n"
        "y = mx.distributed.all_sum(x) if world.rank() == 0 else mx.distributed.all_gather(x)\n"
    )
    report = hangdoc.analyze(where, 2, _hosts(cluster), settle=0.5, name="mismatch")
    s = report.ranks[0].issued["world"]
    assert report.verdict == (
        f"mismatch at #{s}: rank 0 all_sum float32[4] (cell line 2), "
        "rank 1 all_gather float32[4] (cell line 2)"
    ), report.verdict
    cluster.view.execute("w = mx.distributed.all_sum(mx.ones(world.rank() + 2))\n")
    report = hangdoc.analyze(where, 2, _hosts(cluster), settle=0.5)
    assert report.verdict.startswith(f"mismatch at #{s}:"), report.verdict  # the first one
    # Leave the records agreeing again: both ranks restart their numbering.
    cluster.view.execute("_recorder.reset()")
    _healthy(cluster)


def test_a_send_without_its_recv(two_ranks) -> None:
    cluster, where = two_ranks
    g = hangdoc.gate(where, "send")
    big = "mx.ones(1 << 20)"  # 4 MiB: beyond MPI's eager limit, so the send waits
    cell = (
        "if world.rank() == 0:\n"
        f"    mx.eval(mx.distributed.send({big}, 1))\n"
        "else:\n"
        f"    _hd_gate({g!r})\n"
        f"    mx.eval(mx.distributed.recv_like({big}, 0))\n"
    )
    ar = cluster.view.execute(cell, block=False)
    try:
        report = hangdoc.analyze(where, 2, _hosts(cluster), settle=1.5, name="send")
        assert report.verdict.startswith(
            "rank 0 waits in send #1 to rank 1 (cell line 2); rank 1 has not posted the matching "
            "recv from rank 0 (it posted 0 on that pair) and is in time.sleep (cell line "
        ), report.verdict
        assert report.suspects == [1]
    finally:
        Path(g).touch()
        ar.get(timeout=30)
    _healthy(cluster)


def test_stack_while_the_main_thread_holds_the_gil(two_ranks) -> None:
    """A builtin C loop holds the GIL: no Python thread of the rank runs, faulthandler does."""
    cluster, where = two_ranks
    ar = cluster.client[0].execute("_n = sum(range(10**8))", block=False)
    try:
        time.sleep(1.0)
        snap = hangdoc.snapshots(where, 2)[0]
        assert snap is not None
        text = stacks.capture(int(snap["pid"]), str(snap["stack_file"]), timeout=5)
        main = stacks.main_thread(stacks.parse(text), snap["main_thread"])
        assert main is not None and main.frames[0].where == "cell line 1", text
    finally:
        ar.get(timeout=120)


def test_stack_dump_parsed_from_a_real_process(tmp_path: Path) -> None:
    """faulthandler's real output, from a process signalled while it sleeps in C code."""
    path = tmp_path / "stack.txt"
    code = (
        "import sys, time\n"
        "from mlx_cluster_magic.rank import stack_dump as stacks\n"
        f"stacks.install({str(path)!r})\n"
        "def napping():\n"
        "    print('ready', flush=True); time.sleep(30)\n"
        "napping()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        text = stacks.capture(proc.pid, str(path), timeout=5)
    finally:
        proc.kill()
        proc.wait()
    threads = stacks.parse(text)
    main = stacks.main_thread(threads)
    assert main is not None
    assert [(f.func, f.line) for f in main.frames] == [("napping", 5), ("<module>", 6)]


def test_a_clean_exit_removes_the_stack_file() -> None:
    code = "from mlx_cluster_magic.rank import stack_dump as stacks\nprint(stacks.install())\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.name.startswith("mlx-cluster-stack-") and not path.exists()


def test_verdict_with_a_silent_rank() -> None:
    report = why.analyze([None, None], [None, None], ["a", "b"])
    assert report.verdict.startswith("no rank sent its status")
    assert stacks.location("/tmp/ipykernel_123/456.py", 3) == "cell line 3"
    assert stacks.location("/x/train.py", 12) == "train.py:12"


# What a rank sends back for ``def f(): ... 1/0`` then ``y = f()`` (IPython's colours and all).
RANK_TRACEBACK = (
    "\x1b[31m---------------------------------------------------------------------------\x1b[39m\n"
    "\x1b[31mZeroDivisionError\x1b[39m                         Traceback (most recent call last)\n"
    "\x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[1]\x1b[39m\x1b[32m, line 7\x1b[39m\n"
    "\x1b[32m      5\x1b[39m     \x1b[38;5;28;01mreturn\x1b[39;00m \x1b[32m1\x1b[39m/\x1b[32m0\x1b[39m\n"
    "\x1b[32m----> \x1b[39m\x1b[32m7\x1b[39m y = f()\n\n"
    "\x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[1]\x1b[39m\x1b[32m, line 5\x1b[39m, in "
    "\x1b[36mf\x1b[39m\x1b[34m()\x1b[39m\n"
    "\x1b[32m----> \x1b[39m\x1b[32m5\x1b[39m     time.sleep(30)\n\n"
    "\x1b[36mFile \x1b[39m\x1b[32m/x/numpy/linalg/_linalg.py:647\x1b[39m, in \x1b[36minv\x1b[39m"
    "\x1b[34m(a)\x1b[39m\n"
    "\x1b[32m--> \x1b[39m\x1b[32m647\x1b[39m     ainv = _umath_linalg.inv(a)\n\n"
    "\x1b[31mZeroDivisionError\x1b[39m: division by zero"
)


def test_where_a_ranks_traceback_left_the_cell() -> None:
    assert stacks.traceback_where(RANK_TRACEBACK) == ("cell line 5 in f()", "time.sleep")
    top = RANK_TRACEBACK.split("\n\n")[0]
    assert stacks.traceback_where(top) == ("cell line 7", "f")
    assert stacks.traceback_where("KeyboardInterrupt: ") is None
    from mlx_cluster_magic.cluster.px import stopped_where

    class Err:
        ename, traceback = "KeyboardInterrupt", top

    assert stopped_where({0: Err()}, [0, 1]) == [
        (0, "KeyboardInterrupt at cell line 7 (f)"),
        (1, "had finished"),
    ]


# ----------------------------------------------------------------- captured from the runs above
def _captured(name: str) -> dict:
    import json

    return json.loads((hangdoc.CAPTURED / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["sleep", "skip", "mismatch", "send"])
def test_captured_scenarios_give_the_same_verdict(name: str) -> None:
    """The analysis alone, on real snapshots and stack dumps kept from the scenarios above."""
    data = _captured(name)
    report = why.analyze(data["snapshots"], data["stacks"], data["hosts"])
    assert report.verdict == data["verdict"]
    assert str(report).startswith(report.verdict)
    assert report.verdict.split(":")[0] in report._repr_html_()


def test_ranks_waiting_on_ranks_done_with_the_cell() -> None:
    """After an interrupt, %%px stops waiting early only when every rank still running waits
    in a collective for ranks whose cell has ended (real snapshots of the scenarios above)."""
    skip = _captured("skip")["snapshots"]
    assert why.waits_on_ended(skip, [0])
    assert not why.waits_on_ended(skip, [0, 1])  # rank 1 still runs the cell: it may join
    assert not why.waits_on_ended(skip, [])
    assert not why.waits_on_ended(skip, [1])  # rank 1 waits in nothing
    assert not why.waits_on_ended(_captured("sleep")["snapshots"], [0, 1])
    assert not why.waits_on_ended(_captured("mismatch")["snapshots"], [0, 1])
    assert not why.waits_on_ended([None, None], [0])  # no status: no evidence


def test_captured_hang_with_a_silent_rank() -> None:
    """Rank 1 sent nothing (dead or starved): rank 0's wait is still named, and rank 1 blamed."""
    data = _captured("sleep")
    snaps = [data["snapshots"][0], None]
    report = why.analyze(snaps, [data["stacks"][0], None], data["hosts"])
    blocked = report.ranks[0].blocked_in
    assert blocked is not None
    assert report.verdict == (
        f"rank 0 waits in all_sum #{blocked.seq} (cell line 4); rank 1 sent no status (dead, or "
        "its status thread starved)"
    )
    assert report.suspects == [1]
    assert report.ranks[1].state == "no status"
    assert why.stuck(snaps, threshold_s=0.5) == report.verdict
