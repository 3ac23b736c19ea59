"""ipyparallel's ``%%px``/``%px``/``%autopx``, made safe for MPI jobs.

The magics are ipyparallel's own (``ParallelMagics``); only the blocking wait changes:

- a rank that dies ends the cell within seconds with an error naming the rank and host
  (Open MPI then aborts the whole job; without this the cell would wait forever);
- an interrupt (Ctrl-C, the kernel's stop button) is sent to every rank as ipyparallel does;
  a rank stuck inside a native MLX collective cannot take it, so after a grace period the
  cluster is aborted with a message that says so, and ``%mlx_cluster restart`` brings it back;
- ``%%px --timeout S`` gives a cell the same outcome after S seconds;
- a cell running longer than ``--progress-after`` shows each rank's progress in its output;
- the status view's Stop and Restart end the cell at once with one line (their clicks run on
  a kernel subshell of the widget's own, so they do not wait for the cell);
- a cell that completed is remembered for ``%mlx_cluster restart --replay`` (``--no-replay``
  skips it), ``--noblock`` cells too, in the order they completed;
- an interrupt ends with one line per rank saying where it stopped (the ranks' own
  ``KeyboardInterrupt`` tracebacks are left to ``%pxresult``);
- the ranks number a cell's lines as the editor does: the ``%%px`` line is line 1, in
  tracebacks, ``why`` and every message.

Every override keeps what ipyparallel's decorators gave the stock magic (``like_stock``): its
argument parser, its help text (``%pxresult?``) and its variable expansion (``%px`` sends
``{x}`` and f-strings to the ranks as written).

This module knows the cluster only through the ``PxCluster`` protocol.
"""

from __future__ import annotations

import copy
import html
import inspect
import re
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol, TypeVar

from ipyparallel import error
from ipyparallel.client.magics import ParallelMagics
from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, construct_parser, parse_argstring

from ..errors import MLXClusterError
from ..launch import ipp_adapter
from ..observe import stack_capture
from ..observe.health import Breakage

#: Seconds the ranks get to act on an interrupt before the cluster is aborted.
INTERRUPT_GRACE_S = 2.0
#: The first line a ``%%px`` cell sends to the ranks: its own magic line, as a comment, so that
#: the ranks number the cell's lines as the editor shows them (``cluster_tools`` keeps it out of
#: the history's text).
CELL_HEADER = "# %%px"
#: Sooner, when the ranks still running wait in a collective for ranks done with the cell, and
#: have for this long: a status period and a little, so every rank's record is that recent.
HOPELESS_S = 0.6
POLL_S = 0.1
#: Seconds a signal request may take (a rank that mpiexec already killed never answers).
SIGNAL_TIMEOUT_S = 1.0
#: A lost host or a cut cable must stay so this long while the cell runs before it ends the
#: cell (a cable re-seated at once costs nothing).
LOSS_CONFIRM_S = 1.0
#: Seconds to wait, once every rank has answered, for the output the ranks sent before their
#: answer (it travels on another channel and may arrive after it, most under CPU load).
OUTPUT_WAIT_S = 10.0
#: Seconds a cell whose ranks died with no cause waits for the doctor's word on a firewall.
REFUSAL_WAIT_S = 8.0


class PxCluster(Protocol):
    """What the ``%%px`` wait needs of a cluster."""

    @property
    def running(self) -> bool: ...
    @property
    def generation(self) -> int: ...
    def not_running_message(self) -> str: ...
    def stopped_by(self) -> str | None: ...
    def dead_ranks(self) -> list[int]: ...
    def loss(self) -> Breakage | None: ...
    def judge(self) -> Breakage | None: ...
    def refusal_pending(self) -> bool: ...
    cells_waiting: int
    def describe_ranks(self, ranks: Sequence[int]) -> str: ...
    def death_cause(self) -> str: ...
    def hang_verdict(self) -> str | None: ...
    def waits_on_ended(self, pending: Sequence[int]) -> bool: ...
    def abort(self, reason: str | Breakage = ..., *, generation: int | None = ...) -> None: ...
    def nodes(self) -> list[dict[str, Any]]: ...
    def record_cell(self, cell: str, targets: Sequence[int] | None = None) -> None: ...


class CellAborted(MLXClusterError):
    """A cell could not finish: a rank died, hung past its timeout, or ignored an interrupt."""


class CellStopped(CellAborted):
    """A person stopped the cluster (the view's Stop button, ``stop`` from elsewhere) while
    the cell ran: their own click, so the cell says what happened as a plain line."""

    def _render_traceback_(self) -> list[str]:  # how IPython shows it: the line, no "Error:"
        return [str(self)]


_OUR_OPTIONS = re.compile(r"(?:^|\s)(?:--timeout(?:=|\s+)\S+|--no-replay)(?=\s|$)")


def _strip_ours(line: str) -> str:
    """The cell line without our own options, for ipyparallel's code; the rest is left exactly
    as written, quotes included."""
    return _OUR_OPTIONS.sub(" ", line).strip()


def as_shown(line: str, cell: str) -> str:
    """The code a ``%%px`` cell sends: the cell after a comment holding its magic line, so line
    numbers on the ranks (tracebacks, ``why``, checked collectives) are the editor's."""
    return f"{CELL_HEADER} {line}".rstrip() + "\n" + cell


def stopped_where(errors: dict[int, Any], targets: Sequence[int]) -> list[tuple[int, str]]:
    """(rank, where it stopped) per target of a finished cell: ``KeyboardInterrupt at cell line
    3 (time.sleep)``, or ``had finished`` for a rank without an error."""
    rows = []
    for t in targets:
        err = errors.get(t)
        if err is None:
            rows.append((t, "had finished"))
            continue
        found = stack_capture.traceback_where(str(getattr(err, "traceback", "") or ""))
        text = str(getattr(err, "ename", "") or "error")
        if found is not None:
            where, call = found
            text += f" at {where}" + (f" ({call})" if call else "")
        rows.append((t, text))
    return rows


_F = TypeVar("_F", bound=Callable[..., Any])


def like_stock(name: str, *extra: argument, note: str = "") -> Callable[[_F], _F]:
    """Give an override of ``ParallelMagics.<name>`` everything ipyparallel's decorators gave
    the stock magic: its argument parser (``parse_argstring`` looks it up on the method), its
    help text and its marks (``@no_var_expand``). ``extra`` options are added after stock's, in
    the parser and the help, with ``note`` after stock's description."""
    stock = getattr(ParallelMagics, name)

    def wrap(func: _F) -> _F:
        for attr, value in vars(stock).items():
            setattr(func, attr, copy.copy(value) if isinstance(value, (list, dict)) else value)
        func.__doc__ = stock.__doc__
        if extra or note:
            parser = getattr(stock, "parser", None)
            description = parser.description if parser is not None else stock.__doc__
            description = inspect.cleandoc(description or "")
            func.__doc__ = f"{description}\n\n{textwrap.fill(note, 79)}" if note else description
            # construct_parser applies the list last to first: stock's options first, then ours
            decorators: list[Any] = getattr(stock, "decorators", [])
            func.has_arguments = True  # type: ignore[attr-defined]
            func.decorators = [*reversed(extra), *decorators]  # type: ignore[attr-defined]
            func.parser = construct_parser(func)  # type: ignore[attr-defined]
        return func

    return wrap


def progress_rows(
    nodes: Sequence[dict[str, Any]], done: Sequence[int], targets: Sequence[int], elapsed: float
) -> list[tuple[int, str, str]]:
    """(rank, state, detail) per target rank: done, busy, unresponsive or dead, and how long."""
    by_rank = {n["rank"]: n for n in nodes}
    rows = []
    for t in targets:
        node = by_rank.get(t, {})
        if t in done:
            rows.append((t, "done", ""))
            continue
        state = node.get("state", "busy")
        if state == "unresponsive":
            detail = f"{elapsed:.0f} s, silent {node.get('silent_s') or 0:.0f} s, process alive"
        elif state == "unreachable":
            detail = f"since {node.get('silent_s') or 0:.0f} s (the network; waiting)"
        elif state == "dead":
            detail = node.get("why") or "gone"
        else:
            state, detail = "busy", f"{elapsed:.0f} s"
            if node.get("waiting"):  # its host's GPU idles while it waits in a collective
                detail += f", {node['waiting']}"
        rows.append((t, state, detail))
    return rows


_PROGRESS_COLOURS = {
    "done": "#2e7d32",
    "busy": "#1565c0",
    "unresponsive": "#ef6c00",
    "unreachable": "#8e24aa",
}


class Progress:
    """The cell's own progress line: which ranks are done, busy or unresponsive, live.

    Redrawn only when its text changes, at most every ``MIN_GAP_S`` (a terminal prints every
    update as a new line)."""

    MIN_GAP_S = 0.5

    def __init__(self) -> None:
        self._handle: Any = None
        self._last_text = ""
        self._last_at = 0.0

    @staticmethod
    def bundle(rows: list[tuple[int, str, str]], elapsed: float, final: bool = False) -> Any:
        done = sum(1 for _, s, _ in rows if s == "done")
        head = f"{done}/{len(rows)} ranks done after {elapsed:.{1 if final else 0}f} s"
        if final:
            return _Bundle(
                f"<div class='mlx-px-progress mlx-px-done' style='color:#666'>{head}</div>", head
            )
        spans = " ".join(
            f"<span class='mlx-px-rank mlx-px-{s}' style='color:{_colour(s)}'>"
            f"&#9679; rank {r} {s}{' ' + html.escape(d) if d else ''}</span>"
            for r, s, d in rows
        )
        text = "; ".join(f"rank {r} {s}{' ' + d if d else ''}" for r, s, d in rows)
        return _Bundle(
            f"<div class='mlx-px-progress' style='font-family:monospace'>{head}: {spans}</div>",
            f"{head}: {text}",
        )

    def show(self, obj: Any, force: bool = False) -> None:
        from IPython.display import display

        now = time.monotonic()
        if not force and (obj.plain == self._last_text or now - self._last_at < self.MIN_GAP_S):
            return
        self._last_text, self._last_at = obj.plain, now
        if self._handle is None:
            self._handle = display(obj, display_id=True)
        else:
            self._handle.update(obj)

    @property
    def shown(self) -> bool:
        return self._handle is not None


class _Bundle:
    def __init__(self, html_text: str, plain: str) -> None:
        self.html, self.plain = html_text, plain

    def _repr_mimebundle_(self, **_: Any) -> dict[str, str]:
        return {"text/html": self.html, "text/plain": self.plain}


class MLXParallelMagics(ParallelMagics):
    """``ParallelMagics`` bound to a cluster: rank deaths, interrupts and timeouts end the cell
    instead of hanging the notebook; no cluster, a stopped or a broken one is one line."""

    def __init__(self, shell: Any, view: Any, cluster: PxCluster | None) -> None:
        self.cluster = cluster
        self.cell_timeout: float | None = None
        self.replayable = True
        self._interrupted: threading.Event | None = None  # set once the running cell's is sent
        #: shows the running cell's streamed output that has arrived (from the cell's thread)
        self._relay: Callable[[], None] = _nothing
        super().__init__(shell, view)

    def _check_cluster(self) -> PxCluster:
        if self.cluster is None:
            raise UsageError("no cluster is running: start one with %mlx_cluster start")
        if not self.cluster.running:
            raise UsageError(self.cluster.not_running_message())
        return self.cluster

    @like_stock(
        "cell_px",
        argument(
            "--timeout",
            type=float,
            default=None,
            metavar="S",
            help="abort the cell (and the cluster, if the ranks cannot be interrupted) after S "
            "seconds",
        ),
        argument(
            "--no-replay",
            action="store_true",
            help="do not re-run this cell on %%mlx_cluster restart --replay",
        ),
        note="On an MLX cluster a rank that dies, an interrupt the ranks cannot take, or "
        "--timeout S ends the cell with one line instead of hanging the notebook.",
    )
    def cell_px(self, line: str = "", cell: str | None = None) -> Any:
        self._check_cluster()
        args = parse_argstring(self.cell_px, line)
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"%%px --timeout must be more than 0 seconds, got {args.timeout:g}")
        self.cell_timeout = args.timeout
        self.replayable = not args.no_replay
        try:
            return super().cell_px(_strip_ours(line), as_shown(line, cell or ""))
        finally:
            self.cell_timeout = None
            self.replayable = True

    @like_stock("px")
    def px(self, line: str = "") -> Any:
        self._check_cluster()
        return super().px(line)

    @like_stock("autopx")
    def autopx(self, line: str = "") -> Any:
        if not ipp_adapter.autopx_enabled(self):
            self._check_cluster()
        return super().autopx(line)

    @like_stock("result")
    def result(self, line: str = "") -> Any:
        self._check_cluster()
        return super().result(line)

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
        cluster = self._check_cluster()
        block = self.view.block if block is None else block
        if not block:
            result = super().parallel_execute(
                cell, block=False, groupby=groupby, save_name=save_name
            )
            if self.replayable:
                _record_when_done(cluster, result, cell, self.view.targets)
            return result
        stream_output = self.stream_output if stream_output is None else stream_output
        sig = self.signal_on_interrupt if signal_on_interrupt is None else signal_on_interrupt
        progress_after = self.progress_after_seconds if progress_after is None else progress_after
        targets = self.view.targets
        if self.verbose:
            print(f"Parallel execution on engine(s): {_targets_text(targets)}")
        try:
            result = self.view.execute(cell, silent=False, block=False)
        except (error.NoEnginesRegistered, KeyError, IndexError):
            # the controller unregistered engines this view targets (ipyparallel raises a
            # KeyError from its own lookup): the evidence breaks the cluster; say it in one line
            raise UsageError(engines_gone(cluster)) from None
        ipp_adapter.name_result(result, "%px")
        self.last_result = result
        if save_name:
            self.shell.user_ns[save_name] = result
        recorded = _record_when_done(cluster, result, cell, targets) if self.replayable else None
        self._interrupted = threading.Event()
        interrupted = self._interrupted

        def hide(content: dict[str, Any]) -> bool:
            return interrupted.is_set() and content.get("ename") == "KeyboardInterrupt"

        stopped: list[tuple[int, str]] | None = None
        try:
            streaming = (
                ipp_adapter.stream_output(result, hide) if stream_output else nullcontext(_nothing)
            )
            with streaming as self._relay:
                try:
                    cluster.cells_waiting += 1
                    try:
                        self._wait(cluster, result, self.cell_timeout, progress_after)
                    finally:
                        cluster.cells_waiting -= 1
                except KeyboardInterrupt:
                    stopped = self._interrupt(cluster, result, sig=sig)
                else:
                    try:
                        result.get()
                    except error.CompositeError as e:
                        if stream_output and ipp_adapter.output_ready(result):
                            raise error.AlreadyDisplayedError(e) from None
                        raise
        except CellStopped:
            raise
        except CellAborted as e:
            raise UsageError(str(e)) from None
        finally:
            # (a cell left running by ``--signal-on-interrupt 0`` has no outputs to show yet)
            if not stream_output and result.done():
                result.wait_for_output(OUTPUT_WAIT_S)
                result.display_outputs(groupby)
        if stopped:
            lines = [f"rank {r}: {where}" for r, where in stopped]
            print("\n".join([*lines, "(%pxresult shows the full tracebacks)"]), file=sys.stderr)
        elif recorded is not None:
            recorded.wait(1)  # the history has the cell when the cell returns
        return None

    def _wait(
        self, cluster: PxCluster, result: Any, timeout: float | None, progress_after: float
    ) -> None:
        """Wait for the cell, watching for dead ranks, the view's buttons and the timeout."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        generation = cluster.generation
        progress = Progress()
        targets = ipp_adapter.result_targets(result)
        loss_since: float | None = None
        try:
            # (``wait`` returns as soon as every reply is in; ``done()`` may lag it a moment)
            while not result.wait(POLL_S):
                self._relay()
                loss_since = self._check_loss(cluster, loss_since)
                self._check_alive(cluster, generation)
                elapsed = time.monotonic() - start
                if deadline is not None and time.monotonic() > deadline:
                    stopped = self._interrupt(
                        cluster, result, why=f"did not finish within {timeout:g} s"
                    )
                    at = "".join(f"; rank {r}: {where}" for r, where in stopped)
                    raise CellAborted(
                        f"the cell did not finish within {timeout:g} s and was interrupted{at}"
                    )
                if progress_after >= 0 and elapsed >= progress_after:
                    rows = progress_rows(
                        _nodes(cluster), ipp_adapter.done_targets(result), targets, elapsed
                    )
                    progress.show(Progress.bundle(rows, elapsed))
            if result.ready() and not result.successful():
                # ranks killed by a stop (from the view, another thread) end the cell with
                # errors: say why instead
                self._check_alive(cluster, generation)
        finally:
            if progress.shown:
                elapsed = time.monotonic() - start
                rows = [(t, "done", "") for t in ipp_adapter.done_targets(result)]
                rows += [(t, "busy", "") for t in ipp_adapter.pending_targets(result)]
                progress.show(Progress.bundle(rows, elapsed, final=True), force=True)
        result.wait_for_output(OUTPUT_WAIT_S)
        self._relay()

    def _check_loss(self, cluster: PxCluster, since: float | None) -> float | None:
        """End the cell when a host no one reaches (already confirmed by its peers) or a cable
        cut for ``LOSS_CONFIRM_S`` keeps it from finishing; returns when the loss was first
        seen (None: none now)."""
        loss = cluster.loss()
        if loss is None:
            return None
        now = time.monotonic()
        since = now if since is None else since
        if now - since < LOSS_CONFIRM_S and not cluster.dead_ranks():
            return since
        cluster.abort(loss)
        raise CellAborted(f"{loss.what}; the cell ended and the cluster was stopped: {loss.advice}")

    def _check_alive(self, cluster: PxCluster, generation: int) -> None:
        if cluster.generation != generation or not cluster.running:
            by = cluster.stopped_by()
            what = f"the cluster was {by}" if by else cluster.not_running_message()
            if cluster.running:
                what = "the cluster was restarted"
            # a person's own stop or restart (the view, another thread): a plain line
            raise (CellStopped if by or cluster.running else CellAborted)(f"the cell ended: {what}")
        dead = cluster.dead_ranks()
        if dead and cluster.refusal_pending():
            # ranks dead with no word from mpiexec: the watch asks the doctor whether a host's
            # firewall killed them at their first connection (a few seconds); its answer names
            # that host instead of the rank that noticed
            deadline = time.monotonic() + REFUSAL_WAIT_S
            while cluster.refusal_pending() and time.monotonic() < deadline:
                time.sleep(POLL_S)
            self._check_loss(cluster, time.monotonic() - LOSS_CONFIRM_S)
        if dead:
            what = cluster.describe_ranks(dead)
            cause = cluster.death_cause()
            verdict = cluster.hang_verdict()
            reason = f"{what} died while a cell ran{cause}"
            cluster.abort(reason)
            raise CellAborted(
                f"{what} died while the cell ran{cause}; the cluster was stopped: "
                f"%mlx_cluster restart brings it back{_verdict(verdict)}"
            )

    def _interrupt(
        self, cluster: PxCluster, result: Any, why: str | None = None, sig: Any = "SIGINT"
    ) -> list[tuple[int, str]]:
        """Send ``sig`` to every rank still running, as ipyparallel does; abort the cluster if
        one does not stop. ``0`` sends nothing. Every step has a time bound. Returns where each
        rank stopped once all have (empty when no signal was sent)."""
        running = ipp_adapter.pending_targets(result)
        if why is None:
            print(
                f"Received Keyboard Interrupt. Sending signal {sig} to engines...",
                file=sys.stderr,
            )
        if not running or sig == 0 or sig == "0":
            return []
        if self._interrupted is not None:
            self._interrupted.set()  # the ranks' KeyboardInterrupt tracebacks are not streamed
        ipp_adapter.send_signal(self.view.client, sig, running, SIGNAL_TIMEOUT_S)
        start = time.monotonic()
        hopeless_since: float | None = None
        hopeless = False
        while time.monotonic() - start < INTERRUPT_GRACE_S and not result.done():
            result.wait(POLL_S)
            self._relay()
            if not cluster.waits_on_ended(ipp_adapter.pending_targets(result)):
                hopeless_since = None
            elif hopeless_since is None:
                hopeless_since = time.monotonic()
            elif time.monotonic() - hopeless_since >= HOPELESS_S:
                hopeless = True
                break
        if result.done():
            result.wait_for_output(1)
            errors = ipp_adapter.errors_by_rank(result)
            return stopped_where(errors, ipp_adapter.result_targets(result))
        if not cluster.running:
            return []
        stuck = ipp_adapter.pending_targets(result)
        what = cluster.describe_ranks(stuck)
        verdict = cluster.hang_verdict()
        cell = f"the cell {why}" if why else "the cell was interrupted"
        cluster.abort(f"{cell} and {what} did not respond")
        grace = (
            f"waited {HOPELESS_S:g} s in a collective that the other ranks had left"
            if hopeless
            else f"did not respond to the interrupt within {INTERRUPT_GRACE_S:g} s"
        )
        raise CellAborted(
            f"{cell}, but {what} did not respond to the interrupt: it {grace} "
            "(stuck in a native MLX/MPI collective, which cannot be interrupted); the cluster "
            "was stopped: %mlx_cluster restart brings it back"
            f"{_verdict(verdict)}"
        )


def _nothing() -> None:
    """No streamed output to show (``%%px --no-stream``)."""


def engines_gone(cluster: PxCluster) -> str:
    """The one line for a view whose engines the controller no longer has: the evidence
    judged (the cluster breaks with its reason), never ipyparallel's own traceback."""
    cluster.judge()
    if not cluster.running:
        return cluster.not_running_message()
    return "the cluster's engines are gone: %mlx_cluster restart brings them back"


def _record_when_done(cluster: PxCluster, result: Any, cell: str, targets: Any) -> threading.Event:
    """Remember ``cell`` for replay when it completes without an error on every target, from
    the thread that completes it: blocking and ``--noblock`` cells alike, in the order they
    completed (not one of a cluster since restarted). The event is set once decided."""
    generation = cluster.generation
    on = None if targets == "all" else list(_as_list(targets))
    decided = threading.Event()

    def record(_: Any) -> None:
        try:
            if result.exception() is None and cluster.generation == generation and cluster.running:
                cluster.record_cell(cell, on)
        finally:
            decided.set()

    result.add_done_callback(record)
    return decided


def _nodes(cluster: PxCluster) -> list[dict[str, Any]]:
    try:
        return cluster.nodes()
    except MLXClusterError:  # live status is off: every rank not done counts as busy
        return []


def _colour(state: str) -> str:
    return _PROGRESS_COLOURS.get(state, "#c62828")


def _verdict(verdict: str | None) -> str:
    return f" ({verdict})" if verdict else ""


def _as_list(targets: Any) -> list[int]:
    return [targets] if isinstance(targets, int) else list(targets)


def _targets_text(targets: Any) -> str:
    """As ipyparallel's ``%px`` writes the targets."""
    if isinstance(targets, list) and len(targets) > 10:
        return str(targets[:4])[:-1] + ", ..., " + str(targets[-4:])[1:]
    return str(targets)
