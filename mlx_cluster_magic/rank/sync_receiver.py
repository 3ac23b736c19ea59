"""Sync, host side: what a host lacks of a tree, and receiving it while passing it on.

The notebook (``sync_sender``) first asks one rank per host what it lacks (``survey``: size and
modification time, with ``verify`` a checksum computed here), then every such rank opens a
listener on the address its upstream neighbour reaches it at (``open_listener``, the
broadcast's: the cluster address only, a per-sync token checked in constant time) and runs
``receive``: it reads the stream from upstream in chunks, writes the files this host needs
under temporary names, and forwards each chunk at once to its downstream neighbours (one
thread and a bounded queue each), so a chain of hosts works as a pipeline and no process holds
a whole file in memory. A file is renamed to its real name only when complete; an interrupted
one stays under its temporary name, and the next sync resumes it from where it stopped.

The stream: per file a header (entry index, first byte, byte count) and the bytes; an index of
``END`` closes it. Shipped to the engines by ``view.apply``; imports only the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

from .broadcast_receiver import _accept, close_listener, open_listener

__all__ = ["close_listener", "open_listener", "receive", "survey"]

CHUNK_BYTES = 1 << 20
QUEUE_CHUNKS = 8
HEADER = struct.Struct("!IQQ")
END = 0xFFFFFFFF
#: Seconds without progress on a connection before its peer counts as gone (a cable pulled).
STALL_S = 5.0
PART_SUFFIX = ".mcmsync"


class SyncFault(Exception):
    """A fault on this host (not the stream's): said as it is."""


# An entry of the manifest: (kind, relative path, size, mtime_ns, mode, link target or sha256)
Entry = tuple[str, str, int, int, int, str]


def _target(dest: str, rel: str) -> Path:
    return Path(dest) / rel if rel else Path(dest)


def part_path(final: Path, size: int, mtime_ns: int) -> Path:
    """The temporary name of ``final`` while it arrives: hidden, beside it (the rename is
    atomic), and naming the source's size and time so a changed source never resumes an old
    part."""
    return final.with_name(f".{final.name}.{size}-{mtime_ns}{PART_SUFFIX}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def _interfaces() -> list[str]:
    """This host's addresses with their prefix (``10.0.0.2/30``), loopback left out."""
    import ipaddress

    import psutil  # type: ignore[import-untyped,unused-ignore]

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6) or not a.netmask:
                continue
            with contextlib.suppress(ValueError):
                iface = ipaddress.ip_interface(f"{a.address.split('%')[0]}/{a.netmask}")
                if not iface.is_loopback and not iface.is_link_local:
                    out.append(str(iface))
    return out


def _writable(dest: Path, is_file: bool) -> str | None:
    """Why ``dest`` cannot be written here, or None (the directory is created)."""
    folder = dest.parent if is_file else dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}{PART_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"cannot write {folder}: {e.strerror or e}"
    return None


def _free(dest: Path) -> int:
    p = dest
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def survey(
    dest: str, entries: list[Entry], verify: bool, wanted: list[int] | None
) -> dict[str, Any]:
    """What this host lacks of ``entries`` at ``dest``: ``need`` maps an entry's index to the
    byte it resumes from (0, or the size of its temporary part); also the free space there,
    this host's addresses, and ``error`` when ``dest`` cannot be written."""
    host = socket.gethostname()
    root = Path(dest)
    is_file = len(entries) == 1 and entries[0][1] == ""
    out: dict[str, Any] = {"host": host, "need": {}, "free": 0, "error": None}
    out["ifaces"] = _interfaces()
    error = _writable(root, is_file)
    if error:
        out["error"] = error
        return out
    out["free"] = _free(root)
    for i in range(len(entries)) if wanted is None else wanted:
        kind, rel, size, mtime_ns, mode, extra = entries[i]
        path = _target(dest, rel)
        try:
            st = path.lstat()
        except OSError:
            st = None
        if kind == "dir":
            if st is None or not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != mode:
                out["need"][i] = 0
        elif kind == "link":
            if st is None or not stat.S_ISLNK(st.st_mode) or os.readlink(path) != extra:
                out["need"][i] = 0
        else:
            same = (
                st is not None
                and stat.S_ISREG(st.st_mode)
                and st.st_size == size
                and st.st_mtime_ns == mtime_ns
                and stat.S_IMODE(st.st_mode) == mode
            )
            if same and verify and extra:
                same = _sha256(path) == extra
            if not same:
                part = part_path(path, size, mtime_ns)
                with contextlib.suppress(OSError):
                    have = part.stat().st_size
                    out["need"][i] = have if have <= size else 0
                    continue
                out["need"][i] = 0
    return out


class Forward:
    """One downstream connection fed by its own thread from a bounded queue: the reader never
    waits on a slow peer for longer than ``STALL_S``, and a peer that stops taking bytes is
    dropped (named in ``error``) while the others go on."""

    def __init__(
        self, sock: socket.socket | None, name: str, stall_s: float = STALL_S, error: str = ""
    ) -> None:
        self.sock, self.name, self.stall_s = sock, name, stall_s
        self.error: str | None = error or None
        self.sent = 0
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None
        self._cut = False
        if sock is not None and not error:
            self._thread = threading.Thread(target=self._run, name=f"sync-{name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self.sock is not None
        self.sock.settimeout(self.stall_s)
        try:
            while (data := self._q.get()) is not None:
                if self.error is None:
                    self.sock.sendall(data)
                    self.sent += len(data)
        except OSError as e:
            if not self._cut:
                self._fail(f"{self.name}: {e.strerror or e or 'timed out'}")
            while self._q.get() is not None:  # drain so the reader never blocks on us
                pass

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def put(self, data: bytes | memoryview) -> None:
        if self.error is not None:
            return
        try:
            self._q.put(data, timeout=self.stall_s)
        except queue.Full:
            self._fail(f"{self.name}: took no bytes for {self.stall_s:.0f} s")

    def close(self, complete: bool, wait: float = STALL_S) -> None:
        """Send the end (only after a ``complete`` stream: a cut one just stops, so the peer
        sees it cut) and wait for the queue to drain (at most ``wait`` more seconds)."""
        if self._thread is None or self.sock is None:
            return
        if not complete:  # cut: not this peer's fault, so no error of its own
            self._cut = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        elif self.error is None:
            with contextlib.suppress(queue.Full):
                self._q.put(HEADER.pack(END, 0, 0), timeout=self.stall_s)
        deadline = time.monotonic() + self.stall_s
        while True:
            try:
                self._q.put(None, timeout=0.1)
                break
            except queue.Full:
                if self._cut:
                    with contextlib.suppress(queue.Empty):
                        self._q.get_nowait()
                elif time.monotonic() > deadline:
                    self._fail(f"{self.name}: took no bytes for {self.stall_s:.0f} s")
        self._thread.join(wait)
        self.sock.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while len(view):
        got = conn.recv_into(view)
        if got == 0:
            raise ConnectionError("closed early")
        view = view[got:]
    return bytes(buf)


def _apply_meta(dest: str, entries: list[Entry], mine: dict[int, int]) -> None:
    """Directories (created), links (made or replaced) this host needs, before the bytes."""
    for i in sorted(mine):
        kind, rel, _size, _mtime, mode, extra = entries[i]
        path = _target(dest, rel)
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, mode | stat.S_IWUSR | stat.S_IXUSR)  # writable until the files land
        elif kind == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = part_path(path, 0, 0)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(extra, tmp)
            os.replace(tmp, path)


def receive(
    token: str,
    dest: str,
    entries: list[Entry],
    mine: dict[int, int],
    children: list[tuple[str, str, int]],
    child_needs: list[dict[int, int]],
    verify: bool = False,
    stall_s: float = STALL_S,
) -> dict[str, Any]:
    """Receive the stream from upstream and pass it on (see the module docstring).

    ``mine``: the entries this host writes, each with the byte it resumes from; ``children``:
    (name, ip, port) downstream, each with the entries its part of the chain needs and the
    first byte it wants of each. Returns what this host wrote and any failure, by name."""
    host = socket.gethostname()
    result: dict[str, Any] = {"host": host, "files": 0, "bytes": 0, "error": None, "lost": []}
    # keys arrive as strings when the plan went through JSON; accept both
    mine = {int(k): int(v) for k, v in mine.items()}
    needs = [{int(k): int(v) for k, v in cn.items()} for cn in child_needs]
    _apply_meta(dest, entries, {i: o for i, o in mine.items() if entries[i][0] != "file"})
    listener = _listener_for(token)
    conn = _accept(listener, token) if listener is not None else None
    if conn is None:
        result["error"] = "the upstream host did not connect, or sent a wrong token"
        return result
    conn.settimeout(stall_s)
    outs: list[Forward] = []
    complete = False
    try:
        for name, ip, port in children:
            try:
                s = socket.create_connection((ip, port), timeout=stall_s)
                s.sendall(token.encode())
                outs.append(Forward(s, name, stall_s))
            except OSError as e:
                outs.append(Forward(None, name, stall_s, f"{name}: {e.strerror or e}"))
        _pump(conn, dest, entries, mine, outs, needs, verify, result)
        complete = True
    except SyncFault as e:
        result["error"] = str(e)
    except OSError as e:
        result["error"] = f"the stream from upstream broke: {getattr(e, 'strerror', None) or e}"
    finally:
        conn.close()
        for out in outs:
            out.close(complete)
    result["lost"] = [out.error for out in outs if out.error]
    for i in sorted(mine, reverse=True):  # directories get their own mode back, deepest first
        kind, rel, _size, _mtime, mode, _extra = entries[i]
        if kind == "dir":
            with contextlib.suppress(OSError):
                os.chmod(_target(dest, rel), mode)
    return result


def _listener_for(token: str) -> socket.socket | None:
    from . import broadcast_receiver

    return broadcast_receiver._listeners.pop(token, None)


def _pump(
    conn: socket.socket,
    dest: str,
    entries: list[Entry],
    mine: dict[int, int],
    outs: list[Forward],
    needs: list[dict[int, int]],
    verify: bool,
    result: dict[str, Any],
) -> None:
    while True:
        idx, start, count = HEADER.unpack(_recv_exact(conn, HEADER.size))
        if idx == END:
            return
        _kind, rel, size, mtime_ns, mode, extra = entries[idx]
        if start + count != size:
            raise ConnectionError(f"bad header for entry {idx}")
        targets = [(o, needs[c][idx]) for c, o in enumerate(outs) if idx in needs[c]]
        for out, first in targets:
            out.put(HEADER.pack(idx, first, size - first))
        f: Any = None
        own = mine.get(idx)
        final = _target(dest, rel)
        part = part_path(final, size, mtime_ns)
        if own:  # resumed: keep the first ``own`` bytes of the part
            if not part.exists() or part.stat().st_size < own:
                raise SyncFault(f"{part.name} changed during the sync; run it again")
            f = open(part, "r+b")  # noqa: SIM115
            f.truncate(own)
            f.seek(own)
        elif own is not None:
            try:
                f = open(part, "wb")  # noqa: SIM115
            except FileNotFoundError:  # its folder is not there yet
                final.parent.mkdir(parents=True, exist_ok=True)
                f = open(part, "wb")  # noqa: SIM115
        try:
            pos = start
            while pos < size:
                buf = bytearray(min(CHUNK_BYTES, size - pos))
                view = memoryview(buf)
                n = conn.recv_into(view)
                if n == 0:
                    raise ConnectionError("closed early")
                chunk = view[:n]
                end = pos + n
                if f is not None and end > own:
                    f.write(chunk[max(0, own - pos) :])
                for out, first in targets:
                    if end > first:
                        out.put(chunk[max(0, first - pos) :])
                pos = end
        finally:
            if f is not None:
                f.close()
        if f is not None:
            os.chmod(part, mode)
            os.utime(part, ns=(mtime_ns, mtime_ns))
            if verify and extra and _sha256(part) != extra:
                part.unlink()
                raise SyncFault(f"{rel or final.name}: checksum differs after writing")
            os.replace(part, final)
            result["files"] += 1
            result["bytes"] += size - own
