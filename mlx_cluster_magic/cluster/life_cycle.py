"""``MLXCluster``: the life cycle of one MLX cluster (controller + MPI-launched engines).

States: ``stopped`` -> ``starting`` -> ``running`` -> ``stopped``, or ``broken`` after an abort
(a rank died, a cell could not be interrupted), with the reason kept until the next start.
Every change happens under one lock. The pieces live elsewhere: options (checks before launch),
bringup (the steps of one run: bring-up, dead-rank evidence, teardown), engines (the ipyparallel
adapter), procs (tracking, reaping, the watchdog), status (live rank records). What a cluster
shows is mixed in from cluster_views; what a person does with it besides running cells (gather,
broadcast, why, checks, links, doctor, history) from cluster_tools.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shlex
import shutil
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ipyparallel as ipp

from ..contract import EXIT_BAD_GROUP
from ..errors import MLXClusterError
from ..fabric.placement import Placement
from ..launch import bringup, ipp_adapter, mpi_job, processes, spec
from ..observe import health
from ..observe.health import Breakage
from ..observe.snapshot import ClusterState, NodeStatus
from ..runtime import records
from . import attached
from .displays import ClusterViews
from .farm import ClusterFarm, Farm
from .tools import ClusterTools, HistoryEntry

if TYPE_CHECKING:
    from ..views.status_widget import StatusWidget
    from .pipeline_plan import PipelinePlan

START_TIMEOUT_S = spec.START_TIMEOUT_S
#: How often the watch judges the evidence while no cell runs.
WATCH_PERIOD_S = 0.5
#: How old a kept cluster's last state may be to answer a cell's wait without asking again.
LIFE_FRESH_S = 1.0
#: How long a stop waits for a start under way in another thread to give up.
STOP_A_START_S = 30.0


class MLXCluster(ClusterViews, ClusterTools, ClusterFarm):
    """An MLX cluster: ipyparallel engines under ``mpiexec`` with MLX's group ready on every rank.

    >>> cluster = MLXCluster(n=2).start()
    >>> cluster.view.execute("y = mx.distributed.all_sum(mx.ones(4))")
    >>> cluster.stop()

    Life cycle (``state``):

    - ``stopped`` on creation; ``start()`` goes through ``starting`` to ``running``, or back to
      ``stopped`` with nothing left running and the error raised. ``start()`` on a running
      cluster raises; ``restart()`` stops whatever runs and starts again.
    - ``abort(reason)`` (a rank died, a cell could not be interrupted) kills every process at
      once: ``broken``, with ``broken_reason``, until ``stop()``, ``restart()`` or ``start()``.
    - ``stop()`` (``close()`` is the same) returns once no process of the cluster is left, and
      is harmless to repeat: on a stopped cluster it returns at once; called from two threads,
      one stops and the other waits for it. A ``with MLXCluster(n=2) as cluster:`` block stops
      at its end; the kernel's exit stops every cluster still running.
    - Every change of state happens under one lock, so a stop from the status view (another
      thread) and a call in the cell cannot interleave.
    """

    def __init__(
        self,
        n: int | None = None,
        *,
        hosts: str | Sequence[str] | None = None,
        hostfile: str | os.PathLike[str] | None = None,
        backend: str | None = None,
        mpiexec: str | None = None,
        mpi_lib: str | None = None,
        python: str | None = None,
        workdir: str | None = None,
        controller_ip: str | None = None,
        ring_port: int = mpi_job.DEFAULT_RING_PORT,
        ssh: str | None = None,
        timeout: float = START_TIMEOUT_S,
        live_status: bool = True,
        check_collectives: bool = False,
        collective_timeout: float = spec.COLLECTIVE_TIMEOUT_S,
        verbose: bool = False,
        connections_per_ip: int = 1,
        grace: float = spec.GRACE_S,
        keep: bool = False,
        runtime_on: str | None = None,
        idle_timeout: float | None = None,
        farm: bool = False,
        when_idle: float | str | None = None,
        yield_policy: str = "finish",
    ) -> None:
        #: What was asked, as given: a kept cluster's runtime resolves it again where it runs.
        self._options: dict[str, Any] = dict(
            n=n, hosts=hosts, hostfile=None if hostfile is None else os.fspath(hostfile),
            backend=backend, mpiexec=mpiexec, mpi_lib=mpi_lib, python=python, workdir=workdir,
            controller_ip=controller_ip, ring_port=ring_port, ssh=ssh, timeout=timeout,
            live_status=live_status, check_collectives=check_collectives,
            collective_timeout=collective_timeout, verbose=verbose,
            connections_per_ip=connections_per_ip, grace=grace,
        )  # fmt: skip
        self.keep = bool(keep or runtime_on)
        if self.keep and farm:  # (a sweep's engines and its table live in the notebook)
            raise MLXClusterError(
                "a farm is not kept: start it without --keep/--runtime-on (its sweep runs "
                "from this notebook)"
            )
        #: What a kept cluster's runtime was started with (to start the same one again).
        self._ask: dict[str, Any] | None = None
        self.runtime_on = runtime_on
        if idle_timeout is not None and not self.keep:
            raise MLXClusterError("--idle-timeout is for a kept cluster: add --keep")
        if idle_timeout is not None and idle_timeout <= 0:
            raise MLXClusterError(f"--idle-timeout must be positive, got {idle_timeout:g}")
        self.idle_timeout = (
            (idle_timeout if idle_timeout is not None else records.IDLE_TIMEOUT_S)
            if self.keep else None
        )  # fmt: skip
        self.spec = spec.resolve(
            n, hosts=hosts, hostfile=hostfile, backend=backend, mpiexec=mpiexec,
            mpi_lib=mpi_lib, python=python, workdir=workdir, controller_ip=controller_ip,
            ring_port=ring_port, ssh=ssh, timeout=timeout, live_status=live_status,
            check_collectives=check_collectives, collective_timeout=collective_timeout,
            verbose=verbose, connections_per_ip=connections_per_ip, grace=grace,
            farm=farm, when_idle=when_idle, yield_policy=yield_policy,
        )  # fmt: skip
        self._init_state()

    def _init_state(self) -> None:
        """The fields of a cluster that has not run yet (a new one, or one being attached)."""
        self._lock = threading.RLock()
        self._state: ClusterState = ClusterState.STOPPED
        self._reason: str | None = None  # who stopped it (``stopped from the status view``)
        self._breakage: Breakage | None = None
        self._watch_stop: threading.Event | None = None
        self._run: bringup.Running | None = None
        self._widget: StatusWidget | None = None
        self._history: list[HistoryEntry] = []
        self._topology_svg: str | None = None
        self._last_recorders: list[dict[str, Any] | None] = []
        #: The latest ``plan_pipeline`` result (which layers each rank holds), else None.
        self.pipeline_plan: PipelinePlan | None = None
        self.banner: str | None = None
        self.last_nodes: list[NodeStatus] = []
        #: Counts starts, so a wait can tell its cluster was restarted under it.
        self.generation = 0
        #: (generation, what the doctor found) once a death with no cause was looked into.
        self._refusal: tuple[int, Breakage | None] | None = None
        #: ``%%px`` waits on a cell (they judge a loss in the cell's words meanwhile).
        self.cells_waiting = 0
        #: While a start runs: None, or who asked it to stop (" from the status view").
        self._stop_asked: str | None = None
        self._started = threading.Event()
        #: A kept cluster's link to its runtime (None: the cluster runs in this process).
        self._link: attached.RuntimeLink | None = None
        self._sync_lock = threading.Lock()
        #: The runtime's last state and when it was read.
        self._life: tuple[dict[str, Any] | None, float] = (None, 0.0)
        #: The runtime's start our ipyparallel client is connected to.
        self._client_generation = -1
        self.cluster_id: str | None = None
        #: A farm's members and sweep (``farm=True``), while it runs.
        self._farm: Farm | None = None

    placement_from = staticmethod(spec.placement_from)

    # ----------------------------------------------------------------------- properties
    placement = property(lambda self: self.spec.placement, doc="Where the ranks run.")
    backend = property(lambda self: self.spec.backend, doc="MLX's distributed backend.")
    controller_ip = property(lambda self: self.spec.controller_ip)
    subnet = property(lambda self: self.spec.subnet)
    timeout = property(lambda self: self.spec.timeout)
    live_status = property(lambda self: self.spec.live_status)
    grace = property(
        lambda self: self.spec.grace,
        doc="Seconds of silence from every host the cluster waits out before it is lost.",
    )

    @property
    def n(self) -> int:
        """The number of ranks."""
        return self.spec.n

    @property
    def state(self) -> ClusterState:
        """``stopped``, ``starting``, ``running``, ``stopping`` or ``broken`` (see
        ``broken_reason``): a ``ClusterState``, equal to its name as a string."""
        return self._state

    @property
    def broken_reason(self) -> str | None:
        """Why the cluster broke and what to type (kept until the next start), else None."""
        broken = self._state == ClusterState.BROKEN and self._breakage is not None
        return self._breakage.line() if broken and self._breakage else None

    @property
    def health(self) -> Breakage | None:
        """Why the cluster broke, as data (``what``, ``advice``, ``cause``, ``hosts``,
        ``ranks``), while it is broken; else None."""
        return self._breakage if self._state == ClusterState.BROKEN else None

    @property
    def running(self) -> bool:
        return self._state == ClusterState.RUNNING

    @property
    def started_at(self) -> float | None:
        return None if self._run is None else self._run.started_at

    @property
    def client(self) -> ipp.Client:
        """The ipyparallel ``Client`` connected to this cluster's controller."""
        return self._require().client

    @property
    def view(self) -> Any:
        """A blocking ``DirectView`` on every rank, in rank order."""
        return self._require().view

    @property
    def ranks(self) -> list[dict[str, Any]]:
        """Per rank: host, pid, MPI and MLX rank and size, as checked at start."""
        return [] if self._run is None else list(self._run.ranks)

    def not_running_message(self) -> str:
        """Why there is nothing to run on, and what to type."""
        if self._state == ClusterState.BROKEN:
            return f"the MLX cluster is broken: {self.broken_reason}"
        if self._state == ClusterState.STARTING:
            return "the MLX cluster is still starting"
        if self.keep and self.cluster_id and self._reason:  # a kept cluster said why it ended
            return f"kept cluster {self.cluster_id} {self._reason}"
        return "no cluster is running: start one with %mlx_cluster start"

    def _require(self) -> bringup.Running:
        run = self._run
        if self._state != ClusterState.RUNNING or run is None or run.client is None:
            raise MLXClusterError(self.not_running_message())
        return run

    def __repr__(self) -> str:
        where = "local" if self.placement.is_local else f"{len(self.placement.hosts)} hosts"
        return f"<MLXCluster {self._state}: {self.n} ranks ({where}), backend={self.backend}>"

    # ----------------------------------------------------------------------- life cycle
    def start(self, activate: bool = False) -> MLXCluster:
        """Start the controller and the engines; return once every rank has a healthy MLX group.

        On any failure everything started so far is stopped before the error is raised.
        """
        with self._lock:
            if self._state in (ClusterState.RUNNING, ClusterState.STARTING):
                raise MLXClusterError(
                    "this cluster is already running: use restart() (%mlx_cluster restart) "
                    "or stop()"
                )
            self._state, self._reason, self._breakage = ClusterState.STARTING, None, None
            self.banner = None
            self.generation += 1
            generation = self.generation
            self._stop_asked = None
            started = self._started = threading.Event()
        try:
            # Outside the lock: a stop (the view's button, another thread) ends a start that
            # waits on a host, instead of waiting for it.
            try:
                self._start()
            except BaseException:
                self._end_start()
                if self._stop_asked is not None:
                    raise MLXClusterError(f"the start was stopped{self._stop_asked}") from None
                raise
            with self._lock:
                if self._stop_asked is not None:
                    self._end_start()
                    raise MLXClusterError(f"the start was stopped{self._stop_asked}")
                self._state = ClusterState.RUNNING
                self._history = []
                self._watch(generation)
        finally:
            started.set()
        if activate:
            self.activate()
        self._refresh_widget()
        return self

    def _end_start(self) -> None:
        """A start that failed or was stopped: nothing it started is left."""
        with self._lock:
            self._teardown()
            self._state = ClusterState.STOPPED
            if self._stop_asked is not None:
                self._reason = f"stopped{self._stop_asked}" if self._stop_asked else None

    def _go_on_starting(self) -> None:
        """Between the steps of a start: give up at once if a stop was asked meanwhile."""
        if self._stop_asked is not None:
            raise MLXClusterError(f"the start was stopped{self._stop_asked}")

    def _start(self) -> None:
        if self.keep:
            self._start_kept()
            return
        with self._lock:
            if self._run is not None:  # a stop that failed (the cluster is broken): finish it
                self._teardown()
            run = self._run = bringup.prepare(self.spec)
            _LIVE.add(self)
        # The controller gets ready (about 0.6 s) while the doctor checks the hosts over ssh.
        bringup.start_controller(run)
        self._go_on_starting()
        self._preflight()
        self._go_on_starting()
        generation = self.generation
        # ---- farm: independent engines, and a Mac lost is the farm's to handle (cluster.farm)
        if self.spec.farm:
            self._farm = Farm.start(run, self._farm_spec)
            self._farm.on_activity = self._farm_activity
            self._farm.tell()
            self._farm.watch_liveness(lambda lost: self._farm_lost(lost, generation))
        # ---- end farm
        else:
            bringup.bring_up(run)
            self._go_on_starting()
            bringup.watch_liveness(run, lambda lost: self.abort(lost, generation=generation))
        if run.status is not None:
            run.status.set_evidence(self._dead_evidence)
            run.status.on_update(self._refresh_widget)
        if self.spec.check_collectives:
            self._set_checks(run, True)

    def _preflight(self) -> None:
        """Before any rank is launched, the doctor's checks on every remote host; mpiexec itself
        would wait for a daemon that never comes."""
        if not all(h.is_local for h in self.placement.hosts):
            bringup.refuse_failed_hosts(
                self.doctor(timeout=10.0, backend=self.backend, advice=False)
            )
            warning = mpi_job.management_network_warning(
                self.placement, self.backend, self.spec.control
            )
            if warning:
                print(warning)

    def activate(self) -> None:
        """Point ``%%px``, ``%px``, ``%autopx`` and ``%pxresult`` at every rank of this cluster.

        They are ipyparallel's magics, with a wait that ends the cell when a rank dies, honours
        interrupts and ``%%px --timeout S``. They get a view of their own: ``%pxconfig
        --targets`` or ``--noblock`` changes what ``%px`` runs on, not ``cluster.view``.
        """
        from IPython import get_ipython

        from .px import MLXParallelMagics

        shell = get_ipython()
        set_current(self)
        if shell is not None:
            slots = self._farm.live_slots() if self._farm is not None else range(self.n)
            view = self.client[list(slots)]
            view.block = True
            shell.magics_manager.register(MLXParallelMagics(shell, view, self))

    # ------------------------------------------------------------------ faults
    def _dead_evidence(self) -> dict[int, str]:
        if self._state in (ClusterState.STOPPED, ClusterState.STOPPING):  # a stop kills them
            return {}
        if self._farm is not None:  # farm: only engines gone for good (their Mac lost, left)
            return self._farm.dead_evidence()
        return bringup.dead_evidence(self._run)

    def loss(self) -> Breakage | None:
        """A host no one can reach, a cable pulled between two hosts, or a host whose firewall
        killed the ranks at their first connection: what it is and what to type, else None."""
        if self._link is not None:
            return self._fresh("loss")  # type: ignore[no-any-return]
        run = self._run
        if run is None:
            return None
        lost = run.liveness.lost_ranks() if run.liveness is not None else {}
        if lost:
            first = min(lost)
            ranks = tuple(r for r in sorted(lost) if lost[r] == lost[first])
            return health.lost_host(lost[first], self.placement.ranks[first].ssh, ranks)
        cut = bringup.cut_cables(run)
        if cut:
            return health.cable_down(cut[0])
        return self._refusal_now()

    def _refusal_now(self) -> Breakage | None:
        """What the doctor found after a death with no cause, once the watch asked it."""
        found = self._refusal
        return found[1] if found is not None and found[0] == self.generation else None

    def refusal_pending(self) -> bool:
        """Ranks died with no word from mpiexec on several hosts and the doctor has not said
        yet whether a firewall killed them (a cell waits for it before it names the death)."""
        if self._link is not None:
            return self._remote("refusal_pending")  # type: ignore[no-any-return]
        if self.placement.is_local or not self._dead_evidence() or self.death_cause():
            return False
        return self._refusal is None or self._refusal[0] != self.generation

    def _look_for_refusal(self) -> None:
        """Ranks that died with no word from mpiexec on a cluster of several hosts: a host
        whose firewall turns Python away (turned on after start) kills the first connection
        to it. The doctor's inbound check names that host, not the rank that noticed; asked
        once per run, after a death, from the watch's thread (never from a cell's poll)."""
        if not self.refusal_pending():
            return
        found = None
        with contextlib.suppress(Exception):
            report = self.doctor(timeout=3.0, advice=False)
            found = next(
                (c for _, c in report.problems() if c.name == "inbound" and c.ok is False),
                None,
            )
        refusal = None
        if found is not None:
            fix = f"; fix: {found.fix}" if found.fix else ""
            refusal = Breakage(
                f"{found.detail}; the ranks died at their first connection to it",
                f"%mlx_cluster restart once it is allowed{fix}",
                "firewall",
            )
        self._refusal = (self.generation, refusal)

    def dead_ranks(self) -> list[int]:
        """Ranks known to be gone (never from silent status reports alone). When mpiexec ended
        the job because some ranks exited, those ranks (the cause), not every rank it took
        down with them."""
        if self._link is not None:
            return self._fresh("dead_ranks")  # type: ignore[no-any-return]
        dead = self._dead_evidence()
        run = self._run
        launcher = ipp_adapter.engine_launcher(run.ipp if run else None)
        first = [
            r
            for r in ipp_adapter.reported_ranks(ipp_adapter.launcher_output(launcher))
            if r in dead
        ]
        return first or sorted(dead)

    def death_cause(self) -> str:
        """What mpiexec reported about the rank that died first, if anything."""
        if self._link is not None:
            return self._remote("death_cause")  # type: ignore[no-any-return]
        run = self._run
        launcher = ipp_adapter.engine_launcher(run.ipp if run else None)
        return ipp_adapter.death_cause(ipp_adapter.launcher_output(launcher))

    def describe_ranks(self, ranks: Sequence[int]) -> str:
        """``rank 1 on mac2`` / ``ranks [0, 1] on vm``: for messages."""
        known = self.ranks
        hosts = [
            str(known[r]["host"]) if r < len(known) else self.placement.ranks[r].ssh for r in ranks
        ]
        where = ", ".join(dict.fromkeys(hosts))
        return (
            f"rank {ranks[0]} on {where}" if len(ranks) == 1 else f"ranks {list(ranks)} on {where}"
        )

    def abort(self, reason: str | Breakage = "aborted", *, generation: int | None = None) -> None:
        """Stop every process of a cluster that cannot go on, at once; ``state`` becomes
        ``broken`` with ``reason`` until the next start. Only a running cluster breaks (a
        watch that speaks late about a cluster stopped or restarted meanwhile is ignored):
        ``generation``, when given, must be the current one."""
        breakage = reason if isinstance(reason, Breakage) else Breakage(reason)
        if self._link is not None:
            self._remote("abort", breakage, generation=generation)
            self._sync_life()
            return
        with self._lock:
            if self._state != ClusterState.RUNNING or generation not in (None, self.generation):
                return
            dead = self._dead_evidence()
            run = self._run
            if run is not None and run.status is not None:
                with contextlib.suppress(Exception):
                    self.last_nodes = run.status.nodes()
            # Broken first (as a stop says stopped first): whoever looks meanwhile, a cell in
            # another thread or the view, reads the reason and the rows as they will stay, not
            # the ranks the teardown kills.
            self.last_nodes = _ended_rows(self.last_nodes, dead, breakage)
            self._state, self._breakage = ClusterState.BROKEN, breakage
            if run is not None:
                ipp_adapter.no_graceful_wait(run.ipp)
            # (a teardown that did not go through keeps its run: the next stop finishes it)
            with contextlib.suppress(Exception):
                self._teardown(grace=0.5)
            self.last_nodes = _ended_rows(self.last_nodes, dead, breakage)
        self._refresh_widget()

    # ------------------------------------------------------------------ the watch
    def _watch(self, generation: int) -> None:
        """Judge the evidence twice a second while no cell waits, so a rank that died or a
        host lost while idle breaks the cluster at once, not at the next cell."""
        stop = self._watch_stop = threading.Event()
        if self._link is not None:
            self._follow(stop)
            return

        def run() -> None:
            while not stop.wait(WATCH_PERIOD_S):
                if self.generation != generation or self._state != ClusterState.RUNNING:
                    return
                with contextlib.suppress(Exception):
                    self._look_for_refusal()
                if self.cells_waiting:
                    continue
                with contextlib.suppress(Exception):
                    found = self._evidence_breakage()
                    if found is not None:
                        self.abort(found, generation=generation)

        threading.Thread(target=run, name="mlx-cluster-watch", daemon=True).start()

    def judge(self) -> Breakage | None:
        """Break the cluster now if the evidence says it cannot go on; the reason, else None."""
        if self._link is not None:
            self._remote("judge")
            self._sync_life()
            return self.health
        found = self._evidence_breakage() if self._state == ClusterState.RUNNING else None
        if found is not None:
            self.abort(found)
        return self.health

    def _evidence_breakage(self) -> Breakage | None:
        """What the evidence says broke the cluster (a lost host, a cut cable, a rank gone,
        engines the controller unregistered), else None."""
        if self._farm is not None:  # farm: a lost Mac leaves the farm; the cluster goes on
            self._farm.refresh()
            return None
        dead = self._dead_evidence()
        loss = self.loss()
        if loss is not None:
            return loss
        if not dead:
            return None
        ranks = self.dead_ranks()
        what = self.describe_ranks(ranks)
        if all(dead[r] == bringup.HEART_LOST for r in ranks):
            return Breakage(
                f"the controller lost {what}: no heartbeat for longer than the grace",
                health.RESTART,
                "heartbeat",
                ranks=tuple(ranks),
            )
        cause = self.death_cause()
        return Breakage(f"{what} died{cause}", health.RESTART, "died", ranks=tuple(ranks))

    def stop(self, *, origin: str | None = None) -> None:
        """Stop engines and controller; return once no process of ours is left.

        A stopped cluster returns at once (closing twice is harmless, as for files and dask
        clusters); a broken one is cleared. Two threads stopping at once stop it once: the
        second waits for the first and returns.
        """
        if self._link is not None:
            self._stop_kept(origin)
            return
        with self._lock:
            if self._state == ClusterState.STOPPED:
                return
            starting = self._state == ClusterState.STARTING
            if not starting:
                # Stopping first: a %%px cell waiting in another thread then reports the stop,
                # not the errors of the ranks the teardown kills.
                self._state = ClusterState.STOPPING
                self._reason = f"stopped from {origin}" if origin else None
                self._refresh_widget()
                self._teardown_or_break()
                self._state = ClusterState.STOPPED
            else:
                self._stop_asked = f" from {origin}" if origin else ""
                run = self._run
        if starting:
            # A start under way in another thread: what it started so far is ended now (its
            # waits then fail at once), and it tears the rest down and says so.
            if run is not None:
                ipp_adapter.no_graceful_wait(run.ipp)
                processes.terminate(run.tracked)
            self._started.wait(STOP_A_START_S)
        self._refresh_widget()

    def close(self) -> None:
        """The same as ``stop()`` (the name dask's clusters and executors use)."""
        self.stop()

    def stopped_by(self) -> str | None:
        """Who stopped the cluster, when it was not a call in the cell itself."""
        stopped = (ClusterState.STOPPED, ClusterState.STOPPING)
        return self._reason if self._state in stopped else None

    def restart(
        self, activate: bool = False, replay: bool = False, without: Sequence[str] = ()
    ) -> MLXCluster:
        """Stop (if running) and start a fresh cluster of the same shape; with ``replay``, run
        the ``%%px`` cells that had completed (``history()``) again, in order. ``without``
        leaves those hosts out (a Mac that is gone): the ranks are renumbered on the others,
        and a pipeline plan is made again for them."""
        if self._link is not None:
            return self._restart_kept(activate, replay, without)
        with self._lock:  # (every field a restart changes, under the lock)
            history = list(self._history)
            if self._farm is not None:  # a farm restarts on the Macs that are in it now
                self.spec = self._farm.restart_spec()
            if without:
                self.spec = spec.without_hosts(self.spec, without, self.host_aliases())
            # The views say `restarting` (every rank `starting`) from now, not once the old
            # ranks are gone.
            self._restarting = True
        self._refresh_widget()
        try:
            with self._lock:
                # Stopped first, as in stop(): a %%px cell waiting in another thread then says
                # the cluster was restarted, not the errors of the ranks the teardown kills.
                self._state, self._reason = ClusterState.STOPPING, "restarted"
                if self._run is not None:
                    self._teardown_or_break()
                self._state = ClusterState.STOPPED
            self.start(activate=activate)
        finally:
            with self._lock:
                self._restarting = False
            self._refresh_widget()
        if without and self.pipeline_plan is not None:
            self._replan()
        if replay:
            self._replay(history)
        return self

    def host_aliases(self) -> dict[str, str]:
        """The hostname each host's ranks reported (what the views show) -> its name in the
        hostfile, for the hosts whose two names differ."""
        names = [str(r.get("host", "")) for r in self.ranks] or [n.host for n in self.last_nodes]
        return {
            shown: self.placement.ranks[rank].ssh
            for rank, shown in enumerate(names[: self.n])
            if shown and shown != self.placement.ranks[rank].ssh
        }

    def _teardown_or_break(self) -> None:
        """The teardown of a stop or restart; one that did not go through leaves the cluster
        broken with its run kept (not stopped while something may be left), so the next
        stop() tries again."""
        try:
            self._teardown()
        except BaseException as e:
            self._state = ClusterState.BROKEN
            self._breakage = Breakage(
                f"the stop did not finish ({e!r})", "%mlx_cluster stop tries again"
            )
            raise

    def _teardown(self, grace: float = 5.0) -> None:
        """Stop everything this cluster started; keep each rank's last record for the views.
        The run is forgotten only once its teardown went through (else it is done again)."""
        if self._watch_stop is not None:
            self._watch_stop.set()
        if self._link is not None:
            self._detach()
            return
        if self._farm is not None:
            self._farm.close()
            self._farm, self.activity = None, None
        run = self._run
        if run is None:
            _LIVE.discard(self)
            return
        self._keep_metrics_of(run)
        remains = bringup.tear_down(run, grace=grace)
        self._run = None
        _LIVE.discard(self)
        if remains is not None:
            self.last_nodes, self._last_recorders = remains.nodes, remains.recorders
        _REMOVE_AT_EXIT.add(run.profile_dir)  # ipyparallel may still write a late log

    # ----------------------------------------------------------------------- kept clusters
    @classmethod
    def attach(cls, cluster_id: str | None = None, activate: bool = False) -> MLXCluster:
        """The user's running kept cluster ``cluster_id`` (the only one, when None), from this
        kernel: the same engines with what they hold, its live view, ``%%px``, history."""
        record = attached.find(cluster_id)
        link = attached.RuntimeLink(record)
        try:
            cluster = cls.__new__(cls)
            cluster.spec = attached.seen_from_here(link.call("spec"), record)
            cluster._options, cluster.runtime_on = {}, record.runtime_on
            cluster._ask = link.call("ask")
            cluster.keep, cluster.idle_timeout = True, record.idle_timeout
            cluster._init_state()
            cluster._connect(link, record)
        except BaseException:
            link.close()
            raise
        if activate and cluster.running:
            cluster.activate()
        return cluster

    def _start_kept(self) -> None:
        """Start the cluster in a runtime of its own and attach this kernel to it."""
        ask = self._ask or attached.runtime_ask(
            self._options, runtime_on=self.runtime_on, idle_timeout=self.idle_timeout
        )
        record = attached.start_runtime(ask, ssh=self.spec.ssh, python=self.spec.python)
        self._ask = ask
        link = attached.RuntimeLink(record)
        try:
            self.spec = attached.seen_from_here(link.call("spec"), record)
            self._connect(link, record)
        except BaseException:
            with contextlib.suppress(Exception):
                link.call("stop", timeout=60)
            link.close()
            raise

    def _connect(self, link: attached.RuntimeLink, record: records.Record) -> None:
        """This kernel's client on the runtime's controller, and the runtime's state."""
        life = link.call("life")
        self._link, self.cluster_id = link, record.id
        run = None
        if life["state"] == "running":
            client, view = link.connect_client(life["connection"], life["n"])
            self._client_generation = life["generation"]
            status = attached.StatusProxy(link) if self.spec.live_status else None
            run = attached.AttachedRun(
                self.spec, client, view, list(life["ranks"]), life["started_at"], status
            )
        self._run = run  # type: ignore[assignment]
        self._apply_life(life)
        _LIVE.add(self)
        if self._state in (ClusterState.RUNNING, ClusterState.BROKEN):
            self._watch(self.generation)

    def _remote(self, method: str, *args: Any, **kwargs: Any) -> Any:
        link = self._link
        if link is None:
            raise MLXClusterError(self.not_running_message())
        return link.call(method, *args, **kwargs)

    def _fresh(self, method: str) -> Any:
        """What the runtime's last state said of ``method`` (a cell's wait asks it every few
        ms), asked anew once that is older than the follow thread's period."""
        life, at = self._life
        if life is not None and method in life and time.monotonic() - at < LIFE_FRESH_S:
            return life[method]
        return self._remote(method)

    def _apply_life(self, life: dict[str, Any]) -> None:
        """The runtime's state as this kernel's (``state``, reason, rows, generation)."""
        with self._lock:
            self._life = (life, time.monotonic())
            self._state = ClusterState(life["state"])
            self._reason, self._breakage = life["reason"], life["breakage"]
            self.banner, self.activity = life["banner"], life["activity"]
            self.generation = life["generation"]
            self._restarting = bool(life["restarting"])
            if life["last_nodes"]:
                self.last_nodes = list(life["last_nodes"])

    def _sync_life(self) -> dict[str, Any] | None:
        """Read the runtime's state once; follow a restart made from another notebook (a new
        controller: this kernel's client connects to it); let go once it ended."""
        with self._sync_lock:  # (the follow thread and a call in the cell)
            return self._sync_life_now()

    def _sync_life_now(self) -> dict[str, Any] | None:
        link = self._link
        if link is None:
            return None
        life: dict[str, Any] = link.call("life", timeout=10)
        run = self._run
        renewed = life["state"] == "running" and (
            run is None or life["generation"] != self._client_generation
        )
        if renewed and isinstance(run, attached.AttachedRun):
            with contextlib.suppress(Exception):
                run.client.close()
        if renewed:
            client, view = link.connect_client(life["connection"], life["n"])
            self._client_generation = life["generation"]
            self.spec = attached.seen_from_here(link.call("spec"), link.record)
            self._run = attached.AttachedRun(  # type: ignore[assignment]
                self.spec, client, view, list(life["ranks"]), life["started_at"],
                attached.StatusProxy(link) if self.spec.live_status else None,
            )
        self._apply_life(life)
        if life["state"] == "stopped" and not life["restarting"]:
            self._detach()
        return life

    def _follow(self, stop: threading.Event) -> None:
        """Twice a second: the runtime's state into this kernel's views; a runtime that no
        longer answers and whose process is gone ends the cluster here too."""

        def run() -> None:
            misses = 0
            while not stop.wait(WATCH_PERIOD_S) and self._link is not None:
                try:
                    if self._runtime_gone(misses):
                        self._runtime_died()
                    else:
                        self._sync_life()
                        misses = 0
                except Exception:
                    misses += 1  # (a runtime out of reach: its view keeps what it last said)
                self._refresh_widget()

        threading.Thread(target=run, name="mlx-cluster-follow", daemon=True).start()

    def _runtime_died(self) -> None:
        """The runtime's process is gone (killed): its watchdog stops every process it
        started, so the cluster is broken here, with what to type."""
        link = self._link
        if link is None:
            return
        record = link.record
        self._detach()
        self.last_nodes = _ended_rows(self.last_nodes, {}, Breakage("its runtime died"))
        self._state, self._breakage = ClusterState.BROKEN, Breakage(
            f"the cluster's runtime (pid {record.pid} on {record.host}) died; its watchdog "
            "stops every process it started",
            "%mlx_cluster stop, then %mlx_cluster start --keep starts a new one",
            "runtime",
        )

    def _runtime_gone(self, misses: int = 0) -> bool:
        """Evidence that the runtime ended: its process gone here; on another Mac, after calls
        that went unanswered, that Mac says so over ssh (silence alone is not death)."""
        link = self._link
        if link is None:
            return True
        if link.record.runtime_on is None:
            return not records.runtime_alive(link.record)
        return misses >= 3 and misses % 3 == 0 and link.gone_there()

    def _stop_kept(self, origin: str | None) -> None:
        """Stop a kept cluster for every notebook attached to it."""
        with self._lock:
            if self._link is None or self._state == ClusterState.STOPPED:
                return
            life = self._remote("stop", timeout=120)
            self._apply_life(life)
            self._state = ClusterState.STOPPED
            self._reason = f"stopped from {origin}" if origin else None
            record = self._link.record
            self._detach()
            if record.runtime_on is not None:
                records.remove_pointer(record.id)
            if record.runtime_on is None:  # stop returns once no process of ours is left
                deadline = time.monotonic() + attached.RUNTIME_EXIT_S
                while records.runtime_alive(record) and time.monotonic() < deadline:
                    time.sleep(0.02)
        self._refresh_widget()

    def _restart_kept(self, activate: bool, replay: bool, without: Sequence[str]) -> MLXCluster:
        self._restarting = True
        self._refresh_widget()
        try:
            self._remote("restart", timeout=600, replay=replay, without=list(without))
            self._sync_life()
        finally:
            self._restarting = False
            self._refresh_widget()
        if activate and self.running:
            self.activate()
        return self

    def detach(self) -> None:
        """Let go of a kept cluster without stopping it (``attach`` takes it up again)."""
        if self._link is None:
            raise MLXClusterError("this cluster is not kept: stop() ends it")
        self._state = ClusterState.STOPPED
        self._reason = "detached: %mlx_cluster attach takes it up again"
        self._detach()
        self._refresh_widget()

    def _detach(self) -> None:
        """This kernel's client and link go; the runtime and its cluster stay."""
        link, run = self._link, self._run
        self._link, self._run = None, None
        if self._watch_stop is not None:
            self._watch_stop.set()
        if isinstance(run, attached.AttachedRun):
            with contextlib.suppress(Exception):
                run.client.close()
        if link is not None:
            with contextlib.suppress(Exception):
                link.call("detach", timeout=1)
            link.close()
        _LIVE.discard(self)

    # ----------------------------------------------------------------------- context manager
    def __enter__(self) -> MLXCluster:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mpiexec_command(self) -> str:
        """The mpiexec command line the engines are started with (for logs and debugging)."""
        if self._link is not None:
            self._require()
            return self._remote("mpiexec_command")  # type: ignore[no-any-return]
        launcher = ipp_adapter.engine_launcher(self._require().ipp)
        if launcher is None:
            raise MLXClusterError("no cluster is running")
        return shlex.join(launcher.args)


def _ended_rows(
    nodes: Sequence[NodeStatus], dead: dict[int, str], breakage: Breakage
) -> list[NodeStatus]:
    """The rows of a cluster that broke: ranks that died stay dead; those the cluster stopped
    on purpose did not die by themselves."""
    return [
        dataclasses.replace(n, state="dead", why=dead[n.rank], silent_s=None)
        if n.rank in dead
        else dataclasses.replace(n, state="stopped", why=f"stopped: {breakage.what}", silent_s=None)
        for n in nodes
    ]


_LIVE: weakref.WeakSet[MLXCluster] = weakref.WeakSet()
#: The notebook's current cluster: the one ``%%px`` runs on and ``%mlx_cluster`` acts on, however
#: it was started (the magic, or ``MLXCluster(...).start(activate=True)``) or attached.
_CURRENT: list[MLXCluster] = []


def current() -> MLXCluster | None:
    """The notebook's current cluster (None before any start)."""
    return _CURRENT[0] if _CURRENT else None


def set_current(cluster: MLXCluster | None) -> None:
    _CURRENT[:] = [] if cluster is None else [cluster]
_REMOVE_AT_EXIT: set[str] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    """Kernel shutdown or restart: stop every cluster this process started."""
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster._teardown()
    for path in _REMOVE_AT_EXIT:
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["EXIT_BAD_GROUP", "HistoryEntry", "MLXCluster", "MLXClusterError", "Placement"]
