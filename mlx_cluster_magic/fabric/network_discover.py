"""Reading every Mac's network over ssh, all at once: one round trip per Mac.

One shell script runs on each Mac and prints, between markers, what ``mlx.distributed_config``
reads (``system_profiler SPThunderboltDataType -json``, ``networksetup
-listallhardwareports``) and what it does not: every address (``ifconfig -a``) and route
(``netstat -rn``) in use, so a new subnet collides with none; the network services and the
configuration of the Thunderbolt ones, so ``--undo`` can put them back; the RDMA devices
(``ibv_devices``); the macOS version (``sw_vers``); and whether ``sudo -n`` works, asked so it
never waits for a password. The text is parsed by the real-format parsers of
:mod:`.macos` and :mod:`.netif`; nothing here judges (:mod:`.network_plan` does). No IPython.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .doctor.collect import run, ssh_argv
from .macos import HardwarePort, HostFacts, host_facts, parse_hardware_ports
from .netif import Interface, TableRoute, parse_ifconfig, parse_netstat_routes

__all__ = [
    "DISCOVER_SCRIPT",
    "MacNetwork",
    "ServiceInfo",
    "discover_hosts",
    "parse_discovery",
    "parse_service_info",
    "parse_services",
]

MARK = "@@mcnet"

#: Runs under ``sh -s``; every command reads /dev/null, so none can wait on input.
DISCOVER_SCRIPT = r"""
M=@@mcnet
PATH=$PATH:/usr/sbin:/sbin:/usr/bin:/bin
echo "$M begin"
echo "$M hostname $(hostname 2>/dev/null)"
set -- $SSH_CONNECTION
[ -n "$3" ] && echo "$M sshaddr $3"
sec() { N=$1; shift; echo "$M $N-begin"; "$@" </dev/null 2>/dev/null; echo "$M $N-end"; }
if command -v sw_vers >/dev/null 2>&1; then
  echo "$M macos $(sw_vers -productVersion </dev/null 2>/dev/null)"
fi
if command -v system_profiler >/dev/null 2>&1; then
  sec tbprofile system_profiler SPThunderboltDataType -json
fi
if command -v networksetup >/dev/null 2>&1; then
  sec hwports networksetup -listallhardwareports
  sec services networksetup -listallnetworkservices
  networksetup -listallnetworkservices </dev/null 2>/dev/null | sed 1d | sed 's/^\*//' |
  while IFS= read -r S; do
    case $S in Thunderbolt*)
      echo "$M info-begin $S"; networksetup -getinfo "$S" </dev/null 2>/dev/null
      echo "$M info-end";;
    esac
  done
fi
sec ifaces ifconfig -a
sec routes netstat -rn
if command -v ibv_devices >/dev/null 2>&1; then sec ibv ibv_devices; fi
if sudo -n true </dev/null >/dev/null 2>&1; then echo "$M sudo yes"; else echo "$M sudo no"; fi
echo "$M end"
exit 0
"""


@dataclass(frozen=True)
class ServiceInfo:
    """What ``networksetup -getinfo SERVICE`` says: "DHCP" or "Manual", and its address."""

    method: str
    address: str | None = None
    netmask: str | None = None


def parse_service_info(text: str) -> ServiceInfo | None:
    """``Manual Configuration`` / ``DHCP Configuration`` then ``IP address: ...`` lines."""
    method = None
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith(" Configuration") and method is None:
            method = line.split()[0]
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    if method is None:
        return None

    def real(v: str | None) -> str | None:
        return v if v and v not in ("none", "(null)") else None

    return ServiceInfo(method, real(values.get("IP address")), real(values.get("Subnet mask")))


def parse_services(text: str) -> dict[str, bool]:
    """``networksetup -listallnetworkservices``: each service and whether it is enabled (a
    leading asterisk marks a disabled one; the first line explains the asterisk)."""
    found: dict[str, bool] = {}
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("An asterisk"):
            continue
        enabled = not line.startswith("*")
        found[line.lstrip("*")] = enabled
    return found


@dataclass(frozen=True)
class MacNetwork:
    """What one host said about its network; ``error`` when it could not be read."""

    host: str
    error: str | None = None
    hostname: str | None = None
    ssh_address: str | None = None
    sudo: bool = False
    facts: HostFacts | None = None
    interfaces: dict[str, Interface] = field(default_factory=dict)
    routes: tuple[TableRoute, ...] = ()
    ports: tuple[HardwarePort, ...] = ()
    services: dict[str, bool] = field(default_factory=dict)
    service_info: dict[str, ServiceInfo] = field(default_factory=dict)

    @property
    def is_mac(self) -> bool:
        return self.facts is not None and self.facts.is_mac

    def device_of(self, port: str) -> str | None:
        return next((p.device for p in self.ports if p.name == port), None)

    def bridge_members(self) -> dict[str, tuple[str, ...]]:
        """The Thunderbolt Bridge's device and its member ports (empty when there is none)."""
        bridge = self.device_of("Thunderbolt Bridge")
        if bridge is None or bridge not in self.interfaces:
            return {}
        return {bridge: self.interfaces[bridge].members}


def _sections(out: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Values, sections, and the per-service ``info`` sections of the script's output."""
    values: dict[str, str] = {}
    sections: dict[str, str] = {}
    infos: dict[str, str] = {}
    name: str | None = None
    service = ""
    lines: list[str] = []
    for line in out.splitlines():
        if not line.startswith(MARK + " "):
            if name is not None:
                lines.append(line)
            continue
        key, _, value = line[len(MARK) + 1 :].partition(" ")
        if name is not None and key == f"{name}-end":
            if name == "info":
                infos[service] = "\n".join(lines)
            else:
                sections[name] = "\n".join(lines)
            name, lines = None, []
        elif key.endswith("-begin"):
            name, service, lines = key[: -len("-begin")], value, []
        else:
            values[key] = value
    return values, sections, infos


def parse_discovery(host: str, out: str) -> MacNetwork:
    """One host's script output, parsed; a host that said nothing readable has ``error``."""
    values, sections, infos = _sections(out)
    if "end" not in values and "begin" not in values:
        return MacNetwork(host, error="did not answer")
    macos = values.get("macos") or None
    facts = host_facts(
        host,
        os_name="Darwin" if macos else None,
        macos_version=macos,
        hardware_ports=sections.get("hwports"),
        ifconfig=sections.get("ifaces"),
        thunderbolt_profile=sections.get("tbprofile"),
        ibv_devices=sections.get("ibv"),
    )
    info = {s: i for s, text in infos.items() if (i := parse_service_info(text)) is not None}
    return MacNetwork(
        host,
        hostname=values.get("hostname") or None,
        ssh_address=values.get("sshaddr") or None,
        sudo=values.get("sudo") == "yes",
        facts=facts,
        interfaces=parse_ifconfig(sections.get("ifaces", "")),
        routes=tuple(parse_netstat_routes(sections.get("routes", ""))),
        ports=tuple(parse_hardware_ports(sections.get("hwports", ""))),
        services=parse_services(sections.get("services", "")),
        service_info=info,
    )


def _ssh_command(ssh: Sequence[str], host: str, timeout: float) -> list[str]:
    connect = max(1, math.ceil(timeout))
    return [
        ssh[0],
        "-o",
        "BatchMode=yes",
        "-o",
        f"ConnectTimeout={connect}",
        *ssh[1:],
        host,
        "sh -s",
    ]


def run_script(
    host: str, script: str, ssh: str | Sequence[str] | None, timeout: float
) -> tuple[int | None, str, str]:
    """Run a shell script on ``host`` over ssh (stdin), within ``timeout`` seconds after
    connecting; the rc is None when it was killed for time."""
    argv = _ssh_command(ssh_argv(ssh), host, timeout)
    done = run(argv, timeout=2 * timeout, stdin=script)
    return done.rc, done.out, done.err


def _read_one(host: str, ssh: str | Sequence[str] | None, timeout: float) -> MacNetwork:
    rc, out, err = run_script(host, DISCOVER_SCRIPT, ssh, timeout)
    found = parse_discovery(host, out)
    if found.error is not None or rc != 0:
        last = (err.strip().splitlines() or [""])[-1]
        why = last or ("timed out" if rc is None else f"ssh exit status {rc}")
        return MacNetwork(host, error=why)
    return found


def discover_hosts(
    hosts: Sequence[str], ssh: str | Sequence[str] | None = None, timeout: float = 20.0
) -> list[MacNetwork]:
    """Read every host at once (one ssh each); a host that cannot be read has ``error``."""
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return list(pool.map(lambda h: _read_one(h, ssh, timeout), hosts))
