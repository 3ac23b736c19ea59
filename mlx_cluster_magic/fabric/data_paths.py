"""Who must reach whom for a backend, and what to do when the cabling does not give it.

The head needs only its control path to every host (ssh, and the controller's address); the
hosts exchange MLX's and MPI's data among themselves, on the addresses the backend uses:

- ``ring``: rank ``i`` connects to the next rank's addresses (the hostfile's ``ips``: in an
  ``mlx.distributed_config`` ring each host's address is its side of the cable to its left
  neighbour), so each host must reach the next host in rank order;
- ``jaccl-ring``: both ring neighbours (its ``ips`` are the side channel's addresses);
- ``mpi``: every other host, on the networks MPI is pinned to;
- ``jaccl``: every pair of the mesh.

Each path is tested on its source host by the doctor's probe (a TCP connection: an answer, even
a refusal, means the address is reached). Pure planning and wording; no IPython, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .placement import Placement


@dataclass(frozen=True)
class DataPath:
    """Host ``src`` must reach host ``dst`` at one of ``ips`` (indices into placement.hosts)."""

    src: int
    dst: int
    ips: tuple[str, ...]


def in_networks(ip: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """True when ``ip`` is an address in one of ``networks``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


def data_paths(
    placement: Placement,
    backend: str,
    networks: Iterable[str] | None = None,
    addresses: Mapping[str, str] | None = None,
) -> list[DataPath]:
    """The paths ``backend`` needs between the hosts of ``placement``, in host order.

    ``networks``: the CIDRs MPI is pinned to (``--mca btl_tcp_if_include``), None for the
    hosts' own cluster IPs; ``addresses``: each host's address on the control network (ssh
    name -> IP), for MPI pinned to that network. A host with no address to test is left out.
    """
    hosts = list(placement.hosts)
    n = len(hosts)
    if n < 2:
        return []
    if backend == "any":  # MLX picks the backend at start: nothing definite to test
        return []
    if backend == "ring":
        pairs = [(i, (i + 1) % n) for i in range(n)]
    elif backend == "jaccl-ring":
        pairs = [(i, j) for i in range(n) for j in {(i + 1) % n, (i - 1) % n} if j != i]
    else:  # mpi, jaccl: every pair
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    nets = [ipaddress.ip_network(c, strict=False) for c in networks or () if c]
    out = []
    for i, j in sorted(set(pairs)):
        target = hosts[j]
        ips = tuple(target.ips)
        if backend == "mpi" and nets:
            ips = tuple(ip for ip in ips if in_networks(ip, nets))
            mgmt = (addresses or {}).get(target.ssh)
            if mgmt and in_networks(mgmt, nets) and mgmt not in ips:
                ips += (mgmt,)
        if ips:
            out.append(DataPath(i, j, ips))
    return out


def ring_order(placement: Placement) -> str:
    """``mac1 -> mac2 -> mac3 -> mac1``: the ring the hostfile's order makes."""
    names = [h.ssh for h in placement.hosts]
    return " -> ".join([*names, names[0]])


def missing_paths_fix(
    placement: Placement, backend: str, missing: Sequence[tuple[int, int]]
) -> str:
    """The fix that fits the layout, for host pairs ``(src, dst)`` with no path.

    A star (one host reaches every other, the others not each other) wants the master's
    Thunderbolt Bridge; a ring backend over a ring cabled in another order wants the hostfile
    reordered; anything else wants the missing cable, or the backend the cabling supports.
    """
    hosts = [h.ssh for h in placement.hosts]
    n = len(hosts)
    bad = set(missing)
    reaches_all = [
        i
        for i in range(n)
        if all((i, j) not in bad and (j, i) not in bad for j in range(n) if j != i)
    ]
    if reaches_all and n >= 3:
        master = hosts[reaches_all[0]]
        return (
            f"the hosts are cabled as a star around {master}: turn on the Thunderbolt Bridge on "
            f"{master} (System Settings > Network > Thunderbolt Bridge, with every cable's port "
            f"in it and one subnet for all) so the other hosts reach each other through it, or "
            f"cable the hosts as a ring in hostfile order ({ring_order(placement)}) and use "
            "--backend ring"
        )
    pairs = sorted({(min(a, b), max(a, b)) for a, b in bad})
    names = ", ".join(f"{hosts[a]} and {hosts[b]}" for a, b in pairs)
    if backend in ("ring", "jaccl-ring"):
        return (
            f"the {backend} backend sends from each host to the next in hostfile order "
            f"({ring_order(placement)}): cable {names}, or order the hostfile as the hosts are "
            "cabled"
        )
    return (
        f"cable {names} (or put every host on one bridged subnet); or, for a ring of cables, "
        f"order the hostfile along the ring and use --backend ring"
    )
