"""Helpers shared by the benchmark sections: the environment, the virtual hosts, and running a
script under bare ``mpiexec`` or ``mlx.launch`` and collecting what every rank reports."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def setup() -> None:
    """What every section needs, done once by the runner (never at import): the venv's Open MPI
    on PATH (raw ipyparallel and mlx.launch look there), Open MPI allowed to run as root, and
    the tests' virtual-cluster helper (``tests/vcluster.py``, the one both use) importable."""
    if str(BIN) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    tests = str(HERE.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


PYTHON = sys.executable
MLX_LAUNCH = str(BIN / "mlx.launch")

# The benchmarks' own virtual hosts: a prefix and subnet no test uses.
VHOST_PREFIX = "mcmb"
VHOST_SUBNET = "10.213.7.0/24"
# Ring ports away from the default (32323) and below Linux's ephemeral range (32768 up).
RING_PORT_OURS = 31511
RING_PORT_LAUNCH = 31611

RESULT_TAG = "MCMB_RESULT"
READY_TAG = "MCMB_READY"


def mpi_paths() -> tuple[str, str]:
    """(mpiexec, libmpi) as MLXCluster finds them: the venv's Open MPI."""
    from mlx_cluster_magic.launch import mpi_job as launch

    mpiexec = launch.find_mpiexec()
    return mpiexec, launch.find_libmpi(mpiexec)


# ----------------------------------------------------------------------------- virtual hosts
def vhost_skip_reason() -> str | None:
    from vcluster import skip_reason

    return skip_reason()


@contextlib.contextmanager
def vhosts(n: int = 3) -> Iterator[Any]:
    """A started VirtualCluster of ``n`` "Macs" (``mac1``...), stopped afterwards."""
    from vcluster import VirtualCluster

    vc = VirtualCluster(n, subnet=VHOST_SUBNET, prefix=VHOST_PREFIX)
    try:
        vc.start()
        yield vc
    finally:
        vc.stop()


def vhost_mpiexec(mpiexec: str, vc: Any, prted: str, hosts: str, *program: str) -> list[str]:
    """Bare ``mpiexec`` of ``PYTHON program...`` across the virtual hosts, placed as MLXCluster
    places ranks there: the "hosts" share this machine's cores, and each prted would otherwise
    bind its rank to core 0."""
    return [
        mpiexec,
        *vc.mpiexec_args(prted),
        "--bind-to",
        "none",
        "-x",
        "MLX_MPI_LIBNAME",
        "--host",
        hosts,
        PYTHON,
        *program,
    ]


def write_hostfile(vc: Any, k: int, path: str | os.PathLike[str]) -> str:
    """An mlx.launch JSON hostfile with the first ``k`` virtual hosts (ssh name + IP)."""
    entries = [{"ssh": h, "ips": [ip]} for h, ip in list(zip(vc.hosts, vc.ips))[:k]]
    Path(path).write_text(json.dumps(entries, indent=2) + "\n")
    return str(path)


def ssh_wrapper_dir(vc: Any, where: str | os.PathLike[str]) -> str:
    """A folder holding an ``ssh`` that adds ``-F <vcluster ssh config>``.

    ``mlx.launch`` runs a bare ``ssh -tt HOST CMD`` through bash, and has no option for an ssh
    config; put this folder first on its PATH and its ssh finds the virtual hosts, without
    touching ``~/.ssh/config``.
    """
    d = Path(where) / "sshbin"
    d.mkdir(exist_ok=True)
    real = shutil.which("ssh", path="/usr/local/bin:/usr/bin:/bin") or "/usr/bin/ssh"
    wrapper = d / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {real} -F {vc.ssh_config} "$@"\n')
    wrapper.chmod(0o755)
    return str(d)


# ----------------------------------------------------------------------------- launching
def _renice_threads(pid: int, value: int = 19) -> None:
    """Lower the priority of every thread of ``pid`` (on Linux, nice is per thread)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), value)


def run_ranks(
    cmd: list[str],
    n: int,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    renice_launcher: bool = False,
) -> list[Any]:
    """Run a job whose ranks print ``READY_TAG rank`` and then ``RESULT_TAG rank <json>``.

    Returns the results by rank. With ``renice_launcher`` the launcher (mlx.launch) is
    re-niced to 19 once every rank reported ready: its I/O threads busy-loop on ``select``
    (the child's stdin is always writable), which on a 2-core machine takes a core from the
    ranks; the ranks were forked before, so they keep their priority.
    Stdin is a pipe kept open and never written: with /dev/null mlx.launch's stdin loop spins too.
    """
    r, w = os.pipe()
    proc = subprocess.Popen(
        cmd,
        stdin=r,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    os.close(r)
    lines: list[str] = []
    ready: set[int] = set()
    reniced = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
            lines.append(line)
            if READY_TAG in line:
                ready.add(int(line.split(READY_TAG, 1)[1].split()[0]))
                if renice_launcher and len(ready) == n and not reniced.is_set():
                    _renice_threads(proc.pid)
                    reniced.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise RuntimeError(f"{cmd[0]} timed out after {timeout} s: {lines[-10:]}") from None
    finally:
        os.close(w)
        t.join(5)
    results: dict[int, Any] = {}
    for line in lines:
        if RESULT_TAG in line:
            rank, payload = line.split(RESULT_TAG, 1)[1].split(None, 1)
            results[int(rank)] = json.loads(payload)
    if proc.returncode != 0 or len(results) != n:
        tail = " | ".join(x for x in lines[-12:] if x.strip())
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed (rc {proc.returncode}): {tail}")
    return [results[i] for i in range(n)]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the job we started (its own session), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def write_script(source: str, where: str | os.PathLike[str], name: str) -> str:
    path = Path(where) / name
    path.write_text(source)
    return str(path)


def tmpdir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[str]:
    """A private scratch directory for one section, removed however the section ends."""
    path = tmpdir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def mlx_launch(*where: str, program: Sequence[str]) -> list[str]:
    """``mlx.launch`` on the ring backend from the baselines' own port; ``where`` places the
    ranks (``-n 2`` or ``--hostfile F``), ``program`` is what each rank runs under PYTHON."""
    return [
        MLX_LAUNCH,
        *where,
        "--backend",
        "ring",
        "--starting-port",
        str(RING_PORT_LAUNCH),
        "--",
        PYTHON,
        *program,
    ]


def stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def compare(
    name: str,
    ours: list[float],
    base: list[float],
    unit: str,
    target: str,
    baseline: str,
    higher_is_better: bool = False,
) -> dict[str, Any]:
    o, b = stats(ours), stats(base)
    ratio = o["median"] / b["median"] if b["median"] else float("nan")
    return {
        "name": name,
        "unit": unit,
        "ours": o,
        "baseline": b,
        "baseline_name": baseline,
        "ratio": ratio,
        "target": target,
        "higher_is_better": higher_is_better,
    }


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval for the median (order statistics)."""
    xs = sorted(values)
    n = len(xs)
    if n < 6:
        return xs[0], xs[-1]
    k = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    return xs[k], xs[n - 1 - k]


def alternate(reps: int, ours: Any, base: Any) -> None:
    """Call ``ours()`` and ``base()`` once per repetition, in alternating order."""
    for i in range(reps):
        for f in (ours, base) if i % 2 == 0 else (base, ours):
            f()


def print_figure(fig: dict[str, Any]) -> None:
    o, b = fig["ours"], fig["baseline"]
    print(
        f"{fig['name']}: ours {o['median']:.4g} ({o['min']:.3g}..{o['max']:.3g}) {fig['unit']}, "
        f"baseline {b['median']:.4g} ({b['min']:.3g}..{b['max']:.3g}) [{fig['baseline_name']}], "
        f"ratio {fig['ratio']:.2f}x (target {fig['target']})",
        flush=True,
    )


def main(section: Any) -> None:
    """Standalone run of one section: ``python bench/<section>.py [reps]``."""
    setup()
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    t0 = time.perf_counter()
    for fig in section(reps):
        print_figure(fig)
    print(f"{section.__name__}({reps}) took {time.perf_counter() - t0:.0f} s", flush=True)
