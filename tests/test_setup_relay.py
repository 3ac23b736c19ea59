"""``%mlx_cluster setup`` over the cables: three virtual Macs in a ring, the notebook's machine off
the cables (on the management network only, as a laptop on Wi-Fi beside a Thunderbolt ring).

Each Mac mounts an empty tmpfs of its own at this kernel's venv, its interpreter's base and this
package's source (as in ``test_setup.py``). The bytes each link carries are read from the
kernel's own counters (``/sys/class/net/*/statistics``): the head's bridge ports for the
management network, each Mac's cable interfaces for the cables. The environment must cross the
management network once, then a ring backend ``all_sum`` runs over the cables on what arrived.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.fabric.env_manifest import STAGING, build_manifest
from mlx_cluster_magic.fabric.env_rollout import SetupReport

from conftest import no_leaks_on, release_shell, virtual_macs

pytestmark = pytest.mark.multihost

VENV = sys.prefix
BASE = os.path.realpath(sys.base_prefix)
SOURCE = str(Path(__file__).resolve().parents[1] / "mlx_cluster_magic")
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
RING_PORT = 32490
TOKEN = re.compile(r"\b[0-9a-f]{64}\b")


@pytest.fixture(scope="module")
def ring() -> Iterator[Any]:
    with virtual_macs(
        3,
        "10.93.1.0/24",
        "relr",
        cables="ring",
        cable_subnet="10.93.61.0/24",
        private_dirs=[VENV, BASE, SOURCE],
        private_size="3g",
    ) as vc:
        yield vc


@pytest.fixture(scope="module")
def shell(ring: Any) -> Iterator[Any]:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mlx_cluster_magic")
    try:
        yield ip
    finally:
        release_shell(ip)
        no_leaks_on(ring)


@pytest.fixture(scope="module")
def cabled(ring: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ring hostfile as ``mlx.distributed_config`` writes it: the cables' addresses."""
    return ring.cabled_hostfile(tmp_path_factory.mktemp("relay") / "ring.json", "ring")  # type: ignore[no-any-return]


def on(vc: Any, host: str, command: str) -> str:
    res = vc.ssh(host, command)
    assert res.returncode == 0, res.stderr
    return res.stdout  # type: ignore[no-any-return]


def mgmt_bytes(vc: Any) -> list[int]:
    """Bytes the head sent each Mac over the management network (its bridge ports)."""
    return [int(Path(f"/sys/class/net/{v}/statistics/tx_bytes").read_text()) for v in vc.veths]


def cable_bytes(vc: Any) -> list[int]:
    """Bytes each cable carried, both ways (read at its first end, inside that Mac)."""
    out = []
    for k, (i, _j) in enumerate(vc.cables):
        iface = vc.cable_iface(k, 0)
        text = vc.netns_exec(
            vc.hosts[i],
            "cat",
            f"/sys/class/net/{iface}/statistics/tx_bytes",
            f"/sys/class/net/{iface}/statistics/rx_bytes",
        ).stdout.split()
        out.append(sum(int(x) for x in text))
    return out


def clear(vc: Any) -> None:
    for h in vc.hosts:
        on(vc, h, f"find {VENV} {BASE} {SOURCE} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +")


def setup_line(vc: Any, hostfile: Path, *flags: str) -> str:
    return f"setup --hostfile {hostfile} --ssh '{vc.rsh_agent}' {' '.join(flags)}".rstrip()


def watch_command_lines(vc: Any, stop: threading.Event, seen: list[str]) -> None:
    """Every command line on every Mac while ``stop`` is not set."""
    while not stop.is_set():
        for h in vc.hosts:
            res = vc.netns_exec(
                h, "sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"
            )
            seen.append(res.stdout)
        time.sleep(0.2)


def test_setup_over_the_cables_crosses_the_notebooks_link_once(
    ring: Any, shell: Any, cabled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clear(ring)
    size = build_manifest().size
    mgmt0, cables0 = mgmt_bytes(ring), cable_bytes(ring)
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]
    watcher = threading.Thread(target=watch_command_lines, args=(ring, stop, seen), daemon=True)
    watcher.start()
    try:
        report = shell.run_line_magic("mlx_cluster", setup_line(ring, cabled))
    finally:
        stop.set()
        watcher.join()
    out = capsys.readouterr().out
    mgmt = [a - b for a, b in zip(mgmt_bytes(ring), mgmt0, strict=True)]
    cables = [a - b for a, b in zip(cable_bytes(ring), cables0, strict=True)]
    print(out, f"\nmanagement {mgmt}, cables {cables}, environment {size}")
    assert isinstance(report, SetupReport) and report.ok, repr(report)
    # The route, said: one Mac over this machine's link, the others over the cables.
    assert "mac1 over this machine's link (ssh)" in out, out
    assert re.search(r"mac2 over the cable from mac1 to 10\.93\.61\.\d+", out), out
    assert re.search(r"mac3 over the cable from mac2 to 10\.93\.61\.\d+", out), out
    assert "over the cable from mac1" in repr(report), repr(report)
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("setup: sent mac1 ") and "(cable from mac2)" in last, last
    # The environment crossed the management network once; the others got only the
    # interpreter their receiver runs on (a few % of it) that way, and the rest by cable.
    assert max(mgmt) > 0.95 * size, (mgmt, size)
    assert all(m < 0.05 * size for m in sorted(mgmt)[:2]), (mgmt, size)
    assert sum(mgmt) < 1.12 * size, (mgmt, size)
    assert sum(cables) > 1.8 * size, (cables, size)
    # No token (64 hex digits) on any command line on any Mac while it ran.
    assert seen and not any(TOKEN.search(text) for text in seen)
    # Nothing of the relay runs on a Mac, nothing is left staged.
    for h in ring.hosts:
        assert on(ring, h, "pgrep -f '[-]I -S -c import sys' || true").strip() == "", h
        assert on(ring, h, f"ls -a {VENV} {BASE} {SOURCE} | grep -c partial || true").strip() == "0"
    # Every Mac has it all: nothing to send again, and a ring all_sum over the cables.
    again = shell.run_line_magic("mlx_cluster", setup_line(ring, cabled, "--check"))
    assert [r.to_send for r in again.rows] == [0, 0, 0], repr(again)
    cluster = shell.run_line_magic(
        "mlx_cluster", ring.start_line(cabled, "--no-live-status", ring_port=RING_PORT)
    )
    try:
        assert isinstance(cluster, MLXCluster) and cluster.running
        cluster.view.execute(
            "import mlx.core as mx\n"
            "s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * "
            "(mx.distributed.init().rank() + 1)).tolist()",
            block=True,
        )
        assert cluster.view["s"] == [[0.0, 6.0, 12.0, 18.0]] * 3
    finally:
        shell.run_line_magic("mlx_cluster", "stop")


def test_addresses_without_cables_send_to_each_mac_and_say_why_in_one_line(
    ring: Any, shell: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for h in ("mac2", "mac3"):
        on(ring, h, f"rm -rf {VENV}/{SITE}/mpi4py {VENV}/{SITE}/mpi4py-*.dist-info")
    plain = ring.hostfile(tmp_path / "hosts.json")  # the management addresses only
    report = shell.run_line_magic("mlx_cluster", setup_line(ring, plain))
    out = capsys.readouterr().out
    assert report.ok, repr(report)
    why = [ln for ln in out.splitlines() if "cable" in ln]
    assert len(why) == 1 and why[0].startswith("setup: the hostfile names no cable addresses"), out
    last = out.rstrip().splitlines()[-1]  # each Mac's own stream, side by side
    assert last.startswith("setup: sent mac1 ") and " · mac2 " in last, out


def test_an_interrupted_relay_stops_every_mac_and_resumes(
    ring: Any, shell: Any, cabled: Path
) -> None:
    big = ["transformers", "pandas", "playwright"]
    for h in ring.hosts:
        on(ring, h, " ".join(["rm -rf", *(f"{VENV}/{SITE}/{p}" for p in big)]))
    stage = f"{VENV}/{STAGING}"

    def interrupt_once_bytes_arrive() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = ring.ssh("mac3", f"du -sk {stage} 2>/dev/null | cut -f1").stdout.strip()
            if got.isdigit() and int(got) > 5_000:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    ring.shape("200mbit")  # the management network, so the relay is still running
    try:
        watcher = threading.Thread(target=interrupt_once_bytes_arrive, daemon=True)
        watcher.start()
        with pytest.raises(UsageError, match="interrupted.*run setup again to resume"):
            shell.run_line_magic("mlx_cluster", setup_line(ring, cabled))
        watcher.join()
    finally:
        ring.unshape()
    mine = subprocess.run(
        ["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True
    ).stdout.splitlines()
    assert [p for p in mine if " ssh " in f" {p} "] == [], mine
    for h in ring.hosts:  # every receiver ended with its notebook's ssh
        assert on(ring, h, "sleep 1; pgrep -f '[-]I -S -c import sys' || true").strip() == "", h
    staged = int(on(ring, "mac3", f"find {stage} -type f | wc -l").strip())
    assert staged > 0
    assert on(ring, "mac3", f"ls {VENV}/{SITE} | grep -c -x pandas || true").strip() == "0"
    report = shell.run_line_magic("mlx_cluster", setup_line(ring, cabled))
    assert report.ok, repr(report)
    again = shell.run_line_magic("mlx_cluster", setup_line(ring, cabled, "--check"))
    assert [r.to_send for r in again.rows] == [0, 0, 0], repr(again)


def test_a_cable_pulled_mid_relay_is_named_and_the_mac_gets_the_rest_directly(
    ring: Any, shell: Any, cabled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = ["transformers", "pandas", "playwright"]
    for h in ring.hosts:
        on(ring, h, " ".join(["rm -rf", *(f"{VENV}/{SITE}/{p}" for p in big)]))
    # the chain runs mac1 -> mac2 -> mac3 over the cables: pull the mac2-mac3 one
    k = ring.cable("mac2", "mac3")
    iface = ring.cable_iface(k, 1 if ring.cables[k][1] == 2 else 0)
    down = ["ip", "netns", "exec", ring.namespace("mac3"), "ip", "link", "set", iface, "down"]
    for kk in range(len(ring.cables)):
        ring.shape_cable(kk, "100mbit")
    pull = threading.Timer(3.0, subprocess.run, (down,))
    try:
        pull.start()
        report = shell.run_line_magic("mlx_cluster", setup_line(ring, cabled))
        pull.join()
    finally:
        subprocess.run([*down[:-1], "up"], check=False)
        for kk in range(len(ring.cables)):
            ring.shape_cable(kk, None)
    out = capsys.readouterr().out.replace("\r", "\n")
    broke = [ln for ln in out.splitlines() if "broke" in ln or "could not reach" in ln]
    print(broke)
    assert len(broke) == 1 and broke[0].startswith("setup: "), out
    assert "from mac2 to mac3 (10.93.61." in broke[0] or "mac2 could not reach mac3" in broke[0]
    assert broke[0].endswith(": mac3 gets the rest over this machine's link"), broke
    assert report.ok, repr(report)
    assert out.rstrip().splitlines()[-1].startswith("setup: sent mac3 "), out
    for h in ring.hosts:  # nothing of the relay still runs
        assert on(ring, h, "pgrep -f '[-]I -S -c import sys' || true").strip() == "", h
    again = shell.run_line_magic("mlx_cluster", setup_line(ring, cabled, "--check"))
    assert [r.to_send for r in again.rows] == [0, 0, 0], repr(again)


def test_a_mac_whose_receiver_cannot_start_gets_it_directly_and_one_line_says_why(
    ring: Any, shell: Any, cabled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # mac2 lacks a file of the interpreter (so it would run its receiver from what it is sent
    # first) on a disk that runs nothing (noexec)
    on(ring, "mac2", f"rm -f {BASE}/lib/python3.*/socket.py")
    for h in ("mac2", "mac3"):
        on(ring, h, f"rm -rf {VENV}/{SITE}/mpi4py {VENV}/{SITE}/mpi4py-*.dist-info")
    on(ring, "mac2", f"mount -o remount,noexec {BASE}")
    try:
        shell.run_line_magic("mlx_cluster", setup_line(ring, cabled))
    finally:
        on(ring, "mac2", f"mount -o remount,exec {BASE}")
    out = capsys.readouterr().out
    why = [ln for ln in out.splitlines() if "relay could not start" in ln]
    assert len(why) == 1 and "mac2" in why[0] and "over this machine's link" in why[0], out
    assert out.rstrip().splitlines()[-1].startswith("setup: sent mac1 "), out
    assert on(ring, "mac2", "pgrep -f '[-]I -S -c import sys' || true").strip() == ""
    again = shell.run_line_magic("mlx_cluster", setup_line(ring, cabled, "--check"))
    assert again.ok and [r.to_send for r in again.rows] == [0, 0, 0], repr(again)
