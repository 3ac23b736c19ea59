"""The Macs' network plan, on real captured macOS output (tests/fixtures/macos/, sources in
its README): the routing table parser, a Mac behind a device on the Thunderbolt bus, the
cable between the two captured Macs, subnets that skip a LAN, the commands and the hostfile.
The parts that run commands on Macs are in test_network_config.py, on virtual Macs."""

from __future__ import annotations

import ipaddress
import json
import shlex
from pathlib import Path

import pytest

from mlx_cluster_magic.errors import MLXClusterError
from mlx_cluster_magic.fabric.macos import parse_thunderbolt_profile
from mlx_cluster_magic.fabric.netif import parse_netstat_routes
from mlx_cluster_magic.fabric.network import network
from mlx_cluster_magic.fabric.network_discover import (
    MARK,
    MacNetwork,
    parse_discovery,
    parse_service_info,
    parse_services,
)
from mlx_cluster_magic.fabric.network_plan import (
    PlanRefused,
    find_cables,
    plan_network,
    route_warnings,
    used_networks,
)

FIXTURES = Path(__file__).parent / "fixtures" / "macos"
NETSTAT = "netstat-rn_mac-vm_macos-routing-table.txt"
MBP_PORTS = "networksetup-listallhardwareports_macbook-pro-16-2021_macos-14.4.txt"
MBP_IFCONFIG = "ifconfig-a_macbook-pro-16-2021_macos-14.4.txt"
M5_PROFILE = "system_profiler-SPThunderboltDataType-json_macbook-pro-m5-max.json"
STUDIO_PROFILE = "system_profiler-SPThunderboltDataType-json_mac-studio-m3-ultra.json"
IBV = "ibv_devices_m3-ultra_mlx-docs.txt"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_netstat_routes_read_as_macos_prints_them() -> None:
    routes = parse_netstat_routes(fixture(NETSTAT))
    by_net = {str(r.network): r for r in routes}
    default = by_net["0.0.0.0/0"]
    assert (default.gateway, default.interface, default.is_default) == ("192.168.64.1", "en0", True)
    # macOS drops a network's trailing zero octets: "127" is /8, "192.168.64" is /24
    assert by_net["127.0.0.0/8"].interface == "lo0"
    assert by_net["192.168.64.0/24"].gateway == "link#5"
    assert by_net["169.254.0.0/16"].flags == "UCS"
    assert by_net["224.0.0.0/4"].flags == "UmCS"
    assert "192.168.64.23/32" in by_net
    assert all(r.network.version == 4 for r in routes)  # the Internet6 part is left out
    assert len(routes) == 11


def _studio_with_a_mac_behind_the_drive() -> dict[str, object]:
    """The Studio capture with its cabled MacBook moved behind the OWC device on bus 3: the
    entries are the capture's own, only nested one level deeper."""
    data = json.loads(fixture(STUDIO_PROFILE))
    buses = {b["_name"]: b for b in data["SPThunderboltDataType"]}
    mac = buses["thunderboltusb4_bus_1"].pop("_items")[0]
    buses["thunderboltusb4_bus_3"]["_items"][0]["_items"] = [mac]
    return data


def test_a_mac_behind_a_device_on_the_bus_is_its_peer() -> None:
    buses = {b.name: b for b in parse_thunderbolt_profile(_studio_with_a_mac_behind_the_drive())}
    behind = buses["thunderboltusb4_bus_3"]
    assert behind.peer is not None and behind.peer.name == "MacBook Pro"
    assert behind.peer_domain_uuid == "817DCFA4-B481-4100-80FC-91C7AA969F0B"
    assert behind.peer_via == ("Envoy Ultra",)
    # a direct cable keeps no device between
    direct = {b.name: b for b in parse_thunderbolt_profile(fixture(STUDIO_PROFILE))}
    assert direct["thunderboltusb4_bus_1"].peer_via == ()
    assert direct["thunderboltusb4_bus_3"].peer is None  # a drive alone is no peer


def _mac(host: str, profile: str, *, macos: str = "26.2", ibv: str | None = None) -> MacNetwork:
    """One of the two captured Macs as discovery reads it. No capture holds every command of
    one Mac: both take the MacBook Pro 16's ports and ifconfig (Thunderbolt 1-3 on en1-en3,
    a Thunderbolt Bridge over them, Wi-Fi on 192.168.2.46/24) and the routing table above."""
    sections = {
        "tbprofile": fixture(profile),
        "hwports": fixture(MBP_PORTS),
        "ifaces": fixture(MBP_IFCONFIG),
        "routes": fixture(NETSTAT),
        "services": "An asterisk (*) denotes that a network service is disabled.\n"
        "Wi-Fi\nThunderbolt Bridge\n*Thunderbolt 2",
    }
    if ibv is not None:
        sections["ibv"] = ibv
    lines = [f"{MARK} begin", f"{MARK} macos {macos}", f"{MARK} sudo yes"]
    for name, text in sections.items():
        lines += [f"{MARK} {name}-begin", text, f"{MARK} {name}-end"]
    lines += [f"{MARK} info-begin Thunderbolt 2", "DHCP Configuration", f"{MARK} info-end"]
    return parse_discovery(host, "\n".join([*lines, f"{MARK} end"]))


def test_the_captured_cable_between_the_two_macs() -> None:
    macs = [_mac("mbp", M5_PROFILE), _mac("studio", STUDIO_PROFILE)]
    assert macs[1].services == {"Wi-Fi": True, "Thunderbolt Bridge": True, "Thunderbolt 2": False}
    (cable,) = find_cables(macs)
    assert (cable.port_a, cable.dev_a, cable.port_b, cable.dev_b) == (
        "Thunderbolt 1", "en1", "Thunderbolt 2", "en2"
    )  # fmt: skip
    assert cable.gbps == 80.0 and cable.via == ()


def test_cable_subnets_skip_every_network_a_mac_uses() -> None:
    """The naive first /30 of the pool would sit on the MacBook's Wi-Fi LAN (192.168.2.46/24)
    and the captured routing table's 192.168.64.0/24: both are skipped."""
    macs = [_mac("mbp", M5_PROFILE), _mac("studio", STUDIO_PROFILE)]
    used = used_networks(macs)
    assert ipaddress.ip_network("192.168.2.0/24") in used
    plan = plan_network(macs, pool="192.168.2.0/23")
    (net,) = {a.network for a in plan.assignments}
    assert str(net) == "192.168.3.0/30"
    assert [a.address for a in plan.assignments] == ["192.168.3.1", "192.168.3.2"]
    plan = plan_network(macs, pool="192.168.64.0/23")
    assert {str(a.network) for a in plan.assignments} == {"192.168.65.0/30"}
    with pytest.raises(PlanRefused, match="no free /30 left.*--subnets"):
        plan_network(macs, pool="192.168.2.0/24")


def test_commands_are_persistent_take_the_ports_out_of_the_bridge_and_undo() -> None:
    macs = [_mac("mbp", M5_PROFILE), _mac("studio", STUDIO_PROFILE)]
    plan = plan_network(macs, pool="10.76.0.0/16")
    assert plan.layout == "ring" and plan.backend == "ring"  # no ibv_devices: RDMA unknown
    assert plan.commands["studio"] == [
        "sudo networksetup -setnetworkserviceenabled 'Thunderbolt Bridge' off",
        "sudo ifconfig bridge0 deletem en2",
        "sudo networksetup -setmanual 'Thunderbolt 2' 10.76.0.2 255.255.255.252",
    ]
    assert plan.commands["mbp"][-2:] == [
        "sudo networksetup -createnetworkservice 'Thunderbolt 1' 'Thunderbolt 1'",
        "sudo networksetup -setmanual 'Thunderbolt 1' 10.76.0.1 255.255.255.252",
    ]
    # no router is given: no default route goes through the cable
    setmanual = [shlex.split(c) for c in plan.commands["mbp"] if "-setmanual" in c]
    assert [len(words) for words in setmanual] == [6]
    assert plan.undo["studio"] == [
        "sudo networksetup -setdhcp 'Thunderbolt 2'",
        "sudo networksetup -setnetworkserviceenabled 'Thunderbolt Bridge' on",
        "sudo ifconfig bridge0 addm en2",
    ]
    assert plan.undo["mbp"][0] == "sudo networksetup -removenetworkservice 'Thunderbolt 1'"
    assert plan.checks["mbp"] == "ping -c 1 -t 2 10.76.0.2"
    assert plan.hostfile == {
        "backend": "ring",
        "envs": [],
        "hosts": [{"ssh": "mbp", "ips": ["10.76.0.1"]}, {"ssh": "studio", "ips": ["10.76.0.2"]}],
    }


def test_rdma_on_both_gives_jaccl_with_the_cables_devices() -> None:
    ibv = fixture(IBV)
    macs = [_mac("mbp", M5_PROFILE, ibv=ibv), _mac("studio", STUDIO_PROFILE, ibv=ibv)]
    plan = plan_network(macs)
    assert plan.backend == "jaccl", plan.reason
    hosts = plan.hostfile["hosts"]
    # the MacBook's cable leaves by en1, for which the captured ibv_devices has no rdma_en1
    assert [h["rdma"] for h in hosts] == [[None, "rdma_en1"], ["rdma_en2", None]]


def test_service_info_and_services_as_networksetup_prints_them() -> None:
    manual = "Manual Configuration\nIP address: 10.76.0.1\nSubnet mask: 255.255.255.252\n"
    manual += "Router: (null)\nIPv6: Automatic\nIPv6 IP address: none\nIPv6 Router: none\n"
    info = parse_service_info(manual)
    assert info is not None and (info.method, info.address, info.netmask) == (
        "Manual", "10.76.0.1", "255.255.255.252"
    )  # fmt: skip
    dhcp = parse_service_info("DHCP Configuration\nIP address: none\nSubnet mask: none\n")
    assert dhcp is not None and (dhcp.method, dhcp.address) == ("DHCP", None)
    assert parse_service_info("** Error: The parameters were not valid.") is None
    listed = "An asterisk (*) denotes that a network service is disabled.\nEthernet\n*Wi-Fi\n"
    assert parse_services(listed) == {"Ethernet": True, "Wi-Fi": False}


def test_refusals_are_one_line_with_the_fix() -> None:
    macs = [_mac("mbp", M5_PROFILE), _mac("studio", STUDIO_PROFILE)]
    with pytest.raises(PlanRefused, match="no Mac is cabled to every other"):
        plan_network(macs, layout="star")
    unread = [MacNetwork("mac9", error="Connection refused"), *macs]
    with pytest.raises(PlanRefused, match=r"could not read mac9 \(Connection refused\)"):
        plan_network(unread)
    with pytest.raises(MLXClusterError, match="give the Macs' ssh names"):
        network()
    with pytest.raises(MLXClusterError, match="--layout 'hub' is not one of"):
        network("mac1,mac2", layout="hub")
    with pytest.raises(MLXClusterError, match="--subnets 'lan' is not an IPv4 network: give"):
        network("mac1,mac2", subnets="lan")
    with pytest.raises(MLXClusterError, match="smaller than one /30"):
        network("mac1,mac2", subnets="10.76.0.0/31")


def test_a_default_route_or_a_lease_through_the_cables_is_named() -> None:
    """The captured routing table with its default route re-keyed to the bridge (bridge0), and
    the MacBook's captured bridge0 given an address its DHCP service holds."""
    routes = fixture(NETSTAT).replace("UGScg             en0", "UGScg             bridge0")
    ifaces = fixture(MBP_IFCONFIG).replace(
        "\tConfiguration:",
        "\tinet 192.168.64.23 netmask 0xffffff00 broadcast 192.168.64.255\n\tConfiguration:",
        1,
    )
    lines = [f"{MARK} begin", f"{MARK} macos 15.5"]
    for name, text in (("hwports", fixture(MBP_PORTS)), ("ifaces", ifaces), ("routes", routes)):
        lines += [f"{MARK} {name}-begin", text, f"{MARK} {name}-end"]
    lines += [f"{MARK} info-begin Thunderbolt Bridge", "DHCP Configuration", f"{MARK} info-end"]
    mac = parse_discovery("mbp", "\n".join([*lines, f"{MARK} end"]))
    found = route_warnings([mac])
    assert len(found) == 2, found
    assert found[0].startswith("mbp: its default route goes through bridge0")
    assert "took a DHCP lease (192.168.64.23)" in found[1]
    assert route_warnings([_mac("mbp", M5_PROFILE)]) == []  # en0 (Wi-Fi): nothing to say
