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
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ipyparallel as ipp

from ..contract import EXIT_BAD_GROUP
from ..errors import MLXClusterError
from ..fabric.placement import Placement
from ..launch import bringup, ipp_adapter, mpi_job, spec
from ..observe.snapshot import NodeStatus
from .displays import ClusterViews
from .tools import ClusterTools, HistoryEntry

if TYPE_CHECKING:
    from ..views.status_widget import StatusWidget
    from .pipeline_plan import PipelinePlan

START_TIMEOUT_S = spec.START_TIMEOUT_S


class MLXCluster(ClusterViews, ClusterTools):
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
    ) -> None:
        self.spec = spec.resolve(
            n, hosts=hosts, hostfile=hostfile, backend=backend, mpiexec=mpiexec,
            mpi_lib=mpi_lib, python=python, workdir=workdir, controller_ip=controller_ip,
            ring_port=ring_port, ssh=ssh, timeout=timeout, live_status=live_status,
            check_collectives=check_collectives, collective_timeout=collective_timeout,
            verbose=verbose, connections_per_ip=connections_per_ip, grace=grace,
        )  # fmt: skip
        self._lock = threading.RLock()
        self._state = "stopped"
        self._reason: str | None = None
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
        self._refusal: tuple[int, str | None] | None = None

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
    def state(self) -> str:
        """``stopped``, ``starting``, ``running`` or ``broken`` (see ``broken_reason``)."""
        return self._state

    @property
    def broken_reason(self) -> str | None:
        """Why the cluster broke (kept until the next start), else None."""
        return self._reason if self._state == "broken" else None

    @property
    def running(self) -> bool:
        return self._state == "running"

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
        if self._state == "broken":
            return f"the MLX cluster is broken: {self._reason}; %mlx_cluster restart brings it back"
        if self._state == "starting":
            return "the MLX cluster is still starting"
        return "no cluster is running: start one with %mlx_cluster start"

    def _require(self) -> bringup.Running:
        run = self._run
        if self._state != "running" or run is None or run.client is None:
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
            if self._state in ("running", "starting"):
                raise MLXClusterError(
                    "this cluster is already running: use restart() (%mlx_cluster restart) "
                    "or stop()"
                )
            self._state, self._reason, self.banner = "starting", None, None
            self.generation += 1
            try:
                self._start()
            except BaseException:
                self._teardown()
                self._state = "stopped"
                raise
            self._state = "running"
            self._history = []
        if activate:
            self.activate()
        self._refresh_widget()
        return self

    def _start(self) -> None:
        if self._run is not None:  # a stop that failed (the cluster is broken): finish it
            self._teardown()
        run = self._run = bringup.prepare(self.spec)
        _LIVE.add(self)
        # The controller gets ready (about 0.6 s) while the doctor checks the hosts over ssh.
        bringup.start_controller(run)
        self._preflight()
        bringup.bring_up(run)
        bringup.watch_liveness(run, self._lost)
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
        if shell is not None:
            view = self.client[list(range(self.n))]
            view.block = True
            shell.magics_manager.register(MLXParallelMagics(shell, view, self))

    # ------------------------------------------------------------------ faults
    def _dead_evidence(self) -> dict[int, str]:
        if self._state == "stopped":  # a stop under way kills them: not a death to show
            return {}
        return bringup.dead_evidence(self._run)

    def _lost(self, reason: str) -> None:
        """The grace ran out with hosts still silent (from the liveness keeper's thread)."""
        if self._state == "running":
            self.abort(reason)

    def lost_message(self) -> str | None:
        """One line when a host no one can reach, or a cable pulled between two hosts, keeps the
        running cell from finishing (it ends the cell), else None."""
        run = self._run
        if run is None:
            return None
        lost = run.liveness.lost_ranks() if run.liveness is not None else {}
        if lost:
            host = self.placement.ranks[min(lost)].ssh
            return (
                f"{lost[min(lost)]}; the cell ended and the cluster was stopped: "
                f"%mlx_cluster restart --without {host} starts on the others "
                "(restart alone, once it is back)"
            )
        cut = bringup.cut_cables(run)
        if cut:
            return (
                f"{cut[0]}: the cell's collectives cannot finish; the cluster was stopped: "
                "%mlx_cluster restart brings it back once the cable is back"
            )
        return self._refused_after_death()

    def _refused_after_death(self) -> str | None:
        """Ranks that died with no word from mpiexec on a cluster of several hosts: a host
        whose firewall turns Python away (turned on after start) kills the first connection
        to it. The doctor's inbound check names that host, not the rank that noticed; asked
        once per run, and only after a death."""
        if self.placement.is_local or not self._dead_evidence() or self.death_cause():
            return None
        if self._refusal is None or self._refusal[0] != self.generation:
            found = None
            with contextlib.suppress(MLXClusterError):
                report = self.doctor(timeout=3.0, advice=False)
                found = next(
                    (c for _, c in report.problems() if c.name == "inbound" and c.ok is False),
                    None,
                )
            self._refusal = (self.generation, None)
            if found is not None:
                fix = f"; fix: {found.fix}" if found.fix else ""
                self._refusal = (
                    self.generation,
                    f"{found.detail}; the ranks died at their first connection to it; the "
                    f"cluster was stopped: %mlx_cluster restart once it is allowed{fix}",
                )
        return self._refusal[1]

    def dead_ranks(self) -> list[int]:
        """Ranks known to be gone (never from silent status reports alone). When mpiexec ended
        the job because some ranks exited, those ranks (the cause), not every rank it took
        down with them."""
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

    def abort(self, reason: str = "aborted") -> None:
        """Stop every process of a cluster that cannot go on, at once; ``state`` becomes
        ``broken`` with ``reason`` until the next start."""
        with self._lock:
            run = self._run
            dead = self._dead_evidence()
            if run is not None:
                ipp_adapter.no_graceful_wait(run.ipp)
            self._teardown(grace=0.5)
            # Ranks that died stay dead; those the abort killed did not die by themselves.
            self.last_nodes = [
                dataclasses.replace(
                    n, state="dead", why=dead.get(n.rank) or "killed by the abort", silent_s=None
                )
                for n in self.last_nodes
            ]
            self._state, self._reason = "broken", reason
        self._refresh_widget()

    def stop(self, *, origin: str | None = None) -> None:
        """Stop engines and controller; return once no process of ours is left.

        A stopped cluster returns at once (closing twice is harmless, as for files and dask
        clusters); a broken one is cleared. Two threads stopping at once stop it once: the
        second waits for the first and returns.
        """
        with self._lock:
            if self._state == "stopped":
                return
            # Stopped first: a %%px cell waiting in another thread then reports the stop, not
            # the errors of the ranks the teardown kills.
            self._state = "stopped"
            self._reason = f"stopped from {origin}" if origin else None
            try:
                self._teardown()
            except BaseException as e:
                # Not stopped while something may be left: a second stop() tries again.
                self._state, self._reason = "broken", f"the stop did not finish ({e!r})"
                raise
        self._refresh_widget()

    def close(self) -> None:
        """The same as ``stop()`` (the name dask's clusters and executors use)."""
        self.stop()

    def stopped_by(self) -> str | None:
        """Who stopped the cluster, when it was not a call in the cell itself."""
        return self._reason if self._state == "stopped" else None

    def restart(
        self, activate: bool = False, replay: bool = False, without: Sequence[str] = ()
    ) -> MLXCluster:
        """Stop (if running) and start a fresh cluster of the same shape; with ``replay``, run
        the ``%%px`` cells that had completed (``history()``) again, in order. ``without``
        leaves those hosts out (a Mac that is gone): the ranks are renumbered on the others,
        and a pipeline plan is made again for them."""
        history = list(self._history)
        if without:
            self.spec = spec.without_hosts(self.spec, without)
        # The views say `restarting` (every rank `starting`) from now, not once the old ranks
        # are gone.
        self._restarting = True
        self._refresh_widget()
        try:
            with self._lock:
                # Stopped first, as in stop(): a %%px cell waiting in another thread then says
                # the cluster was restarted, not the errors of the ranks the teardown kills.
                self._state, self._reason = "stopped", "restarted"
                if self._run is not None:
                    try:
                        self._teardown()
                    except BaseException as e:
                        self._state, self._reason = "broken", f"the stop did not finish ({e!r})"
                        raise
            self.start(activate=activate)
        finally:
            self._restarting = False
            self._refresh_widget()
        if without and self.pipeline_plan is not None:
            self._replan()
        if replay:
            self._replay(history)
        return self

    def _teardown(self, grace: float = 5.0) -> None:
        """Stop everything this cluster started; keep each rank's last record for the views.
        The run is forgotten only once its teardown went through (else it is done again)."""
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

    # ----------------------------------------------------------------------- context manager
    def __enter__(self) -> MLXCluster:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mpiexec_command(self) -> str:
        """The mpiexec command line the engines are started with (for logs and debugging)."""
        launcher = ipp_adapter.engine_launcher(self._require().ipp)
        if launcher is None:
            raise MLXClusterError("no cluster is running")
        return shlex.join(launcher.args)


_LIVE: weakref.WeakSet[MLXCluster] = weakref.WeakSet()
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
