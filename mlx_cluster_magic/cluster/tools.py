"""What a person does with a running cluster besides running cells: gather and broadcast data,
sync files to every host, ask why a cell hangs, switch checked collectives, measure the links,
run the doctor, plan a model's pipeline split by memory, and the history that
``restart(replay=True)`` runs again. Mixed into ``MLXCluster``; each method delegates to its own
module."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MLXClusterError
from ..launch import mpi_job
from ..rank.gather_summary import DEFAULT_LIMIT_BYTES, summarize_name
from ..views.gather_view import GatherResult

if TYPE_CHECKING:
    from ..fabric.doctor import DoctorReport
    from ..fabric.placement import Placement
    from ..launch.spec import ClusterSpec
    from ..observe.hang_verdict import WhyReport
    from .attached import Run as Running
    from .pipeline_plan import PipelinePlan


#: The comment line ``%%px`` sends before a cell (``px.CELL_HEADER`` and its magic line), so
#: the ranks number lines as the editor does: kept out of ``cell``, sent again on replay.
_PX_HEADER = re.compile(r"# %%px(?: [^\n]*)?\n")


@dataclass(frozen=True)
class HistoryEntry:
    """A ``%%px`` cell that completed on its ranks (replayed by ``restart(replay=True)``):
    ``cell`` as the user wrote it, ``header`` the ``%%px`` line's comment sent before it."""

    cell: str
    targets: tuple[int, ...] | None = None
    header: str = ""

    @property
    def code(self) -> str:
        """What the ranks ran (and run again on replay), line numbers as in the editor."""
        return self.header + self.cell


class ClusterTools:
    """Data, diagnostics and history of an ``MLXCluster``."""

    # provided by MLXCluster
    _run: Running | None
    _link: Any
    _remote: Callable[..., Any]
    _lock: Any
    pipeline_plan: PipelinePlan | None
    _history: list[HistoryEntry]
    _last_recorders: list[dict[str, Any] | None]
    _topology_svg: str | None
    #: What the last ``plan_pipeline`` was asked (model, memory caps, headroom), to plan again.
    _plan_asked: tuple[str, dict[Any, Any], float | int | str] | None = None
    spec: ClusterSpec
    placement: Placement
    backend: str
    n: int
    running: bool
    ranks: list[dict[str, Any]]
    view: Any
    client: Any
    _require: Callable[[], Running]
    _refresh_widget: Callable[[], None]

    def doctor(
        self, timeout: float = 10.0, backend: str | None = None, advice: bool = True,
        python: str | None = None, ssh: str | None = None,
    ) -> DoctorReport:  # fmt: skip
        """Check every host is ready (ssh, python, versions, the MLX backend, mpiexec/prted,
        IP, MTU, routes) and advise a backend, as data (``advice=False`` skips the Mac
        discovery the advice needs); ``python`` and ``ssh`` in place of the cluster's."""
        from ..fabric.doctor import run_doctor

        return run_doctor(
            self.placement,
            python=python or self.spec.python,
            ssh=ssh or self.spec.ssh,
            timeout=timeout,
            backend=backend or self.backend,
            advice=advice,
            networks=self.spec.subnet.split(",") if self.spec.subnet else None,
            addresses=dict(self.spec.peers),
            head_address=self.spec.controller_ip,
        )

    def setup(
        self, check: bool = False, verify: bool = False, progress: bool = True,
        ssh: str | None = None,
    ) -> Any:  # fmt: skip
        """Make every host's Python environment this kernel's (``%mlx_cluster setup``): what
        differs is copied, extra files removed, then a table of what each host runs."""
        from .environment import setup

        return setup(
            on=self.placement.hosts,
            ssh=ssh or self.spec.ssh,
            check=check,
            verify=verify,
            progress=progress,
        )

    def hang_verdict(self, threshold_s: float = 0.0) -> str | None:
        """One line naming the rank that is behind or the collective that differs, when the
        flight recorders disagree (ranks blocked for at least ``threshold_s``); else None."""
        from ..observe import hang_verdict

        if self._link is not None:
            return self._remote("hang_verdict", threshold_s)  # type: ignore[no-any-return]
        return hang_verdict.stuck(self._recorders(), threshold_s)

    def waits_on_ended(self, pending: Sequence[int]) -> bool:
        """Whether the ranks in ``pending`` all wait inside a collective for ranks done with
        the cell (``why.waits_on_ended`` on the latest status records)."""
        from ..observe import hang_verdict

        if self._link is not None:
            return bool(self._remote("waits_on_ended", list(pending)))
        return hang_verdict.waits_on_ended(self._recorders(), pending)

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
        from ..observe import hang_verdict, stack_capture

        if self._link is not None:  # the runtime signals and reads the ranks (its own, or ssh)
            return self._remote("why", stacks, timeout, timeout=timeout + 30)  # type: ignore[no-any-return]
        snaps, run = self._recorders(), self._run
        dumps = None
        if stacks and run is not None:
            targets = self._stack_targets(run)
            dumps = stack_capture.capture_all(targets, ssh=self.spec.ssh, timeout=timeout)
        hosts = [str(r["host"]) for r in self.ranks] or [h.ssh for h in self.placement.ranks]
        return hang_verdict.analyze(snaps, dumps, hosts)

    def _stack_targets(self, run: Running) -> list[tuple[int, str, str | None] | None]:
        """Each rank's (pid, stack file, host or None when local) to signal and read: as the
        rank itself answered at start over ipyparallel's signed channel (``run.ranks``), never
        from a status record, which anyone who saw the token can forge. A local rank whose
        tracked process is gone (its pid may be another's now) is skipped."""
        targets: list[tuple[int, str, str | None] | None] = []
        for r, known in enumerate(run.ranks):
            pid, path = known.get("pid"), known.get("stack_file")
            local = self.placement.is_local or self.placement.ranks[r].is_local
            tracked = run.rank_procs.get(r)
            if not (isinstance(pid, int) and isinstance(path, str) and path) or (
                local and (tracked is None or tracked.pid != pid or not tracked.alive())
            ):
                targets.append(None)
                continue
            targets.append((pid, path, None if local else self.placement.ranks[r].ssh))
        return targets

    def dropped_status(self) -> dict[str, int]:
        """Status messages this run's receiver dropped, by reason (``token``, ``size``,
        ``nesting``, ``json``, ``field``, ``rank``, ``host``, ``requests``, ``error``): junk
        or forgery on the status port shows here; empty without live status."""
        run = self._run
        return {} if run is None or run.status is None else run.status.dropped_reasons()

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
        from .broadcast_sender import send_broadcast

        if not 0 <= root < self.n:
            raise MLXClusterError(f"root must be a rank from 0 to {self.n - 1}, got {root}")
        ip = mpi_job.head_reach_address(
            self.placement, root, self.spec.control, dict(self.spec.peers)
        )
        send_broadcast(self.client, self.view, name, value, root=root, ip=ip)

    def sync(
        self,
        path: str,
        dest: str | None = None,
        *,
        shards: str | None = None,
        verify: bool = False,
        progress: bool = True,
    ) -> Any:
        """Copy a file or directory tree from the notebook's machine to every host of the
        cluster, at the same absolute path (or ``dest``), over the cables: only what is missing
        or changed (size and time; ``verify``: a checksum computed on each host), under
        temporary names until complete, modes and symlinks kept. ``shards="pipeline"`` sends
        each host of an mlx-lm model only the weight files its ranks load (``"tensor"``: all).
        Returns a ``SyncReport``."""
        from .sync_sender import run_sync

        self._require()
        return run_sync(self, path, dest, shards=shards, verify=verify, progress=progress)

    def links(self, timeout: float = 10.0, seconds: float | None = None) -> Any:
        """Measure every pair of hosts: MLX send/recv latency and bandwidth in the cluster's
        group, raw TCP on the same addresses, each beside its expected rate and flagged when far
        below; with the backend the hosts support (``LinkReport``, shown as a matrix, a heatmap
        and the topology picture, also in the status view's Topology tab)."""
        from ..fabric import links

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

    def plan_pipeline(
        self,
        model_dir: str,
        memory: Mapping[Any, Any] | None = None,
        headroom: float | int | str = 0.1,
    ) -> PipelinePlan:
        """Which layers of the model in ``model_dir`` each rank should hold so that its weights
        plus ``headroom`` fit its memory, in proportion to what each can hold (rank 0 the last
        layers, as mlx-lm). Memory: what every rank reports (MLX's working set on Apple
        silicon, else the machine's; a memory cgroup's limit when lower), capped by ``memory``:
        ``{"mac1": "64GB", "rank1": 8 * 2**30}`` (a host as the hostfile names it, shared by
        its ranks; or one rank), and by a host's ``"memory"`` in the hostfile. ``headroom``: a
        fraction of each rank's memory or bytes per rank. Without a running cluster, ``memory``
        (or the hostfile) must give every rank. Load it on the ranks with
        ``mlx_cluster_magic.rank.lm.pipeline_load(model_dir, plan)`` (push the plan first).
        """
        from ..rank.lm import rank_memory
        from . import pipeline_plan

        hosts = [h.ssh for h in self.placement.ranks]
        reports = None
        if self._run is not None and self.running:
            reports = self.view.apply_sync(rank_memory)
        elif not memory and not any(h.memory for h in self.placement.hosts):
            self._require()  # says the cluster is not running
        # the hostfile's "memory" per host, unless memory= names that host (or a rank) again
        caps: dict[Any, Any] = {h.ssh: h.memory for h in self.placement.hosts if h.memory}
        caps.update(memory or {})
        plan = pipeline_plan.plan_pipeline(model_dir, hosts, reports, caps or None, headroom)
        self.pipeline_plan = plan
        self._plan_asked = (model_dir, dict(memory or {}), headroom)
        return plan

    def _replan(self) -> None:
        """Plan the pipeline again for the ranks a restart left (``restart --without``); caps
        given per rank are dropped (the ranks are numbered anew), per host kept."""
        old = self.pipeline_plan
        asked = self._plan_asked
        if old is None or asked is None:
            return
        model_dir, memory, headroom = asked
        hosts = {h.ssh for h in self.placement.hosts}
        kept = {k: v for k, v in memory.items() if k in hosts}
        plan = self.plan_pipeline(model_dir, kept or None, headroom)
        self.pipeline_plan = dataclasses.replace(
            plan,
            note=f"planned again for the {len(plan.ranks)} ranks left, was {len(old.ranks)}",
        )

    def _set_checks(self, run: Running, on: bool) -> None:
        run.view.execute(
            "from mlx_cluster_magic.rank import collective_checks as _mcm_checks\n"
            + (
                f"_mcm_checks.enable(timeout={self.spec.collective_timeout!r})"
                if on
                else "_mcm_checks.disable()"
            ),
            block=True,
        )

    def check_collectives(self, on: bool = True) -> None:
        """Compare every collective's signature across the ranks before MLX runs it."""
        if self._link is not None:  # the runtime sets them, and keeps them over a restart
            self._require()
            self._remote("check_collectives", on)
        else:
            self._set_checks(self._require(), on)
        with self._lock:
            self.spec = dataclasses.replace(self.spec, check_collectives=on)

    def _replay(self, history: list[HistoryEntry]) -> None:
        for i, entry in enumerate(history, 1):
            view = self.view if entry.targets is None else self.client[list(entry.targets)]
            try:
                view.execute(entry.code, block=True)
            except Exception as e:
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise MLXClusterError(
                    f"replay stopped at cell {i} of {len(history)}: {first}"
                ) from None
            self._history.append(entry)

    def record_cell(self, cell: str, targets: Sequence[int] | None = None) -> None:
        """Remember a cell that completed (``%%px`` calls this as each completes, from any
        thread; ``--no-replay`` skips it)."""
        if self._link is not None:  # (sent, not waited for: the runtime keeps the order)
            self._link.notify("record_cell", cell, None if targets is None else list(targets))
            return
        full = targets is None or sorted(targets) == list(range(self.n))
        m = _PX_HEADER.match(cell)
        header, cell = (m.group(0), cell[m.end() :]) if m else ("", cell)
        self._history.append(HistoryEntry(cell, None if full else tuple(targets or ()), header))

    def history(self) -> list[HistoryEntry]:
        """The ``%%px`` cells that completed since the cluster started, in the order they
        completed (blocking or ``--noblock``)."""
        if self._link is not None:
            return list(self._remote("history"))
        return list(self._history)


def doctor_hosts(
    n: int | None, *, hosts: str | None, hostfile: str | None, python: str | None,
    ssh: str | None, timeout: float, backend: str | None,
) -> DoctorReport:  # fmt: skip
    """The doctor on hosts no cluster runs on yet, checking the networks a start would pin MPI
    to (so it tests what a start needs)."""
    from ..fabric.doctor import run_doctor
    from ..launch.spec import data_plane, placement_from

    placement = placement_from(n, hosts=hosts, hostfile=hostfile)
    networks: list[str] | None = None
    addresses: dict[str, str] = {}
    head: str | None = None
    if not placement.is_local:
        with contextlib.suppress(MLXClusterError):
            control, addresses, networks = data_plane(placement, ssh)
            head = control.address
    return run_doctor(
        placement, python=python, ssh=ssh, timeout=timeout,
        backend=backend or placement.backend, networks=networks, addresses=addresses,
        head_address=head,
    )  # fmt: skip

