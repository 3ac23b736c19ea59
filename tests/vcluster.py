"""A virtual cluster of "Macs" on one Linux machine, for multi-host tests.

Each host is a network namespace with its own hostname (a UTS namespace), a
veth cable into a bridge on the head, and an ``sshd`` listening on the host's
own IP. The head reaches every host with ``ssh -F <cluster.ssh_config> macN``,
which is exactly what Open MPI's rsh launcher needs. Needs root, iproute2,
util-linux (``unshare``) and openssh-server (``/usr/sbin/sshd``).

Everything lives under fixed names derived from ``prefix`` (namespaces
``<prefix>-mac1``..., bridge ``<prefix>br0``, veths ``<prefix>v1``..., a state
directory ``<tmp>/<prefix>-vcluster``) so that ``start()`` can tear down the
remnants of a crashed run before building anew.

With ``cables`` the hosts are also cabled point to point, as real Thunderbolt
is: a veth pair per cable straight between two namespaces, each cable its own
/30 subnet out of ``cable_subnet`` (addresses as ``mlx.distributed_config``
gives them: .1 and .2, then .5 and .6, ...). The bridge then plays the
management network (Ethernet/Wi-Fi) that ssh uses, and the head has no address
on any cable; while the hosts exist the head routes the whole cable range to
``unreachable``, so nothing aimed at a cable ever leaves the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
# sshd refuses to start without its privilege-separation directory; Debian
# normally creates it at boot (systemd tmpfiles), containers often lack it.
PRIVSEP_DIR = Path("/run/sshd")
# sshd hands its environment's PATH to sessions (before dotfiles run); give it a
# plain system one so an activated venv on the head never leaks to the "Macs".
SSHD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def skip_reason() -> str | None:
    """Say why a virtual cluster cannot be built here, or None if it can."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "virtual cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "virtual cluster needs root (network namespaces, bridge, sshd)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"virtual cluster needs `{tool}` on PATH"
    if not os.access(SSHD, os.X_OK):
        return f"virtual cluster needs {SSHD} (Debian package openssh-server)"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command quietly; raise with its stderr when ``check`` and it fails.

    A single argument is split on whitespace (all our arguments are space-free).
    """
    argv = cmd[0].split() if len(cmd) == 1 else list(cmd)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        err = proc.stderr.strip()
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
    return proc


def _keygen(path: Path, comment: str) -> None:
    """Make a passphrase-less ed25519 key pair at ``path`` and ``path``.pub."""
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _kill(pids: list[int], timeout: float = 3.0) -> None:
    """SIGTERM the given pids, then SIGKILL whatever is still alive after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


#: The PATH sshd gives a session (Debian's default), after ``path_first``.
SSH_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class VirtualCluster:
    """N namespaced "Macs" behind a bridge, each reachable over ssh by name.

    Host ``i`` (1-based) is called ``mac<i>``, lives in namespace
    ``<prefix>-mac<i>`` with IP ``subnet[10 + i]``; the head's bridge has
    ``subnet[1]``. Use distinct ``prefix`` and ``subnet`` for clusters that
    may exist at the same time.
    """

    def __init__(
        self,
        n: int = 3,
        *,
        subnet: str = "10.213.0.0/24",
        prefix: str = "mcm",
        host_prefix: str = "mac",
        cables: str | list[tuple[int, int]] | None = None,
        cable_subnet: str | None = None,
        bridged: bool = False,
        memory: dict[str, int] | None = None,
        private_dirs: list[str] | None = None,
        private_size: str = "4g",
        macos: bool | dict[str, dict[str, object]] = False,
        path_first: str | None = None,
    ) -> None:
        net = ipaddress.ip_network(subnet)
        if n < 1 or net.num_addresses < 12 + n:
            raise ValueError(f"subnet {subnet} too small for {n} hosts")
        # Interface names are limited to 15 characters by the kernel.
        if len(f"{prefix}br0") > 15 or len(f"{prefix}v{n}") > 15:
            raise ValueError(f"prefix {prefix!r} too long for interface names")
        self.n = n
        self.prefix = prefix
        self.subnet = str(net)
        self.prefixlen = net.prefixlen
        self.head_ip = str(net.network_address + 1)
        self.hosts = [f"{host_prefix}{i}" for i in range(1, n + 1)]
        self.ips = [str(net.network_address + 10 + i) for i in range(1, n + 1)]
        self.bridge = f"{prefix}br0"
        self.namespaces = [f"{prefix}-{h}" for h in self.hosts]
        self.veths = [f"{prefix}v{i}" for i in range(1, n + 1)]
        self.dir = Path(tempfile.gettempdir()) / f"{prefix}-vcluster"
        self.ssh_config = self.dir / "ssh_config"
        self.identity = self.dir / "id_ed25519"
        self.sshd_pids: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self.cables = self._cable_list(cables, n)
        self.layout = cables if isinstance(cables, str) else None  # "ring", "star-head", ...
        if self.cables and cable_subnet is None:
            raise ValueError("cables need a cable_subnet of their own")
        # A star whose master bridges its cable ports (macOS's Thunderbolt Bridge): one subnet
        # for every cable, the master's address on its bridge, the workers reach each other
        # through it.
        self.bridged = bridged
        # Directories each host sees as its own empty tmpfs (a disk of its own): every process
        # ssh starts there (prted, the ranks) lives in the host's mount namespace; the head and
        # the other hosts keep their own view of those paths.
        self.private_dirs = [str(Path(d)) for d in private_dirs or []]
        self.private_size = private_size
        # A folder put first on PATH for every ssh session on the hosts (not on the head's):
        # shims of macOS commands, as a Mac would have them.
        self.path_first = path_first
        if any(not Path(d).is_absolute() for d in self.private_dirs):
            raise ValueError("private_dirs must be absolute paths")
        if bridged and cables not in ("star", "star-head"):
            raise ValueError("bridged=True is for a star: the master bridges its cables")
        # With "ring-head" or "star-head" the head (this machine, where the notebook runs) is
        # cabled too, as index -1: one of the ring's Macs, or the star's master.
        self.head_cabled = any(-1 in c for c in self.cables)
        # Memory caps per host (bytes): the host's sshd is put in a memory cgroup (v1) of that
        # limit, so every session, prted and rank it starts is capped with it, as a smaller Mac.
        self.memory = dict(memory or {})
        self.cgroups = {h: CGROUP_ROOT / f"{prefix}-{h}" for h in self.memory}
        self.head_bridge = f"{prefix}tbb"
        self.cable_subnet = str(ipaddress.ip_network(cable_subnet)) if cable_subnet else None
        if (
            self.cable_subnet
            and 4 * len(self.cables) > ipaddress.ip_network(self.cable_subnet).num_addresses
        ):
            raise ValueError(f"cable subnet {cable_subnet} too small for {len(self.cables)} cables")
        # Head-side names while a cable is being made (they move into the namespaces at once).
        self.cable_links = [f"{prefix}c{k}" for k in range(len(self.cables))]
        # Macs as a person unpacks them (``macos``): the management port is en0, the cables
        # are the Thunderbolt ports en1, en2, ... without addresses (in the Thunderbolt Bridge,
        # as macOS ships), and macOS's network commands (tests/macos_shims.py) are on the
        # hosts' PATH only, printing real formats and applying what they are told. A dict
        # gives per-host options (sudo, macos, rdma, dock, lan, bridge, model).
        self.macos: dict[str, dict[str, object]] | None = None
        if macos:
            self.macos = {h: dict((macos if isinstance(macos, dict) else {}).get(h, {}))
                          for h in self.hosts}  # fmt: skip
        self.mgmt_iface = "en0" if self.macos is not None else "eth0"

    @staticmethod
    def _cable_list(cables: str | list[tuple[int, int]] | None, n: int) -> list[tuple[int, int]]:
        """``"mesh"``, ``"ring"`` or explicit (i, j) pairs of 0-based host indices."""
        if cables is None:
            return []
        if cables == "mesh":
            return [(i, j) for i in range(n) for j in range(i + 1, n)]
        if cables == "ring":
            return [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)]
        if cables == "star":  # host 0 is the master, cabled to every other host
            return [(0, j) for j in range(1, n)]
        if cables == "ring-head":  # head, mac1, ..., macN and back to the head
            return [(-1, 0), *[(i, i + 1) for i in range(n - 1)], (n - 1, -1)]
        if cables == "star-head":  # the head is the master
            return [(-1, j) for j in range(n)]
        if isinstance(cables, str):
            raise ValueError(f"unknown cabling {cables!r}: mesh, ring, star or a list of pairs")
        for i, j in cables:
            if not (-1 <= i < n and -1 <= j < n and i != j):
                raise ValueError(f"cable ({i}, {j}) does not join two of the {n} hosts")
        return list(cables)

    # -- cables ---------------------------------------------------------------

    def cable_ips(self, k: int) -> tuple[str, str]:
        """The two ends' addresses of cable ``k`` (a /30 each, as distributed_config does; on a
        bridged star the master's bridge address, then the worker's in the one subnet)."""
        assert self.cable_subnet is not None
        base = ipaddress.ip_network(self.cable_subnet).network_address
        if self.bridged:
            return str(base + 1), str(base + 2 + k)
        return str(base + 4 * k + 1), str(base + 4 * k + 2)

    @property
    def cable_prefixlen(self) -> int:
        assert self.cable_subnet is not None
        return ipaddress.ip_network(self.cable_subnet).prefixlen if self.bridged else 30

    def cable_iface(self, k: int, end: int) -> str:
        """Interface name of cable ``k`` inside the namespace of its ``end`` (0 or 1)."""
        i, j = self.cables[k]
        me, peer = (i, j) if end == 0 else (j, i)
        if me == -1:  # the head's end keeps its (unique) link name
            return f"{self.cable_links[k]}{'ab'[end]}"
        if self.macos is not None:  # Thunderbolt N on enN, in the host's cable order
            mine = [c for c, pair in enumerate(self.cables) if me in pair]
            return f"en{mine.index(k) + 1}"
        same = [c for c, (a, b) in enumerate(self.cables) if {a, b} == {me, peer}]
        suffix = f"c{same.index(k)}" if len(same) > 1 else ""
        return f"tb{peer + 1}{suffix}"

    def cable(self, a: str, b: str, nth: int = 0) -> int:
        """Index of the ``nth`` cable between hosts ``a`` and ``b`` (names or ips)."""
        ia, ib = self._index(a), self._index(b)
        found = [k for k, (i, j) in enumerate(self.cables) if {i, j} == {ia, ib}]
        if len(found) <= nth:
            raise KeyError(f"no cable {nth} between {a} and {b}")
        return found[nth]

    def cable_ip(self, host: str, peer: str, nth: int = 0) -> str:
        """``host``'s address on its (``nth``) cable to ``peer``."""
        k = self.cable(host, peer, nth)
        return self.cable_ips(k)[0 if self.cables[k][0] == self._index(host) else 1]

    # -- lookup -------------------------------------------------------------

    def _index(self, host: str) -> int:
        """Position of ``host`` (a name like mac2 or its IP) in the lists."""
        if host in self.hosts:
            return self.hosts.index(host)
        if host in self.ips:
            return self.ips.index(host)
        raise KeyError(f"unknown virtual host {host!r}")

    def ip(self, host: str) -> str:
        """IP address of ``host``."""
        return self.ips[self._index(host)]

    def namespace(self, host: str) -> str:
        """Network namespace name of ``host``."""
        return self.namespaces[self._index(host)]

    def veth(self, host: str) -> str:
        """Head-side veth (the bridge port) of ``host``'s cable."""
        return self.veths[self._index(host)]

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> VirtualCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> VirtualCluster:
        """Build the cluster from scratch, first removing any remnant of ours."""
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.stop()
        try:
            self._build(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self, timeout: float) -> None:
        self.dir.mkdir(mode=0o700)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        _keygen(self.identity, "vcluster")
        shutil.copy(f"{self.identity}.pub", self.dir / "authorized_keys")

        _run(f"ip link add {self.bridge} type bridge")
        _run(f"ip addr add {self.head_ip}/{self.prefixlen} dev {self.bridge}")
        _run(f"ip link set {self.bridge} up")
        for i, host in enumerate(self.hosts):
            ns, veth, ip = self.namespaces[i], self.veths[i], self.ips[i]
            _run(f"ip netns add {ns}")
            _run(f"ip link add {veth} type veth peer name {self.mgmt_iface} netns {ns}")
            _run(f"ip link set {veth} master {self.bridge}")
            _run(f"ip link set {veth} up")
            _run(f"ip netns exec {ns} ip link set lo up")
            _run(f"ip netns exec {ns} ip addr add {ip}/{self.prefixlen} dev {self.mgmt_iface}")
            _run(f"ip netns exec {ns} ip link set {self.mgmt_iface} up")
            self._start_sshd(host, ns, ip)
        self._build_cables()
        if self.macos is not None:
            from macos_state import write_states

            write_states(self)
        self._write_ssh_config()
        self._wait_ready(timeout)

    def _build_cables(self) -> None:
        if not self.cables:
            return
        # A head with no address on the cables would send there by its default route (a head
        # that bridges every cable holds the whole cable subnet itself).
        if not (self.bridged and self.cables[0][0] == -1):
            _run(f"ip route replace unreachable {self.cable_subnet}")

        def on(host_i: int) -> str:  # run a command on the head or in a host's namespace
            return "" if host_i == -1 else f"ip netns exec {self.namespaces[host_i]} "

        master = self.cables[0][0]
        bridge = self.head_bridge if master == -1 else "bridge0"
        if self.bridged:
            _run(f"{on(master)}ip link add {bridge} type bridge")
            _run(f"{on(master)}ip link set {bridge} up")
            first = self.cable_ips(0)[0]
            if self.macos is None:
                _run(f"{on(master)}ip addr add {first}/{self.cable_prefixlen} dev {bridge}")
        for k, (i, j) in enumerate(self.cables):
            link = self.cable_links[k]
            _run(f"ip link add {link}a type veth peer name {link}b")
            for end, (host_i, name) in enumerate(((i, f"{link}a"), (j, f"{link}b"))):
                iface = self.cable_iface(k, end)
                if host_i != -1:
                    _run(f"ip link set {name} netns {self.namespaces[host_i]}")
                    _run(f"{on(host_i)}ip link set {name} name {iface}")
                if self.bridged and end == 0:  # the master's port joins its bridge
                    _run(f"{on(host_i)}ip link set {iface} master {bridge}")
                elif self.macos is not None:
                    pass  # a Mac's Thunderbolt port has no address until it is given one
                else:
                    ip = f"{self.cable_ips(k)[end]}/{self.cable_prefixlen}"
                    _run(f"{on(host_i)}ip addr add {ip} dev {iface}")
                _run(f"{on(host_i)}ip link set {iface} up")

    def _start_sshd(self, host: str, ns: str, ip: str) -> None:
        """Start sshd for ``host`` in its namespace under its own hostname."""
        hdir = self.dir / host
        hdir.mkdir()
        key = hdir / "ssh_host_ed25519_key"
        _keygen(key, host)
        config = hdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {ip}",
                    "Port 22",
                    f"HostKey {key}",
                    f"PidFile {hdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    # StrictModes rejects key files under world-writable /tmp.
                    "StrictModes no",
                    "UsePAM no",
                    "PrintMotd no",
                    # Open MPI may open many sessions at once.
                    "MaxStartups 100:30:200",
                    # The hosts share the head's home: a login shell that runs `pyenv init` would
                    # rehash the head's shared shims, and a session killed mid-rehash leaves its
                    # lock, on which every later login then waits 60 s. Try once, never wait.
                    "SetEnv PYENV_REHASH_TIMEOUT=0" + self._session_env(host),
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        # `ip netns exec` and `unshare` (without --fork) both exec, so the pid we
        # get is sshd's own; sh sets the hostname inside the new UTS namespace.
        log = (hdir / "sshd.log").open("wb")
        unshare = ["unshare", "--uts"]
        mounts = ""
        if self.private_dirs:
            unshare += ["--mount", "--propagation", "private"]
            for d in self.private_dirs:
                Path(d).mkdir(parents=True, exist_ok=True)  # the mount point, on the head
                mounts += f"mount -t tmpfs -o size={self.private_size} tmpfs {d} && "
        proc = subprocess.Popen(
            [
                "ip", "netns", "exec", ns, *unshare, "sh", "-c",
                f'{mounts}{self._cgroup_mount(host)}hostname "$1" && exec {SSHD} -D -e -f "$2"',
                "sh", host, str(config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=SSHD_ENV,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self._procs.append(proc)
        self.sshd_pids.append(proc.pid)
        if host in self.memory:
            group = self.cgroups[host]
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(self.memory[host]))
            (group / "cgroup.procs").write_text(str(proc.pid))

    def _session_env(self, host: str) -> str:
        """What a virtual Mac's sessions find first on PATH (``path_first``, then macOS's
        commands with their state, when the rig has them)."""
        first = f"{self.path_first}:" if self.path_first else ""
        if self.macos is None:
            return f" PATH={first}{SSH_DEFAULT_PATH}" if first else ""
        path = f"{first}{self.dir / 'macos-bin'}:{SSHD_ENV['PATH']}"
        return f" PATH={path} MACOS_SHIM_STATE={self.dir / host / 'macos.json'}"

    def _cgroup_mount(self, host: str) -> str:
        """Shell commands that give a capped host the memory cgroup hierarchy a Linux machine
        has at /sys/fs/cgroup/memory (``ip netns exec`` mounts a fresh /sys without it), so its
        ranks can read their own limit."""
        if host not in self.memory:
            return ""
        return (
            "mount -t tmpfs cgroup_root /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/memory && "
            "mount -t cgroup -o memory memory /sys/fs/cgroup/memory && "
        )

    def _write_ssh_config(self) -> None:
        blocks = []
        for host, ip in zip(self.hosts, self.ips, strict=True):
            blocks.append(
                f"Host {host} {ip}\n"
                f"    HostName {ip}\n"
                "    User root\n"
                f"    IdentityFile {self.identity}\n"
                "    IdentitiesOnly yes\n"
                "    StrictHostKeyChecking no\n"
                f"    UserKnownHostsFile {self.dir / 'known_hosts'}\n"
                "    BatchMode yes\n"
                "    LogLevel ERROR\n"
                "    ConnectTimeout 5\n"
            )
        self.ssh_config.write_text("\n".join(blocks))

    def _wait_ready(self, timeout: float) -> None:
        """Wait until every sshd accepts connections from the head."""
        deadline = time.monotonic() + timeout
        for host, ip, proc in zip(self.hosts, self.ips, self._procs, strict=True):
            while True:
                if proc.poll() is not None:
                    log = (self.dir / host / "sshd.log").read_text(errors="replace")
                    raise RuntimeError(f"sshd for {host} exited ({proc.returncode}): {log}")
                try:
                    socket.create_connection((ip, 22), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"sshd for {host} at {ip} not reachable") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        """Tear everything down: our processes by pid, namespaces, links, state dir."""
        pids = [p for p in self.sshd_pids if _alive(p)]
        pids += self._stale_sshds()
        for ns in self.namespaces:
            pids += self._ns_pids(ns)
        _kill(sorted(set(pids)))
        for proc in self._procs:  # reap our children; never hang on a stuck one
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        self.sshd_pids.clear()
        existing = set(_run("ip", "netns", "list", check=False).stdout.split())
        for ns in self.namespaces:
            if ns in existing:
                _run("ip", "netns", "del", ns, check=False)
        for link in [*self.veths, self.bridge, self.head_bridge, *self._head_cable_links()]:
            if Path(f"/sys/class/net/{link}").exists():
                _run("ip", "link", "del", link, check=False)
        if self.cable_subnet and self._unreachable_route():
            _run("ip", "route", "del", "unreachable", self.cable_subnet, check=False)
        for group in self.cgroups.values():  # empty once its processes are reaped
            deadline = time.monotonic() + 5
            while group.exists() and time.monotonic() < deadline:
                try:
                    group.rmdir()
                except OSError:
                    time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _head_cable_links(self) -> list[str]:
        """Cable ends still in the head's namespace (a build that stopped half way)."""
        return [f"{c}{end}" for c in self.cable_links for end in "ab"]

    def _unreachable_route(self) -> bool:
        out = _run("ip", "route", "show", "type", "unreachable", check=False).stdout
        return any(line.split()[1:2] == [self.cable_subnet] for line in out.splitlines())

    def _stale_sshds(self) -> list[int]:
        """sshds of a crashed run of ours (pid file names a process on our config)."""
        found = []
        for pidfile in self.dir.glob("*/sshd.pid") if self.dir.is_dir() else []:
            try:
                pid = int(pidfile.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            # sshd rewrites its title ("sshd: /usr/sbin/sshd -D -e -f CONFIG [listener]").
            if str(pidfile.parent / "sshd_config").encode() in cmdline:
                found.append(pid)
        return found

    @staticmethod
    def _ns_pids(ns: str) -> list[int]:
        """Every process in network namespace ``ns`` (sessions, prted, ranks)."""
        if not Path(f"/run/netns/{ns}").exists():
            return []
        out = _run("ip", "netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def leftovers(self) -> list[str]:
        """Describe anything of ours still present; empty after a clean ``stop()``."""
        found = []
        existing = set(_run("ip", "netns", "list", check=False).stdout.split())
        found += [f"netns {ns}" for ns in self.namespaces if ns in existing]
        found += [
            f"link {link}"
            for link in [*self.veths, self.bridge, *self._head_cable_links()]
            if Path(f"/sys/class/net/{link}").exists()
        ]
        if self.cable_subnet and self._unreachable_route():
            found.append(f"route unreachable {self.cable_subnet}")
        if self.dir.exists():
            found.append(f"dir {self.dir}")
        found += [f"cgroup {g}" for g in self.cgroups.values() if g.exists()]
        return found

    # -- use ------------------------------------------------------------------

    def ssh(self, host: str, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a shell command on ``host`` over ssh, as Open MPI would."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), host, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def netns_exec(
        self, host: str, *cmd: str, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in ``host``'s namespace directly (no ssh: head's hostname)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace(host), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @property
    def rsh_agent(self) -> str:
        """Value for Open MPI's ssh agent parameter that uses our ssh config."""
        return f"ssh -F {self.ssh_config}"

    def mpiexec_args(self, prted: str | os.PathLike[str] | None = None) -> list[str]:
        """The ``mpiexec`` (Open MPI 5) options that launch across these hosts.

        ``--mca plm_rsh_agent`` is translated by Open MPI to PRRTE's
        ``plm_ssh_agent``; note ``--prtemca plm_rsh_agent`` and the env vars
        ``PRTE_MCA_plm_rsh_agent`` / ``OMPI_MCA_plm_rsh_agent`` are silently
        ignored (plain ``ssh`` is used and ``mac1`` does not resolve).
        ``PRTE_MCA_plm_ssh_agent`` in the environment works too. The BTLs are named as
        MLXCluster names them: the OFI one would probe libfabric for about a second per rank.
        """
        args = ["--mca", "plm_rsh_agent", self.rsh_agent]
        if prted is not None:
            args += ["--prtemca", "prte_launch_agent", str(prted)]
        args += ["--mca", "btl", "self,sm,tcp"]
        args += ["--mca", "btl_tcp_if_include", self.subnet]
        args += ["--mca", "oob_tcp_if_include", self.subnet]
        if os.geteuid() == 0:
            args.append("--allow-run-as-root")
        return args

    def hostfile(self, path: str | os.PathLike[str], form: str = "mlx", slots: int = 1) -> Path:
        """Write a hostfile: ``mlx`` (mlx.launch JSON) or ``mpi`` (Open MPI, by IP); with
        cables also the forms ``mlx.distributed_config`` writes (:meth:`mlx_config`):
        ``ethernet``, ``ring``, ``jaccl``, ``jaccl-ring``."""
        path = Path(path)
        if form in ("ethernet", "ring", "jaccl", "jaccl-ring"):
            path.write_text(json.dumps(self.mlx_config(form), indent=4))
            return path
        if form == "mlx":
            entries = [{"ssh": h, "ips": [ip]} for h, ip in zip(self.hosts, self.ips, strict=True)]
            path.write_text(json.dumps(entries, indent=2) + "\n")
        elif form == "mpi":
            path.write_text("".join(f"{ip} slots={slots}\n" for ip in self.ips))
        else:
            raise ValueError(f"unknown hostfile form {form!r}")
        return path

    def mlx_config(self, backend: str, envs: list[str] | None = None) -> dict[str, object]:
        """The hostfile ``mlx.distributed_config`` writes for these hosts and cables
        (``config.configure_ring``/``configure_jaccl``/``configure_jaccl_ring``/
        ``prepare_ethernet_hostfile``): ring gives each host its address on the cable to its
        left neighbour (hosts in order, so cables must make the ring 1-2-...-n-1); the jaccl
        forms give the management IP and ``rdma_<cable interface>`` cells, a list where two
        hosts share several cables."""
        n = len(self.hosts)
        hosts: list[dict[str, object]] = []
        for i, name in enumerate(self.hosts):
            entry: dict[str, object] = {"ssh": name, "ips": [self.ips[i]], "rdma": []}
            if backend == "ring":
                left = self.hosts[(i - 1) % n]
                count = len([1 for a, b in self.cables if {a, b} == {i, (i - 1) % n}])
                entry["ips"] = [self.cable_ip(name, left, c) for c in range(count)]
            elif backend in ("jaccl", "jaccl-ring"):
                row: list[object] = []
                for j in range(n):
                    ks = [k for k, (a, b) in enumerate(self.cables) if {a, b} == {i, j}]
                    ring_peer = j in ((i - 1) % n, (i + 1) % n)
                    if j == i or not ks or (backend == "jaccl-ring" and not ring_peer):
                        row.append(None)
                        continue
                    names = [
                        f"rdma_{self.cable_iface(k, 0 if self.cables[k][0] == i else 1)}"
                        for k in ks
                    ]
                    row.append(names[0] if len(names) == 1 else names)
                entry["rdma"] = row
            elif backend != "ethernet":
                raise ValueError(f"unknown form {backend!r}")
            hosts.append(entry)
        name = "" if backend == "ethernet" else backend
        return {"backend": name, "envs": list(envs or []), "hosts": hosts}

    def start_line(self, hostfile: str | os.PathLike[str], *flags: str, ring_port: int) -> str:
        """What a user types to start a cluster on these hosts: ``%mlx_cluster`` + this."""
        return (
            f"start --hostfile {hostfile} --ssh '{self.rsh_agent}' --ring-port {ring_port} "
            f"--timeout 60 {' '.join(flags)}"
        ).rstrip()

    @property
    def members(self) -> list[str]:
        """The cabled machines in hostfile order: ``localhost`` (the head) first when cabled."""
        return (["localhost"] if self.head_cabled else []) + self.hosts

    def _member(self, index: int) -> int:
        """Host index (-1: the head) of the ``index``-th member."""
        return index - 1 if self.head_cabled else index

    def member_ips(self, index: int) -> list[str]:
        """Every cable address of a member (a bridge's once)."""
        me = self._member(index)
        out: list[str] = []
        for k, (i, j) in enumerate(self.cables):
            for end, h in enumerate((i, j)):
                ip = self.cable_ips(k)[end]
                if h == me and ip not in out:
                    out.append(ip)
        return out

    def cabled_hostfile(self, path: str | os.PathLike[str], backend: str) -> Path:
        """The hostfile a user writes for these cables, members in order (the head as
        ``localhost`` when it is cabled): for ``ring``, as ``mlx.distributed_config`` does, each
        member's address on the cable to its left neighbour when the cables make a ring;
        otherwise every cable address (a bridge's once)."""
        n = len(self.members)
        hosts = []
        for m, name in enumerate(self.members):
            ips = self.member_ips(m)
            if backend == "ring" and self.layout in ("ring", "ring-head"):
                left = self._member((m - 1) % n)
                me = self._member(m)
                ips = [
                    self.cable_ips(k)[0 if a == me else 1]
                    for k, (a, b) in enumerate(self.cables)
                    if {a, b} == {me, left}
                ]
            hosts.append({"ssh": name, "ips": ips})
        path = Path(path)
        path.write_text(json.dumps({"backend": backend, "envs": [], "hosts": hosts}, indent=4))
        return path

    # -- faults and shaping ---------------------------------------------------

    def cable_down(self, host: str) -> None:
        """Unplug ``host``'s cable (its bridge port goes down, the peer loses carrier)."""
        _run(f"ip link set {self.veth(host)} down")

    def cable_up(self, host: str) -> None:
        """Plug ``host``'s cable back in."""
        _run(f"ip link set {self.veth(host)} up")

    def drop(self, *hosts: str, on: str | None = None, undo: bool = False) -> None:
        """Drop everything ``hosts`` send or receive on ``on`` (their management network by
        default), both ways, with each host's own firewall (iptables): the link stays up, as a
        Wi-Fi that roams or an access point that stalls. ``undo`` lets it through again."""
        verb = "-D" if undo else "-I"
        on = on or self.mgmt_iface
        for host in hosts or tuple(self.hosts):
            ns = self.namespace(host)
            _run(f"ip netns exec {ns} iptables {verb} INPUT -i {on} -j DROP")
            _run(f"ip netns exec {ns} iptables {verb} OUTPUT -o {on} -j DROP")

    def undrop(self, *hosts: str, on: str | None = None) -> None:
        self.drop(*hosts, on=on, undo=True)

    def drop_head(self, undo: bool = False) -> None:
        """Drop everything between the head and the hosts (the head's firewall, on its bridge
        port), as a laptop that sleeps or leaves: the hosts still reach one another."""
        verb = "-D" if undo else "-I"
        _run(f"iptables {verb} INPUT -i {self.bridge} -j DROP")
        _run(f"iptables {verb} OUTPUT -o {self.bridge} -j DROP")

    def pull_cable(self, k: int, plug: bool = False) -> None:
        """Pull cable ``k`` between two hosts out at one end (both ends lose their link, as a
        Thunderbolt cable's do); ``plug`` puts it back."""
        i, _ = self.cables[k]
        where = "" if i == -1 else f"ip netns exec {self.namespaces[i]} "
        _run(f"{where}ip link set {self.cable_iface(k, 0)} {'up' if plug else 'down'}")

    def shape(self, rate: str | None = "16gbit", delay: str | None = None) -> None:
        """Limit every cable, both directions, to ``rate`` and add ``delay``.

        ``delay`` needs the kernel's netem qdisc (sch_netem), which minimal
        kernels lack; ``rate`` alone uses tbf, which is nearly always present.
        """
        if delay:
            qdisc = f"netem delay {delay}" + (f" rate {rate}" if rate else "")
        elif rate:
            qdisc = f"tbf rate {rate} burst 256kb latency 50ms"
        else:
            raise ValueError("shape() needs a rate or a delay")
        for ns, veth in zip(self.namespaces, self.veths, strict=True):
            _run(f"tc qdisc replace dev {veth} root {qdisc}")
            _run(f"ip netns exec {ns} tc qdisc replace dev {self.mgmt_iface} root {qdisc}")

    def unshape(self) -> None:
        """Remove any shaping from every cable."""
        for ns, veth in zip(self.namespaces, self.veths, strict=True):
            _run(f"tc qdisc del dev {veth} root", check=False)
            _run(f"ip netns exec {ns} tc qdisc del dev {self.mgmt_iface} root", check=False)
        for k in range(len(self.cables)):
            self.shape_cable(k, None)

    def shape_cable(self, k: int, rate: str | None, delay: str | None = None) -> None:
        """Limit point-to-point cable ``k`` to ``rate`` both ways (None: unshaped again)."""
        for end, host_i in enumerate(self.cables[k]):
            iface = self.cable_iface(k, end)
            # the head's end (-1) is in the head's own namespace
            on = "" if host_i == -1 else f"ip netns exec {self.namespaces[host_i]} "
            if rate is None and delay is None:
                _run(f"{on}tc qdisc del dev {iface} root", check=False)
                continue
            if delay:
                qdisc = f"netem delay {delay}" + (f" rate {rate}" if rate else "")
            else:
                qdisc = f"tbf rate {rate} burst 256kb latency 50ms"
            _run(f"{on}tc qdisc replace dev {iface} root {qdisc}")
