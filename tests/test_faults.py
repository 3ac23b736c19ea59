"""Faults: a rank dies mid-cell, a rank hangs in a collective, interrupts, timeouts."""

from __future__ import annotations

import _thread
import os
import re
import signal
import threading
import time

import pytest
from IPython.core.error import UsageError

from conftest import our_processes, wait_no_processes

STUCK = (
    "if world.rank() == 0:\n    mx.eval(mx.distributed.all_sum(mx.ones(3)))  # rank 1 never joins\n"
)


def _later(seconds: float, action) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def _healthy(ip, cluster) -> None:
    ip.run_cell_magic("px", "", "ok = mx.distributed.all_sum(mx.array(1.0)).item()")
    assert cluster.view["ok"] == [float(cluster.n)] * cluster.n


def test_rank_killed_mid_cell_ends_the_cell_naming_rank_and_host(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    victim = cluster.ranks[1]
    _later(1.0, lambda: os.kill(victim["pid"], signal.SIGKILL))
    t = time.monotonic()
    with pytest.raises(UsageError, match=rf"rank 1 on {victim['host']}.*died") as e:
        ip.run_cell_magic("px", "", "import time\ntime.sleep(60)")
    elapsed = time.monotonic() - t - 1.0
    assert elapsed < 10, f"took {elapsed:.1f} s to notice"
    assert "restart" in str(e.value)
    assert not cluster.running
    # the rank that died reads dead; the one the job's end took with it, stopped
    states = [n.state for n in cluster.last_nodes]
    assert states[1] == "dead" and states[0] in ("dead", "stopped"), states
    assert "dead" in cluster._repr_mimebundle_()["text/plain"]
    assert wait_no_processes() == []
    ip.run_line_magic("mlx_cluster", "restart")
    _healthy(ip, cluster)


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_interrupt_reaches_every_rank(ip, capsys, stream: str) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    _later(1.5, _thread.interrupt_main)
    t = time.monotonic()
    # As ipyparallel's own %%px: a one-line notice, the outputs so far, no local traceback;
    # then where each rank stopped (line 4 of the cell as the editor shows it), not the ranks'
    # own KeyboardInterrupt tracebacks (streamed by ipyparallel's magic).
    ip.run_cell_magic("px", stream, "import time\nprint('started')\ntime.sleep(60)")
    assert time.monotonic() - t < 1.5 + 5
    out, err = capsys.readouterr()
    notice = "Received Keyboard Interrupt. Sending signal SIGINT to engines...\n"
    where = [f"rank {r}: KeyboardInterrupt at cell line 4 (time.sleep)\n" for r in (0, 1)]
    assert err.index(notice) < err.index(where[0]) < err.index(where[1]), err
    assert "%pxresult shows the full tracebacks" in err
    assert "Traceback" not in err and "Traceback" not in out
    assert out.count("started") == 2
    assert cluster.running
    results = ip.magics_manager.registry["MLXParallelMagics"].last_result
    assert all(ar.done() for ar in results._children)
    names = [e.ename for e in results.error] if hasattr(results, "error") else []
    assert names in ([], ["KeyboardInterrupt", "KeyboardInterrupt"])
    _healthy(ip, cluster)


def _session_dirs(mpiexec_pids: list[int]) -> list[str]:
    """The Open MPI session directories (``$TMPDIR/ompi.<pid of mpiexec>``) of these mpiexecs
    that still exist."""
    import os
    import tempfile

    paths = [os.path.join(tempfile.gettempdir(), f"ompi.{pid}") for pid in mpiexec_pids]
    return [p for p in paths if os.path.exists(p)]


def _our_mpiexecs() -> list[int]:
    """This test session's own mpiexec (prterun) processes."""
    return [pid for pid, cmd in our_processes() if re.search(r"(^|/)(mpiexec|prterun)\s", cmd)]


def test_interrupt_of_a_rank_stuck_in_a_collective_aborts_the_cluster(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    mpiexecs = _our_mpiexecs()
    assert mpiexecs
    _later(1.0, _thread.interrupt_main)
    t = time.monotonic()
    with pytest.raises(UsageError, match=r"rank 0 on .* did not respond to the interrupt") as e:
        ip.run_cell_magic("px", "", STUCK)
    waited = time.monotonic() - t - 1.0
    assert waited < 5, "control came back too late"
    assert "native MLX/MPI collective" in str(e.value)
    # the wait it names is the one the code applied: rank 1 has left the cell, so rank 0's
    # collective can never complete and the shorter wait ends it
    from mlx_cluster_magic.cluster.px import HOPELESS_S, INTERRUPT_GRACE_S

    assert f"waited {HOPELESS_S:g} s in a collective that the other ranks had left" in str(
        e.value
    ), str(e.value)
    assert waited < INTERRUPT_GRACE_S + 1
    assert not cluster.running
    assert wait_no_processes() == []
    # mpiexec killed by the abort leaves its session directory; a later mpiexec given the same
    # pid could not start ("The PMIx server's listener thread failed to start")
    assert _session_dirs(mpiexecs) == []
    ip.run_line_magic("mlx_cluster", "restart")
    _healthy(ip, cluster)


def test_cell_timeout_on_a_stuck_collective(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    t = time.monotonic()
    with pytest.raises(UsageError, match=r"did not finish within 1.5 s, but rank 0 on"):
        ip.run_cell_magic("px", "--timeout 1.5", STUCK)
    assert time.monotonic() - t < 1.5 + 5
    assert not cluster.running
    ip.run_line_magic("mlx_cluster", "restart")
    _healthy(ip, cluster)


def test_cell_timeout_on_an_interruptible_cell_keeps_the_cluster(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    t = time.monotonic()
    with pytest.raises(
        UsageError,
        match=r"did not finish within 1 s and was interrupted; rank 0: KeyboardInterrupt at "
        r"cell line 3 \(time.sleep\); rank 1: KeyboardInterrupt at cell line 3 \(time.sleep\)$",
    ):
        ip.run_cell_magic("px", "--timeout 1 --no-stream", "import time\ntime.sleep(60)")
    assert time.monotonic() - t < 1 + 5
    assert cluster.running
    _healthy(ip, cluster)


@pytest.fixture(scope="class")
def shared():
    """One cluster started through the magic, for the class below."""
    from conftest import shared_cluster

    with shared_cluster("start -n 2") as (shell, cluster):
        yield shell, cluster


class TestOptionsOnOneCluster:
    """``--timeout`` checks and combinations need a running cluster but leave it as it is: the
    tests share one (stopped and leak-checked when the class ends)."""

    @pytest.mark.parametrize("flag", ["--timeout 0", "--timeout -2", "--timeout x"])
    def test_bad_timeout(self, shared, flag) -> None:
        ip, _ = shared
        with pytest.raises(UsageError):
            ip.run_cell_magic("px", flag, "pass")

    def test_timeout_combines_with_ipyparallel_options(self, shared) -> None:
        ip, cluster = shared
        ip.run_cell_magic("px", "", "hit = 0")
        ip.run_cell_magic("px", "--targets 1 --timeout 5", "hit = 1")
        assert cluster.view["hit"] == [0, 1]
