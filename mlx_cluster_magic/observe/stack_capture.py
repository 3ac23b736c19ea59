"""Every rank's Python stack, read by the head, and faulthandler's text turned into frames.

``capture()`` signals a rank's pid (``os.kill`` locally; over the cluster's own ssh for a
remote rank) so that its ``rank.stack_dump`` handler writes the dump, and reads it back;
``parse()`` turns faulthandler's text into frames. Cell frames
(``/tmp/ipykernel_<pid>/<hash>.py`` on ipykernel engines) are shown as ``cell line N``.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import time
from dataclasses import dataclass

from ..contract import STACK_SIGNAL as SIGNAL
from ..contract import is_cell, location

__all__ = [
    "Frame",
    "ThreadStack",
    "capture",
    "capture_all",
    "is_cell",
    "location",
    "main_thread",
    "parse",
    "traceback_where",
]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TB_CELL = re.compile(r"^Cell In\s*\[\d*\], line (\d+)(?:, in ([^(\s]+))?")
_TB_FILE = re.compile(r"^File .+:\d+, in ")
_TB_ARROW = re.compile(r"^-+>\s*(\d+)\s?(.*)$")


def traceback_where(text: str) -> tuple[str, str] | None:
    """Where a traceback as IPython formats it (what a rank sends back, colours and all) left
    the user's cell: ``("cell line 3", "time.sleep")`` from its innermost cell frame, with
    ``in f()`` for a function defined in the cell and the call on that line ("" for none).
    None when no frame is a cell's."""
    found: tuple[str, str] | None = None
    frame: tuple[int, str] | None = None
    for raw in _ANSI.sub("", text).splitlines():
        head = _TB_CELL.match(raw)
        if head:
            frame = (int(head.group(1)), head.group(2) or "")
            line, func = frame
            found = (f"cell line {line}" + (f" in {func}()" if func else ""), "")
            continue
        if _TB_FILE.match(raw):
            frame = None
            continue
        arrow = _TB_ARROW.match(raw)
        if arrow and frame is not None and found is not None and int(arrow.group(1)) == frame[0]:
            found = (found[0], _outer_call(arrow.group(2)))
    return found


def _outer_call(code: str) -> str:
    """The outermost call of one line of source: ``time.sleep``, ``np.linalg.inv``; ""."""
    import ast

    text = code.strip()
    for prefix in ("return ", "yield ", "await "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    try:
        tree = ast.parse(text + (" pass" if text.endswith(":") else ""))  # for/with/if lines
    except SyntaxError:
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name, func = [], node.func
            while isinstance(func, ast.Attribute):
                name.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                name.append(func.id)
            return ".".join(reversed(name))
    return ""


def capture(
    pid: int,
    path: str,
    ssh: str | None = None,
    host: str | None = None,
    timeout: float = 2.0,
) -> str:
    """Signal ``pid`` to dump its stacks to ``path`` and return the dump's text. ``path`` must
    be a regular file of this user's, never a link (else nothing is truncated or signalled);
    both come from the rank's own answer (``cluster.why()``), never from a status record.

    Local when ``host`` is None (``os.kill``); otherwise over ``ssh`` (the cluster's ssh
    command, ``ssh`` by default) to ``host``: ``: > path; kill -USR2 pid; sleep; cat path``.
    Returns "" when nothing came back within ``timeout`` (the rank is gone, or the file is).
    """
    if host is None:
        return _capture_local(pid, path, timeout)
    wait = min(0.3, timeout / 4)
    quoted = shlex.quote(path)
    script = (  # a regular file of ours, not a link: what the rank's stack_dump made
        f"[ -f {quoted} ] && [ ! -L {quoted} ] && [ -O {quoted} ] && : > {quoted} && "
        f"kill -USR2 {int(pid)} && sleep {wait:g} && cat {quoted}"
    )
    argv = [*shlex.split(ssh or "ssh"), "-o", "BatchMode=yes", host, script]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def capture_all(
    targets: list[tuple[int, str, str | None] | None],
    ssh: str | None = None,
    timeout: float = 2.0,
) -> list[str | None]:
    """``capture`` for many ranks at once (one thread each): ``targets[i]`` is
    ``(pid, path, host)`` with ``host`` None for a local rank, or None to skip rank ``i``."""
    from concurrent.futures import ThreadPoolExecutor

    live = [(i, t) for i, t in enumerate(targets) if t is not None]
    out: list[str | None] = [None] * len(targets)
    if not live:
        return out
    with ThreadPoolExecutor(max_workers=min(16, len(live))) as pool:
        futures = {
            i: pool.submit(capture, pid, path, ssh, host, timeout) for i, (pid, path, host) in live
        }
        for i, f in futures.items():
            out[i] = f.result() or None
    return out


def _capture_local(pid: int, path: str, timeout: float) -> str:
    try:
        # a regular file of ours, not a link: what the rank's stack_dump made
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                return ""
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        os.kill(pid, SIGNAL)
    except OSError:
        return ""
    deadline = time.monotonic() + timeout
    last, stable_since = "", time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return ""
        if text != last:
            last, stable_since = text, time.monotonic()
        elif text and time.monotonic() - stable_since > 0.05:
            break
    return last


@dataclass(frozen=True)
class Frame:
    """One Python frame of a dump: innermost first within a thread."""

    file: str
    line: int | None
    func: str

    @property
    def where(self) -> str:
        return location(self.file, self.line)

    def __str__(self) -> str:
        return f"{self.func} ({self.where})"


@dataclass(frozen=True)
class ThreadStack:
    """One thread of a dump; ``main`` marks the thread faulthandler calls current."""

    ident: str
    current: bool
    frames: tuple[Frame, ...]


_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+)")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+|\?\?\?) in (.*)$')


def parse(text: str) -> list[ThreadStack]:
    """faulthandler's text (``Thread 0x...`` blocks, most recent call first) as data.

    Only the last complete dump in ``text`` is used.
    """
    blocks: list[ThreadStack] = []
    ident, current = "", False
    frames: list[Frame] = []
    for raw in text.splitlines():
        m = _THREAD.match(raw)
        if m:
            if ident:
                blocks.append(ThreadStack(ident, current, tuple(frames)))
            if any(b.ident == m.group(2) for b in blocks):
                blocks = []  # a thread seen again: a later dump starts, keep only that one
            ident, current, frames = m.group(2), m.group(1) == "Current thread", []
            continue
        f = _FRAME.match(raw)
        if f and ident:
            line = None if f.group(2) == "???" else int(f.group(2))
            frames.append(Frame(f.group(1), line, f.group(3)))
    if ident:
        blocks.append(ThreadStack(ident, current, tuple(frames)))
    return blocks


def main_thread(threads: list[ThreadStack], main_ident: str | None = None) -> ThreadStack | None:
    """The engine's main thread: the one named, else the one running a cell or ``<module>``
    code at the bottom of its stack (ipyparallel's kernel), else the last listed."""
    if not threads:
        return None
    if main_ident is not None:
        for t in threads:
            if int(t.ident, 16) == int(main_ident, 16):
                return t
    for t in threads:
        if any(is_cell(f.file) for f in t.frames):
            return t
    for t in threads:
        if t.frames and t.frames[-1].func == "<module>":
            return t
    return threads[-1]
