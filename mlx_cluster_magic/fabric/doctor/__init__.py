"""``%mlx_cluster doctor``: is every host ready to run ranks, and if not, what to type to fix it.

A multi-host start fails late and obscurely (mpiexec hangs on a password prompt, a rank dies on
an import, MPI traffic crawls over Wi-Fi or a 1500-byte MTU). The doctor checks each host up
front, all hosts at once, with one ssh round trip per host and hard timeouts, so a dead host
costs at most a few seconds and never a hang. Every problem comes back as a failing (or warning)
check with the host's own error text and a command to fix it; nothing here raises for a bad host.

Modules: :mod:`.probe` (shipped to each host), :mod:`.collect` (ssh and parsing the answers),
:mod:`.checks` (the table of checks), :mod:`.advice` (which backend), :mod:`.report` (data and
rendering). No IPython import.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ...errors import MLXClusterError
from ..macos import HostFacts, host_facts
from ..netif import RouteFinding, interface_for, route_checks
from ..placement import Host, Placement
from . import probe as _probe
from .advice import Advice, advise_backend
from .collect import HostProbe, Reach, probe_host, ssh_argv, tcp_reach
from .host_checks import (
    CHECKS,
    WANT_MTU,
    HostContext,
    build_checks,
    parse_interfaces,
    route_findings,
)
from .probe import PACKAGES
from .report import Check, DoctorReport, HostCheck

__all__ = [
    "CHECKS",
    "PACKAGES",
    "WANT_MTU",
    "Advice",
    "Check",
    "DoctorReport",
    "HostCheck",
    "RouteFinding",
    "advise_backend",
    "head_versions",
    "interface_for",
    "parse_interfaces",
    "route_checks",
    "run_doctor",
]


def head_versions() -> dict[str, str | None]:
    """This process's versions, read exactly as the remote probe reads them."""
    return {k: v.get("version") for k, v in _probe.versions().items()}


def _facts(host: Host, found: HostProbe) -> HostFacts | None:
    """What the host said about itself, for the backend advice; None if it said nothing."""
    if not found.started:
        return None
    info = found.info or {}
    macos = info.get("macos")
    return host_facts(
        host.ssh,
        os_name=found.os or None,
        macos_version=macos if isinstance(macos, str) else None,
        hardware_ports=found.sections.get("hwports"),
        ifconfig=found.ifaces if found.os == "Darwin" else None,
        thunderbolt_profile=found.sections.get("tbprofile"),
        ibv_devices=found.sections.get("ibv"),
    )


def _peers(hosts: Sequence[Host], i: int) -> tuple[tuple[str, str], ...]:
    """``(name, ip)`` for every cluster IP of every host but ``hosts[i]``."""
    own = set(hosts[i].ips)
    seen: dict[str, str] = {}
    for j, h in enumerate(hosts):
        if j != i:
            for ip in h.ips:
                if ip not in own:
                    seen.setdefault(ip, h.ssh)
    return tuple((name, ip) for ip, name in seen.items())


def run_doctor(
    placement: Placement,
    *,
    python: str | None = None,
    ssh: str | Sequence[str] | None = None,
    timeout: float = 10.0,
    backend: str | None = None,
    advice: bool = True,
) -> DoctorReport:
    """Check every host of ``placement`` at once; return the report (never raises for a host).

    ``python`` is the interpreter the ranks will run on each host (default: this kernel's path),
    ``ssh`` the ssh command mpiexec will use (e.g. ``"ssh -F ~/.ssh/tb"``), ``timeout`` the
    seconds allowed for connecting and for the remote checks (each bounded separately).
    ``advice`` also reads each Mac's Thunderbolt cables and RDMA state and recommends a
    backend (``report.advice``); a start's preflight can leave it out.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise MLXClusterError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    if python is not None and (not isinstance(python, str) or not python.strip()):
        raise MLXClusterError(f"--python must be a path to a python, got {python!r}")
    python = python.strip() if python else sys.executable
    backend = backend or "mpi"  # what %mlx_cluster start uses by default
    argv = ssh_argv(ssh)
    timeout = float(timeout)
    t0 = time.monotonic()
    head = head_versions()
    hosts = list(placement.hosts)
    peers = [_peers(hosts, i) for i in range(len(hosts))]
    with ThreadPoolExecutor(max_workers=max(1, 2 * len(hosts))) as pool:
        probes: list[Future[HostProbe]] = []
        reaches: list[Future[Reach] | None] = []
        for h, p in zip(hosts, peers):
            probes.append(
                pool.submit(probe_host, h, argv, python, timeout, [ip for _, ip in p], advice)
            )
            reaches.append(
                None if h.is_local or not h.ips else pool.submit(tcp_reach, h, argv, timeout)
            )
        rows = []
        facts: dict[str, HostFacts | None] = {}
        routes: list[RouteFinding] = []
        for h, p, pf, rf in zip(hosts, peers, probes, reaches):
            found = pf.result()
            ctx = HostContext(
                host=h,
                probe=found,
                reach=rf.result() if rf is not None else None,
                python=python,
                head=head,
                backend=backend,
                peers=p,
            )
            facts[h.ssh] = _facts(h, found)
            routes += route_findings(ctx) or []
            rows.append(
                HostCheck(
                    host=h.ssh,
                    checks=build_checks(ctx),
                    address=h.ips[0] if h.ips else None,
                    elapsed=found.elapsed,
                )
            )
    return DoctorReport(
        rows,
        python,
        head,
        elapsed=time.monotonic() - t0,
        columns=CHECKS,
        advice=advise_backend(placement, facts) if advice else None,
        routes=routes,
        facts=facts,
    )
