"""Sync's route: which host receives the files from whom, following the cables.

A host reaches another over a cable when one of the other's addresses lies in a network of its
own that carries cluster traffic (a network holding an address of the hostfile). The notebook's
machine (the head) sends:

- to every host at once when it has a link of its own to each (a star through its bridge,
  several cables, loopback for ranks on this machine);
- otherwise to one host (over the cables when it is on them, else over the network ssh uses:
  the bytes cross it once), and every host passes the stream on to the next over its cables, a
  chain (or a tree where a host is the only way to several others), chunk by chunk.

Pure data in, pure data out; the measuring is done by the hosts (``rank.sync_receiver``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HEAD = -1


@dataclass(frozen=True)
class Node:
    """A host that receives: its name, the addresses the hostfile gives it, every address
    with its prefix it reports (``10.0.0.2/30``), and whether it is this machine."""

    name: str
    cluster_ips: tuple[str, ...]
    interfaces: tuple[str, ...]
    local: bool = False


@dataclass(frozen=True)
class SyncRoute:
    """Each host's upstream (``HEAD`` or another host's index) and the address that upstream
    connects to (where the host listens); ``how`` says it in words."""

    parent: tuple[int, ...]
    address: tuple[str, ...]
    names: tuple[str, ...]
    via_management: tuple[bool, ...]

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parent) if p == node]

    def subtree(self, node: int) -> list[int]:
        out, todo = [], self.children(node)
        while todo:
            i = todo.pop()
            out.append(i)
            todo += self.children(i)
        return sorted(out)

    def describe(self) -> str:
        """``this machine -> mac1 (over the network ssh uses) -> mac2 -> mac3``; a host feeding
        several shows them in braces."""

        def walk(node: int) -> str:
            kids = self.children(node)
            if node == HEAD:
                here = "this machine"
            else:
                how = " (over the network ssh uses)" if self.via_management[node] else ""
                here = self.names[node] + how
            if not kids:
                return here
            parts = [walk(k) for k in kids]
            if len(parts) == 1:
                return f"{here} -> {parts[0]}"
            return f"{here} -> {{{', '.join(parts)}}}"

        return walk(HEAD)


def _nets(interfaces: Sequence[str]) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    out = []
    for text in interfaces:
        try:
            out.append(ipaddress.ip_interface(text))
        except ValueError:
            continue
    return out


def cluster_networks(nodes: Sequence[Node], head: Mapping[str, Sequence[str]]) -> set[Any]:
    """Networks that carry cluster traffic: any network, of a host or the head, holding an
    address the hostfile names."""
    named = set()
    for n in nodes:
        for ip in n.cluster_ips:
            try:
                named.add(ipaddress.ip_address(ip))
            except ValueError:
                continue
    nets: set[Any] = set()
    every = [i for n in nodes for i in _nets(n.interfaces)]
    every += [i for addrs in head.values() for i in _nets(addrs)]
    for iface in every:
        if any(a in iface.network for a in named):
            nets.add(iface.network)
    return nets


def _reach(
    from_ifaces: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    to: Node,
    nets: set[Any],
) -> str | None:
    """The address of ``to`` reachable over a cluster network of the sender, preferring the
    hostfile's, or None."""
    own = {i.ip for i in from_ifaces}
    candidates = [i.ip for i in _nets(to.interfaces) if i.network in nets and i.ip not in own]
    candidates.sort(key=lambda ip: str(ip) not in to.cluster_ips)
    for ip in candidates:
        if any(ip in f.network and f.network in nets for f in from_ifaces):
            return str(ip)
    return None


def plan(
    nodes: Sequence[Node],
    head: Mapping[str, Sequence[str]],
    head_bridges: Sequence[str],
    entry: Sequence[str],
) -> SyncRoute:
    """The route for ``nodes`` (see the module docstring). ``head``: the head's interfaces by
    name, with prefix; ``head_bridges``: which of them are bridges (each port its own link);
    ``entry``: the address the head reaches each host at over the network ssh uses."""
    nets = cluster_networks(nodes, head)
    head_if = {name: _nets(addrs) for name, addrs in head.items()}
    all_head = [i for v in head_if.values() for i in v]
    n = len(nodes)
    parent = [HEAD - 1] * n  # unassigned
    address = [""] * n
    mgmt = [False] * n
    # hosts on this machine hear the head over loopback
    for i, node in enumerate(nodes):
        if node.local:
            parent[i], address[i] = HEAD, "127.0.0.1"
    remote = [i for i in range(n) if not nodes[i].local]
    host_ifs = {i: _nets(nodes[i].interfaces) for i in remote}
    adj = {
        i: {j: a for j in remote if j != i and (a := _reach(host_ifs[i], nodes[j], nets))}
        for i in remote
    }
    direct = {j: a for j in remote if (a := _reach(all_head, nodes[j], nets))}

    def head_port(address_: str) -> str | None:
        ip = ipaddress.ip_address(address_)
        for name, ifs in head_if.items():
            if any(ip in f.network for f in ifs):
                return name
        return None

    ports = [head_port(direct[j]) for j in remote if j in direct]
    own_links = len(direct) == len(remote) and (
        len(set(ports)) == len(ports) or all(p in head_bridges for p in ports)
    )
    if own_links:
        for j in remote:
            parent[j], address[j] = HEAD, direct[j]
        return SyncRoute(tuple(parent), tuple(address), tuple(x.name for x in nodes), tuple(mgmt))

    def dfs(start: int) -> None:
        stack = [start]
        while stack:
            i = stack[-1]
            nxt = next((j for j in adj[i] if parent[j] == HEAD - 1), None)
            if nxt is None:
                stack.pop()
                continue
            parent[nxt], address[nxt] = i, adj[i][nxt]
            stack.append(nxt)

    while any(parent[j] == HEAD - 1 for j in remote):
        left = [j for j in remote if parent[j] == HEAD - 1]
        on_cable = [j for j in left if j in direct]
        if on_cable:
            first = on_cable[0]
            parent[first], address[first] = HEAD, direct[first]
        else:  # the head is off the cables: in over the network ssh uses, once
            first = max(left, key=lambda j: (len(adj[j]), -j))
            parent[first], address[first], mgmt[first] = HEAD, entry[first], True
        dfs(first)
    return SyncRoute(tuple(parent), tuple(address), tuple(x.name for x in nodes), tuple(mgmt))
