"""Thunderbolt discovery, tested on real captured macOS output.

Every fixture under tests/fixtures/macos/ is published output of the real
command (sources in its README.md); the assertions are facts one can read off
those files.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from mlx_cluster_magic.fabric import macos
from mlx_cluster_magic.fabric.macos import (
    HardwarePort,
    NotMacOSError,
    discover,
    hostfile_entry,
    parse_hardware_ports,
    parse_ifconfig,
    parse_thunderbolt_profile,
    require_macos,
    write_hostfile,
)

FIXTURES = Path(__file__).parent / "fixtures" / "macos"

MBP_PORTS = "networksetup-listallhardwareports_macbook-pro-16-2021_macos-14.4.txt"
MBP_IFCONFIG = "ifconfig-a_macbook-pro-16-2021_macos-14.4.txt"
IMAC_PORTS = "networksetup-listallhardwareports_imac-27-2019_macos-10.14.6.txt"
M1_IFCONFIG = "ifconfig-a_macbook-pro-m1-pro-2021_macos-14.5.txt"
MINI_BRIDGE = "ifconfig-bridge0_mac-mini_mlx-issue-1903.txt"
M5_PROFILE = "system_profiler-SPThunderboltDataType-json_macbook-pro-m5-max.json"
STUDIO_PROFILE = "system_profiler-SPThunderboltDataType-json_mac-studio-m3-ultra.json"

M5_DOMAIN = "817DCFA4-B481-4100-80FC-91C7AA969F0B"  # the MacBook's cabled bus
STUDIO_DOMAIN = "28CA4C30-A263-4C55-B302-953416D0B209"  # the Studio's cabled bus


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def fixture_runner(ports: str, ifconfig: str, profile: str, calls: list[tuple[str, ...]]):
    """A runner that answers the three discovery commands from fixtures."""
    answers = {
        macos.HARDWARE_PORTS_COMMAND: fixture(ports),
        macos.IFCONFIG_COMMAND: fixture(ifconfig),
        macos.THUNDERBOLT_PROFILE_COMMAND: fixture(profile),
    }

    def run(argv: Sequence[str]) -> str:
        calls.append(tuple(argv))
        return answers[tuple(argv)]

    return run


# --- networksetup -listallhardwareports -----------------------------------


def test_hardware_ports_of_an_apple_silicon_macbook():
    ports = parse_hardware_ports(fixture(MBP_PORTS))
    assert [(p.name, p.device) for p in ports] == [
        ("Ethernet Adapter (en4)", "en4"),
        ("Ethernet Adapter (en5)", "en5"),
        ("Thunderbolt Bridge", "bridge0"),
        ("Wi-Fi", "en0"),
        ("Thunderbolt 1", "en1"),
        ("Thunderbolt 2", "en2"),
        ("Thunderbolt 3", "en3"),
    ]  # the trailing "VLAN Configurations" heading is not a port
    bridge = ports[2]
    assert bridge.is_thunderbolt_bridge and bridge.is_thunderbolt
    assert bridge.mac == "36:00:07:a1:00:00"
    assert bridge.receptacle is None
    assert [p.receptacle for p in ports[4:]] == [1, 2, 3]
    assert ports[6].mac == "36:00:07:a1:00:08"
    assert not ports[3].is_thunderbolt  # Wi-Fi
    assert not ports[0].is_thunderbolt  # "Ethernet Adapter (en4)"


def test_thunderbolt_port_number_is_not_the_en_number():
    ports = {p.name: p for p in parse_hardware_ports(fixture(IMAC_PORTS))}
    assert ports["Thunderbolt 1"].device == "en2"
    assert ports["Thunderbolt 2"].device == "en3"
    assert ports["Wi-Fi"].device == "en1"
    assert ports["Thunderbolt Bridge"].mac == "aa:00:44:c1:dd:e0"


def test_hardware_ports_accept_bytes():
    text = fixture(MBP_PORTS).encode()
    assert parse_hardware_ports(text) == parse_hardware_ports(text.decode())
    assert parse_hardware_ports(text)[2] == HardwarePort(
        name="Thunderbolt Bridge", device="bridge0", mac="36:00:07:a1:00:00"
    )


def test_hardware_ports_agree_with_mlx_own_parser():
    config = pytest.importorskip("mlx._distributed_utils.config")
    for name in (MBP_PORTS, IMAC_PORTS):
        ours = {p.name: p.device for p in parse_hardware_ports(fixture(name))}
        assert ours == config.parse_hardware_ports(fixture(name).encode())


# --- ifconfig -------------------------------------------------------------


def test_ifconfig_of_an_apple_silicon_macbook():
    ifaces = parse_ifconfig(fixture(MBP_IFCONFIG))
    assert list(ifaces)[:4] == ["lo0", "gif0", "stf0", "anpi1"]
    assert len(ifaces) == 19  # the header lines in the file

    bridge = ifaces["bridge0"]
    assert bridge.members == ("en1", "en2", "en3")
    assert bridge.mtu == 1500
    assert bridge.status == "inactive"
    assert bridge.flags == ("UP", "BROADCAST", "SMART", "RUNNING", "SIMPLEX", "MULTICAST")
    assert bridge.up
    assert bridge.inet == ()
    assert bridge.mac == "36:00:07:a1:00:00"
    assert bridge.media == "<unknown type>"

    en1 = ifaces["en1"]
    assert "PROMISC" in en1.flags
    assert en1.status == "inactive"
    assert en1.members == ()

    en0 = ifaces["en0"]
    assert en0.inet == ("192.168.2.46/24",)
    assert en0.addresses == ("192.168.2.46",)
    assert en0.inet6 == ("fe80::4444:3333:0:5555/64",)
    assert en0.status == "active"

    assert ifaces["lo0"].inet == ("127.0.0.1/8",)
    assert ifaces["lo0"].mtu == 16384
    assert ifaces["stf0"].flags == ()
    assert ifaces["stf0"].mtu == 1280
    assert ifaces["utun3"].mtu == 1000
    assert ifaces["utun3"].status is None  # tunnels print no status line


def test_ifconfig_as_pasted_wrapped_and_masked():
    ifaces = parse_ifconfig(fixture(M1_IFCONFIG))
    assert len(ifaces) == 22  # the header lines in the file
    # "en1: flags=...<...>" then "mtu 1500" on the next line, as published
    for name in ("en1", "en2", "en3"):
        assert ifaces[name].mtu == 1500
        assert ifaces[name].flags[-1] == "MULTICAST"
    # "inet BB.CC.DD.AA netmask ...": masked by the publisher, so not an address
    assert ifaces["en0"].inet == ()
    assert ifaces["en0"].status == "active"
    assert ifaces["lo0"].inet == ("127.0.0.1/8",)
    assert ifaces["bridge0"].members == ("en1", "en2", "en3")
    assert ifaces["en8"].media == "autoselect (none)"


def test_ifconfig_of_a_thunderbolt_bridge_with_an_address():
    ifaces = parse_ifconfig(fixture(MINI_BRIDGE))
    assert list(ifaces) == ["bridge0"]
    bridge = ifaces["bridge0"]
    assert bridge.mtu == 9000
    assert bridge.inet == ("10.25.0.1/24",)
    assert bridge.inet6 == ("fe80::1442:a0bf:3f10:95ba/64",)
    assert bridge.members == ("en2", "en3", "en4")
    assert bridge.status == "active"
    assert bridge.mac == "36:6a:0f:f5:b0:80"
    assert bridge.media == "autoselect"


# --- system_profiler SPThunderboltDataType -json ---------------------------


def test_thunderbolt_profile_of_the_macbook():
    buses = parse_thunderbolt_profile(fixture(M5_PROFILE))
    assert [(b.name, b.receptacle) for b in buses] == [
        ("thunderboltusb4_bus_2", 3),
        ("thunderboltusb4_bus_1", 2),
        ("thunderboltusb4_bus_0", 1),
    ]
    cabled = buses[2]
    assert cabled.connected
    assert cabled.host_model == "MacBook Pro"
    assert cabled.domain_uuid == M5_DOMAIN
    assert cabled.speed == "80 Gb/s"
    assert cabled.link_gbps == 80.0
    assert cabled.hardware_port == "Thunderbolt 1"
    assert cabled.peer is not None
    assert cabled.peer.name == "Mac Studio"
    assert cabled.peer.model == "Mac15,14"
    assert cabled.peer.vendor == "Apple Inc."
    assert cabled.peer_domain_uuid == STUDIO_DOMAIN

    for idle in buses[:2]:
        assert not idle.connected
        assert idle.status == "receptacle_no_devices_connected"
        assert idle.speed == "Up to 120 Gb/s"
        assert idle.link_gbps is None  # a capability, not a link
        assert idle.devices == ()
        assert idle.peer is None


def test_thunderbolt_profile_tells_a_drive_from_a_mac():
    buses = {b.receptacle: b for b in parse_thunderbolt_profile(fixture(STUDIO_PROFILE))}
    assert sorted(buses) == [1, 2, 3, 4, 5, 6]
    assert [r for r, b in sorted(buses.items()) if b.connected] == [2, 4]

    drive_bus = buses[4]
    (drive,) = drive_bus.devices
    assert drive.name == "Envoy Ultra"
    assert drive.vendor == "Other World Computing"
    assert drive.speed == "80 Gb/s"
    assert not drive.is_host
    assert drive_bus.peer is None  # a cabled port, but not to a Mac

    mac_bus = buses[2]
    assert mac_bus.peer is not None
    assert mac_bus.peer.name == "MacBook Pro"
    assert mac_bus.peer.model == "Mac17,7"
    assert mac_bus.domain_uuid == STUDIO_DOMAIN
    assert mac_bus.peer_domain_uuid == M5_DOMAIN


def test_both_ends_of_the_cable_name_each_other():
    """The domain-UUID join mlx.distributed_config uses to map port to peer."""
    mbp = parse_thunderbolt_profile(fixture(M5_PROFILE))
    studio = parse_thunderbolt_profile(fixture(STUDIO_PROFILE))
    mbp_domains = {b.domain_uuid: b for b in mbp}
    studio_domains = {b.domain_uuid: b for b in studio}
    links = {
        (b.hardware_port, studio_domains[b.peer_domain_uuid].hardware_port)
        for b in mbp
        if b.peer_domain_uuid in studio_domains
    }
    assert links == {("Thunderbolt 1", "Thunderbolt 2")}
    back = [b for b in studio if b.peer_domain_uuid in mbp_domains]
    assert [b.hardware_port for b in back] == ["Thunderbolt 2"]


def test_thunderbolt_profile_input_forms():
    text = fixture(M5_PROFILE)
    as_text = parse_thunderbolt_profile(text)
    assert parse_thunderbolt_profile(text.encode()) == as_text
    assert parse_thunderbolt_profile(json.loads(text)) == as_text
    assert parse_thunderbolt_profile('{"SPThunderboltDataType": []}') == []
    with pytest.raises(ValueError, match="did not print JSON"):
        parse_thunderbolt_profile("system_profiler: error")


# --- RDMA and host facts --------------------------------------------------

IBV_M3_ULTRA = "ibv_devices_m3-ultra_mlx-docs.txt"


def test_ibv_devices_lists_the_rdma_devices():
    """MLX's docs show this on an M3 Ultra after `rdma_ctl enable`."""
    assert macos.parse_ibv_devices(fixture(IBV_M3_ULTRA)) == (
        "rdma_en2",
        "rdma_en3",
        "rdma_en5",
        "rdma_en4",
        "rdma_en6",
        "rdma_en7",
    )
    assert macos.parse_ibv_devices(fixture(IBV_M3_ULTRA).encode()) == macos.parse_ibv_devices(
        fixture(IBV_M3_ULTRA)
    )
    # the header alone (what is left when no device is enabled) names no device
    header = "\n".join(fixture(IBV_M3_ULTRA).splitlines()[:2])
    assert macos.parse_ibv_devices(header) == ()


def test_host_facts_join_both_ends_of_the_real_cable():
    """The MacBook Pro M5 Max and the Mac Studio M3 Ultra captures are the two ends of one
    Thunderbolt 5 cable: each Mac's facts find the other through the domain UUIDs."""
    mbp = macos.host_facts(
        "mbp", os_name="Darwin", macos_version="26.2", thunderbolt_profile=fixture(M5_PROFILE)
    )
    studio = macos.host_facts(
        "studio",
        os_name="Darwin",
        macos_version="26.2",
        thunderbolt_profile=fixture(STUDIO_PROFILE),
        ibv_devices=fixture(IBV_M3_ULTRA),
    )
    assert mbp.is_mac and mbp.macos_version == (26, 2)
    assert M5_DOMAIN in mbp.domains and STUDIO_DOMAIN in studio.domains
    (to_studio,) = mbp.links_to(studio)
    assert to_studio.link_gbps == 80.0 and to_studio.hardware_port == "Thunderbolt 1"
    (to_mbp,) = studio.links_to(mbp)
    assert to_mbp.hardware_port == "Thunderbolt 2"
    assert mbp.rdma_devices is None  # not asked
    assert studio.rdma_devices is not None and "rdma_en2" in studio.rdma_devices


def test_host_facts_read_bridge_membership_from_ports_and_ifconfig():
    facts = macos.host_facts(
        "mbp",
        os_name="Darwin",
        hardware_ports=fixture(MBP_PORTS),
        ifconfig=fixture(MBP_IFCONFIG),
    )
    by_device = {t.device: t for t in facts.interfaces}
    bridge = by_device["bridge0"]
    assert bridge.is_bridge
    # "Thunderbolt 1..3" are en1..en3, each a "member:" of bridge0 in this ifconfig
    assert facts.bridged_ports == ("en1", "en2", "en3")
    assert bridge.members == ("en1", "en2", "en3")


def test_host_facts_survive_a_profile_that_is_not_json():
    facts = macos.host_facts("m", os_name="Darwin", thunderbolt_profile="system_profiler: error")
    assert facts.buses == () and facts.domains == frozenset()
    assert macos.version_tuple("26.2.1") == (26, 2, 1) and macos.version_tuple("") is None


# --- discovery, the three joined --------------------------------------------


def test_discover_joins_ports_ifconfig_and_cables():
    # ports and ifconfig: one MacBook Pro (macOS 14.4); profile: another
    # MacBook Pro (M5 Max) with the same three receptacles, cabled on #1.
    calls: list[tuple[str, ...]] = []
    found = discover(fixture_runner(MBP_PORTS, MBP_IFCONFIG, M5_PROFILE, calls))
    assert sorted(calls) == sorted(
        [
            ("networksetup", "-listallhardwareports"),
            ("ifconfig", "-a"),
            ("system_profiler", "SPThunderboltDataType", "-json"),
        ]
    )
    assert [(t.port, t.device) for t in found] == [
        ("Thunderbolt Bridge", "bridge0"),
        ("Thunderbolt 1", "en1"),
        ("Thunderbolt 2", "en2"),
        ("Thunderbolt 3", "en3"),
    ]
    bridge, en1, en2, en3 = found
    assert bridge.is_bridge
    assert bridge.members == ("en1", "en2", "en3")
    assert bridge.mtu == 1500
    assert bridge.status == "inactive"
    assert bridge.inet == ()
    assert bridge.link is None

    assert not en1.is_bridge
    assert en1.receptacle == 1
    assert en1.bridge == "bridge0"
    assert en1.mac == "36:00:07:a1:00:00"
    assert en1.mtu == 1500
    assert "PROMISC" in en1.flags
    assert en1.link is not None
    assert en1.link.connected
    assert en1.link.link_gbps == 80.0
    assert en1.peer_domain_uuid == STUDIO_DOMAIN

    assert en2.link is not None and not en2.link.connected
    assert en2.peer_domain_uuid is None
    assert en3.link is not None and en3.link.speed == "Up to 120 Gb/s"

    # nothing carries an address, so there is nothing to put in a hostfile
    assert hostfile_entry("mbp.local", found) == {"ssh": "mbp.local", "ips": []}


def test_join_puts_the_bridge_first_and_needs_no_profile():
    # The iMac lists its bridge after its ports; no ifconfig or profile given.
    found = macos.thunderbolt_interfaces(parse_hardware_ports(fixture(IMAC_PORTS)), {})
    assert [(t.port, t.device, t.receptacle) for t in found] == [
        ("Thunderbolt Bridge", "bridge0", None),
        ("Thunderbolt 1", "en2", 1),
        ("Thunderbolt 2", "en3", 2),
    ]
    assert all(t.link is None and t.mtu is None and t.bridge is None for t in found)


def test_discover_matches_mlx_distributed_config(monkeypatch):
    """Same ports, same domain UUIDs as MLX's own extract_connectivity."""
    config = pytest.importorskip("mlx._distributed_utils.config")
    common = pytest.importorskip("mlx._distributed_utils.common")
    answers = {"networksetup": fixture(MBP_PORTS), "system_profiler": fixture(M5_PROFILE)}

    class Done:
        def __init__(self, stdout: str):
            self.stdout = stdout.encode()

    def fake_run(argv, **kwargs):
        assert argv[:2] == ["ssh", "mbp"]
        return Done(answers[argv[2]])

    monkeypatch.setattr(config, "run", fake_run)
    tb_hosts, _ = config.extract_connectivity([common.Host(0, "mbp", [], [])], False)
    theirs = {(p.iface, p.uuid, p.connected_to) for p in tb_hosts[0].ports}

    calls: list[tuple[str, ...]] = []
    found = discover(fixture_runner(MBP_PORTS, MBP_IFCONFIG, M5_PROFILE, calls))
    ours = {(t.device, t.link.domain_uuid, t.peer_domain_uuid) for t in found if t.link}
    assert ours == theirs
    assert ("en1", M5_DOMAIN, STUDIO_DOMAIN) in ours


def test_discover_reports_a_bridge_address_for_the_hostfile():
    # ports: the 14.4 MacBook; ifconfig: the Mac mini's bridge0 from MLX
    # issue 1903 (its only block); profile: the M5 Max MacBook.
    calls: list[tuple[str, ...]] = []
    found = discover(fixture_runner(MBP_PORTS, MINI_BRIDGE, M5_PROFILE, calls))
    by_device = {t.device: t for t in found}
    bridge = by_device["bridge0"]
    assert bridge.inet == ("10.25.0.1/24",)
    assert bridge.addresses == ("10.25.0.1",)
    assert bridge.mtu == 9000
    assert bridge.active
    assert bridge.members == ("en2", "en3", "en4")
    assert by_device["en2"].bridge == "bridge0"
    assert by_device["en1"].bridge is None  # not among this bridge's members
    assert by_device["en1"].mtu is None  # ifconfig did not list en1
    assert by_device["en1"].status is None

    entry = hostfile_entry("mac-mini.local", found)
    assert entry == {"ssh": "mac-mini.local", "ips": ["10.25.0.1"]}
    assert hostfile_entry("m", found, link_local=False)["ips"] == ["10.25.0.1"]


# --- hostfile ----------------------------------------------------------------


def test_hostfile_entry_skips_inactive_and_optionally_link_local():
    tb = macos.ThunderboltInterface
    ifaces = [
        tb("Thunderbolt Bridge", "bridge0", inet=("169.254.7.9/16",), status="active"),
        tb("Thunderbolt 1", "en1", receptacle=1, inet=("192.168.0.1/30",), status="active"),
        tb("Thunderbolt 2", "en2", receptacle=2, inet=("192.168.0.5/30",), status="inactive"),
        tb("Thunderbolt 3", "en3", receptacle=3, inet=("192.168.0.1/30",), status="active"),
    ]
    assert hostfile_entry("a", ifaces)["ips"] == ["169.254.7.9", "192.168.0.1"]
    assert hostfile_entry("a", ifaces, link_local=False)["ips"] == ["192.168.0.1"]
    assert hostfile_entry("a", ifaces, active_only=False)["ips"] == [
        "169.254.7.9",
        "192.168.0.1",
        "192.168.0.5",
    ]


def test_write_hostfile_forms_and_mlx_reads_them(tmp_path):
    entries = [
        {"ssh": "mac-mini.local", "ips": ["10.25.0.1"]},
        {"ssh": "studio.local", "ips": ["10.25.0.2"]},
    ]
    plain = write_hostfile(tmp_path / "hosts.json", entries)
    assert json.loads(plain.read_text()) == entries
    full = write_hostfile(tmp_path / "ring.json", entries, backend="ring", envs=["A=1"])
    assert json.loads(full.read_text()) == {"backend": "ring", "envs": ["A=1"], "hosts": entries}

    common = pytest.importorskip("mlx._distributed_utils.common")
    for path in (plain, full):
        hosts = common.Hostfile.from_file(path).hosts
        assert [(h.ssh_hostname, h.ips) for h in hosts] == [
            ("mac-mini.local", ["10.25.0.1"]),
            ("studio.local", ["10.25.0.2"]),
        ]


@pytest.mark.parametrize(
    "bad", [{"ips": ["10.0.0.1"]}, {"ssh": "", "ips": []}, {"ssh": "a", "ips": "10.0.0.1"}]
)
def test_write_hostfile_rejects_malformed_entries(tmp_path, bad):
    with pytest.raises(ValueError, match="host entry 0"):
        write_hostfile(tmp_path / "h.json", [bad])
    assert not (tmp_path / "h.json").exists()


# --- platform ----------------------------------------------------------------


def test_require_macos_names_the_platform_in_one_line():
    require_macos("darwin")  # no error
    with pytest.raises(NotMacOSError) as info:
        require_macos("linux")
    message = str(info.value)
    assert message.startswith(
        "Thunderbolt discovery needs macOS (this is Linux); write the hostfile by hand: "
    )
    assert '"ssh"' in message and '"ips"' in message
    assert "\n" not in message


def test_discover_with_the_real_runner_refuses_off_macos(monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("no command may run off macOS")

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    with pytest.raises(NotMacOSError, match=r"needs macOS \(this is Linux\)"):
        discover()


def test_subprocess_runner_names_the_failing_command():
    with pytest.raises(RuntimeError, match="is not installed here"):
        macos.subprocess_runner(["no-such-command-mlx-cluster-magic"])
    with pytest.raises(RuntimeError, match=r"`false` failed"):
        macos.subprocess_runner(["false"])
    assert macos.subprocess_runner(["echo", "hi"]) == "hi\n"


def test_module_does_not_import_ipython():
    # Loaded from its files under a stand-in package, so the package's __init__ is not involved.
    spec = importlib.util.find_spec("mlx_cluster_magic.fabric.macos")
    assert spec is not None and spec.origin is not None
    folder = str(Path(spec.origin).parent)
    code = (
        "import importlib, sys, types\n"
        "pkg = types.ModuleType('tbpkg')\n"
        f"pkg.__path__ = [{folder!r}]\n"
        "sys.modules['tbpkg'] = pkg\n"
        "importlib.import_module('tbpkg.macos')\n"
        "assert 'IPython' not in sys.modules, 'IPython was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- %mlx_cluster hosts --discover / --write FILE ----------------------------


def test_discover_command_shows_interfaces_without_writing():
    calls: list[tuple[str, ...]] = []
    shown = macos.discover_command(run=fixture_runner(MBP_PORTS, MBP_IFCONFIG, M5_PROFILE, calls))
    # the fixture runner cannot answer scutil, so the name falls back to this host's
    assert shown.ssh
    assert [t.device for t in shown.interfaces] == ["bridge0", "en1", "en2", "en3"]
    assert shown.written is None
    text = str(shown)
    assert f"cable 80 Gb/s to Mac Studio ({STUDIO_DOMAIN})" in text
    assert "members en1,en2,en3" in text
    assert '"ips": []' in text


def test_discover_command_writes_and_updates_the_hostfile(tmp_path):
    path = tmp_path / "hosts.json"
    calls: list[tuple[str, ...]] = []
    runner = fixture_runner(MBP_PORTS, MINI_BRIDGE, M5_PROFILE, calls)

    first = macos.discover_command(path, ssh="mac-mini.local", run=runner)
    assert first.written == path
    assert json.loads(path.read_text()) == [{"ssh": "mac-mini.local", "ips": ["10.25.0.1"]}]

    # another Mac appended after it, then the first one rediscovered in place
    macos.discover_command(path, ssh="studio.local", run=runner)
    path.write_text(path.read_text().replace('"10.25.0.1"', '"10.99.0.1"', 1))
    macos.discover_command(path, ssh="mac-mini.local", run=runner)
    assert json.loads(path.read_text()) == [
        {"ssh": "mac-mini.local", "ips": ["10.25.0.1"]},
        {"ssh": "studio.local", "ips": ["10.25.0.1"]},
    ]

    # the {"backend", "envs", "hosts"} form keeps its other keys
    path.write_text(json.dumps({"backend": "ring", "envs": ["X=1"], "hosts": []}))
    macos.discover_command(path, ssh="mac-mini.local", run=runner)
    assert json.loads(path.read_text()) == {
        "backend": "ring",
        "envs": ["X=1"],
        "hosts": [{"ssh": "mac-mini.local", "ips": ["10.25.0.1"]}],
    }


def test_discover_command_errors_are_one_line_cluster_errors(tmp_path, monkeypatch):
    from mlx_cluster_magic.errors import MLXClusterError

    calls: list[tuple[str, ...]] = []
    no_ip = fixture_runner(MBP_PORTS, MBP_IFCONFIG, M5_PROFILE, calls)
    with pytest.raises(MLXClusterError, match="no active Thunderbolt interface") as info:
        macos.discover_command(tmp_path / "h.json", ssh="mbp.local", run=no_ip)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "h.json").exists()

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with_ip = fixture_runner(MBP_PORTS, MINI_BRIDGE, M5_PROFILE, calls)
    with pytest.raises(MLXClusterError, match="not a readable JSON hostfile"):
        macos.discover_command(bad, ssh="mac-mini.local", run=with_ip)

    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(
        MLXClusterError, match=r"^Thunderbolt discovery needs macOS \(this is Linux\)"
    ):
        macos.discover_command()
