"""``cluster.map(fn, items)`` on a farm: each item to the next free engine, results in item order,
every item's result taken once, whatever Macs come and go meanwhile.

Tasks go through ipyparallel's load-balanced view, each with ``targets`` set to the engine that
is to run it: the task scheduler queues it (one running and one waiting per engine: its
``hwm`` of 1 sends an engine its next task the moment the last ends, with no round trip to the
notebook) and ipyparallel's futures say when it ends. The sweep itself chooses the engine, as
it alone knows what the scheduler cannot: which Mac was lost (a verdict of the liveness
keeper, long before the controller's heartbeat gives up on it), which one its owner took back,
which one drains. ipyparallel's own ``retries`` would re-run a failed task on the engine it was
pinned to, so a failed task is re-run here, on another engine when there is one.

Each item has one current attempt; a result counts only from it, once. When an engine's Mac is
lost, removed or taken back, its attempts are replaced by new ones on other engines (the old
ones, should they ever answer, are not counted): no item lost, none counted twice. No IPython:
progress goes to a callback (``cluster.farm`` shows it in the cell).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import MLXClusterError
from ..views.sweep_view import HostProgress, SweepProgress

#: Tasks at once per engine: one running, one waiting in the task scheduler.
DEPTH = 2
#: How often the sweep looks at the farm while no task ends (a lost Mac is acted on within it).
TICK_S = 0.05
#: How often progress is shown.
SHOW_EVERY_S = 0.25
#: Errors that say the engine went away rather than the task failing: the task runs again.
ENGINE_GONE = ("EngineError", "TaskAborted", "KeyboardInterrupt")


class FarmLike(Protocol):
    """What a sweep needs of the farm (``cluster.farm.Farm``)."""

    def lendable(self) -> list[int]: ...
    def state_of(self, slot: int) -> str: ...
    def host_of(self, slot: int) -> str: ...
    def yield_policy(self) -> str: ...
    def refresh(self) -> None: ...
    def submit(self, fn: Callable[..., Any], item: Any, slot: int) -> Any: ...
    def take_back(self, futures: Sequence[Any], slot: int, interrupt: bool) -> None: ...
    def host_rows(self) -> list[tuple[HostProgress, list[int]]]: ...


@dataclass
class Attempt:
    item: int
    slot: int
    future: Any
    submitted: float


class SweepResults(list[Any]):
    """The results in item order (a failed item holds its ``RemoteError``), with ``errors``
    (item -> error), ``hosts`` (item -> the Mac whose result counts), ``rerun`` (tasks re-run
    elsewhere: their Mac lost, removed or taken back) and the final ``progress``."""

    errors: dict[int, Exception]
    hosts: list[str | None]
    rerun: int
    progress: SweepProgress | None


class Sweep:
    """One ``map`` over a farm, run by ``run()`` (in the cell's thread or a thread of its own)."""

    def __init__(
        self,
        farm: FarmLike,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        retries: int = 0,
        on_progress: Callable[[SweepProgress], None] | None = None,
    ) -> None:
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise MLXClusterError(f"retries must be a whole number, 0 or more, got {retries!r}")
        self.farm, self.fn, self.items = farm, fn, list(items)
        n = len(self.items)
        self.pending: collections.deque[int] = collections.deque(range(n))
        self.results: list[Any] = [None] * n
        self.done = [False] * n
        self.hosts: list[str | None] = [None] * n
        self.slots: list[int | None] = [None] * n
        self.retries_left = [retries] * n
        self.avoid: dict[int, int] = {}
        self.live: dict[int, Attempt] = {}  # item -> its current attempt
        self.errors: dict[int, Exception] = {}
        self.failures: list[str] = []
        self.rerun = 0
        self.last_result: str | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._on_progress = on_progress
        self._shown = 0.0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        #: Attempts whose future ended, put there by ipyparallel's thread.
        self._ended: queue.SimpleQueue[Attempt] = queue.SimpleQueue()
        self.error: BaseException | None = None
        #: (time.time(), item, slot, why) of each task taken back from an engine.
        self.moved: list[tuple[float, int, int, str]] = []
        #: item -> the future whose result counted (its metadata: engine, started, completed).
        self.counted: dict[int, Any] = {}

    # ------------------------------------------------------------------ the loop
    def run(self) -> SweepResults:
        """Until every item has its result (or its last failure)."""
        looked = 0.0
        try:
            while not all(self.done) and not self._stop.is_set():
                now = time.monotonic()
                if now - looked >= TICK_S:  # the farm's states, not at every result
                    looked = now
                    self.farm.refresh()
                    self._take_back()
                self._fill()
                self._wait()
                self._show()
        except BaseException as e:
            self.error = e
            raise
        finally:
            self._abandon()
            self.finished_at = time.monotonic()
            self._show(force=True)
            with self._changed:
                self._changed.notify_all()
        return self.collected()

    def stop(self) -> None:
        """End the sweep at its next look (tasks under way are left to finish, not counted)."""
        self._stop.set()

    def _wait(self) -> None:
        """Collect what ended, waiting up to ``TICK_S`` for the first."""
        try:
            attempt = self._ended.get(timeout=TICK_S)
        except queue.Empty:
            return
        while True:
            self._collect(attempt)
            try:
                attempt = self._ended.get_nowait()
            except queue.Empty:
                return

    def _fill(self) -> None:
        """Each lendable engine gets tasks up to ``DEPTH``, the least loaded first."""
        if not self.pending:
            return
        load = collections.Counter(a.slot for a in self.live.values())
        slots = sorted(self.farm.lendable(), key=lambda s: load[s])
        for depth in range(1, DEPTH + 1):  # every engine one task before any gets a second
            for slot in slots:
                if load[slot] >= depth or not self.pending:
                    continue
                item = self._next_for(slot, len(slots) > 1)
                if item is None:
                    continue
                future = self.farm.submit(self.fn, self.items[item], slot)
                attempt = self.live[item] = Attempt(item, slot, future, time.monotonic())
                future.add_done_callback(lambda _, a=attempt: self._ended.put(a))
                load[slot] += 1

    def _next_for(self, slot: int, others: bool) -> int | None:
        """The first waiting item, skipping one that failed on ``slot`` while others exist."""
        for item in self.pending:
            if not others or self.avoid.get(item) != slot:
                self.pending.remove(item)
                return item
        return None

    # ------------------------------------------------------------------ results
    def _collect(self, attempt: Attempt) -> None:
        item = attempt.item
        if self.live.get(item) is not attempt:
            return  # replaced meanwhile: not counted
        del self.live[item]
        try:
            value = attempt.future.result(0)
        except Exception as e:  # the task's error, as ipyparallel raises it
            self._failed(attempt, e)
            return
        self.counted[item] = attempt.future
        self._accept(item, value, attempt.slot)

    def _accept(self, item: int, value: Any, slot: int) -> None:
        assert not self.done[item], f"item {item} counted twice"
        self.results[item], self.done[item] = value, True
        self.hosts[item], self.slots[item] = self.farm.host_of(slot), slot
        text = repr(value)
        self.last_result = f"[{item}] {text if len(text) <= 80 else text[:77] + '...'}"
        with self._changed:
            self._changed.notify_all()

    def _failed(self, attempt: Attempt, error: Exception) -> None:
        item = attempt.item
        name = str(getattr(error, "ename", type(error).__name__))
        if name in ENGINE_GONE:
            self.pending.appendleft(item)  # the engine went away: not the task's failure
            self.rerun += 1
            return
        if self.retries_left[item] > 0:
            self.retries_left[item] -= 1
            self.avoid[item] = attempt.slot
            self.pending.appendleft(item)
            return
        value = getattr(error, "evalue", str(error))
        host = self.farm.host_of(attempt.slot)
        self.failures.append(f"item {item} on {host}: {name}: {value}")
        self.errors[item] = error
        self.results[item], self.done[item] = error, True
        with self._changed:
            self._changed.notify_all()

    def _take_back(self) -> None:
        """Attempts on engines that cannot keep them go back to the queue, first in line: all
        of a lost or removed Mac's (or one its owner took back, with ``--yield requeue``), the
        waiting ones of a Mac that drains or finishes its task for its owner."""
        by_slot: dict[int, list[Attempt]] = collections.defaultdict(list)
        for a in self.live.values():
            by_slot[a.slot].append(a)
        for slot, attempts in by_slot.items():
            state = self.farm.state_of(slot)
            if state == "lent":
                continue
            everything = state in ("lost", "left") or (
                state == "in use" and self.farm.yield_policy() == "requeue"
            )
            attempts.sort(key=lambda a: a.submitted)
            back = attempts if everything else attempts[1:]
            if not back:
                continue
            now = time.time()
            for a in back:
                del self.live[a.item]
                self.pending.appendleft(a.item)
                self.rerun += 1
                self.moved.append((now, a.item, slot, state))
            self.farm.take_back(
                [a.future for a in back], slot, interrupt=everything and state == "in use"
            )

    def _abandon(self) -> None:
        """At the end (or an interrupt): what still runs is not waited for."""
        for a in list(self.live.values()):
            self.farm.take_back([a.future], a.slot, interrupt=False)
        self.live.clear()

    # ------------------------------------------------------------------ reading
    def progress(self) -> SweepProgress:
        now = self.finished_at or time.monotonic()
        done = sum(self.done)
        elapsed = now - self.started
        eta = None
        if done:
            eta = (len(self.items) - done) * elapsed / done
        running_on = collections.Counter(a.slot for a in self.live.values())
        done_on = collections.Counter(s for s in self.slots if s is not None)
        rows = tuple(
            dataclasses.replace(
                row,
                done=sum(done_on[s] for s in slots),
                running=sum(running_on[s] for s in slots),
            )
            for row, slots in self.farm.host_rows()
        )
        running = len(self.live)
        return SweepProgress(
            total=len(self.items),
            done=done,
            running=running,
            queued=len(self.pending),
            failed=len(self.errors),
            elapsed_s=elapsed,
            eta_s=0.0 if done == len(self.items) else eta,
            last_result=self.last_result,
            hosts=rows,
            failures=tuple(self.failures),
            rerun=self.rerun,
            finished=self.finished_at is not None,
        )

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._on_progress is None or (not force and now - self._shown < SHOW_EVERY_S):
            return
        self._shown = now
        self._on_progress(self.progress())

    def result(self, timeout: float | None = None) -> SweepResults:
        """Wait for the sweep to end; its results (or what ended it, raised)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self.finished_at is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise MLXClusterError(f"the sweep is still running after {timeout:g} s")
                self._changed.wait(0.5 if left is None else min(0.5, left))
        if self.error is not None:
            raise self.error
        return self.collected()

    def collected(self) -> SweepResults:
        out = SweepResults(self.results)
        out.errors, out.hosts, out.rerun = dict(self.errors), list(self.hosts), self.rerun
        out.progress = self.progress()
        return out

    def __iter__(self) -> Iterator[Any]:
        """The results in item order, each as soon as it (and those before it) arrived."""
        for item in range(len(self.items)):
            with self._changed:
                while not self.done[item]:
                    if self.finished_at is not None:
                        raise MLXClusterError(f"the sweep ended before item {item}: {self.error!r}")
                    self._changed.wait(0.5)
            yield self.results[item]
