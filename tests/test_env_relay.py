"""``setup``'s relay without hosts: the interpreter a bare Mac gets first runs the receiver on its
own, and the route says why it is not used when the hostfile has no cable addresses.

The relay itself, on virtual Macs in a ring, is in ``test_setup_relay.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from mlx_cluster_magic.fabric import env_relay
from mlx_cluster_magic.fabric.env_manifest import build_manifest
from mlx_cluster_magic.fabric.env_setup import MARK, HostListing
from mlx_cluster_magic.fabric.placement import Host


def test_the_interpreter_files_a_bare_mac_gets_first_run_the_receiver_alone(
    tmp_path: Path,
) -> None:
    boot = env_relay.bootstrap(build_manifest())
    assert not isinstance(boot, str), boot
    assert boot.python in boot.files and len(boot.files) < 200
    # a few % of the environment, never the whole interpreter
    assert boot.size() < 0.5 * boot.root.size, (boot.size(), boot.root.size)
    staged = tmp_path / "staged"
    for rel in boot.files:
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(boot.root.path, rel), staged / rel, follow_symlinks=False)
    lib = str(staged / "lib")
    env = {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": lib, "DYLD_LIBRARY_PATH": lib}
    res = subprocess.run(
        [str(staged / boot.python), "-I", "-S", "-c", env_relay.LAUNCH],
        input=env_relay._first_lines(probe=True),  # a real transfer over loopback, then the files
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith(f"{MARK} files ")), "")
    assert line, (res.stdout, res.stderr)
    read = json.loads(line.split(" ", 2)[2])
    base = os.path.realpath(boot.root.path)
    assert [p for p in read if p.startswith(base + "/")] == [], "read outside the staged copy"


def test_a_hostfile_without_cable_addresses_says_why_in_one_line() -> None:
    listings = []
    for i in (1, 2, 3):
        lst = HostListing(f"mac{i}")
        lst.values["sshconn"] = f"10.9.0.1 50000 10.9.0.{10 + i} 22"
        listings.append(lst)
    hosts = [Host(f"mac{i}", (f"10.9.0.{10 + i}",)) for i in (1, 2, 3)]
    why = env_relay.plan_route(hosts, listings)
    assert isinstance(why, str) and "\n" not in why
    assert why.startswith("the hostfile names no cable addresses"), why
    by_name = env_relay.plan_route([Host(f"mac{i}") for i in (1, 2, 3)], listings)
    assert isinstance(by_name, str) and by_name.startswith("the hostfile names no cable"), by_name


def test_macs_whose_addresses_are_on_this_machines_own_network_are_not_relayed() -> None:
    """Macs on the notebook's own LAN (or Wi-Fi): passing the bytes from one to the next would
    carry them over that network again."""
    import ipaddress

    from mlx_cluster_magic.fabric import netif

    own = next(
        (
            ipaddress.ip_interface(a)
            for i in netif.local_interfaces().values()
            for a in i.inet
            if not a.startswith("127.") and ipaddress.ip_interface(a).network.num_addresses >= 16
        ),
        None,
    )
    if own is None:
        import pytest

        pytest.skip("this machine has no network of 16 addresses or more")
    net = own.network
    spare = [str(a) for a in net.hosts() if a != own.ip][-3:]
    listings, hosts = [], []
    for i, ip in enumerate(spare, 1):
        lst = HostListing(f"mac{i}")
        lst.values["os"] = "Linux"
        lst.values["sshconn"] = f"10.9.0.1 50000 10.9.0.{10 + i} 22"
        lst.addresses = f"2: en0    inet {ip}/{net.prefixlen} brd {net.broadcast_address} scope global en0"
        listings.append(lst)
        hosts.append(Host(f"mac{i}", (ip,)))
    why = env_relay.plan_route(hosts, listings)
    assert isinstance(why, str) and "\n" not in why, why
    assert "over a network this machine is on" in why, why
