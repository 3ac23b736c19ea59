"""A farm (``MLXCluster(farm=True)``, ``%mlx_cluster start --farm``): which Macs take tasks now,
and ``map``.

Each Mac of the farm is a member with a state: ``lent`` (it takes tasks), ``in use`` (its owner
is back, with ``--when-idle``: no new task; its running one finishes, or with ``--yield
requeue`` is handed back), ``draining`` (``remove --drain``: it finishes its task, then
leaves), ``left`` (removed) or ``lost`` (the liveness keeper's verdict: no one reaches it; its
tasks run elsewhere at once). A Mac may come back with ``add``: new slots, new engines. The
sweep (``cluster.sweep``) reads these states; this module changes them, from the cluster's
watch (twice a second), from each sweep's own loop, and from ``add``/``remove``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MLXClusterError
from ..fabric import hid_idle
from ..fabric.doctor import run_doctor
from ..fabric.placement import Host
from ..launch import bringup, farm_engines, mpi_job, spec
from ..launch.bringup import Running
from ..launch.farm_engines import Slot
from ..observe.health import Breakage
from ..views.sweep_view import HostProgress, SweepProgress, SweepTable, summary_line, text
from .sweep import Sweep, SweepResults

#: How often each Mac's HID idle time is read (``--when-idle``).
IDLE_POLL_S = 1.0
#: How often a draining Mac is asked whether its task ended.
DRAIN_POLL_S = 0.25
ACTIVE = ("lent", "in use", "draining")


@dataclass
class Member:
    """A Mac of the farm, with its engines (slots) and state."""

    host: Host
    slots: list[Slot]
    state: str
    why: str = ""
    idle_s: float | None = None
    #: time.monotonic() when it was judged lost (bench: the time to its task running elsewhere).
    lost_at: float | None = None


@dataclass
class Farm:
    """The members of a running farm and what they may take; one sweep at a time."""

    run: Running
    on_spec: Callable[[spec.ClusterSpec], None]
    members: list[Member] = field(default_factory=list)
    sweep: Sweep | None = None
    secrets_path: str = ""
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _drain_asked: float = 0.0
    #: A load-balanced view per engine (its tasks go through the scheduler to it alone).
    _views: dict[int, Any] = field(default_factory=dict)
    _on_lost: Callable[[Breakage], None] | None = None
    #: Told a line for the live view (each Mac lent or in use, the sweep's progress).
    on_activity: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, run: Running, on_spec: Callable[[spec.ClusterSpec], None]) -> Farm:
        """The engines of every slot of the start, registered and checked; the Macs' idle
        time read once (``--when-idle``) before any task is given."""
        farm = cls(run, on_spec)
        farm.secrets_path = farm_engines.deliver(run)
        run.client = run.ipp.connect_client_sync()
        slots = farm_engines.first_slots(run.spec.placement)
        farm_engines.start(run, slots, farm.secrets_path)
        for host in dict.fromkeys(s.host for s in slots):
            farm.members.append(Member(host, [s for s in slots if s.host == host], "lent"))
        farm._publish()
        if run.spec.when_idle is not None:
            farm._read_idle()
            threading.Thread(target=farm._idle_loop, name="mlx-farm-idle", daemon=True).start()
        return farm

    def watch_liveness(self, on_lost: Callable[[Breakage], None]) -> None:
        """The liveness keeper over every member's host (made again when one is added)."""
        self._on_lost = on_lost
        if self.run.liveness is not None:
            self.run.liveness.close()
            self.run.liveness = None
        bringup.watch_liveness(self.run, on_lost)

    def _publish(self) -> None:
        """What the rest of the cluster reads: each slot's record, the live engines' view, the
        host each slot's status records must name."""
        run = self.run
        every = sorted((s for m in self.members for s in m.slots), key=lambda s: s.slot)
        run.ranks = [s.report or {"host": s.host.ssh, "rank": s.slot, "pid": 0} for s in every]
        live = [s.slot for m in self.members if m.state in ACTIVE for s in m.slots]
        if run.client is not None:
            run.view = run.client[live] if live else None
            if run.view is not None:
                run.view.block = True
        if run.status is not None:
            run.status.placement = run.spec.placement
            run.status.expect_hosts([str(r["host"]) for r in run.ranks])
        self.tell()

    def tell(self, progress: SweepProgress | None = None) -> None:
        """The live view's line: each Mac's state and, while a sweep runs, its progress."""
        if self.on_activity is None:
            return
        macs = ", ".join(
            f"{m.host.ssh} {m.state}" + (f" ({m.why})" if m.state == "in use" and m.why else "")
            for m in self.members
        )
        sweep = f"; {summary_line(progress)}" if progress is not None else ""
        with contextlib.suppress(Exception):
            self.on_activity(f"farm: {macs}{sweep}")

    # ------------------------------------------------------------------ reading
    def lendable(self) -> list[int]:
        with self._lock:
            return [s.slot for m in self.members if m.state == "lent" for s in m.slots]

    def live_slots(self) -> list[int]:
        with self._lock:
            return [s.slot for m in self.members if m.state in ACTIVE for s in m.slots]

    def _member_of(self, slot: int) -> Member:
        return next(m for m in self.members if any(s.slot == slot for s in m.slots))

    def state_of(self, slot: int) -> str:
        return self._member_of(slot).state

    def host_of(self, slot: int) -> str:
        return self._member_of(slot).host.ssh

    def yield_policy(self) -> str:
        return self.run.spec.yield_policy

    def host_rows(self) -> list[tuple[HostProgress, list[int]]]:
        """Each member's row (its tasks counted by the sweep) and slots."""
        return [
            (
                HostProgress(m.host.ssh, m.state, len(m.slots), 0, 0, m.idle_s),
                [s.slot for s in m.slots],
            )
            for m in self.members
        ]

    def hosts(self) -> list[dict[str, Any]]:
        """Each Mac: its state (lent, in use, draining, left, lost), engines, why, idle time."""
        return [
            {
                "host": m.host.ssh,
                "state": m.state,
                "engines": [s.slot for s in m.slots],
                "why": m.why,
                "idle_s": m.idle_s,
            }
            for m in self.members
        ]

    def restart_spec(self) -> spec.ClusterSpec:
        """The farm as it stands, for a restart: its Macs that are still in it, in order."""
        active = [m for m in self.members if m.state in ACTIVE]
        if not active:
            return self.run.spec
        placement = dataclasses.replace(
            self.run.spec.placement,
            hosts=tuple(m.host for m in active),
            per_host=tuple(len(m.slots) for m in active),
        )
        return dataclasses.replace(self.run.spec, placement=placement)

    def dead_evidence(self) -> dict[int, str]:
        """Slots whose engine is gone for good: their Mac was lost, or left the farm."""
        return {
            s.slot: m.why or m.state
            for m in self.members
            if m.state in ("lost", "left")
            for s in m.slots
        }

    # ------------------------------------------------------------------ acting
    def submit(self, fn: Callable[..., Any], item: Any, slot: int) -> Any:
        """``fn(item)`` as a task of ipyparallel's scheduler, for ``slot``'s engine only."""
        view = self._views.get(slot)
        if view is None and self.run.client is not None:
            view = self._views[slot] = self.run.client.load_balanced_view(targets=[slot])
        assert view is not None
        return view.apply_async(fn, item)

    def take_back(self, futures: Sequence[Any], slot: int, interrupt: bool) -> None:
        """Tasks no longer wanted where they are: aborted if they wait, the engine interrupted
        if it is to hand back the one it runs."""
        client = self.run.client
        if client is None:
            return
        ids = [i for f in futures for i in getattr(f, "msg_ids", [])]
        with contextlib.suppress(Exception):
            if ids and self.state_of(slot) in ACTIVE:
                client.abort(jobs=ids, targets=[slot], block=False)
        if interrupt:
            with contextlib.suppress(Exception):
                client.send_signal(signal.SIGINT, targets=[slot], block=False)

    def refresh(self) -> None:
        """Judge the evidence: members lost (liveness keeper), engines gone, drains done."""
        run = self.run
        verdicts = run.liveness.verdicts() if run.liveness is not None else {}
        registered = set(run.client.ids) if run.client is not None else set()
        with self._lock:
            for m in self.members:
                if m.state not in ACTIVE:
                    continue
                v = verdicts.get(m.host.ssh)
                if v is not None and v.state in ("lost", "gone"):
                    self._lose(m, v.detail)
                elif any(s.slot not in registered for s in m.slots):
                    self._lose(m, f"{m.host.ssh}: its engine left the controller")
                elif any(
                    s.slot in run.rank_procs and not run.rank_procs[s.slot].alive() for s in m.slots
                ):
                    self._lose(m, f"{m.host.ssh}: its engine's process is gone")
            self._finish_drains()

    def _lose(self, member: Member, why: str) -> None:
        member.state, member.why, member.lost_at = "lost", why, time.monotonic()
        self._publish()
        slots = list(member.slots)
        # ssh to a Mac that is gone may take seconds to end: not on the sweep's time
        threading.Thread(
            target=lambda: farm_engines.end(self.run, slots, graceful=False), daemon=True
        ).start()

    def _finish_drains(self) -> None:
        draining = [m for m in self.members if m.state == "draining"]
        now = time.monotonic()
        if not draining or now - self._drain_asked < DRAIN_POLL_S or self.run.client is None:
            return
        self._drain_asked = now
        for m in draining:
            slots = [s.slot for s in m.slots]
            try:
                queues = self.run.client.queue_status(targets=slots)
            except Exception:
                continue
            busy = any(queues.get(s, {}).get("tasks", 0) for s in slots)
            mine = self.sweep is not None and any(
                a.slot in slots for a in list(self.sweep.live.values())
            )
            if not busy and not mine:
                self._leave(m, "removed (drained)", wait=False)

    def _leave(self, member: Member, why: str, wait: bool = True) -> None:
        """``member`` leaves: its engines shut down (in the background unless ``wait``: a
        sweep that noticed a drain end must not wait for it)."""
        member.state, member.why = "left", why
        self._publish()
        slots = list(member.slots)
        if wait:
            farm_engines.end(self.run, slots, graceful=True)
            return
        threading.Thread(
            target=lambda: farm_engines.end(self.run, slots, graceful=True), daemon=True
        ).start()

    # ------------------------------------------------------------------ add / remove
    def find(self, name: str) -> Member:
        """The active member called ``name`` (its hostfile name or the hostname it reports)."""
        for m in self.members:
            names = {m.host.ssh, *(str(s.report.get("host", "")) for s in m.slots)}
            if name in names and m.state in ACTIVE:
                return m
        known = ", ".join(m.host.ssh for m in self.members if m.state in ACTIVE) or "none"
        raise MLXClusterError(f"{name} is not a Mac of this farm (its Macs: {known})")

    def add(self, name: str, n: int | None = None) -> Member:
        """``name`` joins the farm with ``n`` engines (default: as many as the farm's first
        Mac), and takes tasks at once; a Mac that was lost or left may come back."""
        with self._lock:
            if any(m.state in ACTIVE and m.host.ssh == name for m in self.members):
                raise MLXClusterError(f"{name} is already in the farm: remove it first")
        run = self.run
        count = n if n is not None else run.spec.placement.per_host[0]
        new = spec.placement_from(count, hosts=name)
        host = new.hosts[0]
        first = run.spec.placement.size
        slots = [Slot(first + i, host) for i in range(count)]
        peers = {} if host.is_local else mpi_job.ssh_addresses(new, run.spec.ssh)
        if not host.is_local:  # the doctor's checks, as a start's preflight makes them
            bringup.refuse_failed_hosts(
                run_doctor(
                    new, python=run.spec.python, ssh=run.spec.ssh, backend="ring", advice=False,
                    addresses=peers, head_address=run.spec.controller_ip,
                )
            )  # fmt: skip
        grown = dataclasses.replace(
            run.spec,
            placement=farm_engines.grown(run.spec.placement, host, count),
            peers=tuple(sorted({**dict(run.spec.peers), **peers}.items())),
        )
        run.spec = grown
        self.on_spec(grown)
        with self._lock:
            member = Member(host, slots, "starting")
            self.members.append(member)
        try:
            path = farm_engines.deliver(run, [host]) if not host.is_local else self.secrets_path
            farm_engines.start(run, slots, path)
        except BaseException:
            with self._lock:
                member.state, member.why = "left", "could not start"
            farm_engines.end(run, slots, graceful=False)
            raise
        with self._lock:
            member.state = "lent"
            if run.spec.when_idle is not None:
                self._read_idle([member])
            self._publish()
        if self._on_lost is not None and not host.is_local:
            self.watch_liveness(self._on_lost)
        return member

    def remove(self, name: str, drain: bool = False) -> Member:
        """``name`` leaves: at once (its tasks run elsewhere), or with ``drain`` once the task
        it runs has ended (it takes no new one meanwhile)."""
        with self._lock:
            member = self.find(name)
            if drain:
                member.state, member.why = "draining", "remove --drain"
                self._publish()
                return member
        self._leave(member, "removed")
        return member

    # ------------------------------------------------------------------ idle
    def _read_idle(self, members: Sequence[Member] | None = None) -> None:
        """Each active Mac's HID idle time, read over ssh at once; it is lent while at least
        ``--when-idle`` and in use otherwise (also when it cannot be read)."""
        limit = self.run.spec.when_idle
        if limit is None:
            return
        chosen = [m for m in (members or self.members) if m.state in ("lent", "in use")]
        if not chosen:
            return
        ssh = self.run.spec.ssh
        with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
            readings = list(
                pool.map(
                    lambda m: hid_idle.read_idle_seconds(m.host.ssh, ssh, m.host.is_local), chosen
                )
            )
        with self._lock:
            before = [m.state for m in self.members]
            for m, idle in zip(chosen, readings, strict=True):
                if m.state not in ("lent", "in use"):
                    continue
                m.idle_s = idle
                m.state = "lent" if idle is not None and idle >= limit else "in use"
                m.why = "" if m.state == "lent" else (
                    "its owner is using it" if idle is not None else "its idle time cannot be read"
                )  # fmt: skip
            if before != [m.state for m in self.members]:
                self.tell()

    def _idle_loop(self) -> None:
        while not self._stop.wait(IDLE_POLL_S):
            with contextlib.suppress(Exception):
                self._read_idle()

    # ------------------------------------------------------------------ map
    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        retries: int = 0,
        block: bool = True,
        show: Callable[[SweepProgress], None] | None = None,
    ) -> SweepResults | Sweep:
        """Run ``fn(item)`` for every item (see ``MLXCluster.map``)."""
        if self.sweep is not None and self.sweep.finished_at is None:
            raise MLXClusterError(
                "a sweep is still running on this farm: wait for it (sweep.result()) or "
                "sweep.stop() it"
            )

        def progress(p: SweepProgress) -> None:
            self.tell(None if p.finished else p)
            if show is not None:
                show(p)

        sweep = self.sweep = Sweep(self, fn, items, retries, on_progress=progress)
        if block:
            return sweep.run()
        threading.Thread(target=_run_quietly, args=(sweep,), name="mlx-sweep", daemon=True).start()
        return sweep

    def close(self) -> None:
        """The cluster stops: no more readings, the sweep ends, every engine is ended."""
        self._stop.set()
        if self.sweep is not None:
            self.sweep.stop()
        # every slot: a lost Mac that came back may still run its old engine
        every = [s for m in self.members for s in m.slots]
        with contextlib.suppress(Exception):
            farm_engines.end(self.run, every, graceful=True)


class ClusterFarm:
    """What ``MLXCluster`` does as a farm (``farm=True``): ``map``, ``add``, ``remove``,
    ``farm_hosts``, and the farm's hooks into the life cycle. Mixed into ``MLXCluster``."""

    # provided by MLXCluster
    spec: spec.ClusterSpec
    activity: str | None
    generation: int
    _farm: Farm | None
    _widget: Any

    if TYPE_CHECKING:

        def _require(self) -> Running: ...
        def _refresh_widget(self) -> None: ...
        def abort(self, reason: str | Breakage = ..., *, generation: int | None = None) -> None: ...

    def _farm_spec(self, grown: spec.ClusterSpec) -> None:
        """A Mac added to the farm: its slots are part of the spec from now on."""
        self.spec = grown

    def _farm_activity(self, line: str) -> None:
        """The live view's line about the farm (its Macs, the sweep's progress)."""
        self.activity = line
        if self._widget is not None:
            self._refresh_widget()

    def _farm_lost(self, lost: Breakage, generation: int) -> None:
        """Every Mac of a farm silent past the grace: the farm's engines are gone."""
        if self._farm is not None and self.generation == generation:
            self._farm.refresh()
            if not self._farm.live_slots():
                self.abort(lost, generation=generation)

    def _farm_of(self) -> Farm:
        self._require()
        if self._farm is None:
            raise MLXClusterError(
                "this cluster is not a farm: start one with %mlx_cluster start --farm "
                "(MLXCluster(farm=True))"
            )
        return self._farm

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        retries: int = 0,
        block: bool = True,
    ) -> Any:
        """A farm's sweep: ``fn(item)`` for each item on the next free engine; results in item
        order (a failed item holds its error, named in one line). ``retries`` re-runs a
        failing task elsewhere; a Mac lost, removed or taken back has its task run elsewhere,
        and each item's result counts once. The progress shows in the cell. With
        ``block=False`` returns the running sweep: iterate it for results in item order as
        they come, ``.result()`` waits for all; ``%mlx_cluster add``/``remove`` meanwhile."""
        farm = self._farm_of()
        shown = cell_display()
        results = farm.map(fn, items, retries=retries, block=block, show=shown)
        if block and shown is None:
            print(text(results.progress) if results.progress else "")
        return results

    def farm_hosts(self) -> list[dict[str, Any]]:
        """Each Mac of the farm: lent, in use by its owner, draining, left or lost, and why."""
        return self._farm_of().hosts()

    def add(self, host: str, n: int | None = None) -> None:
        """A Mac joins the running farm (``n`` engines, default as the first Mac's)."""
        self._farm_of().add(host, n)

    def remove(self, host: str, drain: bool = False) -> None:
        """A Mac leaves the farm: at once (its task runs elsewhere), or with ``drain`` once its
        task has ended."""
        self._farm_of().remove(host, drain)


def _run_quietly(sweep: Sweep) -> None:
    with contextlib.suppress(BaseException):  # kept in sweep.error, raised by result()
        sweep.run()


def cell_display() -> Callable[[SweepProgress], None] | None:
    """Progress shown in the cell, replaced in place (a notebook's kernel), else None."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return None
    handle: list[Any] = []

    def show(progress: SweepProgress) -> None:
        table = SweepTable(progress)
        if handle:
            handle[0].update(table)
        else:
            handle.append(display(table, display_id=True))

    return show


__all__ = ["ClusterFarm", "Farm", "Member", "cell_display"]
