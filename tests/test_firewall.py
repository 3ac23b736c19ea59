"""A host whose firewall refuses incoming TCP except ssh (as macOS's application firewall does
to a python it was never allowed) is named, with the fix, before any rank starts.

The firewall is real: iptables in that virtual host's own network namespace rejects every TCP
connection to it except ssh's (and replies on connections it opened itself), as a reset, the
way a refused connection looks to the peers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from conftest import no_leaks_on, release_shell, virtual_macs

pytestmark = pytest.mark.multihost

RING_PORT = 32490
RULES = [
    "-A INPUT -p tcp --dport 22 -j ACCEPT",
    "-A INPUT -p tcp -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
]


@pytest.fixture(scope="module")
def walled() -> Iterator[Any]:
    """Two virtual Macs; mac2's firewall turns away every TCP connection but ssh's."""
    if shutil.which("iptables") is None:
        pytest.skip("needs iptables")
    with virtual_macs(2, "10.241.3.0/24", "stpf") as vc:
        for rule in RULES:
            res = vc.netns_exec("mac2", "iptables", *rule.split())
            if res.returncode != 0:
                pytest.skip(f"iptables in a namespace: {res.stderr.strip()}")
        yield vc


@pytest.fixture(scope="module")
def shell(walled: Any) -> Iterator[Any]:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mlx_cluster_magic")
    try:
        yield ip
    finally:
        release_shell(ip)
        no_leaks_on(walled)


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_a_firewalled_host_is_named_with_the_fix_in_seconds(
    walled: Any, shell: Any, tmp_path: Path, backend: str
) -> None:
    hostfile = walled.hostfile(tmp_path / "hosts.json")
    line = walled.start_line(hostfile, "--no-live-status", "--backend", backend, ring_port=RING_PORT)
    t0 = time.monotonic()
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("mlx_cluster", line)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("mac2: inbound: mac2 refuses connections to its python"), msg
    assert f"{walled.ip('mac2')}:" in msg and "from mac1" in msg
    assert "firewall" in msg and "fix: on mac2:" in msg
    assert took < 15, took
    magics = shell.magics_manager.registry["MLXClusterMagics"]
    assert magics.cluster is None or not magics.cluster.running
    no_leaks_on(walled)


def test_the_doctor_shows_the_firewall_and_the_open_host_stays_green(
    walled: Any, shell: Any, tmp_path: Path
) -> None:
    hostfile = walled.hostfile(tmp_path / "hosts.json")
    report = shell.run_line_magic(
        "mlx_cluster", f"doctor --hostfile {hostfile} --ssh '{walled.rsh_agent}' --backend ring"
    )
    assert report["mac2"]["inbound"].ok is False
    assert report["mac1"]["inbound"].ok is True
    assert report["mac1"]["peers"].ok is True  # the address answers: a path exists


def test_a_firewall_turned_on_after_start_is_named_when_the_ranks_die(
    walled: Any, shell: Any, tmp_path: Path
) -> None:
    """The doctor passed at start; then mac2's firewall comes on (a prompt answered "Deny").
    MPI's first connection to mac2 is refused and the ranks die: the cell names mac2 and the
    fix, not the rank that noticed."""
    for rule in RULES:  # open at start
        walled.netns_exec("mac2", "iptables", "-D", *rule.split()[1:])
    hostfile = walled.hostfile(tmp_path / "hosts.json")
    line = walled.start_line(hostfile, "--no-live-status", "--backend", "mpi", ring_port=RING_PORT)
    cluster = shell.run_line_magic("mlx_cluster", line)
    try:
        for rule in RULES:
            walled.netns_exec("mac2", "iptables", *rule.split())
        with pytest.raises(UsageError) as e:
            shell.run_cell_magic("px", "", "s = mx.distributed.all_sum(mx.ones(4096)).sum().item()")
        msg = str(e.value)
        assert msg.startswith("mac2 refuses connections to its python"), msg
        assert "the ranks died at their first connection to it" in msg and "fix: on mac2:" in msg
        assert cluster.state == "broken"
    finally:
        shell.run_line_magic("mlx_cluster", "stop")
        for rule in RULES:  # as the fixture left it, once only
            while walled.netns_exec("mac2", "iptables", "-D", *rule.split()[1:]).returncode == 0:
                pass
        for rule in RULES:
            walled.netns_exec("mac2", "iptables", *rule.split())
        no_leaks_on(walled, timeout=30)


# The head's own firewall: iptables on the head, but only for what arrives on this fixture's own
# bridge (stpfbr0) at the doctor's probe ports, so nothing else on the machine is touched.
def _head_rule(action: str, proto: str, target: str) -> list[str]:
    from mlx_cluster_magic.fabric.doctor import PROBE_PORTS

    ports = f"{PROBE_PORTS[0]}:{PROBE_PORTS[1] + 1}"
    rule = ["INPUT", "-i", "stpfbr0", "-p", proto, "--dport", ports, "-j", *target.split()]
    return ["iptables", action, *rule]


@pytest.mark.parametrize(
    ("proto", "target"), [("tcp", "REJECT --reject-with tcp-reset"), ("udp", "DROP")]
)
def test_a_firewall_on_the_head_is_named_with_the_fix(
    walled: Any, shell: Any, tmp_path: Path, proto: str, target: str
) -> None:
    import subprocess

    for rule in RULES:  # mac2 open again: only the head is walled here
        walled.netns_exec("mac2", "iptables", "-D", *rule.split()[1:])
    add = subprocess.run(_head_rule("-I", proto, target), capture_output=True, text=True)
    if add.returncode != 0:
        pytest.skip(f"iptables on the head: {add.stderr.strip()}")
    try:
        hostfile = walled.hostfile(tmp_path / "hosts.json")
        report = shell.run_line_magic(
            "mlx_cluster", f"doctor --hostfile {hostfile} --ssh '{walled.rsh_agent}'"
        )
        for host in walled.hosts:
            ip = report[host]["ip"]
            if proto == "tcp":
                assert ip.ok is False and "(refused): a firewall on this machine" in ip.detail
                assert f"{walled.head_ip}:" in ip.detail
                assert "socketfilterfw" in ip.fix or "iptables" in ip.fix
            else:
                assert ip.ok is None and "UDP datagrams do not arrive" in ip.detail, ip
        if proto == "tcp":
            line = walled.start_line(hostfile, "--no-live-status", ring_port=RING_PORT)
            with pytest.raises(UsageError, match=r"^mac1: ip: mac1 cannot connect to this"):
                shell.run_line_magic("mlx_cluster", line)
            no_leaks_on(walled)
    finally:
        subprocess.run(_head_rule("-D", proto, target), capture_output=True, check=True)
        for rule in RULES:
            walled.netns_exec("mac2", "iptables", *rule.split())
