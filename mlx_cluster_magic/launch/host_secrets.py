"""The secrets each host's ranks need, delivered over ssh and nothing else.

The ranks need the controller's engine connection (its HMAC key, with which anyone can run code
on every rank) and the status channel's keys. ``mpiexec -x`` would carry them to the hosts in
clear on PRRTE's own TCP link, so they travel in ssh's encrypted channel instead: the stdin of
an ``ssh host 'umask 077; mkdir ...; cat > file'`` (never a command line), into a 0600 file in
a 0700 directory under the login's home. The ranks read that file (its path, which is no
secret, is all mpiexec forwards); the directory is removed with the cluster. A local cluster
writes the same file into its private profile directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..contract import ENGINE_FILE_KEY, STATUS_SECRETS_KEY
from ..errors import MLXClusterError
from ..fabric.placement import Host, Placement

#: The folder, under each host's home, that holds one private folder per running cluster.
HOME_DIR = ".mlx-cluster"
FILE_NAME = "secrets.json"
CONNECT_TIMEOUT_S = 5
#: A removal at teardown waits this long at most (an unreachable host keeps its file; the key
#: in it dies with the controller).
REMOVE_WAIT_S = 3.0


def relative_dir(run_name: str) -> str:
    """The run's folder, relative to each host's home (the same on every host)."""
    return f"{HOME_DIR}/{run_name}"


def bundle(
    status: Mapping[str, Any] | None,
    engine: Mapping[str, Any] | None = None,
    engine_file: str | None = None,
) -> bytes:
    """The file a rank reads: the controller's engine connection itself (ipengine reads the
    file as its connection file and ignores our keys), or the path of the controller's own
    file on this machine, plus the status channel's keys."""
    content: dict[str, Any] = dict(engine or {})
    if engine_file is not None:
        content[ENGINE_FILE_KEY] = engine_file
    content[STATUS_SECRETS_KEY] = dict(status) if status is not None else None
    return json.dumps(content).encode()


def write_private(path: str, data: bytes) -> None:
    """``data`` in a new 0600 file whose folder is made 0700; never through a link."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700, follow_symlinks=False)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _ssh(ssh: str | None, host: Host, command: str) -> list[str]:
    base = shlex.split(ssh or "ssh")
    return [
        base[0],
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
        *base[1:],
        host.ssh,
        command,
    ]  # fmt: skip


def _write_command(rel_dir: str) -> str:
    top, run = shlex.quote(HOME_DIR), shlex.quote(rel_dir)
    return (
        f"umask 077 && cd && mkdir -p {top} && chmod 700 {top} && mkdir -p {run} && "
        f"chmod 700 {run} && cat > {run}/{FILE_NAME}"
    )


def _in_parallel(hosts: list[Host], one: Any, wait: float | None) -> dict[str, str]:
    """Run ``one(host)`` for every host at once; host -> what went wrong."""
    errors: dict[str, str] = {}

    def run(host: Host) -> None:
        problem = one(host)
        if problem:
            errors[host.ssh] = problem

    threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    deadline = None if wait is None else time.monotonic() + wait
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return errors


def ship(placement: Placement, ssh: str | None, rel_dir: str, data: bytes) -> str:
    """Write ``data`` to ``~/<rel_dir>/secrets.json`` on every host (over ssh for remote ones);
    returns that path relative to home. Raises naming the first host that failed."""
    hosts = list({h.ssh: h for h in placement.hosts}.values())
    limit = CONNECT_TIMEOUT_S + 10

    def one(host: Host) -> str | None:
        if host.is_local:
            try:
                write_private(os.path.join(os.path.expanduser("~"), rel_dir, FILE_NAME), data)
            except OSError as e:
                return str(e)
            return None
        try:
            res = subprocess.run(
                _ssh(ssh, host, _write_command(rel_dir)),
                input=data, capture_output=True, timeout=limit, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"timed out after {limit} s"
        except OSError as e:
            return str(e)
        if res.returncode != 0:
            lines = res.stderr.decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else f"exit {res.returncode}"
        return None

    errors = _in_parallel(hosts, one, None)
    if errors:
        host, why = next(iter(errors.items()))
        raise MLXClusterError(
            f"{host}: could not write the cluster's private connection file over ssh: {why} "
            "(check `ssh " + host + " true` and that its home is writable)"
        )
    return f"{rel_dir}/{FILE_NAME}"


def remove(placement: Placement, ssh: str | None, rel_dir: str) -> None:
    """Remove the run's folder on every host; best effort, at most ``REMOVE_WAIT_S``."""
    hosts = list({h.ssh: h for h in placement.hosts}.values())
    command = f"cd && rm -rf {shlex.quote(rel_dir)}"

    def one(host: Host) -> None:
        if host.is_local:
            shutil.rmtree(os.path.join(os.path.expanduser("~"), rel_dir), ignore_errors=True)
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                _ssh(ssh, host, command), capture_output=True, check=False,
                stdin=subprocess.DEVNULL, timeout=math.ceil(REMOVE_WAIT_S),
            )  # fmt: skip

    _in_parallel(hosts, one, REMOVE_WAIT_S)
