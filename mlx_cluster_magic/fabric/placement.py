"""Where the ranks run: hostfiles (read and written) and rank placement.

Reads every JSON hostfile that current MLX reads or writes (``mlx/_distributed_utils``:
``common.Hostfile.from_file``/``to_json``, ``config.configure_ring``/``configure_jaccl``/
``configure_jaccl_ring``/``prepare_ethernet_hostfile``): the bare list form, the full form with
``backend`` (``""`` when unset, ``ring``, ``jaccl``, ``jaccl-ring``, ``mpi``), ``envs`` and
``hosts``, whose ``rdma`` cells are null, a device name or a list of device names (two Macs
joined by several cables). Also Open MPI hostfiles (``host slots=N``). Everything is validated
here, before anything is launched, so bad input fails with one line.
No IPython import: this module is unit-tested directly.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MLXClusterError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HOSTNAME_RE = re.compile(r"^(?:[A-Za-z0-9_.@-]+|\[[0-9A-Fa-f:]+\])$")

#: One cell of a host's ``rdma`` row: no cable (null), one device, or one device per cable.
RdmaCell = str | tuple[str, ...] | None


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: object, what: str = "memory") -> int:
    """Bytes from ``"64GB"``, ``"512MiB"``, ``"2.5G"`` or a whole number of bytes."""
    if isinstance(value, bool):
        raise MLXClusterError(f"{what}: {value!r} is not a size; give bytes or e.g. '64GB'")
    if isinstance(value, int):
        if value <= 0:
            raise MLXClusterError(f"{what} must be more than 0 bytes, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise MLXClusterError(f"{what}: {value!r} is not a size; give bytes or e.g. '64GB'")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise MLXClusterError(f"{what} must be more than 0 bytes, got {value!r}")
    return size


@dataclass(frozen=True)
class Host:
    """One machine: how to ssh to it, its cluster (Thunderbolt) IPs, its ranks, and the memory
    a pipeline plan may give its ranks (``"memory"`` in a JSON hostfile; ours, not MLX's)."""

    ssh: str
    ips: tuple[str, ...] = ()
    slots: int | None = None
    rdma: tuple[RdmaCell, ...] = ()
    memory: int | None = None

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL_NAMES

    @property
    def address(self) -> str:
        """The address the other hosts and the head reach this host by."""
        return self.ips[0] if self.ips else self.ssh


@dataclass(frozen=True)
class Placement:
    """The ranks of a cluster in rank order: ``ranks[i]`` is the host of rank i."""

    hosts: tuple[Host, ...]
    per_host: tuple[int, ...]
    backend: str | None = None
    envs: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(self.per_host)

    @property
    def ranks(self) -> list[Host]:
        return [h for h, k in zip(self.hosts, self.per_host) for _ in range(k)]

    @property
    def is_local(self) -> bool:
        return all(h.is_local for h in self.hosts)

    def local_index(self, rank: int) -> int:
        """The rank's position among the ranks on its own host (for per-host ports)."""
        host = self.ranks[rank]
        return sum(1 for h in self.ranks[:rank] if h is host)


def mark_head(placement: Placement, own_names: set[str]) -> Placement:
    """The head (this machine) may be one of the hosts: its entry becomes ``localhost``, so
    mpiexec starts its ranks directly and no ssh to itself is needed."""
    hosts = tuple(
        Host("localhost", h.ips, h.slots, h.rdma)
        if h.ssh in own_names or any(ip in own_names for ip in h.ips)
        else h
        for h in placement.hosts
    )
    return Placement(hosts, placement.per_host, placement.backend, placement.envs)


def local(n: int) -> Placement:
    """``n`` ranks on this machine."""
    check_rank_count(n, "-n")
    return Placement(hosts=(Host("localhost", ("127.0.0.1",), slots=n),), per_host=(n,))


def check_rank_count(n: object, flag: str = "-n") -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise MLXClusterError(f"{flag} must be a whole number of ranks, got {n!r}")
    if n < 1:
        raise MLXClusterError(f"{flag} must be at least 1, got {n}: give the number of ranks")
    return n


def _check_ip(ip: object, where: str) -> str:
    if not isinstance(ip, str):
        raise MLXClusterError(f"{where}: ip {ip!r} is not a string")
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise MLXClusterError(f"{where}: {ip!r} is not an IP address") from None


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise MLXClusterError(f'{where}: "ssh" must be a non-empty host name, got {name!r}')
    name = name.strip()
    if name.startswith("-") or name.partition("@")[2].startswith("-"):
        # ssh would read it as an option (``-oProxyCommand=...`` runs a command)
        raise MLXClusterError(
            f"{where}: host name {name!r} starts with '-', which ssh would take as an option; "
            "give the host's real name"
        )
    if not _HOSTNAME_RE.match(name):
        raise MLXClusterError(f"{where}: {name!r} is not a valid host name")
    return name


def _host_from_json(entry: object, where: str) -> Host:
    if isinstance(entry, str):
        return Host(_check_name(entry, where))
    if not isinstance(entry, dict):
        raise MLXClusterError(f'{where}: expected an object like {{"ssh": "mac1", "ips": [...]}}')
    unknown = set(entry) - {"ssh", "ips", "rdma", "slots", "memory"}
    if unknown:
        raise MLXClusterError(
            f"{where}: unknown key(s) {sorted(unknown)}; allowed: ssh, ips, rdma, slots, memory"
        )
    if "ssh" not in entry:
        raise MLXClusterError(f'{where}: missing "ssh" (the host name to ssh to)')
    ips = entry.get("ips", [])
    if not isinstance(ips, list):
        raise MLXClusterError(f'{where}: "ips" must be a list of IP addresses')
    rdma = entry.get("rdma", [])
    if not isinstance(rdma, list):
        raise MLXClusterError(f'{where}: "rdma" must be a list (one cell per host)')
    cells = [_rdma_cell(cell, where) for cell in rdma]
    slots = entry.get("slots")
    if slots is not None:
        check_rank_count(slots, f'{where}: "slots"')
    memory = entry.get("memory")
    return Host(
        ssh=_check_name(entry["ssh"], where),
        ips=tuple(_check_ip(ip, where) for ip in ips),
        slots=slots,
        rdma=tuple(cells),
        memory=None if memory is None else parse_size(memory, f'{where}: "memory"'),
    )


def _rdma_cell(cell: object, where: str) -> RdmaCell:
    """null, ``"rdma_en3"``, or ``["rdma_en3", "rdma_en4"]`` (MLX's configure_jaccl_ring)."""
    if cell is None or (isinstance(cell, str) and cell):
        return cell
    if isinstance(cell, list) and cell and all(isinstance(c, str) and c for c in cell):
        return tuple(cell)
    raise MLXClusterError(
        f'{where}: "rdma" cell {cell!r} must be null, a device name or a list of device names'
    )


def parse_json_hostfile(text: str, source: str = "hostfile") -> Placement:
    """Parse the ``mlx.launch`` list form or the ``mlx.distributed_config`` full form."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MLXClusterError(
            f"{source}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    backend = None
    envs: dict[str, str] = {}
    if isinstance(data, dict):
        if "hosts" not in data:
            raise MLXClusterError(f'{source}: a JSON object hostfile needs a "hosts" list')
        # MLX writes "backend": "" when none was chosen (prepare_ethernet_hostfile).
        backend = data.get("backend") or None
        if backend is not None and backend not in BACKENDS:
            raise MLXClusterError(
                f"{source}: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}"
            )
        raw_envs = data.get("envs", [])
        if not isinstance(raw_envs, list):
            raise MLXClusterError(f'{source}: "envs" must be a list of "NAME=value" strings')
        for item in raw_envs:
            if not isinstance(item, str) or "=" not in item:
                raise MLXClusterError(f"{source}: env {item!r} is not of the form NAME=value")
            k, v = item.split("=", 1)
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise MLXClusterError(f"{source}: {k!r} is not a valid environment variable name")
            envs[k] = v
        data = data["hosts"]
    if not isinstance(data, list):
        raise MLXClusterError(f'{source}: expected a list of hosts or an object with "hosts"')
    hosts = [_host_from_json(e, f"{source}: host {i + 1}") for i, e in enumerate(data)]
    return _placement(hosts, source, backend=backend, envs=envs)


def parse_openmpi_hostfile(text: str, source: str = "hostfile") -> Placement:
    """Parse an Open MPI hostfile: ``name [slots=N] [max_slots=M]`` per line, ``#`` comments."""
    hosts = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *opts = line.split()
        where = f"{source}: line {lineno}"
        slots = None
        for opt in opts:
            key, _, value = opt.partition("=")
            if key in ("slots", "max_slots", "max-slots"):
                if not value.isdigit() or int(value) < 1:
                    raise MLXClusterError(
                        f"{where}: {key} must be a positive number, got {value!r}"
                    )
                if key == "slots":
                    slots = int(value)
            else:
                raise MLXClusterError(f"{where}: unknown option {opt!r}; expected slots=N")
        name = _check_name(name, where)
        ips: tuple[str, ...] = ()
        try:
            ips = (str(ipaddress.ip_address(name)),)
        except ValueError:
            pass
        hosts.append(Host(name, ips, slots=slots))
    return _placement(hosts, source)


def parse_hostfile_text(text: str, source: str = "hostfile") -> Placement:
    stripped = text.lstrip()
    if not stripped:
        raise MLXClusterError(f"{source}: the hostfile is empty; list at least one host")
    if stripped[0] in "[{":
        return parse_json_hostfile(text, source)
    return parse_openmpi_hostfile(text, source)


def read_hostfile(path: str | os.PathLike[str]) -> Placement:
    """Read a hostfile from disk; JSON (mlx.launch) or Open MPI format, told apart by content."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise MLXClusterError(f"hostfile {path!r} not found: check the path") from None
    except IsADirectoryError:
        raise MLXClusterError(f"hostfile {path!r} is a directory, not a file") from None
    except PermissionError:
        raise MLXClusterError(f"hostfile {path!r} is not readable: check its permissions") from None
    except UnicodeDecodeError:
        raise MLXClusterError(f"hostfile {path!r} is not UTF-8 text") from None
    return parse_hostfile_text(text, source=path)


def parse_host_list(spec: str) -> Placement:
    """``--hosts mac1,mac2``: ssh names, optionally ``mac1=10.0.1.1`` to give the cluster IP."""
    hosts = []
    for i, item in enumerate(s.strip() for s in spec.split(",")):
        if not item:
            raise MLXClusterError(f"--hosts: empty host name at position {i + 1} in {spec!r}")
        name, _, ip = item.partition("=")
        where = f"--hosts: {item!r}"
        hosts.append(Host(_check_name(name, where), (_check_ip(ip, where),) if ip else ()))
    return _placement(hosts, "--hosts")


def _placement(
    hosts: Sequence[Host],
    source: str,
    backend: str | None = None,
    envs: dict[str, str] | None = None,
) -> Placement:
    if not hosts:
        raise MLXClusterError(f"{source}: no hosts listed; add at least one host")
    seen_names: dict[str, int] = {}
    seen_ips: dict[str, str] = {}
    for i, h in enumerate(hosts):
        if h.ssh in seen_names:
            raise MLXClusterError(
                f"{source}: host {h.ssh!r} is listed twice (entries {seen_names[h.ssh] + 1} and "
                f"{i + 1}); use slots or -n for several ranks per host"
            )
        seen_names[h.ssh] = i
        for ip in h.ips:
            if ip in seen_ips:
                raise MLXClusterError(
                    f"{source}: ip {ip} is given for both {seen_ips[ip]!r} and {h.ssh!r}; "
                    "every host needs its own cluster IP"
                )
            seen_ips[ip] = h.ssh
    per_host = tuple(h.slots or 1 for h in hosts)
    return Placement(tuple(hosts), per_host, backend=backend, envs=dict(envs or {}))


def leave_out_hosts(placement: Placement, names: Sequence[str]) -> Placement:
    """The placement on the other hosts (``restart --without``): each host's ranks as before,
    an RDMA matrix without the left-out hosts' rows and columns."""
    known = [h.ssh for h in placement.hosts]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MLXClusterError(
            f"--without {unknown[0]!r}: no such host in this cluster; its hosts are "
            f"{', '.join(known)}"
        )
    keep = [i for i, h in enumerate(placement.hosts) if h.ssh not in names]
    if not keep:
        raise MLXClusterError("--without leaves no host: keep at least one")
    hosts = tuple(
        dataclasses.replace(
            placement.hosts[i],
            rdma=tuple(placement.hosts[i].rdma[j] for j in keep)
            if placement.hosts[i].rdma
            else (),
        )
        for i in keep
    )
    return Placement(
        hosts, tuple(placement.per_host[i] for i in keep), placement.backend, placement.envs
    )


def with_ranks_per_host(placement: Placement, n: int | None) -> Placement:
    """Apply ``-n`` (ranks per host) to a host list; it must fit hosts that declare slots."""
    if n is None:
        return placement
    check_rank_count(n)
    for h in placement.hosts:
        if h.slots is not None and n > h.slots:
            raise MLXClusterError(
                f"-n {n} does not fit: host {h.ssh!r} has {h.slots} slot(s); "
                f"use -n {h.slots} or raise its slots"
            )
    return Placement(
        placement.hosts, (n,) * len(placement.hosts), placement.backend, placement.envs
    )


BACKENDS = ("mpi", "ring", "jaccl", "jaccl-ring", "any")
#: Backends that run over RDMA (a ``rdma`` matrix, one rank per host).
JACCL_BACKENDS = ("jaccl", "jaccl-ring")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise MLXClusterError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


# --------------------------------------------------------------------------- writing


def host_entry(host: Host) -> dict[str, Any]:
    """One host as MLX writes it (``Hostfile.to_json``): ssh, ips, rdma (lists, not tuples)."""
    entry: dict[str, Any] = {
        "ssh": host.ssh,
        "ips": list(host.ips),
        "rdma": [list(c) if isinstance(c, tuple) else c for c in host.rdma],
    }
    if host.memory is not None:
        entry["memory"] = host.memory
    return entry


def hostfile_json(placement: Placement) -> dict[str, Any]:
    """The full form ``mlx.distributed_config`` writes: backend (``""`` if none), envs, hosts."""
    return {
        "backend": placement.backend or "",
        "envs": [f"{k}={v}" for k, v in placement.envs.items()],
        "hosts": [host_entry(h) for h in placement.hosts],
    }


def write_hostfile(
    path: str | os.PathLike[str],
    hosts: Placement | Sequence[Mapping[str, Any]],
    *,
    backend: str | None = None,
    envs: Sequence[str] = (),
) -> Path:
    """Write an ``mlx.launch --hostfile`` JSON file (rank = list order), indented as MLX does.

    A ``Placement`` is written in the full form. Entries (dicts) without backend or envs give
    the plain list form, otherwise the full form; they are checked as the reader checks them,
    so what is written here can be read back.
    """
    if isinstance(hosts, Placement):
        data: Any = hostfile_json(hosts)
        if backend is not None:
            data["backend"] = backend
        data["envs"] += list(envs)
    else:
        entries = [dict(e) for e in hosts]
        data = entries
        if backend is not None or envs:
            data = {"backend": backend or "", "envs": list(envs), "hosts": entries}
    text = json.dumps(data, indent=4) + "\n"
    parse_json_hostfile(text, os.fspath(path))  # never write what cannot be read back
    out = Path(path)
    out.write_text(text, encoding="utf-8")
    return out
