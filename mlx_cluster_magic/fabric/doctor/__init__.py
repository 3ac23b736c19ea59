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

import contextlib
import dataclasses
import ipaddress
import random
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import MLXClusterError
from ..data_paths import DataPath, data_paths, in_networks, missing_paths_fix
from ..macos import HostFacts, host_facts
from ..netif import RouteFinding, interface_for, local_interfaces, route_checks
from ..placement import Host, Placement
from . import probe
from .advice import Advice, advise_backend
from .collect import HeadListener, HostProbe, probe_host, ssh_argv, tcp_reach
from .host_checks import (
    CHECKS,
    WANT_MTU,
    HostContext,
    build_checks,
    parse_interfaces,
    peer_reach,
    route_findings,
)
from .probe import PACKAGES
from .report import Check, DoctorReport, HostCheck, PathResult

__all__ = [
    "CHECKS",
    "PACKAGES",
    "WANT_MTU",
    "Advice",
    "Check",
    "DoctorReport",
    "HostCheck",
    "PathResult",
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
    return {k: v.get("version") for k, v in probe.versions().items()}


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


#: The ports a doctor run's probe listeners pick one from.
PROBE_PORTS = (42100, 42899)


def _head_listener(address: str | None, hosts: list[Host], port: int) -> HeadListener | None:
    """The head's test listener on the control address, when remote hosts will connect there."""
    if not address or address.startswith("127.") or all(h.is_local for h in hosts):
        return None
    return HeadListener(address, port + 1, {h.ssh for h in hosts if not h.is_local})


def _head_link(
    listener: HeadListener | None, host: Host, found: HostProbe
) -> dict[str, Any] | None:
    """What the host found connecting to the head's listener, and whether its UDP arrived."""
    if listener is None or host.is_local:
        return None
    if listener.error is not None:
        return {"address": listener.address, "listen_error": listener.error}
    got = (found.info or {}).get("head") if found.started else None
    if not isinstance(got, dict):
        return None  # the python did not run: its own check says why
    return {
        "address": listener.address,
        "tcp": got.get("tcp"),
        "udp": host.ssh in listener.udp_from,
    }


def _refusals(
    hosts: list[Host], paths: Sequence[DataPath], found: list[HostProbe]
) -> dict[int, list[tuple[str, str]]]:
    """For each host, the (peer, address) whose connection to its python was refused while
    that python listened there: a refusal before the host's own probe opened its listener, or
    after it closed it (one probe early, the other late, on a busy host) is no firewall."""
    out: dict[int, list[tuple[str, str]]] = {}
    for path in paths:
        info = found[path.src].info if found[path.src].started else None
        tested = (info or {}).get("reach") or {}
        dst = found[path.dst].info if found[path.dst].started else None
        listen = (dst or {}).get("listen") or {}
        for ip in path.ips:
            res = tested.get(ip)
            if not (isinstance(res, dict) and res.get("refused")):
                continue
            since, until = listen.get("since"), listen.get("until")
            first, last = res.get("first_try"), res.get("last_try")
            listening = (listen.get("bound") or {}).get(ip) == "ok"
            # refused while it listened: the tries (continuous from first to last) overlap the
            # time the listener was open
            if since is not None and last is not None:
                listening = listening and last > since
            if until is not None and first is not None:
                listening = listening and first < until
            if listening:
                out.setdefault(path.dst, []).append((hosts[path.src].ssh, ip))
    return out


def _head_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of this machine's own interfaces."""
    nets = []
    for iface in local_interfaces().values():
        for cidr in (*iface.inet, *iface.inet6):
            with contextlib.suppress(ValueError):
                net = ipaddress.ip_interface(cidr).network
                if net.prefixlen < net.max_prefixlen:
                    nets.append(net)
    return nets


def _checked(python: str | None, timeout: object) -> tuple[str, float]:
    """The interpreter to probe and the timeout, or one line naming the bad one."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise MLXClusterError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    if python is not None and (not isinstance(python, str) or not python.strip()):
        raise MLXClusterError(f"--python must be a path to a python, got {python!r}")
    return (python.strip() if python else sys.executable), float(timeout)


def _listen_spec(
    i: int, hosts: Sequence[Host], paths: Sequence[DataPath], port: int, timeout: float
) -> str:
    """What host ``i``'s probe listens on for its peers (``port:count:window:ips|peer_ips``),
    or ``-``. ``peer_ips``: the addresses the peers connect from (every address the hostfile
    gives them); empty, so any counts, when a peer has none."""
    ips = [ip for q in paths if q.dst == i for ip in q.ips]
    if not ips:
        return "-"
    window = max(1.0, min(probe.LISTEN_S, timeout - 1.0))  # within the probe's own limit
    sources = [hosts[q.src].ips for q in paths if q.dst == i]
    peers = "" if not all(sources) else ",".join(dict.fromkeys(ip for s in sources for ip in s))
    return f"{port}:{len(ips)}:{window:g}:{','.join(dict.fromkeys(ips))}|{peers}"


def _path_results(
    i: int,
    hosts: Sequence[Host],
    paths: Sequence[DataPath],
    silent: frozenset[str],
    tested: Mapping[str, Any],
) -> list[PathResult]:
    """Whether host ``i`` reached each peer the backend sends to from it, by the address that
    answered (or the first tried)."""
    h = hosts[i]
    out = []
    for path in (q for q in paths if q.src == i):
        dst = hosts[path.dst].ssh
        if dst in silent:
            out.append(
                PathResult(h.ssh, dst, None, path.ips[0], None, f"not tested: {dst} did not answer")
            )
            continue
        tried = [(ip, *tested[ip]) for ip in path.ips if ip in tested]
        hit = next((t for t in tried if t[1]), tried[0] if tried else None)
        out.append(
            PathResult(
                h.ssh,
                dst,
                None if hit is None else hit[1],
                hit[0] if hit else path.ips[0],
                hit[3] if hit else None,
                hit[2] if hit else "not tested (the host did not answer)",
            )
        )
    return out


def _fix_missing_paths(
    rows: list[HostCheck], results: Sequence[PathResult], placement: Placement, backend: str
) -> None:
    """Every failed peers check gets the one fix that fits the cabling of all missing paths."""
    missing = [(r.src, r.dst) for r in results if r.ok is False]
    if not missing:
        return
    index = {h.ssh: i for i, h in enumerate(placement.hosts)}
    fix = missing_paths_fix(placement, backend, [(index[a], index[b]) for a, b in missing])
    for row in rows:
        row.checks = [
            dataclasses.replace(c, fix=fix) if c.name == "peers" and c.ok is False else c
            for c in row.checks
        ]


@dataclasses.dataclass
class _Round:
    """One doctor run's shared facts: the hosts, who must reach whom over which address, how
    each host is probed, and the port its python listens on for the peers."""

    hosts: list[Host]
    paths: list[DataPath]
    peers: list[tuple[tuple[str, str], ...]]  # per host: (peer, address) it sends data to
    on_network: list[bool]  # per host: the head is on its cluster network
    argv: list[str]
    python: str
    timeout: float
    advice: bool
    backend: str
    head: dict[str, str | None]
    port: int
    head_listener: HeadListener | None = None

    @classmethod
    def of(
        cls,
        placement: Placement,
        python: str,
        ssh: str | Sequence[str] | None,
        timeout: float,
        backend: str,
        advice: bool,
        networks: Sequence[str] | None,
        addresses: Mapping[str, str] | None,
    ) -> _Round:
        hosts = list(placement.hosts)
        paths = data_paths(placement, backend, networks, addresses)
        peers = [
            tuple((hosts[p.dst].ssh, ip) for p in paths if p.src == i for ip in p.ips)
            for i in range(len(hosts))
        ]
        head_nets = _head_networks() if any(not h.is_local for h in hosts) else []
        on_network = [h.is_local or not h.ips or in_networks(h.ips[0], head_nets) for h in hosts]
        # Each host's python listens on its addresses the peers send to, on one port for this
        # run; the peers connect there, so a firewall that turns that python away is seen.
        port = random.randint(*PROBE_PORTS)
        return cls(
            hosts, list(paths), peers, on_network, ssh_argv(ssh), python, timeout, advice,
            backend, head_versions(), port,
        )  # fmt: skip

    def probe(self, i: int) -> HostProbe:
        """Host ``i``'s one ssh round trip: its checks, its reach to the peers, its listener."""
        h = self.hosts[i]
        ips = list(dict.fromkeys(ip for _, ip in self.peers[i]))
        head = f"{self.head_listener.address}|{h.ssh}" if self.head_listener else "-"
        return probe_host(
            h,
            self.argv,
            self.python,
            self.timeout,
            ips,
            self.advice,
            [f"{ip}:{self.port}" for ip in ips],
            _listen_spec(i, self.hosts, self.paths, self.port, self.timeout),
            "-" if h.is_local else head,
        )

    def context(
        self,
        i: int,
        found: HostProbe,
        reach: Any,
        silent: frozenset[str],
        refused_by: tuple[tuple[str, str], ...],
    ) -> HostContext:
        h = self.hosts[i]
        return HostContext(
            host=h,
            probe=found,
            reach=reach,
            python=self.python,
            head=self.head,
            backend=self.backend,
            peers=self.peers[i],
            head_on_cluster_network=self.on_network[i],
            silent=silent,
            refused_by=refused_by,
            probe_port=self.port,
            head_link=_head_link(self.head_listener, h, found),
        )


def run_doctor(
    placement: Placement,
    *,
    python: str | None = None,
    ssh: str | Sequence[str] | None = None,
    timeout: float = 10.0,
    backend: str | None = None,
    advice: bool = True,
    networks: Sequence[str] | None = None,
    addresses: Mapping[str, str] | None = None,
    head_address: str | None = None,
) -> DoctorReport:
    """Check every host of ``placement`` at once; return the report (never raises for a host).

    ``python`` is the interpreter the ranks will run on each host (default: this kernel's path),
    ``ssh`` the ssh command mpiexec will use (e.g. ``"ssh -F ~/.ssh/tb"``), ``timeout`` the
    seconds allowed for connecting and for the remote checks (each bounded separately).
    ``advice`` also reads each Mac's Thunderbolt cables and RDMA state and recommends a
    backend (``report.advice``); a start's preflight can leave it out. Each host also tests,
    from where it stands, that it reaches every peer the backend sends data to
    (:mod:`..data_paths`; ``networks`` are the CIDRs MPI is pinned to and ``addresses`` each
    host's control address, as the start computes them); the head itself needs to reach a
    host's cluster IP only when it is on that network (else ssh is its path). With
    ``head_address`` (where the controller and the status channel listen) the head listens
    there too, TCP and UDP, and every host connects and sends to it, so a firewall on the
    head that turns the hosts' connections away is named before anything starts.
    """
    python, timeout = _checked(python, timeout)
    backend = backend or "mpi"  # what %mlx_cluster start uses by default
    t0 = time.monotonic()
    r = _Round.of(placement, python, ssh, timeout, backend, advice, networks, addresses)
    r.head_listener = _head_listener(head_address, r.hosts, r.port)
    with ThreadPoolExecutor(max_workers=max(1, 2 * len(r.hosts))) as pool:
        reaches = [
            None
            if h.is_local or not h.ips or not on
            else pool.submit(tcp_reach, h, r.argv, timeout)
            for h, on in zip(r.hosts, r.on_network)
        ]
        found_all = list(pool.map(r.probe, range(len(r.hosts))))
        if r.head_listener is not None:
            r.head_listener.close()
        silent = frozenset(h.ssh for h, f in zip(r.hosts, found_all) if not f.started)
        refused = _refusals(r.hosts, r.paths, found_all)
        rows = []
        facts: dict[str, HostFacts | None] = {}
        routes: list[RouteFinding] = []
        results: list[PathResult] = []
        for i, (h, found, rf) in enumerate(zip(r.hosts, found_all, reaches)):
            reach = rf.result() if rf is not None else None
            ctx = r.context(i, found, reach, silent, tuple(refused.get(i, ())))
            facts[h.ssh] = _facts(h, found)
            routes += route_findings(ctx) or []
            results += _path_results(i, r.hosts, r.paths, silent, peer_reach(ctx))
            address = h.ips[0] if h.ips else None
            rows.append(HostCheck(h.ssh, build_checks(ctx), address, elapsed=found.elapsed))
    _fix_missing_paths(rows, results, placement, backend)
    return DoctorReport(
        rows,
        python,
        r.head,
        elapsed=time.monotonic() - t0,
        columns=CHECKS,
        advice=advise_backend(placement, facts) if advice else None,
        routes=routes,
        facts=facts,
        paths=results,
    )
