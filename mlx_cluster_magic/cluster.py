"""``MLXCluster``: the life cycle of one MLX cluster (controller + MPI-launched engines).

States: ``stopped`` -> ``starting`` -> ``running`` -> ``stopped``, or ``broken`` after an abort
(a rank died, a cell could not be interrupted), with the reason kept until the next start.
Every change happens under one lock. The pieces live elsewhere: options (checks before launch),
engines (the ipyparallel adapter), procs (tracking, reaping, the watchdog), status (live rank
records), views (widgets from snapshots), remote (broadcast).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shlex
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ipyparallel as ipp

from . import engines, launch, procs
from . import options as opts
from .engine import EXIT_BAD_GROUP
from .errors import MLXClusterError
from .gather import DEFAULT_LIMIT_BYTES, GatherResult, summarize_name
from .hosts import Placement
from .snapshot import ClusterSnapshot, NodeStatus
from .status import StatusReceiver

if TYPE_CHECKING:
    from .doctor import DoctorReport
    from .views.status import StatusWidget
    from .why import WhyReport

# The controller pings engines this often (ms) and unregisters one after this many misses:
# ipyparallel's heart answers from a ZMQ device thread that needs no GIL, so a lost engine
# means a gone process or a cut link, never a busy one. 200 ms x 10 misses: about 2 s.
HEARTBEAT_MS = 200
HEARTBEAT_MISSES = 10
START_TIMEOUT_S = opts.START_TIMEOUT_S
#: A cell blocked this long in collectives that other ranks have not reached shows a banner.
HANG_BANNER_S = 10.0
#: Metric points per series a snapshot carries to the views.
SNAPSHOT_POINTS = 2000

_ENGINE_NAMESPACE = (
    "import mlx.core as mx; from mlx_cluster_magic.engine import WORLD as world; "
    "from mlx_cluster_magic.sidecar import report"
)


@dataclass
class _Running:
    """What exists only while the cluster runs; ``_teardown`` consumes it."""

    ipp: ipp.Cluster
    profile_dir: str
    started_at: float
    status: StatusReceiver | None
    watchdog: procs.Watchdog | None = None
    client: ipp.Client | None = None
    view: Any = None
    ranks: list[dict[str, Any]] = field(default_factory=list)
    tracked: list[procs.Tracked] = field(default_factory=list)
    rank_procs: dict[int, procs.Tracked] = field(default_factory=dict)


@dataclass(frozen=True)
class HistoryEntry:
    """A ``%%px`` cell that completed on its ranks (replayed by ``restart(replay=True)``)."""

    cell: str
    targets: tuple[int, ...] | None = None


class MLXCluster:
    """An MLX cluster: ipyparallel engines under ``mpiexec`` with MLX's group ready on every rank.

    >>> cluster = MLXCluster(n=2).start()
    >>> cluster.view.execute("y = mx.distributed.all_sum(mx.ones(4))")
    >>> cluster.stop()

    Also a context manager: ``with MLXCluster(n=2) as cluster: ...``.
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
        ring_port: int = launch.DEFAULT_RING_PORT,
        ssh: str | None = None,
        timeout: float = START_TIMEOUT_S,
        live_status: bool = True,
        check_collectives: bool = False,
        collective_timeout: float = opts.COLLECTIVE_TIMEOUT_S,
        verbose: bool = False,
        connections_per_ip: int = 1,
    ) -> None:
        self.spec = opts.resolve(
            n, hosts=hosts, hostfile=hostfile, backend=backend, mpiexec=mpiexec,
            mpi_lib=mpi_lib, python=python, workdir=workdir, controller_ip=controller_ip,
            ring_port=ring_port, ssh=ssh, timeout=timeout, live_status=live_status,
            check_collectives=check_collectives, collective_timeout=collective_timeout,
            verbose=verbose, connections_per_ip=connections_per_ip,
        )  # fmt: skip
        self._lock = threading.RLock()
        self._state = "stopped"
        self._reason: str | None = None
        self._run: _Running | None = None
        self._widget: StatusWidget | None = None
        self._history: list[HistoryEntry] = []
        self._topology_svg: str | None = None
        self._last_recorders: list[dict[str, Any] | None] = []
        self.banner: str | None = None
        self.last_nodes: list[NodeStatus] = []
        #: Counts starts, so a wait can tell its cluster was restarted under it.
        self.generation = 0

    placement_from = staticmethod(opts.placement_from)

    # ----------------------------------------------------------------------- properties
    placement = property(lambda self: self.spec.placement, doc="Where the ranks run.")
    backend = property(lambda self: self.spec.backend, doc="MLX's distributed backend.")
    controller_ip = property(lambda self: self.spec.controller_ip)
    subnet = property(lambda self: self.spec.subnet)
    timeout = property(lambda self: self.spec.timeout)
    live_status = property(lambda self: self.spec.live_status)

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

    def _require(self) -> _Running:
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
        self._preflight()
        spec = self.spec
        profile = tempfile.mkdtemp(prefix=procs.PRIVATE_PREFIX)  # 0700
        for sub in ("security", "log", "startup", "pid"):
            os.makedirs(os.path.join(profile, sub), mode=0o700)
        cluster = engines.new_cluster(
            n=self.n,
            profile_dir=profile,
            controller_ip=spec.controller_ip,
            controller_args=[
                f"--HeartMonitor.period={HEARTBEAT_MS}",
                f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
            ],
            timeout=spec.timeout,
        )
        status = StatusReceiver(spec.controller_ip, spec.placement) if spec.live_status else None
        run = self._run = _Running(cluster, profile, time.time(), status)
        _LIVE.add(self)
        cluster.start_controller_sync()
        run.watchdog = procs.Watchdog(profile, self._track(engines.launcher_pids(cluster)))
        env = launch.backend_environment(
            spec.placement,
            spec.backend,
            libmpi=spec.mpi_lib,
            ring_port=spec.ring_port,
            connections_per_ip=spec.connections_per_ip,
            verbose=spec.verbose,
        )
        env.update(spec.placement.envs)
        if status is not None:
            env[launch.STATUS_VAR] = status.url
        mpi = launch.MPIOptions(
            forward=tuple(sorted(env)),
            prted=spec.prted,
            ssh_agent=spec.ssh,
            subnets=tuple(spec.subnet.split(",")) if spec.subnet else (),
            workdir=spec.workdir,
            as_root=os.geteuid() == 0,
            cpu_count=os.cpu_count() or 1,
        )
        cluster.start_engines_sync(
            n=self.n,
            mpi_cmd=[spec.mpiexec],
            mpi_args=launch.mpiexec_args(spec.placement, mpi),
            engine_cmd=[spec.python, "-m", "mlx_cluster_magic.engine"],
            engine_args=[
                f"--IPEngine.startup_command={_ENGINE_NAMESPACE}",
                # No sqlite history on the engines: a write per cell costs the %%px round trip.
                "--HistoryManager.enabled=False",
            ],
            environment=env,
        )
        run.watchdog.watch(self._track(engines.launcher_pids(cluster)))
        run.client = cluster.connect_client_sync()
        self._wait_for_engines(run)
        run.view = run.client[list(range(self.n))]
        run.view.block = True
        self._check_ranks(run)
        if status is not None:
            status.set_evidence(self._dead_evidence)
            status.on_update(self._refresh_widget)
        if spec.check_collectives:
            self._set_checks(run, True)

    def _preflight(self) -> None:
        """Before launching anything, the doctor's checks on every remote host; mpiexec itself
        would wait for a daemon that never comes. This names the host and the fix."""
        if all(h.is_local for h in self.placement.hosts):
            return
        report = self.doctor(timeout=10.0, backend=self.backend, advice=False)
        failures = [(host, c) for host, c in report.problems() if c.ok is False]
        if failures:
            host, check = failures[0]
            more = f" (and {len(failures) - 1} more problem(s): %mlx_cluster doctor)"
            fix = f"; fix: {check.fix}" if check.fix else ""
            raise MLXClusterError(
                f"{host}: {check.name}: {check.detail}{fix}{more if len(failures) > 1 else ''}"
            )

    def doctor(
        self, timeout: float = 10.0, backend: str | None = None, advice: bool = True
    ) -> DoctorReport:
        """Check every host is ready (ssh, python, versions, the MLX backend, mpiexec/prted,
        IP, MTU, routes) and advise a backend, as data (``advice=False`` skips the Mac
        discovery the advice needs)."""
        from .doctor import run_doctor

        return run_doctor(
            self.placement,
            python=self.spec.python,
            ssh=self.spec.ssh,
            timeout=timeout,
            backend=backend or self.backend,
            advice=advice,
        )

    def _track(self, pids: Sequence[int]) -> list[procs.Tracked]:
        """Track processes at spawn (with their start times), children included."""
        assert self._run is not None
        new = procs.track(pids)
        self._run.tracked += new
        return new

    def _wait_for_engines(self, run: _Running) -> None:
        """Wait for every rank to register, failing fast (with mpiexec's words) if it exits."""
        assert run.client is not None
        deadline = time.monotonic() + self.timeout
        launcher = engines.engine_launcher(run.ipp)
        while len(run.client.ids) < self.n:
            what = None
            if engines.launcher_exited(launcher):
                what = "mpiexec exited"
            elif time.monotonic() > deadline:
                missing = sorted(set(range(self.n)) - set(run.client.ids))
                what = f"rank(s) {missing} did not register within {self.timeout:g} s"
            if what:
                output = engines.launcher_output(launcher)
                raise MLXClusterError(engines.launch_failure(output, what))
            time.sleep(0.02)

    def _check_ranks(self, run: _Running) -> None:
        """Engine id == MPI rank == MLX rank, and every group spans all ranks."""
        from .engine import rank_report

        reports = run.view.apply_sync(rank_report)
        for engine_id, r in zip(run.view.targets, reports):
            if not (engine_id == r["mpi_rank"] == r["mlx_rank"]) or r["mlx_size"] != self.n:
                raise MLXClusterError(
                    f"engine {engine_id} on {r['host']} has MPI rank {r['mpi_rank']} and MLX rank "
                    f"{r['mlx_rank']} of {r['mlx_size']}; expected rank {engine_id} of {self.n}"
                )
        run.ranks = [dict(r, rank=i) for i, r in enumerate(reports)]
        local = [r for r in run.ranks if self.placement.is_local or self._rank_is_local(r)]
        for r in local:
            tracked = procs.Tracked.of(r["pid"])
            if tracked is not None:
                run.rank_procs[r["rank"]] = tracked
        # Each engine's kernel nanny (a child process) is ours to stop as well.
        assert run.watchdog is not None
        run.watchdog.watch(self._track([r["pid"] for r in local]))

    def _rank_is_local(self, report: dict[str, Any]) -> bool:
        return self.placement.ranks[report["mlx_rank"]].is_local

    def activate(self) -> None:
        """Point ``%%px``, ``%px``, ``%autopx`` and ``%pxresult`` at every rank of this cluster.

        They are ipyparallel's magics, with a wait that ends the cell when a rank dies, honours
        interrupts and ``%%px --timeout S``.
        """
        from IPython import get_ipython

        from .px import MLXParallelMagics

        shell = get_ipython()
        if shell is not None:
            shell.magics_manager.register(MLXParallelMagics(shell, self.view, self))

    # ------------------------------------------------------------------ faults
    def _dead_evidence(self) -> dict[int, str]:
        """Ranks whose process is known gone: mpiexec exited (Open MPI ends the whole job), a
        local pid vanished, or the controller's heartbeat lost the engine."""
        run = self._run
        if run is None:
            return {}
        if engines.launcher_exited(engines.engine_launcher(run.ipp)):
            return {r: "mpiexec exited" for r in range(self.n)}
        dead = {r: "process gone" for r, t in run.rank_procs.items() if not t.alive()}
        if run.client is not None and run.ranks:
            registered = set(run.client.ids)
            for r in range(self.n):
                if r not in registered:
                    dead.setdefault(r, "the controller's heartbeat lost it")
        return dead

    def dead_ranks(self) -> list[int]:
        """Ranks known to be gone (never from silent status reports alone)."""
        return sorted(self._dead_evidence())

    def death_cause(self) -> str:
        """What mpiexec reported about the rank that died first, if anything."""
        run = self._run
        launcher = engines.engine_launcher(run.ipp if run else None)
        return engines.death_cause(engines.launcher_output(launcher))

    def hang_verdict(self, threshold_s: float = 0.0) -> str | None:
        """One line naming the rank that is behind or the collective that differs, when the
        flight recorders disagree (ranks blocked for at least ``threshold_s``); else None."""
        from . import why as whymod

        return whymod.stuck(self._recorders(), threshold_s)

    def _recorders(self) -> list[dict[str, Any] | None]:
        """Each rank's latest flight-recorder summary (kept after a stop or an abort)."""
        run = self._run
        if run is not None and run.status is not None:
            return [run.status.latest(r, "recorder") for r in range(self.n)]
        return list(self._last_recorders) or [None] * self.n

    def why(self, stacks: bool = True, timeout: float = 2.0) -> WhyReport:
        """For every rank: blocked in which collective (sequence number, op, shape, line), the
        last collectives it issued, and its Python stack; a one-line verdict when they
        disagree. Works while a cell runs (nothing queues behind it) and after an abort."""
        from . import stacks as stackmod
        from . import why as whymod

        snaps, run = self._recorders(), self._run
        dumps = None
        if stacks and run is not None:
            targets: list[tuple[int, str, str | None] | None] = []
            for r, snap in enumerate(snaps):
                if not snap or not snap.get("stack_file"):
                    targets.append(None)
                    continue
                local = self.placement.is_local or self.placement.ranks[r].is_local
                host = None if local else self.placement.ranks[r].ssh
                targets.append((int(snap["pid"]), str(snap["stack_file"]), host))
            dumps = stackmod.capture_all(targets, ssh=self.spec.ssh, timeout=timeout)
        hosts = [str(r["host"]) for r in self.ranks] or [h.ssh for h in self.placement.ranks]
        return whymod.analyze(snaps, dumps, hosts)

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
                engines.no_graceful_wait(run.ipp)
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
        """Stop engines and controller; check that no process of ours is left.

        Stopping a stopped cluster says so (``MLXClusterError``); a broken one is cleared.
        """
        with self._lock:
            if self._state == "stopped":
                raise MLXClusterError("no cluster is running: nothing to stop")
            self._teardown()
            self._state = "stopped"
            self._reason = f"stopped from {origin}" if origin else None
        self._refresh_widget()

    def stopped_by(self) -> str | None:
        """Who stopped the cluster, when it was not a call in the cell itself."""
        return self._reason if self._state == "stopped" else None

    def restart(self, activate: bool = False, replay: bool = False) -> MLXCluster:
        """Stop (if running) and start a fresh cluster of the same shape; with ``replay``, run
        the ``%%px`` cells that had completed (``history()``) again, in order."""
        history = list(self._history)
        with self._lock:
            if self._run is not None:
                self._teardown()
            self._state = "stopped"
        self.start(activate=activate)
        if replay:
            self._replay(history)
        return self

    def _replay(self, history: list[HistoryEntry]) -> None:
        for i, entry in enumerate(history, 1):
            view = self.view if entry.targets is None else self.client[list(entry.targets)]
            try:
                view.execute(entry.cell, block=True)
            except Exception as e:
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise MLXClusterError(
                    f"replay stopped at cell {i} of {len(history)}: {first}"
                ) from None
            self._history.append(entry)

    def record_cell(self, cell: str, targets: Sequence[int] | None = None) -> None:
        """Remember a cell that completed (``%%px`` calls this; ``--no-replay`` skips it)."""
        full = targets is None or sorted(targets) == list(range(self.n))
        self._history.append(HistoryEntry(cell, None if full else tuple(targets or ())))

    def history(self) -> list[HistoryEntry]:
        """The ``%%px`` cells that completed since the cluster started, in order."""
        return list(self._history)

    def _teardown(self, grace: float = 5.0) -> None:
        """Stop everything this cluster started, by the pids tracked at spawn."""
        run, self._run = self._run, None
        _LIVE.discard(self)
        if run is None:
            return
        if run.status is not None:
            self._last_recorders = [run.status.latest(r, "recorder") for r in range(self.n)]
            self.last_nodes = [
                dataclasses.replace(n, state="stopped", silent_s=None) if n.state != "dead" else n
                for n in run.status.nodes()
            ]
            run.status.close()
        if run.client is not None:
            with contextlib.suppress(Exception):
                run.client.close()
        engines.stop(run.ipp)
        procs.reap(run.tracked, grace=grace)
        if run.watchdog is not None:
            run.watchdog.close()
        shutil.rmtree(run.profile_dir, ignore_errors=True)
        _REMOVE_AT_EXIT.add(run.profile_dir)  # ipyparallel may still write a late log

    # ----------------------------------------------------------------------- views
    def nodes(self) -> list[dict[str, Any]]:
        """Per rank: rank, host, state (starting/idle/busy/unresponsive/dead/stopped), busy_s,
        last_seen_s, silent_s, rss_bytes, mlx_active_bytes, mlx_peak_bytes, device, pid, why."""
        return [n.as_dict() for n in self._node_records()]

    def _node_records(self) -> list[NodeStatus]:
        run = self._run
        if run is None or run.status is None:
            if run is None:
                return self.last_nodes
            raise MLXClusterError("live status is off for this cluster (started with --no-status)")
        self.last_nodes = run.status.nodes()
        return self.last_nodes

    def metrics(self) -> Any:
        """Every number the ranks passed to ``report()``: records (rank, name, value, step,
        time), as a pandas DataFrame when pandas is installed."""
        run = self._require()
        points = [] if run.status is None else run.status.metrics()
        records = [p.as_dict() for p in points]
        try:
            import pandas as pd
        except ImportError:
            return records
        return pd.DataFrame(records, columns=["rank", "name", "value", "step", "time"])

    def snapshot(self) -> ClusterSnapshot:
        """The plain data every view renders."""
        run = self._run
        nodes = self.last_nodes if run is None or run.status is None else self._node_records()
        points = () if run is None or run.status is None else run.status.metrics(SNAPSHOT_POINTS)
        return ClusterSnapshot(
            state=self._state,
            backend=self.backend,
            n=self.n,
            hosts=len({h.ssh for h in self.placement.hosts}),
            uptime_s=None if run is None else time.time() - run.started_at,
            nodes=tuple(nodes),
            reason=self._reason,
            banner=self.banner,
            metrics=tuple(points),
            topology_svg=self._topology_svg,
        )

    def status_view(self) -> StatusWidget:
        """The live status widget; cached, so every display shows the same live object."""
        if self._widget is None:
            from .views.status import StatusWidget

            self._widget = StatusWidget(
                on_stop=lambda: self._stop_from_view(),
                on_restart=lambda replay: self.restart(activate=True, replay=replay),
                on_side=lambda: self.open_side_panel(),
            )
            self._widget.update(self.snapshot())
        return self._widget

    def _stop_from_view(self) -> None:
        if self._run is not None:
            self.stop(origin="the status view")

    def open_side_panel(self) -> str:
        """Show the live status in a JupyterLab side panel (inline elsewhere)."""
        from .views.side import open_side_panel

        return open_side_panel(self.status_view())

    def _refresh_widget(self) -> None:
        """Called about twice a second by the status thread (and on every change)."""
        if self._run is not None:
            with contextlib.suppress(Exception):
                verdict = self.hang_verdict(threshold_s=HANG_BANNER_S)
                self.banner = f"the cell may be hung: {verdict}" if verdict else None
        if self._widget is not None:
            with contextlib.suppress(Exception):
                self._widget.update(self.snapshot())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from .views.text import snapshot_html, snapshot_text

        snap = self.snapshot()
        bundle = {"text/plain": snapshot_text(snap), "text/html": snapshot_html(snap)}
        if self.running and self.live_status:
            widget = self.status_view()._repr_mimebundle_(include=include, exclude=exclude)
            data = widget[0] if isinstance(widget, tuple) else widget
            bundle.update({k: v for k, v in (data or {}).items() if k != "text/plain"})
        return bundle

    # ----------------------------------------------------------------------- data
    def gather(self, name: str, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> GatherResult:
        """Fetch ``name`` from every rank: ``.values`` by rank, ``.agree``, ``.diverged``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise MLXClusterError(f"gather takes a variable name, got {name!r}")
        summaries = self.view.apply_sync(summarize_name, name, limit_bytes)
        missing = [r for r, s in enumerate(summaries) if s.kind == "missing"]
        if missing:
            raise MLXClusterError(f"{name!r} is not defined on rank(s) {missing}")
        hosts = [r["host"] for r in self.ranks] or [h.ssh for h in self.placement.ranks]
        return GatherResult(name, list(summaries), hosts)

    def broadcast(self, name: str, value: Any, root: int = 0) -> None:
        """Send ``value`` (a large NumPy or MLX array) from the notebook to every rank as
        variable ``name``: streamed once to ``root`` over one TCP connection, then passed on
        with MPI's broadcast as it arrives (``view.push`` sends a copy per engine instead)."""
        from .remote import send_broadcast

        if not 0 <= root < self.n:
            raise MLXClusterError(f"root must be a rank from 0 to {self.n - 1}, got {root}")
        ip = launch.head_reach_address(
            self.placement, root, self.spec.control, dict(self.spec.peers)
        )
        send_broadcast(self.client, self.view, name, value, root=root, ip=ip)

    def links(self, timeout: float = 10.0, seconds: float | None = None) -> Any:
        """Measure every pair of hosts: MLX send/recv latency and bandwidth in the cluster's
        group, raw TCP on the same addresses, each beside its expected rate and flagged when far
        below; with the backend the hosts support (``LinkReport``, shown as a matrix, a heatmap
        and the topology picture, also in the status view's Topology tab)."""
        from . import links

        self._require()
        advice = None
        if not self.placement.is_local:
            with contextlib.suppress(Exception):
                advice = self.doctor(timeout=timeout, backend=self.backend).advice
        report = links.measure(
            self.view,
            self.placement,
            self.ranks,
            timeout=timeout,
            backend=self.backend,
            seconds=seconds,
            advise=(lambda _r: str(advice)) if advice is not None else None,
        )
        self._topology_svg = report.picture
        self._refresh_widget()
        return report

    def _set_checks(self, run: _Running, on: bool) -> None:
        run.view.execute(
            "from mlx_cluster_magic import checks as _mcm_checks\n"
            + (
                f"_mcm_checks.enable(timeout={self.spec.collective_timeout!r})"
                if on
                else "_mcm_checks.disable()"
            ),
            block=True,
        )

    def check_collectives(self, on: bool = True) -> None:
        """Compare every collective's signature across the ranks before MLX runs it."""
        self._set_checks(self._require(), on)
        self.spec = dataclasses.replace(self.spec, check_collectives=on)

    # ----------------------------------------------------------------------- context manager
    def __enter__(self) -> MLXCluster:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._run is not None:
                self._teardown()
            self._state = "stopped"

    def mpiexec_command(self) -> str:
        """The mpiexec command line the engines are started with (for logs and debugging)."""
        launcher = engines.engine_launcher(self._require().ipp)
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
