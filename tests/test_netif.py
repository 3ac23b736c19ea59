"""Interfaces and routes, parsed from real captured output (tests/fixtures/linux, .../macos).

Every Linux fixture is the output of the command on this project's Linux machine (how each was
made is in tests/fixtures/linux/README.md); the macOS ones are published captures (sources in
tests/fixtures/macos/README.md). The route check is then judged on those parsed answers.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mlx_cluster_magic.fabric.netif import (
    Route,
    expected_interface,
    interface_for,
    local_interfaces,
    local_routes,
    parse_ifconfig,
    parse_ip_addr,
    parse_ip_route_get,
    parse_route,
    route_checks,
    route_command,
)

LINUX = Path(__file__).parent / "fixtures" / "linux"
MACOS = Path(__file__).parent / "fixtures" / "macos"


def linux(name: str) -> str:
    return (LINUX / name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------- interfaces


def test_ip_addr_and_link_give_addresses_mtu_flags_and_bridge_members() -> None:
    ifaces = parse_ip_addr(linux("ip-o-addr-show.txt"), linux("ip-o-link-show.txt"))
    eth0 = ifaces["eth0"]  # "eth0@eth1" in the link list: the peer suffix is not the name
    assert eth0.mtu == 9000 and eth0.inet == ("10.213.7.11/24",) and eth0.up
    assert eth0.addresses == ("10.213.7.11",)
    assert eth0.inet6 == ("fe80::dceb:efff:fe80:7446/64",)
    assert eth0.mac == "de:eb:ef:80:74:46"
    assert ifaces["wlan0"].inet == ("192.168.77.5/24",) and ifaces["wlan0"].mtu == 1500
    assert ifaces["br0"].members == ("eth1",)  # from eth1's "master br0"
    assert ifaces["lo"].mtu == 65536 and "LOOPBACK" in ifaces["lo"].flags
    assert interface_for(ifaces, "10.213.7.11") is eth0
    assert interface_for(ifaces, "::1") is ifaces["lo"]
    assert interface_for(ifaces, "10.213.7.99") is None
    assert interface_for(ifaces, "not an ip") is None


def test_ip_addr_of_this_machine() -> None:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command here (not Linux?)")
    addr = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True)
    link = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    ifaces = parse_ip_addr(addr.stdout, link.stdout)
    assert ifaces["lo"].mtu == int(Path("/sys/class/net/lo/mtu").read_text())
    assert "127.0.0.1" in ifaces["lo"].addresses


def test_network_of_an_own_address() -> None:
    bridge = parse_ifconfig((MACOS / "ifconfig-bridge0_mac-mini_mlx-issue-1903.txt").read_text())[
        "bridge0"
    ]
    assert str(bridge.network_of("10.25.0.1")) == "10.25.0.0/24"
    assert bridge.network_of("10.25.0.2") is None  # not its own address


# --------------------------------------------------------------------------------- routes


def test_route_get_by_the_cluster_interface() -> None:
    route = parse_ip_route_get(linux("ip-o-route-get_peer-on-subnet.txt"))
    assert route == Route("10.213.7.13", "eth0", source="10.213.7.11")


def test_route_get_by_a_more_specific_route() -> None:
    route = parse_ip_route_get(linux("ip-o-route-get_peer-by-more-specific-route.txt"))
    assert route is not None
    assert (route.destination, route.interface, route.source) == (
        "10.213.7.12",
        "wlan0",
        "192.168.77.5",
    )


def test_route_get_through_a_gateway_and_to_an_own_address() -> None:
    via = parse_ip_route_get(linux("ip-o-route-get_via-gateway.txt"))
    assert via is not None and via.gateway == "192.168.77.1" and via.interface == "wlan0"
    own = parse_ip_route_get(linux("ip-o-route-get_own-address.txt"))
    assert own is not None and own.local and own.interface == "lo"
    assert own.destination == "10.213.7.11"


def test_route_get_without_a_route_keeps_the_message() -> None:
    text = linux("ip-o-route-get_unreachable.txt")
    assert parse_ip_route_get(text) is None
    route = parse_ip_route_get(text, "8.8.8.8")
    assert route == Route("8.8.8.8", None, error="RTNETLINK answers: Network is unreachable")


def test_route_command_per_system() -> None:
    assert route_command("Linux", "10.0.0.2") == ["ip", "-o", "route", "get", "10.0.0.2"]
    assert route_command("Darwin", "10.0.0.2") == ["route", "-n", "get", "10.0.0.2"]
    text = linux("ip-o-route-get_peer-on-subnet.txt")
    assert parse_route("Linux", text, "10.213.7.13") == parse_ip_route_get(text, "10.213.7.13")


def test_route_of_this_machine_to_loopback() -> None:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command here (not Linux?)")
    out = subprocess.run(
        route_command("Linux", "127.0.0.1"), capture_output=True, text=True, check=True
    ).stdout
    route = parse_route("Linux", out, "127.0.0.1")
    assert route is not None and route.interface == "lo" and route.local


# --------------------------------------------------------------------------------- route check


def test_route_check_flags_the_peer_sent_by_another_interface() -> None:
    ifaces = parse_ip_addr(linux("ip-o-addr-show.txt"), linux("ip-o-link-show.txt"))
    routes = {
        "10.213.7.12": parse_ip_route_get(
            linux("ip-o-route-get_peer-by-more-specific-route.txt"), "10.213.7.12"
        ),
        "10.213.7.13": parse_ip_route_get(
            linux("ip-o-route-get_peer-on-subnet.txt"), "10.213.7.13"
        ),
    }
    found = route_checks(
        "mac1",
        ["10.213.7.11"],
        ifaces,
        routes,
        [("mac2", "10.213.7.12"), ("mac3", "10.213.7.13"), ("mac4", "10.213.7.14")],
    )
    by_peer = {f.peer: f for f in found}
    bad = by_peer["mac2"]
    assert (bad.ok, bad.interface, bad.expected) == (False, "wlan0", "eth0")
    assert bad.detail == (
        "traffic from mac1 to mac2 (10.213.7.12) leaves by wlan0, not by eth0, "
        "which holds 10.213.7.11"
    )
    good = by_peer["mac3"]
    assert (good.ok, good.interface, good.expected) == (True, "eth0", "eth0")
    missing = by_peer["mac4"]  # asked about, but no answer came back
    assert missing.ok is False and missing.interface is None and "no route" in missing.detail


def test_route_check_reports_an_unreachable_peer_with_the_kernels_words() -> None:
    ifaces = parse_ip_addr(linux("ip-o-addr-show.txt"), linux("ip-o-link-show.txt"))
    route = parse_ip_route_get(linux("ip-o-route-get_unreachable.txt"), "8.8.8.8")
    (finding,) = route_checks(
        "mac1", ["10.213.7.11"], ifaces, {"8.8.8.8": route}, [("x", "8.8.8.8")]
    )
    assert finding.ok is False and "Network is unreachable" in finding.detail


def test_expected_interface_is_the_one_on_the_peers_subnet() -> None:
    ifaces = parse_ip_addr(linux("ip-o-addr-show.txt"), linux("ip-o-link-show.txt"))
    # Two cluster IPs (one per cable, as mlx.distributed_config sets up a ring): each peer
    # belongs to the interface whose subnet holds it; a peer on neither is not judged.
    own = ["10.213.7.11", "192.168.77.5"]
    assert expected_interface(ifaces, own, "10.213.7.40").name == "eth0"  # type: ignore[union-attr]
    assert expected_interface(ifaces, own, "192.168.77.9").name == "wlan0"  # type: ignore[union-attr]
    assert expected_interface(ifaces, own, "10.9.9.9") is None
    # One cluster IP: everything should leave by the interface holding it.
    assert expected_interface(ifaces, ["10.213.7.11"], "10.9.9.9").name == "eth0"  # type: ignore[union-attr]
    route = parse_ip_route_get(linux("ip-o-route-get_via-gateway.txt"), "10.9.9.9")
    (finding,) = route_checks("mac1", own, ifaces, {"10.9.9.9": route}, [("far", "10.9.9.9")])
    assert finding.ok is None and "shares its subnet" in finding.detail


def test_route_check_on_a_macos_bridge_capture() -> None:
    """The interface side on a real Thunderbolt bridge (mlx issue 1903's Mac mini)."""
    ifaces = parse_ifconfig((MACOS / "ifconfig-bridge0_mac-mini_mlx-issue-1903.txt").read_text())
    assert expected_interface(ifaces, ["10.25.0.1"], "10.25.0.2") is ifaces["bridge0"]


def test_this_machines_interfaces_and_routes_for_a_rank() -> None:
    """What a rank runs on its own host (the link measurement's route check)."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command here (not Linux?)")
    ifaces = local_interfaces("Linux")
    assert "127.0.0.1" in ifaces["lo"].addresses
    routes = local_routes(["127.0.0.1", "192.0.2.255.1"], "Linux")
    assert routes["127.0.0.1"] is not None and routes["127.0.0.1"].interface == "lo"
    bad = routes["192.0.2.255.1"]  # not an address: ip's own error comes back
    assert bad is not None and bad.interface is None and bad.error
    (finding,) = route_checks("here", ["127.0.0.1"], ifaces, routes, [("me", "127.0.0.1")])
    assert finding.ok is True and finding.interface == "lo"
