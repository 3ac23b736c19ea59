"""``cluster.sync`` on virtual Macs with shaped links, each host with a disk of its own (tmpfs).

- a star whose master is the notebook's machine, bridging one cable per host: sync time against
  bytes per host / cable rate (target <= 1.25x);
- a ring of 3 with the notebook's machine off the cables, its network slower than the cables:
  sync time against bytes / management rate, the bytes crossing it once (target <= 1.3x), and
  against ``rsync -a`` to each host in turn and to all hosts at once (same tree, over the only
  network the notebook's machine shares with the hosts);
- ``--shards pipeline`` on a model of several weight files: bytes each host gets of the model;
- an unchanged second sync of 1,000 small files (target < 1 s);
- peak memory added to every process taking part while a 1 GiB file is synced (target < 100 MiB);
- what the MAC costs: sync's own stream (every record signed and checked) from the head to a
  receiving process over loopback, against the same bytes sent with ``sendfile`` and written as
  they come, with no MAC (what the stream was before), side by side in one run.

The tree: two large files and 1,000 small ones, ``SYNC_BENCH_MB`` MiB in all (default 256: the
machine has 2 cores; the rates are scaled down with it: cables 1 Gbit/s, management 250 Mbit/s).

    python bench/sync.py [reps]
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ROOT = Path("/srv/mcm-sync")
RING_PORT = 32480
CABLE_MBIT = 1000
MGMT_MBIT = 250


def _tree(root: Path, total_mb: int) -> int:
    rng = random.Random(3)
    root.mkdir(parents=True)
    small = root / "small"
    small.mkdir()
    for i in range(1000):
        (small / f"f{i:04d}.txt").write_bytes(rng.randbytes(1024))
    big = (total_mb << 20) - 1000 * 1024
    for i in range(2):
        with open(root / f"big{i}.bin", "wb") as f:
            left = big // 2
            while left:
                n = min(left, 8 << 20)
                f.write(os.urandom(n))
                left -= n
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _clear(vc: Any, path: Path) -> None:
    for h in vc.hosts:
        vc.ssh(h, f"rm -rf {path}")


def _start(vc: Any, hostfile: Path, port: int) -> Any:
    from mlx_cluster_magic import MLXCluster

    cluster = MLXCluster(hostfile=hostfile, ssh=vc.rsh_agent, ring_port=port, live_status=False)
    cluster.start()
    return cluster


def _timed_sync(cluster: Any, src: Path, **kw: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    report = cluster.sync(str(src), progress=False, **kw)
    took = time.perf_counter() - t
    assert report.ok, repr(report)
    return took, report


def _star(reps: int, src: Path, nbytes: int, work: str) -> list[dict[str, Any]]:
    from vcluster import VirtualCluster

    vc = VirtualCluster(
        3, subnet="10.88.4.0/24", prefix="synbs", cables="star-head",
        cable_subnet="10.88.68.0/24", bridged=True, private_dirs=[str(ROOT)],
        private_size=f"{2 * (nbytes >> 20) + 64}m",
    )  # fmt: skip
    times: list[float] = []
    with contextlib.ExitStack() as stack:
        vc.start()
        stack.callback(vc.stop)
        for k in range(len(vc.cables)):
            vc.shape_cable(k, f"{CABLE_MBIT}mbit")
        cluster = _start(vc, vc.cabled_hostfile(Path(work) / "star.json", "mpi"), RING_PORT)
        stack.callback(cluster.stop)
        for _ in range(reps):
            _clear(vc, src)
            took, report = _timed_sync(cluster, src)
            assert report.route == "this machine -> {mac1, mac2, mac3}", report.route
            times.append(took)
    bound = nbytes * 8 / (CABLE_MBIT * 1e6)
    return [
        compare(
            f"sync of {nbytes >> 20} MiB (2 large + 1,000 small files) to 3 virtual Macs, the "
            f"notebook's machine bridging one {CABLE_MBIT} Mbit/s cable to each",
            times, [bound], "s", "<= 1.25x",
            "bytes per host / cable rate (the physical bound)",
        )
    ]  # fmt: skip


def _ring(reps: int, src: Path, nbytes: int, work: str) -> list[dict[str, Any]]:
    from vcluster import VirtualCluster

    vc = VirtualCluster(
        3, subnet="10.88.3.0/24", prefix="synbr", cables="ring",
        cable_subnet="10.88.67.0/24", private_dirs=[str(ROOT)],
        private_size=f"{(nbytes >> 20) + 1200}m",
    )  # fmt: skip
    ours: list[float] = []
    seq: list[float] = []
    par: list[float] = []
    figures: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        vc.start()
        stack.callback(vc.stop)
        cluster = _start(vc, vc.cabled_hostfile(Path(work) / "ring.json", "ring"), RING_PORT + 10)
        stack.callback(cluster.stop)
        # the notebook's one link to the management network (a laptop's Wi-Fi): the head's
        # side of the bridge, shared by everything the head sends to the hosts
        subprocess.run(
            ["tc", "qdisc", "replace", "dev", vc.bridge, "root", "tbf", "rate",
             f"{MGMT_MBIT}mbit", "burst", "256kb", "latency", "50ms"],
            check=True,
        )  # fmt: skip
        for k in range(len(vc.cables)):
            vc.shape_cable(k, f"{CABLE_MBIT}mbit")
        dest = f"{src}/"

        def rsync(host: str) -> list[str]:
            return ["rsync", "-a", "-e", f"ssh -F {vc.ssh_config}", dest, f"{host}:{src}/"]

        def one_ours() -> None:
            _clear(vc, src)
            took, report = _timed_sync(cluster, src)
            assert "over the network ssh uses" in report.route, report.route
            ours.append(took)

        def rsync_in_turn() -> None:
            _clear(vc, src)
            t = time.perf_counter()
            for h in vc.hosts:
                subprocess.run(rsync(h), check=True)
            seq.append(time.perf_counter() - t)

        def rsync_at_once() -> None:
            _clear(vc, src)
            t = time.perf_counter()
            procs = [subprocess.Popen(rsync(h)) for h in vc.hosts]
            assert all(p.wait() == 0 for p in procs)
            par.append(time.perf_counter() - t)

        for _ in range(reps):
            one_ours()
            rsync_in_turn()
            rsync_at_once()
        bound = nbytes * 8 / (MGMT_MBIT * 1e6)
        what = f"{nbytes >> 20} MiB (2 large + 1,000 small files) to a ring of 3 virtual Macs"
        net = f"management {MGMT_MBIT} Mbit/s, cables {CABLE_MBIT} Mbit/s"
        figures += [
            compare(
                f"sync of {what}, the notebook's machine off the cables ({net})",
                ours, [bound], "s", "<= 1.3x",
                "bytes / management rate (the bytes cross the management network once)",
            ),
            compare(
                f"sync of {what} against rsync -a to each host in turn ({net})",
                ours, seq, "s", "report", "rsync -a to each host in turn",
            ),
            compare(
                f"sync of {what} against rsync -a to all hosts at once ({net})",
                ours, par, "s", "report", "rsync -a to the 3 hosts in parallel",
            ),
        ]  # fmt: skip
        vc.unshape()
        subprocess.run(["tc", "qdisc", "del", "dev", vc.bridge, "root"], check=False)
        # an unchanged second sync of 1,000 small files
        small = src / "small"
        cluster.sync(str(small), progress=False)
        again = [_timed_sync(cluster, small)[0] for _ in range(max(reps, 3))]
        figures.append(
            compare(
                "unchanged second sync of 1,000 small files to 3 virtual Macs",
                again,
                [1.0],
                "s",
                "< 1 s",
                "the 1 s target",
            )
        )
        figures.append(_shards(cluster, Path(work)))
        figures.append(_memory(cluster, vc))
    return figures


def _shards(cluster: Any, work: Path) -> dict[str, Any]:
    """A model of 12 layers in 7 weight files, ``--shards pipeline`` over 3 ranks."""
    import json

    import mlx.core as mx

    from mlx_cluster_magic.rank.lm import write_tiny_llama

    model = ROOT / f"bench-model-{os.getpid()}"
    shutil.rmtree(model, ignore_errors=True)
    try:
        write_tiny_llama(
            model, model_type="ministral3", num_layers=12, hidden_size=256, intermediate_size=512
        )
        weights = mx.load(str(model / "model.safetensors"))
        (model / "model.safetensors").unlink()
        files: dict[str, dict[str, Any]] = {}
        for key, value in weights.items():
            layer = key.split("layers.")[1].split(".")[0] if "layers." in key else None
            part = int(layer) // 2 + 1 if layer is not None else 7
            files.setdefault(f"model-{part:05d}-of-00007.safetensors", {})[key] = value
        weight_map = {}
        for name, tensors in files.items():
            mx.save_safetensors(str(model / name), tensors, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
        (model / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        report = cluster.sync(str(model), shards="pipeline", progress=False)
        assert report.ok, repr(report)
        shares = [h.bytes / report.total_bytes for h in report.hosts]
        return compare(
            "--shards pipeline, a 12-layer model in 7 weight files over 3 ranks: share of the "
            "model's bytes each host received",
            shares, [1 / 3], "fraction", "about 1/N", "1/N of the model",
        )  # fmt: skip
    finally:
        shutil.rmtree(model, ignore_errors=True)


PEAK = """
def _mcm_peak(reset):
    if reset:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    fields = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
    return int(fields['VmHWM'].split()[0]) * 1024, int(fields['VmRSS'].split()[0]) * 1024
"""


def _memory(cluster: Any, vc: Any) -> dict[str, Any]:
    """Peak resident memory each process adds while a 1 GiB file is synced."""
    src = ROOT / f"bench-1g-{os.getpid()}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    try:
        with open(src / "one.bin", "wb") as f:
            for _ in range(128):
                f.write(os.urandom(8 << 20))
        ns: dict[str, Any] = {}
        exec(PEAK, ns)
        cluster.view.execute(PEAK, block=True)
        cluster.view.execute("_mcm_before = _mcm_peak(True)[1]", block=True)
        head_before = ns["_mcm_peak"](True)[1]
        _timed_sync(cluster, src)
        cluster.view.execute("_mcm_added = _mcm_peak(False)[0] - _mcm_before", block=True)
        added = [float(a) / 2**20 for a in cluster.view.pull("_mcm_added", block=True)]
        added.append((ns["_mcm_peak"](False)[0] - head_before) / 2**20)
        return compare(
            "peak memory added to each process taking part (3 receiving ranks and the notebook) "
            "while a 1 GiB file is synced to 3 virtual Macs",
            [max(added)], [100.0], "MiB", "< 100 MiB", "the 100 MiB target",
        )  # fmt: skip
    finally:
        _clear(vc, src)
        shutil.rmtree(src, ignore_errors=True)


def _receive_signed(conn: Any, token: str, dest: str, entries: Any, need: Any) -> None:
    from mlx_cluster_magic.rank import sync_receiver

    conn.send(sync_receiver.open_listener("127.0.0.1", token))
    conn.send(sync_receiver.receive(token, dest, entries, need, [], []))


def _receive_plain(conn: Any, dest: str, entries: Any) -> None:
    """The baseline's receiver: headers and bytes read with ``recv_into``, written as they
    come, no MAC (the stream as it was before)."""
    import socket

    from mlx_cluster_magic.rank.stream_auth import recv_exact
    from mlx_cluster_magic.rank.sync_receiver import END, HEADER

    lsock = socket.create_server(("127.0.0.1", 0))
    conn.send(lsock.getsockname()[1])
    sock, _ = lsock.accept()
    buf = memoryview(bytearray(1 << 20))
    while True:
        idx, _start, count = HEADER.unpack(recv_exact(sock, HEADER.size))
        if idx == END:
            break
        with open(os.path.join(dest, entries[idx][1]), "wb") as f:
            while count:
                n = sock.recv_into(buf[: min(count, len(buf))])
                if not n:
                    raise ConnectionError("closed early")
                f.write(buf[:n])
                count -= n
    conn.send({"error": None})


def _send_plain(port: int, src: Path, entries: Any) -> None:
    import socket

    from mlx_cluster_magic.rank.sync_receiver import END, HEADER

    with socket.create_connection(("127.0.0.1", port)) as sock:
        for i, (kind, rel, size, *_rest) in enumerate(entries):
            if kind != "file":
                continue
            sock.sendall(HEADER.pack(i, 0, size))
            with open(src / rel, "rb") as f:
                offset = 0
                while offset < size:
                    offset += sock.sendfile(f, offset, min(1 << 20, size - offset))
        sock.sendall(HEADER.pack(END, 0, 0))


def _one_stream(src: Path, dest: Path, signed: bool) -> float:
    """One transfer of the tree to a receiving process over loopback; seconds from the
    connection to the last file written."""
    import multiprocessing
    import socket

    from mlx_cluster_magic.cluster.sync_sender import _Stream, manifest
    from mlx_cluster_magic.rank import stream_auth, sync_receiver

    shutil.rmtree(dest, ignore_errors=True)
    entries = manifest(src, verify=False)
    need = sync_receiver.survey(str(dest), entries, False, None)["need"]
    for kind, rel, *_rest in entries:
        if kind == "dir" and not signed:
            (dest / rel).mkdir(parents=True, exist_ok=True)
    token = stream_auth.new_token()
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    args = (theirs, token, str(dest), entries, need) if signed else (theirs, str(dest), entries)
    child = multiprocessing.get_context("fork").Process(
        target=_receive_signed if signed else _receive_plain, args=args
    )
    child.start()
    try:
        port = ours.recv()
        t = time.perf_counter()
        if signed:
            sock = socket.create_connection(("127.0.0.1", port))
            stream = _Stream(sock, stream_auth.prove(sock, token), src, entries, need, "bench")
            stream.run()
            sock.close()
            assert stream.error is None, stream.error
        else:
            _send_plain(port, src, entries)
        result = ours.recv()
        took = time.perf_counter() - t
        assert result["error"] is None, result
        return took
    finally:
        child.join(30)
        shutil.rmtree(dest, ignore_errors=True)


def _mac_cost(reps: int, src: Path, nbytes: int, work: str) -> list[dict[str, Any]]:
    signed: list[float] = []
    plain: list[float] = []
    for _ in range(max(reps, 3)):
        plain.append(_one_stream(src, Path(work) / "plain", signed=False))
        signed.append(_one_stream(src, Path(work) / "signed", signed=True))
    mb = nbytes / 1e6
    return [
        compare(
            f"sync's stream of {nbytes >> 20} MiB (2 large + 1,000 small files) to a receiving "
            "process over loopback, every 1 MiB record signed and checked (HMAC-SHA256), "
            "throughput",
            [mb / t for t in signed], [mb / t for t in plain], "MB/s", "report",
            "the same bytes with sendfile and no MAC (the stream before)",
            higher_is_better=True,
        )
    ]  # fmt: skip


def bench_sync(reps: int) -> list[dict[str, Any]]:
    total_mb = int(os.environ.get("SYNC_BENCH_MB", "256"))
    src = ROOT / f"bench-tree-{os.getpid()}"
    shutil.rmtree(src, ignore_errors=True)
    try:
        nbytes = _tree(src, total_mb)
        with benchlib.workdir("mcmb-sync-") as work:
            figures = _mac_cost(reps, src, nbytes, work)
            reason = benchlib.vhost_skip_reason()
            if reason:
                print(f"sync: virtual hosts skipped: {reason}", flush=True)
                return figures
            if shutil.which("rsync") is None:
                print("sync: skipped: needs rsync (Debian package rsync) for the comparison")
                return figures
            figures += _star(reps, src, nbytes, work)
            figures += _ring(reps, src, nbytes, work)
        return figures
    finally:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    benchlib.main(bench_sync)
