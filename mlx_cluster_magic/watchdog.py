"""Stops a cluster's processes if the process that started it (the kernel) dies abruptly.

Started by ``MLXCluster`` with the cluster's private directory, the kernel's pid and our own
pids; more pids arrive as lines on stdin. A normal stop writes ``stop`` and closes stdin. End of
input without ``stop`` means the kernel is gone (killed, crashed), so every pid we were given is
terminated, then killed, and the directory (connection files, logs) removed. Kills only the
processes it was given, by pid, checked against their start time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys

import psutil


def _track(pid_text: str, procs: list[psutil.Process]) -> None:
    with contextlib.suppress(ValueError, psutil.Error):
        procs.append(psutil.Process(int(pid_text)))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a kernel interrupt is not a death
    profile_dir, _kernel_pid, *pids = argv
    procs: list[psutil.Process] = []
    for pid in pids:
        _track(pid, procs)
    for line in sys.stdin:
        if line.strip() == "stop":
            return 0
        _track(line.strip(), procs)
    # stdin closed without "stop": our parent is gone.
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=3)
    if os.path.basename(profile_dir).startswith("mlx-cluster-"):
        shutil.rmtree(profile_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
