"""A destination written without ever following a link planted in it.

Sync writes where the notebook says, on hosts where other users may have accounts. A link in
the destination (or in a folder on the way to it) placed by another user would turn a write,
a ``chmod`` or a truncation into one on a file of theirs choosing. So:

- the way to the destination is walked one component at a time from ``/``; a link on the way is
  followed only when it belongs to this user or to root (``/tmp`` on macOS), and a folder (or
  link) that belongs to another user is refused in one line naming it and the fix;
- everything under the destination is reached through directory descriptors opened with
  ``O_NOFOLLOW | O_DIRECTORY``, one component at a time; files are opened with ``O_NOFOLLOW``
  (new ones with ``O_EXCL`` too), modes set with ``fchmod`` on the open descriptor, and a link
  found where the tree has a folder is replaced, never followed.

Standard library only (runs on the ranks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40
#: Directory descriptors kept open at once (macOS starts processes with 256 in all).
_MAX_OPEN = 32


class DestinationRefused(Exception):
    """The destination cannot be used as it is: said in one line with the fix."""


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _refuse_foreign(path: str, st: os.stat_result) -> None:
    if not _trusted(st.st_uid):
        raise DestinationRefused(
            f"{path} belongs to {_owner(st.st_uid)}, not to you: another user could plant "
            "links there; sync to a folder of your own (or have that one given to you with chown)"
        )


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def open_folder(path: str, create: bool) -> int:
    """A descriptor of the folder ``path`` (absolute), walked from ``/`` without following a
    link that another user owns; missing folders are created when ``create``."""
    fd = os.open("/", _DIR_FLAGS)
    todo = _components(path)
    done = ""
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            if name == "..":
                done = os.path.dirname(done) or "/"
                nxt = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
                continue
            here = f"{done.rstrip('/')}/{name}"
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=fd)  # less the umask, as mkdir -p
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            _refuse_foreign(here, st)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many links", here)
                target = os.readlink(name, dir_fd=fd)
                todo = _components(target) + todo
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _DIR_FLAGS)
                    done = ""
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", here)
            nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            _refuse_foreign(here, os.fstat(fd))  # the one opened, not only the one looked at
            done = here
        return fd
    except BaseException:
        os.close(fd)
        raise


class Destination:
    """The destination of one sync: ``dest`` is a folder (a tree), or a file's full path
    (``is_file``). Entries are named by their path relative to it (``""`` is ``dest``)."""

    def __init__(self, dest: str, is_file: bool, create: bool = False) -> None:
        self.dest = dest.rstrip("/") or "/"
        self.is_file = is_file
        folder = os.path.dirname(self.dest) if is_file else self.dest
        self.leaf = os.path.basename(self.dest) if is_file else ""
        self._top = open_folder(folder, create)
        self._open: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
        os.close(self._top)

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def top(self) -> int:
        """The folder the destination lives in (``dest`` itself for a tree)."""
        return self._top

    def folder(self, rel_dir: str, create: bool = False) -> int:
        """A descriptor of the folder ``rel_dir`` under the destination, every component opened
        without following a link (a link there: ``OSError`` ELOOP or ENOTDIR)."""
        if rel_dir in self._open:
            return self._open[rel_dir]
        parts = _components(rel_dir)
        if any(p == ".." for p in parts):
            raise DestinationRefused(f"{rel_dir!r} leaves the destination")
        if not parts:
            return self._top
        parent = self.folder("/".join(parts[:-1]), create)
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        try:
            _refuse_foreign(f"{self.dest}/{rel_dir}", os.fstat(fd))
        except DestinationRefused:
            os.close(fd)
            raise
        if len(self._open) >= _MAX_OPEN:  # the parent's is among them: it is not used again
            for old in self._open.values():
                os.close(old)
            self._open.clear()
        self._open[rel_dir] = fd
        return fd

    def locate(self, rel: str) -> tuple[int, str]:
        """The folder descriptor and the name of the entry ``rel``."""
        if rel == "":
            if self.is_file:
                return self._top, self.leaf
            raise ValueError("the destination folder itself has no parent here")
        head, _, name = rel.rpartition("/")
        if name in ("", ".", ".."):
            raise DestinationRefused(f"{rel!r} is not a name under the destination")
        return self.folder(head), name

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry as it is (a link is a link), or None when it or a folder on the way is
        missing or is not a real folder."""
        try:
            if rel == "" and not self.is_file:
                return os.fstat(self._top)
            fd, name = self.locate(rel)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None

    def make_folder(self, rel: str, mode: int) -> None:
        """The folder ``rel`` with ``mode`` (plus this user's write and search, until the files
        land); whatever else is there in its place (a link, a file) is removed first."""
        if rel == "" and not self.is_file:
            os.fchmod(self._top, mode)
            return
        fd, name = self.locate(rel)
        st = self.lstat(rel)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=fd)
        sub = self.folder(rel, create=True)
        os.fchmod(sub, mode)

    def set_folder_mode(self, rel: str, mode: int) -> None:
        with contextlib.suppress(OSError):
            os.fchmod(self._top if rel == "" and not self.is_file else self.folder(rel), mode)

    def open_file(self, rel: str, name: str | None = None, *, new: bool) -> int:
        """A descriptor of ``name`` (default: the entry's own) in the entry's folder, never
        through a link: ``new`` removes whatever has that name and creates it afresh (0600);
        otherwise it must already be a regular file."""
        fd, own = self.locate(rel)
        name = name or own
        if new:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, 0o600, dir_fd=fd)
        out = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        if not stat.S_ISREG(os.fstat(out).st_mode):
            os.close(out)
            raise OSError(errno.EINVAL, "not a regular file", name)
        return out

    def read_file(self, rel: str) -> int:
        fd, name = self.locate(rel)
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)

    def replace(self, rel: str, tmp_name: str) -> None:
        """Rename ``tmp_name`` over the entry (a link there is replaced, not followed)."""
        fd, name = self.locate(rel)
        os.rename(tmp_name, name, src_dir_fd=fd, dst_dir_fd=fd)

    def make_link(self, rel: str, target: str, tmp_name: str) -> None:
        fd, name = self.locate(rel)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name, dir_fd=fd)
        os.symlink(target, tmp_name, dir_fd=fd)
        os.rename(tmp_name, name, src_dir_fd=fd, dst_dir_fd=fd)

    def readlink(self, rel: str) -> str:
        fd, name = self.locate(rel)
        return os.readlink(name, dir_fd=fd)

    def free_bytes(self) -> int:
        st = os.statvfs(self._top)
        return st.f_bavail * st.f_frsize
