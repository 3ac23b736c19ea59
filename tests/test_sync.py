"""``%mlx_cluster sync`` on virtual Macs, each with a disk of its own at the destination.

Three hosts in a ring of cables, the notebook's machine off the cables (on the management
network only, as a laptop on Wi-Fi beside a Thunderbolt ring). Every host's ``/srv/mcm-sync``
is a tmpfs of its own (a mount namespace per host): what a host has there, it received. The
tests sync real trees through the magic and read back, on every host, checksums, modes and
links; the skipping of what is there; the resume of an interrupted sync; a cable pulled in the
middle; the shard split against what mlx-lm's ``sharded_load`` loads; each refusal.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic import MLXCluster

from conftest import no_leaks_on, virtual_macs

pytestmark = pytest.mark.multihost

ROOT = Path("/srv/mcm-sync")
RING_PORT = 32470
# Every file under a tree, read on a rank: kind, mode, size, sha256 or link target.
LISTING = """
import hashlib as _h, os as _os, stat as _st, socket as _so
def _listing(root):
    out = {}
    if not _os.path.lexists(root):
        return None
    for folder, dirs, files in _os.walk(root):
        for name in sorted(dirs + files):
            p = _os.path.join(folder, name)
            rel = _os.path.relpath(p, root)
            s = _os.lstat(p)
            if _st.S_ISLNK(s.st_mode):
                out[rel] = ("link", _os.readlink(p))
            elif _st.S_ISDIR(s.st_mode):
                out[rel] = ("dir", oct(_st.S_IMODE(s.st_mode)))
            else:
                out[rel] = ("file", oct(_st.S_IMODE(s.st_mode)), s.st_size, s.st_mtime_ns,
                            _h.sha256(open(p, "rb").read()).hexdigest())
        dirs[:] = [d for d in dirs if not _os.path.islink(_os.path.join(folder, d))]
    return out
def _scribble(path, mtime_ns):
    size = _os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"x" * size)
    _os.utime(path, ns=(mtime_ns, mtime_ns))
"""


def listing(root: Path) -> dict[str, tuple[Any, ...]] | None:
    ns: dict[str, Any] = {}
    exec(LISTING, ns)
    return ns["_listing"](str(root))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def ring() -> Iterator[Any]:
    with virtual_macs(
        3,
        "10.88.1.0/24",
        "synr",
        cables="ring",
        cable_subnet="10.88.65.0/24",
        private_dirs=[str(ROOT)],
        private_size="400m",
    ) as vc:
        yield vc


@pytest.fixture(scope="module")
def cluster(ring: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    from IPython.core.interactiveshell import InteractiveShell

    hostfile = ring.cabled_hostfile(tmp_path_factory.mktemp("sync") / "ring.json", "ring")
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    c = shell.run_line_magic(
        "mlx_cluster", ring.start_line(hostfile, "--no-live-status", ring_port=RING_PORT)
    )
    assert isinstance(c, MLXCluster) and c.running
    c.view.execute(LISTING, block=True)
    try:
        yield shell, c
    finally:
        c.stop()
        magics = shell.magics_manager.registry["MLXClusterMagics"]
        magics.cluster = None
        shell.run_line_magic("unload_ext", "mlx_cluster_magic")
        no_leaks_on(ring)


@pytest.fixture
def tree() -> Iterator[Path]:
    """A fresh source tree on the notebook's machine under /srv/mcm-sync (the head's own)."""
    ROOT.mkdir(parents=True, exist_ok=True)
    path = ROOT / f"tree-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_tree(root: Path, big_mb: int = 8, small: int = 40) -> None:
    """A few large files, many small ones, a nested folder, modes, and a Hugging Face style
    snapshot whose files link to blobs."""
    rng = __import__("random").Random(7)
    (root / "data").mkdir()
    for i in range(2):
        (root / "data" / f"big{i}.bin").write_bytes(rng.randbytes(big_mb << 20))
    (root / "small").mkdir()
    for i in range(small):
        (root / "small" / f"f{i:04d}.txt").write_text(f"file {i}\n" * (i + 1))
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o750)
    os.chmod(root / "small", 0o705)
    hub = root / "hub" / "models--x"
    (hub / "blobs").mkdir(parents=True)
    (hub / "snapshots" / "abc").mkdir(parents=True)
    (hub / "blobs" / "1234").write_bytes(rng.randbytes(5000))
    (hub / "snapshots" / "abc" / "config.json").symlink_to("../../blobs/1234")
    (hub / "latest").symlink_to("snapshots/abc")


def on_hosts(c: MLXCluster, expr: str, targets: Any = None) -> list[Any]:
    view = c.view if targets is None else c.client[targets]
    view.execute(f"_mcm_sync_out = {expr}", block=True)
    return list(view.pull("_mcm_sync_out", block=True))


def host_listings(c: MLXCluster, root: Path) -> list[Any]:
    return on_hosts(c, f"_listing({str(root)!r})")


def mgmt_bytes(vc: Any) -> list[int]:
    """Bytes the head sent each host over the management network (its bridge ports)."""
    return [int(Path(f"/sys/class/net/{v}/statistics/tx_bytes").read_text()) for v in vc.veths]


def sync(shell: Any, line: str) -> Any:
    return shell.run_line_magic("mlx_cluster", f"sync {line}")


# --------------------------------------------------------------------------- tests
def test_no_cluster_running_gets_one_line(ip: Any, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("mlx_cluster", f"sync {tmp_path}")
    assert str(e.value).startswith("no cluster is running: "), str(e.value)


@pytest.mark.parametrize(
    ("cables", "route"),
    [
        ("star-head", "this machine -> {mac1, mac2, mac3}"),
        ("ring-head", "this machine -> mac1 -> mac2 -> mac3"),
    ],
)
def test_a_head_on_the_cables_sends_over_them(tmp_path: Path, cables: str, route: str) -> None:
    """The notebook's machine is cabled too: the star's master, bridging a cable to each host
    (it sends to all at once), or one of a ring's Macs (the bytes go round the ring)."""
    from IPython.core.interactiveshell import InteractiveShell

    from vcluster import VirtualCluster, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    star = cables == "star-head"
    vc = VirtualCluster(
        3,
        subnet="10.88.2.0/24" if star else "10.88.5.0/24",
        prefix="syns" if star else "synh",
        cables=cables,
        cable_subnet="10.88.66.0/24" if star else "10.88.69.0/24",
        bridged=star,
        private_dirs=[str(ROOT)],
        private_size="64m",
    )
    shell = InteractiveShell.instance()
    src = ROOT / f"{cables}-{os.getpid()}"
    try:
        vc.start()
        hostfile = vc.cabled_hostfile(tmp_path / "hosts.json", "mpi" if star else "ring")
        shell.run_line_magic("load_ext", "mlx_cluster_magic")
        with shell.run_line_magic(
            "mlx_cluster", vc.start_line(hostfile, "--no-live-status", ring_port=RING_PORT + 10)
        ) as c:
            c.view.execute(LISTING, block=True)
            src.mkdir(parents=True)
            make_tree(src, big_mb=2, small=5)
            before = mgmt_bytes(vc)
            report = sync(shell, str(src))
            sent = [a - b for a, b in zip(mgmt_bytes(vc), before, strict=True)]
            assert report.route == route, report.route
            # rank 0 runs on this machine, where the tree already is: it is not a target
            assert [h.host for h in report.hosts] == ["mac1", "mac2", "mac3"], repr(report)
            assert host_listings(c, src) == [listing(src)] * 4
            assert max(sent) < (1 << 20), sent  # nothing went over the management network
    finally:
        shutil.rmtree(src, ignore_errors=True)
        magics = shell.magics_manager.registry.get("MLXClusterMagics")
        if magics is not None:
            magics.cluster = None
            shell.run_line_magic("unload_ext", "mlx_cluster_magic")
        try:
            no_leaks_on(vc)
        finally:
            vc.stop()
        assert vc.leftovers() == []


def test_a_tree_reaches_every_host_once_over_the_management_network(
    cluster: tuple[Any, Any], ring: Any, tree: Path
) -> None:
    shell, c = cluster
    make_tree(tree)
    assert host_listings(c, tree) == [None] * 3  # each host's disk is its own
    before = mgmt_bytes(ring)
    report = sync(shell, str(tree))
    after = mgmt_bytes(ring)
    want = listing(tree)
    assert want is not None and len(want) > 40
    assert host_listings(c, tree) == [want] * 3, repr(report)
    assert report.ok and [h.files for h in report.hosts] == [44] * 3, repr(report)
    # the route: in once over the network ssh uses, then host to host over the cables
    assert report.route.count("over the network ssh uses") == 1, report.route
    total = sum(v[2] for v in want.values() if v[0] == "file")
    sent = [a - b for a, b in zip(after, before, strict=True)]
    assert max(sent) > total, (sent, total)
    assert sorted(sent)[:2] < [total // 10] * 2, (sent, total)


def test_an_unchanged_tree_of_1000_files_is_skipped_in_under_a_second(
    cluster: tuple[Any, Any], tree: Path
) -> None:
    shell, c = cluster
    make_tree(tree, big_mb=1, small=1000)
    first = sync(shell, str(tree))
    assert first.ok
    t0 = time.monotonic()
    again = sync(shell, str(tree))
    took = time.monotonic() - t0
    assert took < 1.0, took
    assert [h.files for h in again.hosts] == [0] * 3, repr(again)
    assert [h.skipped for h in again.hosts] == [1004] * 3, repr(again)
    # a changed file (new time) is the only one sent
    os.utime(tree / "small" / "f0007.txt", ns=(1, 1))
    third = sync(shell, str(tree))
    assert [h.files for h in third.hosts] == [1] * 3, repr(third)
    assert host_listings(c, tree) == [listing(tree)] * 3


def test_verify_finds_a_file_changed_with_the_same_size_and_time(
    cluster: tuple[Any, Any], tree: Path
) -> None:
    shell, c = cluster
    make_tree(tree, big_mb=1, small=3)
    sync(shell, str(tree))
    victim = tree / "small" / "f0002.txt"
    st = victim.stat()
    # on the second host only: same bytes count, same time, other content
    on_hosts(c, f"_scribble({str(victim)!r}, {st.st_mtime_ns})", [1])
    assert sync(shell, str(tree)).hosts[1].files == 0  # size and time match: skipped
    report = sync(shell, f"{tree} --verify")
    assert [h.files for h in report.hosts] == [0, 1, 0], repr(report)
    assert host_listings(c, tree) == [listing(tree)] * 3


def test_a_single_file_to_another_path(cluster: tuple[Any, Any], tree: Path) -> None:
    shell, c = cluster
    src = tree / "one.bin"
    src.write_bytes(os.urandom(3 << 20))
    os.chmod(src, 0o640)
    dest = tree / "elsewhere" / "copy.bin"
    report = sync(shell, f"{src} --to {dest}")
    assert report.ok
    got = on_hosts(c, f"_listing({str(tree)!r})")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for g in got:
        assert g["elsewhere/copy.bin"][0:3] == ("file", "0o640", 3 << 20)
        assert g["elsewhere/copy.bin"][4] == digest
        assert "one.bin" not in g


def _interrupt_after(seconds: float) -> threading.Timer:
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    return timer


def test_an_interrupted_sync_leaves_only_temporary_names_and_resumes(
    cluster: tuple[Any, Any], ring: Any, tree: Path
) -> None:
    shell, c = cluster
    (tree / "big.bin").write_bytes(os.urandom(48 << 20))
    ring.shape("80mbit")  # the management network: about 5 s for the file
    try:
        seen: list[str | None] = []
        look = threading.Timer(1.2, lambda: seen.append(c.snapshot().banner))
        look.start()
        t0 = time.monotonic()
        timer = _interrupt_after(2.0)
        with pytest.raises(KeyboardInterrupt):
            sync(shell, str(tree))
        took = time.monotonic() - t0
        timer.cancel()
    finally:
        ring.unshape()
    print(f"interrupt took {took - 2.0:.2f} s after the signal")
    # the status view showed the progress while it ran, and shows nothing of it after
    assert seen and (seen[0] or "").startswith("sync: "), seen
    assert c.snapshot().banner is None
    assert took < 2.0 + 2.0, took
    # nothing is stuck: every engine answers at once
    t1 = time.monotonic()
    assert on_hosts(c, "1") == [1, 1, 1]
    assert time.monotonic() - t1 < 2
    got = host_listings(c, tree)
    for g in got:
        assert "big.bin" not in g, g  # never under its real name half written
    parts = [k for g in got for k in g if k.endswith(".mcmsync")]
    assert parts, got
    have = sum(g[k][2] for g in got for k in g if k.endswith(".mcmsync"))
    report = sync(shell, str(tree))
    assert report.ok, repr(report)
    assert host_listings(c, tree) == [listing(tree)] * 3
    # resumed: the hosts wrote only what they lacked
    print(repr(report), have)
    assert sum(h.bytes for h in report.hosts) == 3 * (48 << 20) - have, repr(report)


def test_a_cable_pulled_mid_transfer_names_the_host_and_the_others_complete(
    cluster: tuple[Any, Any], ring: Any, tree: Path
) -> None:
    shell, c = cluster
    (tree / "big.bin").write_bytes(os.urandom(32 << 20))
    # the chain runs mac1 -> mac2 -> mac3 over the cables: pull the mac2-mac3 one
    k = ring.cable("mac2", "mac3")
    for kk in range(len(ring.cables)):
        ring.shape_cable(kk, "60mbit")
    ns, iface = ring.namespace("mac3"), ring.cable_iface(k, 1 if ring.cables[k][1] == 2 else 0)
    pull = threading.Timer(
        1.5, subprocess.run, (["ip", "netns", "exec", ns, "ip", "link", "set", iface, "down"],)
    )
    try:
        pull.start()
        with pytest.raises(UsageError) as e:
            sync(shell, str(tree))
        pull.join()
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", iface, "up"], check=False)
        for kk in range(len(ring.cables)):
            ring.shape_cable(kk, None)
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and "mac3" in msg and "mac2" in msg, msg
    assert "mac1:" not in msg, msg
    got = host_listings(c, tree)
    assert got[0] == listing(tree) and got[1] == listing(tree), msg
    assert "big.bin" not in got[2]
    time.sleep(1.0)  # the cable's link comes back
    report = sync(shell, str(tree))
    assert report.ok and [h.files for h in report.hosts] == [0, 0, 1], repr(report)
    assert host_listings(c, tree) == [listing(tree)] * 3


def test_bad_input_gets_one_line(cluster: tuple[Any, Any], tree: Path) -> None:
    shell, c = cluster
    cases = {
        f"{tree}/missing": f"sync: {tree}/missing does not exist on this machine",
        f"{tree} --to /proc/mcm-sync": "sync: cannot write /proc/mcm-sync: ",
        f"{tree} --shards pipeline": "sync --shards pipeline: ",
    }
    (tree / "x.txt").write_text("x")
    for line, start in cases.items():
        with pytest.raises(UsageError) as e:
            sync(shell, line)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(start), msg
    # too little space on a host: the hosts' disks hold 400 MiB; a sparse 1 GiB file
    with open(tree / "huge.bin", "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(UsageError) as e:
        sync(shell, str(tree))
    msg = str(e.value)
    assert msg.startswith("sync: too little space: mac1 needs 1.0 GiB at "), msg
    assert "mac2" in msg and "mac3" in msg and "short)" in msg, msg
    assert "huge.bin" not in host_listings(c, tree)[0]


def sharded_model(root: Path, layers: int = 6) -> dict[str, float]:
    """A tiny mlx-lm model whose weights are split over several files as the hub ships big
    ones (the embedding, norm and head in the last file, two layers per file); returns every
    tensor's sum, to compare with what each rank loads."""
    import json

    import mlx.core as mx

    from mlx_cluster_magic.rank.lm import write_tiny_llama

    write_tiny_llama(
        root, model_type="ministral3", num_layers=layers, hidden_size=64, intermediate_size=128
    )
    weights = mx.load(str(root / "model.safetensors"))
    (root / "model.safetensors").unlink()
    files: dict[str, dict[str, Any]] = {}
    for key, value in weights.items():
        layer = key.split("layers.")[1].split(".")[0] if "layers." in key else None
        n = layers // 2 + 1
        part = int(layer) // 2 + 1 if layer is not None else n
        files.setdefault(f"model-{part:05d}-of-{n:05d}.safetensors", {})[key] = value
    weight_map = {}
    for name, tensors in files.items():
        mx.save_safetensors(str(root / name), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return {k: float(v.astype(mx.float32).sum().item()) for k, v in weights.items()}


LOAD = """
def _shard_check(path, sums):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import sharded_load
    model, _ = sharded_load(path, pipeline_group=mx.distributed.init())
    inner = model.model
    bad = []
    for key, value in tree_flatten(model.parameters()):
        m = key.split("layers.")
        if len(m) > 1 and not (inner.start_idx <= int(m[1].split(".")[0]) < inner.end_idx):
            continue
        if abs(float(value.astype(mx.float32).sum().item()) - sums[key]) > 1e-3 * (1 + abs(sums[key])):
            bad.append(key)
    return (inner.start_idx, inner.end_idx, bad)
"""


def test_pipeline_shards_give_each_host_only_what_its_rank_loads(
    cluster: tuple[Any, Any], tree: Path
) -> None:
    shell, c = cluster
    model = tree / "model"
    sums = sharded_model(model)
    every = sorted(p.name for p in model.glob("*.safetensors"))
    assert len(every) == 4
    report = sync(shell, f"{model} --shards pipeline")
    assert report.ok, repr(report)
    got = host_listings(c, model)
    # mlx-lm's split of 6 layers over 3 ranks: rank 0 the last two, rank 2 the first two
    expect = [
        ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"],
        ["model-00002-of-00004.safetensors", "model-00004-of-00004.safetensors"],
        ["model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors"],
    ]
    for g, want in zip(got, expect, strict=True):
        assert sorted(k for k in g if k.endswith(".safetensors")) == want
        assert "config.json" in g and "tokenizer.json" in g
    total = sum(v[2] for v in (listing(model) or {}).values() if v[0] == "file")
    for h in report.hosts:
        assert h.wanted_bytes < 0.75 * total, repr(report)
    # what sharded_load then loads on each rank is exactly the model's own weights
    c.view.execute(LOAD, block=True)
    c.view.push({"_sums": sums}, block=True)
    loaded = on_hosts(c, f"_shard_check({str(model)!r}, _sums)")
    assert loaded == [(4, 6, []), (2, 4, []), (0, 2, [])], loaded
    # tensor: everything everywhere
    report = sync(shell, f"{model} --shards tensor")
    got = host_listings(c, model)
    for g in got:
        assert sorted(k for k in g if k.endswith(".safetensors")) == every


def test_pipeline_shards_follow_a_memory_plan(cluster: tuple[Any, Any], tree: Path) -> None:
    shell, c = cluster
    model = tree / "model"
    sharded_model(model)
    # mac1 (rank 0) may hold a third of what the others hold: fewer layers than the even split
    sizes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    cap = {"mac1": sizes // 3, "mac2": sizes, "mac3": sizes}
    plan = c.plan_pipeline(str(model), memory=cap, headroom=0)
    assert plan.fits and plan.split != [2, 2, 2], plan
    report = sync(shell, f"{model} --shards pipeline")
    assert report.ok, repr(report)
    got = host_listings(c, model)
    for g, r in zip(got, plan.ranks, strict=True):
        assert sorted(k for k in g if k.endswith(".safetensors")) == sorted(r.files), plan


def test_a_host_listens_on_its_given_address_only_and_drops_a_wrong_token(
    cluster: tuple[Any, Any], ring: Any
) -> None:
    import socket

    from mlx_cluster_magic.rank import stream_auth, sync_receiver

    _, c = cluster
    ip, token = ring.ips[0], stream_auth.new_token()  # mac1's address on the head's network
    port = c.client[0].apply_sync(sync_receiver.open_listener, ip, token)
    listening = ring.netns_exec("mac1", "ss", "-ltnH").stdout
    assert f"{ip}:{port} " in listening, listening
    assert f"0.0.0.0:{port} " not in listening and f"*:{port} " not in listening, listening
    ar = c.client[0].apply_async(sync_receiver.receive, token, "/srv/mcm-sync/x", [], {}, [], [])
    with socket.create_connection((ip, port), timeout=5) as wrong:
        wrong.sendall(token.encode()[:48])  # the token itself is no answer to the challenge
        assert wrong.recv(64)  # the challenge
        assert wrong.recv(1) == b""  # then closed without a word
    with socket.create_connection((ip, port), timeout=5) as right:
        writer = stream_auth.RecordWriter(right, stream_auth.prove(right, token))
        writer.write(sync_receiver.HEADER.pack(sync_receiver.END, 0, 0))
        writer.flush()
        result = ar.get(timeout=10)
    assert result["error"] is None and result["files"] == 0, result
