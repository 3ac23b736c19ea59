"""Network interfaces and routes: one model, the parsers for macOS and Linux, the route check.

Every part of the package that asks "which interface holds this address" or "which interface
does traffic to that peer leave by" asks here: the doctor (on text its probe brought back from
each host), macOS discovery (``ifconfig -a``), and the link measurement. Parsers are pure
functions over the command text, tested on real captured output. No IPython, no package imports.
"""

from __future__ import annotations

import ipaddress
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Interface",
    "Route",
    "RouteFinding",
    "TableRoute",
    "expected_interface",
    "interface_for",
    "local_interfaces",
    "local_routes",
    "parse_ifconfig",
    "parse_ip_addr",
    "parse_ip_route_get",
    "parse_netstat_routes",
    "parse_route",
    "parse_route_get",
    "route_checks",
    "route_command",
]


@dataclass(frozen=True)
class Interface:
    """One network interface; addresses are CIDR strings ("10.25.0.1/24")."""

    name: str
    flags: tuple[str, ...] = ()
    mtu: int | None = None
    mac: str | None = None
    inet: tuple[str, ...] = ()
    inet6: tuple[str, ...] = ()  # "fe80::1442:a0bf:3f10:95ba/64", scope id dropped
    status: str | None = None  # macOS "active" / "inactive"; absent on tunnels and on Linux
    media: str | None = None
    members: tuple[str, ...] = ()  # a bridge's member ports, in listed order

    @property
    def up(self) -> bool:
        return "UP" in self.flags

    @property
    def addresses(self) -> tuple[str, ...]:
        """The IPv4 addresses without their prefix length."""
        return tuple(cidr.split("/", 1)[0] for cidr in self.inet)

    @property
    def all_addresses(self) -> tuple[str, ...]:
        """IPv4 then IPv6 addresses, without prefix length."""
        return tuple(cidr.split("/", 1)[0] for cidr in (*self.inet, *self.inet6))

    def network_of(self, address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """The subnet this interface gives ``address`` (one of its own), or None."""
        for cidr in (*self.inet, *self.inet6):
            if cidr.split("/", 1)[0] == address:
                try:
                    return ipaddress.ip_interface(cidr).network
                except ValueError:
                    return None
        return None


# --------------------------------------------------------------------------
# macOS: netstat -rn (the whole IPv4 routing table)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRoute:
    """One IPv4 line of ``netstat -rn``: the destination as a network ("default" is
    0.0.0.0/0), its gateway as printed, flags and the interface."""

    network: ipaddress.IPv4Network
    gateway: str
    flags: str
    interface: str

    @property
    def is_default(self) -> bool:
        return self.network.prefixlen == 0

    @property
    def via_gateway(self) -> bool:
        return "G" in self.flags


def _netstat_network(destination: str) -> ipaddress.IPv4Network | None:
    """macOS drops a network's trailing zero octets: "192.168.64" is 192.168.64.0/24, "127"
    127.0.0.0/8, "224.0.0/4" as written; a bare four-octet address is a host (/32)."""
    if destination == "default":
        return ipaddress.IPv4Network("0.0.0.0/0")
    address, _, length = destination.partition("/")
    octets = address.split(".")
    if not 1 <= len(octets) <= 4 or not all(o.isdigit() for o in octets):
        return None
    prefix = int(length) if length.isdigit() else 8 * len(octets)
    try:
        return ipaddress.IPv4Network(".".join(octets + ["0"] * (4 - len(octets))) + f"/{prefix}",
                                     strict=False)  # fmt: skip
    except ValueError:
        return None


def parse_netstat_routes(text: str | bytes) -> list[TableRoute]:
    """The IPv4 part ("Internet:") of macOS ``netstat -rn``, in listed order; lines it cannot
    read are left out, never guessed."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    routes: list[TableRoute] = []
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith(":") and " " not in line:
            section = line[:-1]
            continue
        tokens = line.split()
        if section != "Internet" or len(tokens) < 4 or tokens[0] == "Destination":
            continue
        network = _netstat_network(tokens[0])
        if network is not None:
            routes.append(TableRoute(network, tokens[1], tokens[2], tokens[3]))
    return routes


# --------------------------------------------------------------------------
# macOS: ifconfig -a
# --------------------------------------------------------------------------

_IFCONFIG_HEADER = re.compile(
    r"^(?P<name>[A-Za-z0-9_.-]+): flags=(?P<bits>[0-9A-Fa-f]+)<(?P<flags>[^>]*)>(?P<rest>.*)$"
)
_MTU = re.compile(r"\bmtu (\d+)")


def _inet_cidr(tokens: list[str]) -> str | None:
    """``inet A [--> P] netmask 0xffffff00 ...`` to "A/24"; None if unreadable."""
    try:
        address = tokens[1]
        netmask = tokens[tokens.index("netmask") + 1]
        mask = (
            str(ipaddress.IPv4Address(int(netmask, 16)))
            if netmask.lower().startswith("0x")
            else netmask
        )
        return ipaddress.IPv4Interface(f"{address}/{mask}").with_prefixlen
    except (IndexError, ValueError):
        return None  # e.g. an address a publisher obfuscated; never guess


def _inet6_cidr(tokens: list[str]) -> str | None:
    try:
        address = tokens[1].split("%", 1)[0]
        prefix = tokens[tokens.index("prefixlen") + 1]
        return ipaddress.IPv6Interface(f"{address}/{prefix}").with_prefixlen
    except (IndexError, ValueError):
        return None


def parse_ifconfig(text: str | bytes) -> dict[str, Interface]:
    """Parse macOS ``ifconfig`` output into interfaces keyed by name.

    Continuation lines are read by their leading keyword, so the indentation
    (tabs from the command, spaces after a copy-paste) does not matter.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    found: dict[str, Interface] = {}
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is not None:
            found[current["name"]] = Interface(
                name=current["name"],
                flags=tuple(current["flags"]),
                mtu=current["mtu"],
                mac=current["mac"],
                inet=tuple(current["inet"]),
                inet6=tuple(current["inet6"]),
                status=current["status"],
                media=current["media"],
                members=tuple(current["members"]),
            )

    for raw in text.splitlines():
        header = _IFCONFIG_HEADER.match(raw)
        if header:
            flush()
            mtu = _MTU.search(header.group("rest"))
            flags = header.group("flags")
            current = {
                "name": header.group("name"),
                "flags": flags.split(",") if flags else [],
                "mtu": int(mtu.group(1)) if mtu else None,
                "mac": None,
                "inet": [],
                "inet6": [],
                "status": None,
                "media": None,
                "members": [],
            }
            continue
        if current is None:
            continue
        line = raw.strip()
        tokens = line.split()
        if not tokens:
            continue
        keyword = tokens[0]
        if keyword == "inet":
            cidr = _inet_cidr(tokens)
            if cidr:
                current["inet"].append(cidr)
        elif keyword == "inet6":
            cidr6 = _inet6_cidr(tokens)
            if cidr6:
                current["inet6"].append(cidr6)
        elif keyword == "ether" and len(tokens) > 1:
            current["mac"] = tokens[1]
        elif keyword == "status:":
            current["status"] = line.partition(":")[2].strip() or None
        elif keyword == "media:":
            current["media"] = line.partition(":")[2].strip() or None
        elif keyword == "member:" and len(tokens) > 1:
            current["members"].append(tokens[1])
        elif keyword == "mtu" and tokens[-1].isdigit() and current["mtu"] is None:
            # a header line wrapped before "mtu" when it was copied from a terminal
            current["mtu"] = int(tokens[-1])
    flush()
    return found


# --------------------------------------------------------------------------
# Linux: ip -o addr show, ip -o link show
# --------------------------------------------------------------------------

_IP_ADDR = re.compile(r"^\d+:\s+(\S+?)(?:@\S+)?\s+(inet6?)\s+(\S+)")
_IP_LINK = re.compile(r"^\d+:\s+([^:\s]+?)(?:@[^:\s]+)?:\s+<([^>]*)>(.*)$")


def parse_ip_addr(addr_text: str, link_text: str = "") -> dict[str, Interface]:
    """Interfaces from Linux ``ip -o addr show`` and ``ip -o link show`` (one line each).

    A bridge's members are read from its ports' ``master`` field, so ``members`` means the
    same as ifconfig's ``member:`` lines on macOS.
    """
    inet: dict[str, list[str]] = {}
    inet6: dict[str, list[str]] = {}
    for line in addr_text.splitlines():
        m = _IP_ADDR.match(line)
        if m:
            name, family, cidr = m.groups()
            (inet6 if family == "inet6" else inet).setdefault(name, []).append(cidr)
    links: dict[str, dict[str, Any]] = {}
    for line in link_text.splitlines():
        m = _IP_LINK.match(line)
        if not m:
            continue
        name, flags, rest = m.groups()
        tokens = rest.replace("\\", " ").split()

        def after(key: str, tokens: list[str] = tokens) -> str | None:
            return tokens[tokens.index(key) + 1] if key in tokens[:-1] else None

        mtu = after("mtu")
        links[name] = {
            "flags": tuple(f for f in flags.split(",") if f),
            "mtu": int(mtu) if mtu and mtu.isdigit() else None,
            "mac": after("link/ether"),
            "master": after("master"),
        }
    members: dict[str, list[str]] = {}
    for name, info in links.items():
        if info["master"]:
            members.setdefault(info["master"], []).append(name)
    return {
        name: Interface(
            name=name,
            flags=links.get(name, {}).get("flags", ()),
            mtu=links.get(name, {}).get("mtu"),
            mac=links.get(name, {}).get("mac"),
            inet=tuple(inet.get(name, ())),
            inet6=tuple(inet6.get(name, ())),
            members=tuple(members.get(name, ())),
        )
        for name in dict.fromkeys([*links, *inet, *inet6])
    }


def interface_for(interfaces: Mapping[str, Interface], ip: str) -> Interface | None:
    """The interface that holds ``ip``, or None."""
    try:
        want = ipaddress.ip_address(ip)
    except ValueError:
        return None
    for iface in interfaces.values():
        for addr in iface.all_addresses:
            try:
                if ipaddress.ip_address(addr.split("%")[0]) == want:
                    return iface
            except ValueError:
                continue
    return None


# --------------------------------------------------------------------------
# Routes: which interface traffic to an address leaves by
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """The kernel's answer for one destination: the interface it leaves by."""

    destination: str
    interface: str | None
    source: str | None = None
    gateway: str | None = None
    local: bool = False  # the destination is this machine's own address
    error: str | None = None  # the command's message when there is no route


def route_command(os_name: str, ip: str) -> list[str]:
    """The command that asks the kernel for the route to ``ip``: ``ip -o route get`` on
    Linux, ``route -n get`` on macOS (``os_name`` as ``uname -s`` prints it)."""
    if os_name == "Darwin":
        return ["route", "-n", "get", ip]
    return ["ip", "-o", "route", "get", ip]


def parse_ip_route_get(text: str, destination: str | None = None) -> Route | None:
    """Parse Linux ``ip -o route get IP`` (``10.0.0.2 dev eth0 src 10.0.0.1 uid 0 \\ cache``;
    ``local 10.0.0.1 dev lo ...`` for an own address; "RTNETLINK answers: ..." for none)."""
    for line in text.splitlines():
        tokens = line.replace("\\", " ").split()
        if not tokens:
            continue
        if "dev" in tokens[:-1]:
            local = tokens[0] in ("local", "broadcast")
            dest = tokens[1] if local or tokens[0] in ("unicast", "multicast") else tokens[0]

            def after(key: str, tokens: list[str] = tokens) -> str | None:
                return tokens[tokens.index(key) + 1] if key in tokens[:-1] else None

            return Route(
                destination=destination or dest,
                interface=after("dev"),
                source=after("src"),
                gateway=after("via"),
                local=tokens[0] == "local",
            )
    message = text.strip().splitlines()[-1].strip() if text.strip() else ""
    if destination is not None and message:
        return Route(destination=destination, interface=None, error=message)
    return None


def parse_route_get(text: str, destination: str | None = None) -> Route | None:
    """Parse macOS ``route -n get IP`` ("route to:", "interface:", "gateway:" lines).

    No capture of this command aimed at a peer's address was found to test against; the
    keys read are the ones route(8) prints for the default route in published output.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in ("route to", "destination", "gateway", "interface", "if address"):
            fields[key] = value.strip()
    if "interface" not in fields:
        message = text.strip().splitlines()[-1].strip() if text.strip() else ""
        if destination is not None and message:
            return Route(destination=destination, interface=None, error=message)
        return None
    return Route(
        destination=destination or fields.get("route to") or fields.get("destination", ""),
        interface=fields["interface"],
        source=fields.get("if address"),
        gateway=fields.get("gateway"),
        local=fields["interface"].startswith("lo"),
    )


def parse_route(os_name: str, text: str, destination: str | None = None) -> Route | None:
    """The parser for ``route_command(os_name, ...)``'s output."""
    if os_name == "Darwin":
        return parse_route_get(text, destination)
    return parse_ip_route_get(text, destination)


@dataclass(frozen=True)
class RouteFinding:
    """Where traffic from ``host`` to ``peer_ip`` leaves, against where it should.

    ``ok`` is True when it leaves by ``expected``, False when by another interface (or not
    at all), None when no interface of the host is meant for that address (nothing to judge).
    """

    host: str
    peer: str
    peer_ip: str
    interface: str | None
    expected: str | None
    ok: bool | None
    detail: str


def expected_interface(
    interfaces: Mapping[str, Interface], own_ips: Sequence[str], peer_ip: str
) -> Interface | None:
    """The interface traffic to ``peer_ip`` should leave by: the one holding the host's own
    cluster IP on the peer's subnet (a cable's own subnet, or the bridge's); a host with a
    single cluster IP sends everything by the interface that holds it."""
    try:
        peer = ipaddress.ip_address(peer_ip)
    except ValueError:
        return None
    holders = [(ip, interface_for(interfaces, ip)) for ip in own_ips]
    for ip, iface in holders:
        if iface is None:
            continue
        net = iface.network_of(ip)
        if net is not None and peer.version == net.version and peer in net:
            return iface
    if len(holders) == 1:
        return holders[0][1]
    return None


def route_checks(
    host: str,
    own_ips: Sequence[str],
    interfaces: Mapping[str, Interface],
    routes: Mapping[str, Route | None],
    peers: Iterable[tuple[str, str]],
) -> list[RouteFinding]:
    """For each ``(peer name, peer IP)``, which interface ``host``'s traffic leaves by, and
    whether that is the interface holding ``host``'s own cluster IP (see
    :func:`expected_interface`). ``routes`` maps a peer IP to its parsed route."""
    findings: list[RouteFinding] = []
    for peer, ip in peers:
        route = routes.get(ip)
        want = expected_interface(interfaces, own_ips, ip)
        got = route.interface if route is not None else None
        if route is None or got is None:
            why = route.error if route is not None and route.error else "no route reported"
            findings.append(
                RouteFinding(host, peer, ip, None, want.name if want else None, False,
                             f"no route from {host} to {peer} ({ip}): {why}")
            )  # fmt: skip
            continue
        if want is None:
            findings.append(
                RouteFinding(host, peer, ip, got, None, None,
                             f"{ip} ({peer}) leaves {host} by {got}; no cluster IP of {host} "
                             "shares its subnet")
            )  # fmt: skip
        elif got == want.name:
            findings.append(
                RouteFinding(host, peer, ip, got, want.name, True, f"{peer} ({ip}) by {got}")
            )
        else:
            held = ", ".join(want.addresses) or want.name
            via = f" via {route.gateway}" if route.gateway else ""
            findings.append(
                RouteFinding(host, peer, ip, got, want.name, False,
                             f"traffic from {host} to {peer} ({ip}) leaves by {got}{via}, "
                             f"not by {want.name}, which holds {held}")
            )  # fmt: skip
    return findings


# --------------------------------------------------------------------------
# This machine (what a rank runs to learn its own interfaces and routes)
# --------------------------------------------------------------------------


def _output(argv: Sequence[str], timeout: float) -> str:
    """A command's stdout and stderr together ("RTNETLINK answers: ..." comes on stderr);
    empty when it cannot run."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def local_interfaces(os_name: str | None = None, timeout: float = 5.0) -> dict[str, Interface]:
    """This machine's interfaces (``ifconfig -a`` on macOS, ``ip -o addr/link`` on Linux)."""
    os_name = os_name or platform.system()
    if os_name == "Darwin":
        return parse_ifconfig(_output(["ifconfig", "-a"], timeout))
    return parse_ip_addr(
        _output(["ip", "-o", "addr", "show"], timeout),
        _output(["ip", "-o", "link", "show"], timeout),
    )


def local_routes(
    ips: Iterable[str], os_name: str | None = None, timeout: float = 5.0
) -> dict[str, Route | None]:
    """The route this machine takes to each address, by :func:`route_command`."""
    os_name = os_name or platform.system()
    return {
        ip: parse_route(os_name, _output(route_command(os_name, ip), timeout), ip) for ip in ips
    }
