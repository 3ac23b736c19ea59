"""macOS's network commands on a virtual Mac: real formats, applied to the namespace's veths.

``tests/vcluster.py`` (``macos=``) puts one small script per command (``system_profiler``,
``networksetup``, ``ifconfig``, ``netstat``, ``sudo``, ``ibv_devices``, ``sw_vers``, ``route``)
on the virtual hosts' PATH only; each runs :func:`main` here, which reads the host's state
(``<cluster dir>/<host>/macos.json``: its Thunderbolt ports and peers, its network services,
its Thunderbolt Bridge, whether sudo asks for a password) and the namespace's real interfaces
and routes (``ip -j``), and prints what the Mac's command prints.

Every format is generated from a real capture in ``tests/fixtures/macos/`` re-keyed to the
rig's cables (the README there names each capture's source):

* ``system_profiler SPThunderboltDataType -json``: the buses, peer Mac and the device between
  are the Mac Studio capture's own entries (``thunderboltusb4_bus_1`` with its Mac peer,
  ``thunderboltusb4_bus_0`` idle, the OWC Envoy Ultra on ``bus_3``), with this host's domain
  UUIDs, receptacles, model and its peers' UUIDs written into them; printed as system_profiler
  prints (two-space indent, ``" : "``, sorted keys, ASCII escapes).
* ``networksetup -listallhardwareports`` and ``ifconfig -a``: the blocks of the MacBook Pro 16"
  captures (lo0, the Wi-Fi/Ethernet ``en0``, ``enN`` Thunderbolt ports, ``bridge0`` with its
  Configuration and member lines), with this host's names, MACs and addresses.
* ``netstat -rn``: the columns of the ``netstat -rn`` capture (macOS drops a network's
  trailing zero octets), from the namespace's routes.
* ``ibv_devices``: the header and rows of MLX's capture, ``rdma_<port>`` per Thunderbolt port.

What they are told is applied: an address set with ``ifconfig``/``networksetup`` goes on the
veth with ``ip``; services, bridge membership and preferences live in the state file (a
bridge that is only state carries no traffic: a real Linux bridge across a ring of
namespaces would loop). Setters need root, which only ``sudo`` gives (``sudo -n`` without
passwordless sudo fails at once, as the real one does).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "macos"
STUDIO = FIXTURES / "system_profiler-SPThunderboltDataType-json_mac-studio-m3-ultra.json"
IBV = FIXTURES / "ibv_devices_m3-ultra_mlx-docs.txt"
IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "/sbin/ip"
ROOT_ENV = "MACOS_SHIM_ROOT"
STATE_ENV = "MACOS_SHIM_STATE"
BRIDGE = "Thunderbolt Bridge"


def _state_path() -> Path:
    return Path(os.environ[STATE_ENV])


def load() -> dict[str, Any]:
    return json.loads(_state_path().read_text())


def save(state: dict[str, Any]) -> None:
    path = _state_path()
    tmp = path.with_name(path.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def ip_json(*args: str) -> Any:
    out = subprocess.run([IP, "-j", *args], capture_output=True, text=True, check=False).stdout
    return json.loads(out or "[]")


def ip(*args: str) -> None:
    subprocess.run([IP, *args], capture_output=True, text=True, check=False)


def _need_root(what: str) -> None:
    if os.environ.get(ROOT_ENV) != "1":
        sys.stderr.write(f"{what}: Operation not permitted\n")
        raise SystemExit(1)


# ------------------------------------------------------------------ system_profiler


def _studio() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(STUDIO.read_text())["SPThunderboltDataType"]
    return data


def _bus_template(connected: bool) -> dict[str, Any]:
    buses = {b["_name"]: b for b in _studio()}
    return copy.deepcopy(buses["thunderboltusb4_bus_1" if connected else "thunderboltusb4_bus_0"])


def _peer_item(peer: dict[str, Any]) -> dict[str, Any]:
    item = copy.deepcopy({b["_name"]: b for b in _studio()}["thunderboltusb4_bus_1"]["_items"][0])
    item["_name"] = peer["name"]
    item["device_name_key"] = peer["model"]
    item["domain_uuid_key"] = peer["domain"]
    return item


def _dock_item(inner: dict[str, Any]) -> dict[str, Any]:
    dock = copy.deepcopy({b["_name"]: b for b in _studio()}["thunderboltusb4_bus_3"]["_items"][0])
    dock["_items"] = [inner]
    return dock


def system_profiler(args: list[str]) -> int:
    if args[:1] != ["SPThunderboltDataType"] or "-json" not in args:
        sys.stderr.write("system_profiler: this virtual Mac answers SPThunderboltDataType -json\n")
        return 1
    state = load()
    buses = []
    for port in sorted(state["ports"], key=lambda p: -p["receptacle"]):
        r = port["receptacle"]
        bus = _bus_template(port.get("peer") is not None)
        bus["_name"] = f"thunderboltusb4_bus_{r - 1}"
        bus["device_name_key"] = state["model"]
        bus["domain_uuid_key"] = port["domain"]
        bus["switch_uid_key"] = f"0x05AC714E4ABE98{r:02X}"
        tag = bus["receptacle_1_tag"]
        tag["receptacle_id_key"] = str(r)
        if port.get("peer") is not None:
            tag["current_speed_key"] = port.get("speed", "80 Gb/s")
            item = _peer_item(port["peer"])
            bus["_items"] = [_dock_item(item) if port.get("dock") else item]
        buses.append(bus)
    text = json.dumps(
        {"SPThunderboltDataType": buses}, indent=2, separators=(",", " : "), sort_keys=True
    )
    print(text)
    return 0


# ------------------------------------------------------------------ networksetup


def _hardware_ports(state: dict[str, Any]) -> list[tuple[str, str, str]]:
    macs = state["macs"]
    ports = [("Ethernet", "en0", macs.get("en0", "")), (BRIDGE, "bridge0", macs["bridge0"])]
    for p in sorted(state["ports"], key=lambda p: p["receptacle"]):
        ports.append((f"Thunderbolt {p['receptacle']}", p["device"], macs[p["device"]]))
    return ports


def _device_of(state: dict[str, Any], service: str) -> str | None:
    port = state["services"].get(service, {}).get("port", service)
    return next((d for name, d, _ in _hardware_ports(state) if name == port), None)


def _set_address(device: str, address: str | None, mask: str | None) -> None:
    """An address replaces the device's IPv4 ones (as a service's configuration does)."""
    ip("-4", "addr", "flush", "dev", device)
    if address and mask:
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        ip("addr", "add", f"{address}/{prefix}", "dev", device)
        ip("link", "set", device, "up")


def _addresses(device: str) -> list[tuple[str, int]]:
    found = ip_json("-4", "addr", "show", "dev", device)
    return [(a["local"], a["prefixlen"]) for i in found for a in i.get("addr_info", [])]


def _getinfo(state: dict[str, Any], service: str) -> int:
    svc = state["services"].get(service)
    if svc is None:
        print("** Error: The parameters were not valid.")
        return 4
    device = _device_of(state, service) or ""
    have = _addresses(device) if device and not _state_bridge(state, device) else []
    address = have[0][0] if have else "none"
    mask = str(ipaddress.IPv4Network(f"0.0.0.0/{have[0][1]}").netmask) if have else "none"
    if svc.get("method") == "Manual":
        print(f"Manual Configuration\nIP address: {svc['address']}\nSubnet mask: {svc['mask']}")
        print("Router: (null)")
    else:
        print(f"DHCP Configuration\nIP address: {address}\nSubnet mask: {mask}\nRouter: (null)")
        print("Client ID: ")
    print("IPv6: Automatic\nIPv6 IP address: none\nIPv6 Router: none")
    print(f"Ethernet Address: {state['macs'].get(device, '')}")
    return 0


def _state_bridge(state: dict[str, Any], device: str) -> bool:
    return device == "bridge0" and not state["bridge"].get("real")


SETTERS = (
    "-setmanual",
    "-setdhcp",
    "-createnetworkservice",
    "-removenetworkservice",
    "-setnetworkserviceenabled",
)


def networksetup(args: list[str]) -> int:
    state = load()
    if not args:
        sys.stderr.write("networksetup: give a command\n")
        return 1
    verb, rest = args[0], args[1:]
    if verb == "-listallhardwareports":
        out = [""]
        for name, device, mac in _hardware_ports(state):
            out += [f"Hardware Port: {name}", f"Device: {device}", f"Ethernet Address: {mac}", ""]
        out += ["VLAN Configurations", "===================", ""]
        sys.stdout.write("\n".join(out))
        return 0
    if verb == "-listallnetworkservices":
        print("An asterisk (*) denotes that a network service is disabled.")
        for name, svc in state["services"].items():
            print(("" if svc.get("enabled", True) else "*") + name)
        return 0
    if verb == "-getinfo" and rest:
        return _getinfo(state, rest[0])
    if verb == "-getnetworkserviceenabled" and rest:
        svc = state["services"].get(rest[0])
        print("Enabled" if svc and svc.get("enabled", True) else "Disabled")
        return 0
    if verb in SETTERS:
        _need_root("networksetup")
        _apply_setter(state, verb, rest)
        save(state)
        return 0
    sys.stderr.write(f"networksetup: {verb} is not emulated on this virtual Mac\n")
    return 1


def _apply_setter(state: dict[str, Any], verb: str, rest: list[str]) -> None:
    services = state["services"]
    if verb == "-createnetworkservice":
        services[rest[0]] = {"enabled": True, "method": "DHCP", "port": rest[1]}
        return
    device = _device_of(state, rest[0])
    if verb == "-removenetworkservice":
        services.pop(rest[0], None)
        if device and not _state_bridge(state, device):
            _set_address(device, None, None)
        return
    svc = services.setdefault(rest[0], {"enabled": True, "port": rest[0]})
    if verb == "-setmanual":
        svc.update(method="Manual", address=rest[1], mask=rest[2])
        if device and not _state_bridge(state, device):
            _set_address(device, rest[1], rest[2])
    elif verb == "-setdhcp":
        svc.update(method="DHCP")
        svc.pop("address", None)
        if device and not _state_bridge(state, device):
            _set_address(device, None, None)
    elif verb == "-setnetworkserviceenabled":
        svc["enabled"] = rest[1].lower() in ("on", "yes", "1")
        if rest[0] == BRIDGE:
            state["bridge"]["enabled"] = svc["enabled"]


def reboot(state: dict[str, Any]) -> None:
    """What a reboot keeps: the services' preferences, applied again to clean interfaces (the
    bridge's members are its preference's; ``ifconfig`` changes are gone)."""
    for p in state["ports"]:
        if Path(f"/sys/class/net/{p['device']}").exists():
            _set_address(p["device"], None, None)
    bridge = state["bridge"]
    if not bridge.get("real"):
        enabled = state["services"].get(BRIDGE, {}).get("enabled", True)
        bridge["enabled"] = enabled
        bridge["members"] = list(bridge.get("pref_members", [])) if enabled else []
    for name, svc in state["services"].items():
        device = _device_of(state, name)
        manual = svc.get("method") == "Manual" and svc.get("enabled", True)
        if device and manual and not _state_bridge(state, device):
            _set_address(device, svc["address"], svc["mask"])


# ------------------------------------------------------------------ ifconfig


def _mask_hex(prefix: int) -> str:
    return f"0x{int(ipaddress.IPv4Network(f'0.0.0.0/{prefix}').netmask):08x}"


def _inet_lines(info: dict[str, Any], name: str, index: int) -> list[str]:
    lines = []
    for a in info.get("addr_info", []):
        if a["family"] == "inet":
            net = ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
            extra = "" if name == "lo0" else f" broadcast {net.broadcast_address}"
            lines.append(f"\tinet {a['local']} netmask {_mask_hex(a['prefixlen'])}{extra}")
        elif a["family"] == "inet6" and a.get("scope") == "link":
            lines.append(
                f"\tinet6 {a['local']}%{name} prefixlen {a['prefixlen']} scopeid 0x{index:x} "
            )
    return lines


def _bridge_block(state: dict[str, Any], linux: dict[str, Any] | None) -> list[str]:
    bridge = state["bridge"]
    if bridge.get("real") and linux is not None:
        members = sorted(p.name for p in Path("/sys/class/net/bridge0/brif").iterdir())
        up = "UP" in linux.get("flags", [])
    else:
        members = bridge.get("members", []) if bridge.get("enabled") else []
        up = bridge.get("enabled", False)
    flags = (
        "8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST>"
        if up
        else "8822<BROADCAST,SMART,SIMPLEX,MULTICAST>"
    )
    lines = [
        f"bridge0: flags={flags} mtu 1500",
        "\toptions=63<RXCSUM,TXCSUM,TSO4,TSO6>",
        f"\tether {state['macs']['bridge0']}",
    ]
    if linux is not None:
        lines += _inet_lines(linux, "bridge0", 20)
    elif up and members and bridge.get("link_local"):
        lines.append(f"\tinet {bridge['link_local']} netmask 0xffff0000 broadcast 169.254.255.255")
    lines += [
        "\tConfiguration:",
        "\t\tid 0:0:0:0:0:0 priority 0 hellotime 0 fwddelay 0",
        "\t\tmaxage 0 holdcnt 0 proto stp maxaddr 100 timeout 1200",
        "\t\troot id 0:0:0:0:0:0 priority 0 ifcost 0 port 0",
        "\t\tipfilter disabled flags 0x0",
    ]
    for k, m in enumerate(members):
        lines += [
            f"\tmember: {m} flags=3<LEARNING,DISCOVER>",
            f"\t        ifmaxaddr 0 port {8 + k} priority 0 path cost 0",
        ]
    active = up and members and any(_carrier(m) for m in members)
    lines += [
        "\tnd6 options=201<PERFORMNUD,DAD>",
        "\tmedia: <unknown type>",
        f"\tstatus: {'active' if active else 'inactive'}",
    ]
    return lines


def _carrier(device: str) -> bool:
    try:
        return Path(f"/sys/class/net/{device}/carrier").read_text().strip() == "1"
    except OSError:
        return False


def _block(state: dict[str, Any], info: dict[str, Any]) -> list[str]:
    name = info["ifname"]
    if name == "lo":
        return [
            "lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384",
            "\toptions=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>",
            "\tinet 127.0.0.1 netmask 0xff000000",
            "\tinet6 ::1 prefixlen 128 ",
            "\tinet6 fe80::1%lo0 prefixlen 64 scopeid 0x1 ",
            "\tnd6 options=201<PERFORMNUD,DAD>",
        ]
    up = "UP" in info.get("flags", [])
    bridge = state["bridge"]
    member = bridge.get("enabled") and name in bridge.get("members", [])
    bits = (
        "8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST>"
        if member
        else (
            "8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST>"
            if up
            else "8822<BROADCAST,SMART,SIMPLEX,MULTICAST>"
        )
    )
    options = (
        "6460<TSO4,TSO6,CHANNEL_IO,PARTIAL_CSUM,ZEROINVERT_CSUM>"
        if name == "en0"
        else "460<TSO4,TSO6,CHANNEL_IO>"
    )
    lines = [
        f"{name}: flags={bits} mtu {info.get('mtu', 1500)}",
        f"\toptions={options}",
        f"\tether {state['macs'].get(name, info.get('address', ''))}",
    ]
    lines += _inet_lines(info, name, info.get("ifindex", 0))
    lines.append("\tnd6 options=201<PERFORMNUD,DAD>")
    lines.append("\tmedia: autoselect" + ("" if name == "en0" else " <full-duplex>"))
    lines.append(f"\tstatus: {'active' if up and _carrier(name) else 'inactive'}")
    return lines


def _render_ifconfig(state: dict[str, Any], only: str | None) -> str:
    links = {i["ifname"]: i for i in ip_json("addr", "show")}
    out: list[str] = []
    order = ["lo", "en0", *sorted(p["device"] for p in state["ports"]), "bridge0"]
    for name in order:
        shown = "lo0" if name == "lo" else name
        if only is not None and shown != only:
            continue
        if name == "bridge0":
            out += _bridge_block(state, links.get("bridge0"))
        elif name in links:
            out += _block(state, links[name])
    return "\n".join(out) + "\n"


def ifconfig(args: list[str]) -> int:
    state = load()
    if not args or args == ["-a"] or (len(args) == 1 and not args[0].startswith("-")):
        only = args[0] if args and args[0] != "-a" else None
        text = _render_ifconfig(state, only)
        if only is not None and text.strip() == "":
            sys.stderr.write(f"ifconfig: interface {only} does not exist\n")
            return 1
        sys.stdout.write(text)
        return 0
    _need_root("ifconfig: ioctl (SIOCAIFADDR)")
    device, rest = args[0], args[1:]
    bridge = state["bridge"]
    if device == "bridge0" and not bridge.get("real"):
        if rest[:1] in (["addm"], ["deletem"]):
            members = bridge.setdefault("members", [])
            if rest[0] == "addm" and rest[1] not in members:
                members.append(rest[1])
            elif rest[0] == "deletem" and rest[1] in members:
                members.remove(rest[1])
        elif rest[:1] in (["up"], ["down"]):
            bridge["enabled"] = rest[0] == "up"
        save(state)
        return 0
    if device == "bridge0" and rest[:1] in (["addm"], ["deletem"]):
        ip(
            "link",
            "set",
            rest[1],
            "master" if rest[0] == "addm" else "nomaster",
            *(["bridge0"] if rest[0] == "addm" else []),
        )
        return 0
    return _ifconfig_address(device, rest)


def _ifconfig_address(device: str, rest: list[str]) -> int:
    if rest in (["up"], ["down"]):
        ip("link", "set", device, rest[0])
        return 0
    if rest[:1] == ["inet"] and len(rest) >= 2:
        address = rest[1]
        if "delete" in rest or "-alias" in rest:
            for a, p in _addresses(device):
                if a == address:
                    ip("addr", "del", f"{a}/{p}", "dev", device)
            return 0
        mask = rest[rest.index("netmask") + 1] if "netmask" in rest else "255.255.255.0"
        if mask.startswith("0x"):
            mask = str(ipaddress.IPv4Address(int(mask, 16)))
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        if "alias" not in rest:
            ip("-4", "addr", "flush", "dev", device)
        ip("addr", "add", f"{address}/{prefix}", "dev", device)
        ip("link", "set", device, "up")
        return 0
    sys.stderr.write(f"ifconfig: {' '.join(rest)}: not emulated on this virtual Mac\n")
    return 1


# ------------------------------------------------------------------ netstat, route


def _compressed(network: ipaddress.IPv4Network) -> str:
    octets = str(network.network_address).split(".")
    while len(octets) > 1 and octets[-1] == "0":
        octets.pop()
    text = ".".join(octets)
    return text if network.prefixlen == 8 * len(octets) else f"{text}/{network.prefixlen}"


def netstat(args: list[str]) -> int:
    if "-r" not in args and "-rn" not in args:
        sys.stderr.write("netstat: this virtual Mac answers netstat -rn\n")
        return 1
    links = {i["ifname"]: i["ifindex"] for i in ip_json("link", "show")}
    rows = [("Destination", "Gateway", "Flags", "Netif Expire")]
    for r in ip_json("-4", "route", "show", "table", "main"):
        dev = r.get("dev")
        if r.get("type") == "unreachable" or dev is None:
            continue
        if r["dst"] == "default":
            rows.append(("default", r.get("gateway", ""), "UGScg", dev))
            continue
        net = ipaddress.IPv4Network(r["dst"], strict=False)
        gateway = r.get("gateway") or f"link#{links.get(dev, 0)}"
        rows.append(
            (_compressed(net), gateway, "UGSc" if r.get("gateway") else "UCS", f"{dev}      !")
        )
    rows[1:1] = [("127", "127.0.0.1", "UCS", "lo0"), ("127.0.0.1", "127.0.0.1", "UH", "lo0")]
    print("Routing tables\n\nInternet:")
    for d, g, f, n in rows:
        print(f"{d:<18} {g:<18} {f:<15} {n}")
    print("\nInternet6:")
    print(f"{'Destination':<39} {'Gateway':<31} {'Flags':<15} Netif Expire")
    print(f"{'::1':<39} {'::1':<31} {'UHL':<15}   lo0")
    return 0


def route(args: list[str]) -> int:
    """``route change PEER -interface IF`` (what mlx.distributed_config runs)."""
    _need_root("route")
    if len(args) >= 4 and args[0] in ("change", "add") and args[2] == "-interface":
        ip("route", "replace", args[1], "dev", args[3])
        return 0
    sys.stderr.write(f"route: {' '.join(args)}: not emulated on this virtual Mac\n")
    return 1


# ------------------------------------------------------------------ sudo, sw_vers, ibv_devices


def sudo(args: list[str]) -> int:
    state = load()
    noninteractive = False
    while args and args[0].startswith("-"):
        noninteractive |= args[0] == "-n"
        args = args[1:]
    if not state.get("sudo", True):
        sys.stderr.write(
            "sudo: a password is required\n"
            if noninteractive
            else "sudo: a terminal is required to read the password; either use the -S "
            "option to read from standard input or configure an askpass helper\n"
        )
        return 1
    if not args:
        return 1
    env = dict(os.environ, **{ROOT_ENV: "1"})
    return subprocess.run(args, env=env, check=False).returncode


def sw_vers(args: list[str]) -> int:
    state = load()
    if args == ["-productVersion"]:
        print(state["macos"])
        return 0
    print(
        f"ProductName:\t\tmacOS\nProductVersion:\t\t{state['macos']}\n"
        f"BuildVersion:\t\t{state.get('build', '25C56')}"
    )
    return 0


def ibv_devices(args: list[str]) -> int:
    state = load()
    header = IBV.read_text().splitlines()[:2]
    print("\n".join(header))
    if state.get("rdma"):
        for k, p in enumerate(sorted(state["ports"], key=lambda p: p["device"])):
            name = f"rdma_{p['device']}"
            print(f"{name:<16}\t{0x8096A9D9EDBAAC05 + (k << 56) & (2**64 - 1):016x}")
    return 0


COMMANDS = {
    "system_profiler": system_profiler,
    "networksetup": networksetup,
    "ifconfig": ifconfig,
    "netstat": netstat,
    "route": route,
    "sudo": sudo,
    "sw_vers": sw_vers,
    "ibv_devices": ibv_devices,
}


def main() -> None:
    name = os.path.basename(sys.argv[0])
    raise SystemExit(COMMANDS[name](sys.argv[1:]))


if __name__ == "__main__":
    main()
