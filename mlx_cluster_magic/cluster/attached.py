"""The notebook's side of a kept cluster: starting its runtime (here, or over ssh on the Mac
given by ``--runtime-on``), finding the user's running clusters, and the link an attached
``MLXCluster`` reads and commands them through. Owns no process of the cluster: what it starts
is the runtime's launcher (which returns once the runtime runs) and, for a runtime on another
Mac, one ssh process that forwards the runtime's channel and the controller's ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import ipyparallel as ipp

from ..errors import MLXClusterError
from ..fabric.doctor import collect
from ..runtime import channel, records
from ..runtime.records import Record

if TYPE_CHECKING:
    from ..launch.spec import ClusterSpec

#: The controller's ports a client connects to (ipyparallel's client connection file).
CLIENT_PORTS = ("registration", "control", "task", "mux", "iopub", "notification", "broadcast")
#: How long attaching waits for every engine to be known to the new client.
ATTACH_WAIT_S = 15.0
RUNTIME_MODULE = "mlx_cluster_magic.cluster.runtime_server"
#: How long a stop waits for the runtime's process to end (it tells the other notebooks first).
RUNTIME_EXIT_S = 10.0


# ---------------------------------------------------------------------------- starting one
def runtime_ask(
    options: dict[str, Any], *, runtime_on: str | None, idle_timeout: float | None
) -> dict[str, Any]:
    """What a runtime is started with: the start options as given, the hostfile's text (the
    runtime may run on another Mac), where it runs, when it ends unused."""
    ask: dict[str, Any] = {"options": dict(options), "idle_timeout": idle_timeout,
                           "runtime_on": runtime_on, "hostfile_text": None}  # fmt: skip
    hostfile = options.get("hostfile")
    if hostfile is not None:
        try:
            with open(hostfile, encoding="utf-8") as f:
                ask["hostfile_text"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise MLXClusterError(f"cannot read the hostfile {hostfile}: {e}") from None
        ask["options"]["hostfile"] = os.path.basename(hostfile)
    return ask


def start_runtime(ask: dict[str, Any], *, ssh: str | None, python: str | None) -> Record:
    """Start a runtime for ``ask`` and return its record once its cluster runs."""
    runtime_on = ask["runtime_on"]
    if runtime_on is None:
        argv = [sys.executable, "-m", RUNTIME_MODULE, "start"]
    else:
        remote = shlex.join([python or "python3", "-m", RUNTIME_MODULE, "start"])
        argv = [*ssh_argv(ssh), "-o", "BatchMode=yes", runtime_on, remote]
    reply = _run_json(argv, json.dumps(ask), "start its runtime", runtime_on)
    record = Record.of(reply)
    if runtime_on is not None:
        record.runtime_on, record.ssh = runtime_on, ssh
        records.write_pointer(record.id, runtime_on, ssh, python or "python3")
    return record


def _run_json(argv: list[str], stdin: str, doing: str, host: str | None) -> dict[str, Any]:
    """Run a launcher that prints one JSON line; its record, or its one line as the error."""
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    except OSError as e:
        raise MLXClusterError(f"cannot {doing}: {e}") from None
    try:
        out, err = proc.communicate(stdin)
    except BaseException:
        proc.terminate()  # the launcher ends the runtime it started
        with contextlib.suppress(Exception):
            proc.communicate(timeout=60)
        raise
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), "")
    try:
        reply = json.loads(line)
    except ValueError:
        where = f" on {host}" if host else ""
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise MLXClusterError(f"cannot {doing}{where}: {last}") from None
    if not reply.get("ok"):
        error = str(reply.get("error", "failed"))
        if reply.get("gone"):
            raise RuntimeGone(error, str(reply["gone"]))
        raise MLXClusterError(error)
    record: dict[str, Any] = reply["record"]
    return record


def ssh_argv(ssh: str | None) -> list[str]:
    """The user's ssh (as the doctor splits it), no X11, a bounded connect."""
    return [*collect.ssh_argv(ssh), "-x", "-o", "ConnectTimeout=10"]


# ---------------------------------------------------------------------------- finding them
@dataclass
class Found:
    """A running kept cluster as ``list`` shows it."""

    record: Record
    summary: dict[str, Any] = field(default_factory=dict)


def running_clusters() -> tuple[list[Found], list[str]]:
    """This user's running kept clusters (here, and on other Macs this user's notebooks
    started), and one line for each found dead (its record removed)."""
    found: list[Found] = []
    gone: list[str] = []
    here = socket.gethostname()
    for _id, folder in records.local_records():
        try:
            record = Record.of(records.read_private(folder / records.RECORD))
        except MLXClusterError:
            if not any(folder.glob(f"*{records.OPTIONS}")) and _stale(folder):
                records.remove_folder(folder)
            continue
        if record.host != here:
            continue  # (a home shared with another machine: that machine's runtime)
        if not records.runtime_alive(record):
            records.remove_folder(folder)
            gone.append(records.died_line(record))
            continue
        found.append(Found(record))
    for pointer in records.pointers():
        try:
            record = remote_record(str(pointer["id"]), str(pointer["host"]), pointer.get("ssh"),
                                   str(pointer.get("python") or "python3"))  # fmt: skip
        except RuntimeGone as e:
            records.remove_pointer(str(pointer["id"]))
            gone.append(str(e))
            continue
        except MLXClusterError as e:
            gone.append(f"cluster {pointer['id']} on {pointer['host']}: {e}")
            continue
        found.append(Found(record))
    return found, gone


def _stale(folder: Path) -> bool:
    """A folder without a record that nobody wrote to for a minute (a launcher killed early)."""
    with contextlib.suppress(OSError):
        return time.time() - folder.stat().st_mtime > 60
    return False


class RuntimeGone(MLXClusterError):
    """The runtime of a kept cluster is not running any more: it ``died`` (its record says
    so) or ``ended`` (its record is gone)."""

    def __init__(self, line: str, how: str = "died") -> None:
        super().__init__(line)
        self.how = how


def remote_record(cluster_id: str, host: str, ssh: str | None, python: str) -> Record:
    """A runtime's record read over ssh from the Mac it runs on."""
    remote = shlex.join([python, "-m", RUNTIME_MODULE, "show", cluster_id])
    argv = [*ssh_argv(ssh), "-o", "BatchMode=yes", host, remote]
    try:
        reply = _run_json(argv, "", f"read cluster {cluster_id}'s record", host)
    except RuntimeGone as e:
        if e.how == "ended":
            raise RuntimeGone(
                f"cluster {cluster_id} on {host} is gone: its runtime ended (its record is no "
                "longer there); removed from the list", "ended"
            ) from None
        raise
    record = Record.of(reply)
    record.runtime_on, record.ssh = host, ssh
    return record


def find(cluster_id: str | None) -> Record:
    """The record to attach to: by id (or a record's folder), else the only running cluster."""
    if cluster_id is not None:
        return _by_id(cluster_id)
    found, gone = running_clusters()
    for line in gone:
        print(line)
    if not found:
        raise MLXClusterError(
            "no kept cluster is running: start one with %mlx_cluster start --keep"
        )
    if len(found) > 1:
        ids = ", ".join(f.record.id for f in found)
        raise MLXClusterError(
            f"{len(found)} kept clusters run ({ids}): name one, %mlx_cluster attach ID"
        )
    return found[0].record


def _by_id(cluster_id: str) -> Record:
    """One cluster's record, looked up where it lives (this machine's runtimes, or the Mac a
    pointer names): no other record is read."""
    if os.sep in cluster_id:  # a record's folder given by path (another user's is refused)
        return Record.of(records.read_private(Path(cluster_id) / records.RECORD))
    folder = records.folder_of(cluster_id)  # an id as list shows it, else one line
    missing = f"no running cluster {cluster_id!r} of yours; %mlx_cluster list shows them"
    record: Record | None = None
    if (folder / records.RECORD).exists():
        record = Record.of(records.read_private(folder / records.RECORD))
    if record is not None and record.host == socket.gethostname():
        if records.runtime_alive(record):
            return record
        records.remove_folder(folder)
        raise RuntimeGone(records.died_line(record))
    for pointer in records.pointers():
        if pointer.get("id") == cluster_id:
            try:
                return remote_record(cluster_id, str(pointer["host"]), pointer.get("ssh"),
                                     str(pointer.get("python") or "python3"))  # fmt: skip
            except RuntimeGone:
                records.remove_pointer(cluster_id)
                raise
    raise MLXClusterError(missing)


def seen_from_here(spec: ClusterSpec, record: Record) -> ClusterSpec:
    """A runtime's spec as this notebook sees it: the Mac the runtime runs on is ``localhost``
    to the runtime, and its ssh name here."""
    import dataclasses

    from ..fabric.placement import Placement

    if record.runtime_on is None:
        return spec
    p = spec.placement
    hosts = tuple(
        dataclasses.replace(h, ssh=record.runtime_on) if h.is_local else h for h in p.hosts
    )
    placement = Placement(hosts, p.per_host, p.backend, p.envs)
    return dataclasses.replace(spec, placement=placement)


# ---------------------------------------------------------------------------- the link
class RuntimeLink:
    """An attached notebook's connection to a runtime: its channel, and for a runtime on
    another Mac the ssh process that forwards the channel and the controller's ports."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.tunnel: subprocess.Popen[bytes] | None = None
        self._forwards: dict[str, int] = {}
        url = record.channel
        if record.runtime_on is not None:
            url = self._open_tunnel(record)
        self.channel = channel.ChannelClient(url, record.channel_key, self._gone)

    def _gone(self) -> str | None:
        """Why the runtime is known gone: its process here ended (one on another Mac may only
        be out of reach, so it is never declared gone from here)."""
        record = self.record
        if record.runtime_on is None and not records.runtime_alive(record):
            return f"the cluster's runtime (pid {record.pid} on {record.host}) is gone"
        return None

    def gone_there(self) -> bool:
        """Whether the Mac the runtime runs on says, over ssh, that it is not running."""
        record = self.record
        assert record.runtime_on is not None
        pointer = next((p for p in records.pointers() if p.get("id") == record.id), {})
        try:
            remote_record(record.id, record.runtime_on, record.ssh,
                          str(pointer.get("python") or "python3"))  # fmt: skip
        except RuntimeGone:
            records.remove_pointer(record.id)
            return True
        except MLXClusterError:
            return False  # out of reach: not known gone
        return False

    def notify(self, method: str, *args: Any) -> None:
        """Send ``method`` without waiting for its answer (the runtime takes calls in order)."""
        self.channel.notify(method, *args)

    def call(self, method: str, *args: Any, timeout: float = channel.CALL_TIMEOUT_S,
             **kwargs: Any) -> Any:  # fmt: skip
        tunnel = self.tunnel
        if tunnel is not None and tunnel.poll() is not None:
            # ssh ended (the laptop slept, its network changed): forward the same local ports
            # again, so the channel and ipyparallel's sockets reconnect by themselves.
            self._open_tunnel(self.record)
        return self.channel.call(method, *args, timeout=timeout, **kwargs)

    def _open_tunnel(self, record: Record) -> str:
        """``ssh -L`` for the channel and every controller port, on local ports of our own."""
        chan_host, chan_port = record.channel.removeprefix("tcp://").rsplit(":", 1)
        targets = {"channel": (chan_host, int(chan_port))}
        conn = record.connection
        ctrl = str(conn["interface"]).removeprefix("tcp://")
        for key in CLIENT_PORTS:
            targets[key] = (ctrl, int(conn[key]))
        return self._forward(record, targets)

    def _forward(self, record: Record, targets: dict[str, tuple[str, int]]) -> str:
        assert record.runtime_on is not None
        forwards = []
        for key, (host, port) in targets.items():
            local = self._forwards.get(key) or _free_port()
            self._forwards[key] = local
            forwards += ["-L", f"127.0.0.1:{local}:{host}:{port}"]
        argv = [*ssh_argv(record.ssh), "-N", "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3", *forwards, record.runtime_on]  # fmt: skip
        self.tunnel = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.tunnel.poll() is not None:
                err = (self.tunnel.stderr.read() if self.tunnel.stderr else b"").decode()
                last = (err.strip().splitlines() or ["ssh exited"])[-1]
                raise MLXClusterError(f"cannot reach {record.runtime_on} over ssh: {last}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self._forwards["channel"]), timeout=0.5
            ):
                return f"tcp://127.0.0.1:{self._forwards['channel']}"
            time.sleep(0.1)
        self.close()
        raise MLXClusterError(f"the ssh forwarding to {record.runtime_on} did not come up in 20 s")

    def client_connection(self, connection: dict[str, Any]) -> dict[str, Any]:
        """ipyparallel's client connection, through the forwarded ports when remote."""
        conn = dict(connection)
        if self.record.runtime_on is None:
            return conn
        if str(conn["interface"]).removeprefix("tcp://") != self._forwarded_controller:
            self._reforward(conn)
        conn["interface"], conn["location"] = "tcp://127.0.0.1", None
        for key in CLIENT_PORTS:
            conn[key] = self._forwards[key]
        return conn

    @property
    def _forwarded_controller(self) -> str:
        return str(self.record.connection["interface"]).removeprefix("tcp://")

    def _reforward(self, conn: dict[str, Any]) -> None:
        """A restarted controller listens on new ports: forward those instead (the channel's
        local port stays, so its socket reconnects by itself)."""
        self._close_tunnel()
        self._forwards = {"channel": self._forwards["channel"]}
        self.record.connection = conn
        self._open_tunnel(self.record)

    def connect_client(self, connection: dict[str, Any], n: int) -> tuple[ipp.Client, Any]:
        """An ipyparallel Client on the runtime's controller, with every rank registered."""
        if self.record.runtime_on is not None and connection != self.record.connection:
            self._reforward(connection)
        client = ipp.Client(self.client_connection(connection), timeout=ATTACH_WAIT_S)
        deadline = time.monotonic() + ATTACH_WAIT_S
        while len(client.ids) < n:
            if time.monotonic() > deadline:
                client.close()
                raise MLXClusterError(
                    f"only {len(client.ids)} of {n} ranks answer the cluster's controller"
                )
            time.sleep(0.05)
        view = client[list(range(n))]
        view.block = True
        _until_output_arrives(client, view)
        return client, view

    def _close_tunnel(self) -> None:
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None and tunnel.poll() is None:
            tunnel.terminate()
            try:
                tunnel.wait(5)
            except subprocess.TimeoutExpired:
                tunnel.kill()
                tunnel.wait()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()
        self._close_tunnel()


def _until_output_arrives(client: ipp.Client, view: Any) -> None:
    """A new client's output subscription takes a moment to reach the controller: output sent
    before it did is lost, and a blocking ``execute`` waits for it for ever. Engines that
    registered long ago answer at once, so wait until an empty request's output arrives."""
    deadline = time.monotonic() + ATTACH_WAIT_S
    while True:
        result = view.execute("", block=False)
        result.get(timeout=ATTACH_WAIT_S)
        if result.wait_for_output(timeout=0.1):
            return
        if time.monotonic() > deadline:
            client.close()
            raise MLXClusterError("the cluster's controller sends no output to this notebook")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- what views read
class UsageProxy:
    """The runtime's utilisation series, as ``StatusReceiver.usage`` answers."""

    def __init__(self, link: RuntimeLink) -> None:
        self._link = link

    def points(self) -> Any:
        return self._link.call("usage_points")

    def sparklines(self, hosts: list[str]) -> Any:
        return self._link.call("sparklines", hosts)


class StatusProxy:
    """What the views read of a status receiver, read from the runtime that holds it."""

    def __init__(self, link: RuntimeLink) -> None:
        self._link = link
        self.usage = UsageProxy(link)

    def nodes(self) -> Any:
        return self._link.call("nodes")

    def metrics(self, limit: int | None = None) -> Any:
        return self._link.call("metrics", *(() if limit is None else (limit,)))

    def latest(self, rank: int, key: str) -> Any:
        return self._link.call("latest", rank, key)

    def dropped_reasons(self) -> Any:
        return self._link.call("dropped_reasons")


class Run(Protocol):
    """What the views and tools read of a run, whoever holds its processes: this kernel
    (``bringup.Running``) or a kept cluster's runtime (``AttachedRun``)."""

    spec: ClusterSpec
    client: Any
    view: Any
    ranks: list[dict[str, Any]]
    started_at: float
    status: Any
    rank_procs: dict[int, Any]

    @property
    def n(self) -> int: ...


@dataclass
class AttachedRun:
    """The notebook's half of a run a runtime holds: what ``bringup.Running`` gives the
    views and tools, with no process behind it."""

    spec: ClusterSpec
    client: ipp.Client
    view: Any
    ranks: list[dict[str, Any]]
    started_at: float
    status: StatusProxy | None
    rank_procs: dict[int, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.spec.n


# ---------------------------------------------------------------------------- list
class KeptClusters(list):  # type: ignore[type-arg]
    """The user's running kept clusters as ``%mlx_cluster list`` shows them: still a list of
    dicts (id, hosts, ranks, runtime, started, notebooks, idle_since, idle_timeout, state)."""

    gone: list[str]

    @classmethod
    def now(cls) -> KeptClusters:
        found, gone = running_clusters()
        rows = cls(_row(f.record) for f in found)
        rows.gone = gone
        for line in gone:
            print(line)
        return rows

    def _lines(self) -> list[str]:
        if not self:
            return ["no kept cluster of yours is running (%mlx_cluster start --keep starts one)"]
        head = ("id", "hosts", "ranks", "runtime", "started", "notebooks", "idle since",
                "ends idle")  # fmt: skip
        table = [head] + [_cells(r) for r in self]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]

    def __repr__(self) -> str:
        return "\n".join(self._lines())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
    notebooks = "?" if r["notebooks"] is None else str(r["notebooks"])
    return (
        r["id"], ",".join(r["hosts"]), str(r["ranks"]), r["runtime"], _clock(r["started"]),
        notebooks, _clock(r["idle_since"]), records.span(r["idle_timeout"]),
    )  # fmt: skip


def _row(record: Record) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        link = RuntimeLink(record)
        try:
            summary = link.call("summary", timeout=3)
        finally:
            link.close()
    return {
        "id": record.id, "hosts": list(record.hosts), "ranks": record.n,
        "runtime": record.runtime_on or f"here ({record.host})", "started": record.started,
        "notebooks": summary.get("attached"), "idle_since": summary.get("idle_since"),
        "idle_timeout": record.idle_timeout, "state": summary.get("state", "?"),
    }  # fmt: skip


def _clock(t: float | None) -> str:
    return "?" if t is None else time.strftime("%H:%M:%S", time.localtime(t))
