"""``%mlx_cluster setup`` on 3 virtual Macs, each with an empty disk of its own (tmpfs) at the
environment's paths (this kernel's venv, its interpreter's base, this package's source):

- setup from nothing against ``rsync -a`` of the same tree (the same directories, caches and
  the base's own site-packages left out as setup leaves them) to the 3 hosts at once;
- a setup with nothing to do (target < 5 s), against ``rsync -a`` with nothing to send;
- a repair of one package removed on one host (target < half of a setup from nothing).

    python bench/setup_env.py [reps]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

HERE = Path(__file__).resolve().parent
SOURCE = str(HERE.parent / "mlx_cluster_magic")
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
REPAIRED = "pandas"  # about 80 MB, thousands of files


def _roots() -> list[tuple[str, list[str]]]:
    """Each environment directory and what rsync leaves out of it, as setup does."""
    from mlx_cluster_magic.fabric.env_manifest import build_manifest

    return [
        (root.path, ["__pycache__", *(f"/{p}" for p in root.pruned)])
        for root in build_manifest().roots
    ]


def _clear(vc: Any, roots: list[tuple[str, list[str]]]) -> None:
    for h in vc.hosts:
        for path, _ in roots:
            vc.ssh(h, f"find {path} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +")


def _rsync_all(vc: Any, roots: list[tuple[str, list[str]]]) -> float:
    t = time.perf_counter()
    procs = []
    for h in vc.hosts:
        for path, excludes in roots:
            argv = ["rsync", "-a", "-e", f"ssh -F {vc.ssh_config}"]
            argv += [f"--exclude={x}" for x in excludes]
            procs.append(subprocess.Popen([*argv, f"{path}/", f"{h}:{path}/"]))
    for p in procs:
        assert p.wait() == 0
    return time.perf_counter() - t


def _setup(vc: Any) -> tuple[float, Any]:
    from mlx_cluster_magic.cluster.environment import setup

    t = time.perf_counter()
    report = setup(vc.hosts, ssh=vc.rsh_agent, progress=False)
    took = time.perf_counter() - t
    assert report.ok, repr(report)
    return took, report


def bench_setup(reps: int) -> list[dict[str, Any]]:
    reason = benchlib.vhost_skip_reason()
    if reason or shutil.which("rsync") is None:
        print(f"setup: skipped: {reason or 'needs rsync'}", flush=True)
        return []
    from vcluster import VirtualCluster

    roots = _roots()
    dirs = [path for path, _ in roots]
    m: dict[str, list[float]] = {k: [] for k in ("first", "rsync", "noop", "rsync noop", "fix")}
    size = 0
    with VirtualCluster(
        3, subnet="10.241.5.0/24", prefix="stpb", private_dirs=dirs, private_size="3g"
    ) as vc:
        for i in range(reps):
            for f in ("ours", "base") if i % 2 == 0 else ("base", "ours"):
                _clear(vc, roots)
                if f == "ours":
                    took, report = _setup(vc)
                    m["first"].append(took)
                    size = report.rows[0].bytes
                else:
                    m["rsync"].append(_rsync_all(vc, roots))
            # Both leave the hosts complete: nothing to do now, for each.
            m["noop"].append(_setup(vc)[0])
            m["rsync noop"].append(_rsync_all(vc, roots))
            venv = sys.prefix
            vc.ssh(vc.hosts[1], f"rm -rf {venv}/{SITE}/{REPAIRED} {venv}/{SITE}/{REPAIRED}-*")
            m["fix"].append(_setup(vc)[0])
    what = f"{size / 1e6:.0f} MB, 3 hosts"
    return [
        compare(
            f"setup from nothing ({what}) against rsync -a of the same tree to the 3 at once",
            m["first"], m["rsync"], "s", "<= 1.3x", "rsync -a",
        ),
        compare(
            "setup with nothing to do (3 hosts) against rsync -a with nothing to send",
            m["noop"], m["rsync noop"], "s", "< 5 s", "rsync -a, nothing to send",
        ),
        compare(
            f"setup repairing one package ({REPAIRED}) removed on one host, against setup from "
            "nothing",
            m["fix"], m["first"], "s", "< 0.5x", "setup from nothing",
        ),
    ]  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    benchlib.main(bench_setup)
