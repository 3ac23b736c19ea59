"""``setup``: make every host's Python environment this kernel's, at the same absolute path.

A host needs only what a fresh Mac has: ssh with a key and the base system's tools (``sh``,
``find``, ``stat``, ``tar``, ``df``, ``uname``, ``sw_vers``). Each host lists what it has under
the environment's directories (:func:`listing_script`); the head compares that with its
manifest (:mod:`.env_manifest`) and checks every refusal (architecture, macOS major version,
a directory the ssh user cannot write, too little disk) before a byte moves. Then it streams
only the files that differ (size, whole-second mtime, permissions; with ``verify`` also the
sha256 the distributions' RECORD files state) as a tar into a staging directory inside each
environment directory, and renames them into place: a cut leaves nothing half-written under a
final name, and the next run finds what was staged and moves it without sending it again.
Extra files inside the environment's directories are removed; nothing outside them is touched.
No IPython import.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .doctor.collect import Result, run
from .env_manifest import STAGING, Entry, Manifest, Root, file_hash, record_hashes
from .placement import Host

MARK = "@@mcmd"
#: Seconds allowed for ssh to connect to a host.
CONNECT_TIMEOUT_S = 5
#: Free space a host keeps beyond what it receives.
DISK_MARGIN = 1.05

# Runs under ``sh -s -- VERIFY ROOT PRUNED ROOT PRUNED ...`` (PRUNED is ``-`` for none). One
# ``@@mcmd key value`` line per fact; each root's listing is one ``kind|size|mtime|mode|path|
# link`` line per entry, the same on GNU (Linux) and BSD (macOS) stat.
_LISTING = r"""
M=@@mcmd
VERIFY=$1
shift
OS=$(uname -s)
echo "$M os $OS"
echo "$M machine $(uname -m)"
# sw_vers(1) (macOS; man page at unix.com/man-page/osx/1/sw_vers): "-productVersion  Print just
# the value of the ProductVersion property", e.g. 10.13.1 or 14.4.1. stat(1) on macOS is BSD's:
# -f FORMAT with %HT the file type in words, %z size, %m mtime, %Lp permissions, %N the name,
# %Y a link's target (man page at unix.com/man-page/osx/1/stat).
[ "$OS" = Darwin ] && echo "$M macos $(sw_vers -productVersion 2>/dev/null)"
# The address ssh reached this host at (sshd sets SSH_CONNECTION to "client port server port")
# and every address with its prefix, for the relay's route over the cables (ifconfig(8) on
# macOS, `ip -o addr show` on Linux: fabric.netif parses both).
echo "$M sshconn $SSH_CONNECTION"
echo "$M addr-begin"
if [ "$OS" = Darwin ]; then ifconfig -a 2>/dev/null; else ip -o addr show 2>/dev/null; fi
echo "$M addr-end"
while [ $# -gt 1 ]; do
  R=$1; P=$2; shift 2
  A=$R
  while [ ! -d "$A" ]; do A=$(dirname "$A"); done
  echo "$M root $R"
  echo "$M ancestor $A"
  [ -w "$A" ] && echo "$M writable"
  echo "$M df $(df -Pk "$A" | tail -n 1)"
  [ -d "$R" ] || continue
  echo "$M list-begin"
  if [ "$OS" = Darwin ]; then
    (cd "$R" && find . \( -name __pycache__ -o -path "./$P" \) -prune -o ! -name . \
      -exec stat -f '%HT|%z|%m|%Lp|%N|%Y' {} +)
  else
    (cd "$R" && find . \( -name __pycache__ -o -path "./$P" \) -prune -o ! -name . \
      -exec env QUOTING_STYLE=literal stat -c '%F|%s|%Y|%a|%n|%N' {} +)
  fi
  echo "$M list-end"
  if [ "$VERIFY" = 1 ]; then
    echo "$M hash-begin"
    if command -v sha256sum >/dev/null 2>&1; then H="sha256sum"; else H="shasum -a 256"; fi
    (cd "$R" && find . \( -name __pycache__ -o -path "./$P" \) -prune -o -type f \
      -exec $H {} +)
    echo "$M hash-end"
  fi
done
echo "$M end"
"""

# Prints the interpreter's version and every distribution's, for the table.
_VERSIONS = r"""
import importlib.metadata as m, json, sys
d = {}
for x in m.distributions():
    n = x.metadata["Name"] if x.metadata else None
    if n:
        k = "-".join(n.replace("_", "-").replace(".", "-").lower().split("-"))
        d.setdefault(k, x.version)
v = ".".join(str(i) for i in sys.version_info[:3])
print("@@mcmd versions " + json.dumps({"python": v, "dists": d}))
"""


def listing_script() -> str:
    return _LISTING


@dataclass
class HostRoot:
    """What one host has under one environment directory."""

    path: str
    ancestor: str = ""
    writable: bool = False
    free: int | None = None  # bytes free on the ancestor's filesystem
    mount: str = ""
    final: dict[str, Entry] = field(default_factory=dict)
    staged: dict[str, Entry] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass
class HostListing:
    """One host's answer: its platform and each environment directory, or the ssh error."""

    host: str
    error: str | None = None
    values: dict[str, str] = field(default_factory=dict)
    roots: dict[str, HostRoot] = field(default_factory=dict)
    addresses: str = ""  # its `ifconfig -a` (macOS) or `ip -o addr show` (Linux) output


_KINDS = {"regular file": "f", "regular empty file": "f", "directory": "d", "symbolic link": "l"}


def parse_stat_line(line: str) -> tuple[str, Entry] | None:
    """One line of the listing (either stat's format) -> (relative path, entry)."""
    parts = line.split("|", 5)
    if len(parts) < 6:
        return None
    kind = _KINDS.get(parts[0].strip().lower())
    path = parts[4]
    if kind is None or not path.startswith("./"):
        return None
    try:
        size, mtime, mode = int(parts[1]), int(parts[2]), int(parts[3], 8)
    except ValueError:
        return None
    target = ""
    if kind == "l":  # GNU's %N is "path -> target"; BSD's %Y is the target alone
        tail = parts[5]
        target = tail[len(path) + 4 :] if tail.startswith(path + " -> ") else tail
    if kind == "f":
        return path[2:], Entry("f", size, mtime, mode & 0o7777)
    return path[2:], Entry(kind, mode=mode & 0o7777 if kind == "d" else 0, target=target)


def parse_listing(host: str, out: str) -> HostListing:
    """Split the listing script's output into facts and per-root entries."""
    found = HostListing(host)
    root: HostRoot | None = None
    section: str | None = None
    addresses: list[str] = []
    for line in out.splitlines():
        if not line.startswith(MARK + " "):
            if section == "addr":
                addresses.append(line)
            elif section == "list" and root is not None and (item := parse_stat_line(line)):
                rel, entry = item
                if rel == STAGING:
                    continue
                if rel.startswith(STAGING + "/"):
                    root.staged[rel[len(STAGING) + 1 :]] = entry
                else:
                    root.final[rel] = entry
            elif section == "hash" and root is not None:
                digest, _, path = line.partition("  ")
                if path.startswith("./"):
                    root.hashes[path[2:]] = digest.strip().lower()
            continue
        key, _, value = line[len(MARK) + 1 :].partition(" ")
        if key == "root":
            root = found.roots.setdefault(value, HostRoot(value))
        elif key.endswith("-begin"):
            section = key[: -len("-begin")]
        elif key.endswith("-end"):
            section = None
        elif root is not None and key in ("ancestor", "writable", "df"):
            _root_fact(root, key, value)
        else:
            found.values[key] = value
    found.addresses = "\n".join(addresses)
    return found


def _root_fact(root: HostRoot, key: str, value: str) -> None:
    if key == "ancestor":
        root.ancestor = value
    elif key == "writable":
        root.writable = True
    else:  # POSIX df -Pk: filesystem, 1024-blocks, used, available, capacity, mounted on
        cols = value.split()
        if len(cols) >= 6 and cols[3].isdigit():
            root.free, root.mount = int(cols[3]) * 1024, " ".join(cols[5:])


# --------------------------------------------------------------------------- the plan
@dataclass
class RootPlan:
    """What one host needs under one environment directory."""

    root: Root
    send: list[str] = field(default_factory=list)  # sent into staging (files, links, dirs)
    staged: list[str] = field(default_factory=list)  # already staged by a cut run: moved only
    remove: list[str] = field(default_factory=list)  # extras and wrong kinds, top-most only
    present_dirs: set[str] = field(default_factory=set)
    bytes: int = 0

    @property
    def files(self) -> int:
        """Files and links to send or move into place (folders not counted)."""
        sent = sum(1 for rel in self.send if self.root.entries[rel].kind != "d")
        return sent + len(self.staged)

    @property
    def wire_bytes(self) -> int:
        """What the tar stream carries: the files, a header per entry, 512-byte padding."""
        return self.bytes + 1536 * len(self.send)

    @property
    def idle(self) -> bool:
        return not (self.send or self.staged or self.remove)


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def plan_root(root: Root, have: HostRoot | None, hashes: dict[str, str] | None = None) -> RootPlan:
    """Compare the head's entries with the host's: what to send, move and remove."""
    plan = RootPlan(root)
    final = have.final if have else {}
    staged = have.staged if have else {}
    removed: set[str] = set()
    for rel, got in sorted(final.items()):
        if any(a in removed for a in _ancestors(rel)):
            continue
        want = root.entries.get(rel)
        if want is None or want.kind != got.kind:
            removed.add(rel)
            plan.remove.append(rel)
    present = {
        rel: e
        for rel, e in final.items()
        if rel not in removed and not any(a in removed for a in _ancestors(rel))
    }
    plan.present_dirs = {rel for rel, e in present.items() if e.kind == "d"}
    for rel, want in root.entries.items():
        if want.kind == "d":
            if rel not in plan.present_dirs:
                plan.send.append(rel)
            continue
        same = want.same_as(present.get(rel))
        if same and hashes is not None and want.kind == "f" and have is not None:
            same = _same_bytes(root, rel, have.hashes.get(rel), hashes)
        if same:
            continue
        if want.same_as(staged.get(rel)) and hashes is None:
            plan.staged.append(rel)
        else:
            plan.send.append(rel)
            plan.bytes += want.size if want.kind == "f" else 0
    return plan


def _same_bytes(root: Root, rel: str, theirs: str | None, hashes: dict[str, str]) -> bool:
    """Does the host's sha256 match the file here? The RECORD's hash answers when it agrees;
    a file changed since its RECORD was written is read here to be sure."""
    if theirs is None:
        return False
    if hashes.get(rel) == theirs:
        return True
    hashes[rel] = file_hash(os.path.join(root.path, rel))
    return hashes[rel] == theirs


def moves(plan: RootPlan) -> list[str]:
    """The top-most staged paths to rename into place: a directory the host lacks moves whole
    (one rename), anything else file by file."""
    tops: list[str] = []
    seen: set[str] = set()
    for rel in sorted(plan.send + plan.staged):
        top = next((a for a in _ancestors(rel) if a not in plan.present_dirs), rel)
        if top not in seen and not any(a in seen for a in _ancestors(top)):
            seen.add(top)
            tops.append(top)
    return tops


def apply_script(plan: RootPlan) -> str:
    """The shell commands that remove extras, rename the staged paths into place and drop the
    staging directory."""
    q = shlex.quote
    lines = ["set -e", f"cd {q(plan.root.path)}"]
    lines += [f"rm -rf -- {q(rel)}" for rel in plan.remove]
    for top in moves(plan):
        lines.append(f"mv -f -- {q(STAGING + '/' + top)} {q(top)}")
    lines.append(f"rm -rf -- {q(STAGING)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- refusals
def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def refusals(manifest: Manifest, listing: HostListing, plans: list[RootPlan]) -> list[str]:
    """Every reason this host cannot take the environment, one line each with its fix."""
    h, v = listing.host, listing.values
    if listing.error is not None:
        return [listing.error]
    out: list[str] = []
    system, machine = v.get("os", "?"), v.get("machine", "?")
    if (system, machine) != (manifest.system, manifest.machine):
        return [
            f"{h} is {system} {machine}, this kernel runs on {manifest.system} "
            f"{manifest.machine}: the environment's binaries cannot run there; set up hosts "
            f"of the same kind, or install the environment on {h} by hand"
        ]
    if system == "Darwin" and manifest.macos:
        theirs, ours = v.get("macos", "?"), manifest.macos
        if macos_major(theirs) != macos_major(ours):
            newer = max(theirs, ours, key=lambda x: [int(p) for p in x.split(".") if p.isdigit()])
            out.append(
                f"{h} runs macOS {theirs}, this kernel macOS {ours}: mlx-metal's wheels differ "
                f"by macOS major version; update the older Mac to macOS {macos_major(newer)} "
                "so both match, then run setup again"
            )
    need: dict[str, int] = {}
    free: dict[str, int] = {}
    for plan in plans:
        have = listing.roots.get(plan.root.path)
        if have is None:
            continue
        if not have.writable and not plan.idle:
            out.append(
                f"{h} cannot write {plan.root.path} ({have.ancestor} is not writable by the ssh "
                f"user): on {h} run `sudo mkdir -p {plan.root.path} && sudo chown $USER "
                f"{plan.root.path}`, then run setup again"
            )
        if have.free is not None:
            need[have.mount] = need.get(have.mount, 0) + plan.bytes
            free[have.mount] = have.free
    for mount, n in need.items():
        if n * DISK_MARGIN > free[mount]:
            out.append(
                f"{h} needs {size_text(n * DISK_MARGIN)} on {mount} for the environment, "
                f"{size_text(free[mount])} is free: free space there, then run setup again"
            )
    return out


def macos_major(product_version: str) -> str:
    """The major version in ``sw_vers -productVersion``'s output: the first number from
    macOS 11 on ("14.4.1" -> "14"), the first two before it ("10.13.1" -> "10.13"), when the
    first was always 10 (scriptingosx.com/2017/11/on-the-macos-version shows the output
    "10.13.1"; Apple reset the numbering with Big Sur 11.0)."""
    parts = product_version.strip().split(".")
    return ".".join(parts[:2]) if parts[0] == "10" else parts[0]


# --------------------------------------------------------------------------- ssh
def _ssh(ssh: list[str], host: Host, command: str) -> list[str]:
    return [
        ssh[0],
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
        *ssh[1:],
        host.ssh,
        command,
    ]  # fmt: skip


def _ssh_error(host: str, res: Result) -> str:
    lines = [ln for ln in (res.err or res.out).strip().splitlines() if ln.strip()]
    err = lines[-1] if lines else ("timed out" if res.timed_out else f"exit {res.rc}")
    return (
        f"{host}: ssh failed ({err}): make `ssh {host} true` work without a password "
        f"(%mlx_cluster doctor says how), then run setup again"
    )


def list_host(
    host: Host, ssh: list[str], manifest: Manifest, verify: bool, timeout: float
) -> HostListing:
    """One ssh round trip: the host's platform, and what it has under each directory."""
    args = ["1" if verify else "0"]
    for root in manifest.roots:
        args += [root.path, root.pruned[0] if root.pruned else "-"]
    command = "sh -s -- " + " ".join(shlex.quote(a) for a in args)
    res = run(_ssh(ssh, host, command), timeout=timeout, stdin=listing_script())
    if f"{MARK} end" not in res.out:
        return HostListing(host.ssh, error=_ssh_error(host.ssh, res))
    return parse_listing(host.ssh, res.out)


def host_versions(host: Host, ssh: list[str], python: str, timeout: float) -> dict[str, Any]:
    """The host's interpreter version and distributions, from its own python; ``{"error"}``
    when that python is missing or fails."""
    import json

    q = shlex.quote(python)
    command = f"if [ -x {q} ]; then {q} -; else echo '{MARK} missing'; fi"
    res = run(_ssh(ssh, host, command), timeout=timeout, stdin=_VERSIONS)
    for line in res.out.splitlines():
        if line.startswith(f"{MARK} versions "):
            data: dict[str, Any] = json.loads(line.split(" ", 2)[2])
            return data
        if line.startswith(f"{MARK} missing"):
            return {"error": f"no python at {python}"}
    last = (res.err or res.out).strip().splitlines()
    return {"error": last[-1] if last else f"exit {res.rc}"}


# --------------------------------------------------------------------------- sending
class Cancelled(Exception):
    """The setup was interrupted: every stream stops at its next write."""


def send_root(
    host: Host,
    ssh: list[str],
    plan: RootPlan,
    tick: Callable[[int], None],
    stop: threading.Event,
) -> str | None:
    """Stream the plan's files as a tar into the host's staging directory, then move them into
    place; None on success, else the error in one line."""
    if plan.send:
        err = stream_root(host, ssh, plan, tick, stop)
        if err:
            return err
    return apply_root(host, ssh, plan)


def apply_root(host: Host, ssh: list[str], plan: RootPlan) -> str | None:
    """Remove the extras and move what is staged into place; None, or the error in one line."""
    res = run(_ssh(ssh, host, "sh -s"), timeout=600, stdin=apply_script(plan))
    if res.rc != 0:
        text = (res.err or res.out).strip().splitlines()
        why = text[-1] if text else f"exit {res.rc}"
        return f"{host.ssh}: moving files into place under {plan.root.path} failed: {why}"
    return None


def stream_root(
    host: Host,
    ssh: list[str],
    plan: RootPlan,
    tick: Callable[[int], None],
    stop: threading.Event,
) -> str | None:
    """This machine's ``tar`` packs the plan's paths (names relative to the environment
    directory); what it writes goes to the host's ``tar`` through ssh, counted on the way and
    cut at once when ``stop`` is set."""
    q = shlex.quote
    stage = f"{plan.root.path}/{STAGING}"
    command = f"mkdir -p {q(stage)} && tar -x -p -o -f - -C {q(stage)}"
    with tempfile.NamedTemporaryFile("wb") as names, tempfile.TemporaryFile() as errors:
        names.write(b"".join(b"./" + os.fsencode(rel) + b"\0" for rel in plan.send))
        names.flush()
        pack = subprocess.Popen(
            ["tar", "-C", plan.root.path, "--no-recursion", "--null", "-T", names.name, "-cf", "-"],
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
        proc = subprocess.Popen(
            _ssh(ssh, host, command),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )
        assert pack.stdout is not None and proc.stdin is not None
        try:
            while chunk := os.read(pack.stdout.fileno(), 1 << 20):
                if stop.is_set():
                    raise Cancelled()
                proc.stdin.write(chunk)
                tick(len(chunk))
            proc.stdin.close()
        except Cancelled:
            for p in (pack, proc):
                p.kill()
                p.wait()
            raise
        except OSError:  # the far end went away: its error says why
            pack.kill()
            with contextlib.suppress(OSError):
                proc.stdin.close()
        pack.wait()
        proc.wait()
        pack.stdout.close()
        errors.seek(0)
        text = errors.read().decode(errors="replace").strip().splitlines()
    if pack.returncode or proc.returncode:
        why = text[-1] if text else f"exit {proc.returncode or pack.returncode}"
        return f"{host.ssh}: writing under {plan.root.path} failed: {why}"
    return None


def verify_hashes(manifest: Manifest) -> dict[str, dict[str, str]]:
    """Each root's file hashes as the distributions' RECORD files state them (a file they do
    not list, or list wrongly, is read here when a host's hash disagrees)."""
    return {root.path: record_hashes(root) for root in manifest.roots}


def eta(done: int, total: int, elapsed: float) -> str:
    """Time left at the rate so far, in words."""
    if done <= 0 or elapsed <= 0:
        return ""
    left = (total - done) / (done / elapsed)
    return f"{math.ceil(left)} s left" if left >= 0.5 else "almost done"


def parallel(fn: Callable[..., Any], items: Sequence[Any], *args: Any) -> list[Any]:
    """``fn(item, *args)`` for every item at once, results in order."""
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return list(pool.map(lambda it: fn(it, *args), items))
