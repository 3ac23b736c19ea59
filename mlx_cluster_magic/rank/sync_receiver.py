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

Every hop has a token of its own: a host's listener gets its token from the notebook, and so
does the host upstream of it, which proves it on connecting (``stream_auth``: the token never
crosses the wire); every record of the stream is checked before a byte of it is written or
passed on, and re-signed for each downstream hop. Nothing is written through a link
(``safe_dest``): a destination another user controls is refused.

The stream: per file a header (entry index, first byte, byte count) and the bytes; an index of
``END`` closes it. Shipped to the engines by ``view.apply``; imports only the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import secrets
import socket
import stat
import struct
import threading
import time
from typing import Any

from . import stream_auth
from .broadcast_receiver import ACCEPT_TIMEOUT_S, close_listener, open_listener
from .safe_dest import Destination, DestinationRefused

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


def part_name(name: str, size: int, mtime_ns: int) -> str:
    """The temporary name of a file called ``name`` while it arrives: hidden, beside it (the
    rename is atomic), and naming the source's size and time so a changed source never resumes
    an old part."""
    return f".{name}.{size}-{mtime_ns}{PART_SUFFIX}"


def _leaf(d: Destination, rel: str) -> str:
    return d.leaf if rel == "" else rel.rpartition("/")[2]


def _sha256(d: Destination, rel: str, name: str | None = None) -> str:
    """The checksum of the entry ``rel`` (or of ``name`` beside it), read without following a
    link."""
    h = hashlib.sha256()
    if name is None:
        fd = d.read_file(rel)
    else:
        folder, _ = d.locate(rel)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    with open(fd, "rb") as f:
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


def _writable(dest: str, is_file: bool) -> tuple[Destination | None, str | None]:
    """The destination opened (its folder created), or why it cannot be written here."""
    try:
        d = Destination(dest, is_file, create=True)
    except DestinationRefused as e:
        return None, str(e)
    except OSError as e:
        where = os.path.dirname(dest) if is_file else dest
        return None, f"cannot write {where}: {e.strerror or e}"
    probe = f".probe-{secrets.token_hex(8)}{PART_SUFFIX}"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(probe, flags, 0o600, dir_fd=d.top))
        os.unlink(probe, dir_fd=d.top)
    except OSError as e:
        d.close()
        where = os.path.dirname(dest) if is_file else dest
        return None, f"cannot write {where}: {e.strerror or e}"
    return d, None


def survey(
    dest: str, entries: list[Entry], verify: bool, wanted: list[int] | None
) -> dict[str, Any]:
    """What this host lacks of ``entries`` at ``dest``: ``need`` maps an entry's index to the
    byte it resumes from (0, or the size of its temporary part); also the free space there,
    this host's addresses, and ``error`` when ``dest`` cannot be written."""
    host = socket.gethostname()
    is_file = len(entries) == 1 and entries[0][1] == ""
    out: dict[str, Any] = {"host": host, "need": {}, "free": 0, "error": None}
    out["ifaces"] = _interfaces()
    d, error = _writable(dest, is_file)
    if d is None:
        out["error"] = error
        return out
    with d:
        out["free"] = d.free_bytes()
        try:
            for i in range(len(entries)) if wanted is None else wanted:
                need = _lacks(d, entries[i], verify)
                if need is not None:
                    out["need"][i] = need
        except DestinationRefused as e:
            out["error"] = str(e)
    return out


def _lacks(d: Destination, entry: Entry, verify: bool) -> int | None:
    """The byte this host's copy of ``entry`` resumes from, or None when it is there."""
    kind, rel, size, mtime_ns, mode, extra = entry
    st = d.lstat(rel)
    if kind == "dir":
        ok = st is not None and stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        return None if ok else 0
    if kind == "link":
        ok = st is not None and stat.S_ISLNK(st.st_mode) and d.readlink(rel) == extra
        return None if ok else 0
    same = (
        st is not None
        and stat.S_ISREG(st.st_mode)
        and st.st_size == size
        and st.st_mtime_ns == mtime_ns
        and stat.S_IMODE(st.st_mode) == mode
    )
    if same and verify and extra:
        same = _sha256(d, rel) == extra
    if same:
        return None
    try:
        folder, name = d.locate(rel)
        part = os.stat(part_name(name, size, mtime_ns), dir_fd=folder, follow_symlinks=False)
    except OSError:
        return 0
    return part.st_size if stat.S_ISREG(part.st_mode) and part.st_size <= size else 0


class Forward:
    """One downstream connection fed by its own thread from a bounded queue: the reader never
    waits on a slow peer for longer than ``STALL_S``, and a peer that stops taking bytes is
    dropped (named in ``error``) while the others go on. The thread signs the records with the
    hop's own key (``stream_auth``), so that work runs beside the reader's."""

    def __init__(
        self,
        sock: socket.socket | None,
        name: str,
        stall_s: float = STALL_S,
        error: str = "",
        key: bytes = b"",
    ) -> None:
        self.sock, self.name, self.stall_s = sock, name, stall_s
        self.writer = stream_auth.RecordWriter(sock, key) if sock is not None else None
        self.error: str | None = error or None
        self.sent = 0
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None
        self._cut = False
        if sock is not None and not error:
            self._thread = threading.Thread(target=self._run, name=f"sync-{name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self.sock is not None and self.writer is not None
        self.sock.settimeout(self.stall_s)
        try:
            while (data := self._q.get()) is not None:
                if self.error is None:
                    self.writer.write(data)
                    self.sent += len(data)
            if self.error is None:
                self.writer.flush()
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


def _apply_meta(d: Destination, entries: list[Entry], mine: dict[int, int]) -> None:
    """Directories (created; a link or file in the way removed, never followed) and links
    (made or replaced) this host needs, before the bytes."""
    for i in sorted(mine):
        kind, rel, _size, _mtime, mode, extra = entries[i]
        if kind == "dir":
            d.make_folder(rel, mode | stat.S_IWUSR | stat.S_IXUSR)  # writable until files land
        elif kind == "link":
            d.make_link(rel, extra, part_name(_leaf(d, rel), 0, 0))


def receive(
    token: str,
    dest: str,
    entries: list[Entry],
    mine: dict[int, int],
    children: list[tuple[str, str, int, str]],
    child_needs: list[dict[int, int]],
    verify: bool = False,
    stall_s: float = STALL_S,
) -> dict[str, Any]:
    """Receive the stream from upstream and pass it on (see the module docstring).

    ``token``: this host's listener's; ``mine``: the entries this host writes, each with the
    byte it resumes from; ``children``: (name, ip, port, token) downstream, each with the
    entries its part of the chain needs and the first byte it wants of each. Returns what this
    host wrote and any failure, by name."""
    host = socket.gethostname()
    result: dict[str, Any] = {"host": host, "files": 0, "bytes": 0, "error": None, "lost": []}
    # keys arrive as strings when the plan went through JSON; accept both
    mine = {int(k): int(v) for k, v in mine.items()}
    needs = [{int(k): int(v) for k, v in cn.items()} for cn in child_needs]
    is_file = len(entries) == 1 and entries[0][1] == ""
    listener = _listener_for(token)
    try:
        d = Destination(dest, is_file, create=True)
    except (DestinationRefused, OSError) as e:
        if listener is not None:
            listener.close()
        result["error"] = str(e) if isinstance(e, DestinationRefused) else f"{dest}: {e}"
        return result
    with d:
        try:
            _apply_meta(d, entries, {i: o for i, o in mine.items() if entries[i][0] != "file"})
        except (DestinationRefused, OSError) as e:
            if listener is not None:
                listener.close()
            result["error"] = str(e)
            return result
        found = stream_auth.accept(listener, token, ACCEPT_TIMEOUT_S) if listener else None
        if found is None:
            result["error"] = "the upstream host did not connect, or did not hold the token"
            return result
        _receive_from(found, d, entries, mine, children, needs, verify, stall_s, result)
        for i in sorted(mine, reverse=True):  # directories get their own mode back, deepest first
            kind, rel, _size, _mtime, mode, _extra = entries[i]
            if kind == "dir":
                d.set_folder_mode(rel, mode)
    return result


def _receive_from(
    found: tuple[socket.socket, bytes],
    d: Destination,
    entries: list[Entry],
    mine: dict[int, int],
    children: list[tuple[str, str, int, str]],
    needs: list[dict[int, int]],
    verify: bool,
    stall_s: float,
    result: dict[str, Any],
) -> None:
    """Connect to the children (proving each one's token), then read, write and pass on."""
    conn, key = found
    conn.settimeout(stall_s)
    outs: list[Forward] = []
    complete = False
    try:
        for name, ip, port, child_token in children:
            try:
                s = socket.create_connection((ip, port), timeout=stall_s)
            except OSError as e:
                outs.append(Forward(None, name, stall_s, f"{name}: {e.strerror or e}"))
                continue
            try:
                child_key = stream_auth.prove(s, child_token, stall_s)
            except OSError as e:
                s.close()
                outs.append(Forward(None, name, stall_s, f"{name}: refused us ({e})"))
                continue
            outs.append(Forward(s, name, stall_s, key=child_key))
        _pump(stream_auth.RecordReader(conn, key), d, entries, mine, outs, needs, verify, result)
        complete = True
    except (SyncFault, DestinationRefused) as e:
        result["error"] = str(e)
    except OSError as e:
        result["error"] = f"the stream from upstream broke: {getattr(e, 'strerror', None) or e}"
    finally:
        conn.close()
        for out in outs:
            out.close(complete)
    result["lost"] = [out.error for out in outs if out.error]


def _listener_for(token: str) -> socket.socket | None:
    from . import broadcast_receiver

    return broadcast_receiver._listeners.pop(token, None)


def _pump(
    stream: stream_auth.RecordReader,
    d: Destination,
    entries: list[Entry],
    mine: dict[int, int],
    outs: list[Forward],
    needs: list[dict[int, int]],
    verify: bool,
    result: dict[str, Any],
) -> None:
    while True:
        idx, start, count = HEADER.unpack(stream.read_exact(HEADER.size))
        if idx == END:
            return
        if idx >= len(entries):
            raise ConnectionError(f"bad header for entry {idx}")
        size = entries[idx][2]
        if start + count != size:
            raise ConnectionError(f"bad header for entry {idx}")
        targets = [(o, needs[c][idx]) for c, o in enumerate(outs) if idx in needs[c]]
        for out, first in targets:
            out.put(HEADER.pack(idx, first, size - first))
        own = mine.get(idx)
        f = None if own is None else _open_part(d, entries[idx], own)
        try:
            pos = start
            while pos < size:
                buf = bytearray(min(CHUNK_BYTES, size - pos))
                n = stream.readinto(memoryview(buf))
                chunk = memoryview(buf)[:n]
                end = pos + n
                if f is not None and own is not None and end > own:
                    f.write(chunk[max(0, own - pos) :])
                for out, first in targets:
                    if end > first:
                        out.put(chunk[max(0, first - pos) :])
                pos = end
            if f is not None:
                f.flush()
                _finish(d, entries[idx], f.fileno(), verify)
        finally:
            if f is not None:
                f.close()
        if f is not None and own is not None:
            result["files"] += 1
            result["bytes"] += size - own


def _open_part(d: Destination, entry: Entry, own: int) -> Any:
    """The file's temporary part, opened without following a link: resumed after its first
    ``own`` bytes, or created afresh."""
    _kind, rel, size, mtime_ns, _mode, _extra = entry
    part = part_name(_leaf(d, rel), size, mtime_ns)
    if own:  # resumed: keep the first ``own`` bytes of the part
        try:
            fd = d.open_file(rel, part, new=False)
        except OSError:
            raise SyncFault(f"{part} changed during the sync; run it again") from None
        if os.fstat(fd).st_size < own:
            os.close(fd)
            raise SyncFault(f"{part} changed during the sync; run it again")
        f = open(fd, "r+b")  # noqa: SIM115
        f.truncate(own)
        f.seek(own)
        return f
    try:
        fd = d.open_file(rel, part, new=True)
    except FileNotFoundError:  # its folder is not there yet
        d.folder(rel.rpartition("/")[0], create=True)
        fd = d.open_file(rel, part, new=True)
    return open(fd, "wb")


def _finish(d: Destination, entry: Entry, fd: int, verify: bool) -> None:
    """A complete part: its mode and time on the open file, its checksum with ``verify``, then
    renamed over the entry (a link there is replaced, not followed)."""
    _kind, rel, size, mtime_ns, mode, extra = entry
    part = part_name(_leaf(d, rel), size, mtime_ns)
    os.fchmod(fd, mode)
    os.utime(fd, ns=(mtime_ns, mtime_ns))
    if verify and extra and _sha256(d, rel, part) != extra:
        folder, _ = d.locate(rel)
        os.unlink(part, dir_fd=folder)
        raise SyncFault(f"{rel or d.leaf}: checksum differs after writing")
    d.replace(rel, part)
