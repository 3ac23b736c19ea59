"""A kept cluster's runtime: the process that owns the cluster's processes and what watches them,
outside every notebook's kernel, so a kernel restart, a second notebook or a laptop that sleeps
leaves the cluster (and what its ranks hold) as it was.

``python -m mlx_cluster_magic.cluster.runtime_server start`` (locally, or over ssh on the Mac
given by ``--runtime-on``) reads the start options on its stdin, starts the runtime in a session
of its own (out of reach of the signals Jupyter sends a kernel's process group), its output to a
file, waits until the cluster runs and prints its record (one JSON line) for the notebook.
``serve`` is that runtime: an ``MLXCluster`` in this process (controller, ``mpiexec``, status
receiver, liveness keeper, the watch that breaks it on evidence), and the channel notebooks
call. It ends on ``stop`` from any notebook, on SIGTERM, or when no notebook used it for
``idle_timeout`` seconds; if it is killed outright, its watchdog stops every process it started.
``show ID`` prints a record (how a notebook on another Mac reads one over ssh).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from ..errors import MLXClusterError
from ..launch import ipp_adapter
from ..runtime import channel, records
from .life_cycle import MLXCluster

#: How long a stopped runtime goes on answering, so every attached notebook reads who stopped it.
LINGER_S = 3.0
#: A notebook that polled within this many seconds counts as attached (it polls twice a second).
ATTACHED_S = 2.0
#: How often the runtime looks whether it has been idle past its timeout.
IDLE_CHECK_S = 1.0
#: The runtime answers these from a thread of their own (they take seconds).
LONG_CALLS = frozenset({"stop", "restart", "why", "abort", "judge", "check_collectives"})
#: Calls that mean someone is using the cluster (the idle timeout counts from the last).
USING = frozenset({"touch", "restart", "record_cell", "check_collectives", "why", "abort"})
#: What a notebook may call on the runtime's cluster, by name; nothing else is answered.
CLUSTER_CALLS = frozenset({
    "judge", "loss", "dead_ranks", "death_cause", "describe_ranks", "refusal_pending",
    "hang_verdict", "waits_on_ended", "why", "history", "record_cell", "abort",
    "check_collectives", "dropped_status", "host_aliases", "mpiexec_command",
})  # fmt: skip
#: Reads of the runtime's status receiver.
STATUS_CALLS = frozenset({"metrics", "latest", "dropped_reasons", "usage_points", "sparklines"})


class Runtime:
    """Serves one cluster to the notebooks that attach, and ends it when asked or idle."""

    def __init__(
        self, cluster: MLXCluster, record: records.Record, folder: Path, ask: dict[str, Any]
    ) -> None:
        self.cluster, self.record, self.folder = cluster, record, folder
        #: What it was started with: a notebook that attached can start the same again.
        self.ask = ask
        self.server = channel.ChannelServer(record.channel_key)
        record.channel = self.server.url
        self.peers: dict[bytes, float] = {}
        self.last_used = time.time()
        self.stopper: bytes | None = None
        #: Notebooks that read the final state once the cluster ended.
        self.told: set[bytes] = set()
        self.ending: str | None = None  # why it ends (stopped, idle, signal)
        self.done = threading.Event()

    # ------------------------------------------------------------------ answers
    def handle(
        self, peer: bytes, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if method == "life":  # (a notebook attached polls; list and show only ask once)
            self.peers[peer] = time.monotonic()
            if self.done.is_set():
                self.told.add(peer)
        if method in USING:
            self.last_used = time.time()
        if method == "life":
            return self.life(peer)
        if method == "snapshot":
            return self.cluster.snapshot()
        if method == "nodes":
            return self.cluster._node_records()
        if method == "spec":
            return self.cluster.spec
        if method == "ask":
            return self.ask
        if method == "summary":
            return self.summary()
        if method == "stop":
            return self.stop(peer)
        if method == "restart":
            self.cluster.restart(**kwargs)
            self.record.connection = client_connection(self.cluster)
            write_record_quietly(self.record)
            return self.life(peer)
        if method == "touch":
            return None
        if method == "detach":  # a notebook that lets go (or whose kernel ends) says so
            self.peers.pop(peer, None)
            return None
        if method in CLUSTER_CALLS:
            return getattr(self.cluster, method)(*args, **kwargs)
        if method in STATUS_CALLS:
            return self.status_call(method, args)
        raise MLXClusterError(f"the runtime does not answer {method!r}")

    def status_call(self, method: str, args: tuple[Any, ...]) -> Any:
        run = self.cluster._run
        status = None if run is None else run.status
        if status is None:
            return {} if method == "dropped_reasons" else ([] if method != "latest" else None)
        if method == "usage_points":
            return status.usage.points()
        if method == "sparklines":
            return status.usage.sparklines(*args)
        return getattr(status, method)(*args)

    def life(self, peer: bytes) -> dict[str, Any]:
        """What a notebook's view and cells need to know twice a second."""
        c = self.cluster
        reason = c._reason
        if self.stopper is not None and peer != self.stopper and c.state == "stopped":
            reason = "stopped from another notebook"
        elif self.ending and c.state == "stopped" and self.stopper is None:
            reason = self.ending
        return {
            "state": c.state, "reason": reason, "breakage": c._breakage,
            "generation": c.generation, "banner": c.banner, "activity": c.activity,
            "ranks": c.ranks, "started_at": c.started_at, "restarting": c._restarting,
            "n": c.n, "last_nodes": c.last_nodes, "connection": self.record.connection,
            **self.evidence(),
        }  # fmt: skip

    def evidence(self) -> dict[str, Any]:
        """What a cell's wait asks of the cluster every few ms, sent with every state."""
        c = self.cluster
        if c.state != "running":
            return {}
        try:
            return {"loss": c.loss(), "dead_ranks": c.dead_ranks()}
        except Exception:
            return {}

    def summary(self) -> dict[str, Any]:
        now = time.monotonic()
        attached = sum(1 for t in self.peers.values() if now - t < ATTACHED_S)
        return {
            "state": self.cluster.state, "attached": attached, "idle_since": self.idle_since(),
            "idle_timeout": self.record.idle_timeout,
        }  # fmt: skip

    def idle_since(self) -> float:
        """The last time a notebook ran something or a rank was busy."""
        with contextlib.suppress(Exception):
            if any(n.state == "busy" for n in self.cluster._node_records()):
                self.last_used = time.time()
        return self.last_used

    def stop(self, peer: bytes | None, why: str | None = None) -> dict[str, Any]:
        self.stopper = peer
        self.ending = why
        self.cluster.stop()
        if why:
            self.cluster._reason = why
        self.done.set()
        return self.life(peer or b"")

    # ------------------------------------------------------------------ the loop
    def serve(self) -> None:
        write_record_quietly(self.record)
        checked = 0.0
        while not self.done.is_set():
            self.server.serve_once(self.handle, LONG_CALLS)
            timeout = self.record.idle_timeout
            if timeout is None or time.monotonic() - checked < IDLE_CHECK_S:
                continue
            checked = time.monotonic()  # (the rows are read once a second, not every request)
            if time.time() - self.idle_since() > timeout:
                threading.Thread(
                    target=self.stop, args=(None, f"stopped: idle for {records.span(timeout)}"),
                    daemon=True,
                ).start()  # fmt: skip
                self.done.wait(30)
        # The others read who stopped it; then the record goes.
        with contextlib.suppress(OSError):
            (self.folder / records.RECORD).unlink()
        now = time.monotonic()
        waiting = {p for p, t in self.peers.items() if now - t < ATTACHED_S} - {self.stopper}
        deadline = now + LINGER_S
        while waiting - self.told and time.monotonic() < deadline:
            self.server.serve_once(self.handle, frozenset(), timeout_ms=100)
        self.server.close()


def client_connection(cluster: MLXCluster) -> dict[str, Any]:
    """ipyparallel's client connection of the cluster's controller (its keys included)."""
    run = cluster._run
    if run is None:
        return {}
    with open(ipp_adapter.client_connection_file(run.ipp), encoding="utf-8") as f:
        content: dict[str, Any] = json.load(f)
    return content


def write_record_quietly(record: records.Record) -> None:
    with contextlib.suppress(OSError, MLXClusterError):
        records.write_record(record)


# ---------------------------------------------------------------------- the runtime's process
def serve(folder: Path) -> int:
    """The runtime itself: start the cluster, then answer notebooks until it ends."""
    ask = records.read_private(folder / records.OPTIONS)
    (folder / records.OPTIONS).unlink()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runtime: list[Runtime] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if runtime:
            threading.Thread(
                target=runtime[0].stop, args=(None, "stopped: its runtime was told to end"),
                daemon=True,
            ).start()  # fmt: skip
        else:
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    options: dict[str, Any] = dict(ask["options"])
    if ask.get("hostfile_text") is not None:  # (its own name: the format may go by it)
        hostfile = folder / os.path.basename(str(options["hostfile"]) or "hosts")
        fd = os.open(hostfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(ask["hostfile_text"])
        options["hostfile"] = str(hostfile)
    cluster = MLXCluster(**options)
    try:
        cluster.start()
    except BaseException as e:
        with contextlib.suppress(Exception):
            cluster.stop()
        text = str(e) if isinstance(e, MLXClusterError) else f"{type(e).__name__}: {e}"
        records.write_private(folder / records.FAILED, {"error": text or "the start was stopped"})
        return 1
    proc = psutil.Process()
    record = records.Record(
        id=folder.name, pid=proc.pid, pid_started=proc.create_time(),
        host=socket.gethostname(), started=time.time(), channel="",
        channel_key=channel.new_key(), connection=client_connection(cluster),
        hosts=[ask.get("runtime_on") or "localhost" if h.is_local else h.ssh
               for h in cluster.placement.hosts],
        n=cluster.n, backend=cluster.backend,
        idle_timeout=ask.get("idle_timeout"), runtime_on=ask.get("runtime_on"),
        ssh=options.get("ssh"),
    )  # fmt: skip
    runtime.append(Runtime(cluster, record, folder, ask))
    try:
        runtime[0].serve()
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()
        records.remove_folder(folder)
    return 0


def launch(stdin: Any = None) -> int:
    """Start a runtime in a session of its own and print its record once its cluster runs (or
    the one line that says why it could not)."""
    ask = json.load(stdin or sys.stdin)
    cluster_id = records.new_id()
    folder = records.private_dir(records.folder_of(cluster_id))
    records.write_private(folder / records.OPTIONS, ask)
    log = os.open(folder / records.LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_cluster_magic.cluster.runtime_server", "serve", str(folder)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    os.close(log)

    def give_up(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, give_up)
    try:
        while True:
            if (folder / records.RECORD).exists():
                record = records.read_private(folder / records.RECORD)
                print(json.dumps({"ok": True, "record": record}))
                return 0
            if proc.poll() is not None:
                print(json.dumps({"ok": False, "error": _failure(folder)}))
                records.remove_folder(folder)
                return 1
            time.sleep(0.05)
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        records.remove_folder(folder)
        print(json.dumps({"ok": False, "error": "the start was stopped"}))
        return 1


def _failure(folder: Path) -> str:
    with contextlib.suppress(MLXClusterError, KeyError):
        return str(records.read_private(folder / records.FAILED)["error"])
    with contextlib.suppress(OSError):
        lines = (folder / records.LOG).read_text(errors="replace").strip().splitlines()
        if lines:
            return f"the runtime exited: {lines[-1]}"
    return "the runtime exited before its cluster ran"


def show(cluster_id: str) -> int:
    """A record of this machine's, if its runtime still runs (for a notebook over ssh)."""
    try:
        record = records.read_record(cluster_id)
    except MLXClusterError as e:
        missing = not (records.folder_of(cluster_id) / records.RECORD).exists()
        print(json.dumps({"ok": False, "error": str(e), "gone": "ended" if missing else None}))
        return 1
    if not records.runtime_alive(record):
        records.remove_folder(records.folder_of(cluster_id))
        print(json.dumps({"ok": False, "error": records.died_line(record), "gone": "died"}))
        return 1
    print(json.dumps({"ok": True, "record": record.as_dict()}))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["start"]:
        return launch()
    if argv[:1] == ["serve"] and len(argv) == 2:
        return serve(Path(argv[1]))
    if argv[:1] == ["show"] and len(argv) == 2:
        return show(argv[1])
    print("usage: python -m mlx_cluster_magic.cluster.runtime_server start|serve DIR|show ID",
          file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
