"""Broadcast, sync and the links' TCP measure against a stranger: on the network (a sniffed
token, silent connections, a changed byte) and on the host (a second local user who owns the
destination and plants links in it).

Two local ranks; the stranger is a throwaway user made with ``useradd`` for this module and
removed after. Each attack is made the way a stranger would make it, against the ranks' real
listeners; then the real transfer must still arrive whole.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mlx_cluster_magic import MLXCluster, MLXClusterError

STRANGER = "mcmS-stranger"
WORK = Path("/tmp/mcmS-streams")


@pytest.fixture(scope="module")
def stranger() -> Iterator[int]:
    """A second local user (uid): owns the hostile destinations."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a second local user")
    subprocess.run(["userdel", STRANGER], capture_output=True, check=False)
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", STRANGER], check=True
    )
    try:
        yield pwd.getpwnam(STRANGER).pw_uid
    finally:
        subprocess.run(["userdel", STRANGER], check=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[MLXCluster]:
    with MLXCluster(n=2, live_status=False) as c:
        yield c


@pytest.fixture
def work() -> Iterator[Path]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(mode=0o755)
    try:
        yield WORK
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


# --------------------------------------------------------------------------- links at the host
def _root_only(work: Path) -> tuple[Path, Path]:
    """What the stranger aims at: a root-only folder and a root-owned 0600 file, outside the
    destination."""
    secret_dir = work / "root-only"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "keep").write_text("root's\n")
    secret_file = work / "root-file"
    secret_file.write_text("root's own bytes\n")
    secret_file.chmod(0o600)
    return secret_dir, secret_file


def _untouched(secret_dir: Path, secret_file: Path) -> None:
    assert stat.S_IMODE(secret_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in secret_dir.iterdir()) == ["keep"]
    assert secret_file.read_text() == "root's own bytes\n"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def _source(work: Path) -> tuple[Path, int, int]:
    """The tree synced: a folder ``sub`` with a file, and a file ``file.bin``."""
    src = work / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "inside.txt").write_text("inside\n")
    (src / "file.bin").write_bytes(b"\x01" * 5000)
    st = (src / "file.bin").stat()
    return src, st.st_size, st.st_mtime_ns


def _plant(folder: Path, name: str, target: Path, owner: int) -> None:
    (folder / name).symlink_to(target)
    os.lchown(folder / name, owner, owner)


def test_a_destination_another_user_owns_is_refused_and_its_links_never_followed(
    cluster: MLXCluster, stranger: int, work: Path
) -> None:
    secret_dir, secret_file = _root_only(work)
    src, size, mtime = _source(work)
    hostile = work / "hostile"
    hostile.mkdir(mode=0o755)
    os.chown(hostile, stranger, stranger)
    rank_pid = cluster.client[0].apply_sync(os.getpid)
    _plant(hostile, "sub", secret_dir, stranger)
    _plant(hostile, "file.bin", secret_file, stranger)
    _plant(hostile, f".file.bin.{size}-{mtime}.mcmsync", secret_file, stranger)
    _plant(hostile, f".probe-{rank_pid}.mcmsync", secret_file, stranger)
    with pytest.raises(MLXClusterError) as e:
        cluster.sync(str(src), str(hostile), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{hostile} belongs to user {STRANGER}" in msg, msg
    assert "chown" in msg, msg
    _untouched(secret_dir, secret_file)
    # the same below a folder of ours: a folder in it that the stranger owns
    ours = work / "ours"
    (ours / "sub").mkdir(parents=True)
    os.chown(ours / "sub", stranger, stranger)
    _plant(ours / "sub", "inside.txt", secret_file, stranger)
    with pytest.raises(MLXClusterError) as e:
        cluster.sync(str(src), str(ours), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{ours}/sub belongs to user {STRANGER}" in msg, msg
    _untouched(secret_dir, secret_file)


def test_links_in_the_destination_are_replaced_never_written_through(
    cluster: MLXCluster, work: Path
) -> None:
    """Links of its own in a destination this user owns (an older tree's, or made by root):
    where the tree has a folder or a file, the link is replaced; nothing outside changes."""
    secret_dir, secret_file = _root_only(work)
    src, size, mtime = _source(work)
    dest = work / "dest"
    dest.mkdir()
    os.symlink(secret_dir, dest / "sub")
    os.symlink(secret_file, dest / "file.bin")
    os.symlink(secret_file, dest / f".file.bin.{size}-{mtime}.mcmsync")  # a resumable part?
    report = cluster.sync(str(src), str(dest), progress=False)
    assert report.ok, repr(report)
    _untouched(secret_dir, secret_file)
    assert (
        not (dest / "sub").is_symlink() and (dest / "sub" / "inside.txt").read_text() == "inside\n"
    )
    assert not (dest / "file.bin").is_symlink()
    assert (dest / "file.bin").read_bytes() == b"\x01" * 5000


# --------------------------------------------------------------------------- on the network
def _recorded_proof(token: str) -> bytes:
    """What a sniffer saw the real sender answer on another connection with this token."""
    from mlx_cluster_magic.rank import stream_auth

    lsock = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def listen() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(os.urandom(stream_auth.NONCE_BYTES))
            got.append(stream_auth.recv_exact(conn, stream_auth.NONCE_BYTES + 32))

    t = threading.Thread(target=listen)
    t.start()
    with socket.create_connection(lsock.getsockname()) as s:
        stream_auth.prove(s, token)
    t.join(5)
    lsock.close()
    return got[0]


def _refused(port: int, first: bytes) -> None:
    """A stranger connects and sends ``first``: closed without a word."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        s.sendall(first)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass


def test_a_stranger_with_the_sniffed_token_or_answer_is_refused_and_the_transfer_is_whole(
    cluster: MLXCluster,
) -> None:
    from mlx_cluster_magic.rank.broadcast_receiver import open_listener, receive_broadcast

    token = secrets.token_hex(32)
    port = cluster.client[0].apply_sync(open_listener, "127.0.0.1", token)
    forged = np.full(4, 666, dtype="<f4").tobytes()
    ar = cluster.view.apply_async(receive_broadcast, "x", (4,), "<f4", False, token, 0)
    _refused(port, token.encode() + forged)  # the token, had it crossed the wire in clear
    ar.wait(0.5)
    assert not ar.ready(), "the root took a stranger's stream"
    from mlx_cluster_magic.rank import stream_auth

    _refused(port, _recorded_proof(token) + forged)  # an answer seen on another connection
    ar.wait(0.5)
    assert not ar.ready(), "the root took a stranger's stream"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        writer = stream_auth.RecordWriter(conn, stream_auth.prove(conn, token))
        writer.write(np.arange(4, dtype="<f4").tobytes())
        writer.flush()
        ar.get(timeout=30)
    assert [v.tolist() for v in cluster.view["x"]] == [[0.0, 1.0, 2.0, 3.0]] * 2


def test_a_changed_byte_is_refused_without_verify(cluster: MLXCluster, work: Path) -> None:
    """A man in the middle who changes one byte of the stream (the sender holds the token):
    the host refuses the stream and writes nothing under the file's name."""
    from mlx_cluster_magic.cluster.sync_sender import manifest
    from mlx_cluster_magic.rank import stream_auth, sync_receiver

    src, _size, _mtime = _source(work)
    entries = manifest(src, verify=False)
    dest = work / "dest"
    need = cluster.client[0].apply_sync(sync_receiver.survey, str(dest), entries, False, None)
    token = stream_auth.new_token()
    port = cluster.client[0].apply_sync(sync_receiver.open_listener, "127.0.0.1", token)
    ar = cluster.client[0].apply_async(
        sync_receiver.receive, token, str(dest), entries, need["need"], [], []
    )
    index = next(i for i, e in enumerate(entries) if e[1] == "file.bin")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        key = stream_auth.prove(conn, token)
        record = bytearray()

        class Tap:  # the wire between the sender and the host, where one byte changes
            def sendall(self, data: bytes) -> None:
                record.extend(data)

        writer = stream_auth.RecordWriter(Tap(), key)  # type: ignore[arg-type]
        writer.write(sync_receiver.HEADER.pack(index, 0, 5000) + b"\x01" * 5000)
        writer.write(sync_receiver.HEADER.pack(sync_receiver.END, 0, 0))
        writer.flush()
        record[100] ^= 0xFF
        conn.sendall(bytes(record))
        result = ar.get(timeout=30)
    assert result["error"] and "failed its check" in result["error"], result
    assert not (dest / "file.bin").exists()


def _hold_silent(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def test_six_silent_connections_do_not_hold_back_the_real_one(cluster: MLXCluster) -> None:
    from mlx_cluster_magic.rank import stream_auth
    from mlx_cluster_magic.rank.broadcast_receiver import open_listener, receive_broadcast

    token = stream_auth.new_token()
    port = cluster.client[0].apply_sync(open_listener, "127.0.0.1", token)
    ar = cluster.view.apply_async(receive_broadcast, "y", (3,), "<f4", False, token, 0)
    silent = _hold_silent(port, 6)
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            writer = stream_auth.RecordWriter(conn, stream_auth.prove(conn, token))
            writer.write(np.ones(3, dtype="<f4").tobytes())
            writer.flush()
            ar.get(timeout=30)
        took = time.monotonic() - t0
    finally:
        for s in silent:
            s.close()
    assert took < 3.0, f"the real sender waited {took:.1f} s behind silent connections"
    assert [v.tolist() for v in cluster.view["y"]] == [[1.0, 1.0, 1.0]] * 2


def test_a_sync_host_takes_its_upstream_through_six_silent_connections(
    cluster: MLXCluster, work: Path
) -> None:
    from mlx_cluster_magic.cluster.sync_sender import _Stream, manifest
    from mlx_cluster_magic.rank import stream_auth, sync_receiver

    src, _size, _mtime = _source(work)
    entries = manifest(src, verify=False)
    dest = work / "dest"
    need = cluster.client[0].apply_sync(sync_receiver.survey, str(dest), entries, False, None)
    token = stream_auth.new_token()
    port = cluster.client[0].apply_sync(sync_receiver.open_listener, "127.0.0.1", token)
    ar = cluster.client[0].apply_async(
        sync_receiver.receive, token, str(dest), entries, need["need"], [], []
    )
    silent = _hold_silent(port, 6)
    t0 = time.monotonic()
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        stream = _Stream(conn, stream_auth.prove(conn, token), src, entries, need["need"], "me")
        stream.run()
        result = ar.get(timeout=30)
        took = time.monotonic() - t0
        conn.close()
    finally:
        for s in silent:
            s.close()
    assert stream.error is None and result["error"] is None, (stream.error, result)
    assert took < 3.0, f"the upstream waited {took:.1f} s behind silent connections"
    assert (dest / "file.bin").read_bytes() == b"\x01" * 5000
    assert (dest / "sub" / "inside.txt").read_text() == "inside\n"


def _listening_ports(pids: set[int]) -> set[int]:
    import psutil

    out = set()
    for c in psutil.net_connections(kind="tcp4"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip == "127.0.0.1":
            out.add(c.laddr.port)
    return out


def test_a_wrong_token_does_not_abort_a_link_measure(cluster: MLXCluster) -> None:
    """A stranger reaches the measuring listener first with a wrong answer: refused, and the
    real peer's stream is measured."""
    from mlx_cluster_magic.rank.link_probe import run_plan

    pids = set(cluster.client[:].apply_sync(os.getpid))
    ports_before = _listening_ports(pids)
    step = {"a": 0, "b": 1, "mlx": False, "tcp_ip": "127.0.0.1", "token": secrets.token_hex(32)}
    plan = {"steps": [step], "seconds": 0.3, "max_bytes": 1 << 20}
    listening = cluster.client[1].apply_async(run_plan, plan)  # rank 1 opens the listener
    deadline = time.monotonic() + 10
    while not (new := _listening_ports(pids) - ports_before) and time.monotonic() < deadline:
        time.sleep(0.01)
    (port,) = new
    with socket.create_connection(("127.0.0.1", port), timeout=5) as wrong:
        wrong.sendall(b"x" * 64)  # then it waits, connected
        sending = cluster.client[0].apply_async(run_plan, plan)  # the real peer, second
        (result,) = sending.get(timeout=30)
    listening.get(timeout=30)
    assert "tcp_error" not in result, result
    assert result["tcp_gbit_s"] > 0, result
