"""Sync, head side: a file or tree from the notebook's machine to every host of the cluster.

1. The tree is listed here (``manifest``: kind, path, size, modification time, mode, a link's
   target; with ``verify`` each file's SHA-256).
2. One rank per host says what it lacks (``rank.sync_receiver.survey``), whether it can write
   there and its free space; with ``shards`` each host is asked only about the files its ranks
   load. Every refusal (a missing path, a destination that cannot be written, too little
   space, naming the host and the shortfall) comes before a byte is sent.
3. ``fabric.sync_plan`` routes the bytes along the cables; each host listens on the address
   its upstream reaches it at, with a token of its own that only it and its upstream are given
   (through the engines' channel), and forwards as it receives.
4. The head streams each file once per direct downstream host, in records each signed with
   the hop's key (``rank.stream_auth``: a stranger can neither join nor alter a stream),
   showing bytes done, the rate and the time left; an interrupt cuts every connection, so
   every host stops within a second and keeps only temporary names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MLXClusterError
from ..fabric import sync_plan
from ..rank import stream_auth, sync_receiver
from ..rank.sync_receiver import Entry
from ..rank.sync_stream import TreeStream as _Stream

SHARDS = ("pipeline", "tensor")
#: Files every rank of a model reads, whatever its layers (mlx-lm's ``sharded_load`` fetches
#: these before it knows its shard).
_NON_WEIGHT = re.compile(r"\.(json|py|model|tiktoken|txt|jsonl|jinja)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------- the tree
def manifest(root: Path, verify: bool) -> list[Entry]:
    """Every entry under ``root`` (parents before children; ``root`` itself is ``""``)."""

    def entry(path: Path, rel: str) -> Entry:
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            return ("link", rel, 0, 0, 0, os.readlink(path))
        if stat.S_ISDIR(st.st_mode):
            return ("dir", rel, 0, 0, mode, "")
        if not stat.S_ISREG(st.st_mode):
            raise MLXClusterError(f"sync: {path} is not a file, directory or link")
        digest = _sha256(path) if verify else ""
        return ("file", rel, st.st_size, st.st_mtime_ns, mode, digest)

    if not root.is_dir() or root.is_symlink():
        return [entry(root, "")]
    out = [entry(root, "")]
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(folder)
        for name in sorted(dirs) + sorted(files):
            path = base / name
            out.append(entry(path, str(path.relative_to(root))))
        # a link to a directory is kept as a link: do not walk into it
        dirs[:] = [d for d in dirs if not (base / d).is_symlink()]
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- shards
def pipeline_files(model_dir: Path, n_ranks: int, plan: Any = None) -> list[set[str]] | None:
    """The weight files each rank loads in a pipeline of ``n_ranks``: mlx-lm's split (rank 0
    holds the last layers; the low ranks one more when it does not divide), or each rank's
    ``plan.ranks[r].files`` when a memory plan is given. None: not a sharded mlx-lm model."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise MLXClusterError(f"sync --shards pipeline: cannot read {index}: {e}") from None
    if plan is not None and getattr(plan, "ranks", None) is not None:
        ranks = list(plan.ranks)
        if len(ranks) != n_ranks:
            raise MLXClusterError(
                f"sync --shards pipeline: the pipeline plan has {len(ranks)} ranks, "
                f"the cluster {n_ranks}; plan again with cluster.plan_pipeline"
            )
        return [set(r.files) for r in ranks]
    layers = config.get("num_hidden_layers") or config.get("n_layers")
    if not isinstance(layers, int) or layers < n_ranks:
        raise MLXClusterError(
            f"sync --shards pipeline: {model_dir}/config.json gives {layers!r} layers for "
            f"{n_ranks} ranks"
        )
    base, extra = divmod(layers, n_ranks)
    split = [base + (1 if r < extra else 0) for r in range(n_ranks)]
    out = []
    for r in range(n_ranks):
        start = sum(split[r + 1 :])
        end = start + split[r]
        files = set()
        for key, name in weight_map.items():
            m = _LAYER.search(key)
            if m is None or start <= int(m.group(1)) < end:
                files.add(name)
        out.append(files)
    return out


def _wanted(
    entries: Sequence[Entry],
    shards: str | None,
    rank_files: list[set[str]] | None,
    host_ranks: Sequence[int],
) -> list[int] | None:
    """The entries a host asks about: all (None), or with ``--shards pipeline`` everything but
    the weight files of other ranks' layers."""
    if shards != "pipeline" or rank_files is None:
        return None
    weights = set().union(*rank_files)
    mine = set().union(*(rank_files[r] for r in host_ranks))
    return [
        i for i, e in enumerate(entries) if e[0] != "file" or e[1] not in weights or e[1] in mine
    ]


# --------------------------------------------------------------------------- report
@dataclass
class HostResult:
    host: str
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    wanted_bytes: int = 0
    error: str | None = None


@dataclass
class SyncReport:
    """What a sync did: per host the files and bytes written, how many were already there,
    the route and the time."""

    source: str
    dest: str
    total_bytes: int
    hosts: list[HostResult] = field(default_factory=list)
    route: str = ""
    seconds: float = 0.0
    sent: int = 0  # bytes the head sent
    note: str = ""

    @property
    def ok(self) -> bool:
        return all(h.error is None for h in self.hosts)

    def __repr__(self) -> str:
        lines = [
            f"sync {self.source} -> {self.dest}: {len(self.hosts)} host(s), "
            f"{self.seconds:.2f} s" + (f", route {self.route}" if self.route else "")
        ]
        if self.note:
            lines.append(f"  {self.note}")
        for h in self.hosts:
            part = (
                f" ({h.wanted_bytes / self.total_bytes:.0%} of the tree is for this host)"
                if self.total_bytes and h.wanted_bytes != self.total_bytes
                else ""
            )
            state = f"FAILED: {h.error}" if h.error else "ok"
            lines.append(
                f"  {h.host}: {h.files} file(s) written, {_size(h.bytes)}, "
                f"{h.skipped} already there{part}; {state}"
            )
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class Progress:
    """The progress line: in a notebook one display updated in place, else a printed line."""

    def __init__(
        self, total: int, show: bool, also: Callable[[str | None], None] | None = None
    ) -> None:
        self.total, self.show, self.t0, self.also = total, show, time.monotonic(), also
        self._handle: Any = None
        self._last = 0.0

    def update(self, done: int, rates: dict[str, float], final: bool = False) -> None:
        if not final and time.monotonic() - self._last < 0.5:
            return
        self._last = time.monotonic()
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else float("inf")
        per = ", ".join(f"{h} {r / 1e6:.0f} MB/s" for h, r in rates.items())
        eta = "done" if final else (f"{left:.0f} s left" if left != float("inf") else "")
        line = f"sync: {_size(done)} of {_size(self.total)} sent · {per} · {eta}".rstrip(" ·")
        if self.also is not None:  # the status view shows it too, while it runs
            with contextlib.suppress(Exception):
                self.also(None if final else line)
        if not self.show:
            return
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None and type(get_ipython()).__name__ == "ZMQInteractiveShell":
                from IPython.display import Pretty

                if self._handle is None:
                    self._handle = display(Pretty(line), display_id=True)  # type: ignore[no-untyped-call]
                else:
                    self._handle.update(Pretty(line))  # type: ignore[no-untyped-call]
                return
        except ImportError:
            pass
        print("\r" + line, end="\n" if final else "", flush=True)


# --------------------------------------------------------------------------- sending
def _head_interfaces() -> tuple[dict[str, list[str]], list[str]]:
    from ..launch import mpi_job

    interfaces = mpi_job.local_interfaces()
    bridges = [
        name
        for name in interfaces
        if Path(f"/sys/class/net/{name}/bridge").exists() or name.startswith("bridge")
    ]
    return interfaces, bridges


def run_sync(
    cluster: Any,
    path: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    shards: str | None = None,
    verify: bool = False,
    progress: bool = True,
    stall_s: float = sync_receiver.STALL_S,
) -> SyncReport:
    """Copy ``path`` to every host of ``cluster`` at ``dest`` (default: the same absolute
    path); see the module docstring."""
    t0 = time.monotonic()
    if shards is not None and shards not in SHARDS:
        raise MLXClusterError(f"sync: --shards is pipeline or tensor, got {shards!r}")
    source = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not source.exists() and not source.is_symlink():
        raise MLXClusterError(f"sync: {source} does not exist on this machine")
    target = os.path.abspath(os.path.expanduser(os.fspath(dest))) if dest else str(source)
    entries = manifest(source, verify)
    report = SyncReport(str(source), target, sum(e[2] for e in entries))
    rank_files = _pipeline_rank_files(cluster, source, entries) if shards == "pipeline" else None
    host_ranks, local_of = _hosts(cluster.placement)
    names = [h for h in host_ranks if not (local_of[h] and target == str(source))]
    if not names:
        report.note = "every rank runs on this machine, where it already is: nothing to send"
        report.seconds = time.monotonic() - t0
        return report
    first = [host_ranks[h][0] for h in names]
    wanted = [_wanted(entries, shards, rank_files, host_ranks[h]) for h in names]
    found, needs = _survey(cluster.client, report, entries, names, first, wanted, verify)
    if not any(needs):
        report.seconds = time.monotonic() - t0
        return report
    route = _route(cluster, names, first, found, local_of)
    report.route = route.describe()
    job = _Job(cluster.client, source, target, entries, names, first, route, needs, verify, stall_s)
    job.open_listeners()
    job.start_receivers()
    bar = job.stream(progress, lambda line: _show(cluster, line))
    elapsed = max(time.monotonic() - bar.t0, 1e-6)
    report.sent = sum(s.sent for s in job.streams)
    bar.update(report.sent, {s.host: s.sent / elapsed for s in job.streams}, final=True)
    _collect(report, names, route, job.receivers, job.failed, job.streams)
    report.seconds = time.monotonic() - t0
    return report


def _pipeline_rank_files(cluster: Any, source: Path, entries: Sequence[Entry]) -> list[set[str]]:
    """With ``--shards pipeline``: the weight files each rank loads, by the cluster's plan for
    this model where there is one, else by mlx-lm's even split."""
    if entries[0][0] != "dir":
        raise MLXClusterError("sync --shards pipeline takes a model directory")
    plan = getattr(cluster, "pipeline_plan", None)
    planned = getattr(plan, "model_dir", None)
    if planned is None or Path(os.path.abspath(os.path.expanduser(planned))) != source:
        plan = None  # a plan for another model does not say which of these files go where
    rank_files = pipeline_files(source, cluster.n, plan)
    if rank_files is None:
        raise MLXClusterError(
            f"sync --shards pipeline: {source} has no model.safetensors.index.json; "
            "without one every rank reads every file: use --shards tensor"
        )
    return rank_files


def _hosts(placement: Any) -> tuple[dict[str, list[int]], dict[str, bool]]:
    """The ranks of each host (``localhost`` for this machine's) and whether it is this one."""
    host_ranks: dict[str, list[int]] = {}
    local_of: dict[str, bool] = {}
    for r, host in enumerate(placement.ranks):
        local = placement.is_local or host.is_local
        key = "localhost" if local else host.ssh
        host_ranks.setdefault(key, []).append(r)
        local_of[key] = local
    return host_ranks, local_of


def _survey(
    client: Any,
    report: SyncReport,
    entries: Sequence[Entry],
    names: Sequence[str],
    first: Sequence[int],
    wanted: Sequence[list[int] | None],
    verify: bool,
) -> tuple[list[dict[str, Any]], list[dict[int, int]]]:
    """Ask one rank per host what it lacks (each file from its first missing byte); every
    refusal (an unwritable destination, too little space) before a byte is sent. Adds a row per
    host to ``report``."""
    surveys = [
        client[r].apply_async(sync_receiver.survey, report.dest, entries, verify, w)
        for r, w in zip(first, wanted, strict=True)
    ]
    found = [ar.get(timeout=None if verify else 120) for ar in surveys]
    for h, s in zip(names, found, strict=True):
        if s["error"]:
            raise MLXClusterError(f"sync: {s['error']} on {h}")
    short = []
    needs: list[dict[int, int]] = []
    for h, s, w in zip(names, found, wanted, strict=True):
        need = {int(k): int(v) for k, v in s["need"].items()}
        needs.append(need)
        lack = sum(entries[i][2] - o for i, o in need.items())
        if lack > s["free"]:
            short.append(
                f"{h} needs {_size(lack)} at {report.dest}, has {_size(s['free'])} free "
                f"({_size(lack - s['free'])} short)"
            )
        ids = range(len(entries)) if w is None else w
        file_ids = [i for i in ids if entries[i][0] == "file"]
        report.hosts.append(
            HostResult(
                h,
                skipped=sum(1 for i in file_ids if i not in need),
                wanted_bytes=sum(entries[i][2] for i in file_ids),
            )
        )
    if short:
        raise MLXClusterError("sync: too little space: " + "; ".join(short))
    return found, needs


def _route(
    cluster: Any,
    names: Sequence[str],
    first: Sequence[int],
    found: Sequence[dict[str, Any]],
    local_of: dict[str, bool],
) -> sync_plan.SyncRoute:
    """The way the bytes go, over the cables, from the addresses and interfaces the hosts
    reported."""
    from ..launch import mpi_job

    placement, spec = cluster.placement, cluster.spec
    head_ifs, bridges = _head_interfaces()
    nodes = [
        sync_plan.Node(h, tuple(placement.ranks[r].ips), tuple(s["ifaces"]), local_of[h])
        for h, r, s in zip(names, first, found, strict=True)
    ]
    entry_addr = [
        mpi_job.head_reach_address(placement, r, spec.control, dict(spec.peers)) for r in first
    ]
    return sync_plan.plan(nodes, head_ifs, bridges, entry_addr)


class _Job:
    """One transfer along a route: the hosts' listeners, their receivers (each forwarding to
    its children as it receives) and the head's streams to the hosts it sends to."""

    def __init__(
        self,
        client: Any,
        source: Path,
        target: str,
        entries: Sequence[Entry],
        names: Sequence[str],
        first: Sequence[int],
        route: sync_plan.SyncRoute,
        needs: Sequence[dict[int, int]],
        verify: bool,
        stall_s: float,
    ) -> None:
        self.client, self.source, self.target, self.entries = client, source, target, entries
        self.names, self.first, self.route, self.needs = names, first, route, needs
        self.verify, self.stall_s = verify, stall_s
        # a token per hop: each host's listener its own, known only to it and its upstream
        self.tokens = [stream_auth.new_token() for _ in names]
        # what each host's subtree lacks, from its first missing byte
        self.subtree_needs: list[dict[int, int]] = []
        for k in range(len(names)):
            merged: dict[int, int] = {}
            for j in [k, *route.subtree(k)]:
                for i, o in needs[j].items():
                    merged[i] = min(o, merged.get(i, o))
            self.subtree_needs.append(merged)
        self.active = [k for k in range(len(names)) if self.subtree_needs[k]]
        self.ports: dict[int, int] = {}
        self.receivers: dict[int, Any] = {}
        self.streams: list[_Stream] = []
        self.failed: dict[int, str] = {}

    def open_listeners(self) -> None:
        """Each host that gets bytes listens on the address its upstream reaches it at; when
        one cannot, the others close theirs."""
        opening: dict[int, Any] = {}
        try:
            opening |= {
                k: self.client[self.first[k]].apply_async(
                    sync_receiver.open_listener, self.route.address[k], self.tokens[k]
                )
                for k in self.active
            }
            for k, ar in opening.items():
                self.ports[k] = ar.get(timeout=30)
        except Exception:
            for k in opening:
                with contextlib.suppress(Exception):
                    self.client[self.first[k]].apply_sync(
                        sync_receiver.close_listener, self.tokens[k]
                    )
            raise

    def start_receivers(self) -> None:
        for k in self.active:
            kids = [c for c in self.route.children(k) if c in self.ports]
            self.receivers[k] = self.client[self.first[k]].apply_async(
                sync_receiver.receive,
                self.tokens[k],
                self.target,
                self.entries,
                self.needs[k],
                [
                    (self.names[c], self.route.address[c], self.ports[c], self.tokens[c])
                    for c in kids
                ],
                [self.subtree_needs[c] for c in kids],
                self.verify,
                self.stall_s,
            )

    def stream(self, show: bool, also: Callable[[str | None], None]) -> Progress:
        """Send to the hosts the head sends to, showing progress, until every receiver is
        done; an interrupt cuts every connection."""
        heads = [k for k in self.route.children(sync_plan.HEAD) if k in self.ports]
        try:
            self._connect(heads)
            to_send = sum(
                self.entries[i][2] - o
                for s in self.streams
                for i, o in s.wants.items()
                if self.entries[i][0] == "file"
            )
            bar = Progress(to_send, show, also)
            self._send(bar)
        except KeyboardInterrupt:
            self._cut(heads)
            raise KeyboardInterrupt(
                "sync interrupted: partial files stay under temporary names; "
                "the next sync resumes them"
            ) from None
        finally:
            for s in self.streams:
                s.sock.close()
            with contextlib.suppress(Exception):
                also(None)
        return bar

    def _connect(self, heads: Sequence[int]) -> None:
        for k in heads:
            address, port = self.route.address[k], self.ports[k]
            try:
                sock = socket.create_connection((address, port), timeout=self.stall_s)
            except OSError as e:
                self.failed[k] = f"cannot connect to {address}:{port}: {e.strerror or e}"
                continue
            try:
                key = stream_auth.prove(sock, self.tokens[k], self.stall_s)
            except OSError as e:
                sock.close()
                self.failed[k] = f"{address}:{port} refused this machine's proof ({e})"
                continue
            sock.settimeout(self.stall_s)
            self.streams.append(
                _Stream(sock, key, self.source, self.entries, self.subtree_needs[k], self.names[k])
            )

    def _send(self, bar: Progress) -> None:
        streams, receivers = self.streams, self.receivers
        for s in streams:
            s.start()
        while any(s.is_alive() for s in streams) or not all(r.ready() for r in receivers.values()):
            for s in streams:
                s.join(0.1)
            elapsed = max(time.monotonic() - bar.t0, 1e-6)
            bar.update(sum(s.sent for s in streams), {s.host: s.sent / elapsed for s in streams})
            if not any(s.is_alive() for s in streams):
                _wait(receivers.values(), self.stall_s * (1 + len(self.names)))
                break

    def _cut(self, heads: Sequence[int]) -> None:
        """Cut every stream; a host the head had not reached yet gets a connection closed at
        once, so it stops too (its own downstream hosts see their stream end)."""
        for s in self.streams:
            with contextlib.suppress(OSError):
                s.sock.shutdown(socket.SHUT_RDWR)
        reached = {s.host for s in self.streams}
        for k in heads:
            if self.names[k] not in reached and k not in self.failed:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self.route.address[k], self.ports[k]), 1.0) as late,
                ):
                    stream_auth.prove(late, self.tokens[k], 1.0)  # then closed: an empty stream
        _wait(self.receivers.values(), 2.0)


def _show(cluster: Any, line: str | None) -> None:
    """The sync's progress in the cluster's status view (its banner line)."""
    cluster.activity = line
    refresh = getattr(cluster, "_refresh_widget", None)
    if refresh is not None:
        refresh()


def _wait(ars: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for ar in ars:
        with contextlib.suppress(Exception):
            ar.wait(max(0.0, deadline - time.monotonic()))


def _collect(
    report: SyncReport,
    names: list[str],
    route: sync_plan.SyncRoute,
    receivers: dict[int, Any],
    failed: dict[int, str],
    streams: list[_Stream],
) -> None:
    """Each host's outcome; a host cut off upstream is named with the link that broke."""
    broken: dict[str, str] = {}
    for s in streams:
        if s.error:
            broken[s.host] = s.error
    results: dict[int, dict[str, Any]] = {}
    for k, ar in receivers.items():
        if not ar.ready():
            results[k] = {"error": "still receiving when the others had finished"}
            continue
        try:
            results[k] = ar.get(0)
        except Exception as e:
            text = str(e).strip().splitlines()
            results[k] = {"error": text[-1] if text else type(e).__name__}
        for lost in results[k].get("lost") or []:
            who = lost.split(":", 1)[0]
            broken[who] = lost
    for k, name in enumerate(names):
        hr = report.hosts[k]
        res = results.get(k)
        if res is None:
            if k in failed:
                hr.error = failed[k]
            continue
        hr.files, hr.bytes = int(res.get("files", 0)), int(res.get("bytes", 0))
        if res.get("error"):
            up = route.parent[k]
            upstream = "this machine" if up == sync_plan.HEAD else names[up]
            why = broken.get(name)
            hr.error = (
                f"the link from {upstream} to {name} broke ({why.split(': ', 1)[-1]})"
                if why
                else str(res["error"])
            )
