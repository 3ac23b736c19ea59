"""``%mlx_cluster setup`` on virtual Macs whose disk at the environment's paths is their own.

Each host mounts an empty tmpfs of its own (a mount namespace per host) at this kernel's venv,
at its interpreter's base (pyenv's tree) and at this package's source (the test environment is
an editable install, whose source setup carries): what a host has there, setup put there. The
tests go from nothing to a right ``all_sum`` through the magics, then a setup with nothing to
do, a repair, an interrupted setup resumed, and each refusal.
"""

from __future__ import annotations

import dataclasses
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
from mlx_cluster_magic.fabric.env_rollout import SetupReport, run_setup
from mlx_cluster_magic.fabric.placement import Host

from conftest import no_leaks_on, release_shell, virtual_macs

pytestmark = pytest.mark.multihost

VENV = sys.prefix
BASE = os.path.realpath(sys.base_prefix)
SOURCE = str(Path(__file__).resolve().parents[1] / "mlx_cluster_magic")
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
RING_PORT = 32480


@pytest.fixture(scope="module")
def macs() -> Iterator[Any]:
    with virtual_macs(
        2, "10.241.1.0/24", "stp", private_dirs=[VENV, BASE, SOURCE], private_size="3g"
    ) as vc:
        yield vc


@pytest.fixture(scope="module")
def shell(macs: Any) -> Iterator[Any]:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mlx_cluster_magic")
    try:
        yield ip
    finally:
        release_shell(ip)
        no_leaks_on(macs)


@pytest.fixture(scope="module")
def hostfile(macs: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return macs.hostfile(tmp_path_factory.mktemp("setup") / "hosts.json")  # type: ignore[no-any-return]


def setup_line(macs: Any, hostfile: Path, *flags: str) -> str:
    return f"setup --hostfile {hostfile} --ssh '{macs.rsh_agent}' {' '.join(flags)}".rstrip()


def on(macs: Any, host: str, command: str) -> str:
    res = macs.ssh(host, command)
    assert res.returncode == 0, res.stderr
    return res.stdout  # type: ignore[no-any-return]


def file_count(macs: Any, host: str) -> int:
    return int(on(macs, host, f"find {VENV} {BASE} {SOURCE} -type f | wc -l").strip())


def test_check_on_bare_hosts_shows_them_missing_and_changes_nothing(
    macs: Any, shell: Any, hostfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile, "--check"))
    assert isinstance(report, SetupReport) and report.checked_only and not report.ok
    m = build_manifest()
    files = sum(1 for r in m.roots for e in r.entries.values() if e.kind != "d")  # and links
    for row in report.rows:
        assert row.python is None and row.error and "no python" in row.error
        assert row.to_send == files and row.bytes == m.size
    text = repr(report)
    assert "mac1" in text and "missing" in text and "%mlx_cluster setup" in text
    assert file_count(macs, "mac1") == 0 and file_count(macs, "mac2") == 0


def test_start_on_bare_hosts_says_setup_fixes_it(macs: Any, shell: Any, hostfile: Path) -> None:
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("mlx_cluster", macs.start_line(hostfile, ring_port=RING_PORT))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("mac1: python: "), msg
    assert "the same on mac2" in msg and "%mlx_cluster setup" in msg


def test_setup_from_nothing_then_start_and_all_sum(
    macs: Any, shell: Any, hostfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.monotonic()
    report = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile))
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert "setup: mac1" in out and " left" in out  # the progress line, then its last
    assert out.rstrip().splitlines()[-1].startswith("setup: sent mac1 ")
    assert report.ok, repr(report)
    assert all(r.python == ".".join(map(str, sys.version_info[:3])) for r in report.rows)
    assert "editable install" in repr(report)
    assert f"{report.rows[0].to_send} files" in repr(report)
    # one transfer, one size: the progress's "of", the last line's "sent" and the table agree
    size = re.search(r"mac1 (\d+\.\d [KMG]B) of (\d+\.\d [KMG]B)", out)
    sent = re.search(r"setup: sent mac1 (\d+\.\d [KMG]B)", out)
    assert size and sent and size[2] == sent[1], out
    assert f"files, {sent[1]}" in repr(report), repr(report)
    print(f"setup from nothing to 2 hosts: {took:.1f} s")
    cluster = shell.run_line_magic(
        "mlx_cluster", macs.start_line(hostfile, "--no-live-status", ring_port=RING_PORT)
    )
    try:
        assert isinstance(cluster, MLXCluster) and cluster.running
        cluster.view.execute(
            "import mlx.core as mx\n"
            "s = mx.distributed.all_sum(mx.arange(4, dtype=mx.float32) * "
            "(mx.distributed.init().rank() + 1)).tolist()",
            block=True,
        )
        assert cluster.view["s"] == [[0.0, 3.0, 6.0, 9.0]] * 2
        # The cluster's own setup, on its hosts, and the magic on the running cluster's.
        assert cluster.setup(check=True, progress=False).ok
        assert shell.run_line_magic("mlx_cluster", "setup --check").ok
    finally:
        shell.run_line_magic("mlx_cluster", "stop")


def test_second_setup_has_nothing_to_do(macs: Any, shell: Any, hostfile: Path) -> None:
    report = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile))
    assert report.ok
    assert [(r.to_send, r.bytes, r.removed) for r in report.rows] == [(0, 0, 0), (0, 0, 0)]


def test_repair_after_a_package_is_removed_on_one_host(
    macs: Any, shell: Any, hostfile: Path
) -> None:
    on(macs, "mac2", f"rm -rf {VENV}/{SITE}/mpi4py {VENV}/{SITE}/mpi4py-*.dist-info")
    on(macs, "mac1", f"echo stray > {VENV}/{SITE}/stray.txt && mkdir -p {VENV}/{SITE}/junk/a")
    # Outside the environment (the base's own site-packages, which the venv does not see).
    on(macs, "mac1", f"mkdir -p {BASE}/{SITE} && echo keep > {BASE}/{SITE}/keep.txt")
    check = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile, "--check"))
    assert not check.ok
    row1, row2 = check.rows
    assert "mpi4py" in row2.differ and row2.differ["mpi4py"][0] is None
    assert row1.removed == 2 and row1.to_send == 0
    assert "mpi4py missing" in repr(check)
    report = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile))
    assert report.ok
    assert report.rows[0].to_send == 0 and report.rows[1].to_send > 0
    assert on(macs, "mac1", f"ls {VENV}/{SITE} | grep -c -e stray -e junk || true").strip() == "0"
    assert on(macs, "mac1", f"cat {BASE}/{SITE}/keep.txt").strip() == "keep"


def test_verify_finds_a_file_changed_behind_the_same_size_and_mtime(
    macs: Any, shell: Any, hostfile: Path
) -> None:
    target = f"{VENV}/{SITE}/ipyparallel/__init__.py"
    # Same size and mtime, different bytes: only the hashes tell.
    on(
        macs,
        "mac1",
        f"T={target}; touch -r $T /tmp/stp-ref-$$ && "
        f"sed -i 's/import/IMPORT/' $T && touch -r /tmp/stp-ref-$$ $T && rm /tmp/stp-ref-$$",
    )
    plain = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile, "--check"))
    assert plain.rows[0].to_send == 0
    verified = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile, "--verify"))
    assert verified.rows[0].to_send == 1 and verified.rows[1].to_send == 0
    assert "IMPORT" not in on(macs, "mac1", f"cat {target}")


def test_interrupted_setup_leaves_no_half_file_and_resumes(
    macs: Any, shell: Any, hostfile: Path
) -> None:
    big = ["transformers", "pandas", "playwright"]
    on(macs, "mac1", " ".join(["rm -rf", *(f"{VENV}/{SITE}/{p}" for p in big)]))
    stage = f"{VENV}/{STAGING}"

    def interrupt_once_bytes_arrive() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = macs.ssh("mac1", f"du -sk {stage} 2>/dev/null | cut -f1").stdout.strip()
            if got.isdigit() and int(got) > 5_000:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=interrupt_once_bytes_arrive, daemon=True)
    watcher.start()
    with pytest.raises(UsageError, match="interrupted.*run setup again to resume"):
        shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile))
    watcher.join()
    # Nothing of ours still runs (ssh, the head's tar), on the head or the host.
    mine = subprocess.run(
        ["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True
    ).stdout.splitlines()
    assert [p for p in mine if " ssh " in f" {p} " or " tar " in f" {p} "] == []
    # (the brackets keep pgrep from finding the shell that runs it)
    assert on(macs, "mac1", f"sleep 1; pgrep -f '[t]ar -x -p -o -f - -C {VENV}' || true") == ""
    # What arrived is staged; no final name holds a partial file.
    staged = int(on(macs, "mac1", f"find {stage} -type f | wc -l").strip())
    assert staged > 0
    check = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile, "--check"))
    manifest = build_manifest()
    venv = next(r for r in manifest.roots if r.role == "venv")
    wrong = on(
        macs,
        "mac1",
        f"cd {VENV}/{SITE} && find {' '.join(p for p in big)} -type f 2>/dev/null | head -50",
    ).split()
    for rel in wrong:  # anything under a final name is complete
        size = on(macs, "mac1", f"stat -c %s {VENV}/{SITE}/{rel}").strip()
        assert int(size) == venv.entries[f"{SITE}/{rel}"].size
    assert check.rows[0].to_send > 0
    report = shell.run_line_magic("mlx_cluster", setup_line(macs, hostfile))
    assert report.ok
    # The resumed run sent less than the whole of what was missing.
    missing = sum(
        e.size
        for rel, e in venv.entries.items()
        if e.kind == "f" and rel.split("/")[3:4] in [[p] for p in big]
    )
    assert report.rows[0].bytes < missing
    assert on(macs, "mac1", f"ls -a {VENV} | grep -c partial || true").strip() == "0"


def test_setup_api_and_plain_function(macs: Any, shell: Any) -> None:
    from mlx_cluster_magic.cluster.environment import setup

    report = setup(["mac1", "mac2"], ssh=macs.rsh_agent, check=True, progress=False)
    assert report.ok and len(report.rows) == 2
    line = f"setup --hosts mac1,mac2 --ssh '{macs.rsh_agent}' --check"
    report = shell.run_line_magic("mlx_cluster", line)
    assert report.ok and [r.host for r in report.rows] == ["mac1", "mac2"]


def test_a_different_architecture_is_refused_before_anything_moves(macs: Any) -> None:
    on(macs, "mac1", f"rm -rf {VENV}/{SITE}/mpi4py")
    head = dataclasses.replace(build_manifest(), machine="arm64")
    with pytest.raises(Exception) as e:
        run_setup([Host("mac1"), Host("mac2")], ssh=macs.rsh_agent, manifest=head)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("mac1 is Linux x86_64, this kernel runs on Linux arm64")
    assert "set up hosts of the same kind" in lines[0]
    assert on(macs, "mac1", f"ls {VENV}/{SITE} | grep -c '^mpi4py$' || true").strip() == "0"
    run_setup([Host("mac1")], ssh=macs.rsh_agent)


@pytest.fixture(scope="module")
def cramped() -> Iterator[Any]:
    """Two hosts with a small disk at the environment's paths."""
    with virtual_macs(
        2, "10.241.2.0/24", "stpd", private_dirs=[VENV, BASE, SOURCE], private_size="64m"
    ) as vc:
        yield vc


def test_too_little_disk_and_a_read_only_path_are_refused_in_one_line_each(
    cramped: Any, tmp_path: Path
) -> None:
    # A read-only disk at the venv's path on mac1: the ssh user cannot write there.
    on(cramped, "mac1", f"mount -o remount,ro {VENV}")
    hostfile = cramped.hostfile(tmp_path / "hosts.json")
    from mlx_cluster_magic.cluster.environment import setup
    from mlx_cluster_magic.fabric.env_manifest import SetupRefused

    t0 = time.monotonic()
    with pytest.raises(SetupRefused) as e:
        setup(hostfile=hostfile, ssh=cramped.rsh_agent, progress=False)
    assert time.monotonic() - t0 < 30
    lines = str(e.value).splitlines()
    assert any(
        ln.startswith(f"mac1 cannot write {VENV}") and "sudo mkdir -p" in ln for ln in lines
    ), lines
    disk = [ln for ln in lines if "needs" in ln and "free space there" in ln]
    assert {ln.split()[0] for ln in disk} == {"mac1", "mac2"}, lines
    for host in ("mac1", "mac2"):
        assert file_count(cramped, host) == 0
        assert "partial" not in on(cramped, host, f"ls -a {VENV} {BASE}")


def test_an_unreachable_host_is_named(macs: Any) -> None:
    with pytest.raises(Exception, match=r"^nosuchmac: ssh failed .*ssh nosuchmac true"):
        run_setup([Host("nosuchmac")], ssh=macs.rsh_agent)
