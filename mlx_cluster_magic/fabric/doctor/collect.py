"""Asking the hosts: one ssh round trip per host, hard time limits, the answers parsed.

A shell script (below) runs first on each host, so a host without the python still reports its
tools, interfaces and routes; it then runs :mod:`.probe`'s own source under the python the ranks
will use. Every line either part prints for us starts with a marker, so a chatty login shell is
ignored. Nothing here judges; :mod:`.checks` does.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import MLXClusterError
from ..placement import Host
from . import probe
from .probe import MARK

# Runs under ``sh -s -- PYTHON FACTS REACH LISTEN HEAD PEER_IP...`` (only the arguments pass through
# the remote login shell's quoting); FACTS=1 also reads a Mac's Thunderbolt ports, cables and
# RDMA devices; REACH (``ip:port,...`` or ``-``) are the peers the python tests it reaches;
# LISTEN (``port:expect:seconds:ip,...`` or ``-``) the listener it opens for the peers' tests;
# HEAD (``ip:port|name`` or ``-``) the head's test listener it connects and sends to.
# Sections are ``MARK name-begin`` .. ``MARK name-end``; one value per ``MARK key value`` line;
# a bare ``MARK key`` is a flag.
_SH_HEAD = r"""
PY=$1
FACTS=$2
REACH=$3
LISTEN=$4
HEAD=$5
shift 5
M=@@mcmd
echo "$M begin"
OS=$(uname -s 2>/dev/null)
echo "$M os $OS"
echo "$M hostname $(hostname 2>/dev/null)"
LOGIN_PATH=$PATH
PATH=$PATH:/usr/sbin:/sbin:/usr/bin:/bin
PYPATH=
case $PY in
  */*) if [ -f "$PY" ] && [ -x "$PY" ]; then PYPATH=$PY
       elif [ -e "$PY" ]; then echo "$M python-notexec"
       else echo "$M python-missing"; fi ;;
  *) PYPATH=$(PATH=$LOGIN_PATH command -v "$PY" 2>/dev/null)
     [ -n "$PYPATH" ] || echo "$M python-missing" ;;
esac
[ -n "$PYPATH" ] && echo "$M python $PYPATH"
BIN=$(dirname "${PYPATH:-$PY}")
MPIEXEC=
for T in mpiexec prted; do
  P=
  if [ -f "$BIN/$T" ] && [ -x "$BIN/$T" ]; then P=$BIN/$T
  else P=$(PATH=$LOGIN_PATH command -v $T 2>/dev/null); fi
  if [ -n "$P" ]; then echo "$M $T $P"; else echo "$M $T-missing"; fi
  [ "$T" = mpiexec ] && MPIEXEC=$P
done
echo "$M ifaces-begin"
if [ "$OS" = Darwin ]; then
  ifconfig -a </dev/null 2>&1
elif command -v ip >/dev/null 2>&1; then
  ip -o addr show </dev/null 2>&1
  echo "$M links"
  ip -o link show </dev/null 2>&1
else
  ifconfig -a </dev/null 2>&1
fi
echo "$M ifaces-end"
for IP in "$@"; do
  echo "$M route-begin $IP"
  if [ "$OS" = Darwin ]; then route -n get "$IP" </dev/null 2>&1
  else ip -o route get "$IP" </dev/null 2>&1; fi
  echo "$M route-end"
done
if [ "$OS" = Darwin ] && [ "$FACTS" = 1 ]; then
  echo "$M hwports-begin"
  networksetup -listallhardwareports </dev/null 2>/dev/null
  echo "$M hwports-end"
  echo "$M tbprofile-begin"
  system_profiler SPThunderboltDataType -json </dev/null 2>/dev/null
  echo "$M tbprofile-end"
  if command -v ibv_devices >/dev/null 2>&1; then
    echo "$M ibv-begin"
    ibv_devices </dev/null 2>&1
    echo "$M ibv-end"
  fi
fi
if [ -n "$PYPATH" ]; then
  "$PYPATH" - "$MPIEXEC" "$REACH" "$LISTEN" "$HEAD" <<'MCMD_PY_EOF' 2>&1
"""
_SH_TAIL = r"""
MCMD_PY_EOF
  echo "$M python-rc $?"
fi
echo "$M end"
exit 0
"""


def probe_script() -> str:
    """The whole script sent to a host: the shell part with :mod:`.probe`'s source inside."""
    source = Path(probe.__file__).read_text(encoding="utf-8")
    return _SH_HEAD + source + _SH_TAIL


@dataclass
class Result:
    """A finished (or killed) command."""

    rc: int | None
    out: str
    err: str
    timed_out: bool = False


def run(argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> Result:
    """Run a command in its own process group; on timeout kill the whole group, so nothing
    it started (a remote shell's local python) lingers or holds our pipes open."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        return Result(None, "", f"{argv[0]}: {e.strerror or e}")
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        return Result(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            out, err = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:  # a process that left our group holds the pipes
            out, err = "", ""
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.wait()
        return Result(None, out or "", err or "", timed_out=True)


def ssh_argv(ssh: str | Sequence[str] | None) -> list[str]:
    """The user's ssh command as argv (``"ssh -F ~/.ssh/tb"`` splits; ``~`` is expanded)."""
    if ssh is None:
        parts = ["ssh"]
    elif isinstance(ssh, str):
        try:
            parts = shlex.split(ssh)
        except ValueError as e:
            raise MLXClusterError(f"--ssh {ssh!r} is not a valid command line: {e}") from None
    else:
        parts = [str(p) for p in ssh]
    if not parts:
        parts = ["ssh"]
    return [os.path.expanduser(p) if p.startswith("~") else p for p in parts]


@dataclass
class HostProbe:
    """What one host's script said, parsed into values, flags and sections."""

    result: Result
    started: bool = False
    finished: bool = False
    values: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    sections: dict[str, str] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)  # peer IP -> the route command's text
    info: dict[str, Any] | None = None  # the python probe's report
    python_out: str = ""  # what the python printed besides its report (an error)
    elapsed: float = 0.0
    limit: float = 0.0

    @property
    def os(self) -> str:
        return self.values.get("os", "")

    @property
    def ifaces(self) -> str:
        return self.sections.get("ifaces", "")


def parse_probe(result: Result) -> HostProbe:
    """Split the script's output into its parts; lines without the marker are kept only
    inside a section (the commands' own output) or as the python's error text."""
    probe = HostProbe(result)
    section: str | None = None
    route_ip: str | None = None
    lines: list[str] = []
    py_lines: list[str] = []
    for line in result.out.splitlines():
        if not line.startswith(MARK + " "):
            if section is not None:
                lines.append(line)
            elif "ifaces" in probe.sections and line.strip():
                py_lines.append(line)
            continue
        key, _, value = line[len(MARK) + 1 :].partition(" ")
        if section is not None and key == "links":  # the Linux link list inside ifaces
            lines.append(line)
        elif section is not None and key == f"{section}-end":
            text = "\n".join(lines)
            if section == "route" and route_ip is not None:
                probe.routes[route_ip] = text
            else:
                probe.sections[section] = text
            section, route_ip, lines = None, None, []
        elif key.endswith("-begin"):
            section, route_ip, lines = key[: -len("-begin")], value or None, []
        elif key == "begin":
            probe.started = True
        elif key == "end":
            probe.finished = True
        elif key == "probe":
            try:
                probe.info = json.loads(value)
            except json.JSONDecodeError:
                py_lines.append(value)
        elif value:
            probe.values[key] = value
        else:
            probe.flags.add(key)
    probe.python_out = "\n".join(py_lines)
    return probe


def probe_host(
    host: Host,
    ssh: list[str],
    python: str,
    timeout: float,
    peer_ips: Sequence[str] = (),
    facts: bool = True,
    reach: Sequence[str] = (),
    listen: str = "-",
    head: str = "-",
) -> HostProbe:
    """Run the script on ``host`` (or here, for a local host): one ssh round trip. ``facts``
    also reads a Mac's Thunderbolt ports, cables and RDMA devices (for the backend advice);
    the host tests that it reaches each ``ip:port`` of ``reach``, and shows its route to each
    of ``peer_ips``."""
    args = [python, "1" if facts else "0", ",".join(reach) or "-", listen, head, *peer_ips]
    if host.is_local:
        argv = ["sh", "-s", "--", *args]
        limit = timeout
    else:
        connect = max(1, math.ceil(timeout))
        argv = [
            ssh[0],
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={connect}",
            *ssh[1:],
            host.ssh,
            "sh -s -- " + " ".join(shlex.quote(a) for a in args),
        ]  # fmt: skip
        limit = connect + timeout  # connecting, then importing the packages
    t0 = time.monotonic()
    found = parse_probe(run(argv, timeout=limit, stdin=probe_script()))
    found.elapsed = time.monotonic() - t0
    found.limit = limit
    return found


def _ssh_port(host: Host, ssh: list[str], timeout: float) -> int:
    """The port ssh would use for ``host`` (``ssh -G`` applies the user's config); 22 if unsure."""
    res = run([ssh[0], *ssh[1:], "-G", host.ssh], timeout=timeout)
    for line in res.out.splitlines():
        key, _, value = line.partition(" ")
        if key.lower() == "port" and value.strip().isdigit():
            return int(value)
    return 22


class HeadListener:
    """The head's own test listener, TCP and UDP on the address the controller and the status
    channel listen on: each host's probe connects and sends its name, as its ranks will.

    It takes only what it must: a connection is closed at once, unread (the probe itself says
    whether it connected), and a datagram counts only when it is one of ``names`` (the hosts'),
    so junk, silent or many connections neither hold it up nor grow what it keeps."""

    def __init__(self, address: str, port: int, names: set[str] | frozenset[str]) -> None:
        import threading

        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.address = f"{address}:{port}"
        self.names = frozenset(names)
        self.udp_from: set[str] = set()
        self.connections = 0
        self.junk = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        try:
            tcp = socket.socket(family, socket.SOCK_STREAM)
            self._socks.append(tcp)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((address, port))
            tcp.listen(64)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            self._socks.append(udp)
            udp.bind((address, port))
        except OSError as e:
            self.error = e.strerror or str(e)
            for s in self._socks:
                s.close()
            self._socks = []
            return
        for s in self._socks:
            s.setblocking(False)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import selectors

        tcp, udp = self._socks
        with selectors.DefaultSelector() as sel:
            sel.register(tcp, selectors.EVENT_READ)
            sel.register(udp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    try:
                        self._take(tcp, udp, key.fileobj is tcp)
                    except Exception:  # never stop listening
                        self.junk += 1

    def _take(self, tcp: socket.socket, udp: socket.socket, connections: bool) -> None:
        """Everything queued on one socket (a bounded batch, so neither starves the other)."""
        for _ in range(256):
            try:
                if connections:
                    conn, _ = tcp.accept()
                    conn.close()
                    self.connections += 1
                    continue
                data, _ = udp.recvfrom(256)
            except OSError:  # nothing queued
                return
            name = data.decode(errors="replace").strip()
            if name in self.names:
                self.udp_from.add(name)
            else:
                self.junk += 1

    def close(self) -> None:
        """Let the last datagrams land, then stop and close."""
        if not self._socks:
            return
        time.sleep(0.2)
        self._stop.set()
        self._thread.join(2)
        for s in self._socks:
            s.close()


@dataclass
class Reach:
    """Whether the head reached the host's cluster IP, in words."""

    ok: bool
    detail: str


def tcp_reach(host: Host, ssh: list[str], timeout: float) -> Reach:
    """Can the head open a TCP connection to the host's cluster IP (its ssh port)?"""
    ip = host.ips[0]
    port = _ssh_port(host, ssh, timeout)
    t0 = time.monotonic()
    try:
        conn = socket.create_connection((ip, port), timeout=timeout)
    except ConnectionRefusedError:
        # The host answered (with a reset): the IP is reachable, only ssh is not on it.
        ms = (time.monotonic() - t0) * 1000
        return Reach(True, f"{ip} answers ({ms:.1f} ms; port {port} refused)")
    except TimeoutError:
        return Reach(False, f"{ip}:{port} no answer from the head within {timeout:g} s")
    except OSError as e:
        return Reach(False, f"{ip}:{port} not reachable from the head: {e.strerror or e}")
    ms = (time.monotonic() - t0) * 1000
    # A connect alone can be a middlebox's (a transparent proxy accepts anything routed through
    # it); sshd greets at once, so wait for its "SSH-" line before calling the IP reachable.
    try:
        with conn:
            conn.settimeout(max(0.1, timeout - (time.monotonic() - t0)))
            greeting = conn.recv(64)
    except OSError:
        greeting = None
    if greeting is None:
        return Reach(
            False,
            f"{ip}:{port} accepted a connection but sent no ssh greeting within {timeout:g} s "
            "(not the host: a proxy or firewall in the way?)",
        )
    if not greeting.startswith(b"SSH-"):
        return Reach(True, f"{ip} answers ({ms:.1f} ms; no ssh greeting on port {port})")
    return Reach(True, f"{ip} reachable from the head ({ms:.1f} ms)")
