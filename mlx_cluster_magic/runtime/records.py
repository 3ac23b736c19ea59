"""The record a kept cluster's runtime leaves for the notebooks that attach to it.

One folder per runtime under ``~/.mlx-cluster/runtimes/`` (0700, as is its parent), holding
``record.json`` (0600): the cluster's id, the runtime's pid and start time and host, its
channel's address and key, ipyparallel's client connection (with its HMAC and CurveZMQ keys),
the hosts and ranks. Only its owner can read it, so only its owner can attach. A notebook that
attached to a runtime on another Mac keeps a pointer (no secret: the host and the id) under
``~/.mlx-cluster/attach/``; the record itself is read over ssh.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MLXClusterError

#: The user's folder of our files on every machine (host_secrets keeps each run's folder there).
HOME_DIR = ".mlx-cluster"
RUNTIMES = "runtimes"
POINTERS = "attach"
RECORD = "record.json"
FAILED = "failed.json"
OPTIONS = "options.json"
LOG = "runtime.log"
#: A kept cluster nobody used for this long ends itself (``--idle-timeout``).
IDLE_TIMEOUT_S = 12 * 3600.0


def base_dir() -> Path:
    """``~/.mlx-cluster`` of the user running this process."""
    return Path.home() / HOME_DIR


def runtimes_dir() -> Path:
    return base_dir() / RUNTIMES


def private_dir(path: Path) -> Path:
    """``path`` (and every folder between it and ``~/.mlx-cluster``) as folders only the user
    can enter; refused when one is a link or another user's."""
    base = base_dir()
    parts = path.relative_to(base).parts
    for target in [base] + [base.joinpath(*parts[: i + 1]) for i in range(len(parts))]:
        with contextlib.suppress(FileExistsError):
            target.mkdir(mode=0o700)
        st = target.lstat()
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
            raise MLXClusterError(f"{target} is not a folder of this user's; remove it and retry")
        if stat.S_IMODE(st.st_mode) != 0o700:
            target.chmod(0o700)
    return path


def new_id() -> str:
    """A short id a person can type: six hex digits."""
    return secrets.token_hex(3)


def folder_of(cluster_id: str) -> Path:
    if not cluster_id or not all(c in "0123456789abcdef" for c in cluster_id):
        raise MLXClusterError(f"{cluster_id!r} is not a cluster id (see %mlx_cluster list)")
    return runtimes_dir() / cluster_id


def write_private(path: Path, content: dict[str, Any]) -> None:
    """``content`` as JSON in a 0600 file, replaced whole (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(content, f)
    os.replace(tmp, path)


def read_private(path: Path) -> dict[str, Any]:
    """A record of this user's, refused in one line when it is someone else's."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise MLXClusterError(f"no kept cluster at {path.parent} (see %mlx_cluster list)") from None
    except PermissionError:
        raise MLXClusterError(_not_yours(path.parent)) from None
    if st.st_uid != os.getuid() or stat.S_ISLNK(st.st_mode):
        raise MLXClusterError(_not_yours(path.parent, st.st_uid))
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except PermissionError:
        raise MLXClusterError(_not_yours(path.parent)) from None
    except (OSError, ValueError) as e:
        raise MLXClusterError(f"cannot read {path}: {e}; remove {path.parent}") from None
    if not isinstance(content, dict):
        raise MLXClusterError(f"{path} is not a cluster record; remove {path.parent}")
    return content


def _not_yours(folder: Path, uid: int | None = None) -> str:
    owner = ""
    if uid is not None:
        with contextlib.suppress(KeyError, ImportError):
            import pwd

            owner = f" (it belongs to {pwd.getpwuid(uid).pw_name})"
    return (
        f"refused: the cluster at {folder} is not yours{owner}; only the user who started a "
        "kept cluster can attach to it"
    )


@dataclass
class Record:
    """What a runtime tells the notebooks that attach to it."""

    id: str
    pid: int
    pid_started: float
    host: str
    started: float
    channel: str
    channel_key: str
    connection: dict[str, Any]
    hosts: list[str]
    n: int
    backend: str
    idle_timeout: float | None
    #: The ssh name of the Mac the runtime runs on, as the notebook's side named it (None: here).
    runtime_on: str | None = None
    ssh: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, content: dict[str, Any]) -> Record:
        try:
            return cls(**content)
        except TypeError as e:
            raise MLXClusterError(f"a cluster record of another version ({e}); stop it") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_record(record: Record) -> Path:
    folder = private_dir(folder_of(record.id))
    path = folder / RECORD
    write_private(path, record.as_dict())
    return path


def read_record(cluster_id: str) -> Record:
    return Record.of(read_private(folder_of(cluster_id) / RECORD))


def local_records() -> Iterator[tuple[str, Path]]:
    """(id, folder) of every runtime folder of this user's on this machine's home."""
    root = runtimes_dir()
    try:
        folders = sorted(root.iterdir())
    except OSError:  # none yet (or a home this user cannot read: none of theirs)
        return
    for folder in folders:
        if folder.is_dir() and all(c in "0123456789abcdef" for c in folder.name):
            yield folder.name, folder


def remove_folder(folder: Path) -> None:
    """A runtime's folder, and the ``runtimes`` folder once it holds none."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def span(seconds: float | None) -> str:
    """``12 h``, ``30 min``, ``4 s`` (an idle timeout as a person reads it); ``never``."""
    if seconds is None:
        return "never"
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def runtime_alive(record: Record) -> bool:
    """Whether the runtime's process (same pid, same start time) still runs on this machine."""
    import psutil

    try:
        proc = psutil.Process(record.pid)
        started = float(proc.create_time())
        # (a killed runtime whose parent has not reaped it yet is a zombie: gone)
        return abs(started - record.pid_started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def died_line(record: Record) -> str:
    when = time.strftime("%H:%M", time.localtime(record.started))
    return (
        f"cluster {record.id} ({', '.join(record.hosts)}) is gone: its runtime (pid "
        f"{record.pid} on {record.host}, started {when}) died; removed from the list"
    )


# --------------------------------------------------------------------- pointers to remote runtimes
def pointer_path(cluster_id: str) -> Path:
    folder_of(cluster_id)  # checks the id
    return base_dir() / POINTERS / f"{cluster_id}.json"


def write_pointer(cluster_id: str, host: str, ssh: str | None, python: str) -> None:
    path = pointer_path(cluster_id)
    private_dir(path.parent)
    write_private(path, {"id": cluster_id, "host": host, "ssh": ssh, "python": python,
                         "written": time.time()})  # fmt: skip


def pointers() -> list[dict[str, Any]]:
    folder = base_dir() / POINTERS
    try:
        paths = sorted(folder.glob("*.json"))
    except OSError:
        return []
    found = []
    for path in paths:
        with contextlib.suppress(MLXClusterError):
            found.append(read_private(path))
    return found


def remove_pointer(cluster_id: str) -> None:
    path = pointer_path(cluster_id)
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()
