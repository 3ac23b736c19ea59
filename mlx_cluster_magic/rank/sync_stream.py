"""The sending half of a sync stream: a tree's files, each from the first byte the receiving
side (and the hosts it feeds) lacks, in records signed with the hop's key.

``sync`` runs it on the notebook's machine; ``setup``'s relay too. Standard library only, beside
``stream_auth`` and ``sync_receiver``'s framing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import stream_auth, sync_receiver
from .sync_receiver import HEADER, Entry


class TreeStream(threading.Thread):
    """A stream to one direct downstream host: its subtree's files, each from the first byte
    any host there lacks, in records signed with that hop's key."""

    def __init__(
        self,
        sock: socket.socket,
        key: bytes,
        root: Path,
        entries: Sequence[Entry],
        wants: dict[int, int],
        name: str,
    ) -> None:
        super().__init__(name=f"sync-to-{name}", daemon=True)
        self.sock, self.root, self.entries, self.wants, self.host = sock, root, entries, wants, name
        self.writer = stream_auth.RecordWriter(sock, key)
        self.sent = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            for i in sorted(self.wants):
                kind, rel, size, _mtime, _mode, _extra = self.entries[i]
                if kind != "file":
                    continue
                first = self.wants[i]
                self.writer.write(HEADER.pack(i, first, size - first))
                path = self.root / rel if rel else self.root
                with open(path, "rb") as f:
                    f.seek(first)
                    self._send_file(f, rel, size - first)
            self.writer.write(HEADER.pack(sync_receiver.END, 0, 0))
            self.writer.flush()
        except OSError as e:
            self.error = f"{self.host}: {e.strerror or e or 'timed out'}"
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def _send_file(self, f: Any, rel: str, count: int) -> None:
        buf = memoryview(bytearray(min(count, stream_auth.RECORD_BYTES)))
        while count:  # a record at a time, so progress shows and a cut is seen at once
            n = f.readinto(buf[: min(count, len(buf))])
            if not n:
                raise OSError(f"{rel or self.root.name} shrank while it was sent")
            self.writer.write(buf[:n])
            count -= n
            self.sent += n
