"""What the doctor asks of each host's Python: versions, MLX's backends, the libmpi, macOS.

This file is shipped as it is to every host (its source piped to the remote ``python -``, so
the host needs nothing of this package to answer) and imported on the head, so both sides
read versions and find libmpi the same way. It imports only the standard library and runs on
Python 3.7 and later, so a python older than the package needs still reports its version (an
older one fails with its own SyntaxError, which the doctor shows).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from typing import Any

#: The modules whose versions must match the head's; ``mlx`` is read from ``mlx.core``.
PACKAGES = ("mlx", "mpi4py", "ipyparallel", "mlx_cluster_magic")
#: Read from the installed distribution's metadata, not imported: importing ipyparallel takes
#: about 0.5 s, most of a host's probe (and of every multi-host start's pre-flight); the ranks'
#: start-up imports it anyway and says so if it cannot.
NOT_IMPORTED = ("ipyparallel",)
#: MLX's backends asked about with ``mx.distributed.is_available``.
BACKENDS = ("mpi", "ring", "jaccl")
#: How long a host waits for each peer it must reach (all peers at once).
REACH_TIMEOUT_S = 1.5
#: How long a refused connection to a peer's listener is tried again (its probe may be late).
REFUSED_RETRY_S = 3.0
#: How long a host's listener waits for its peers' connections at most.
LISTEN_S = 5.0
#: How long it waits once the probe's own tests are done.
LISTEN_GRACE_S = 1.0
#: Prefixes every line this probe prints, so a login shell's noise is never mistaken for it.
MARK = "@@mcmd"

# Open MPI's library under the names its builds use: the pip wheel (Linux, macOS), Homebrew,
# and the development symlink last (in the pip wheel ``libmpi.so`` is a linker script).
LIBMPI_NAMES = ("libmpi.so.40", "libmpi.40.dylib", "libmpi.dylib", "libmpi.so")
# ELF, Mach-O (64-bit, universal, 32-bit): what dlopen accepts.
_LIBRARY_MAGIC = (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe", b"\xce\xfa\xed\xfe")


def versions() -> dict[str, dict[str, str | None]]:
    """``{package: {"version": v}}`` or ``{package: {"error": "..."}}`` for each package."""
    out: dict[str, dict[str, str | None]] = {}
    for name in PACKAGES:
        try:
            if name in NOT_IMPORTED:
                out[name] = {"version": _installed_version(name)}
                continue
            mod = importlib.import_module("mlx.core" if name == "mlx" else name)
            v = getattr(mod, "__version__", None)
            out[name] = {"version": None if v is None else str(v)}
        except BaseException as e:  # an import may raise anything, even SystemExit
            out[name] = {"error": (type(e).__name__ + ": " + str(e)).strip()[:300]}
    return out


def _installed_version(name: str) -> str | None:
    """The version of the distribution that ``import name`` would load, without importing it."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named '{name}'")
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # importable without metadata: ask it
        v = getattr(importlib.import_module(name), "__version__", None)
        return None if v is None else str(v)


def is_loadable_library(path: str) -> bool:
    """True for a real ELF or Mach-O file; pip's ``libmpi.so`` is a linker script dlopen
    rejects."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    return magic in _LIBRARY_MAGIC


def libmpi_beside(mpiexec: str) -> str | None:
    """The libmpi of the Open MPI that ``mpiexec`` belongs to (``<prefix>/lib``), or None.

    The one search for MLX's ``MLX_MPI_LIBNAME``, used by the head and by every host.
    """
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(mpiexec)))
    for lib_dir in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib64")):
        for name in LIBMPI_NAMES:
            path = os.path.join(lib_dir, name)
            if is_loadable_library(path):
                return path
    return None


def backends(mpiexec: str | None = None) -> dict[str, bool | None]:
    """Whether MLX can use each backend here; ``{}`` when MLX itself does not import."""
    try:
        import mlx.core as mx
    except BaseException:
        return {}
    # MLX finds Open MPI through MLX_MPI_LIBNAME, as the engines do.
    lib = libmpi_beside(mpiexec or os.path.join(sys.prefix, "bin", "mpiexec"))
    if lib:
        os.environ.setdefault("MLX_MPI_LIBNAME", lib)
    out: dict[str, bool | None] = {}
    for b in BACKENDS:
        try:
            out[b] = bool(mx.distributed.is_available(backend=b))
        except BaseException:
            out[b] = None
    return out


def reach(
    targets: list[str], timeout: float = REACH_TIMEOUT_S, retry: float = REFUSED_RETRY_S
) -> dict[str, dict[str, Any]]:
    """For each ``ip:port``, whether this host reaches it: a TCP connection from here, all at
    once, each bounded by ``timeout``. The port is the listener each peer's probe opens with the
    python the ranks will run, so a refusal is tried again for ``retry`` s (the peer's probe
    may start a moment later) and then reported as ``refused``: the address answered, but
    something there (a firewall) turns the python's connections away. No route, unreachable or
    silence means the address is not reached."""
    import socket
    import threading
    import time

    out: dict[str, dict[str, Any]] = {}

    def one(target: str) -> None:
        ip, _, port = target.rpartition(":")
        ip = ip.strip("[]")
        t0 = time.monotonic()
        first = None  # when the first refusal came (wall clock, as the peer's listener's)
        try:
            while True:
                try:
                    socket.create_connection((ip, int(port)), timeout=timeout).close()
                    break
                except ConnectionRefusedError:
                    first = first or time.time()
                    if time.monotonic() - t0 > retry:
                        raise
                    time.sleep(0.05)
            res: dict[str, Any] = {"ok": True}
        except ConnectionRefusedError:
            # when: the head compares it with when the peer's listener opened (a late probe
            # refuses too, without any firewall)
            res = {"ok": True, "refused": True, "port": int(port)}
            res.update(first_try=first, last_try=time.time())
        except TimeoutError:
            res = {"ok": False, "error": f"no answer within {timeout:g} s"}
        except (OSError, ValueError) as e:
            res = {"ok": False, "error": getattr(e, "strerror", None) or str(e)}
        res["ms"] = round((time.monotonic() - t0) * 1000, 1)
        out[ip] = res

    threads = [threading.Thread(target=one, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + retry + 1)
    return out


def reach_head(spec: str, retry: float = REFUSED_RETRY_S) -> dict[str, Any]:
    """``ip:port|name``: connect to the head's test listener as the ranks' engines and status
    reports will (TCP, a refusal tried again for ``retry`` s), say who we are, and send the
    same name three times over UDP, as the busy/idle notices go."""
    import socket
    import time

    target, _, name = spec.partition("|")
    ip, _, port = target.rpartition(":")
    addr = (ip.strip("[]"), int(port))
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    t0 = time.monotonic()
    res: dict[str, Any] = {}
    while True:
        try:
            with socket.create_connection(addr, timeout=REACH_TIMEOUT_S) as conn:
                conn.sendall(name.encode() + b"\n")
            res["tcp"] = "ok"
            break
        except ConnectionRefusedError:
            if time.monotonic() - t0 > retry:
                res["tcp"] = "refused"
                break
            time.sleep(0.05)
        except (OSError, ValueError) as e:
            res["tcp"] = getattr(e, "strerror", None) or str(e) or type(e).__name__
            break
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            for _ in range(3):
                udp.sendto(name.encode(), addr)
                time.sleep(0.05)
    except OSError as e:
        res["udp_error"] = e.strerror or str(e)
    return res


class Listener:
    """TCP listeners on this host's cluster addresses, opened by the python the ranks run, for
    the peers' probes to connect to; open until ``expect`` connections from the peers came or
    the window closed (``port:expect:seconds:ip,...|peer_ip,...``). Each connection is closed
    at once, unread, so junk or silence costs nothing; only one from a peer's address
    (``peer_ip``; any, when none is given) counts, so others cannot close it early."""

    def __init__(self, spec: str) -> None:
        import socket
        import threading
        import time

        spec, _, peers = spec.partition("|")
        port, expect, window, ips = [*spec.split(":", 3), "", "", ""][:4]
        self.expect = int(expect or 0)
        self.window = min(float(window or LISTEN_S), LISTEN_S)
        self.peers = {p for p in peers.split(",") if p}
        self.accepted = 0
        self.others = 0
        self.until: float | None = None
        self.bound: dict[str, str] = {}
        self.socks: list[Any] = []
        for ip in [i for i in ips.split(",") if i]:
            try:
                s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((ip, int(port)))
                s.listen(64)
                s.settimeout(0.05)
                self.socks.append(s)
                self.bound[ip] = "ok"
            except OSError as e:
                self.bound[ip] = e.strerror or str(e)
        self.since = time.time()  # listening from (wall clock, as the peers')
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import time

        deadline = time.monotonic() + self.window
        while self.socks and self.accepted < self.expect and time.monotonic() < deadline:
            if self.until is not None:
                deadline = min(deadline, self.until)
            for s in self.socks:
                try:
                    conn, source = s.accept()
                except OSError:
                    continue
                conn.close()
                if not self.peers or _plain_ip(source[0]) in self.peers:
                    self.accepted += 1
                else:
                    self.others += 1

    def close(self) -> dict[str, Any]:
        """Wait for the peers a little longer (``LISTEN_GRACE_S``: a peer that will come is
        running by the time this probe's own tests are done), close, and say what was bound
        and accepted."""
        import time

        self.until = time.monotonic() + LISTEN_GRACE_S
        self.thread.join(self.window + 1)
        for s in self.socks:
            s.close()
        until = time.time()  # refusals after this are the closed port's, not a firewall's
        return {
            "bound": self.bound,
            "accepted": self.accepted,
            "others": self.others,
            "since": self.since,
            "until": until,
        }


def _plain_ip(address: str) -> str:
    """``::ffff:10.0.0.2`` (an IPv4 peer seen by an IPv6 socket) as ``10.0.0.2``."""
    return address[7:] if address.startswith("::ffff:") else address


def report(
    mpiexec: str | None = None,
    targets: list[str] | None = None,
    listen: str | None = None,
    head: str | None = None,
) -> dict[str, Any]:
    """Everything this probe says about the host, as JSON-ready data."""
    listener = Listener(listen) if listen else None
    retry = min(listener.window if listener else REFUSED_RETRY_S, REFUSED_RETRY_S)
    found = reach(targets, retry=retry) if targets else {}
    return {
        "reach": found,
        "head": reach_head(head, retry) if head else None,
        "listen": listener.close() if listener else None,
        "executable": sys.executable,
        "realexe": os.path.realpath(sys.executable),
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "packages": versions(),
        "backends": backends(mpiexec),
        "macos": platform.mac_ver()[0] or None,
        "libmpi": libmpi_beside(mpiexec) if mpiexec else None,
    }


def main(argv: list[str]) -> None:
    """``python - [MPIEXEC [IP:PORT,... [PORT:EXPECT:SECONDS:IP,... [IP:PORT|NAME]]]]``: print
    the report as one marked JSON line."""
    mpiexec = argv[1] if len(argv) > 1 and argv[1] else None
    targets = [t for t in argv[2].split(",") if t and t != "-"] if len(argv) > 2 else []
    listen = argv[3] if len(argv) > 3 and argv[3] != "-" else None
    head = argv[4] if len(argv) > 4 and argv[4] != "-" else None
    found = report(mpiexec, targets, listen, head)
    sys.stdout.write("\n" + MARK + " probe " + json.dumps(found) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv)
