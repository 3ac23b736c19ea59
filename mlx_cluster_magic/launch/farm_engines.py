"""A farm's engines: independent ipyparallel engines, one process per slot, none of them ranks
of an MPI job, so one Mac that leaves takes only its own engines with it.

Each engine is ``python -m mlx_cluster_magic.rank.farm_engine``: on the head a child process,
on a remote host the command of its own ``ssh`` session (the hosts, ssh options, python and
workdir as every cluster resolves them: ``launch.spec``). A remote engine is tied to its
session and exits when it closes, so ending the ssh process (tracked at spawn, reaped with the
run) ends the engine. Its secrets reach each host as every cluster's do (``host_secrets``,
over ssh); the engine id and status rank of an engine are its slot, and a farm's slots only
grow (``add`` appends a host's, a host that leaves keeps its own, unused). No IPython.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ..contract import FARM_SLOT_VAR, FARM_TIED_VAR, SECRETS_FILE_VAR
from ..errors import MLXClusterError
from ..fabric.placement import Host, Placement
from . import host_secrets, ipp_adapter, processes
from .bringup import (
    ENGINE_NAMESPACE,
    HEARTBEAT_SLACK_S,
    Running,
    deliver_secrets,
    heartbeat_misses,
)

#: ssh's own keep-alive for an engine's session (seconds between probes): a session to a Mac
#: that is gone ends, and the ssh process with it, once the grace and the engines' own
#: heartbeat slack have passed, instead of never.
SERVER_ALIVE_S = 5


def server_alive(grace: float) -> list[str]:
    """ssh's keep-alive options for a session that outlives a drop shorter than ``grace``."""
    count = math.ceil((grace + HEARTBEAT_SLACK_S) / SERVER_ALIVE_S)
    return ["-o", f"ServerAliveInterval={SERVER_ALIVE_S}", "-o", f"ServerAliveCountMax={count}"]


#: Seconds an engine asked to shut down has to unregister before its process is ended.
SHUTDOWN_WAIT_S = 2.0


@dataclass
class Slot:
    """One engine of the farm: where it runs and what runs it."""

    slot: int
    host: Host
    process: subprocess.Popen[bytes] | None = None
    log: str = ""
    #: What the engine said of itself once registered (``farm_report``).
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


def engine_args(grace: float) -> list[str]:
    """The engine's own options: the namespace every cluster's engines start with."""
    return [
        f"--IPEngine.startup_command={ENGINE_NAMESPACE}",
        "--HistoryManager.enabled=False",
        f"--IPEngine.max_heartbeat_misses={heartbeat_misses(grace)[1]}",
    ]


def remote_command(python: str, workdir: str | None, env: dict[str, str], args: list[str]) -> str:
    """The shell line an engine's ssh session runs (no secret in it: only a file's path)."""
    cd = f"cd {shlex.quote(workdir)} && " if workdir else ""
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    program = " ".join(
        shlex.quote(a) for a in [python, "-m", "mlx_cluster_magic.rank.farm_engine", *args]
    )
    return f"{cd}exec env {assigns} {program}"


def _spawn(run: Running, slot: Slot, secrets_path: str) -> None:
    """Start ``slot``'s engine (over ssh when its host is remote) and track it at once."""
    spec = run.spec
    env = {**spec.placement.envs, SECRETS_FILE_VAR: secrets_path, FARM_SLOT_VAR: str(slot.slot)}
    fd, slot.log = tempfile.mkstemp(
        prefix=f"farm-engine-{slot.slot}-", suffix=".log", dir=os.path.join(run.profile_dir, "log")
    )
    args = engine_args(spec.grace)
    if slot.host.is_local:
        argv = [spec.python, "-m", "mlx_cluster_magic.rank.farm_engine", *args]
        full_env = {**os.environ, **env}
        cwd = spec.workdir
    else:
        env[FARM_TIED_VAR] = "1"
        base = shlex.split(spec.ssh or "ssh")
        argv = [
            base[0], "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            *server_alive(spec.grace), *base[1:], slot.host.ssh,
            remote_command(spec.python, spec.workdir, env, args),
        ]  # fmt: skip
        full_env, cwd = dict(os.environ), None
    with os.fdopen(fd, "wb") as log:
        slot.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            env=full_env, cwd=cwd, start_new_session=True,
        )  # fmt: skip
    tracked = run.track([slot.process.pid])
    if run.watchdog is not None:
        run.watchdog.watch(tracked)


def output_tail(slot: Slot, lines: int = 3) -> str:
    """What an engine (or its ssh) said last: our own one-line message if there is one, else
    its last lines, for a failed start's one line."""
    try:
        with open(slot.log, errors="replace") as f:
            said = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    ours = [ln.split("mlx_cluster_magic: ", 1)[1] for ln in said if "mlx_cluster_magic: " in ln]
    return ours[0] if ours else " | ".join(said[-lines:]) or "(no output)"


def start(run: Running, slots: list[Slot], secrets_path: str) -> None:
    """Start ``slots``' engines and return once each has registered and reported a group of
    one; raise naming the first host whose engine exited or did not come in time."""
    for slot in slots:
        _spawn(run, slot, secrets_path)
    assert run.client is not None
    deadline = time.monotonic() + run.spec.timeout
    wanted = {s.slot for s in slots}
    while not wanted <= set(run.client.ids):
        for slot in slots:
            if slot.slot not in run.client.ids and slot.process and slot.process.poll() is not None:
                raise MLXClusterError(
                    f"{slot.host.ssh}: the farm engine exited before it registered: "
                    f"{output_tail(slot)}"
                )
        if time.monotonic() > deadline:
            late = sorted({s.host.ssh for s in slots if s.slot not in run.client.ids})
            raise MLXClusterError(
                f"{', '.join(late)}: no farm engine registered within {run.spec.timeout:g} s "
                "(%mlx_cluster doctor; a longer --timeout on a slow host)"
            )
        time.sleep(0.02)
    check(run, slots)


def check(run: Running, slots: list[Slot]) -> None:
    """Each engine is its slot's, with an MLX group of one; local ones tracked as ours."""
    from ..rank.farm_engine import farm_report

    assert run.client is not None
    view = run.client[[s.slot for s in slots]]
    reports = view.apply_sync(farm_report)
    for slot, r in zip(slots, reports, strict=True):
        if r["slot"] != slot.slot or r["mlx_size"] != 1:
            raise MLXClusterError(
                f"engine {slot.slot} on {r['host']} is slot {r['slot']} with an MLX group of "
                f"{r['mlx_size']}; expected slot {slot.slot} with a group of one"
            )
        slot.report = dict(r, rank=slot.slot)
        if slot.host.is_local:
            tracked = processes.Tracked.of(int(r["pid"]))
            if tracked is not None:
                run.rank_procs[slot.slot] = tracked
                assert run.watchdog is not None
                run.watchdog.watch(run.track([tracked.pid]))


def first_slots(placement: Placement) -> list[Slot]:
    """The slots of a farm's start: ``placement``'s ranks, in order."""
    return [Slot(i, host) for i, host in enumerate(placement.ranks)]


def grown(placement: Placement, host: Host, count: int) -> Placement:
    """``placement`` with ``count`` more slots on ``host`` at its end (a host that left and
    comes back gets new slots: the old ones stay its, unused)."""
    return dataclasses.replace(
        placement, hosts=(*placement.hosts, host), per_host=(*placement.per_host, count)
    )


def deliver(run: Running, hosts: list[Host] | None = None) -> str:
    """The secrets on every host of the run (at start), or on ``hosts`` (a host added)."""
    if hosts is None:
        return deliver_secrets(run)
    status = run.status.credentials if run.status is not None else None
    engine = ipp_adapter.wait_for_engine_connection(run.ipp, run.spec.timeout)
    rel_dir = host_secrets.relative_dir(os.path.basename(run.profile_dir))
    run.host_secrets_dir = rel_dir
    few = Placement(hosts=tuple(hosts), per_host=tuple(1 for _ in hosts))
    return host_secrets.ship(few, run.spec.ssh, rel_dir, host_secrets.bundle(status, engine))


def end(run: Running, slots: list[Slot], *, graceful: bool = True) -> None:
    """Stop ``slots``' engines: asked to shut down through the controller (they unregister at
    once), then their processes (ssh sessions) ended and reaped."""
    if graceful and run.client is not None:
        live = [s.slot for s in slots if s.slot in run.client.ids]
        if live:
            with contextlib.suppress(Exception):
                run.client.shutdown(targets=live, block=False)
            deadline = time.monotonic() + SHUTDOWN_WAIT_S
            while set(live) & set(run.client.ids) and time.monotonic() < deadline:
                time.sleep(0.02)
    procs = [s.process for s in slots if s.process is not None]
    for proc in procs:
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
    tracked = [t for p in procs if (t := processes.Tracked.of(p.pid)) is not None]
    tracked += [run.rank_procs.pop(s.slot) for s in slots if s.slot in run.rank_procs]
    processes.reap(tracked, grace=2.0)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(timeout=0.5)
