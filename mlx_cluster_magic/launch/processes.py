"""Process safety: every process a cluster starts is tracked at spawn, reaped by pid, and
watched by a small watchdog process that stops them if the kernel dies abruptly.

One model (``Tracked``: a pid and its start time) serves the cluster and the watchdog, so a pid
the system has since reused for another program is never signalled. Run as
``python .../mlx_cluster_magic/procs.py DIR KERNEL_PID`` (pids and start times on stdin) it
is the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

#: Private directories this module may remove start with this prefix.
PRIVATE_PREFIX = "mlx-cluster-"


@dataclass(frozen=True)
class Tracked:
    """A process of ours: its pid and the start time it had when we tracked it."""

    pid: int
    started: float

    @classmethod
    def of(cls, pid: int) -> Tracked | None:
        """Track ``pid`` now; None if it is already gone."""
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def process(self) -> psutil.Process | None:
        """The live process, or None when it exited or the pid now belongs to another one."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) > 0.01:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return proc

    def alive(self) -> bool:
        """Running and not a zombie (a zombie has exited and only waits to be reaped)."""
        return self.process() is not None

    def line(self) -> str:
        return f"{self.pid} {self.started!r}\n"

    @classmethod
    def parse(cls, line: str) -> Tracked | None:
        try:
            pid, started = line.split()
            return cls(int(pid), float(started))
        except ValueError:
            return None


def track(pids: Iterable[int]) -> list[Tracked]:
    """Track each pid that still runs, with its children (an engine's kernel nanny, say)."""
    found: dict[int, Tracked] = {}
    for pid in pids:
        t = Tracked.of(pid)
        if t is None:
            continue
        found[pid] = t
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                c = Tracked.of(child.pid)
                if c is not None:
                    found[child.pid] = c
    return list(found.values())


def terminate(tracked: Iterable[Tracked]) -> None:
    """SIGTERM each tracked process that still runs, without waiting."""
    for t in tracked:
        p = t.process()
        if p is not None:
            with contextlib.suppress(psutil.Error):
                p.terminate()


def reap(tracked: Iterable[Tracked], grace: float = 5.0) -> None:
    """SIGTERM what still runs, and every process it started since it was tracked; SIGKILL
    what is left after ``grace`` seconds (0: kill at once).

    Each process is paused (SIGSTOP) before its children are listed and resumed only once it
    has been signalled, so one still starting (a controller forking its schedulers) can neither
    fork a child unseen nor leave one behind with no parent to stop it.
    """
    procs = _paused_tree([p for p in (t.process() for t in tracked) if p is not None])
    sig = signal.SIGKILL if grace <= 0 else signal.SIGTERM
    try:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
    finally:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.resume()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in procs):
        time.sleep(0.02)
    for p in procs:
        if _running(p):
            with contextlib.suppress(psutil.Error):
                p.kill()
    # Reap our own children so they do not linger as zombies.
    for p in procs:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if p.ppid() == os.getpid():
                p.wait(0)


def _paused_tree(roots: list[psutil.Process]) -> list[psutil.Process]:
    """``roots`` and all their descendants, each paused (SIGSTOP) before its children are read."""
    found: dict[int, psutil.Process] = {}
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p.pid in found or not _running(p):
            continue
        try:
            p.suspend()
            found[p.pid] = p
            _until_stopped(p)
            todo += p.children()
        except psutil.Error:
            continue
    return list(found.values())


def _until_stopped(p: psutil.Process, timeout: float = 0.2) -> None:
    """SIGSTOP takes effect when the process next leaves the kernel: a fork under way then has
    its child in the process table. Wait for that (briefly) before reading the children."""
    deadline = time.monotonic() + timeout
    while p.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
        if time.monotonic() > deadline:
            return
        time.sleep(0.001)


def _running(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class Watchdog:
    """The head side of the watchdog: a child process, told each new pid on its stdin."""

    def __init__(self, private_dir: str, tracked: Iterable[Tracked] = ()) -> None:
        # Run as a script, not ``-m``: the package's __init__ (ipyparallel and all) is not needed
        # and would cost every start a few hundred ms of CPU.
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), private_dir, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.watch(tracked)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def watch(self, tracked: Iterable[Tracked]) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.write("".join(t.line() for t in tracked).encode())
            self._proc.stdin.flush()

    def close(self) -> None:
        """A normal stop: the watchdog exits without touching anything."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin:
                proc.stdin.write(b"stop\n")
                proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def watchdog_main(argv: list[str]) -> int:
    """Wait on stdin; at end of input without ``stop`` (the kernel is gone) stop every process
    we were given and remove the cluster's private directory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a kernel interrupt is not a death
    private_dir = argv[0]
    tracked: list[Tracked] = []
    for line in sys.stdin:
        if line.strip() == "stop":
            return 0
        t = Tracked.parse(line)
        if t is not None:
            tracked.append(t)
    reap(tracked, grace=3.0)
    if os.path.basename(private_dir).startswith(PRIVATE_PREFIX):
        shutil.rmtree(private_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(watchdog_main(sys.argv[1:]))
