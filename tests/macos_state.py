"""The state of a virtual Mac that ``tests/macos_shims.py`` reads: written once when the
virtual cluster is built with ``macos=`` (``tests/vcluster.py``).

Each host gets its Thunderbolt ports (one per cable, in its cable order, plus one idle
receptacle), a domain UUID per port, each cabled port's peer (the far end's domain UUID, as
system_profiler shows it), the network services a fresh Mac has (Ethernet, and the
Thunderbolt Bridge holding every Thunderbolt port, with a self-assigned 169.254 address), its
macOS version, RDMA and sudo. Options per host: ``sudo`` (False: sudo asks for a password),
``macos`` ("15.5"), ``rdma`` (ibv_devices lists rdma_<port>), ``dock`` (peers reached through
a device between), ``lan`` (a second address on en0, e.g. a home LAN's), ``bridge`` (False: the
ports are not in the bridge), ``model``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

SHIMS = (
    "system_profiler",
    "networksetup",
    "ifconfig",
    "netstat",
    "route",
    "sudo",
    "sw_vers",
    "ibv_devices",
)


def _domain(vc: Any, host: str, receptacle: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{vc.prefix}.{host}.{receptacle}")).upper()


def _ports(vc: Any, i: int) -> list[dict[str, Any]]:
    host = vc.hosts[i]
    options = vc.macos[host]
    ports = []
    mine = [k for k, pair in enumerate(vc.cables) if i in pair]
    for p, k in enumerate(mine, start=1):
        a, b = vc.cables[k]
        peer = b if a == i else a
        peer_host = vc.hosts[peer]
        peer_receptacle = [c for c, pair in enumerate(vc.cables) if peer in pair].index(k) + 1
        ports.append(
            {
                "receptacle": p,
                "device": f"en{p}",
                "domain": _domain(vc, host, p),
                "peer": {
                    "domain": _domain(vc, peer_host, peer_receptacle),
                    "name": str(vc.macos[peer_host].get("model", "Mac Studio")),
                    "model": "Mac15,14",
                },
                "speed": "80 Gb/s",
                "dock": peer_host in list(options.get("dock", [])),  # type: ignore[arg-type]
            }
        )
    idle = len(mine) + 1
    ports.append(
        {"receptacle": idle, "device": f"en{idle}", "domain": _domain(vc, host, idle), "peer": None}
    )
    return ports


def _state(vc: Any, i: int) -> dict[str, Any]:
    host = vc.hosts[i]
    options = vc.macos[host]
    ports = _ports(vc, i)
    cabled = [p["device"] for p in ports if p["peer"] is not None]
    real_bridge = bool(vc.bridged and vc.cables and vc.cables[0][0] == i)
    in_bridge = bool(options.get("bridge", True)) and not real_bridge
    macs = {"en0": f"3a:00:0{i}:57:00:44", "bridge0": f"36:00:0{i}:a1:00:00"}
    macs.update({p["device"]: f"36:00:0{i}:a1:00:{4 * p['receptacle']:02x}" for p in ports})
    return {
        "host": host,
        "model": str(options.get("model", "Mac Studio")),
        "macos": str(options.get("macos", "15.5")),
        "rdma": bool(options.get("rdma", False)),
        "sudo": bool(options.get("sudo", True)),
        "ports": ports,
        "macs": macs,
        "bridge": {
            "real": real_bridge,
            "enabled": True,
            "members": cabled if in_bridge else [],
            "pref_members": cabled if in_bridge else [],
            "link_local": f"169.254.{10 + i}.{20 + i}",
        },
        "services": {
            "Ethernet": {
                "enabled": True,
                "method": "Manual",
                "address": vc.ips[i],
                "mask": "255.255.255.0",
                "port": "Ethernet",
            },
            "Thunderbolt Bridge": {"enabled": True, "method": "DHCP", "port": "Thunderbolt Bridge"},
        },
    }


def write_states(vc: Any) -> None:
    """Each host's state file, the shims' folder, and each host's LAN address if asked."""
    bin_dir = Path(vc.dir) / "macos-bin"
    bin_dir.mkdir(mode=0o755)
    tests = Path(__file__).resolve().parent
    for name in SHIMS:
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(tests)!r})\n"
            "from macos_shims import main\nmain()\n"
        )
        script.chmod(0o755)
    for i, host in enumerate(vc.hosts):
        (Path(vc.dir) / host / "macos.json").write_text(json.dumps(_state(vc, i), indent=1))
        lan = vc.macos[host].get("lan")
        if lan:
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    vc.namespaces[i],
                    "ip",
                    "addr",
                    "add",
                    str(lan),
                    "dev",
                    "en0",
                ],
                check=True,
            )


def reboot(vc: Any, host: str) -> None:
    """Restart a virtual Mac's network: only what the preferences hold comes back."""
    state = Path(vc.dir) / host / "macos.json"
    tests = str(Path(__file__).resolve().parent)
    code = (
        f"import os, sys; sys.path.insert(0, {tests!r}); "
        f"os.environ['MACOS_SHIM_STATE'] = {str(state)!r}; "
        "import macos_shims as m; s = m.load(); m.reboot(s); m.save(s)"
    )
    subprocess.run(
        ["ip", "netns", "exec", vc.namespace(host), sys.executable, "-c", code], check=True
    )
