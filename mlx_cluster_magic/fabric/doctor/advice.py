"""Which MLX backend fits these hosts and cables, and why, in one line.

The rule follows ``mlx.distributed_config`` (ml-explore/mlx, ``python/mlx/_distributed_utils/
config.py``): RDMA on every host and a full mesh of cables -> ``jaccl``; RDMA and a ring ->
``jaccl-ring``; otherwise ``ring`` over TCP. RDMA over Thunderbolt needs macOS 26.2 or later,
Thunderbolt 5 and ``rdma_ctl enable`` (MLX's distributed docs); a Thunderbolt 4 cable is not a
broken Thunderbolt 5 one, so the advice says what RDMA needs instead of calling it a fault.
Pure: it reads the placement and what each host said (:class:`~..macos.HostFacts`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..macos import RDMA_MACOS, THUNDERBOLT5_GBPS, HostFacts
from ..placement import Placement

__all__ = ["Advice", "advise_backend", "cabling"]


@dataclass(frozen=True)
class Advice:
    """A backend (``jaccl``, ``jaccl-ring``, ``ring`` or ``mpi``) and the reason in one line."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


def _names(hosts: Sequence[str]) -> str:
    return ", ".join(hosts)


def cabling(placement: Placement, facts: Sequence[HostFacts | None]) -> list[list[bool]] | None:
    """Which host pairs share a cable: from the Thunderbolt profiles (a bus whose far end is the
    other Mac's domain), else from the hostfile's ``rdma`` rows; None when neither says."""
    n = len(placement.hosts)
    if all(f is not None and f.buses for f in facts):
        known = [f for f in facts if f is not None]
        return [
            [i != j and bool(known[i].links_to(known[j]) or known[j].links_to(known[i]))
             for j in range(n)]
            for i in range(n)
        ]  # fmt: skip
    rows = [h.rdma for h in placement.hosts]
    if all(len(r) == n for r in rows):
        return [[i != j and bool(rows[i][j]) for j in range(n)] for i in range(n)]
    return None


def _has_ring(cabled: list[list[bool]]) -> bool:
    """A cycle through every host (two hosts and one cable count, as MLX counts them)."""
    n = len(cabled)
    for rest in itertools.permutations(range(1, n)):
        order = (0, *rest)
        if all(cabled[order[k]][order[(k + 1) % n]] for k in range(n)):
            return True
    return False


def _slow_links(
    placement: Placement, facts: Sequence[HostFacts | None]
) -> list[tuple[str, str, float]]:
    slow = []
    hosts = placement.hosts
    for i, j in itertools.combinations(range(len(hosts)), 2):
        a, b = facts[i], facts[j]
        if a is None or b is None:
            continue
        for bus in a.links_to(b):
            gbps = bus.link_gbps
            if gbps is not None and gbps < THUNDERBOLT5_GBPS:
                slow.append((hosts[i].ssh, hosts[j].ssh, gbps))
    return slow


def advise_backend(
    placement: Placement, discovery: Mapping[str, HostFacts | None] | Sequence[HostFacts | None]
) -> Advice:
    """Recommend a backend for ``placement``. ``discovery`` holds each host's facts, by ssh
    name or in host order; a host without facts is one the doctor could not read."""
    hosts = placement.hosts
    if placement.is_local or len(hosts) == 1:
        return Advice("mpi", "one machine: mpi passes messages through shared memory")
    if isinstance(discovery, Mapping):
        facts = [discovery.get(h.ssh) for h in hosts]
    else:
        facts = list(discovery) + [None] * (len(hosts) - len(discovery))
    no_ips = [h.ssh for h in hosts if not h.ips]
    tcp = "mpi" if no_ips else "ring"
    tcp_why = (
        f"ring needs every host's cluster IP and {_names(no_ips)} has none in the hostfile"
        if no_ips
        else "ring over the cluster IPs is MLX's fastest TCP backend"
    )
    unread = [h.ssh for h, f in zip(hosts, facts) if f is None or not f.os]
    if unread:
        return Advice(tcp, f"could not read {_names(unread)}, so RDMA is unknown; {tcp_why}")
    not_mac = [f"{h.ssh} ({f.os})" for h, f in zip(hosts, facts) if f is not None and not f.is_mac]
    if not_mac:
        return Advice(tcp, f"RDMA over Thunderbolt needs macOS and {_names(not_mac)} is not; "
                           f"{tcp_why}")  # fmt: skip
    macs = [f for f in facts if f is not None]
    slow = _slow_links(placement, facts)
    if slow:
        a, b, gbps = slow[0]
        return Advice(
            tcp,
            f"{a}-{b} is Thunderbolt 4 or older ({gbps:g} Gb/s): RDMA (jaccl) needs Thunderbolt 5 "
            f"on every cable; nothing is misconfigured, and {tcp_why}",
        )
    old = [f"{f.host} has {f.macos or 'an unknown version'}" for f in macs
           if f.macos_version is None or f.macos_version < RDMA_MACOS]  # fmt: skip
    if old:
        return Advice(tcp, f"RDMA needs macOS {'.'.join(map(str, RDMA_MACOS))} or later "
                           f"({_names(old)}); {tcp_why}")  # fmt: skip
    off = [f.host for f in macs if f.rdma_devices is not None and not f.rdma_devices]
    if off:
        return Advice(tcp, f"RDMA is off on {_names(off)} (ibv_devices lists no rdma_ device): "
                           "run `rdma_ctl enable` in recoveryOS there, then use jaccl; "
                           f"until then {tcp_why}")  # fmt: skip
    unknown = [f.host for f in macs if f.rdma_devices is None]
    if unknown:
        return Advice(tcp, f"could not list RDMA devices on {_names(unknown)} (no ibv_devices); "
                           f"{tcp_why}")  # fmt: skip
    versions = {f.macos for f in macs}
    if len(versions) > 1:
        each = ", ".join(f"{f.host} {f.macos}" for f in macs)
        return Advice(tcp, f"macOS differs ({each}): put the same version on every Mac for "
                           f"RDMA (jaccl); until then {tcp_why}")  # fmt: skip
    cabled = cabling(placement, facts)
    bridged = [f"{f.host} ({', '.join(f.bridged_ports)})" for f in macs if f.bridged_ports]
    bridge_note = (
        f"; first take the Thunderbolt ports out of the bridge on {_names(bridged)} "
        "(mlx.distributed_config --backend jaccl does it)"
        if bridged
        else ""
    )
    version = next(iter(versions))
    if cabled is not None and all(cabled[i][j] for i in range(len(hosts))
                                  for j in range(len(hosts)) if i != j):  # fmt: skip
        return Advice("jaccl", f"every pair of Macs shares a Thunderbolt 5 cable and RDMA is on "
                               f"everywhere (macOS {version}){bridge_note}")  # fmt: skip
    if cabled is not None and _has_ring(cabled):
        return Advice(
            "jaccl-ring",
            "the Thunderbolt 5 cables form a ring, not a full mesh, and RDMA is on everywhere "
            f"(macOS {version}){bridge_note}",
        )
    return Advice(tcp, "RDMA is on, but the Thunderbolt cables form neither a full mesh nor a "
                       f"ring (mlx.distributed_config --dot draws them); {tcp_why}")  # fmt: skip
