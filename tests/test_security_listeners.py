"""Every listener survives junk and forgery: the status channel, ``why()``, ``stop()`` and the
doctor's test listeners, attacked as another user on the machine (or a sniffer who read the
status token) would. The cluster keeps working after each attack and ``stop()`` leaves nothing.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import zmq

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.contract import SECRETS_FILE_VAR, STATUS_SECRETS_KEY
from mlx_cluster_magic.fabric import placement as hosts
from mlx_cluster_magic.fabric.doctor import probe
from mlx_cluster_magic.fabric.doctor.collect import HeadListener
from mlx_cluster_magic.observe.record_schema import nesting_ok
from mlx_cluster_magic.observe.status_receiver import StatusReceiver
from mlx_cluster_magic.observe.utilisation import UsageStore
from mlx_cluster_magic.rank.status_sidecar import curve_push

JUNK_DEPTH = b"[" * 65_000


def _wait(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _sniffed(cluster: MLXCluster) -> dict[str, str]:
    """Every secret of the status channel (address, keys, token), read as another process of
    the user can: from the ranks' private secrets file. The worst case: whoever holds them sends
    what a rank would, and the receiver must still check everything."""
    env = psutil.Process(cluster.ranks[0]["pid"]).environ()
    path = os.path.join(os.path.expanduser("~"), env[SECRETS_FILE_VAR])
    with open(path) as f:
        return dict(json.load(f)[STATUS_SECRETS_KEY])


def _address(creds: dict[str, str]) -> tuple[str, int]:
    host, _, port = creds["url"].removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def _push(creds: dict[str, str], *messages: bytes) -> None:
    """Sent as a rank sends its records: CurveZMQ with the ranks' own keys."""
    ctx = zmq.Context()
    sock = curve_push(ctx, creds)
    for m in messages:
        sock.send(m)
    time.sleep(0.3)
    sock.close(linger=2000)
    ctx.term()


def _udp(port: int, *messages: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for m in messages:
            s.sendto(m, ("127.0.0.1", port))


def _datagrams(creds: dict[str, str], *messages: bytes, signed: bool = True) -> None:
    """Sent as a rank sends its notices: each under its HMAC (keyed by the token), unless
    ``signed`` is False (junk from whoever can reach the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for m in messages:
            mac = hmac.digest(creds["token"].encode(), m, "sha256") if signed else b""
            s.sendto(mac + m, _address(creds))


def _forged(token: str, **fields: Any) -> bytes:
    return json.dumps({"token": token, **fields}).encode()


def _still_works(cluster: MLXCluster) -> None:
    """Cells run, and live status follows them: both ranks' request counts move."""
    before = [cluster._run.status.requests(r) or 0 for r in range(2)]  # type: ignore[union-attr]
    cluster.view.execute("answer = 6 * 7")
    assert cluster.view.pull("answer") == [42, 42]
    assert _wait(
        lambda: all(
            (cluster._run.status.requests(r) or 0) > before[r]  # type: ignore[union-attr]
            for r in range(2)
        )
    ), "live status stopped following the ranks"
    assert _wait(lambda: [n["state"] for n in cluster.nodes()] == ["idle", "idle"]), cluster.nodes()
    cluster.snapshot()


@pytest.fixture
def cluster(no_leaks: None) -> Iterator[MLXCluster]:
    c = MLXCluster(n=2).start()
    try:
        yield c
    finally:
        c.stop()


# --------------------------------------------------------------- a real cluster, attacked


def test_junk_on_the_status_port_is_dropped_and_stop_still_stops(ip: Any) -> None:
    """A datagram of 65,000 ``[``, a 1 MB ZMQ message of them, 2 MiB, garbage: each dropped
    and counted, the receiver lives on, ``%%px`` runs; junk queued at stop keeps no process."""
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    creds = _sniffed(cluster)
    deep = b'{"rank": ' + b"[" * 60_000
    _datagrams(creds, JUNK_DEPTH, JUNK_DEPTH, b"\xff\x00garbage", b"", signed=False)
    _datagrams(creds, deep)
    # (the message over the size limit last: ZMQ drops the connection that sends it)
    _push(creds, b"[" * 1_000_000, b"\x00" * 100, b"null", b"{" * (2 << 20))
    reasons = _wait(
        lambda: sum(cluster.dropped_status().values()) >= 8 and cluster.dropped_status()
    )
    assert reasons == {"mac": 4, "token": 3, "nesting": 1}, cluster.dropped_status()
    ip.run_cell_magic("px", "", "z = 6 * 7")
    assert cluster.view.pull("z") == [42, 42]
    _still_works(cluster)
    # queued, not yet read, when stop() begins
    _datagrams(creds, *[JUNK_DEPTH] * 5, signed=False)
    _push(creds, b"[" * 1_000_000)
    cluster.stop()
    assert cluster.state == "stopped"


def test_forged_records_with_the_real_token_are_dropped(cluster: MLXCluster) -> None:
    """Wrong types, huge numbers, ranks and hosts outside the placement: dropped and counted;
    the views, ``why()`` and ``stop()`` keep working."""
    creds = _sniffed(cluster)
    token = creds["token"]
    forged = [
        _forged(token, rank=0, state="busy", busy_s="abc", requests=10**30),
        _forged(token, rank=0, state="busy", busy_s=1.0, requests=10**12),  # leaps ahead
        _forged(token, rank=1, rss_bytes="lots"),
        _forged(token, rank=1, state="sleeping"),
        _forged(token, rank=7, state="idle"),
        _forged(token, rank=-1, state="idle"),
        _forged(token, rank=True, state="idle"),
        _forged(token, rank=0, host="not-a-host-of-ours", host_cpu_percent=99.0),
        _forged(token, rank=0, recorder={"main_thread": "not hex", "recent": [{"shape": "x"}]}),
        _forged(token, rank=0, metrics=[["loss", "high", 1, 0.0]]),
        _forged(token, rank=0, links_down=[[1, 2, 3]]),
        _forged(token, rank=0, pid=-5),
        json.dumps({"rank": 0, "token": token, "state": "busy"}).encode(),  # token not first
    ]
    _push(creds, *forged)
    # (as a notice, the last is well formed: a notice's token is its MAC, put first on arrival)
    _datagrams(creds, *forged[:-1])
    enough = 2 * len(forged) - 1
    reasons = _wait(
        lambda: sum(cluster.dropped_status().values()) >= enough and cluster.dropped_status()
    )
    assert sum(reasons.values()) == enough, reasons
    assert {"field", "requests", "rank", "host", "token"} <= set(reasons), reasons
    assert all(n["host"] != "not-a-host-of-ours" for n in cluster.nodes())
    assert (cluster._run.status.requests(0) or 0) < 1000  # type: ignore[union-attr]
    _still_works(cluster)
    cluster.why(stacks=False)
    cluster.stop()
    assert cluster.state == "stopped"


def test_three_thousand_invented_hosts_do_not_grow_the_usage_store(cluster: MLXCluster) -> None:
    creds = _sniffed(cluster)
    token = creds["token"]
    invented = [
        _forged(token, rank=i % 2, host=f"mac{i}", samples_host=True, host_cpu_percent=50.0,
                cpu_percent=10.0)
        for i in range(3000)
    ]  # fmt: skip
    _push(creds, *invented)
    _datagrams(creds, *invented[:500])
    assert _wait(lambda: cluster.dropped_status().get("host", 0) >= 3500), cluster.dropped_status()
    real = {str(r["host"]) for r in cluster.ranks}
    assert _wait(lambda: set(cluster.utilisation()["host"])) == real
    _still_works(cluster)


def test_why_signals_and_reads_only_what_the_ranks_said(cluster: MLXCluster, tmp_path) -> None:
    """A forged record naming a file and a process of the test's, sent all the while
    ``why()`` runs: the file keeps its content, the process lives; the real stacks come back."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    precious.chmod(0o600)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    creds = _sniffed(cluster)
    token = creds["token"]
    stop = threading.Event()

    def forge() -> None:
        ctx = zmq.Context()
        sock = curve_push(ctx, creds)
        recorder = {"stack_file": str(precious), "pid": bystander.pid, "main_thread": "0x1"}
        while not stop.is_set():
            for rank in (0, 1):
                sock.send(_forged(token, rank=rank, pid=bystander.pid, recorder=recorder))
            time.sleep(0.005)
        sock.close(linger=0)
        ctx.term()

    forger = threading.Thread(target=forge, daemon=True)
    forger.start()
    try:
        time.sleep(0.5)
        report = cluster.why()
        time.sleep(0.3)  # a signal's effect, had one been sent
    finally:
        stop.set()
        forger.join(5)
    try:
        assert precious.read_text() == "keep me\n"
        assert bystander.poll() is None, "why() signalled a process named by a forged record"
    finally:
        bystander.kill()
        bystander.wait()
    assert all(r.stack for r in report.ranks), str(report)
    _still_works(cluster)


def test_a_stack_capture_never_truncates_through_a_link(tmp_path) -> None:
    from mlx_cluster_magic.observe import stack_capture

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    link = tmp_path / "stack.txt"
    link.symlink_to(precious)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert stack_capture.capture(bystander.pid, str(link), timeout=0.5) == ""
        time.sleep(0.2)
        assert precious.read_text() == "keep me\n" and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# --------------------------------------------------------------- the receiver alone


def test_the_receiver_thread_outlives_junk_and_counts_it() -> None:
    receiver = StatusReceiver("127.0.0.1", hosts.local(2))
    try:
        creds = receiver.credentials
        _datagrams(creds, JUNK_DEPTH, signed=False)
        _datagrams(creds, b'{"rank": ' + b"[" * 60_000)
        _push(creds, b"[" * 1_000_000)
        time.sleep(0.3)
        assert receiver._thread.is_alive()
        assert receiver.dropped == 3, receiver.dropped_reasons()
        _datagrams(creds, json.dumps({"rank": 1, "state": "busy", "requests": 1}).encode())
        assert _wait(lambda: receiver.nodes()[1].state == "busy", 2.0)
    finally:
        receiver.close()


def test_nesting_is_measured_without_parsing() -> None:
    record = {"a": [[1, 2], {"b": "[[[{{{"}], "c": 'q"[[["\\', "d": []}
    assert nesting_ok(json.dumps(record).encode())
    assert not nesting_ok(JUNK_DEPTH)
    assert not nesting_ok(b"[" * 13 + b"]" * 13)
    assert nesting_ok(b"[" * 12 + b"]" * 12)
    assert nesting_ok(b'["' + b"\\" * 3 + b'"' + b"[" * 50 + b'"]')  # an escaped quote
    assert not nesting_ok(b'["' + b"\\" * 2 + b'"' + b"[" * 50 + b'"]')  # an escaped backslash
    assert not nesting_ok(b"]]][[[")
    started = time.perf_counter()
    for junk in (b"[]" * 500_000, b'"\\' * 500_000, b"[" * 1_000_000, b'"' * 1_000_000):
        nesting_ok(junk)
    assert time.perf_counter() - started < 5.0  # linear (quadratic would take hours)


def test_the_usage_store_keeps_only_the_clusters_hosts() -> None:
    store = UsageStore(max_hosts=2)
    for i in range(3000):
        store.add(0, {"host": f"mac{i}", "cpu_percent": 1.0})
    assert {p.host for p in store.points()} == {"mac0", "mac1"}
    store.keep_only({"mac1"})
    store.add(0, {"host": "mac7", "cpu_percent": 1.0})
    assert {p.host for p in store.points()} == {"mac1", "mac7"}


# --------------------------------------------------------------- the doctor's listeners


def _silent_and_garbage(port: int, many: int) -> list[socket.socket]:
    conns = []
    for i in range(many):
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        if i % 2:
            c.sendall(os.urandom(200))
        conns.append(c)
    return conns


def test_the_heads_test_listener_takes_only_the_hosts_names() -> None:
    """Silent and garbage connections and invented names neither hold it up nor grow it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = HeadListener("127.0.0.1", port, {"mac1", "mac2"})
    assert listener.error is None
    conns = _silent_and_garbage(port, 40)
    try:
        for batch in range(20):
            _udp(port, *[f"invented{batch}-{i}".encode() for i in range(100)])
            time.sleep(0.01)
        time.sleep(0.1)
        _udp(port, b"mac1", os.urandom(256), b"mac2\n")
        assert _wait(lambda: listener.udp_from == {"mac1", "mac2"}, 5.0), listener.udp_from
        assert listener.connections == 40
    finally:
        for c in conns:
            c.close()
        listener.close()
    assert listener.udp_from == {"mac1", "mac2"} and listener.junk >= 100


def test_the_probe_listener_counts_only_its_peers() -> None:
    """Connections from elsewhere (here 127.0.0.2), silent or sending garbage, neither count
    nor close it early; the peer's own (127.0.0.1) does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = probe.Listener(f"{port}:1:5:127.0.0.1|127.0.0.1")
    others = []
    try:
        for i in range(20):
            c = socket.socket()
            c.bind(("127.0.0.2", 0))
            c.connect(("127.0.0.1", port))
            if i % 2:
                c.sendall(b"\x00garbage" * 100)
            others.append(c)
        time.sleep(0.3)
        assert listener.thread.is_alive() and listener.accepted == 0
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert _wait(lambda: listener.accepted == 1, 4.0)
    finally:
        for c in others:
            c.close()
        found = listener.close()
    assert found["accepted"] == 1 and found["others"] == 20, found
