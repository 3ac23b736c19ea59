"""A kept cluster outlives the notebook's kernel: ``start --keep`` runs the cluster in a runtime
of its own, outside the kernel's process group; ``attach`` takes it up from a restarted kernel
or a second notebook (same engines, same variables); ``stop`` from one ends it for all; a
runtime killed outright leaves nothing; an idle one ends itself; only its owner can attach.

Through real Jupyter kernels (jupyter_client, as a notebook runs them): a restart as the menu
asks it (a shutdown request, the kernel's exit handlers run) and as a kill (SIGKILL to the
kernel's whole process group, what a crash or a stuck kernel's restart does)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from kernels import Notebook, stop_our_kept_clusters

from conftest import wait_no_processes

pytestmark = pytest.mark.kernel

STRANGER = "mcmK-stranger"
SYSTEM_PYTHON = "/usr/bin/python3"
RUNTIMES = Path.home() / ".mlx-cluster" / "runtimes"


@pytest.fixture
def notebooks(no_leaks: None) -> Iterator[list[Notebook]]:
    """Kernels opened by the test (``notebooks.append(Notebook())``); each kept cluster the
    test left running is stopped at the end, and nothing of ours may be left."""
    opened: list[Notebook] = []
    try:
        yield opened
    finally:
        for nb in opened:
            nb.close()
        stop_our_kept_clusters()
        assert not _runtime_folders(), "a runtime's folder was left"


def _runtime_folders() -> list[str]:
    """This machine's runtimes' folders that are this session's (a live runtime with our
    marker) or whose runtime is gone; the virtual Macs share the home, and other sessions run
    beside this one: their runtimes are not ours to count."""
    from mlx_cluster_magic.runtime import records

    from conftest import _has_marker

    here = socket.gethostname()
    found = []
    for folder in sorted(RUNTIMES.iterdir()) if RUNTIMES.is_dir() else []:
        record = folder / "record.json"
        if not record.exists():  # (a runtime starting, maybe on a virtual Mac)
            continue
        content = json.loads(record.read_text())
        alive = records.runtime_alive(records.Record.of(content))
        if content.get("host") == here and (not alive or _has_marker(content["pid"])):
            found.append(folder.name)
    return found


PIDS = "[int(p) for p in c.view['pid']]"
LOAD = """%%px
import os
import numpy as np
pid = os.getpid()
big = np.full(25 * 2**20, world.rank() + 1.5)  # 200 MB a rank
checksum = float(big[::4096].sum())
"""


def _kept_id(out: str) -> str:
    found = re.search(r"kept cluster ([0-9a-f]{6}) \(its own runtime\): it outlives this kernel; "
                      r"after a kernel restart, or from another notebook: %mlx_cluster attach "
                      r"\1; %mlx_cluster stop ends it for every notebook", out)  # fmt: skip
    assert found, out
    return found.group(1)


def test_a_kept_cluster_outlives_restarts_and_is_shared_until_one_notebook_stops_it(
    notebooks: list[Notebook],
) -> None:
    nb = Notebook()
    notebooks.append(nb)
    cluster_id = _kept_id(nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster start -n 2 --keep"))
    nb.ok(LOAD)
    pids = nb.value(PIDS)
    sums = nb.value("c.view['checksum']")
    runtime = json.loads((RUNTIMES / cluster_id / "record.json").read_text())["pid"]
    kernel = nb.km.provisioner.process.pid  # type: ignore[union-attr]
    assert os.getpgid(runtime) != os.getpgid(kernel)  # out of the kernel's group

    # The menu's restart: the old kernel's exit leaves the cluster; the new one attaches.
    nb.restart()
    assert all(psutil.pid_exists(p) for p in pids)
    out = nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster attach")
    assert f"attached to kept cluster {cluster_id}: 2 ranks on 1 host, running" in out
    assert nb.value(PIDS) == pids and nb.value("c.view['checksum']") == sums
    out = nb.ok("%%px\nprint(big.nbytes, mx.distributed.all_sum(mx.array([checksum])).item())")
    assert f"209715200 {sum(sums)}" in out
    assert nb.value("c.nodes()[0]['state']") in ("idle", "busy")
    shown = nb.ok("c").splitlines()[0]  # the view's text: the header names the kept cluster
    assert re.match(rf"MLX cluster \(running\): backend mpi, 2 ranks on 1 host, uptime [^,]+, "
                    rf"kept {cluster_id}$", shown), shown  # fmt: skip

    # A kernel killed outright (its whole process group): the cluster stays.
    nb.restart(now=True)
    assert all(psutil.pid_exists(p) for p in pids) and psutil.pid_exists(runtime)

    # Two notebooks share it: both see the same engines; list counts them.
    other = Notebook()
    notebooks.append(other)
    other.ok(f"%load_ext mlx_cluster_magic\nc = %mlx_cluster attach {cluster_id}")
    nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster attach")
    assert other.value(PIDS) == pids
    other.ok("%%px\nshared = 'from the second notebook'")
    assert nb.value("c.view['shared']") == ["from the second notebook"] * 2
    time.sleep(1.5)  # both poll the runtime
    listed = other.ok("%mlx_cluster list")
    row = next(line for line in listed.splitlines() if line.startswith(cluster_id))
    assert re.match(rf"{cluster_id}\s+localhost\s+2\s+here \(\S+\)\s+\S+\s+2\s+\S+\s+12 h", row), row

    # Stop from one notebook ends it for both; the other's next cell says who.
    out = other.ok("%mlx_cluster stop")
    assert f"MLX cluster stopped (kept cluster {cluster_id}, for every notebook attached)" in out
    assert wait_no_processes(15) == []
    time.sleep(1.0)
    status, out = nb.run("%%px\n1")
    assert status == "error" and "stopped from another notebook" in out, out
    assert "no kept cluster of yours is running" in nb.ok("%mlx_cluster list")


def test_without_keep_a_kernel_restart_still_ends_the_cluster(notebooks: list[Notebook]) -> None:
    nb = Notebook()
    notebooks.append(nb)
    nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster start -n 2")
    pids = nb.value("[r['pid'] for r in c.ranks]")
    nb.restart()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) for p in pids)
    status, out = nb.run("%load_ext mlx_cluster_magic\n%mlx_cluster attach")
    assert status == "error" and "no kept cluster is running: start one with %mlx_cluster start --keep" in out


def test_a_runtime_killed_outright_leaves_nothing_and_list_says_so(
    notebooks: list[Notebook],
) -> None:
    nb = Notebook()
    notebooks.append(nb)
    cluster_id = _kept_id(nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster start -n 2 --keep"))
    runtime = json.loads((RUNTIMES / cluster_id / "record.json").read_text())["pid"]
    os.kill(runtime, signal.SIGKILL)
    assert wait_no_processes(30) == []
    time.sleep(1.0)
    assert nb.value("c.state") == "broken"
    reason = nb.value("c.broken_reason")
    assert f"the cluster's runtime (pid {runtime} on " in reason and "died" in reason
    listed = nb.ok("%mlx_cluster list")
    assert re.search(rf"cluster {cluster_id} \(localhost\) is gone: its runtime \(pid {runtime} on "
                     r"\S+, started \d\d:\d\d\) died; removed from the list", listed), listed  # fmt: skip
    assert "no kept cluster of yours is running" in listed
    nb.ok("%mlx_cluster stop")


def test_an_idle_kept_cluster_ends_itself(notebooks: list[Notebook]) -> None:
    nb = Notebook()
    notebooks.append(nb)
    out = nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster start -n 2 --keep --idle-timeout 4s")
    assert "(so does 4 s unused)" in out
    nb.ok("%%px\nimport time; time.sleep(5)")  # a busy rank is use: it does not end meanwhile
    assert nb.value("c.state") == "running"
    deadline = time.monotonic() + 20
    while nb.value("c.state") == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert nb.value("[c.state, c.stopped_by()]") == ["stopped", "stopped: idle for 4 s"]
    assert wait_no_processes(10) == []


def test_the_options_and_their_refusals_read_as_one_line(notebooks: list[Notebook]) -> None:
    nb = Notebook()
    notebooks.append(nb)
    nb.ok("%load_ext mlx_cluster_magic")
    for line, said in [
        ("start -n 2 --idle-timeout 1h", "--idle-timeout is for a kept cluster: add --keep"),
        ("start -n 2 --keep --idle-timeout soon", "'soon' is not a duration (90s, 30m, 12h)"),
        ("start -n 2 --keep --idle-timeout 0", "must be more than 0 seconds, got 0"),
        ("attach 12", "no running cluster '12' of yours; %mlx_cluster list shows them"),
        ("attach zz", "'zz' is not a cluster id (see %mlx_cluster list)"),
        ("detach", "no cluster to detach from"),
        ("start -n 2 --keep --farm", "a farm is not kept: start it without --keep/--runtime-on"),
    ]:
        status, out = nb.run(f"%mlx_cluster {line}")
        assert status == "error" and said in out and "Traceback" not in out, (line, out)
    for sub, words in [("attach", "Take up a kept cluster"), ("list", "Your running kept"),
                       ("detach", "Let go of a kept cluster"), ("start", "--runtime-on HOST")]:  # fmt: skip
        assert words in nb.ok(f"%mlx_cluster {sub} -h")


def test_detach_lets_go_and_attach_takes_it_up_again(notebooks: list[Notebook]) -> None:
    nb = Notebook()
    notebooks.append(nb)
    cluster_id = _kept_id(nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster start -n 2 --keep"))
    nb.ok("%%px\nkeep_me = 7")
    out = nb.ok("%mlx_cluster detach")
    assert f"detached from kept cluster {cluster_id}: it runs on" in out
    status, out = nb.run("%%px\n1")
    assert status == "error" and "detached" in out
    nb.ok("c = %mlx_cluster attach")
    assert nb.value("c.view['keep_me']") == [7, 7]
    assert nb.value("len(c.history())") == 1  # the runtime keeps the cells for replay
    nb.ok("%mlx_cluster restart --replay")
    assert nb.value("c.view['keep_me']") == [7, 7]
    nb.ok("%mlx_cluster stop")


# ------------------------------------------------------------------------------- security
@pytest.fixture
def stranger() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a second local user")
    if not os.access(SYSTEM_PYTHON, os.X_OK) or sys.version_info[:2] != (3, 11):
        pytest.skip("the second user runs the system's Python 3.11 with this venv's packages")
    subprocess.run(["userdel", STRANGER], capture_output=True, check=False)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", STRANGER],
                   check=True)  # fmt: skip
    try:
        yield STRANGER
    finally:
        shutil.rmtree(f"/tmp/{STRANGER}-home", ignore_errors=True)
        subprocess.run(["userdel", STRANGER], check=True)


def test_only_its_owner_attaches_and_its_channel_survives_junk(
    notebooks: list[Notebook], stranger: str
) -> None:
    nb = Notebook()
    notebooks.append(nb)
    cluster_id = _kept_id(nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster start -n 2 --keep"))
    folder = RUNTIMES / cluster_id
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert oct(folder.parent.stat().st_mode & 0o777) == "0o700"
    for name in ("record.json", "runtime.log"):
        assert oct((folder / name).stat().st_mode & 0o777) == "0o600", name
    record = json.loads((folder / "record.json").read_text())
    runtime = psutil.Process(record["pid"])
    secrets = (record["channel_key"], record["connection"]["key"])
    assert not any(s in " ".join(runtime.cmdline()) for s in secrets)
    assert record["channel"].startswith("tcp://127.0.0.1:")

    # Another local user: one line of refusal, whichever way they ask.
    home = Path(f"/tmp/{STRANGER}-home")  # (pytest's tmp_path is root's alone)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(mode=0o700)
    shutil.chown(home, stranger)
    code = (
        "from mlx_cluster_magic import MLXCluster, MLXClusterError\n"
        f"for where in ({str(folder)!r}, {cluster_id!r}, None):\n"
        "    try:\n        MLXCluster.attach(where)\n"
        "    except MLXClusterError as e:\n        print(e)\n"
    )
    # (this venv's python lives under root's home; the system's is the same Python 3.11)
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": f"{Path.cwd()}:{site}"}
    out = subprocess.run([SYSTEM_PYTHON, "-c", code], user=stranger, capture_output=True,
                         text=True, env=env, timeout=60, cwd=home)  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    assert lines[0] == (
        f"refused: the cluster at {folder} is not yours; only the user who started a kept "
        "cluster can attach to it"
    ), lines
    assert lines[1].startswith(f"no running cluster '{cluster_id}' of yours"), lines
    assert lines[2].startswith("no kept cluster is running"), lines

    # Junk and forged requests on the channel: dropped, the runtime answers its owner still.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(record["channel"])
    for frames in ([b"junk"], [b"x" * 32, b"\x80\x04junk"], [b"", b""], [os.urandom(32)] * 3):
        sock.send_multipart(frames)
    assert not sock.poll(1000)  # nothing answers what it cannot verify
    sock.close()
    ctx.term()
    assert nb.value("c.view.apply_sync(lambda: world.rank())") == [0, 1]
    assert nb.value("[c.state, len(c.nodes())]") == ["running", 2]
    nb.ok("%mlx_cluster stop")


def test_one_current_cluster_however_it_was_started(notebooks: list[Notebook]) -> None:
    """A cluster started from Python with activate=True is the one %%px runs on and the one
    %mlx_cluster stops."""
    nb = Notebook()
    notebooks.append(nb)
    nb.ok("%load_ext mlx_cluster_magic\nfrom mlx_cluster_magic import MLXCluster\n"
          "c = MLXCluster(n=2).start(activate=True)")  # fmt: skip
    out = nb.ok("%%px\nprint(f'rank {world.rank()} here')")
    assert "rank 0 here" in out and "rank 1 here" in out, out
    out = nb.ok("%mlx_cluster stop")
    assert "MLX cluster stopped: 2 ranks on 1 host, no process left" in out, out
    assert nb.value("c.state") == "stopped"
