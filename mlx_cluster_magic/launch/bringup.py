"""One run of a cluster: what exists from start to stop, how it is brought up, how a dead rank
is known, and how it is torn down. ``MLXCluster`` owns the state machine around it; this module
owns the steps, in order, and needs no IPython shell.

Bring-up: a private profile directory, the controller (with a fast heartbeat), the watchdog, the
engines under ``mpiexec`` with MLX's backend environment, then every rank checked. Every process
is tracked at spawn, so teardown never looks one up by pid.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ipyparallel as ipp
import psutil

from ..contract import SECRETS_FILE_VAR
from ..errors import MLXClusterError
from ..observe.health import Breakage
from ..observe.liveness import LivenessKeeper
from ..observe.snapshot import NodeStatus
from ..observe.status_receiver import StatusReceiver
from . import host_secrets, ipp_adapter, mpi_job, processes
from .spec import ClusterSpec

if TYPE_CHECKING:
    from ..fabric.doctor import DoctorReport

# The controller pings engines this often (ms). The period paces registration: the hub admits
# an engine at the beat after its first answer, so a start waits up to two periods for every
# rank (at ipyparallel's 3 s default, 6 s).
HEARTBEAT_MS = 50
# Both ends of ipyparallel's heartbeat give up for good (the hub unregisters the engine, the
# engine exits) after a number of missed beats; silence is not death, so both wait out the
# grace and this much more: the head's own liveness keeper decides first, on evidence.
HEARTBEAT_SLACK_S = 10.0
# An engine checks for the controller's pings every period + 500 ms (ipyparallel's
# ``engine/app.py``: ``hb_check_period = hb_period + 500``).
ENGINE_CHECK_MS = HEARTBEAT_MS + 500


def heartbeat_misses(grace: float) -> tuple[int, int]:
    """(the controller's, each engine's) missed beats that outlast ``grace`` seconds."""
    patience_ms = (grace + HEARTBEAT_SLACK_S) * 1000
    return math.ceil(patience_ms / HEARTBEAT_MS), math.ceil(patience_ms / ENGINE_CHECK_MS)


ENGINE_NAMESPACE = (
    "import mlx.core as mx; from mlx_cluster_magic.rank.bootstrap import WORLD as world; "
    "from mlx_cluster_magic import report"
)


@dataclass
class Running:
    """What exists only while the cluster runs; ``tear_down`` consumes it."""

    spec: ClusterSpec
    ipp: ipp.Cluster
    profile_dir: str
    started_at: float
    status: StatusReceiver | None
    watchdog: processes.Watchdog | None = None
    client: ipp.Client | None = None
    view: Any = None
    ranks: list[dict[str, Any]] = field(default_factory=list)
    tracked: list[processes.Tracked] = field(default_factory=list)
    rank_procs: dict[int, processes.Tracked] = field(default_factory=dict)
    liveness: LivenessKeeper | None = None
    #: The run's private folder on the hosts (relative to home), once written over ssh.
    host_secrets_dir: str | None = None

    @property
    def n(self) -> int:
        return self.spec.n

    def track(self, pids: Sequence[int]) -> list[processes.Tracked]:
        """Track processes at spawn (with their start times), children included."""
        new = processes.track(pids)
        self.tracked += new
        return new


def prepare(spec: ClusterSpec) -> Running:
    """The private profile directory (0700), the ipyparallel cluster object and the status
    receiver: nothing is running yet, but ``tear_down`` already knows what to remove."""
    profile = tempfile.mkdtemp(prefix=processes.PRIVATE_PREFIX)
    for sub in ("security", "log", "startup", "pid"):
        os.makedirs(os.path.join(profile, sub), mode=0o700)
    misses, _ = heartbeat_misses(spec.grace)
    cluster = ipp_adapter.new_cluster(
        n=spec.n,
        profile_dir=profile,
        controller_ip=spec.controller_ip,
        controller_args=[
            f"--HeartMonitor.period={HEARTBEAT_MS}",
            f"--HeartMonitor.max_heartmonitor_misses={misses}",
        ],
        timeout=spec.timeout,
        curve=spec.encrypt,
    )
    status = StatusReceiver(spec.controller_ip, spec.placement) if spec.live_status else None
    return Running(spec, cluster, profile, time.time(), status)


def refuse_failed_hosts(report: DoctorReport) -> None:
    """Raise, naming the host, the check and its fix, when the doctor found a host unready;
    when every host is ready but some cannot reach the peers they must send to, name every
    such pair in one line with the fix that fits the cabling."""
    failures = [(host, c) for host, c in report.problems() if c.ok is False]
    if not failures:
        return
    others = [(host, c) for host, c in failures if c.name != "peers"]
    if not others:
        pairs = "; ".join(c.detail for _, c in failures)
        fix = f"; fix: {failures[0][1].fix}" if failures[0][1].fix else ""
        raise MLXClusterError(f"no path between hosts: {pairs}{fix}")
    host, check = others[0]
    # The same check failing elsewhere (python missing on every new Mac) is named at once.
    alike = [h for h, c in others[1:] if c.name == check.name and h != host]
    same = f"; the same on {', '.join(alike)}" if alike else ""
    fix = f"; fix: {check.fix}" if check.fix else ""
    left = len(failures) - 1 - len(alike)
    more = f" (and {left} more problem(s): %mlx_cluster doctor)" if left > 0 else ""
    raise MLXClusterError(f"{host}: {check.name}: {check.detail}{same}{fix}{more}")


def start_controller(run: Running) -> None:
    """Launch the controller (it becomes ready in the background) and the watchdog."""
    run.ipp.start_controller_sync()
    pids = run.track(ipp_adapter.launcher_pids(run.ipp))
    run.watchdog = processes.Watchdog(run.profile_dir, pids)


def bring_up(run: Running) -> None:
    """The engines, once ``start_controller`` ran; returns once every rank has registered and
    been checked."""
    spec = run.spec
    assert run.watchdog is not None
    env = mpi_job.backend_environment(
        spec.placement,
        spec.backend,
        libmpi=spec.mpi_lib,
        ring_port=spec.ring_port,
        connections_per_ip=spec.connections_per_ip,
        verbose=spec.verbose,
    )
    env.update(spec.placement.envs)
    env[SECRETS_FILE_VAR] = deliver_secrets(run)
    mpi = mpi_job.MPIOptions(
        forward=tuple(sorted(env)),
        prted=spec.prted,
        ssh_agent=spec.ssh,
        subnets=tuple(spec.subnet.split(",")) if spec.subnet else (),
        workdir=spec.workdir,
        as_root=os.geteuid() == 0,
        cpu_count=os.cpu_count() or 1,
        grace=spec.grace,
    )
    run.ipp.start_engines_sync(
        n=spec.n,
        mpi_cmd=[spec.mpiexec],
        mpi_args=mpi_job.mpiexec_args(spec.placement, mpi),
        engine_cmd=[spec.python, "-m", "mlx_cluster_magic.rank.bootstrap"],
        engine_args=[
            f"--IPEngine.startup_command={ENGINE_NAMESPACE}",
            # No sqlite history on the engines: a write per cell costs the %%px round trip.
            "--HistoryManager.enabled=False",
            f"--IPEngine.max_heartbeat_misses={heartbeat_misses(spec.grace)[1]}",
        ],
        environment=env,
    )
    run.watchdog.watch(run.track(ipp_adapter.launcher_pids(run.ipp)))
    run.client = run.ipp.connect_client_sync()
    wait_for_engines(run)
    run.view = run.client[list(range(spec.n))]
    run.view.block = True
    check_ranks(run)


def deliver_secrets(run: Running) -> str:
    """Put what the ranks need that is secret (the controller's engine connection with its HMAC
    key, the status channel's keys) where each host's ranks read it, over ssh only; returns
    its path, all that mpiexec forwards. Ranks on the head alone read the controller's own file
    and start while the controller does; remote hosts get a copy once the controller wrote it."""
    spec = run.spec
    status = run.status.credentials if run.status is not None else None
    if spec.placement.is_local:
        path = os.path.join(run.profile_dir, "security", "mlx-cluster-secrets.json")
        engine_file = ipp_adapter.engine_connection_file(run.ipp)
        host_secrets.write_private(path, host_secrets.bundle(status, engine_file=engine_file))
        return path
    engine = ipp_adapter.wait_for_engine_connection(run.ipp, spec.timeout)
    rel_dir = host_secrets.relative_dir(os.path.basename(run.profile_dir))
    run.host_secrets_dir = rel_dir
    return host_secrets.ship(spec.placement, spec.ssh, rel_dir, host_secrets.bundle(status, engine))


def wait_for_engines(run: Running) -> None:
    """Wait for every rank to register, failing fast (with mpiexec's words) if it exits."""
    assert run.client is not None
    timeout = run.spec.timeout
    deadline = time.monotonic() + timeout
    launcher = ipp_adapter.engine_launcher(run.ipp)
    while len(run.client.ids) < run.n:
        what = None
        if ipp_adapter.launcher_exited(launcher):
            what = "mpiexec exited"
        elif time.monotonic() > deadline:
            missing = sorted(set(range(run.n)) - set(run.client.ids))
            what = f"rank(s) {missing} did not register within {timeout:g} s"
        if what:
            output = ipp_adapter.launcher_output(launcher)
            raise MLXClusterError(ipp_adapter.launch_failure(output, what))
        time.sleep(0.02)


def check_ranks(run: Running) -> None:
    """Engine id == MPI rank == MLX rank, and every group spans all ranks; then each local
    engine (and its kernel nanny, a child) is tracked as ours to stop."""
    from ..rank.bootstrap import rank_report

    placement, n = run.spec.placement, run.n
    reports = run.view.apply_sync(rank_report)
    for engine_id, r in zip(run.view.targets, reports):
        if not (engine_id == r["mpi_rank"] == r["mlx_rank"]) or r["mlx_size"] != n:
            raise MLXClusterError(
                f"engine {engine_id} on {r['host']} has MPI rank {r['mpi_rank']} and MLX rank "
                f"{r['mlx_rank']} of {r['mlx_size']}; expected rank {engine_id} of {n}"
            )
    run.ranks = [dict(r, rank=i) for i, r in enumerate(reports)]
    if run.status is not None:  # records naming another host are forged from now on
        run.status.expect_hosts([str(r["host"]) for r in run.ranks])
    local = [r for r in run.ranks if placement.is_local or placement.ranks[r["mlx_rank"]].is_local]
    for r in local:
        tracked = processes.Tracked.of(r["pid"])
        if tracked is not None:
            run.rank_procs[r["rank"]] = tracked
    assert run.watchdog is not None
    run.watchdog.watch(run.track([r["pid"] for r in local]))
    # mpiexec's ssh sessions to the hosts, there once every daemon is up: stopped by pid with
    # the rest (once mpiexec is killed they are orphans, and to a Mac that is gone an ssh
    # session does not end by itself for as long as its keep-alives wait)
    run.watchdog.watch(run.track(mpiexec_children(run)))


def mpiexec_children(run: Running) -> list[int]:
    """The processes mpiexec started on the head (its ssh sessions, local ranks)."""
    launcher = ipp_adapter.engine_launcher(run.ipp)
    process = getattr(launcher, "process", None)
    if not isinstance(process, psutil.Process):
        return []
    try:
        return [child.pid for child in process.children(recursive=True)]
    except psutil.Error:
        return []


def watch_liveness(run: Running, on_lost: Callable[[Breakage], None]) -> None:
    """The keeper that tells a silent network from a lost host (remote hosts, live status on)."""
    if run.status is None or run.spec.placement.is_local:
        return
    run.liveness = LivenessKeeper(
        run.spec.placement,
        run.status.silence,
        addresses=dict(run.spec.peers),
        grace=run.spec.grace,
        on_lost=on_lost,
        ssh=run.spec.ssh,
        python=run.spec.python,
        ssh_port=ssh_port(run.spec),
        pids=lambda: {int(r["rank"]): int(r["pid"]) for r in run.ranks},
    )
    keeper = run.liveness

    def unreachable() -> dict[str, tuple[float, str]]:
        now = time.monotonic()
        return {
            h: (now - v.silent_since, v.detail)
            for h, v in keeper.verdicts().items()
            if v.state == "unreachable"
        }

    run.status.set_reachability(unreachable, keeper.quiet_hosts)


def ssh_port(spec: ClusterSpec) -> int:
    """The port ssh reaches the first remote host at (``ssh -G``: the user's config); 22 if
    unsure. What the keeper probes: it answers wherever the host is up."""
    import shlex
    import subprocess

    host = next(h for h in spec.placement.hosts if not h.is_local)
    try:
        out = subprocess.run(
            [*shlex.split(spec.ssh or "ssh"), "-G", host.ssh],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return 22
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "port" and value.strip().isdigit():
            return int(value)
    return 22


def cut_cables(run: Running) -> list[str]:
    """Each cable of the cluster whose link is down, in words, from the ranks' own reports of
    their interfaces (``rank.link_state``). A cable is an interface whose network holds one of
    the hostfile's cluster addresses; its two ends are the hosts that report it down, or the
    host whose cluster address is on it."""
    if run.status is None:
        return []
    placement = run.spec.placement
    cluster_ips = {ip: h.ssh for h in placement.hosts for ip in h.ips}
    ends: dict[Any, dict[str, tuple[str, str]]] = {}  # network -> host -> (address, iface)
    for rank, host in enumerate(placement.ranks):
        for item in run.status.latest(rank, "links_down") or []:
            try:
                iface, cidr = str(item[0]), ipaddress.ip_interface(str(item[1]))
            except (ValueError, IndexError, TypeError):
                continue
            on_it = [ip for ip in cluster_ips if _in(ip, cidr.network)]
            if on_it:
                ends.setdefault(cidr.network, {})[host.ssh] = (str(cidr.ip), iface)
                for ip in on_it:
                    ends[cidr.network].setdefault(cluster_ips[ip], (ip, ""))
    found = []
    for hosts in ends.values():
        (a, (ip_a, if_a)), *rest = hosts.items()
        if not rest:
            found.append(f"{a}'s cable at {ip_a} has no link ({if_a})")
            continue
        b, (ip_b, _) = rest[0]
        found.append(
            f"the cable between {a} ({ip_a}) and {b} ({ip_b}) is down (no link on {a}'s {if_a})"
        )
    return found


def _in(ip: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(ip) in network
    except ValueError:
        return False


#: The evidence of a rank the controller unregistered (no heartbeat past the grace).
HEART_LOST = "the controller's heartbeat lost it"


def dead_evidence(run: Running | None) -> dict[int, str]:
    """Ranks whose process is known gone: mpiexec exited (Open MPI ends the whole job), a
    local pid vanished, the controller's heartbeat lost the engine (after the grace), or its
    host can be reached by no one (the liveness keeper)."""
    if run is None:
        return {}
    if ipp_adapter.launcher_exited(ipp_adapter.engine_launcher(run.ipp)):
        return {r: "mpiexec exited" for r in range(run.n)}
    dead = {r: "process gone" for r, t in run.rank_procs.items() if not t.alive()}
    if run.liveness is not None:
        dead.update(run.liveness.lost_ranks())
        dead.update(run.liveness.gone_ranks())
    if run.client is not None and run.ranks:
        registered = set(run.client.ids)
        for r in range(run.n):
            if r not in registered:
                dead.setdefault(r, HEART_LOST)
    return dead


@dataclass(frozen=True)
class Remains:
    """What a torn-down run leaves for the views: each rank's last record and recorder."""

    nodes: list[NodeStatus]
    recorders: list[dict[str, Any] | None]


#: Seconds a teardown waits for a killed mpiexec to be gone before it removes its session files.
SESSION_EXIT_WAIT_S = 2.0


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (an exited child nobody has waited for yet, as mpiexec
    is while a cell blocks ipyparallel's event loop) does not."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def remove_session_dir(mpiexec_pid: int, since: float) -> None:
    """mpiexec keeps its session directory when it is killed before it cleans up (an abort),
    and a later mpiexec given the same pid cannot start its PMIx server ("The PMIx server's
    listener thread failed to start"): remove ours, once that pid is free."""
    path = mpi_job.mpi_session_dir(mpiexec_pid)
    deadline = time.monotonic() + SESSION_EXIT_WAIT_S  # a killed mpiexec takes a moment to go
    while _running(mpiexec_pid):
        if time.monotonic() > deadline:
            return  # still running, or the pid already belongs to another process
        time.sleep(0.02)
    try:
        st = os.stat(path)
    except OSError:
        return
    if st.st_uid == os.getuid() and st.st_mtime >= since - 1:  # made during this run
        shutil.rmtree(path, ignore_errors=True)


def _remains(run: Running, dead: dict[int, str]) -> Remains | None:
    """Each rank's last record and recorder for the views, as the ranks were before the kill
    (``dead``): best effort, as a status that cannot be read must keep nothing running."""
    status = run.status
    if status is None:
        return None
    try:
        status.set_evidence(lambda: dead)
        nodes = status.nodes()
        return Remains(
            [
                dataclasses.replace(n, state="stopped", silent_s=None) if n.state != "dead" else n
                for n in nodes
            ],
            [status.latest(r, "recorder") for r in range(run.n)],
        )
    except Exception:
        return None


def tear_down(run: Running, grace: float = 5.0) -> Remains | None:
    """Stop everything this run started, by the pids tracked at spawn, and remove its files.

    Kills first; the status and every other step are tried whatever an earlier one raised, and
    the first error is raised at the end. The watchdog stays until every process is reaped,
    so a teardown that failed can be done again (``stop()`` once more) and a dying kernel
    still takes the processes with it."""
    errors: list[Exception] = []

    def attempt(step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as e:
            errors.append(e)

    dead: dict[int, str] = {}
    attempt(lambda: dead.update(dead_evidence(run)))
    if run.liveness is not None:
        attempt(run.liveness.close)
    if run.client is None:
        # The start failed early: the controller may still be forking its schedulers, and
        # ipyparallel's stop would leave those behind. Reaping pauses it while it looks.
        attempt(lambda: processes.reap(run.tracked, grace=grace))
    # Local ranks get SIGTERM together with mpiexec, which would pass it on only after about
    # half a second; mpiexec then sees them exit and ends at once.
    launcher = ipp_adapter.engine_launcher(run.ipp)
    mpiexec = launcher.process if launcher is not None else None
    attempt(lambda: processes.terminate(run.rank_procs.values()))
    attempt(lambda: ipp_adapter.stop(run.ipp, run.client, drain=min(1.0, grace)))
    attempt(lambda: processes.reap(run.tracked, grace=grace))
    remains = _remains(run, dead)
    if run.status is not None:
        attempt(run.status.close)
    if isinstance(mpiexec, psutil.Process):
        attempt(lambda: remove_session_dir(mpiexec.pid, run.started_at))
    if errors:
        raise errors[0]
    if run.watchdog is not None:
        run.watchdog.close()
    if run.host_secrets_dir is not None:
        host_secrets.remove(run.spec.placement, run.spec.ssh, run.host_secrets_dir)
    shutil.rmtree(run.profile_dir, ignore_errors=True)
    return remains
