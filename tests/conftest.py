"""Shared fixtures: a real IPython shell with the extension loaded, a process-leak check, and
the virtual Thunderbolt cluster (network namespaces with sshd) for the multi-host tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"

# The kinds of process this project starts. Matched on the command line: ranks
# (``-m mlx_cluster_magic.rank.bootstrap``), the watchdog (``launch/processes.py``), the
# controller, mpiexec and its daemons, and the ssh sessions mpiexec opens to start them.
OURS = re.compile(
    r"mlx_cluster_magic[./](rank[./](bootstrap|farm_engine)|launch[./](processes|controller)"
    r"|cluster[./]runtime_server)"
    r"|ipyparallel\.(controller|engine)|ipcontroller|ipengine"
    r"|(^|/)(prterun|prted|mpiexec|mpirun)(\s|$)|(^|/)ssh\s.*\bprted\b"
)


# Every process this test session starts inherits this marker, so the leak checks count only
# our own processes, not those of anything else running on the machine.
SESSION_MARKER = f"MLX_CLUSTER_TEST_SESSION={uuid.uuid4().hex}"
os.environ["MLX_CLUSTER_TEST_SESSION"] = SESSION_MARKER.split("=", 1)[1]


def _has_marker(pid: int) -> bool:
    try:
        env = psutil.Process(pid).environ()
    except psutil.Error:
        return False
    return env.get("MLX_CLUSTER_TEST_SESSION") == SESSION_MARKER.split("=", 1)[1]


#: Processes of a module-scoped fixture: not a test's leak; the fixture checks them at its end.
SHARED_PIDS: set[int] = set()


def our_processes(extra_pids: frozenset[int] = frozenset()) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of the kinds we start that this test session started
    (or that run inside our virtual hosts: ``extra_pids``), but for ``SHARED_PIDS``."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or not p.info["cmdline"]:
            continue
        if p.info["pid"] in SHARED_PIDS:
            continue
        cmd = " ".join(p.info["cmdline"])
        pid = p.info["pid"]
        if pid != os.getpid() and OURS.search(cmd) and (_has_marker(pid) or pid in extra_pids):
            found.append((pid, cmd[:160]))
    return found


def wait_no_processes(timeout: float = 10.0) -> list[tuple[int, str]]:
    """Our processes still alive after ``timeout`` seconds (empty when all are gone)."""
    deadline = time.monotonic() + timeout
    left = our_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = our_processes()
    return left


#: Fixtures that start clusters or virtual hosts: tests using them are marked ``cluster``, and
#: ``make check`` (the edit loop) runs every test without that mark.
CLUSTER_FIXTURES = frozenset(
    {
        "ip",
        "no_leaks",
        "vhosts",
        "no_vhost_leaks",
        "px",
        "cluster",
        "lab",
        "shared",
        "checked",
        "macs",
        "two_ranks",
        "kernel",
    }
)


# The virtual Macs share this machine's cores: an MPI rank that busy-polls while it waits takes
# the core another "Mac" needs, and a 3-host collective waits a scheduler slice (3.5 ms instead
# of 0.1 ms per all_sum). Real Macs have their own cores; yielding while idle keeps the virtual
# ones as independent as they. Open MPI passes OMPI_MCA_* on to every rank.
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")

# The interrupt tests raise KeyboardInterrupt with ``_thread.interrupt_main()``, which does
# nothing where SIGINT is ignored (as in a background job of a non-interactive shell).
signal.signal(signal.SIGINT, signal.default_int_handler)


#: Names that build virtual hosts: every test of a file that uses one is marked ``vhosts``. Their
#: namespaces, bridges and subnets are fixed names, so they run in one session, one at a time;
#: ``make test`` runs that session beside the one of every other test (``-m "not vhosts"``).
VHOST_WORDS = re.compile(r"\b(virtual_macs|cabled_macs|vhosts|VirtualCluster)\b")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    builds_hosts: dict[Path, bool] = {}
    for item in items:
        if item.path not in builds_hosts:
            builds_hosts[item.path] = bool(VHOST_WORDS.search(item.path.read_text()))
        if builds_hosts[item.path]:
            item.add_marker(pytest.mark.vhosts)
        fixtures = set(getattr(item, "fixturenames", ()))
        if (
            fixtures & CLUSTER_FIXTURES
            or item.get_closest_marker("kernel")
            or item.get_closest_marker("multihost")
            or item.get_closest_marker("browser")
        ):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session", autouse=True)
def _no_strays_at_start() -> None:
    left = our_processes()
    assert not left, f"processes of ours running before the tests: {left}"


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fails the test if it leaves any engine, controller, mpiexec/prterun/prted behind."""
    yield
    left = wait_no_processes()
    assert not left, f"left running: {left}"


@pytest.fixture
def ip(no_leaks: None) -> Iterator[object]:
    """A real IPython shell with ``%load_ext mlx_cluster_magic``; any cluster is stopped after."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    yield shell
    magics = shell.magics_manager.registry.get("MLXClusterMagics")
    if magics is not None and magics.cluster is not None and magics.cluster.running:
        magics.cluster.stop()
    if magics is not None:
        magics.cluster = None
    shell.run_line_magic("unload_ext", "mlx_cluster_magic")


def release_shell(shell: Any) -> None:
    """Stop the shell's current cluster (running or broken) and unload the extension."""
    magics = shell.magics_manager.registry.get("MLXClusterMagics")
    if magics is not None and magics.cluster is not None:
        magics.cluster.stop()
        magics.cluster = None
    shell.run_line_magic("unload_ext", "mlx_cluster_magic")


@contextlib.contextmanager
def shared_cluster(start_line: str) -> Iterator[tuple[Any, Any]]:
    """A shell with the extension and one started cluster, for a module of read-mostly tests
    (one start instead of one per test); stopped, unloaded and leak-checked at the end."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    cluster = shell.run_line_magic("mlx_cluster", start_line)
    try:
        yield shell, cluster
    finally:
        magics = shell.magics_manager.registry.get("MLXClusterMagics")
        if magics is not None and magics.cluster is not None:
            if magics.cluster.running:
                magics.cluster.stop()
            magics.cluster = None
        shell.run_line_magic("unload_ext", "mlx_cluster_magic")
        left = wait_no_processes()
        assert not left, f"left running: {left}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@contextlib.contextmanager
def virtual_macs(n: int, subnet: str, prefix: str, **options: Any) -> Iterator[Any]:
    """A started VirtualCluster (skips the test where one cannot be built), always torn down
    and checked to leave nothing behind. Every fixture uses its own subnet and prefix so they
    never clash; ``options`` are VirtualCluster's (cables, memory caps, private disks...)."""
    from vcluster import VirtualCluster, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    vc = VirtualCluster(n, subnet=subnet, prefix=prefix, **options)
    try:
        vc.start()
        yield vc
    finally:
        vc.stop()
        assert vc.leftovers() == []


def cabled_macs(
    n: int, cables: Any, subnet: str, cable_subnet: str, prefix: str, **options: Any
) -> Any:
    """``virtual_macs`` cabled point to point (``cables``: mesh, ring, star, ring-head,
    star-head or pairs), one subnet per cable out of ``cable_subnet``."""
    return virtual_macs(n, subnet, prefix, cables=cables, cable_subnet=cable_subnet, **options)


@pytest.fixture(scope="session")
def vhosts() -> Iterator[object]:
    """Three virtual Macs (network namespaces with their own hostname, sshd, a bridge)."""
    with virtual_macs(3, "10.213.2.0/24", "mcmh") as vc:
        yield vc


def vhost_pids(vc: object) -> frozenset[int]:
    """Every process running inside the virtual hosts' namespaces."""
    pids: set[int] = set()
    for ns in vc.namespaces:  # type: ignore[attr-defined]
        pids.update(vc._ns_pids(ns))  # type: ignore[attr-defined]
    return frozenset(pids)


def no_leaks_on(vc: object, timeout: float = 10.0) -> None:
    """Fails if any engine/prted of ours is still running on these virtual hosts or the head
    ``timeout`` seconds from now."""
    deadline = time.monotonic() + timeout
    while True:
        left = our_processes(vhost_pids(vc))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"left running: {left}"


@pytest.fixture
def no_vhost_leaks(vhosts: object) -> Iterator[None]:
    """Fails the test if any engine/prted is left on the virtual hosts or on the head."""
    yield
    no_leaks_on(vhosts)
