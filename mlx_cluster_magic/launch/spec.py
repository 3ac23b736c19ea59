"""Every start option checked before anything is launched: one line per mistake, with the fix.

``resolve()`` turns what a person typed (``MLXCluster(...)`` keywords or ``%mlx_cluster start``
flags) into a frozen ``ClusterSpec`` that the life cycle reads. No IPython, no processes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from ..errors import MLXClusterError
from ..fabric.placement import (
    JACCL_BACKENDS,
    Placement,
    check_backend,
    leave_out_hosts,
    local,
    mark_head,
    parse_host_list,
    read_hostfile,
    with_ranks_per_host,
)
from . import mpi_job

START_TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT_S = 30.0
#: Seconds of silence from every host (the notebook's own link down: Wi-Fi roaming, a lid
#: closed a moment) that the cluster waits out before it counts itself lost.
GRACE_S = 60.0


@dataclass(frozen=True)
class ClusterSpec:
    """What a cluster is: where its ranks run and how they are started."""

    placement: Placement
    backend: str
    mpiexec: str
    explicit_mpiexec: bool
    mpi_lib: str | None
    python: str
    workdir: str | None
    controller_ip: str
    subnet: str | None  # the networks MPI is pinned to, comma-separated (None: local)
    ring_port: int
    ssh: str | None
    timeout: float
    live_status: bool
    check_collectives: bool = False
    collective_timeout: float = COLLECTIVE_TIMEOUT_S
    verbose: bool = False
    connections_per_ip: int = 1
    #: ``--controller-ip`` as given (kept by ``restart --without``), else None.
    explicit_controller_ip: str | None = None
    grace: float = GRACE_S
    control: mpi_job.ControlPlane = field(default_factory=lambda: mpi_job.ControlPlane("127.0.0.1"))
    peers: tuple[tuple[str, str], ...] = ()  # (ssh name, address ssh reaches it at)
    #: CurveZMQ on every ipyparallel socket (the HMAC key kept); off only to measure its cost.
    encrypt: bool = True
    #: A farm (``--farm``): independent engines, one per slot, for ``cluster.map``.
    farm: bool = False
    #: Farm only: seconds a Mac's owner must have left it alone before it takes tasks.
    when_idle: float | None = None
    #: Farm only: what a Mac's running task does when its owner comes back.
    yield_policy: str = "finish"

    @property
    def n(self) -> int:
        return self.placement.size

    @property
    def prted(self) -> str:
        """The remote daemon: beside an explicit --mpiexec, else beside the hosts' python."""
        base = self.mpiexec if self.explicit_mpiexec else self.python
        return os.path.join(os.path.dirname(base), "prted")


def placement_from(
    n: int | None,
    *,
    hosts: str | Sequence[str] | None = None,
    hostfile: str | os.PathLike[str] | None = None,
) -> Placement:
    """Where the ranks go: ``n`` local ranks, or ``n`` per host of ``hosts``/``hostfile``."""
    if hosts is not None and hostfile is not None:
        raise MLXClusterError("give --hosts or --hostfile, not both")
    if hostfile is not None:
        placement = with_ranks_per_host(read_hostfile(hostfile), n)
    elif hosts is not None:
        spec = hosts if isinstance(hosts, str) else ",".join(hosts)
        placement = with_ranks_per_host(parse_host_list(spec), n)
    else:
        return local(2 if n is None else n)
    return mark_head(placement, own_names())


def own_names() -> set[str]:
    """This machine's host names and addresses, to recognise the head in a hostfile."""
    names = {socket.gethostname(), socket.gethostname().split(".")[0]}
    for addrs in psutil.net_if_addrs().values():
        names.update(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return names


def _positive(value: object, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise MLXClusterError(f"{flag} must be a positive number of seconds, got {value}")
    return float(value)


def _check_rdma(placement: Placement, backend: str) -> None:
    """The jaccl backends need Macs with RDMA rows in the hostfile: checked before launching."""
    if backend not in JACCL_BACKENDS:
        return
    if placement.is_local:
        raise MLXClusterError(
            "the jaccl backend is RDMA over Thunderbolt 5 between Macs: give a "
            "--hostfile with rdma rows (mlx.distributed_config --backend jaccl); "
            "locally use mpi or ring"
        )
    mpi_job.ibv_devices(placement, ring=backend == "jaccl-ring")


def resolve(
    n: int | None = None,
    *,
    hosts: str | Sequence[str] | None = None,
    hostfile: str | os.PathLike[str] | None = None,
    backend: str | None = None,
    mpiexec: str | None = None,
    mpi_lib: str | None = None,
    python: str | None = None,
    workdir: str | None = None,
    controller_ip: str | None = None,
    ring_port: int = mpi_job.DEFAULT_RING_PORT,
    ssh: str | None = None,
    timeout: float = START_TIMEOUT_S,
    live_status: bool = True,
    check_collectives: bool = False,
    collective_timeout: float = COLLECTIVE_TIMEOUT_S,
    verbose: bool = False,
    connections_per_ip: int = 1,
    grace: float = GRACE_S,
    farm: bool = False,
    when_idle: float | str | None = None,
    yield_policy: str = "finish",
) -> ClusterSpec:
    """Check every option; raise ``MLXClusterError`` (one line, with the fix) on the first bad
    one."""
    placement = placement_from(n, hosts=hosts, hostfile=hostfile)
    idle = _farm_options(farm, when_idle, yield_policy)
    chosen = check_backend(backend or placement.backend or "mpi")
    if not (isinstance(connections_per_ip, int) and 1 <= connections_per_ip <= 16):
        raise MLXClusterError(
            f"--connections-per-ip must be a whole number from 1 to 16, got {connections_per_ip}"
        )
    ports = placement.size * mpi_job.ring_ports_per_rank(placement, connections_per_ip)
    if not (isinstance(ring_port, int) and 1024 <= ring_port <= 65535 - ports):
        raise MLXClusterError(f"--ring-port must be a port from 1024 to 65535, got {ring_port}")
    timeout = _positive(timeout, "--timeout")
    collective_timeout = _positive(collective_timeout, "--collective-timeout")
    grace = _positive(grace, "--grace")
    found_mpiexec = mpi_job.find_mpiexec(mpiexec)
    lib = mpi_job.find_libmpi(found_mpiexec, mpi_lib) if chosen in ("mpi", "any") else mpi_lib
    _check_rdma(placement, chosen)
    if placement.is_local and python and not os.access(python, os.X_OK):
        raise MLXClusterError(f"--python {python!r} is not an executable here")
    if workdir is not None and placement.is_local and not os.path.isdir(workdir):
        raise MLXClusterError(f"--workdir {workdir!r} is not a directory")
    if controller_ip is not None:
        try:
            ipaddress.ip_address(controller_ip)
        except ValueError:
            raise MLXClusterError(
                f"--controller-ip {controller_ip!r} is not an IP address: give the address "
                "the hosts reach this machine by"
            ) from None
    control, peers, networks = data_plane(placement, ssh, controller_ip)
    subnet = ",".join(networks) or None
    return ClusterSpec(
        placement=placement,
        backend=chosen,
        mpiexec=found_mpiexec,
        explicit_mpiexec=bool(mpiexec or os.environ.get("MLX_CLUSTER_MPIEXEC")),
        mpi_lib=lib,
        python=python or sys.executable,
        workdir=workdir,
        controller_ip=control.address,
        subnet=subnet,
        ring_port=ring_port,
        ssh=ssh,
        timeout=timeout,
        live_status=live_status,
        check_collectives=bool(check_collectives),
        collective_timeout=collective_timeout,
        verbose=bool(verbose),
        connections_per_ip=connections_per_ip,
        explicit_controller_ip=controller_ip,
        grace=grace,
        control=control,
        peers=tuple(sorted(peers.items())),
        farm=bool(farm), when_idle=idle, yield_policy=yield_policy,
    )  # fmt: skip


YIELD_POLICIES = ("finish", "requeue")


def _farm_options(farm: bool, when_idle: float | str | None, yield_policy: str) -> float | None:
    """``--when-idle`` in seconds (``5m``, ``90s``, a number), checked with ``--yield``."""
    from ..fabric.hid_idle import parse_duration

    if yield_policy not in YIELD_POLICIES:
        raise MLXClusterError(
            f"--yield must be finish or requeue, got {yield_policy!r}: what a Mac's running "
            "task does when its owner comes back"
        )
    if when_idle is None:
        return None
    if not farm:
        raise MLXClusterError(
            "--when-idle is for a farm: start with --farm (a cluster of ranks cannot lose one)"
        )
    try:
        return parse_duration(str(when_idle))
    except ValueError as e:
        raise MLXClusterError(f"--when-idle {e}") from None


def without_hosts(
    spec: ClusterSpec, names: Sequence[str], aliases: Mapping[str, str] | None = None
) -> ClusterSpec:
    """The same cluster on the other hosts: the placement, the control plane and MPI's
    networks worked out again for them (an explicit ``--controller-ip`` kept). ``aliases``
    maps other names of a host (the hostname its ranks report, as the views show it) to its
    name in the hostfile."""
    placement = leave_out_hosts(spec.placement, [(aliases or {}).get(n, n) for n in names])
    control, peers, networks = data_plane(placement, spec.ssh, spec.explicit_controller_ip)
    return dataclasses.replace(
        spec,
        placement=placement,
        controller_ip=control.address,
        subnet=",".join(networks) or None,
        control=control,
        peers=tuple(sorted(peers.items())),
    )


def data_plane(
    placement: Placement, ssh: str | None, controller_ip: str | None = None
) -> tuple[mpi_job.ControlPlane, dict[str, str], list[str]]:
    """Where the head listens for the hosts (the cables, or the network ssh uses when every
    cable has its own subnet), the address ssh reaches each host at, and the networks MPI's
    own traffic is pinned to: what a start uses, and what the doctor tests the hosts against."""
    peers = {} if placement.is_local else mpi_job.ssh_addresses(placement, ssh)
    control = mpi_job.control_plane(
        placement, mpi_job.local_interfaces(), peers, explicit=controller_ip
    )
    return control, peers, mpi_job.mpi_subnets(placement, control)
