"""``%%px`` as a person meets it: one line where there is nothing to run on, ipyparallel's own
behaviour for its flags (checked side by side with ipyparallel's magic on a raw cluster),
progress in the cell, and replay of completed cells after a restart."""

from __future__ import annotations

import _thread
import re
import threading
import time

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic.px import Progress, progress_rows


@pytest.mark.parametrize(
    ("magic", "kind"), [("px", "cell"), ("px", "line"), ("autopx", "line"), ("pxresult", "line")]
)
def test_no_cluster_is_one_line(ip, magic: str, kind: str) -> None:
    with pytest.raises(UsageError, match=r"^no cluster is running: start one with %mlx_cluster"):
        if kind == "cell":
            ip.run_cell_magic(magic, "", "x = 1")
        else:
            ip.run_line_magic(magic, "x = 1" if magic == "px" else "")


def test_stopped_and_broken_clusters_are_one_line(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    ip.run_line_magic("mlx_cluster", "stop")
    for run in (
        lambda: ip.run_cell_magic("px", "", "x = 1"),
        lambda: ip.run_line_magic("px", "x = 1"),
        lambda: ip.run_line_magic("autopx", ""),
    ):
        with pytest.raises(UsageError, match=r"^no cluster is running: start one with") as e:
            run()
        assert "\n" not in str(e.value)
    cluster.start(activate=True)
    cluster.abort("rank 1 on vm died while a cell ran")
    assert cluster.state == "broken"
    with pytest.raises(UsageError) as e:
        ip.run_cell_magic("px", "", "x = 1")
    assert str(e.value) == (
        "the MLX cluster is broken: rank 1 on vm died while a cell ran; "
        "%mlx_cluster restart brings it back"
    )
    from mlx_cluster_magic import MLXClusterError

    with pytest.raises(MLXClusterError, match="the MLX cluster is broken: rank 1 on vm died"):
        cluster.view  # noqa: B018
    ip.run_line_magic("mlx_cluster", "restart")
    assert cluster.state == "running" and cluster.broken_reason is None
    ip.run_cell_magic("px", "", "y = 2")
    assert cluster.view["y"] == [2, 2]


def test_stop_is_idempotent_in_effect_and_says_so(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    cluster.stop()
    with pytest.raises(Exception, match="no cluster is running: nothing to stop"):
        cluster.stop()
    assert cluster.state == "stopped"


@pytest.fixture(scope="module")
def raw():
    """A raw ipyparallel cluster (MPI engines, ipyparallel's own defaults) for the side-by-side
    tests, started once; its processes are checked at the end of the module."""
    import os
    import sys

    import ipyparallel as ipp

    from conftest import SHARED_PIDS, our_processes, wait_no_processes

    # raw ipyparallel finds mpiexec on PATH; Open MPI refuses root unless told
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cluster = ipp.Cluster(engines="mpi", n=2, log_level=40)
    rc, mine = None, set()
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(2, timeout=60)
        mine = {pid for pid, _ in our_processes()}
        SHARED_PIDS.update(mine)
        yield rc
    finally:
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()
        SHARED_PIDS.difference_update(mine)
        assert wait_no_processes() == []


def _raw_and_ours(
    ip, capsys, rc, line: str, cell: str, interrupt_after: float | None = None, config: str = ""
):
    """Run the same %%px line on a raw ipyparallel cluster with ipyparallel's own magic, then
    on ours; return (stdout, stderr, raised) for each."""
    from ipyparallel.client.magics import ParallelMagics

    outs = []
    dv = rc[:]
    dv.block = True
    raw_magics = ParallelMagics(ip, dv)
    for magics in ("raw", "ours"):
        if magics == "raw":
            ip.magics_manager.register(raw_magics)
        else:
            ip.run_line_magic("mlx_cluster", "start -n 2")
        if config:
            ip.run_line_magic("pxconfig", config)
        timer = None
        if interrupt_after is not None:
            timer = threading.Timer(interrupt_after, _thread.interrupt_main)
            timer.start()
        raised = None
        try:
            ip.run_cell_magic("px", line, cell)
        except BaseException as e:
            raised = type(e).__name__
        finally:
            if timer is not None:
                timer.join()
        out, err = capsys.readouterr()
        outs.append((out, err, raised))
    rc.wait(timeout=30)  # the raw ranks finish the cell before the next test uses them
    return outs


@pytest.mark.parametrize("sig", ["SIGINT", "2", "0"])
def test_signal_on_interrupt_as_ipyparallel_does(ip, capsys, raw, sig: str) -> None:
    cell = "import time\nprint('before')\ntime.sleep(4)\nprint('after')"
    (_raw_out, raw_err, raw_raised), (_out, err, raised) = _raw_and_ours(
        ip, capsys, raw, f"--no-stream --signal-on-interrupt {sig}", cell, interrupt_after=1.5
    )
    notice = f"Received Keyboard Interrupt. Sending signal {int(sig) if sig.isdigit() else sig}"
    assert notice in raw_err and notice in err
    assert raised is None
    # ipyparallel's own magic ends with a TimeoutError when the ranks were sent no signal
    # (its output display finds the cell still running); ours ends the cell quietly
    assert raw_raised == ("TimeoutError" if sig == "0" else None)
    assert "Traceback" not in err
    cluster = ip.magics_manager.registry["MLXClusterMagics"].cluster
    if sig == "0":  # no signal: the ranks keep going and finish the cell
        ar = ip.magics_manager.registry["MLXParallelMagics"].last_result
        ar.get(timeout=10)
        ar.wait_for_output(5)
        assert [s.strip() for s in ar.stdout] == ["before\nafter"] * 2
    assert cluster.running


def test_verbose_prints_ipyparallels_line(ip, capsys, raw) -> None:
    (raw_out, _, _), (out, _, _) = _raw_and_ours(
        ip, capsys, raw, "--progress-after -1", "pass", config="--verbose"
    )
    assert "Parallel execution on engine(s): [0, 1]" in raw_out
    assert "Parallel execution on engine(s): [0, 1]" in out


def test_progress_shows_each_rank_and_collapses_when_done() -> None:
    nodes = [
        {"rank": 0, "state": "busy"},
        {"rank": 1, "state": "unresponsive", "silent_s": 3.0},
        {"rank": 2, "state": "busy"},
    ]
    rows = progress_rows(nodes, done=[2], targets=[0, 1, 2], elapsed=12.3)
    assert rows == [
        (0, "busy", "12 s"),
        (1, "unresponsive", "12 s, silent 3 s, process alive"),
        (2, "done", ""),
    ]
    live = Progress.bundle(rows, 12.3)._repr_mimebundle_()
    assert live["text/plain"].startswith("1/3 ranks done after 12 s: rank 0 busy 12 s;")
    assert (
        live["text/html"].count("mlx-px-rank") == 3 and "mlx-px-unresponsive" in live["text/html"]
    )
    final = Progress.bundle([(r, "done", "") for r in range(3)], 14.0, final=True)
    assert final._repr_mimebundle_()["text/plain"] == "3/3 ranks done after 14.0 s"


def test_progress_appears_in_the_cell_after_progress_after(ip, capsys) -> None:
    ip.run_line_magic("mlx_cluster", "start -n 2")
    capsys.readouterr()
    # a terminal shell prints each display and update of the progress line as text
    ip.run_cell_magic("px", "--progress-after 0.5 --no-stream", "import time\ntime.sleep(2)")
    shown = [ln for ln in capsys.readouterr().out.splitlines() if "ranks done after" in ln]
    assert any("0/2 ranks done after" in s and "rank 1 busy" in s for s in shown), shown
    assert shown[-1].startswith("2/2 ranks done after")
    ip.run_cell_magic("px", "--progress-after -1 --no-stream", "import time\ntime.sleep(1)")
    assert "ranks done after" not in capsys.readouterr().out


def test_readme_states_the_interrupt_waits_the_code_uses() -> None:
    from pathlib import Path

    from mlx_cluster_magic.px import HOPELESS_S, INTERRUPT_GRACE_S

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"after {INTERRUPT_GRACE_S:g} s (`px.INTERRUPT_GRACE_S`)" in readme
    assert f"or {HOPELESS_S:g} s (`px.HOPELESS_S`)" in readme


def _history_settles(cluster, n: int) -> list:
    """The history once it holds ``n`` cells (a cell is recorded as it completes, by the
    thread that completes it)."""
    deadline = time.monotonic() + 5
    while len(cluster.history()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return cluster.history()


def test_history_has_noblock_cells_in_the_order_they_completed(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    slow = ip.run_cell_magic("px", "--noblock --targets 0", "import time\ntime.sleep(1.5)\nslow = 1")
    ip.run_cell_magic("px", "--targets 1", "fast = 1")
    assert [h.cell for h in cluster.history()] == ["fast = 1"]  # there when the cell returns
    slow.get(timeout=10)
    history = _history_settles(cluster, 2)
    assert [(h.cell, h.targets) for h in history] == [
        ("fast = 1", (1,)),
        ("import time\ntime.sleep(1.5)\nslow = 1", (0,)),
    ]
    # what the ranks ran: the cell after its %%px line, so line numbers are the editor's
    assert history[0].code == "# %%px --targets 1\nfast = 1"
    failed = ip.run_cell_magic("px", "--noblock", "1 / 0")
    with pytest.raises(Exception):  # noqa: B017 - a failed cell is not history
        failed.get(timeout=10)
    time.sleep(0.3)
    assert len(cluster.history()) == 2
    shown = repr(ip.run_line_magic("mlx_cluster", "history"))
    assert shown.index("[1] on ranks [1]:") < shown.index("[2] on ranks [0]:")


def test_cell_lines_are_numbered_as_the_editor_shows_them(ip) -> None:
    """The %%px line is line 1: in the ranks' tracebacks and in why's verdict."""
    from ipyparallel.error import CompositeError

    from mlx_cluster_magic.observe import stack_capture as stacks

    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    with pytest.raises(CompositeError) as e:
        ip.run_cell_magic("px", "--no-stream", "x = 1\ny = int('no')")
    assert stacks.traceback_where(e.value.elist[0][2]) == ("cell line 3", "int")
    cell = (
        "import time\n"  # 2
        "if world.rank() == 0:\n"  # 3
        "    mx.eval(mx.distributed.all_sum(mx.ones(3)))\n"  # 4
        "else:\n"  # 5
        "    time.sleep(3)\n"  # 6
        "    mx.eval(mx.distributed.all_sum(mx.ones(3)))\n"  # 7
    )
    ar = ip.run_cell_magic("px", "--noblock", cell)
    try:
        time.sleep(1.5)
        verdict = cluster.why(stacks=False).verdict
        assert re.match(
            r"rank 1 is behind: rank 0 waits in all_sum #\d+ \(cell line 4\); rank 1 issued \d+ "
            r"collectives? and is in time.sleep \(cell line 6\)$",
            verdict,
        ), verdict
    finally:
        ar.get(timeout=15)


def test_replay_restores_variables_defined_across_cells(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    ip.run_cell_magic("px", "", "a = world.rank() + 10")
    ip.run_cell_magic("px", "", "b = mx.distributed.all_sum(mx.array(a)).item()")
    ip.run_cell_magic("px", "--no-replay", "c = 'not replayed'")
    ip.run_cell_magic("px", "--targets 1", "only_one = 1")
    with pytest.raises(Exception):  # noqa: B017 - a failed cell is not history
        ip.run_cell_magic("px", "", "1 / 0")
    assert [h.cell for h in cluster.history()] == [
        "a = world.rank() + 10",
        "b = mx.distributed.all_sum(mx.array(a)).item()",
        "only_one = 1",
    ]
    assert cluster.history()[2].targets == (1,)
    cluster.abort("a test")
    t = time.monotonic()
    cluster.restart(activate=True, replay=True)
    assert time.monotonic() - t < 30
    assert cluster.view["a"] == [10, 11] and cluster.view["b"] == [21, 21]
    assert cluster.client[1]["only_one"] == 1
    with pytest.raises(Exception, match="NameError"):
        cluster.view["c"]
    assert len(cluster.history()) == 3


def test_replay_stops_at_the_first_failure_with_its_error(ip, tmp_path) -> None:
    from mlx_cluster_magic import MLXClusterError

    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    flag = tmp_path / "present"
    flag.write_text("x")
    ip.run_cell_magic("px", "", "ok = 1")
    ip.run_cell_magic("px", "", f"open({str(flag)!r}).read()")
    ip.run_cell_magic("px", "", "later = 1")
    flag.unlink()
    with pytest.raises(
        MLXClusterError, match=r"replay stopped at cell 2 of 3: .*FileNotFoundError"
    ):
        cluster.restart(replay=True)
    assert cluster.running and cluster.view["ok"] == [1, 1]
