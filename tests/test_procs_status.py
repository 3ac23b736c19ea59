"""Process safety and the head's status channel, without a cluster: real processes, real ZMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import zmq

from mlx_cluster_magic.fabric import placement as hosts
from mlx_cluster_magic.launch import processes as procs
from mlx_cluster_magic.observe.status_receiver import MAX_MESSAGE_BYTES, StatusReceiver


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_tracked_process_is_never_confused_with_a_reused_pid() -> None:
    proc = _sleeper()
    t = procs.Tracked.of(proc.pid)
    assert t is not None and t.alive()
    impostor = procs.Tracked(proc.pid, t.started - 100.0)  # same pid, another start time
    assert impostor.process() is None
    procs.reap([impostor], grace=0.2)
    assert proc.poll() is None, "a process with another start time was signalled"
    procs.reap([t], grace=2.0)
    assert proc.wait(5) is not None
    assert not t.alive()


def test_reap_kills_what_ignores_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    t0 = time.monotonic()
    procs.reap(procs.track([proc.pid]), grace=0.5)
    # It ignores SIGTERM and sleeps 60 s: gone within 3 s means SIGKILL. (The return code is
    # -9, or 0 when reap collected its own child first and Popen finds nothing left to wait.)
    assert proc.wait(5) in (-9, 0)
    assert time.monotonic() - t0 < 3
    assert not psutil.pid_exists(proc.pid)


def test_reap_leaves_no_child_of_a_process_still_forking(tmp_path) -> None:
    """A controller stopped while it forks its schedulers: every child it had forked when it
    was signalled goes too, though none existed when it was tracked."""
    pids = tmp_path / "children"
    forker = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "for _ in range(200):\n"
         "    c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
         f"    open({str(pids)!r}, 'a').write(f'{{c.pid}}\\n')\n"
         "    time.sleep(0.01)\n"],
    )  # fmt: skip
    tracked = procs.track([forker.pid])
    deadline = time.monotonic() + 10
    while (not pids.exists() or len(pids.read_text().split()) < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert time.monotonic() < deadline
    procs.reap(tracked, grace=2)
    children = [int(p) for p in pids.read_text().split()]

    def alive() -> list[int]:  # an exited child whose parent is gone may stay a zombie a while
        return [p for p in children if (t := procs.Tracked.of(p)) is not None and t.alive()]

    deadline = time.monotonic() + 2
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alive() == [], f"{len(alive())} of {len(children)} children outlived their parent"
    assert forker.poll() is not None


def test_watchdog_stops_tracked_processes_when_its_parent_is_gone() -> None:
    private = tempfile.mkdtemp(prefix=procs.PRIVATE_PREFIX)
    proc = _sleeper()
    # the watchdog's stdin is its parent's pipe: closing it without "stop" is the parent dying
    dog = subprocess.Popen(
        [sys.executable, "-m", "mlx_cluster_magic.launch.processes", private, str(os.getpid())],
        stdin=subprocess.PIPE,
    )
    assert dog.stdin is not None
    tracked = procs.Tracked.of(proc.pid)
    assert tracked is not None
    dog.stdin.write(tracked.line().encode())
    dog.stdin.close()
    assert dog.wait(10) == 0
    assert proc.wait(5) is not None
    assert not os.path.exists(private)


def test_watchdog_stop_leaves_everything_alone() -> None:
    private = tempfile.mkdtemp(prefix=procs.PRIVATE_PREFIX)
    proc = _sleeper()
    try:
        dog = procs.Watchdog(private, procs.track([proc.pid]))
        dog_pid = dog.pid
        dog.close()
        assert (dog_pid is not None and not psutil.pid_exists(dog_pid)) or (
            psutil.Process(dog_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert proc.poll() is None and os.path.isdir(private)
    finally:
        proc.kill()
        proc.wait()
        os.rmdir(private)


@pytest.fixture
def receiver():
    r = StatusReceiver("127.0.0.1", hosts.local(2))
    yield r
    r.close()


def _push(receiver: StatusReceiver, *messages: bytes) -> None:
    """Send as a rank does: over CurveZMQ with the ranks' keys."""
    from mlx_cluster_magic.rank.status_sidecar import curve_push

    ctx = zmq.Context()
    sock = curve_push(ctx, receiver.credentials)
    for m in messages:
        sock.send(m)
    time.sleep(0.4)
    sock.close(linger=1000)
    ctx.term()


def _report(receiver: StatusReceiver, rank: int, token: str | None = None, **extra) -> bytes:
    msg = {"token": token or receiver.token, "rank": rank, "state": "idle", "pid": 1, **extra}
    return json.dumps(msg).encode()


def test_status_drops_wrong_tokens_and_oversized_messages(receiver) -> None:
    big = _report(receiver, 1, pad="x" * (MAX_MESSAGE_BYTES + 10))
    _push(receiver, _report(receiver, 0, token="f" * 32), big, b"not json")
    assert [n.state for n in receiver.nodes()] == ["starting", "starting"]
    _push(receiver, _report(receiver, 0, host="mac1"))
    nodes = receiver.nodes()
    assert nodes[0].state == "idle" and nodes[0].host == "mac1" and nodes[1].state == "starting"


def test_status_survives_the_shared_zmq_context_being_terminated(receiver) -> None:
    zmq.Context.instance().term()  # what some library code does on its way out
    _push(receiver, _report(receiver, 1))
    assert receiver.nodes()[1].state == "idle"


def test_silence_is_unresponsive_and_only_evidence_is_dead(receiver) -> None:
    _push(receiver, _report(receiver, 0), _report(receiver, 1))
    receiver.set_evidence(lambda: {1: "process gone"})
    time.sleep(2.2)
    nodes = receiver.nodes()
    assert nodes[0].state == "unresponsive" and nodes[0].silent_s >= 2.0
    assert nodes[1].state == "dead" and nodes[1].why == "process gone"


def test_metrics_are_bounded_per_series(receiver) -> None:
    from mlx_cluster_magic.observe.status_receiver import POINTS_PER_SERIES

    points = [["loss", 1.0 / (i + 1), i, 0.0] for i in range(POINTS_PER_SERIES + 50)]
    _push(receiver, _report(receiver, 0, metrics=points))
    got = receiver.metrics()
    assert len(got) == POINTS_PER_SERIES
    assert got[-1].step == POINTS_PER_SERIES + 49 and got[0].name == "loss"


def test_integer_steps_stay_integers(receiver) -> None:
    import numpy as np

    from mlx_cluster_magic.rank import status_sidecar as sidecar

    sidecar._drain(sidecar.REPORT_BUFFER)
    sidecar.report(step=3, loss=1.0)
    sidecar.report(step=np.int64(4), loss=1.0)
    sidecar.report(step=4.5, loss=1.0)
    sidecar.report(loss=1.0)
    points = sidecar._drain(10)
    assert [p[2] for p in points] == [3, 4, 4.5, None]
    assert [type(p[2]) for p in points] == [int, int, float, type(None)]
    _push(receiver, _report(receiver, 0, metrics=[list(p) for p in points]))
    steps = [p.step for p in receiver.metrics()]
    assert steps == [3, 4, 4.5, None] and type(steps[0]) is int and type(steps[2]) is float


def _wait_for(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_request_notices_arrive_as_datagrams_on_the_reports_port(receiver) -> None:
    """A rank's Activity (the real one, as the request hooks call it) sends its start and end
    as UDP datagrams to the reports' address and port number: loopback here, never 0.0.0.0."""
    import socket

    from mlx_cluster_magic.rank.status_sidecar import Activity

    url, _, _token = receiver.url.partition("#")
    port = int(url.rsplit(":", 1)[1])
    bound = [
        c.laddr
        for c in psutil.net_connections("udp")
        if c.pid == os.getpid() and c.laddr and c.laddr.port == port
    ]
    assert [a.ip for a in bound] == ["127.0.0.1"], bound
    activity = Activity()
    activity.connect(receiver.credentials, 1)
    activity.started()
    _wait_for(lambda: receiver.nodes()[1].state == "busy")
    assert receiver.requests(1) == 1
    activity.finished()
    _wait_for(lambda: receiver.nodes()[1].state == "idle")
    # a datagram with a wrong token changes nothing
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(_report(receiver, 1, token="0" * 32, state="busy", requests=9), ("127.0.0.1", port))
    s.close()
    time.sleep(0.3)
    assert receiver.nodes()[1].state == "idle" and receiver.requests(1) == 1


def test_a_late_record_never_undoes_a_newer_notice(receiver) -> None:
    """Records (ZMQ) and notices (UDP) travel apart: a periodic record sampled before a
    request ended, arriving after its end notice, must not make the rank busy again."""
    _push(receiver, _report(receiver, 0, state="idle", requests=3, rss_bytes=1))
    _push(receiver, _report(receiver, 0, state="busy", requests=2, busy_s=5.0, rss_bytes=2))
    node = receiver.nodes()[0]
    assert node.state == "idle" and node.busy_s == 0.0 and receiver.requests(0) == 3
    assert node.rss_bytes == 2  # what describes the rank is still the newest
    _push(receiver, _report(receiver, 0, state="busy", requests=4, busy_s=1.0))
    node = receiver.nodes()[0]
    assert node.state == "busy" and node.busy_s >= 1.0


def test_a_failed_start_inlines_mpiexec_output_not_a_log_path() -> None:
    from mlx_cluster_magic.launch.ipp_adapter import launch_failure

    ours = ["noise", "mlx_cluster_magic: rank 1 on vm: MLX mpi backend failed to initialise: x"]
    assert launch_failure(ours, "mpiexec exited") == (
        "mpiexec exited: rank 1 on vm: MLX mpi backend failed to initialise: x"
    )
    daemon = ["ORTE...", "  Remote host: mac2", "..."]
    assert "could not start its daemon on 'mac2'" in launch_failure(daemon, "mpiexec exited")
    other = ["a", "b", "c", "d", "e: the last words"]
    text = launch_failure(other, "mpiexec exited")
    # the private directory (and the log in it) is removed with the cluster: the tail is inlined
    assert text == "mpiexec exited; mpiexec's last output: b | c | d | e: the last words"
    assert "\n" not in text and "log" not in text.split(";")[1].split(":")[0]
    assert launch_failure([], "mpiexec exited") == "mpiexec exited; mpiexec's last output: (none)"
