"""The one adapter to ipyparallel: the engine-set launcher, mpiexec's output, and every private
ipyparallel name this package uses.

Everything else goes through public API. ``PRIVATE_NAMES`` lists each private attribute read
here; a test checks that each still exists, so an ipyparallel upgrade that renames one fails
loudly instead of silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ipyparallel as ipp
import psutil
from ipyparallel.cluster.launcher import LocalControllerLauncher, MPIEngineSetLauncher
from traitlets import default

from ..contract import LATEST_WORD_OPTIONS, SECRET_VARS
from ..errors import MLXClusterError

#: (object kind, attribute): the private names of ipyparallel used below.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("heartmonitor", "_setup_heartmonitor"),
    ("AsyncResult", "_targets"),
    ("AsyncResult", "_children"),
    ("AsyncResult", "_output_ready"),
    ("AsyncResult", "_fname"),
    ("AsyncResult", "_iopub_streaming_output_callback"),
    ("ParallelMagics", "_autopx"),
)


class MLXEngineSetLauncher(MPIEngineSetLauncher):
    """ipyparallel's MPI engine launcher, forwarding its variables to remote ranks, secrets never.

    Open MPI passes a variable to remote ranks only when named with ``-x NAME`` (its value stays
    off argv), and carries it to the hosts in clear: the connection (with its HMAC key) reaches
    them over ssh instead (``launch.host_secrets``), so ``IPP_CONNECTION_INFO`` must never be set.
    """

    def find_args(self) -> list[str]:
        args: list[str] = super().find_args()
        env = self.get_env()
        leaked = [name for name in SECRET_VARS if name in env or name in self.forwarded]
        if leaked:
            raise RuntimeError(f"refusing to forward a secret through mpiexec: {leaked}")
        forward = sorted(set(env) - set(self.forwarded))
        extra = [a for name in forward for a in ("-x", name)]
        # super() gives [*mpi_cmd, -n, N, *mpi_args, *program, *program_args]: insert before
        # the program.
        at = len(self.mpi_cmd) + 2 + len(self.mpi_args)
        return [*args[:at], *extra, *args[at:]]

    @property
    def forwarded(self) -> list[str]:
        args = list(self.mpi_args)
        return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-x"]


class MLXControllerLauncher(LocalControllerLauncher):
    """ipyparallel's controller, run by :func:`run_controller` (its heartbeat reconnects)."""

    @default("controller_cmd")
    def _our_controller_cmd(self) -> list[str]:
        return [sys.executable, "-m", "mlx_cluster_magic.launch.controller"]


def run_controller() -> None:
    """ipyparallel's controller, whose heart monitor (a process of its own) re-makes its
    connections after a network drop: see ``rank.reconnect`` for why."""
    import ipyparallel.controller.app as controller_app

    controller_app.start_heartmonitor = start_reconnecting_heartmonitor
    controller_app.main()


def start_reconnecting_heartmonitor(**kwargs: Any) -> None:
    """ipyparallel's ``start_heartmonitor``, its sockets with ZMTP heartbeats (a connection
    silent for 3 s is closed, and the engine's new one comes in) and its pong socket handing an
    engine's identity over to that new connection. Module level: ``multiprocessing`` starts it
    by name (macOS spawns)."""
    import asyncio

    import zmq
    from ipyparallel.controller import heartmonitor

    ctx = zmq.Context()
    for name, value in LATEST_WORD_OPTIONS.items():
        ctx.setsockopt(getattr(zmq, name), value)
    ctx.setsockopt(zmq.ROUTER_HANDOVER, 1)  # inapplicable to the PUB: pyzmq skips it there
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(heartmonitor._setup_heartmonitor(ctx=ctx, **kwargs))
        loop.run_forever()
    finally:
        loop.close()
        ctx.destroy()


def new_cluster(
    *,
    n: int,
    profile_dir: str,
    controller_ip: str,
    controller_args: Sequence[str],
    timeout: float,
    curve: bool = True,
) -> ipp.Cluster:
    """An ipyparallel ``Cluster`` whose life cycle we own: no state file, no atexit of its own.

    The engines never get their connection in the environment (``mpiexec -x`` would carry it in
    clear): they read the controller's connection file, or this host's private copy of it.
    """
    write_controller_config(profile_dir, curve)
    return ipp.Cluster(
        send_engines_connection_env=False,
        n=n,
        profile_dir=profile_dir,
        cluster_file="",
        shutdown_atexit=False,
        controller_ip=controller_ip,
        controller_args=list(controller_args),
        engine_launcher_class=MLXEngineSetLauncher,
        controller_launcher_class=MLXControllerLauncher,
        delay=0,
        engine_timeout=int(timeout),
        log_level=40,
    )


def write_controller_config(profile_dir: str, curve: bool) -> None:
    """The controller's config, in the profile (0700), never on its command line: CurveZMQ on
    every socket (encrypted and the server authenticated), with our own HMAC key kept.

    ipyparallel 9.2 drops message signing when Curve is enabled unless ``Session.key`` is set
    (``controller/app.py``), and admits any Curve client (no ZAP handler): with the key kept,
    and known only to this kernel and, over ssh, the ranks, a client without it is refused.
    """
    # A Python config file: the key is bytes, which a JSON one cannot give.
    config = (
        f"c.Session.key = {secrets.token_hex(32).encode()!r}\n"
        f"c.IPController.enable_curve = {bool(curve)!r}\n"
    )
    path = os.path.join(profile_dir, "ipcontroller_config.py")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config)


def wait_for_engine_connection(cluster: ipp.Cluster, timeout: float) -> dict[str, Any]:
    """The controller's engine connection, once it has written it in full (it writes it when
    its sockets are bound); raises when the controller exits or ``timeout`` passes."""
    path = engine_connection_file(cluster)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            found = json.load(f)
            if isinstance(found, dict) and "key" in found:
                return found
        if launcher_exited(cluster.controller) or time.monotonic() > deadline:
            raise MLXClusterError(
                f"the controller wrote no connection file within {timeout:g} s (it exited, or "
                "this machine is overloaded): start again, with a longer --timeout if it recurs"
            )
        time.sleep(0.02)


def engine_connection_file(cluster: ipp.Cluster) -> str:
    """Where the controller writes the engines' connection (as ipyparallel's launchers name it)."""
    prefix = f"ipcontroller-{cluster.cluster_id}" if cluster.cluster_id else "ipcontroller"
    return os.path.join(cluster.profile_dir, "security", f"{prefix}-engine.json")


def client_connection_file(cluster: ipp.Cluster) -> str:
    """Where the controller writes the clients' connection (its keys: a 0600 file)."""
    prefix = f"ipcontroller-{cluster.cluster_id}" if cluster.cluster_id else "ipcontroller"
    return os.path.join(cluster.profile_dir, "security", f"{prefix}-client.json")


def stop(cluster: ipp.Cluster, client: ipp.Client | None = None, drain: float = 1.0) -> None:
    """Engines first, then the controller, once the hub has heard every engine's nanny say
    goodbye (at most ``drain`` seconds): a nanny whose goodbye finds no controller lingers 3 s
    (its socket's LINGER) on its host. ``client`` is closed in between."""
    with contextlib.suppress(Exception):
        cluster.stop_engines_sync()
    if client is not None:
        deadline = time.monotonic() + drain
        with contextlib.suppress(Exception):
            # the client's own thread applies the hub's unregistration notices to ``ids``
            while client.ids and time.monotonic() < deadline:
                time.sleep(0.01)
        with contextlib.suppress(Exception):
            client.close()
    with contextlib.suppress(Exception):
        cluster.stop_controller_sync()


def engine_launcher(cluster: ipp.Cluster | None) -> MLXEngineSetLauncher | None:
    if cluster is None or not cluster.engines:
        return None
    launcher = next(iter(cluster.engines.values()))
    return launcher if isinstance(launcher, MLXEngineSetLauncher) else None


def launcher_pids(cluster: ipp.Cluster | None) -> list[int]:
    """The controller's and mpiexec's pids, as the launchers know them."""
    if cluster is None:
        return []
    pids = []
    for launcher in [cluster.controller, *cluster.engines.values()]:
        process = getattr(launcher, "process", None) if launcher is not None else None
        if isinstance(process, psutil.Process):
            pids.append(process.pid)
    return pids


def launcher_exited(launcher: Any) -> bool:
    """Whether mpiexec has exited, asked of the process itself: ipyparallel learns of the exit
    only on its event loop, which nothing runs while a cell waits."""
    if launcher is None:
        return False
    if launcher.state == "after":
        return True
    process = getattr(launcher, "process", None)
    if not isinstance(process, psutil.Process):
        return False
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def no_graceful_wait(cluster: ipp.Cluster | None) -> None:
    """Make the next stop kill at once: a rank may be unreachable or stuck in C code."""
    if cluster is None:
        return
    for launcher in [cluster.controller, *cluster.engines.values()]:
        if launcher is not None:
            launcher.stop_seconds_until_kill = 1


def launcher_output(launcher: Any) -> list[str]:
    """mpiexec's combined output so far (non-empty lines)."""
    path = getattr(launcher, "output_file", None) if launcher is not None else None
    if not path:
        return []
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return [ln for ln in f.read().splitlines() if ln.strip()]
    return []


def launch_failure(output: list[str], what: str) -> str:
    """One line for a failed start, from mpiexec's output (inlined: the log is removed with the
    cluster's private directory)."""
    ours = [ln.split("mlx_cluster_magic: ", 1)[1] for ln in output if "mlx_cluster_magic: " in ln]
    if ours:
        return f"{what}: {ours[0]}"
    remote = [ln.split(":", 1)[1].strip() for ln in output if ln.strip().startswith("Remote host:")]
    if remote:
        return f"{what}: mpiexec could not start its daemon on {remote[0]!r} (ssh or prted failed)"
    tail = " | ".join(ln.strip() for ln in output[-4:] if ln.strip())
    return f"{what}; mpiexec's last output: {tail or '(none)'}"


_RANK_EXIT = re.compile(
    r"process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+) \(([^)]*)\)"
)


def death_cause(output: list[str]) -> str:
    """What Open MPI said about the first rank that died, e.g. ' (mpiexec: rank 1 on vm exited
    on signal Killed)'."""
    m = _RANK_EXIT.search(_joined(output))
    if m:
        return f" (mpiexec: rank {m.group(1)} on {m.group(3)} exited on signal {m.group(5)})"
    return ""


def reported_ranks(output: list[str]) -> list[int]:
    """Ranks that mpiexec reported as exited."""
    return sorted({int(m.group(1)) for m in _RANK_EXIT.finditer(_joined(output))})


def _joined(output: list[str]) -> str:
    """mpiexec's lines as one text: it wraps its notices (``... exited on`` / ``signal 9
    (Killed).``)."""
    return " ".join(ln.strip() for ln in output)


# ------------------------------------------------------------------------ results of %%px
def pending_targets(result: Any) -> list[int]:
    """The engines of an ``AsyncResult`` that have not answered yet."""
    return [t for t, ar in zip(result._targets, result._children) if not ar.done()]


def result_targets(result: Any) -> list[int]:
    return list(result._targets)


def autopx_enabled(magics: Any) -> bool:
    """Whether ``%autopx`` is on (the next call turns it off)."""
    return bool(getattr(magics, "_autopx", False))


def done_targets(result: Any) -> list[int]:
    return [t for t, ar in zip(result._targets, result._children) if ar.done()]


def output_ready(result: Any) -> bool:
    return bool(result._output_ready)


def name_result(result: Any, name: str) -> None:
    """The name an ``AsyncResult`` shows in its repr, as ipyparallel's magics set it."""
    result._fname = name


@contextlib.contextmanager
def stream_output(
    result: Any, hide_error: Callable[[dict[str, Any]], bool]
) -> Iterator[Callable[[], None]]:
    """``result.stream_output()``, shown from the cell's own thread: yields ``relay``, which
    shows what has arrived so far; call it while waiting (and it is called once more at the
    end).

    Two ways a rank's output left its cell in a real kernel. ipyparallel names each streamed
    display after the id of the request it answers, but output that had arrived before
    streaming began is shown with no request id: every rank's such piece became the one
    display ``-stdout``, each replacing the last (one ``[stdout:N]`` block gone; seen once in
    60 cells on a busy machine). Here each gets its request's id. And ipyparallel shows output
    from its client's I/O thread, where a kernel sends it to whichever cell is current at that
    moment; here the I/O thread only queues it and the cell's own thread shows it, so it
    belongs to the cell that waits for it.
    Each streamed error whose content (``ename``, ``traceback``...) ``hide_error`` picks is left
    out: the ranks' tracebacks of an interrupt we sent, said in one line per rank instead
    (``%pxresult`` still shows them).
    """
    show = result._iopub_streaming_output_callback
    arrived: queue.SimpleQueue[tuple[Any, Any, dict[str, Any]]] = queue.SimpleQueue()

    def callback(eid: Any, msg_future: Any, msg: dict[str, Any]) -> None:
        if not msg.get("parent_header"):
            # What had arrived before streaming began comes without a parent, and ipyparallel
            # names its display after the parent's id: every such piece, of every rank and
            # every cell, would be one display ("-stdout"), each replacing the last.
            msg = {**msg, "parent_header": {"msg_id": msg_future.msg_id}}
        arrived.put((eid, msg_future, msg))

    def relay() -> None:
        while True:
            try:
                eid, msg_future, msg = arrived.get_nowait()
            except queue.Empty:
                return
            if msg["header"]["msg_type"] == "error" and hide_error(msg["content"]):
                continue
            show(eid, msg_future, msg)

    result._iopub_streaming_output_callback = callback  # read by stream_output() as it starts
    try:
        with result.stream_output():
            try:
                yield relay
            finally:
                relay()
    finally:
        del result._iopub_streaming_output_callback


def errors_by_rank(result: Any) -> dict[int, Any]:
    """The remote errors of a finished ``AsyncResult`` by rank (``ename``, ``traceback``)."""
    exc = result.exception()
    if exc is None:
        return {}
    elist = getattr(exc, "elist", None)
    if elist is None:  # one engine: the RemoteError itself
        return {int((exc.engine_info or {}).get("engine_id", -1)): exc}
    return {
        int((info or {}).get("engine_id", -1)): ipp.error.RemoteError(ename, evalue, tb, info)
        for ename, evalue, tb, info in elist
    }


def send_signal(client: ipp.Client, sig: Any, targets: list[int], timeout: float) -> None:
    """Ask ``targets`` to signal themselves; never waits longer than ``timeout`` (a rank that
    mpiexec already killed never answers)."""
    with contextlib.suppress(Exception):
        ar = client.send_signal(sig, targets=targets, block=False)
        ar.wait(timeout)
