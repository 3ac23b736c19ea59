"""``MLXCluster``: the life cycle of one MLX cluster (controller + MPI-launched engines).

Built on ipyparallel's ``Cluster`` and its MPI engine launcher; what this adds is the engine
start-up that gets MLX's group right on every rank, placement across hosts, the checks that make
a bad start fail fast with one line, and clean-up that leaves no process behind.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import ipaddress
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ipyparallel as ipp
import psutil
from ipyparallel.cluster.launcher import MPIEngineSetLauncher

from . import hosts as hostmod
from . import launch
from .engine import EXIT_BAD_GROUP
from .errors import MLXClusterError
from .gather import DEFAULT_LIMIT_BYTES, GatherResult, summarize_name
from .remote import open_listener, receive_broadcast
from .status import NodeStatus
from .widgets import StatusView, header_text, nodes_html, nodes_text

if TYPE_CHECKING:
    from .doctor import DoctorReport

# The controller pings engines this often (ms). ipyparallel's 3000 ms default makes every
# engine wait up to 3 s after registering before it counts as ready, and a dead engine is
# noticed only after ten missed beats.
HEARTBEAT_MS = 200
START_TIMEOUT_S = 60.0

_ENGINE_NAMESPACE = "import mlx.core as mx; from mlx_cluster_magic.engine import WORLD as world"


class MLXEngineSetLauncher(MPIEngineSetLauncher):
    """ipyparallel's MPI engine launcher, starting our engine module instead of ``ipengine``."""

    def find_args(self) -> list[str]:
        # The connection variables are set only just before start: forward whatever is set.
        forward = sorted(set(self.get_env()) - set(self.forwarded))
        extra = [a for name in forward for a in ("-x", name)]
        return [
            *self.mpi_cmd,
            "-n",
            str(self.n),
            *self.mpi_args,
            *extra,
            *self.program,
            *self.program_args,
        ]

    @property
    def forwarded(self) -> list[str]:
        args = self.mpi_args
        return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-x"]


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
    ) -> None:
        placement = self.placement_from(n, hosts=hosts, hostfile=hostfile)
        if not placement.is_local:
            placement = hostmod.mark_head(placement, _own_names())
        self.placement: hostmod.Placement = placement
        self.backend: str = hostmod.check_backend(backend or placement.backend or "mpi")
        if not (isinstance(ring_port, int) and 1024 <= ring_port <= 65535 - placement.size):
            raise MLXClusterError(f"--ring-port must be a port from 1024 to 65535, got {ring_port}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise MLXClusterError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.ring_port = ring_port
        self.timeout = float(timeout)
        self.mpiexec = launch.find_mpiexec(mpiexec)
        self._explicit_mpiexec = bool(mpiexec or os.environ.get("MLX_CLUSTER_MPIEXEC"))
        self.mpi_lib = (
            launch.find_libmpi(self.mpiexec, mpi_lib) if self.backend in ("mpi", "any") else mpi_lib
        )
        if self.backend == "jaccl":
            if placement.is_local:
                raise MLXClusterError(
                    "the jaccl backend is RDMA over Thunderbolt 5 between Macs: give a "
                    "--hostfile with rdma rows (mlx.distributed_config --backend jaccl); "
                    "locally use mpi or ring"
                )
            launch.ibv_devices(placement)  # validate the rdma rows before launching
        self.python = python or sys.executable
        if placement.is_local and python and not os.access(python, os.X_OK):
            raise MLXClusterError(f"--python {python!r} is not an executable here")
        if workdir is not None and placement.is_local and not os.path.isdir(workdir):
            raise MLXClusterError(f"--workdir {workdir!r} is not a directory")
        if controller_ip is not None:
            try:
                ipaddress.ip_address(controller_ip)
            except ValueError:
                raise MLXClusterError(
                    f"--controller-ip {controller_ip!r} is not an IP address: give the address "
                    "the hosts reach this machine by"
                ) from None
        self.workdir = workdir
        self.ssh = ssh
        self.live_status = live_status
        self.subnet = launch.cluster_subnet(placement)
        self.controller_ip = controller_ip or self._default_controller_ip()
        self._ipp: ipp.Cluster | None = None
        self._client: ipp.Client | None = None
        self._view: Any = None
        self._ranks: list[dict[str, Any]] = []
        self._profile_dir: str | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._procs: list[psutil.Process] = []
        self._status: Any = None
        self._widget: StatusView | None = None
        self.last_nodes: list[NodeStatus] = []
        self.started_at: float | None = None

    @staticmethod
    def placement_from(
        n: int | None,
        *,
        hosts: str | Sequence[str] | None = None,
        hostfile: str | os.PathLike[str] | None = None,
    ) -> hostmod.Placement:
        """Where the ranks go: ``n`` local ranks, or ``n`` per host of ``hosts``/``hostfile``."""
        if hosts is not None and hostfile is not None:
            raise MLXClusterError("give --hosts or --hostfile, not both")
        if hostfile is not None:
            return hostmod.with_ranks_per_host(hostmod.read_hostfile(hostfile), n)
        if hosts is not None:
            spec = hosts if isinstance(hosts, str) else ",".join(hosts)
            return hostmod.with_ranks_per_host(hostmod.parse_host_list(spec), n)
        return hostmod.local(2 if n is None else n)

    # ----------------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        """The number of ranks."""
        return self.placement.size

    @property
    def running(self) -> bool:
        return self._client is not None

    @property
    def client(self) -> ipp.Client:
        """The ipyparallel ``Client`` connected to this cluster's controller."""
        return self._require()[0]

    @property
    def view(self) -> Any:
        """A blocking ``DirectView`` on every rank, in rank order."""
        return self._require()[1]

    @property
    def ranks(self) -> list[dict[str, Any]]:
        """Per rank: host, pid, MPI and MLX rank and size, as checked at start."""
        return list(self._ranks)

    def _require(self) -> tuple[ipp.Client, Any]:
        if self._client is None or self._view is None:
            raise MLXClusterError("no cluster is running: start one with %mlx_cluster start")
        return self._client, self._view

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = "local" if self.placement.is_local else f"{len(self.placement.hosts)} hosts"
        return f"<MLXCluster {state}: {self.n} ranks ({where}), backend={self.backend}>"

    # ----------------------------------------------------------------------- life cycle
    def start(self, activate: bool = False) -> MLXCluster:
        """Start the controller and the engines; return once every rank has a healthy MLX group.

        On any failure everything started so far is stopped before the error is raised.
        """
        if self.running:
            raise MLXClusterError(
                "this cluster is already running: use restart() (%mlx_cluster restart) or stop()"
            )
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise
        if activate:
            self.activate()
        return self

    def _preflight(self) -> None:
        """Before launching anything, the doctor's checks on every remote host: ssh, python,
        the same versions of mlx/mpi4py/ipyparallel/mlx_cluster_magic, mpiexec and prted.

        mpiexec itself would wait for a daemon that never comes; this names the host and the fix.
        """
        if all(h.is_local for h in self.placement.hosts):
            return
        report = self.doctor(timeout=10.0, backend=self.backend)
        failures = [(host, c) for host, c in report.problems() if c.ok is False]
        if failures:
            host, check = failures[0]
            more = (
                f" (and {len(failures) - 1} more problem(s): %mlx_cluster doctor)"
                if len(failures) > 1
                else ""
            )
            fix = f"; fix: {check.fix}" if check.fix else ""
            raise MLXClusterError(f"{host}: {check.name}: {check.detail}{fix}{more}")

    def doctor(self, timeout: float = 10.0, backend: str | None = None) -> DoctorReport:
        """Check every host is ready (ssh, python, versions, the MLX backend, mpiexec/prted,
        IP, MTU), as data."""
        from .doctor import run_doctor

        return run_doctor(
            self.placement,
            python=self.python,
            ssh=self.ssh,
            timeout=timeout,
            backend=backend or self.backend,
        )

    def _start(self) -> None:
        self._preflight()
        _LIVE.add(self)
        self._profile_dir = tempfile.mkdtemp(prefix="mlx-cluster-")  # 0700
        for sub in ("security", "log", "startup", "pid"):
            os.makedirs(os.path.join(self._profile_dir, sub), mode=0o700)
        self.started_at = time.time()
        cluster = self._ipp = ipp.Cluster(
            n=self.n,
            profile_dir=self._profile_dir,
            cluster_file="",  # MLXCluster owns the life cycle; no world-readable state file
            controller_ip=self.controller_ip,
            controller_args=[f"--HeartMonitor.period={HEARTBEAT_MS}"],
            engine_launcher_class=MLXEngineSetLauncher,
            delay=0,
            engine_timeout=int(self.timeout),
            log_level=40,
        )
        cluster.start_controller_sync()
        env = launch.backend_environment(
            self.placement, self.backend, libmpi=self.mpi_lib, ring_port=self.ring_port
        )
        env.update(self.placement.envs)
        if self.live_status:
            from .status import StatusReceiver

            self._status = StatusReceiver(self.controller_ip, self.placement)
            env[launch.STATUS_VAR] = self._status.url
        opts = launch.MPIOptions(
            forward=tuple(sorted(env)),
            prted=self._prted(),
            ssh_agent=self.ssh,
            subnet=self.subnet,
            workdir=self.workdir,
            as_root=os.geteuid() == 0,
            cpu_count=os.cpu_count() or 1,
        )
        cluster.start_engines_sync(
            n=self.n,
            mpi_cmd=[self.mpiexec],
            mpi_args=launch.mpiexec_args(self.placement, opts),
            engine_cmd=[self.python, "-m", "mlx_cluster_magic.engine"],
            engine_args=[
                f"--IPEngine.startup_command={_ENGINE_NAMESPACE}",
                # No sqlite history on the engines: a write per cell costs the %%px round trip.
                "--HistoryManager.enabled=False",
            ],
            environment=env,
        )
        self._start_watchdog()
        self._client = cluster.connect_client_sync()
        self._wait_for_engines()
        self._view = self._client[list(range(self.n))]
        self._view.block = True
        self._check_ranks()
        if self._status is not None:
            self._status.attach(self)
            self._status.on_update(self._refresh_widget)

    def _refresh_widget(self) -> None:
        if self._widget is not None:
            self._widget.refresh()

    def _prted(self) -> str:
        """The remote daemon: beside an explicit --mpiexec, else beside the hosts' python."""
        base = self.mpiexec if self._explicit_mpiexec else self.python
        return os.path.join(os.path.dirname(base), "prted")

    def _mpiexec_exited(self) -> bool:
        """Asks the process itself: ipyparallel learns of the exit only on its event loop,
        which nothing runs while we wait."""
        launcher = self._engine_launcher()
        if launcher is None:
            return False
        if launcher.state == "after":
            return True
        popen = getattr(launcher, "_popen_process", None)
        if popen is not None:
            return popen.poll() is not None
        proc = getattr(launcher, "process", None)
        return proc is not None and not proc.is_running()

    def _engine_launcher(self) -> MLXEngineSetLauncher | None:
        if self._ipp is None or not self._ipp.engines:
            return None
        return next(iter(self._ipp.engines.values()))

    def _wait_for_engines(self) -> None:
        """Wait for every rank to register, failing fast (with mpiexec's words) if it exits."""
        assert self._client is not None
        deadline = time.monotonic() + self.timeout
        launcher = self._engine_launcher()
        while len(self._client.ids) < self.n:
            if self._mpiexec_exited():
                raise MLXClusterError(self._launch_failure(launcher, "mpiexec exited"))
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.n)) - set(self._client.ids))
                raise MLXClusterError(
                    self._launch_failure(
                        launcher, f"rank(s) {missing} did not register within {self.timeout:g} s"
                    )
                )
            time.sleep(0.02)

    def _launch_failure(self, launcher: MLXEngineSetLauncher | None, what: str) -> str:
        output = self._engine_output(launcher)
        ours = [
            ln.split("mlx_cluster_magic: ", 1)[1] for ln in output if "mlx_cluster_magic: " in ln
        ]
        if ours:
            return f"{what}: {ours[0]}"
        remote = [
            ln.split(":", 1)[1].strip() for ln in output if ln.strip().startswith("Remote host:")
        ]
        if remote:
            return (
                f"{what}: mpiexec could not start its daemon on {remote[0]!r} (ssh or prted failed)"
            )
        tail = " | ".join(ln.strip() for ln in output[-4:] if ln.strip())
        log = getattr(launcher, "output_file", "")
        return f"{what}; engine log tail: {tail or '(empty)'} (full log: {log})"

    def _engine_output(self, launcher: MLXEngineSetLauncher | None) -> list[str]:
        path = getattr(launcher, "output_file", None)
        if not path:
            return []
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            return [ln for ln in f.read().splitlines() if ln.strip()]
        return []

    def _check_ranks(self) -> None:
        """Engine id == MPI rank == MLX rank, and every group spans all ranks."""
        from .engine import rank_report

        reports = self._view.apply_sync(rank_report)
        for engine_id, r in zip(self._view.targets, reports):
            if not (engine_id == r["mpi_rank"] == r["mlx_rank"]) or r["mlx_size"] != self.n:
                raise MLXClusterError(
                    f"engine {engine_id} on {r['host']} has MPI rank {r['mpi_rank']} and MLX rank "
                    f"{r['mlx_rank']} of {r['mlx_size']}; expected rank {engine_id} of {self.n}"
                )
        self._ranks = [dict(r, rank=i) for i, r in enumerate(reports)]
        local = [r["pid"] for r in reports if self._is_local_rank(r)]
        # Each engine's kernel nanny (a child process) is ours to stop as well.
        for pid in list(local):
            with contextlib.suppress(psutil.Error):
                local += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        self._track(local)
        self._watch_pids(local)

    def _is_local_rank(self, report: dict[str, Any]) -> bool:
        return self.placement.ranks[report["mlx_rank"]].is_local or self.placement.is_local

    def activate(self) -> None:
        """Point ``%%px``, ``%px``, ``%autopx`` and ``%pxresult`` at every rank of this cluster.

        They are ipyparallel's magics, with a wait that ends the cell when a rank dies, honours
        interrupts and ``%%px --timeout S``.
        """
        from IPython import get_ipython

        from .px import MLXParallelMagics

        shell = get_ipython()
        if shell is None:
            return
        shell.magics_manager.register(MLXParallelMagics(shell, self.view, self))

    # ------------------------------------------------------------------ faults
    def dead_ranks(self) -> list[int]:
        """Ranks known to be gone: mpiexec exited (Open MPI aborts the job when one rank dies),
        a local process vanished, or a rank's status reports stopped arriving."""
        if self._mpiexec_exited():
            return list(range(self.n))
        if self._status is None:
            return []
        return [n.rank for n in self._status.nodes() if n.state == "dead"]

    def death_cause(self) -> str:
        """What mpiexec reported about the rank that died first, if anything."""
        from .px import death_cause

        return death_cause(self._engine_output(self._engine_launcher()))

    def describe_ranks(self, ranks: Sequence[int]) -> str:
        """``rank 1 on mac2`` / ``ranks [0, 1] on vm``: for messages."""
        hosts = [self._host_of(r) for r in ranks]
        where = ", ".join(dict.fromkeys(hosts))
        if len(ranks) == 1:
            return f"rank {ranks[0]} on {where}"
        return f"ranks {list(ranks)} on {where}"

    def _host_of(self, rank: int) -> str:
        if rank < len(self._ranks):
            return str(self._ranks[rank]["host"])
        return self.placement.ranks[rank].ssh

    def abort(self) -> None:
        """Stop every process of a cluster that cannot go on; the status view shows it dead."""
        nodes = self._status.nodes() if self._status is not None else self.last_nodes
        if self._ipp is not None:
            # No graceful wait: a rank may be unreachable (cable pulled) or stuck in C code.
            for launcher in [self._ipp.controller, *self._ipp.engines.values()]:
                if launcher is not None:
                    launcher.stop_seconds_until_kill = 1
        self._teardown()
        self.last_nodes = [dataclasses.replace(n, state="dead") for n in nodes]
        with contextlib.suppress(Exception):
            self._refresh_widget()

    def stop(self) -> None:
        """Stop engines and controller; check that no process of ours is left; idempotent."""
        if self._ipp is None and self._client is None:
            raise MLXClusterError("no cluster is running: nothing to stop")
        self._teardown()

    def restart(self, activate: bool = False) -> MLXCluster:
        """Stop (if running) and start a fresh cluster of the same shape."""
        if self._ipp is not None or self._client is not None:
            self._teardown()
        return self.start(activate=activate)

    def _launcher_pids(self) -> list[int]:
        pids = []
        if self._ipp is not None:
            for launcher in [self._ipp.controller, *self._ipp.engines.values()]:
                pid = getattr(launcher, "pid", -1)
                if launcher is not None and pid and pid > 0:
                    pids.append(pid)
        return pids

    def _track(self, pids: list[int]) -> None:
        """Remember our processes with their start times, so a reused pid is never killed."""
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                self._procs.append(psutil.Process(pid))

    def _teardown(self) -> None:
        """Stop everything this cluster started, by pid, whatever state it is in."""
        self._track(self._launcher_pids())
        procs, self._procs = self._procs, []
        if self._status is not None:
            self.last_nodes = self._status.nodes()
            self._status.close()
            self._status = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        if self._ipp is not None:
            with contextlib.suppress(Exception):
                self._ipp.stop_cluster_sync()
            with contextlib.suppress(Exception):
                from ipyparallel.cluster.cluster import _atexit_clusters

                _atexit_clusters.discard(self._ipp)
        _reap(procs)
        self._stop_watchdog()
        if self._profile_dir:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            _REMOVE_AT_EXIT.add(self._profile_dir)  # ipyparallel may still write a late log
        self._ipp = self._client = self._view = None
        self._profile_dir = None
        self._ranks = []
        _LIVE.discard(self)
        with contextlib.suppress(Exception):
            self._refresh_widget()

    # ---------------------------------------------------- orphan protection (kernel killed)
    def _start_watchdog(self) -> None:
        """A small process that stops our processes if this (kernel) process dies abruptly."""
        pids = self._launcher_pids()
        self._track(pids)
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlx_cluster_magic.watchdog",
                str(self._profile_dir),
                str(os.getpid()),
                *map(str, pids),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _watch_pids(self, pids: list[int]) -> None:
        if self._watchdog is not None and self._watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                self._watchdog.stdin.write(("".join(f"{p}\n" for p in pids)).encode())
                self._watchdog.stdin.flush()

    def _stop_watchdog(self) -> None:
        if self._watchdog is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if self._watchdog.stdin:
                self._watchdog.stdin.write(b"stop\n")
                self._watchdog.stdin.close()
        try:
            self._watchdog.wait(5)
        except subprocess.TimeoutExpired:
            self._watchdog.kill()
            self._watchdog.wait()
        self._watchdog = None

    # ----------------------------------------------------------------------- views
    def nodes(self) -> list[dict[str, Any]]:
        """Per rank: rank, host, state (starting/idle/busy/dead), busy_s, last_seen_s,
        rss_bytes, mlx_active_bytes, mlx_peak_bytes, device, pid; live while cells run."""
        return [n.as_dict() for n in self._node_records()]

    def _node_records(self) -> list[NodeStatus]:
        if self._status is None:
            if not self.running:
                return self.last_nodes
            raise MLXClusterError("live status is off for this cluster (started with --no-status)")
        self.last_nodes = self._status.nodes()
        return self.last_nodes

    def status_view(self) -> StatusView:
        """The live status widget; cached, so every display shows the same live object."""
        if self._widget is None:
            self._widget = StatusView(self)
        return self._widget

    def gather(self, name: str, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> GatherResult:
        """Fetch ``name`` from every rank: ``.values`` by rank, ``.agree``, ``.diverged``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise MLXClusterError(f"gather takes a variable name, got {name!r}")
        summaries = self.view.apply_sync(summarize_name, name, limit_bytes)
        missing = [r for r, s in enumerate(summaries) if s.kind == "missing"]
        if missing:
            raise MLXClusterError(f"{name!r} is not defined on rank(s) {missing}")
        hosts = [r["host"] for r in self._ranks] or [h.ssh for h in self.placement.ranks]
        return GatherResult(name, list(summaries), hosts)

    def broadcast(self, name: str, value: Any, root: int = 0) -> None:
        """Send ``value`` (a large NumPy or MLX array) from the notebook to every rank as
        variable ``name``.

        The notebook streams it once, over one direct TCP connection, to ``root``; the ranks
        pass it on with MPI's broadcast as it arrives. ``view.push`` instead sends a copy to
        every engine through the controller.
        """
        import numpy as np

        if not isinstance(name, str) or not name.isidentifier():
            raise MLXClusterError(f"broadcast takes a variable name, got {name!r}")
        if not 0 <= root < self.n:
            raise MLXClusterError(f"root must be a rank from 0 to {self.n - 1}, got {root}")
        to_mlx = type(value).__module__.startswith("mlx")
        if to_mlx and "bfloat16" in str(getattr(value, "dtype", "")):
            raise MLXClusterError("broadcast: bfloat16 has no NumPy type; send .astype(mx.float32)")
        arr = np.require(np.asarray(value), requirements="C")  # keeps 0-d arrays 0-d
        if arr.dtype.hasobject:
            raise MLXClusterError("broadcast sends numeric arrays; use view.push for objects")
        token = secrets.token_hex(16)
        ip = self._address_of(root)
        port = self.client[root].apply_sync(open_listener, ip, token)
        ar = self.view.apply_async(
            receive_broadcast, name, arr.shape, arr.dtype.str, to_mlx, token, root
        )
        try:
            with socket.create_connection((ip, port), timeout=30) as conn:
                conn.sendall(token.encode())
                conn.sendall(memoryview(arr.reshape(-1)).cast("B"))
        finally:
            ar.get()

    def _address_of(self, rank: int) -> str:
        """Where the notebook reaches ``rank``'s host: loopback here, else its cluster IP."""
        host = self.placement.ranks[rank]
        if self.placement.is_local or host.is_local:
            return "127.0.0.1"
        return host.address

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        nodes = (
            self.last_nodes if not self.running or self._status is None else self._node_records()
        )
        bundle = {
            "text/plain": f"{header_text(self)}\n{nodes_text(nodes)}",
            "text/html": f"<b>{header_text(self)}</b>{nodes_html(nodes)}",
        }
        if self.running and self._status is not None:
            view = self.status_view()
            widget = view.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
            bundle.update({k: v for k, v in widget.items() if k != "text/plain"})
        return bundle

    # ----------------------------------------------------------------------- context manager
    def __enter__(self) -> MLXCluster:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        if self._ipp is not None or self._client is not None:
            self._teardown()

    # ----------------------------------------------------------------------- helpers
    def _default_controller_ip(self) -> str:
        """Loopback for a local cluster; else the head's own address in the cluster subnet."""
        if self.placement.is_local or self.subnet is None:
            return "127.0.0.1"
        interfaces = {
            name: [a.address for a in addrs if a.family.name in ("AF_INET", "AF_INET6")]
            for name, addrs in psutil.net_if_addrs().items()
        }
        ip = launch.head_address(self.subnet, interfaces)
        if ip is None:
            raise MLXClusterError(
                f"this machine has no address in the cluster subnet {self.subnet}: pass "
                "--controller-ip with the address the hosts reach this machine by"
            )
        return ip

    def mpiexec_command(self) -> str:
        """The mpiexec command line the engines are started with (for logs and debugging)."""
        launcher = self._engine_launcher()
        if launcher is None:
            raise MLXClusterError("no cluster is running")
        return shlex.join(launcher.args)


def _own_names() -> set[str]:
    """This machine's host names and addresses, to recognise the head in a hostfile."""
    names = {socket.gethostname(), socket.gethostname().split(".")[0]}
    for addrs in psutil.net_if_addrs().values():
        names.update(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return names


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


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie: a zombie has exited and only waits for its parent to reap it."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(procs: list[psutil.Process], grace: float = 5.0) -> None:
    """Terminate our processes that are still running; SIGKILL what is left after ``grace``."""
    procs = [p for p in procs if _running(p)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    for p in procs:
        if _running(p):
            with contextlib.suppress(psutil.Error):
                p.kill()


__all__ = ["EXIT_BAD_GROUP", "MLXCluster", "MLXClusterError", "MLXEngineSetLauncher"]
