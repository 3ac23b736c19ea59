"""``run_doctor``: every check on real hosts, healthy and broken, with no mocks.

The local tests run anywhere; the multi-host ones build a virtual cluster of namespaced "Macs"
with sshd (root only; they skip otherwise) and break it for real: unknown names, refused ssh,
keys not authorized, a missing python, a python without MLX, version skew, a pulled cable and a
low MTU. Every doctor call uses ``timeout=5`` and must come back well within its bounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import mlx_cluster_magic
from mlx_cluster_magic.errors import MLXClusterError
from mlx_cluster_magic.fabric import macos
from mlx_cluster_magic.fabric.doctor import (
    CHECKS,
    PACKAGES,
    Advice,
    DoctorReport,
    HostCheck,
    advise_backend,
    head_versions,
    parse_interfaces,
    run_doctor,
)
from mlx_cluster_magic.fabric.doctor.collect import probe_script
from mlx_cluster_magic.fabric.placement import Host, Placement, local, read_hostfile

from conftest import virtual_macs
from vcluster import VirtualCluster

FIXTURES = Path(__file__).parent / "fixtures" / "macos"
HOSTFILES = Path(__file__).parent / "fixtures" / "hostfiles"
TIMEOUT = 5.0
# A dead host costs at most connect + remote-check time, never more.
BOUND = 2 * TIMEOUT + 3


def _has_mlx(python: str) -> bool:
    proc = subprocess.run([python, "-c", "import mlx.core"], capture_output=True, timeout=30)
    return proc.returncode == 0


def _skew_python(tmp: Path) -> str:
    """A python whose ``mlx_cluster_magic`` claims another version (the venv's, shadowed)."""
    pkg = tmp / "skew" / "mlx_cluster_magic"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0.0.0-skew"\n')
    wrapper = tmp / "python-skew"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={tmp / "skew"} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _statuses(report: DoctorReport, host: str) -> dict[str, bool | None]:
    return {c.name: c.ok for c in report[host].checks}


# --------------------------------------------------------------------------------- local


def test_local_placement_is_all_green() -> None:
    t0 = time.monotonic()
    report = run_doctor(local(2), timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT
    assert report.ok, report
    (row,) = report.rows
    assert row.host == "localhost"
    assert [c.name for c in row.checks] == list(CHECKS)
    assert all(c.ok is True for c in row.checks), report
    assert row["mlx_cluster_magic"].detail == mlx_cluster_magic.__version__
    assert row["mpiexec"].detail == str(Path(sys.executable).parent / "mpiexec")
    assert row["prted"].detail == str(Path(sys.executable).parent / "prted")
    assert re.fullmatch(r"lo0? mtu \d+", row["mtu"].detail), row["mtu"]


def test_head_versions_read_each_module_version() -> None:
    import ipyparallel
    import mlx.core
    import mpi4py

    assert head_versions() == {
        "mlx": mlx.core.__version__,
        "mpi4py": mpi4py.__version__,
        "ipyparallel": ipyparallel.__version__,
        "mlx_cluster_magic": mlx_cluster_magic.__version__,
    }


def test_report_renders_as_html_text_and_records() -> None:
    report = run_doctor(local(1), timeout=TIMEOUT)
    html = report._repr_html_()
    assert html.count("<tr>") == 2  # header + one host
    for name in CHECKS:
        assert f">{name.replace('_', '_<wbr>')}</th>" in html
    assert "&#10004;" in html and "&#10008;" not in html
    text = repr(report)
    assert "all ready" in text
    assert text.splitlines()[1].split() == ["host", *CHECKS]
    records = report.as_records()
    assert json.loads(json.dumps(records)) == records
    assert {r["check"] for r in records} == set(CHECKS)
    assert all(r["status"] == "ok" and r["host"] == "localhost" for r in records)


def test_local_missing_python_fails_the_python_check(tmp_path: Path) -> None:
    report = run_doctor(local(1), python=str(tmp_path / "no-python"), timeout=TIMEOUT)
    assert not report.ok
    check = report["localhost"]["python"]
    assert check.ok is False
    assert f"{tmp_path / 'no-python'} not found on localhost" in check.detail
    assert "--python" in check.fix
    for pkg in PACKAGES:  # not run without a python: absent, not failed
        assert report["localhost"].get(pkg) is None
    html = report._repr_html_()
    assert "&#10008;" in html and "not checked" in html and "--python" in html


def test_local_version_skew_names_both_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Local checks run in the head's directory, which `python -` puts first on sys.path; leave
    # the checkout so the skewed package on PYTHONPATH is the one found.
    monkeypatch.chdir(tmp_path)
    report = run_doctor(local(1), python=_skew_python(tmp_path), timeout=TIMEOUT)
    check = report["localhost"]["mlx_cluster_magic"]
    assert check.ok is False
    assert "0.0.0-skew" in check.detail and mlx_cluster_magic.__version__ in check.detail
    assert f"mlx_cluster_magic=={mlx_cluster_magic.__version__}" in check.fix
    assert report["localhost"]["mlx"].ok is True


def test_hanging_python_is_cut_off_at_the_timeout_and_killed(tmp_path: Path) -> None:
    hang = tmp_path / "python-hangs"
    mark = f"67.{os.getpid()}"  # this run's own sleep, never another run's
    hang.write_text(f"#!/bin/sh\nexec sleep {mark}\n")
    hang.chmod(0o755)
    t0 = time.monotonic()
    report = run_doctor(local(1), python=str(hang), timeout=2)
    assert time.monotonic() - t0 < 2 + 3
    check = report["localhost"]["python"]
    assert check.ok is False and "did not finish" in check.detail and "2 s" in check.detail
    assert report["localhost"]["mpiexec"].ok is not None  # the shell's findings still count
    left = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and p.info["cmdline"][-1] == mark
    ]
    assert not left, "the hanging python was left running"


@pytest.mark.parametrize("greeting", [b"", b"SSH-2.0-OpenSSH_9.6\r\n"])
def test_ip_check_needs_the_ssh_greeting_not_just_a_connect(greeting: bytes) -> None:
    """A silent listener (what a transparent proxy looks like) is not the host; sshd greets."""
    server = socket.socket()
    try:
        server.bind(("127.0.0.2", 0))
    except OSError:
        server.close()
        pytest.skip("127.0.0.2 is not a loopback address here")
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn)
            if greeting:
                with contextlib.suppress(OSError):
                    conn.sendall(greeting)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        host = Host("127.0.0.2", ("127.0.0.2",))
        t0 = time.monotonic()
        timeout = 1.0  # loopback: the greeting is there at once, or never
        report = run_doctor(Placement((host,), (1,)), ssh=f"ssh -p {port}", timeout=timeout)
        assert time.monotonic() - t0 < timeout * 2 + 3
    finally:
        stop.set()
        thread.join(5)
        server.close()
        for conn in accepted:
            conn.close()
    ip = report["127.0.0.2"]["ip"]
    assert report["127.0.0.2"]["ssh"].ok is False  # no real sshd there either way
    if greeting:
        assert ip.ok is True and "reachable from the head" in ip.detail
    else:
        assert ip.ok is False and "no ssh greeting" in ip.detail, ip
        assert f"127.0.0.2:{port}" in ip.detail


def test_bad_arguments_raise_one_line_errors() -> None:
    for bad in (0, -1.0, "5", True):
        with pytest.raises(MLXClusterError, match="--timeout"):
            run_doctor(local(1), timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(MLXClusterError, match="--python"):
        run_doctor(local(1), python="  ")
    with pytest.raises(MLXClusterError, match="--ssh"):
        run_doctor(local(1), ssh="ssh -F 'unclosed")


# --------------------------------------------------------------------------------- the probe


def test_the_probe_is_a_module_shipped_as_its_own_source() -> None:
    from mlx_cluster_magic.fabric.doctor import probe

    script = probe_script()
    assert Path(probe.__file__).read_text(encoding="utf-8") in script
    assert "exec(" not in script and "compile(" not in script


def test_probe_runs_alone_and_finds_the_same_libmpi_as_the_head(tmp_path: Path) -> None:
    """Run as a host runs it (source on stdin, in a directory without the package) and compare
    its libmpi with the head's search."""
    from mlx_cluster_magic.fabric.doctor import probe
    from mlx_cluster_magic.launch import mpi_job as launch

    mpiexec = launch.find_mpiexec()
    proc = subprocess.run(
        [sys.executable, "-", mpiexec],
        input=Path(probe.__file__).read_text(encoding="utf-8"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@mcmd probe ")]
    info = json.loads(line.split(" ", 2)[2])
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["libmpi"] == launch.find_libmpi(mpiexec) == probe.libmpi_beside(mpiexec)
    assert info["backends"]["mpi"] is True  # MLX found Open MPI through that libmpi
    assert info["macos"] is None  # not a Mac


def test_doctor_and_netif_do_not_import_ipython() -> None:
    # In a fresh interpreter: the package's __init__ loads nothing of the head's on import.
    code = (
        "import importlib, sys\n"
        "for m in ('fabric.netif', 'fabric.doctor', 'fabric.doctor.probe',\n"
        "          'fabric.doctor.host_checks', 'fabric.doctor.report', 'fabric.doctor.advice',\n"
        "          'fabric.doctor.collect'):\n"
        "    importlib.import_module('mlx_cluster_magic.' + m)\n"
        "assert 'IPython' not in sys.modules, 'IPython was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------- rendering


def _wide_report(tmp_path: Path) -> DoctorReport:
    """A real report (a python that is missing, at a long path) spread over six hosts."""
    missing = tmp_path / "a-rather-long-directory-name" / "with" / "nested" / "venv" / "bin"
    report = run_doctor(local(1), python=str(missing / "python3"), timeout=TIMEOUT)
    (row,) = report.rows
    rows = [
        HostCheck(f"mac-studio-{i}.local", list(row.checks), f"10.0.0.{i}") for i in range(1, 7)
    ]
    return DoctorReport(rows, report.python, report.head_versions, 1.0, CHECKS, report.advice)


def test_text_report_is_a_table_of_marks_then_each_problem_in_full(tmp_path: Path) -> None:
    report = _wide_report(tmp_path)
    lines = repr(report).splitlines()
    assert lines[1].split() == ["host", *CHECKS]
    assert all(len(ln) <= 120 for ln in lines[1:8]), lines[1:8]  # the table stays narrow
    assert lines[2].split()[:3] == ["mac-studio-1.local", "ok", "FAIL"]
    assert "backend: mpi" in lines[8]
    fixes = [ln for ln in lines if ln.startswith("    fix: ")]
    assert len(fixes) == 6 and all(report.python in ln for ln in fixes)  # the path in full


def test_html_report_fits_1000_px_with_full_fixes_and_paths_on_hover(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no Chromium at /usr/bin/chromium")
    report = _wide_report(tmp_path)
    html = report._repr_html_()
    assert html.count("<tr>") == 1 + 6
    # the table holds marks only; each detail is on hover, each problem written out below
    assert "title='ssh: local host: no ssh needed'" in html
    assert html.count("mlx-cluster-doctor-problem") == 6
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.set_content(f"<html><body style='margin:8px'>{html}</body></html>")
            sizes = page.evaluate(
                """() => ({
                    page: document.documentElement.scrollWidth,
                    table: document.querySelector('table').getBoundingClientRect().right,
                    problems: [...document.querySelectorAll('.mlx-cluster-doctor-problem')]
                        .map(d => [d.scrollWidth, d.clientWidth, d.innerText]),
                })"""
            )
            page.screenshot(path=str(tmp_path / "doctor-1000px.png"), full_page=True)
        finally:
            browser.close()
    assert sizes["page"] <= 1000 and sizes["table"] <= 1000, sizes
    for scroll, client, text in sizes["problems"]:
        assert scroll <= client, text  # nothing cut off to the side
        assert report.python in text.replace("\n", "")  # the fix with its full path


# --------------------------------------------------------------------------------- advice


def _mac(host: str, version: str = "26.2", ibv: str | None = "ibv") -> macos.HostFacts:
    """A Mac that reports ``version`` and, by default, the RDMA devices of MLX's docs."""
    text = (FIXTURES / "ibv_devices_m3-ultra_mlx-docs.txt").read_text() if ibv == "ibv" else ibv
    return macos.host_facts(host, os_name="Darwin", macos_version=version, ibv_devices=text)


def _cabled_pair(version: str = "26.2") -> tuple[Placement, list[macos.HostFacts]]:
    """The MacBook Pro M5 Max and Mac Studio M3 Ultra captures: one Thunderbolt 5 cable."""
    ibv = (FIXTURES / "ibv_devices_m3-ultra_mlx-docs.txt").read_text()
    facts = [
        macos.host_facts(
            name,
            os_name="Darwin",
            macos_version=version,
            thunderbolt_profile=(FIXTURES / profile).read_text(),
            ibv_devices=ibv,
        )
        for name, profile in (
            ("mbp", "system_profiler-SPThunderboltDataType-json_macbook-pro-m5-max.json"),
            ("studio", "system_profiler-SPThunderboltDataType-json_mac-studio-m3-ultra.json"),
        )
    ]
    hosts = (Host("mbp", ("10.0.0.1",)), Host("studio", ("10.0.0.2",)))
    return Placement(hosts, (1, 1)), facts


def test_advice_can_be_left_out() -> None:
    report = run_doctor(local(1), timeout=TIMEOUT, advice=False)
    assert report.ok and report.advice is None
    assert "backend:" not in repr(report) and "backend: <b>" not in report._repr_html_()


def test_advice_one_machine_is_mpi() -> None:
    advice = advise_backend(local(4), {})
    assert advice == Advice("mpi", "one machine: mpi passes messages through shared memory")


def test_advice_thunderbolt5_pair_with_rdma_is_jaccl() -> None:
    placement, facts = _cabled_pair()
    advice = advise_backend(placement, facts)
    assert advice.backend == "jaccl", advice
    assert "Thunderbolt 5" in advice.reason and "26.2" in advice.reason
    assert advise_backend(placement, {f.host: f for f in facts}) == advice  # by name too


def test_advice_on_thunderbolt4_says_rdma_needs_thunderbolt5_not_broken() -> None:
    placement, facts = _cabled_pair()
    # The same real cable as it would read at Thunderbolt 4's 40 Gb/s (no Thunderbolt 4
    # capture was found): only the link speed differs.
    slow = [
        dataclasses.replace(
            f,
            buses=tuple(
                dataclasses.replace(b, speed="40 Gb/s") if b.connected else b for b in f.buses
            ),
        )
        for f in facts
    ]
    advice = advise_backend(placement, slow)
    assert advice.backend == "ring"
    assert "Thunderbolt 5" in advice.reason and "40 Gb/s" in advice.reason
    assert "nothing is misconfigured" in advice.reason
    assert "broken" not in advice.reason


def test_advice_old_macos_or_rdma_off_or_versions_differ_is_ring_with_the_reason() -> None:
    placement, facts = _cabled_pair()
    old = advise_backend(placement, [dataclasses.replace(facts[0], macos="15.5"), facts[1]])
    assert old.backend == "ring" and "26.2 or later" in old.reason and "mbp has 15.5" in old.reason
    header = "\n".join(
        (FIXTURES / "ibv_devices_m3-ultra_mlx-docs.txt").read_text().splitlines()[:2]
    )
    off = advise_backend(
        placement,
        [facts[0], dataclasses.replace(facts[1], rdma_devices=macos.parse_ibv_devices(header))],
    )
    assert off.backend == "ring" and "RDMA is off on studio" in off.reason
    assert "rdma_ctl enable" in off.reason
    differ = advise_backend(placement, [facts[0], dataclasses.replace(facts[1], macos="26.3")])
    assert differ.backend == "ring" and "mbp 26.2, studio 26.3" in differ.reason


def test_advice_reads_mesh_or_ring_from_mlx_hostfiles() -> None:
    """Cabling from the rdma rows MLX's distributed_config writes (fixtures/hostfiles)."""
    mesh = read_hostfile(HOSTFILES / "jaccl-3.json")
    advice = advise_backend(mesh, [_mac(h.ssh) for h in mesh.hosts])
    assert advice.backend == "jaccl" and "every pair" in advice.reason
    ring = read_hostfile(HOSTFILES / "jaccl-ring-4.json")
    advice = advise_backend(ring, [_mac(h.ssh) for h in ring.hosts])
    assert advice.backend == "jaccl-ring" and "ring, not a full mesh" in advice.reason


def test_advice_without_facts_or_ips_or_macs() -> None:
    ring = read_hostfile(HOSTFILES / "ring-4.json")
    unread = advise_backend(ring, {})
    assert unread.backend == "ring" and "could not read mac1" in unread.reason
    linux = [macos.HostFacts(h.ssh, os="Linux") for h in ring.hosts]
    on_linux = advise_backend(ring, linux)
    assert on_linux.backend == "ring" and "mac1 (Linux)" in on_linux.reason
    no_ips = Placement((Host("a"), Host("b")), (1, 1))
    plain = advise_backend(
        no_ips, [macos.HostFacts("a", os="Linux"), macos.HostFacts("b", os="Linux")]
    )
    assert plain.backend == "mpi" and "a, b has none" in plain.reason


# --------------------------------------------------------------------------------- interfaces


def test_interfaces_from_macos_ifconfig_capture() -> None:
    text = (FIXTURES / "ifconfig-bridge0_mac-mini_mlx-issue-1903.txt").read_text()
    bridge = parse_interfaces(text)["bridge0"]
    assert bridge.mtu == 9000 and "10.25.0.1" in bridge.addresses
    text = (FIXTURES / "ifconfig-a_macbook-pro-16-2021_macos-14.4.txt").read_text()
    ifaces = parse_interfaces(text)
    assert ifaces["en0"].mtu == 1500 and "192.168.2.46" in ifaces["en0"].addresses
    assert ifaces["lo0"].mtu == 16384


def test_interfaces_from_this_machines_ip_command() -> None:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command here (not Linux?)")
    addr = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True)
    link = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    ifaces = parse_interfaces(f"{addr.stdout}@@mcmd links\n{link.stdout}")
    assert ifaces["lo"].mtu == int(Path("/sys/class/net/lo/mtu").read_text())
    assert "127.0.0.1" in ifaces["lo"].addresses


# --------------------------------------------------------------------------------- multi-host


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualCluster]:
    with virtual_macs(3, "10.213.5.0/24", "mcmd") as cluster:
        for host in cluster.hosts:  # a Thunderbolt bridge as it should be
            proc = cluster.netns_exec(host, "ip", "link", "set", "eth0", "mtu", "9000")
            assert proc.returncode == 0, proc.stderr
        yield cluster


@pytest.fixture(scope="module")
def placement(vc: VirtualCluster, tmp_path_factory: pytest.TempPathFactory) -> Placement:
    return read_hostfile(vc.hostfile(tmp_path_factory.mktemp("doctor") / "hosts.json"))


def _doctor(vc: VirtualCluster, placement: Placement, **kw: object) -> DoctorReport:
    t0 = time.monotonic()
    timeout = kw.pop("timeout", TIMEOUT)
    report = run_doctor(placement, ssh=kw.pop("ssh", vc.rsh_agent), timeout=timeout, **kw)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < BOUND, report
    return report


@pytest.mark.multihost
def test_healthy_virtual_cluster_is_all_green(vc: VirtualCluster, placement: Placement) -> None:
    report = _doctor(vc, placement, python=sys.executable)
    assert report.ok, report
    assert [r.host for r in report.rows] == vc.hosts
    for row, ip in zip(report.rows, vc.ips, strict=True):
        assert [c.name for c in row.checks] == list(CHECKS)
        assert all(c.ok is True for c in row.checks), report
        assert f"({row.host})" in row["ssh"].detail  # the host's own hostname answered
        assert ip in row["ip"].detail
        assert row["mtu"].detail == "eth0 mtu 9000"
        assert row["mpiexec"].detail == str(Path(sys.executable).parent / "mpiexec")


@pytest.mark.multihost
def test_unknown_host_name_fails_ssh_with_ssh_error(
    vc: VirtualCluster, placement: Placement
) -> None:
    hosts = (placement.hosts[0], Host("nosuchmac"))
    report = _doctor(vc, Placement(hosts, (1, 1)))
    assert not report.ok
    assert all(report["mac1"][n].ok is True for n in CHECKS), report
    ssh = report["nosuchmac"]["ssh"]
    assert ssh.ok is False
    assert "nosuchmac" in ssh.detail and "Could not resolve hostname" in ssh.detail
    assert "resolves" in ssh.fix and "nosuchmac" in ssh.fix
    assert report["nosuchmac"].get("python") is None  # not checked without ssh
    assert report["nosuchmac"]["ip"].ok is None  # no cluster IP given: a warning
    assert "nosuchmac" in repr(report) and "Could not resolve hostname" in repr(report)


@pytest.mark.multihost
def test_refused_ssh_says_turn_on_remote_login(vc: VirtualCluster) -> None:
    try:
        socket.create_connection((vc.head_ip, 22), timeout=1).close()
        pytest.skip(f"something listens on {vc.head_ip}:22")
    except ConnectionRefusedError:
        pass
    report = _doctor(vc, Placement((Host(vc.head_ip, (vc.head_ip,)),), (1,)))
    row = report[vc.head_ip]
    assert row["ssh"].ok is False
    assert "Connection refused" in row["ssh"].detail
    assert "Remote Login" in row["ssh"].fix
    assert row["ip"].ok is True and "refused" in row["ip"].detail  # it answered


@pytest.mark.multihost
def test_key_not_authorized_says_ssh_copy_id(
    vc: VirtualCluster, placement: Placement, tmp_path: Path
) -> None:
    key = tmp_path / "stranger"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    config = tmp_path / "ssh_config"
    config.write_text(vc.ssh_config.read_text().replace(str(vc.identity), str(key)))
    report = _doctor(vc, placement, ssh=f"ssh -F {config}")
    for host in vc.hosts:
        check = report[host]["ssh"]
        assert check.ok is False and "Permission denied" in check.detail, report
        assert check.fix == f"add your key: ssh-copy-id {host}"
        assert report[host]["ip"].ok is True  # the network is fine


@pytest.mark.multihost
def test_missing_python_fails_the_python_check(vc: VirtualCluster, placement: Placement) -> None:
    report = _doctor(vc, placement, python="/nonexistent/python")
    assert not report.ok
    for host in vc.hosts:
        assert report[host]["ssh"].ok is True
        check = report[host]["python"]
        assert check.ok is False
        assert check.detail == f"/nonexistent/python not found on {host}"
        assert "/nonexistent/python" in check.fix


@pytest.mark.multihost
def test_python_without_mlx_fails_the_mlx_check(vc: VirtualCluster, placement: Placement) -> None:
    python = "/usr/bin/python3"
    if not Path(python).exists() or _has_mlx(python):
        pytest.skip(f"{python} is missing or has mlx")
    report = _doctor(vc, placement, python=python)
    want = head_versions()["mlx"]
    for host in vc.hosts:
        row = report[host]
        assert row["python"].ok in (True, None)  # it runs (maybe another minor version)
        assert row["mlx"].ok is False
        assert "No module named 'mlx'" in row["mlx"].detail and host in row["mlx"].detail
        assert row["mlx"].fix == (
            f"%mlx_cluster setup makes {host}'s environment this kernel's "
            f"(or on {host}: {python} -m pip install 'mlx[cpu]=={want}')"
        )


@pytest.mark.multihost
def test_version_skew_names_both_versions(
    vc: VirtualCluster, placement: Placement, tmp_path: Path
) -> None:
    report = _doctor(vc, placement, python=_skew_python(tmp_path))
    assert not report.ok
    for host in vc.hosts:
        check = report[host]["mlx_cluster_magic"]
        assert check.ok is False
        assert check.detail == (
            f"0.0.0-skew on {host}, head has {mlx_cluster_magic.__version__}"
        ), check
        assert all(report[host][p].ok is True for p in ("mlx", "mpi4py", "ipyparallel"))


@pytest.mark.multihost
def test_cable_down_fails_that_host_only_within_the_timeout(
    vc: VirtualCluster, placement: Placement
) -> None:
    vc.cable_down("mac2")
    try:
        # a cut cable costs the whole timeout; the healthy hosts answer in about a second
        report = _doctor(vc, placement, timeout=2.0)
    finally:
        vc.cable_up("mac2")
    assert not report.ok
    for host in ("mac1", "mac3"):
        assert all(report[host][n].ok is True for n in CHECKS), report
    row = report["mac2"]
    assert row["ssh"].ok is False and "mac2" in row["ssh"].detail
    assert row["ip"].ok is False and vc.ip("mac2") in row["ip"].detail
    assert "cable" in row["ip"].fix and "mac2" in row["ip"].fix


@pytest.mark.multihost
def test_low_mtu_is_a_warning_with_the_fix(vc: VirtualCluster, placement: Placement) -> None:
    assert vc.netns_exec("mac3", "ip", "link", "set", "eth0", "mtu", "1500").returncode == 0
    try:
        report = _doctor(vc, placement)
    finally:
        vc.netns_exec("mac3", "ip", "link", "set", "eth0", "mtu", "9000")
    assert report.ok, report  # a warning does not fail the host
    mtu = report["mac3"]["mtu"]
    assert mtu.ok is None and mtu.detail.startswith("eth0 mtu 1500")
    assert mtu.fix == "on mac3: sudo ip link set dev eth0 mtu 9000"
    assert report["mac1"]["mtu"].ok is True
    assert "#9a6700" in report._repr_html_() and "warn" in repr(report)


@pytest.mark.multihost
def test_routes_by_the_bridge_and_ring_advice_on_healthy_hosts(
    vc: VirtualCluster, placement: Placement
) -> None:
    report = _doctor(vc, placement)
    for host in vc.hosts:
        route = report[host]["route"]
        assert route.ok is True, report
        peers = [h for h in vc.hosts if h != host]
        assert route.detail == "; ".join(f"{p} ({vc.ip(p)}) by eth0" for p in peers)
    assert report.advice is not None and report.advice.backend == "ring"
    assert {h: f.os if f else None for h, f in report.facts.items()} == dict.fromkeys(
        vc.hosts, "Linux"
    )
    assert advise_backend(placement, report.facts) == report.advice
    assert "mac1 (Linux)" in report.advice.reason
    assert "backend: ring" in repr(report) and "backend: <b>ring</b>" in report._repr_html_()


@pytest.mark.multihost
def test_traffic_routed_through_a_second_interface_is_flagged(
    vc: VirtualCluster, placement: Placement
) -> None:
    """mac1 gets a second, non-bridge interface (a veth pair inside its namespace, on a subnet
    of its own, as Wi-Fi would be) and a more specific route that sends mac2's cluster IP out
    by it: the doctor names the interface, the peer and the fix; mac1's other peer and the
    other hosts stay green."""
    mac2 = vc.ip("mac2")
    setup = [
        ("ip", "link", "add", "side0", "type", "veth", "peer", "name", "side1"),
        ("ip", "addr", "add", "10.213.9.1/24", "dev", "side0"),
        ("ip", "link", "set", "side0", "up"),
        ("ip", "link", "set", "side1", "up"),
        ("ip", "route", "add", f"{mac2}/32", "dev", "side0"),
    ]
    try:
        for cmd in setup:
            proc = vc.netns_exec("mac1", *cmd)
            assert proc.returncode == 0, proc.stderr
        report = _doctor(vc, placement)
    finally:
        vc.netns_exec("mac1", "ip", "link", "del", "side0")
    route = report["mac1"]["route"]
    assert route.ok is None, report  # a warning: traffic still arrives, only slower
    assert route.detail == (
        f"traffic from mac1 to mac2 ({mac2}) leaves by side0, not by eth0, "
        f"which holds {vc.ip('mac1')}"
    )
    assert "mac3" not in route.detail  # that peer is still reached by the bridge
    pairs = {(f.host, f.peer): (f.interface, f.ok) for f in report.routes}
    assert pairs[("mac1", "mac2")] == ("side0", False)
    assert pairs[("mac1", "mac3")] == ("eth0", True)
    assert pairs[("mac2", "mac1")] == ("eth0", True) and len(pairs) == 6
    assert f"ip route show to match {mac2}" in route.fix and "side0" in route.fix
    assert report["mac2"]["route"].ok is True and report["mac3"]["route"].ok is True
    # Here side0 leads nowhere (nothing answers behind it), so mac1's own test of the path to
    # mac2 fails, naming the interface it tried; where such a route reaches the peer (Wi-Fi),
    # only the route's warning stays, and a warning does not stop a start.
    peers = report["mac1"]["peers"]
    assert peers.ok is False and f"mac1 -> mac2: {mac2} " in peers.detail, report
    assert "(tried side0)" in peers.detail and "mac3" not in peers.detail
    # mac2 -> mac1 fails too: mac1's answers to mac2 leave by side0.
    failed = sorted((h, c.name) for h, c in report.problems() if c.ok is False)
    assert failed == [("mac1", "peers"), ("mac2", "peers")], report
    assert report["mac3"].ok
    assert ("mac1", route) in report.problems()
    assert "warn mac1 route: traffic from mac1 to mac2" in repr(report)
    assert "side0" in report._repr_html_()
