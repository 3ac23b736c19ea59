"""The plan for the Macs' cables: which port goes where, the addresses, the commands, the hostfile.

Pure: it reads what :mod:`.network_discover` found on each Mac and decides.

* **Cables** are matched as ``mlx.distributed_config`` matches them (a bus whose far end is
  another Mac's domain UUID), peers behind a dock or hub included.
* **Layout**: one small subnet per cable for a ring or a mesh; the Thunderbolt Bridge for a
  star of one master (the master bridges its ports, the others reach each other through it).
* **Subnets** collide with nothing any Mac (or the notebook) uses: every address and route
  on every host is taken out of the pool first, so a LAN on 192.168.0.0/24 or a VPN is
  skipped; a cable whose two ends already share a subnet of their own keeps it.
* **Loops**: a Thunderbolt Bridge holding two or more cabled ports on Macs that form a ring
  is a layer-2 loop (a broadcast storm); a bridge plan is refused there, with the per-cable
  plan as the fix. A default route through a cable is named.
* **Commands** use ``networksetup``, which writes the system's network preferences: the
  addresses survive a reboot (``ifconfig`` alone would not). No router is given, so no
  default route goes through a cable. Each Mac also gets the commands that undo them.
* **Hostfile**: the backend that fits (jaccl on a full mesh with RDMA on every pair,
  jaccl-ring, ring, or mpi over the bridge), the cable addresses in the order the ring needs,
  the ssh names of the management network.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from shlex import quote
from typing import TYPE_CHECKING, Any

from .macos import RDMA_MACOS, THUNDERBOLT5_GBPS, THUNDERBOLT_BRIDGE, HostFacts
from .placement import Host, Placement

if TYPE_CHECKING:
    from .network_discover import MacNetwork

__all__ = [
    "DEFAULT_POOL",
    "LAYOUTS",
    "Assignment",
    "Cable",
    "Plan",
    "PlanRefused",
    "cabling_summary",
    "find_cables",
    "loops",
    "plan_lan",
    "plan_network",
    "used_networks",
]

#: Where cable subnets come from unless told: a private range home routers rarely hand out
#: (they use 192.168.0.x, 192.168.1.x and 10.0.0.x); whatever a host uses is skipped anyway.
DEFAULT_POOL = "10.76.0.0/16"
LAYOUTS = ("auto", "ring", "mesh", "star")

Net = ipaddress.IPv4Network


class PlanRefused(ValueError):
    """The cabling cannot take the plan asked for; the message names why and the fix."""


@dataclass(frozen=True)
class Cable:
    """A Thunderbolt cable between host ``a`` and host ``b`` (indices), port and device at
    each end; ``via`` the docks or hubs between; ``gbps`` the link speed where known."""

    a: int
    b: int
    port_a: str
    dev_a: str | None
    port_b: str
    dev_b: str | None
    gbps: float | None = None
    via: tuple[str, ...] = ()

    def end(self, host: int) -> tuple[str, str | None]:
        return (self.port_a, self.dev_a) if host == self.a else (self.port_b, self.dev_b)

    def other(self, host: int) -> int:
        return self.b if host == self.a else self.a


def find_cables(macs: Sequence[MacNetwork]) -> list[Cable]:
    """Every cable between two of the hosts, once, in host order."""
    owner: dict[str, tuple[int, int | None]] = {}
    for i, m in enumerate(macs):
        for bus in m.facts.buses if m.facts else ():
            if bus.domain_uuid:
                owner[bus.domain_uuid] = (i, bus.receptacle)
    cables: list[Cable] = []
    seen: set[tuple[int, int | None]] = set()
    for i, m in enumerate(macs):
        for bus in m.facts.buses if m.facts else ():
            far = owner.get(bus.peer_domain_uuid or "")
            if far is None or far[0] == i or (i, bus.receptacle) in seen:
                continue
            j, receptacle = far
            seen |= {(i, bus.receptacle), (j, receptacle)}
            port_a, port_b = f"Thunderbolt {bus.receptacle}", f"Thunderbolt {receptacle}"
            cables.append(
                Cable(
                    i,
                    j,
                    port_a,
                    m.device_of(port_a),
                    port_b,
                    macs[j].device_of(port_b),
                    bus.link_gbps,
                    bus.peer_via,
                )
            )
    return sorted(cables, key=lambda c: (c.a, c.b, c.port_a))


def _adjacency(n: int, cables: Iterable[Cable]) -> list[list[bool]]:
    adj = [[False] * n for _ in range(n)]
    for c in cables:
        adj[c.a][c.b] = adj[c.b][c.a] = True
    return adj


def ring_order(n: int, cables: Sequence[Cable]) -> list[int] | None:
    """A cycle through every host starting at host 0 (two hosts and one cable count), as the
    ring backend needs; None when the cables make none."""
    adj = _adjacency(n, cables)
    if n == 2:
        return [0, 1] if adj[0][1] else None
    for rest in itertools.permutations(range(1, n)):
        order = [0, *rest]
        if all(adj[order[k]][order[(k + 1) % n]] for k in range(n)):
            return order
    return None


def star_master(n: int, cables: Sequence[Cable]) -> int | None:
    """The one host cabled to every other while no other pair is cabled (three or more)."""
    adj = _adjacency(n, cables)
    if n < 3:
        return None
    for m in range(n):
        others = [i for i in range(n) if i != m]
        if all(adj[m][i] for i in others) and not any(
            adj[i][j] for i, j in itertools.combinations(others, 2)
        ):
            return m
    return None


def cabling_summary(names: Sequence[str], cables: Sequence[Cable]) -> dict[str, str]:
    """What the cables make and what each layout still lacks, one line each."""
    n = len(names)
    adj = _adjacency(n, cables)
    missing = [
        f"{names[i]}-{names[j]}" for i, j in itertools.combinations(range(n), 2) if not adj[i][j]
    ]
    order = ring_order(n, cables)
    if order is not None:
        ring = "complete: " + "-".join(names[i] for i in [*order, order[0]])
    else:
        short = [f"{names[i]} has {sum(adj[i])}" for i in range(n) if sum(adj[i]) < 2]
        ring = "missing: every Mac needs two cables to others" + (
            f" ({', '.join(short)})" if short else " that close one loop through all"
        )
    mesh = "complete" if not missing else f"missing {', '.join(missing)}"
    master = star_master(n, cables)
    star = (
        f"complete: {names[master]} is cabled to every other Mac"
        if master is not None
        else "missing: no Mac is cabled to every other while the others are not cabled together"
    )
    return {"ring": ring, "mesh": mesh, "star": star}


def loops(macs: Sequence[MacNetwork], cables: Sequence[Cable]) -> list[str]:
    """Bridges that join two or more cabled ports while the Macs' cables close a loop: a
    broadcast storm. One line per Mac."""
    n = len(macs)
    adj = _adjacency(n, cables)
    cyclic = n >= 3 and sum(sum(r) for r in adj) // 2 >= n  # a connected graph with a cycle
    if not cyclic:
        return []
    found = []
    for i, m in enumerate(macs):
        cabled = {c.end(i)[1] for c in cables if i in (c.a, c.b)}
        for bridge, members in m.bridge_members().items():
            joined = [d for d in members if d in cabled]
            iface = m.interfaces.get(bridge)
            if len(joined) >= 2 and iface is not None and iface.up:
                found.append(
                    f"{m.host}: the Thunderbolt Bridge ({bridge}) joins {', '.join(joined)} "
                    "while the cables close a loop: a layer-2 loop, a broadcast storm"
                )
    return found


def route_warnings(macs: Sequence[MacNetwork]) -> list[str]:
    """A default route through a Thunderbolt port or the bridge, and a bridge that took a DHCP
    lease (a router answered on the cables): internet traffic may take the cable."""
    out = []
    for m in macs:
        thunderbolt = {p.device for p in m.ports if p.is_thunderbolt and p.device}
        for r in m.routes:
            if r.is_default and r.interface in thunderbolt:
                out.append(
                    f"{m.host}: its default route goes through {r.interface} (a Thunderbolt "
                    f"port or bridge, via {r.gateway}): internet traffic takes the cable; the "
                    "plan gives the cables no router"
                )
        bridge = m.device_of(THUNDERBOLT_BRIDGE)
        info = m.service_info.get(THUNDERBOLT_BRIDGE)
        leased = _routable(m, bridge)
        if info is not None and info.method == "DHCP" and leased:
            out.append(
                f"{m.host}: the Thunderbolt Bridge ({bridge}) took a DHCP lease ({leased[0]}): "
                "a DHCP server answers on the cables; the plan sets the addresses by hand"
            )
    return out


def _routable(m: MacNetwork, device: str | None) -> list[str]:
    iface = m.interfaces.get(device or "")
    return [
        str(ipaddress.IPv4Interface(c).ip)
        for c in (iface.inet if iface else ())
        if not ipaddress.IPv4Interface(c).is_link_local
    ]


def used_networks(macs: Sequence[MacNetwork], extra: Iterable[str] = ()) -> list[Net]:
    """Every IPv4 network any host has an address on or a route to (not loopback, default,
    multicast or broadcast), plus ``extra`` (the notebook's own)."""
    found: list[Net] = []
    for m in macs:
        for iface in m.interfaces.values():
            for cidr in iface.inet:
                found.append(ipaddress.IPv4Interface(cidr).network)
        for r in m.routes:
            special = r.network.is_multicast or r.network.is_loopback
            broadcast = r.network.network_address == ipaddress.IPv4Address("255.255.255.255")
            if r.network.prefixlen and not special and not broadcast:
                found.append(r.network)
    for cidr in extra:
        try:
            found.append(ipaddress.IPv4Interface(cidr).network)
        except ValueError:
            continue
    return [n for n in found if not n.is_loopback]


def _free_subnets(pool: Net, prefix: int, taken: list[Net]) -> Iterator[Net]:
    for net in pool.subnets(new_prefix=prefix):
        if not any(net.overlaps(t) for t in taken):
            taken.append(net)
            yield net


@dataclass(frozen=True)
class Assignment:
    """An address for one port (or bridge) of one host."""

    host: int
    port: str
    device: str | None
    address: str
    network: Net
    kept: bool = False  # already there: nothing to change

    @property
    def netmask(self) -> str:
        return str(self.network.netmask)


@dataclass
class Plan:
    """Everything ``--configure`` does, shown before it is done."""

    names: list[str]
    layout: str
    backend: str
    reason: str
    cables: list[Cable]
    assignments: list[Assignment]
    order: list[int]
    hostfile: dict[str, Any]
    commands: dict[str, list[str]] = field(default_factory=dict)
    undo: dict[str, list[str]] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return any(self.commands.values())

    def address(self, host: int, peer: int | None = None) -> str | None:
        """Host's address on its cable to ``peer`` (or its bridge address in a star)."""
        for a in self.assignments:
            if a.host != host:
                continue
            if peer is None or self.layout == "star":
                return a.address
            cable = next(
                (c for c in self.cables if {c.a, c.b} == {host, peer} and c.end(host)[0] == a.port),
                None,
            )
            if cable is not None:
                return a.address
        return None


def _existing(m: MacNetwork, device: str | None) -> ipaddress.IPv4Interface | None:
    iface = m.interfaces.get(device or "")
    for cidr in iface.inet if iface else ():
        found = ipaddress.IPv4Interface(cidr)
        if not found.is_link_local:
            return found
    return None


def _cable_assignments(
    macs: Sequence[MacNetwork], cables: Sequence[Cable], pool: Net, taken: list[Net]
) -> list[Assignment]:
    """One /30 per cable; a cable whose ends already share a /30 of their own keeps it."""
    out: list[Assignment] = []
    fresh: list[Cable] = []
    for c in cables:
        ea, eb = _existing(macs[c.a], c.dev_a), _existing(macs[c.b], c.dev_b)
        if ea and eb and ea.network == eb.network and ea.network.prefixlen == 30 and ea != eb:
            others = [t for t in taken if t != ea.network]
            if not any(ea.network.overlaps(t) for t in others):
                out += [
                    Assignment(c.a, c.port_a, c.dev_a, str(ea.ip), ea.network, True),
                    Assignment(c.b, c.port_b, c.dev_b, str(eb.ip), eb.network, True),
                ]
                continue
        fresh.append(c)
    kept = {a.network for a in out}
    taken = [t for t in taken if t not in kept] + list(kept)
    subnets = _free_subnets(pool, 30, taken)
    for c in fresh:
        net = next(subnets, None)
        if net is None:
            raise PlanRefused(
                f"the pool {pool} has no free /30 left for every cable: give a "
                "larger one with --subnets (e.g. 10.76.0.0/16)"
            )
        a, b = list(net.hosts())[:2]
        out += [
            Assignment(c.a, c.port_a, c.dev_a, str(a), net),
            Assignment(c.b, c.port_b, c.dev_b, str(b), net),
        ]
    return out


def _star_assignments(
    macs: Sequence[MacNetwork], cables: Sequence[Cable], master: int, pool: Net, taken: list[Net]
) -> list[Assignment]:
    """One subnet for the star: the master's bridge first, then each other Mac's port; a star
    whose bridge and ports already share a subnet of their own keeps it."""
    kept = _kept_star(macs, cables, master, taken)
    if kept:
        return kept
    n = len(macs)
    prefix = 32 - max(3, (n + 1).bit_length())
    net = next(_free_subnets(pool, prefix, taken), None)
    if net is None:
        raise PlanRefused(
            f"the pool {pool} has no free /{prefix} left for the star: give a "
            "larger one with --subnets"
        )
    addresses = [str(a) for a in net.hosts()]
    bridge = macs[master].device_of(THUNDERBOLT_BRIDGE)
    out = [Assignment(master, THUNDERBOLT_BRIDGE, bridge, addresses[0], net)]
    for k, c in enumerate(c for c in cables if master in (c.a, c.b)):
        worker = c.other(master)
        port, device = c.end(worker)
        out.append(Assignment(worker, port, device, addresses[k + 1], net))
    return out


def _kept_star(
    macs: Sequence[MacNetwork], cables: Sequence[Cable], master: int, taken: list[Net]
) -> list[Assignment]:
    bridge = macs[master].device_of(THUNDERBOLT_BRIDGE)
    hub = _existing(macs[master], bridge)
    if hub is None:
        return []
    out = [Assignment(master, THUNDERBOLT_BRIDGE, bridge, str(hub.ip), hub.network, True)]
    for c in (c for c in cables if master in (c.a, c.b)):
        worker = c.other(master)
        port, device = c.end(worker)
        have = _existing(macs[worker], device)
        if have is None or have.network != hub.network:
            return []
        out.append(Assignment(worker, port, device, str(have.ip), have.network, True))
    if any(t != hub.network and t.overlaps(hub.network) for t in taken):
        return []  # another network (a LAN, a VPN) overlaps it
    return out


def _choose_layout(layout: str, names: Sequence[str], cables: Sequence[Cable]) -> str:
    n = len(names)
    master = star_master(n, cables)
    order = ring_order(n, cables)
    if layout == "auto":
        layout = "star" if master is not None else "ring" if order is not None else ""
        if not layout:
            summary = cabling_summary(names, cables)
            raise PlanRefused(
                f"the cables make no ring, mesh or star (ring {summary['ring']}): cable the "
                "Macs so each has two cables to the others, then run network again"
            )
    if layout == "star" and master is None:
        if order is not None and n >= 3:
            raise PlanRefused(
                "a star over the Thunderbolt Bridge on Macs cabled in a ring is a layer-2 "
                "loop (a broadcast storm): use --layout ring, one subnet per cable"
            )
        raise PlanRefused(
            "no Mac is cabled to every other: a star needs one master cabled "
            "to each of the others; use --layout ring if the cables make one"
        )
    if layout in ("ring", "mesh") and order is None:
        raise PlanRefused(
            f"the cables make no ring ({cabling_summary(names, cables)['ring']}): "
            "add the missing cables, or --layout star with one master"
        )
    if layout == "mesh" and len(cables) < n * (n - 1) // 2:
        raise PlanRefused(
            f"not a full mesh ({cabling_summary(names, cables)['mesh']}): add "
            "those cables, or --layout ring"
        )
    return layout


def plan_network(
    macs: Sequence[MacNetwork],
    *,
    layout: str = "auto",
    pool: str = DEFAULT_POOL,
    avoid: Iterable[str] = (),
) -> Plan:
    """The plan for these Macs (every one read); raises :class:`PlanRefused` in one line."""
    names = [m.host for m in macs]
    unread = [f"{m.host} ({m.error})" for m in macs if m.error]
    if unread:
        raise PlanRefused(
            f"could not read {', '.join(unread)}: check `ssh HOST true` works "
            "without a password, then run network again"
        )
    not_mac = [m.host for m in macs if not m.is_mac]
    if not_mac:
        raise PlanRefused(
            f"{', '.join(not_mac)} is not a Mac (no sw_vers): Thunderbolt "
            "cabling is for Macs; use --over lan"
        )
    if len(macs) < 2:
        raise PlanRefused("give at least two Macs (--hosts mac1,mac2)")
    cables = find_cables(macs)
    layout = _choose_layout(layout, names, cables)
    taken = used_networks(macs, avoid)
    net_pool = ipaddress.IPv4Network(pool)
    master = star_master(len(macs), cables)
    if layout == "star" and master is not None:
        assignments = _star_assignments(macs, cables, master, net_pool, taken)
        order = list(range(len(macs)))
    else:
        assignments = _cable_assignments(macs, cables, net_pool, taken)
        order = ring_order(len(macs), cables) or list(range(len(macs)))
    plan = Plan(names, layout, "", "", cables, assignments, order, {})
    plan.backend, plan.reason = _backend(macs, plan)
    plan.hostfile = _hostfile(macs, plan)
    for i, m in enumerate(macs):
        plan.commands[m.host], plan.undo[m.host] = _mac_commands(m, i, plan)
        plan.checks[m.host] = _check_command(i, plan)
    plan.notes = loops(macs, cables) + route_warnings(macs)
    return plan


def _backend(macs: Sequence[MacNetwork], plan: Plan) -> tuple[str, str]:
    from .doctor.advice import advise_backend

    if plan.layout == "star":
        return "mpi", "a star over the master's Thunderbolt Bridge: mpi passes through it"
    facts: list[HostFacts | None] = [m.facts for m in macs]
    hosts = tuple(Host(m.host, ("0.0.0.0",)) for m in macs)
    advice = advise_backend(Placement(hosts, (1,) * len(hosts)), facts)
    backend = advice.backend if advice.backend in ("jaccl", "jaccl-ring", "ring") else "ring"
    return backend, advice.reason


def _ring_ips(plan: Plan, node: int, left: int) -> list[str]:
    out = []
    for c in plan.cables:
        if {c.a, c.b} == {node, left}:
            port = c.end(node)[0]
            out += [a.address for a in plan.assignments if a.host == node and a.port == port]
    return out


def _rdma_cell(plan: Plan, i: int, j: int) -> str | list[str] | None:
    devices = [f"rdma_{c.end(i)[1]}" for c in plan.cables if {c.a, c.b} == {i, j}]
    if not devices:
        return None
    return devices[0] if len(devices) == 1 else devices


def _hostfile(macs: Sequence[MacNetwork], plan: Plan) -> dict[str, Any]:
    """The MLX hostfile, full form, rank order = the ring's order."""
    hosts: list[dict[str, Any]] = []
    order = plan.order
    n = len(order)
    for k, node in enumerate(order):
        m = macs[node]
        entry: dict[str, Any] = {"ssh": m.host, "ips": []}
        if plan.backend == "mpi":
            entry["ips"] = [plan.address(node) or ""]
        elif plan.backend == "ring":
            entry["ips"] = _ring_ips(plan, node, order[(k - 1) % n])
        else:  # jaccl: the coordinator is reached over the management network
            entry["ips"] = [m.ssh_address] if m.ssh_address else []
            near = {order[(k - 1) % n], order[(k + 1) % n]}
            entry["rdma"] = [
                None
                if other == node or (plan.backend == "jaccl-ring" and other not in near)
                else _rdma_cell(plan, node, other)
                for other in order
            ]
        hosts.append(entry)
    return {"backend": plan.backend, "envs": [], "hosts": hosts}


def _mac_commands(m: MacNetwork, i: int, plan: Plan) -> tuple[list[str], list[str]]:
    """The commands that give host ``i`` its addresses (persistent) and those that undo them."""
    mine = [a for a in plan.assignments if a.host == i and not a.kept]
    if not mine:
        return [], []
    do: list[str] = []
    undo: list[str] = []
    bridge = m.device_of(THUNDERBOLT_BRIDGE)
    members = m.bridge_members().get(bridge or "", ())
    cabled = [c.end(i)[1] for c in plan.cables if i in (c.a, c.b)]
    star_master_here = any(a.port == THUNDERBOLT_BRIDGE for a in mine)
    if star_master_here and bridge:
        svc = quote(THUNDERBOLT_BRIDGE)
        if not m.services.get(THUNDERBOLT_BRIDGE, False):
            do.append(f"sudo networksetup -setnetworkserviceenabled {svc} on")
            undo.append(f"sudo networksetup -setnetworkserviceenabled {svc} off")
        for dev in cabled:
            if dev and dev not in members:
                do.append(f"sudo ifconfig {quote(bridge)} addm {quote(dev)}")
                undo.append(f"sudo ifconfig {quote(bridge)} deletem {quote(dev)}")
    elif bridge and any(d in members for d in cabled):
        svc = quote(THUNDERBOLT_BRIDGE)
        if m.services.get(THUNDERBOLT_BRIDGE, False):
            do.append(f"sudo networksetup -setnetworkserviceenabled {svc} off")
            undo.append(f"sudo networksetup -setnetworkserviceenabled {svc} on")
        for dev in cabled:
            if dev in members:
                do.append(f"sudo ifconfig {quote(bridge)} deletem {quote(dev)}")
                undo.append(f"sudo ifconfig {quote(bridge)} addm {quote(dev)}")
    for a in mine:
        svc = quote(a.port)
        if a.port not in m.services:
            do.append(f"sudo networksetup -createnetworkservice {svc} {svc}")
            undo.insert(0, f"sudo networksetup -removenetworkservice {svc}")
        else:
            before = m.service_info.get(a.port)
            if before is not None and before.method == "Manual" and before.address:
                undo.insert(
                    0,
                    f"sudo networksetup -setmanual {svc} {before.address} "
                    f"{before.netmask or '255.255.255.0'}",
                )
            else:
                undo.insert(0, f"sudo networksetup -setdhcp {svc}")
        do.append(f"sudo networksetup -setmanual {svc} {a.address} {a.netmask}")
    return do, undo


def _check_command(i: int, plan: Plan) -> str:
    """One line to paste on host ``i`` afterwards: a ping to each neighbour's address."""
    peers = []
    for a in plan.assignments:
        if a.host == i:
            continue
        if plan.layout == "star":
            mine = next((b for b in plan.assignments if b.host == i), None)
            if mine is not None and (
                mine.port == THUNDERBOLT_BRIDGE or a.port == THUNDERBOLT_BRIDGE
            ):
                peers.append(a.address)
        elif any({c.a, c.b} == {i, a.host} and c.end(a.host)[0] == a.port for c in plan.cables):
            peers.append(a.address)
    return " && ".join(f"ping -c 1 -t 2 {p}" for p in dict.fromkeys(peers))


def rdma_possible(macs: Sequence[MacNetwork], c: Cable) -> str:
    """Whether RDMA (jaccl) can run over this cable, and if not the first reason."""
    if c.via:
        return f"no: through {', '.join(c.via)} (RDMA needs a direct cable)"
    for end in (c.a, c.b):
        facts = macs[end].facts
        if facts is None or facts.macos_version is None or facts.macos_version < RDMA_MACOS:
            return f"no: {macs[end].host} needs macOS {'.'.join(map(str, RDMA_MACOS))}"
        dev = c.end(end)[1]
        if not facts.rdma_devices or f"rdma_{dev}" not in facts.rdma_devices:
            return f"no: rdma_{dev} missing on {macs[end].host} (rdma_ctl enable)"
    if c.gbps is None or c.gbps < THUNDERBOLT5_GBPS:
        return "no: needs Thunderbolt 5 (80 Gb/s)"
    return "yes"


def plan_lan(macs: Sequence[MacNetwork]) -> dict[str, Any]:
    """``--over lan``: a ring hostfile on the addresses ssh reaches each Mac by."""
    unread = [f"{m.host} ({m.error})" for m in macs if m.error]
    if unread:
        raise PlanRefused(
            f"could not read {', '.join(unread)}: check `ssh HOST true` works "
            "without a password, then run network again"
        )
    hosts = [{"ssh": m.host, "ips": [m.ssh_address] if m.ssh_address else []} for m in macs]
    return {"backend": "ring", "envs": [], "hosts": hosts}
