"""The bytes take the cables: ``setup`` and ``sync`` on a ring of three virtual Macs.

- ``setup`` of this kernel's environment to three Macs in a ring, each with an empty disk of
  its own at the environment's paths, the notebook's machine off the cables on a slow link
  (its side of the management network shaped to 200 Mbit/s, the cables to 1000 Mbit/s), against
  ``rsync -a`` of the same tree to the three at once (target <= 0.5x); the bytes each crossed
  the management network with, per byte of the environment, beside it;
- ``sync`` of a model (safetensors files and their configs) from the Mac that has it (the
  notebook runs on one of the ring's Macs; a running cluster), against mlx-lm's own
  ``mlx_lm.share --path ... --hostfile ...`` (which launches itself with ``mlx.launch`` on the
  ring backend and passes every 100 MB chunk round the ring with ``all_sum``), cables 1000
  Mbit/s (target <= 0.7x).

    python bench/relay.py [reps]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MGMT_MBIT = 200
CABLE_MBIT = 1000
ROOT = Path("/srv/mcm-sync")
MODEL_MB = int(os.environ.get("RELAY_BENCH_MODEL_MB", "256"))
RING_PORT = 32520
SOURCE = str(Path(__file__).resolve().parent.parent / "mlx_cluster_magic")


def _roots() -> list[tuple[str, list[str]]]:
    from mlx_cluster_magic.fabric.env_manifest import build_manifest

    return [
        (root.path, ["__pycache__", *(f"/{p}" for p in root.pruned)])
        for root in build_manifest().roots
    ]


def _shape_head(vc: Any, rate: str | None) -> None:
    """The notebook's one link to the management network (a laptop's Wi-Fi): the head's side of
    the bridge, shared by everything the head sends to the hosts."""
    if rate is None:
        subprocess.run(["tc", "qdisc", "del", "dev", vc.bridge, "root"], check=False)
        return
    subprocess.run(
        ["tc", "qdisc", "replace", "dev", vc.bridge, "root", "tbf", "rate", rate,
         "burst", "256kb", "latency", "50ms"],
        check=True,
    )  # fmt: skip


def _sent(vc: Any) -> int:
    return sum(int(Path(f"/sys/class/net/{v}/statistics/tx_bytes").read_text()) for v in vc.veths)


def _setup_ring(reps: int) -> list[dict[str, Any]]:
    from mlx_cluster_magic.cluster.environment import setup
    from mlx_cluster_magic.fabric.env_manifest import build_manifest

    from vcluster import VirtualCluster

    roots = _roots()
    size = build_manifest().size
    m: dict[str, list[float]] = {"ours": [], "rsync": [], "ours bytes": [], "rsync bytes": []}
    work = Path(benchlib.tmpdir("relay"))
    vc = VirtualCluster(
        3, subnet="10.93.5.0/24", prefix="relrb", cables="ring", cable_subnet="10.93.65.0/24",
        private_dirs=[p for p, _ in roots], private_size="3g",
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        vc.start()
        stack.callback(vc.stop)
        hostfile = vc.cabled_hostfile(work / "ring.json", "ring")
        _shape_head(vc, f"{MGMT_MBIT}mbit")
        for k in range(len(vc.cables)):
            vc.shape_cable(k, f"{CABLE_MBIT}mbit")

        def clear() -> None:
            for h in vc.hosts:
                for path, _ in roots:
                    vc.ssh(h, f"find {path} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +")

        def ours() -> None:
            clear()
            before, t = _sent(vc), time.perf_counter()
            report = setup(hostfile=hostfile, ssh=vc.rsh_agent, progress=False)
            m["ours"].append(time.perf_counter() - t)
            m["ours bytes"].append((_sent(vc) - before) / size)
            assert report.ok and any("over the cable" in n for n in report.notes), repr(report)

        def rsync() -> None:
            clear()
            before, t = _sent(vc), time.perf_counter()
            procs = []
            for h in vc.hosts:
                for path, excludes in roots:
                    argv = ["rsync", "-a", "-e", f"ssh -F {vc.ssh_config}"]
                    argv += [f"--exclude={x}" for x in excludes]
                    procs.append(subprocess.Popen([*argv, f"{path}/", f"{h}:{path}/"]))
            assert all(p.wait() == 0 for p in procs)
            m["rsync"].append(time.perf_counter() - t)
            m["rsync bytes"].append((_sent(vc) - before) / size)

        benchlib.alternate(reps, ours, rsync)
        _shape_head(vc, None)
    what = (
        f"setup of the environment ({size / 1e6:.0f} MB) to 3 virtual Macs in a ring, the "
        f"notebook off the cables (its link {MGMT_MBIT} Mbit/s, cables {CABLE_MBIT} Mbit/s)"
    )
    return [
        compare(
            f"{what}, against rsync -a to the 3 at once",
            m["ours"], m["rsync"], "s", "<= 0.5x", "rsync -a to the 3 at once",
        ),
        compare(
            f"{what}: bytes over the notebook's link per byte of the environment",
            m["ours bytes"], m["rsync bytes"], "x", "report", "rsync -a to the 3 at once",
        ),
    ]  # fmt: skip


def _model(path: Path, total_mb: int) -> int:
    """A model folder as the hub ships one: configs, a tokenizer, four weight files."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 8}))
    (path / "tokenizer.json").write_bytes(os.urandom(2 << 20))
    for i in range(4):
        with open(path / f"model-{i + 1:05d}-of-00004.safetensors", "wb") as f:
            left = (total_mb << 20) // 4
            while left:
                n = min(left, 8 << 20)
                f.write(os.urandom(n))
                left -= n
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _share_hostfile(vc: Any, work: Path) -> Path:
    """The ring hostfile for mlx.launch: this machine as 127.0.0.1 (mlx.launch runs it without
    ssh), the others by their ssh names, every member by its cable addresses."""
    data = json.loads(vc.cabled_hostfile(work / "ring-ours.json", "ring").read_text())
    for h in data["hosts"]:
        if h["ssh"] == "localhost":
            h["ssh"] = "127.0.0.1"
    path = work / "ring-share.json"
    path.write_text(json.dumps(data))
    return path


def _share_ring(reps: int) -> list[dict[str, Any]]:
    from mlx_cluster_magic import MLXCluster

    from vcluster import VirtualCluster

    work = Path(benchlib.tmpdir("share"))
    model = ROOT / f"relay-model-{os.getpid()}"
    m: dict[str, list[float]] = {"ours": [], "share": []}
    vc = VirtualCluster(
        2, subnet="10.93.6.0/24", prefix="relrs", cables="ring-head",
        cable_subnet="10.93.66.0/24", private_dirs=[str(ROOT)],
        private_size=f"{2 * MODEL_MB + 300}m",
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        stack.callback(shutil.rmtree, model, True)
        stack.callback(shutil.rmtree, ROOT / "tmp", True)
        nbytes = _model(model, MODEL_MB)
        vc.start()
        stack.callback(vc.stop)
        for k in range(len(vc.cables)):
            vc.shape_cable(k, f"{CABLE_MBIT}mbit")
        ours_file = vc.cabled_hostfile(work / "ring-ours.json", "ring")
        share_file = _share_hostfile(vc, work)
        cluster = MLXCluster(
            hostfile=ours_file, ssh=vc.rsh_agent, ring_port=RING_PORT, live_status=False
        )
        cluster.start()
        stack.callback(cluster.stop)
        env = dict(os.environ)
        env["PATH"] = f"{benchlib.ssh_wrapper_dir(vc, work)}{os.pathsep}{env['PATH']}"

        def clear() -> None:  # mlx_lm.share writes under --tmpdir, on every Mac, src too
            (ROOT / "tmp").mkdir(exist_ok=True)
            for h in vc.hosts:
                vc.ssh(h, f"rm -rf {model} {ROOT}/tmp && mkdir -p {ROOT}/tmp")

        def ours() -> None:
            clear()
            t = time.perf_counter()
            report = cluster.sync(str(model), progress=False)
            m["ours"].append(time.perf_counter() - t)
            assert report.ok and sum(h.files for h in report.hosts) == 12, repr(report)

        def share() -> None:
            clear()
            t = time.perf_counter()
            # stdin a pipe kept open: with /dev/null mlx.launch's stdin loop spins
            with open(work / "share.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "mlx_lm", "share", "--path", str(model),
                     "--hostfile", str(share_file), "--tmpdir", f"{ROOT}/tmp"],
                    env=env, stdin=subprocess.PIPE, stdout=log, stderr=log,
                )  # fmt: skip
                try:
                    rc = proc.wait(600)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    assert proc.stdin is not None
                    proc.stdin.close()
            m["share"].append(time.perf_counter() - t)
            assert rc == 0, (work / "share.log").read_text()[-2000:]
            for h in vc.hosts:
                got = vc.ssh(h, f"du -sb {model} | cut -f1").stdout.strip()
                assert got.isdigit() and int(got) >= nbytes, (work / "share.log").read_text()[:3000]

        benchlib.alternate(reps, ours, share)
    what = (
        f"sync of a model ({nbytes >> 20} MiB: 4 safetensors files, config, tokenizer) from "
        f"the Mac that has it to the 2 others of a ring of 3 (cables {CABLE_MBIT} Mbit/s; a "
        "running cluster)"
    )
    return [
        compare(
            f"{what}, against mlx-lm's mlx_lm.share on the same ring",
            m["ours"], m["share"], "s", "<= 0.7x",
            "python -m mlx_lm share --path MODEL --hostfile RING (mlx.launch, ring all_sum)",
        ),
    ]  # fmt: skip


def bench_relay(reps: int) -> list[dict[str, Any]]:
    reason = benchlib.vhost_skip_reason()
    if reason or shutil.which("rsync") is None:
        print(f"relay: skipped: {reason or 'needs rsync'}", flush=True)
        return []
    return [*_setup_ring(reps), *_share_ring(reps)]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    benchlib.main(bench_relay)
