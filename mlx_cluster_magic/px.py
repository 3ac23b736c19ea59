"""ipyparallel's ``%%px``/``%px``/``%autopx``, made safe for MPI jobs.

The magics are ipyparallel's own (``ParallelMagics``); only the blocking wait changes:

- a rank that dies ends the cell within seconds with an error naming the rank and host
  (Open MPI then aborts the whole job; without this the cell would wait forever);
- an interrupt (Ctrl-C, the kernel's stop button) is sent to every rank; a rank stuck inside a
  native MLX collective cannot take it, so after a grace period the cluster is aborted with a
  message that says so, and ``%mlx_cluster restart`` brings it back;
- ``%%px --timeout S`` gives a cell the same outcome after S seconds.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from ipyparallel import error
from ipyparallel.client.magics import ParallelMagics, exec_args, output_args
from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .errors import MLXClusterError

if TYPE_CHECKING:
    from .cluster import MLXCluster

#: Seconds the ranks get to act on an interrupt before the cluster is aborted.
INTERRUPT_GRACE_S = 2.0
POLL_S = 0.1


class CellAborted(MLXClusterError):
    """A cell could not finish: a rank died, hung past its timeout, or ignored an interrupt."""


_TIMEOUT_OPTION = re.compile(r"(?:^|\s)--timeout(?:=|\s+)\S+")


def _strip_timeout(line: str) -> str:
    """The cell line without ``--timeout S`` (ipyparallel's own parser does not know it); the
    rest is left exactly as written, quotes included."""
    return _TIMEOUT_OPTION.sub(" ", line).strip()


class MLXParallelMagics(ParallelMagics):
    """``ParallelMagics`` bound to an ``MLXCluster``: rank deaths, interrupts and timeouts end
    the cell instead of hanging the notebook."""

    def __init__(self, shell: Any, view: Any, cluster: MLXCluster) -> None:
        self.cluster = cluster
        self.cell_timeout: float | None = None
        super().__init__(shell, view)

    @magic_arguments()
    @exec_args
    @output_args
    @argument(
        "--local",
        action="store_const",
        const=True,
        dest="local",
        help="also execute the cell in the local namespace",
    )
    @argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="abort the cell (and the cluster, if the ranks cannot be interrupted) after S seconds",
    )
    def cell_px(self, line: str = "", cell: str | None = None) -> Any:
        """Executes the cell on every rank; ``--timeout S`` bounds how long it may run."""
        args = parse_argstring(self.cell_px, line)
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"%%px --timeout must be more than 0 seconds, got {args.timeout:g}")
        self.cell_timeout = args.timeout
        try:
            return super().cell_px(_strip_timeout(line), cell)
        finally:
            self.cell_timeout = None

    def parallel_execute(  # type: ignore[override]
        self,
        cell: str,
        block: bool | None = None,
        groupby: str = "type",
        save_name: str | None = None,
        stream_output: bool | None = None,
        progress_after: float | None = None,
        signal_on_interrupt: Any = None,
    ) -> Any:
        block = self.view.block if block is None else block
        if not block:
            return super().parallel_execute(cell, block=False, groupby=groupby, save_name=save_name)
        stream_output = self.stream_output if stream_output is None else stream_output
        result = self.view.execute(cell, silent=False, block=False)
        result._fname = "%px"
        self.last_result = result
        if save_name:
            self.shell.user_ns[save_name] = result
        try:
            with result.stream_output() if stream_output else nullcontext():
                try:
                    self._wait(result, self.cell_timeout)
                except KeyboardInterrupt:
                    self._interrupt(result, sig=signal_on_interrupt or self.signal_on_interrupt)
                    raise
                try:
                    result.get()
                except error.CompositeError as e:
                    if stream_output and result._output_ready:
                        raise error.AlreadyDisplayedError(e) from None
                    raise
        except CellAborted as e:
            raise UsageError(str(e)) from None
        finally:
            if not stream_output:
                result.wait_for_output(1)
                result.display_outputs(groupby)
        return None

    def _wait(self, result: Any, timeout: float | None) -> None:
        """Wait for the cell, watching for dead ranks and the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = threading.Event()
        result.add_done_callback(lambda _f: done.set())
        while not done.wait(POLL_S):
            dead = self.cluster.dead_ranks()
            if dead:
                what = self.cluster.describe_ranks(dead)
                cause = self.cluster.death_cause()
                self.cluster.abort()
                raise CellAborted(
                    f"{what} died while the cell ran{cause}; the cluster was stopped: "
                    "%mlx_cluster restart brings it back"
                )
            if deadline is not None and time.monotonic() > deadline:
                self._interrupt(result, why=f"did not finish within {timeout:g} s")
                raise CellAborted(
                    f"the cell did not finish within {timeout:g} s and was interrupted"
                )
        result.wait_for_output(1)

    def _interrupt(self, result: Any, why: str = "was interrupted", sig: Any = "SIGINT") -> None:
        """Send ``sig`` to every rank still running; abort the cluster if one does not stop."""
        running = [t for t, ar in zip(result._targets, result._children) if not ar.done()]
        if not running:
            return
        try:
            self.view.client.send_signal(sig, targets=running, block=True)
        except Exception:
            pass
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        while time.monotonic() < deadline and not result.ready():
            result.wait(POLL_S)
        if result.ready():
            return
        stuck = [t for t, ar in zip(result._targets, result._children) if not ar.done()]
        what = self.cluster.describe_ranks(stuck)
        self.cluster.abort()
        raise CellAborted(
            f"the cell {why}, but {what} did not respond to the interrupt within "
            f"{INTERRUPT_GRACE_S:g} s (stuck in a native MLX/MPI collective, which cannot be "
            "interrupted); the cluster was stopped: %mlx_cluster restart brings it back"
        )


_RANK_EXIT = re.compile(
    r"process rank (\d+) with PID (\d+) on node (\S+) exited on signal (\d+) \(([^)]*)\)"
)


def death_cause(mpiexec_output: list[str]) -> str:
    """What Open MPI said about the first rank that died, e.g. ' (rank 1 on vm: Killed)'."""
    for line in mpiexec_output:
        m = _RANK_EXIT.search(line)
        if m:
            return f" (mpiexec: rank {m.group(1)} on {m.group(3)} exited on signal {m.group(5)})"
    return ""
