"""No orphans and nothing exposed: start/stop cycles, kernel restart, a killed kernel, sockets,
connection files and command lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import psutil
import pytest
from jupyter_client.manager import KernelManager

from mlx_cluster_magic import MLXCluster

from conftest import our_processes, wait_no_processes


def test_ten_start_stop_cycles_leave_nothing(no_leaks) -> None:
    """No process after any stop, and nothing piling up in the notebook's own process: its
    threads and open files after the last cycle are what they were after the first."""
    me = psutil.Process()
    after_first: tuple[int, int] | None = None
    for cycle in range(10):
        cluster = MLXCluster(n=2).start()
        pids = [r["pid"] for r in cluster.ranks]
        cluster.stop()
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
        )
        left = wait_no_processes(5)
        assert left == [], f"cycle {cycle}: {left}"
        held = (threading.active_count(), me.num_fds())
        after_first = after_first or held
    assert held[0] <= after_first[0] and held[1] <= after_first[1], (after_first, held)


def test_the_leak_check_sees_every_kind_of_process_we_start(no_leaks) -> None:
    """What the suite's "nothing left" checks count: a rank, the watchdog, the controller and
    mpiexec, each found while it runs (so each would be found were it left behind)."""
    cluster = MLXCluster(n=2).start()
    try:
        found = dict(our_processes())
        ranks = [r["pid"] for r in cluster.ranks]
        assert set(ranks) <= set(found), (ranks, found)
        assert all("mlx_cluster_magic.rank.bootstrap" in found[p] for p in ranks)
        kinds = " ".join(found.values())
        assert "launch/processes.py" in kinds, found  # the watchdog
        assert "mlx_cluster_magic.launch.controller" in kinds and re.search(r"(prterun|mpiexec)", kinds)
    finally:
        cluster.stop()


def test_a_stop_ends_a_start_under_way_in_another_thread(no_leaks) -> None:
    """The view's Stop (another thread) during a start: the start gives up at once with one
    line instead of the stop waiting for it, and nothing is left."""
    from mlx_cluster_magic import MLXClusterError

    cluster = MLXCluster(n=2)
    raised: list[BaseException] = []

    def start() -> None:
        try:
            cluster.start()
        except BaseException as e:
            raised.append(e)

    starter = threading.Thread(target=start)
    starter.start()
    while cluster.state != "starting":
        time.sleep(0.01)
    time.sleep(1.0)
    t0 = time.monotonic()
    cluster.stop(origin="the status view")
    took = time.monotonic() - t0
    starter.join(10)
    assert not starter.is_alive() and took < 10, took
    assert len(raised) == 1 and isinstance(raised[0], MLXClusterError), raised
    assert str(raised[0]) == "the start was stopped from the status view"
    assert cluster.state == "stopped" and cluster.stopped_by() == "stopped from the status view"
    assert wait_no_processes(5) == []
    cluster.start()  # and it starts again as usual
    cluster.view.execute("x = 1")
    cluster.stop()


def _kernel_with_cluster() -> tuple[KernelManager, object, list[int]]:
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    code = (
        "%load_ext mlx_cluster_magic\n"
        "c = %mlx_cluster start -n 2\n"
        "import json; print('PIDS', json.dumps([r['pid'] for r in c.ranks]))"
    )
    collect = _Collector()
    reply = kc.execute_interactive(code, timeout=120, output_hook=collect)
    assert reply["content"]["status"] == "ok", collect.text
    pids = json.loads(re.search(r"PIDS (\[.*\])", collect.text).group(1))
    return km, kc, pids


class _Collector:
    def __init__(self) -> None:
        self.text = ""

    def __call__(self, msg: dict) -> None:
        if msg["msg_type"] == "stream":
            self.text += msg["content"]["text"]


def test_kernel_restart_leaves_nothing(no_leaks) -> None:
    km, kc, pids = _kernel_with_cluster()
    try:
        assert all(psutil.pid_exists(p) for p in pids)
        km.restart_kernel(now=False)
        deadline = time.monotonic() + 15
        while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if psutil.pid_exists(p)]
        # the new kernel runs no cluster, so none of our processes may be left
        assert wait_no_processes(10) == []
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_kernel_killed_with_sigkill_leaves_nothing(no_leaks) -> None:
    km, kc, _pids = _kernel_with_cluster()
    try:
        # this cluster's own private directory (others may come and go meanwhile)
        collect = _Collector()
        kc.execute_interactive("print('PROFILE', c._run.profile_dir)", output_hook=collect)
        profile = re.search(r"PROFILE (\S+)", collect.text).group(1)
        assert os.path.isdir(profile)
        kernel_pid = km.provisioner.process.pid
        ours_before = our_processes()
        assert len(ours_before) >= 4  # mpiexec, 2 engines, controller (+ watchdog)
        os.kill(kernel_pid, signal.SIGKILL)
        t = time.monotonic()
        left = wait_no_processes(15)
        assert left == [], f"orphans after SIGKILL of the kernel: {left}"
        deadline = time.monotonic() + 5
        while os.path.exists(profile) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(profile), "connection files left behind"
        assert time.monotonic() - t < 15
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _listening(pids: set[int]) -> list[tuple[str, str]]:
    """(address, process name) of every TCP socket listening in one of ``pids``."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                addr = line.split()[3]
                name = re.search(r'\(\("([^"]+)"', line).group(1)
                found.append((addr, name))
    return found


@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_sockets_bind_loopback_only(backend, no_leaks) -> None:
    if subprocess.run(["which", "ss"], capture_output=True).returncode:
        pytest.skip("needs ss (iproute2)")
    with MLXCluster(n=2, backend=backend, ring_port=31111) as cluster:
        me = psutil.Process()
        pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
        sockets = _listening(pids)
        python_sockets = [(a, n) for a, n in sockets if n.startswith("python")]
        assert python_sockets, "expected the controller's and engines' ZMQ sockets"
        exposed = [(a, n) for a, n in python_sockets if not a.startswith("127.0.0.1:")]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        if backend == "ring":
            # the ring's connections (its listeners close once connected) stay on loopback
            est = subprocess.run(
                ["ss", "-Htn", "state", "established"], capture_output=True, text=True
            ).stdout
            ring = [ln.split()[2:4] for ln in est.splitlines() if ":3111" in ln]
            assert ring, "no ring connection found"
            assert all(a.startswith("127.0.0.1:") and b.startswith("127.0.0.1:") for a, b in ring)
        assert cluster.running


def test_hmac_key_never_on_a_command_line(no_leaks) -> None:
    with MLXCluster(n=2) as cluster:
        key = cluster.client.session.key
        assert len(key) >= 16
        for p in psutil.process_iter(["pid"]):
            try:
                with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                    assert key not in f.read(), f"key on the command line of pid {p.pid}"
            except OSError:
                continue


def test_a_stop_reads_stopping_until_nothing_is_left_then_stopped(no_leaks: None) -> None:
    """The states are an enum with a ``stopping`` step: a stop in another thread is seen as
    ``stopping`` (the header says so, the Stop button's work under way) until its teardown ends."""
    from mlx_cluster_magic.observe.snapshot import ClusterState

    cluster = MLXCluster(n=2).start()
    assert cluster.state is ClusterState.RUNNING and cluster.state == "running"
    seen: list[str] = []
    stopper = threading.Thread(target=cluster.stop, kwargs={"origin": "the status view"})
    stopper.start()
    while stopper.is_alive():
        seen.append(str(cluster.snapshot().state))
    stopper.join()
    assert "stopping" in seen and seen[-1] in ("stopping", "stopped"), sorted(set(seen))
    assert cluster.state is ClusterState.STOPPED
    assert cluster.stopped_by() == "stopped from the status view"
