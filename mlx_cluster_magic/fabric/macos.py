"""Thunderbolt discovery on macOS, without IPython.

A Mac cabled to other Macs shows its Thunderbolt links in three places, and
none of them says everything:

* ``networksetup -listallhardwareports`` names the ports ("Thunderbolt Bridge",
  "Thunderbolt 1", ...) and the BSD device behind each (``bridge0``, ``en1``).
  The numbering of ``enN`` does not follow the port number, so the name is the
  only reliable join key.
* ``ifconfig -a`` holds the addresses, MTU, link status and bridge members.
* ``system_profiler SPThunderboltDataType -json`` says which receptacle has a
  cable, at what speed, and which other Mac (by Thunderbolt domain UUID) is on
  the far end.  ``mlx.distributed_config`` joins it to the ports through
  ``"Thunderbolt " + receptacle_id_key``; this module does the same.

The parsers are pure functions over the command text so that they can be
tested on captured output on any OS; only :func:`discover` with the default
runner needs a Mac.  Nothing here imports IPython: the magics build on it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netif import Interface, parse_ifconfig

__all__ = [
    "HARDWARE_PORTS_COMMAND",
    "IBV_DEVICES_COMMAND",
    "RDMA_MACOS",
    "THUNDERBOLT5_GBPS",
    "IFCONFIG_COMMAND",
    "THUNDERBOLT_BRIDGE",
    "THUNDERBOLT_PROFILE_COMMAND",
    "Discovery",
    "HardwarePort",
    "HostFacts",
    "Interface",
    "NotMacOSError",
    "Runner",
    "ThunderboltBus",
    "ThunderboltDevice",
    "ThunderboltInterface",
    "discover",
    "discover_command",
    "host_facts",
    "hostfile_entry",
    "parse_hardware_ports",
    "parse_ibv_devices",
    "parse_ifconfig",
    "parse_thunderbolt_profile",
    "require_macos",
    "subprocess_runner",
    "thunderbolt_interfaces",
    "version_tuple",
    "write_hostfile",
]

#: Runs one command (argv) and returns its standard output as text.
Runner = Callable[[Sequence[str]], str]

HARDWARE_PORTS_COMMAND = ("networksetup", "-listallhardwareports")
IFCONFIG_COMMAND = ("ifconfig", "-a")
THUNDERBOLT_PROFILE_COMMAND = ("system_profiler", "SPThunderboltDataType", "-json")
LOCAL_HOST_NAME_COMMAND = ("scutil", "--get", "LocalHostName")

_HOSTFILE_EXAMPLE = '[{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ssh": "mac2.local", ...}]'
_PLATFORM_NAMES = {"linux": "Linux", "win32": "Windows", "cygwin": "Windows (Cygwin)"}


class NotMacOSError(RuntimeError):
    """Discovery was asked for on a machine that has none of the macOS tools."""


def require_macos(platform: str | None = None) -> None:
    """Fail early, in one line, when the macOS commands cannot exist here.

    The message says what to do instead, because the usual reason to land here
    is driving the cluster from a Linux notebook.
    """
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return
    name = _PLATFORM_NAMES.get(platform, platform)
    raise NotMacOSError(
        f"Thunderbolt discovery needs macOS (this is {name}); "
        f"write the hostfile by hand: {_HOSTFILE_EXAMPLE}"
    )


def subprocess_runner(argv: Sequence[str]) -> str:
    """Run a command locally and return stdout; failures name the command."""
    command = " ".join(argv)
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=True, timeout=120)
    except FileNotFoundError as exc:
        raise RuntimeError(f"`{command}` failed: {argv[0]} is not installed here") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip() or f"exit status {exc.returncode}"
        raise RuntimeError(f"`{command}` failed: {detail}") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{command}` timed out after {exc.timeout:g} s") from exc
    return done.stdout


# --------------------------------------------------------------------------
# networksetup -listallhardwareports
# --------------------------------------------------------------------------

_RECEPTACLE_PORT = re.compile(r"^Thunderbolt (\d+)$")
THUNDERBOLT_BRIDGE = "Thunderbolt Bridge"


@dataclass(frozen=True)
class HardwarePort:
    """One "Hardware Port" block: the user-facing name and its BSD device."""

    name: str
    device: str | None
    mac: str | None  # None where networksetup prints "N/A"

    @property
    def receptacle(self) -> int | None:
        """N for a "Thunderbolt N" port: the key system_profiler's receptacles use."""
        match = _RECEPTACLE_PORT.match(self.name)
        return int(match.group(1)) if match else None

    @property
    def is_thunderbolt_bridge(self) -> bool:
        return self.name == THUNDERBOLT_BRIDGE

    @property
    def is_thunderbolt(self) -> bool:
        """A Mac-to-Mac Thunderbolt port or the bridge over them.

        Deliberately not any name starting with "Thunderbolt": a dock's NIC is
        listed as "Thunderbolt Ethernet Slot N" and is ordinary wired LAN.
        """
        return self.is_thunderbolt_bridge or self.receptacle is not None


def parse_hardware_ports(text: str | bytes) -> list[HardwarePort]:
    """Parse ``networksetup -listallhardwareports`` into ports, in listed order."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    ports: list[HardwarePort] = []
    name: str | None = None
    device: str | None = None
    mac: str | None = None

    def flush() -> None:
        if name is not None:
            ports.append(HardwarePort(name=name, device=device, mac=mac))

    for raw in text.splitlines():
        key, sep, value = raw.strip().partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "Hardware Port":
            flush()
            name, device, mac = value, None, None
        elif key == "Device" and name is not None:
            device = value or None
        elif key == "Ethernet Address" and name is not None:
            mac = None if value in ("", "N/A") else value
    flush()
    return ports


# --------------------------------------------------------------------------
# system_profiler SPThunderboltDataType -json
# --------------------------------------------------------------------------

_LINK_SPEED = re.compile(r"^(\d+(?:\.\d+)?) Gb/s")
_CONNECTED = "receptacle_connected"


def _link_gbps(speed: str | None) -> float | None:
    """80.0 for "80 Gb/s"; None for "Up to 120 Gb/s", which is only what the port could do."""
    match = _LINK_SPEED.match(speed or "")
    return float(match.group(1)) if match else None


@dataclass(frozen=True)
class ThunderboltDevice:
    """Something on the far end of a cable, with whatever is chained behind it."""

    name: str  # "_name", e.g. "Mac Studio", "Envoy Ultra"
    model: str | None  # "device_name_key", e.g. "Mac15,14"
    vendor: str | None
    domain_uuid: str | None  # only another host (a Mac) has its own domain
    speed: str | None  # its upstream link, where reported
    devices: tuple[ThunderboltDevice, ...] = ()

    @property
    def is_host(self) -> bool:
        """A peer computer rather than a drive or dock: it has a domain UUID."""
        return self.domain_uuid is not None


@dataclass(frozen=True)
class ThunderboltBus:
    """One local Thunderbolt/USB4 controller and its receptacle.

    ``peer`` is the first device with a domain UUID (another Mac) on the bus,
    directly or behind a dock or hub: ``mlx.distributed_config`` reads only the
    top level of ``_items`` and so misses a Mac cabled through a dock, although
    IP over Thunderbolt reaches it. ``peer_via`` names what lies between.
    """

    name: str  # "thunderboltusb4_bus_0"
    host_model: str | None  # the local Mac, e.g. "MacBook Pro"
    domain_uuid: str | None
    receptacle: int | None
    status: str | None  # "receptacle_connected", "receptacle_no_devices_connected"
    speed: str | None  # "80 Gb/s" when linked, "Up to 120 Gb/s" when idle
    devices: tuple[ThunderboltDevice, ...] = ()

    @property
    def connected(self) -> bool:
        return self.status == _CONNECTED

    @property
    def link_gbps(self) -> float | None:
        return _link_gbps(self.speed)

    @property
    def hardware_port(self) -> str | None:
        """The networksetup port name for this receptacle, as MLX derives it."""
        return None if self.receptacle is None else f"Thunderbolt {self.receptacle}"

    @property
    def peer(self) -> ThunderboltDevice | None:
        found = _first_host(self.devices, ())
        return None if found is None else found[0]

    @property
    def peer_via(self) -> tuple[str, ...]:
        """The devices (docks, hubs) between this receptacle and its peer; empty for a direct
        cable or no peer."""
        found = _first_host(self.devices, ())
        return () if found is None else found[1]

    @property
    def peer_domain_uuid(self) -> str | None:
        peer = self.peer
        return None if peer is None else peer.domain_uuid


def _first_host(
    devices: Sequence[ThunderboltDevice], via: tuple[str, ...]
) -> tuple[ThunderboltDevice, tuple[str, ...]] | None:
    """The first host on a chain, breadth first (a direct cable before a Mac behind a dock),
    with the names of the devices passed through."""
    for d in devices:
        if d.is_host:
            return d, via
    for d in devices:
        found = _first_host(d.devices, (*via, d.name))
        if found is not None:
            return found
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _receptacle_tag(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    tag = entry.get("receptacle_1_tag")
    if isinstance(tag, Mapping):
        return tag
    for key, value in entry.items():
        if (
            key.startswith("receptacle_")
            and key.endswith("_tag")
            and "upstream" not in key
            and isinstance(value, Mapping)
        ):
            return value
    return {}


def _device(entry: Mapping[str, Any]) -> ThunderboltDevice:
    upstream = entry.get("receptacle_upstream_ambiguous_tag")
    speed = upstream.get("current_speed_key") if isinstance(upstream, Mapping) else None
    return ThunderboltDevice(
        name=_str(entry.get("_name")) or _str(entry.get("device_name_key")) or "?",
        model=_str(entry.get("device_name_key")),
        vendor=_str(entry.get("vendor_name_key")),
        domain_uuid=_str(entry.get("domain_uuid_key")),
        speed=_str(speed),
        devices=tuple(_device(child) for child in _items(entry)),
    )


def _items(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = entry.get("_items")
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def parse_thunderbolt_profile(data: str | bytes | Mapping[str, Any]) -> list[ThunderboltBus]:
    """Parse ``system_profiler SPThunderboltDataType -json`` into buses, in listed order.

    Accepts the JSON text or the already-decoded object.  Raises ValueError for
    text that is not JSON, since that means the command itself went wrong.
    """
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"system_profiler did not print JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ValueError("system_profiler JSON is not an object")
    entries = data.get("SPThunderboltDataType") or []
    buses: list[ThunderboltBus] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        tag = _receptacle_tag(entry)
        receptacle = tag.get("receptacle_id_key")
        buses.append(
            ThunderboltBus(
                name=_str(entry.get("_name")) or "?",
                host_model=_str(entry.get("device_name_key")),
                domain_uuid=_str(entry.get("domain_uuid_key")),
                receptacle=int(str(receptacle)) if str(receptacle).isdigit() else None,
                status=_str(tag.get("receptacle_status_key")),
                speed=_str(tag.get("current_speed_key")),
                devices=tuple(_device(item) for item in _items(entry)),
            )
        )
    return buses


# --------------------------------------------------------------------------
# Discovery: the three joined
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ThunderboltInterface:
    """A Thunderbolt port or bridge, with what ifconfig and system_profiler say of it.

    Fields from ifconfig keep their defaults (``mtu`` None, no addresses) when
    ifconfig did not list the device.
    """

    port: str  # "Thunderbolt Bridge", "Thunderbolt 1", ...
    device: str  # "bridge0", "en1", ...
    mac: str | None = None
    receptacle: int | None = None  # N of "Thunderbolt N"; None for the bridge
    flags: tuple[str, ...] = ()
    mtu: int | None = None
    inet: tuple[str, ...] = ()
    status: str | None = None
    members: tuple[str, ...] = ()  # for a bridge: the ports it joins
    bridge: str | None = None  # for a port: the bridge it is a member of
    link: ThunderboltBus | None = None  # for a port: its receptacle's cable, if any

    @property
    def is_bridge(self) -> bool:
        return self.receptacle is None

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(cidr.split("/", 1)[0] for cidr in self.inet)

    @property
    def peer_domain_uuid(self) -> str | None:
        return None if self.link is None else self.link.peer_domain_uuid


def thunderbolt_interfaces(
    ports: Iterable[HardwarePort],
    interfaces: Mapping[str, Interface],
    buses: Iterable[ThunderboltBus] = (),
) -> list[ThunderboltInterface]:
    """Join parsed ports, ifconfig and the Thunderbolt profile; bridges first."""
    by_receptacle = {b.receptacle: b for b in buses if b.receptacle is not None}
    bridge_of = {m: i.name for i in interfaces.values() for m in i.members}
    joined: list[ThunderboltInterface] = []
    for port in ports:
        if not port.is_thunderbolt or not port.device:
            continue
        iface = interfaces.get(port.device)
        receptacle = port.receptacle
        joined.append(
            ThunderboltInterface(
                port=port.name,
                device=port.device,
                mac=port.mac,
                receptacle=receptacle,
                flags=iface.flags if iface else (),
                mtu=iface.mtu if iface else None,
                inet=iface.inet if iface else (),
                status=iface.status if iface else None,
                members=iface.members if iface else (),
                bridge=bridge_of.get(port.device),
                link=by_receptacle.get(receptacle) if receptacle is not None else None,
            )
        )
    joined.sort(key=lambda t: (not t.is_bridge, t.receptacle or 0, t.device))
    return joined


def discover(run: Runner = subprocess_runner) -> list[ThunderboltInterface]:
    """Run the three macOS commands through ``run`` and join their answers.

    With the default runner this needs macOS, and fails at once in one line
    elsewhere.  A custom runner (a fake in tests, or one that wraps
    ``ssh host``) may run on any OS.
    """
    if run is subprocess_runner:
        require_macos()
    ports = parse_hardware_ports(run(HARDWARE_PORTS_COMMAND))
    interfaces = parse_ifconfig(run(IFCONFIG_COMMAND))
    buses = parse_thunderbolt_profile(run(THUNDERBOLT_PROFILE_COMMAND))
    return thunderbolt_interfaces(ports, interfaces, buses)


# --------------------------------------------------------------------------
# RDMA (ibv_devices) and what one host says about itself
# --------------------------------------------------------------------------

IBV_DEVICES_COMMAND = ("ibv_devices",)
#: RDMA over Thunderbolt arrived in macOS 26.2 (MLX's distributed docs, "Getting Started with
#: JACCL").
RDMA_MACOS = (26, 2)
#: A Thunderbolt 5 link reports 80 Gb/s; Thunderbolt 4 and 3 report 40 Gb/s or less.
THUNDERBOLT5_GBPS = 80.0


def parse_ibv_devices(text: str | bytes) -> tuple[str, ...]:
    """The RDMA devices ``ibv_devices`` lists (``rdma_en2``, ...).

    ``rdma_ctl enable`` (in recoveryOS) is what makes them appear; MLX's
    ``distributed_config`` counts a host as RDMA-enabled exactly when this list is not empty.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return tuple(dict.fromkeys(t for t in text.split() if t.startswith("rdma_")))


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """``"26.2.1"`` to ``(26, 2, 1)``; None when there is no version to read."""
    if not version:
        return None
    parts = re.findall(r"\d+", version)
    return tuple(int(p) for p in parts) or None


@dataclass(frozen=True)
class HostFacts:
    """What one host says about itself that decides the backend.

    ``macos`` is ``platform.mac_ver()[0]`` there ("26.2"); ``rdma_devices`` is None when
    not asked (not a Mac, or the command failed) and empty when RDMA is off; ``buses`` come
    from the Thunderbolt profile; ``interfaces`` are its joined Thunderbolt ports and bridge.
    """

    host: str
    os: str | None = None  # ``uname -s``: "Darwin", "Linux"
    macos: str | None = None
    rdma_devices: tuple[str, ...] | None = None
    buses: tuple[ThunderboltBus, ...] = ()
    interfaces: tuple[ThunderboltInterface, ...] = ()

    @property
    def is_mac(self) -> bool:
        return self.os == "Darwin"

    @property
    def macos_version(self) -> tuple[int, ...] | None:
        return version_tuple(self.macos)

    @property
    def domains(self) -> frozenset[str]:
        """This Mac's own Thunderbolt domain UUIDs (one per bus)."""
        return frozenset(b.domain_uuid for b in self.buses if b.domain_uuid)

    def links_to(self, other: HostFacts) -> list[ThunderboltBus]:
        """This Mac's buses cabled straight to ``other`` (one per cable)."""
        theirs = other.domains
        return [b for b in self.buses if b.peer_domain_uuid and b.peer_domain_uuid in theirs]

    @property
    def bridged_ports(self) -> tuple[str, ...]:
        """Thunderbolt ports that are members of a bridge (MLX's jaccl wants none)."""
        return tuple(t.device for t in self.interfaces if not t.is_bridge and t.bridge)


def host_facts(
    host: str,
    *,
    os_name: str | None,
    macos_version: str | None = None,
    hardware_ports: str | None = None,
    ifconfig: str | None = None,
    thunderbolt_profile: str | None = None,
    ibv_devices: str | None = None,
) -> HostFacts:
    """Build :class:`HostFacts` from the raw text of the macOS commands (any may be missing).

    A profile that is not JSON counts as no profile: the facts say less, never something
    false.
    """
    buses: list[ThunderboltBus] = []
    if thunderbolt_profile and thunderbolt_profile.strip():
        try:
            buses = parse_thunderbolt_profile(thunderbolt_profile)
        except ValueError:
            buses = []
    interfaces: list[ThunderboltInterface] = []
    if hardware_ports:
        interfaces = thunderbolt_interfaces(
            parse_hardware_ports(hardware_ports), parse_ifconfig(ifconfig or ""), buses
        )
    return HostFacts(
        host=host,
        os=os_name,
        macos=macos_version or None,
        rdma_devices=parse_ibv_devices(ibv_devices) if ibv_devices is not None else None,
        buses=tuple(buses),
        interfaces=tuple(interfaces),
    )


# --------------------------------------------------------------------------
# Hostfile for mlx.launch
# --------------------------------------------------------------------------


def hostfile_entry(
    ssh: str,
    interfaces: Iterable[ThunderboltInterface],
    *,
    active_only: bool = True,
    link_local: bool = True,
) -> dict[str, Any]:
    """One ``mlx.launch`` host entry, ``{"ssh": ..., "ips": [...]}``, from discovery.

    The IPv4 addresses come in interface order (bridge, then ports by
    receptacle) without repeats.  An address on a link that is down cannot
    carry traffic, so by default only active interfaces count; self-assigned
    169.254/16 addresses can be left out with ``link_local=False``.
    """
    ips: list[str] = []
    for iface in interfaces:
        if active_only and not iface.active:
            continue
        for address in iface.addresses:
            if not link_local and ipaddress.ip_address(address).is_link_local:
                continue
            if address not in ips:
                ips.append(address)
    return {"ssh": ssh, "ips": ips}


def write_hostfile(
    path: str | Path,
    entries: Sequence[Mapping[str, Any]],
    *,
    backend: str | None = None,
    envs: Sequence[str] = (),
) -> Path:
    """Write entries as an ``mlx.launch --hostfile`` JSON file; rank = list order.

    Without backend or envs this is the plain list form; otherwise the object
    form ``{"backend", "envs", "hosts"}``.  MLX reads both.
    """
    hosts: list[dict[str, Any]] = []
    for rank, entry in enumerate(entries):
        ssh, ips = entry.get("ssh"), entry.get("ips", [])
        if not isinstance(ssh, str) or not ssh:
            raise ValueError(f"host entry {rank} needs a non-empty 'ssh' name: {entry!r}")
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ValueError(f"host entry {rank} needs 'ips' as a list of strings: {entry!r}")
        hosts.append(dict(entry))
    from .placement import write_hostfile as write  # the one hostfile writer, beside the reader

    return write(path, hosts, backend=backend, envs=envs)


# --------------------------------------------------------------------------
# What ``%mlx_cluster hosts --discover / --write FILE`` runs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """This Mac's Thunderbolt interfaces, its hostfile entry, and where it was written."""

    ssh: str
    interfaces: tuple[ThunderboltInterface, ...]
    entry: dict[str, Any]
    written: Path | None = None

    def __str__(self) -> str:
        lines = [f"Thunderbolt interfaces of {self.ssh}:"]
        lines += [f"  {_describe(t)}" for t in self.interfaces] or ["  (none)"]
        lines.append(f"hostfile entry: {json.dumps(self.entry)}")
        if self.written is not None:
            lines.append(f"written to {self.written}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Shown as plain text in a notebook (duck-typed; no IPython import)."""
        printer.text(str(self))


def _describe(t: ThunderboltInterface) -> str:
    parts = [
        f"{t.device:<8} {t.port:<18}",
        f"{t.status or '?':<8}",
        f"mtu {t.mtu or '?':<5}",
        ", ".join(t.inet) or "no IPv4",
    ]
    if t.members:
        parts.append("members " + ",".join(t.members))
    if t.bridge:
        parts.append(f"in {t.bridge}")
    if t.link is not None:
        peer = t.link.peer
        if peer is not None:
            parts.append(f"cable {t.link.speed} to {peer.name} ({peer.domain_uuid})")
        elif t.link.connected:
            names = ", ".join(d.name for d in t.link.devices) or "a device"
            parts.append(f"cable {t.link.speed} to {names}")
        else:
            parts.append("no cable")
    return "  ".join(parts)


def _local_ssh_name(run: Runner) -> str:
    """The Bonjour name other Macs reach this one by (``<LocalHostName>.local``)."""
    try:
        name = run(LOCAL_HOST_NAME_COMMAND).strip()
    except Exception:  # a runner that cannot answer: fall back below
        name = ""
    return f"{name}.local" if name else socket.gethostname()


def _merge_into_hostfile(path: Path, entry: dict[str, Any]) -> None:
    """Replace the entry with the same ssh name (keeping its rank) or append it."""
    data: Any = []
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8") or "[]")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable JSON hostfile ({exc})") from exc
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list):
        raise ValueError(f'{path} is not a hostfile: expected a JSON list or {{"hosts": [...]}}')
    same = [
        i for i, h in enumerate(hosts) if isinstance(h, Mapping) and h.get("ssh") == entry["ssh"]
    ]
    if same:
        hosts[same[0]] = entry
    else:
        hosts.append(entry)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def discover_command(
    write: str | Path | None = None,
    *,
    ssh: str | None = None,
    run: Runner = subprocess_runner,
) -> Discovery:
    """Discover this Mac's Thunderbolt interfaces; with ``write``, add it to that hostfile.

    The entry replaces one with the same ssh name, so rerunning on a Mac
    updates it in place and the ranks keep their order.  Problems come back as
    one-line ``MLXClusterError``s, which the magic shows without a traceback.
    """
    from ..errors import MLXClusterError

    try:
        interfaces = discover(run)
        name = ssh or _local_ssh_name(run)
        entry = hostfile_entry(name, interfaces)
        written = None
        if write is not None:
            if not entry["ips"]:
                raise ValueError(
                    "no active Thunderbolt interface here has an IPv4 address, so there is "
                    f"nothing to write to {write}; give the Thunderbolt Bridge (or the "
                    "cabled Thunderbolt ports) an address first"
                )
            written = Path(write)
            _merge_into_hostfile(written, entry)
    except (RuntimeError, ValueError) as exc:
        raise MLXClusterError(str(exc)) from None
    return Discovery(ssh=name, interfaces=tuple(interfaces), entry=entry, written=written)
