"""``setup``'s relay: the environment crosses the notebook's link once, then goes from Mac to Mac
over the cables.

A laptop on Wi-Fi beside cabled Macs would otherwise send the whole environment once per Mac
over its Wi-Fi. The route is ``sync``'s (:mod:`.sync_plan`, from the hostfile's cable addresses
and every host's own), and so is the machinery: each Mac runs ``sync``'s receiver
(``rank.sync_receiver.receive``), which writes what it lacks into the environment directory's
staging folder while it passes every chunk on to the next Macs, each hop with a token of its own
(``rank.stream_auth``). A receiver needs a Python, and a bare Mac has none: each first gets,
over ssh, the few files of the environment's own interpreter that the receiver runs on (the
binary, its library, the standard modules it imports; about 3 % of a venv with MLX), staged
where they belong, so they are never sent twice. The tokens and the receiver's code reach each
Mac through ssh's standard input, never a command line; the notebook's hop rides ssh too
(``ssh -W`` to the first Mac's loopback), so only ssh crosses the notebook's network. Then each
Mac moves what it staged into place, as a direct setup does.

Where it cannot help, setup sends to each Mac directly and says why in one line (``prepare``
returns the reason): no cable addresses in the hostfile, a link of the notebook's own to every
Mac, hops that would cross the notebook's own network, an interpreter outside the environment,
a receiver that cannot start (:class:`RelayUnavailable`). A Mac cut off mid-relay is named with
the link that broke and gets the rest directly (:class:`RelayIncomplete`). No IPython import.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MLXClusterError
from ..rank import stream_auth
from ..rank.sync_stream import TreeStream
from . import netif, sync_plan
from .env_manifest import STAGING, Manifest, Root
from .env_setup import (
    CONNECT_TIMEOUT_S,
    MARK,
    Cancelled,
    HostListing,
    RootPlan,
    apply_root,
    eta,
    parallel,
    size_text,
    stream_root,
)
from .placement import Host

#: The receiver's modules, in import order (each imports only the ones before it).
RELAY_MODULES = ("stream_auth", "safe_dest", "broadcast_receiver", "sync_receiver")
#: Seconds a receiver has to start and answer (a cold interpreter on a busy Mac).
START_TIMEOUT_S = 60.0
#: Seconds without progress on a hop before its peer counts as gone.
STALL_S = 10.0
PROGRESS_EVERY_S = 0.5
#: What ssh runs on a Mac: a constant line that reads the program from standard input.
LAUNCH = "import sys,json;exec(json.loads(sys.stdin.readline()))"

# Runs on each Mac under ``python -I -S`` (no site, no environment variables): loads the
# receiver's modules from the sources it is sent, then takes one job a line (open a listener,
# receive) and answers each with one ``@@mcmd`` line. Standard input closing mid-job means the
# notebook went away: the process ends at once, leaving only temporary names.
DRIVER = r"""
import json, os, queue, sys, threading, types

def _load(sources):
    pkg = types.ModuleType("mcm_relay")
    pkg.__path__ = []
    sys.modules["mcm_relay"] = pkg
    for name, src in sources:
        mod = types.ModuleType("mcm_relay." + name)
        mod.__package__ = "mcm_relay"
        sys.modules[mod.__name__] = mod
        exec(compile(src, "mcm_relay/" + name + ".py", "exec"), mod.__dict__)
        setattr(pkg, name, mod)
    return sys.modules["mcm_relay.sync_receiver"]

def _say(key, value):
    sys.stdout.write("@@mcmd " + key + " " + json.dumps(value) + "\n")
    sys.stdout.flush()

def _files():
    out = {os.path.realpath(sys.executable)}
    out |= {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    try:
        with open("/proc/self/maps") as f:
            out |= {ln.split(None, 5)[5].strip() for ln in f if len(ln.split(None, 5)) == 6}
    except OSError:
        pass
    return sorted(os.path.realpath(p) for p in out if p.startswith("/"))

def _exercise(rx):
    # one real transfer over loopback, so every module a transfer loads is loaded
    import socket, tempfile
    sa = sys.modules["mcm_relay.stream_auth"]
    token, data, got = sa.new_token(), b"mcm", []
    port = rx.open_listener("127.0.0.1", token)
    entries = [("dir", "", 0, 0, 0o700, ""), ("file", "f", len(data), 0, 0o600, "")]
    with tempfile.TemporaryDirectory() as d:
        t = threading.Thread(target=lambda: got.append(
            rx.receive(token, d + "/t", entries, {"1": 0}, [], [], False, 5.0)))
        t.start()
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            w = sa.RecordWriter(s, sa.prove(s, token))
            w.write(rx.HEADER.pack(1, 0, len(data)) + data + rx.HEADER.pack(rx.END, 0, 0))
            w.flush()
        t.join(10)
    return got and got[0]["error"] is None

def _main():
    jobs, busy = queue.Queue(), threading.Event()
    def read():
        for line in sys.stdin:
            jobs.put(line)
        if busy.is_set():
            os._exit(3)
        jobs.put(None)
    threading.Thread(target=read, daemon=True).start()
    first = json.loads(jobs.get())
    rx = _load(first["sources"])
    if first.get("probe"):
        if not _exercise(rx):
            _say("error", "a transfer over loopback failed")
            return
        _say("files", _files())
        return
    _say("ready", os.getpid())
    while (line := jobs.get()) is not None:
        job = json.loads(line)
        busy.set()
        try:
            if job["op"] == "listen":
                _say("port", rx.open_listener(job["bind"], job["token"]))
            else:
                _say("result", rx.receive(job["token"], job["dest"], job["entries"], job["mine"],
                     [tuple(c) for c in job["children"]], job["child_needs"], False,
                     job["stall_s"]))
        except Exception as e:
            _say("error", type(e).__name__ + ": " + str(e))
        finally:
            busy.clear()

_main()
"""


def _sources() -> list[tuple[str, str]]:
    here = Path(__file__).resolve().parent.parent / "rank"
    return [(name, (here / f"{name}.py").read_text()) for name in RELAY_MODULES]


def _first_lines(probe: bool = False) -> str:
    """What a receiver reads first: the driver, then its modules' sources."""
    setup: dict[str, Any] = {"sources": _sources()}
    if probe:
        setup["probe"] = True
    return json.dumps(DRIVER) + "\n" + json.dumps(setup) + "\n"


class RelayUnavailable(MLXClusterError):
    """A Mac's receiver could not start, or the notebook could not reach it: setup sends to
    each Mac directly (what the relay staged is sent again and moved into place)."""


class RelayIncomplete(MLXClusterError):
    """Some Macs did not get everything over the cables (``failed``: host index -> why, in
    words); the others have it in place."""

    def __init__(self, failed: dict[int, str], completed: set[tuple[int, int]]) -> None:
        self.failed, self.completed = failed, completed  # (host, directory) in place
        super().__init__(
            "setup: "
            + "; ".join(failed[k] for k in sorted(failed))
            + ": what arrived is kept; run setup again to finish"
        )


# --------------------------------------------------------------------------- the interpreter
@dataclass(frozen=True)
class Bootstrap:
    """The environment's own interpreter as the receiver needs it: the directory that holds it,
    the binary (relative to it) and every file it reads to run the receiver."""

    root: Root
    python: str
    files: tuple[str, ...]

    def size(self) -> int:
        return sum(self.root.entries[rel].size for rel in self.files)


def bootstrap(manifest: Manifest) -> Bootstrap | str:
    """Run the receiver's imports here under the interpreter the hosts will run, and keep what
    it read from the environment's directories; or why the relay cannot run (one line)."""
    exe = os.path.realpath(manifest.python)
    root = next((r for r in manifest.roots if _inside(exe, r.path)), None)
    if root is None:
        return f"this kernel's interpreter {exe} lies outside the environment's directories"
    try:
        res = subprocess.run(
            [exe, "-I", "-S", "-c", LAUNCH],
            input=_first_lines(probe=True),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe} could not run the receiver here: {e}"
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith(f"{MARK} files ")), None)
    if line is None:
        last = (res.stderr or res.stdout).strip().splitlines()
        return f"{exe} could not run the receiver here: {last[-1] if last else res.returncode}"
    base = os.path.realpath(root.path)
    files = {
        os.path.relpath(p, base)
        for p in json.loads(line.split(" ", 2)[2])
        if _inside(p, base) and os.path.relpath(p, base) in root.entries
    }
    files |= {rel for rel, e in root.entries.items() if _is_libpython(rel) and e.kind != "d"}
    python = os.path.relpath(exe, base)
    if python not in files:
        return f"{exe} is not a file of {root.path}"
    return Bootstrap(root, python, tuple(sorted(files)))


def _inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip("/") + "/")


def _is_libpython(rel: str) -> bool:
    name = rel.rpartition("/")[2]
    return rel.startswith("lib/libpython") and (".so" in name or name.endswith(".dylib"))


# --------------------------------------------------------------------------- the route
@dataclass
class RelayPlan:
    """The route over the cables and what each host's receiver runs on."""

    route: sync_plan.SyncRoute
    boot: Bootstrap
    pythons: list[str] = field(default_factory=list)  # per host: its interpreter's path
    boot_plans: list[RootPlan | None] = field(default_factory=list)  # staged first over ssh

    def lines(self, hosts: Sequence[Host]) -> list[str]:
        """The route in words: which Mac gets the environment over this machine's link, which
        over which cable from which Mac."""
        parts = []
        for k, up in enumerate(self.route.parent):
            name = hosts[k].ssh
            if up == sync_plan.HEAD and self.route.via_management[k]:
                parts.append(f"{name} over this machine's link (ssh)")
            elif up == sync_plan.HEAD:
                parts.append(f"{name} over this machine's cable to {self.route.address[k]}")
            else:
                parts.append(
                    f"{name} over the cable from {hosts[up].ssh} to {self.route.address[k]}"
                )
        booted = sum(1 for p in self.boot_plans if p is not None)
        out = ["setup: the environment goes " + "; ".join(parts)]
        if booted:
            out.append(
                f"setup: {booted} Mac(s) first get the {size_text(self.boot.size())} of the "
                "interpreter their receiver runs on over this machine's link"
            )
        return out


def _addresses(listing: HostListing) -> list[str]:
    text = listing.addresses
    parsed = (
        netif.parse_ifconfig(text)
        if listing.values.get("os") == "Darwin"
        else netif.parse_ip_addr(text)
    )
    return [a for i in parsed.values() for a in (*i.inet, *i.inet6)]


def _ssh_address(listing: HostListing) -> str:
    parts = listing.values.get("sshconn", "").split()
    return parts[2] if len(parts) >= 3 else ""


def plan_route(hosts: Sequence[Host], listings: Sequence[HostListing]) -> sync_plan.SyncRoute | str:
    """sync's route over the cables for these hosts, or why setup sends to each Mac directly
    (one line)."""
    mgmt = {_ssh_address(lst) for lst in listings} - {""}
    cables = [ip for h in hosts for ip in h.ips if ip not in mgmt and ip != h.ssh]
    if not cables:
        return (
            "the hostfile names no cable addresses (only those ssh uses), so each Mac gets the "
            "environment over this machine's link; list the cables' addresses as each host's "
            '"ips" to relay it over them'
        )
    here = netif.local_interfaces()
    head = {name: [*i.inet, *i.inet6] for name, i in here.items() if i.inet}
    bridges = [
        name
        for name, i in here.items()
        if i.members or name.startswith("bridge") or Path(f"/sys/class/net/{name}/bridge").exists()
    ]
    nodes = [
        sync_plan.Node(h.ssh, h.ips, tuple(_addresses(lst)))
        for h, lst in zip(hosts, listings, strict=True)
    ]
    entry = [_ssh_address(lst) or h.ssh for h, lst in zip(hosts, listings, strict=True)]
    route = sync_plan.plan(nodes, head, bridges, entry)
    relayed = [k for k, up in enumerate(route.parent) if up != sync_plan.HEAD]
    if not relayed:
        return "this machine has a link of its own to every Mac: it sends to each directly"
    # a hop between two Macs on a network this machine is on (its LAN, its Wi-Fi) would carry
    # the bytes over that network a second time
    own = [ipaddress.ip_interface(a).network for addrs in head.values() for a in addrs]
    for k in relayed:
        hop = ipaddress.ip_address(route.address[k])
        if any(hop == ipaddress.ip_address(m) for m in mgmt) or any(hop in n for n in own):
            return (
                f"the hostfile's addresses lead {hosts[k].ssh} over a network this machine is "
                "on, which the relay would cross again: each Mac gets the environment over "
                "this machine's link"
            )
    return route


# --------------------------------------------------------------------------- one receiver
class Receiver:
    """One Mac's receiver: a python started over ssh, fed jobs a line each on its standard
    input, answering on its standard output."""

    def __init__(self, host: Host, ssh: list[str], python: str, lib: str | None) -> None:
        self.host = host
        q = shlex.quote
        env = f"env LD_LIBRARY_PATH={q(lib)} DYLD_LIBRARY_PATH={q(lib)} " if lib else ""
        command = f"exec {env}{q(python)} -I -S -c {q(LAUNCH)}"
        argv = [
            ssh[0], "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            *ssh[1:], host.ssh, command,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.answers: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.send_text(_first_lines())

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK + " "):
                key, _, value = line[len(MARK) + 1 :].partition(" ")
                with contextlib.suppress(ValueError):
                    self.answers.put((key, json.loads(value)))
        self.answers.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.strip():
                self.stderr = [*self.stderr[-20:], line.strip()]

    def send_text(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text)
            self.proc.stdin.flush()
        except OSError:
            pass  # it ended: its answer (None) and stderr say why

    def job(self, **job: Any) -> None:
        self.send_text(json.dumps(job) + "\n")

    def answer(self, want: str, timeout: float) -> Any:
        """The next answer, which must be ``want``; else the reason, as an error."""
        try:
            got = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise MLXClusterError(f"{self.host.ssh}: its receiver did not answer") from None
        if got is None:
            self.proc.wait()
            why = self.stderr[-1] if self.stderr else f"exit {self.proc.returncode}"
            raise MLXClusterError(f"{self.host.ssh}: its receiver ended ({why})")
        key, value = got
        if key != want:
            raise MLXClusterError(f"{self.host.ssh}: {value}")
        return value

    def close(self, wait: float = 5.0) -> None:
        """Standard input closed: the receiver ends (at once when mid-job)."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def poll(self, want: str) -> Any:
        """The answer ``want`` if it came (None while it has not); else the reason, as an
        error."""
        if self.answers.empty():
            return None
        return self.answer(want, 0)


def _tunnel(host: Host, ssh: list[str], port: int) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A socket to ``port`` on the host's loopback, carried by ssh (``ssh -W``): the notebook's
    hop crosses its network inside ssh, and the receiver listens on loopback only."""
    mine, theirs = socket.socketpair()
    argv = [
        ssh[0], "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
        *ssh[1:], "-W", f"127.0.0.1:{port}", host.ssh,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    theirs.close()
    return mine, proc


def _ended(proc: subprocess.Popen[bytes]) -> str:
    """The last line ssh said, once it ended (a tunnel that could not open)."""
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return ""
    lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    return "; ".join(lines[-2:])


# --------------------------------------------------------------------------- the transfer
def _sync_entry(rel: str, root: Root) -> tuple[str, str, int, int, int, str]:
    e = root.entries[rel]
    if e.kind == "d":
        return ("dir", rel, 0, 0, e.mode, "")
    if e.kind == "l":
        return ("link", rel, 0, 0, 0, e.target)
    return ("file", rel, e.size, e.mtime * 1_000_000_000, e.mode, "")


def _ancestors(rels: Sequence[str]) -> list[str]:
    out = {"/".join(rel.split("/")[:i]) for rel in rels for i in range(1, rel.count("/") + 1)}
    return sorted(out)


class Relay:
    """One setup's relay: the interpreters staged, a receiver on every Mac that takes part,
    then each environment directory streamed along the route and moved into place."""

    def __init__(
        self,
        hosts: Sequence[Host],
        ssh: list[str],
        plans: list[list[RootPlan]],
        relay: RelayPlan,
        show: Callable[[str, bool], None] | None,
    ) -> None:
        self.hosts, self.ssh, self.plans, self.relay, self.show = hosts, ssh, plans, relay, show
        self.route = relay.route
        self.receivers: dict[int, Receiver] = {}
        self.touched: set[tuple[int, int]] = set()  # (host, directory) a receiver wrote in
        self.completed: set[tuple[int, int]] = set()  # (host, directory) all staged
        self.failed: dict[int, str] = {}  # host: why it did not get everything
        self.got = [0] * len(hosts)  # content bytes each host received
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.done = 0  # bytes the notebook sent
        self.total = 0

    # -- the interpreters
    def stage_interpreters(self) -> None:
        """Send each Mac that lacks it the interpreter its receiver runs on, into the staging
        folder of the directory it belongs to (so the relay does not send it again)."""
        todo = [k for k, p in enumerate(self.relay.boot_plans) if p is not None]
        errors: list[str | None] = [None] * len(self.hosts)

        def one(k: int) -> None:
            plan = self.relay.boot_plans[k]
            assert plan is not None
            try:
                errors[k] = stream_root(self.hosts[k], self.ssh, plan, lambda n: None, self.stop)
            except Cancelled:
                errors[k] = "interrupted"

        threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in todo]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self.stop.set()
            for t in threads:
                t.join()
            raise
        failed = [e for e in errors if e]
        if failed:
            raise MLXClusterError("\n".join(failed))
        boot = self.relay.boot
        index = next(i for i, r in enumerate(self.plans[0]) if r.root is boot.root)
        for k in todo:
            plan, staged = self.plans[k][index], self.relay.boot_plans[k]
            assert staged is not None
            for rel in staged.send:
                if rel in plan.send and boot.root.entries[rel].kind != "d":
                    plan.send.remove(rel)
                    plan.staged.append(rel)
                    plan.bytes -= boot.root.entries[rel].size
            self.got[k] += staged.bytes

    def start_receivers(self) -> None:
        """A receiver on every Mac that receives or passes bytes on; each says it is ready."""
        needy = {k for k, ps in enumerate(self.plans) if any(p.send for p in ps)}
        taking = needy | {k for k in range(len(self.hosts)) if set(self.route.subtree(k)) & needy}
        boot = self.relay.boot
        for k in sorted(taking):
            staged = self.relay.boot_plans[k] is not None
            lib = f"{boot.root.path}/{STAGING}/lib" if staged else None
            self.receivers[k] = Receiver(self.hosts[k], self.ssh, self.relay.pythons[k], lib)
        for r in self.receivers.values():
            try:
                r.answer("ready", START_TIMEOUT_S)
            except MLXClusterError as e:
                raise RelayUnavailable(str(e)) from None

    # -- one environment directory
    def send_root(self, index: int) -> None:
        """Stream one environment directory along the route: every Mac stages what it lacks
        and passes the rest on; raises with one line per Mac that failed."""
        root = self.plans[0][index].root
        # a Mac that failed is left out from here on (and so is every Mac it fed)
        sent = [[] if k in self.failed else ps[index].send for k, ps in enumerate(self.plans)]
        if not any(sent):
            return
        # the folders above what a Mac lacks are made in its staging folder first (the ones it
        # has stay where they are; only what it lacks moves into place)
        wanted = [sorted({*send, *_ancestors(send)}) for send in sent]
        rels = sorted({rel for w in wanted for rel in w})
        where = {rel: i + 1 for i, rel in enumerate(rels)}
        entries = [("dir", "", 0, 0, 0o700, ""), *(_sync_entry(rel, root) for rel in rels)]
        mine = [{where[rel]: 0 for rel in w} for w in wanted]
        subtree: dict[int, dict[int, int]] = {}
        for k in self.receivers:
            if k in self.failed:
                continue
            merged: dict[int, int] = {}
            for j in [k, *self.route.subtree(k)]:
                merged |= mine[j]
            if merged:
                subtree[k] = merged
        self.touched |= {(k, index) for k in subtree}  # each has a staging folder now
        tokens = {k: stream_auth.new_token() for k in subtree}
        for k in subtree:
            local = self.route.parent[k] == sync_plan.HEAD and self.route.via_management[k]
            bind = "127.0.0.1" if local else self.route.address[k]
            self.receivers[k].job(op="listen", bind=bind, token=tokens[k])
        ports = {k: int(self.receivers[k].answer("port", START_TIMEOUT_S)) for k in subtree}
        for k in subtree:
            kids = [c for c in self.route.children(k) if c in subtree]
            self.receivers[k].job(
                op="receive",
                token=tokens[k],
                dest=f"{root.path}/{STAGING}",
                entries=entries,
                mine={str(i): 0 for i in mine[k]},
                children=[
                    (self.hosts[c].ssh, self.route.address[c], ports[c], tokens[c]) for c in kids
                ],
                child_needs=[{str(i): 0 for i in subtree[c]} for c in kids],
                stall_s=STALL_S,
            )
        heads = [k for k in self.route.children(sync_plan.HEAD) if k in subtree]
        streams, tunnels = self._connect(heads, ports, tokens, entries, subtree, root)
        try:
            self._pump(index, streams, {k: self.receivers[k] for k in subtree}, entries, mine)
        finally:
            for s in streams:
                s.sock.close()
            for proc in tunnels:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=5)
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()

    def _connect(
        self,
        heads: list[int],
        ports: dict[int, int],
        tokens: dict[int, str],
        entries: list[tuple[str, str, int, int, int, str]],
        subtree: dict[int, dict[int, int]],
        root: Root,
    ) -> tuple[list[TreeStream], list[subprocess.Popen[bytes]]]:
        """The notebook's streams to the Macs it feeds: through ssh to a Mac reached over the
        network ssh uses, straight over a cable of its own otherwise."""
        streams: list[TreeStream] = []
        tunnels: list[subprocess.Popen[bytes]] = []
        for k in heads:
            name = self.hosts[k].ssh
            if self.route.via_management[k]:
                sock, proc = _tunnel(self.hosts[k], self.ssh, ports[k])
                tunnels.append(proc)
            else:
                try:
                    sock = socket.create_connection((self.route.address[k], ports[k]), STALL_S)
                except OSError as e:
                    raise RelayUnavailable(
                        f"{name}: cannot reach its receiver at {self.route.address[k]}: "
                        f"{e.strerror or e}"
                    ) from None
            try:
                key = stream_auth.prove(sock, tokens[k], START_TIMEOUT_S)
            except OSError as e:
                sock.close()
                why = _ended(tunnels[-1]) if self.route.via_management[k] else ""
                # (an sshd that forwards nothing says "stdio forwarding failed")
                raise RelayUnavailable(self._refused(k, why or str(e))) from None
            sock.settimeout(STALL_S)
            streams.append(TreeStream(sock, key, Path(root.path), entries, subtree[k], name))
        return streams, tunnels

    def _refused(self, k: int, why: str) -> str:
        """Why a Mac's receiver took no connection: its own answer when it gave up (a
        folder it cannot write), else what the connection said."""
        try:
            got = self.receivers[k].answer("result", 2.0)
        except MLXClusterError as e:
            return str(e)
        if isinstance(got, dict) and got.get("error"):
            return f"{self.hosts[k].ssh}: {got['error']}"
        return f"{self.hosts[k].ssh}: its receiver refused this machine ({why})"

    def _pump(
        self,
        index: int,
        streams: list[TreeStream],
        receivers: dict[int, Receiver],
        entries: list[tuple[str, str, int, int, int, str]],
        mine: list[dict[int, int]],
    ) -> None:
        """Run the notebook's streams, showing progress, until every receiver answered; note
        which Macs finished this directory and why the others did not."""
        base = self.done
        for s in streams:
            s.start()
        results: dict[int, dict[str, Any]] = {}
        last = 0.0
        while len(results) < len(receivers):
            for k, r in receivers.items():
                if k not in results and (got := r.poll("result")) is not None:
                    results[k] = got
            self.done = base + sum(s.sent for s in streams)
            if self.show is not None and time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                self.show(self.progress(), False)
            time.sleep(0.05)
        for s in streams:
            s.join(STALL_S)
        # what the sending side saw of each broken hop, by the receiving Mac's name
        sender_saw = {s.host: s.error for s in streams if s.error}
        for res in results.values():
            for lost in res.get("lost") or []:
                who, _, why = str(lost).partition(": ")
                sender_saw[who] = why
        for k, res in results.items():
            if res.get("error"):
                self.failed[k] = self._failure(k, str(res["error"]), sender_saw)
            else:
                self.completed.add((k, index))
                self.got[k] += sum(entries[i][2] for i in mine[k])

    def _failure(self, k: int, error: str, sender_saw: dict[str, str]) -> str:
        """One Mac's failure in words: the link that broke (and from which Mac), or its own."""
        name, up = self.hosts[k].ssh, self.route.parent[k]
        if not error.startswith(("the stream from upstream", "the upstream host")):
            return f"{name}: {error}"
        why = sender_saw.get(name) or error.split(": ", 1)[-1]
        if error.startswith("the upstream host"):  # never connected: a cable out, a firewall
            source = "this machine" if up == sync_plan.HEAD else self.hosts[up].ssh
            return (
                f"{source} could not reach {name}'s receiver at {self.route.address[k]} ({why}; "
                f"is the cable in, and does {name}'s firewall let python take connections? "
                "%mlx_cluster doctor checks both)"
            )
        if up == sync_plan.HEAD:
            return f"this machine's link to {name} broke ({why})"
        return (
            f"the cable from {self.hosts[up].ssh} to {name} ({self.route.address[k]}) broke ({why})"
        )

    def progress(self, final: bool = False) -> str:
        took = time.monotonic() - self.t0
        if final:
            per = ", ".join(
                f"{h.ssh} {size_text(self.got[k])} {self._how(k)}" for k, h in enumerate(self.hosts)
            )
            return f"setup: sent {per} in {took:.1f} s"
        left = eta(self.done, self.total, took)
        line = f"setup: {size_text(self.done)} of {size_text(self.total)} over this machine's link"
        return line + (f" · {left}" if left else "")

    def _how(self, k: int) -> str:
        up = self.route.parent[k]
        if up == sync_plan.HEAD:
            return "(this machine's link)" if self.route.via_management[k] else "(a cable)"
        return f"(cable from {self.hosts[up].ssh})"

    def apply(self) -> None:
        """Each Mac removes its extras and moves what it staged into place."""
        todo = [  # a directory whose files a Mac has all staged, or that needs no bytes
            (k, p)
            for k, ps in enumerate(self.plans)
            for index, p in enumerate(ps)
            if (k, index) in self.completed or (not p.send and not p.idle)
        ]
        errors = parallel(lambda kp: apply_root(self.hosts[kp[0]], self.ssh, kp[1]), todo)
        failed = [e for e in errors if e]
        if failed:
            raise MLXClusterError("\n".join(failed))

    def close(self) -> None:
        for r in self.receivers.values():
            r.close()


def _head_bytes(route: sync_plan.SyncRoute, plans: list[list[RootPlan]]) -> int:
    """What the notebook sends: each Mac it feeds once, what any Mac downstream lacks."""
    total = 0
    for k in route.children(sync_plan.HEAD):
        for index, root in enumerate(p.root for p in plans[k]):
            rels = {rel for j in [k, *route.subtree(k)] for rel in plans[j][index].send}
            total += sum(root.entries[rel].size for rel in rels if root.entries[rel].kind == "f")
    return total


def prepare(
    hosts: Sequence[Host],
    listings: Sequence[HostListing],
    plans: list[list[RootPlan]],
    manifest: Manifest,
) -> RelayPlan | str:
    """The relay for these hosts, or why setup sends to each Mac directly (one line)."""
    route = plan_route(hosts, listings)
    if isinstance(route, str):
        return route
    boot = bootstrap(manifest)
    if isinstance(boot, str):
        return boot + ": each Mac gets the environment over this machine's link"
    relay = RelayPlan(route, boot)
    index = next(i for i, r in enumerate(manifest.roots) if r is boot.root)
    final = f"{boot.root.path}/{boot.python}"
    for ps in plans:
        plan = ps[index]
        lacking = [rel for rel in boot.files if rel in plan.send or rel in plan.staged]
        if not lacking:
            relay.pythons.append(final)
            relay.boot_plans.append(None)
            continue
        files = [rel for rel in boot.files if rel not in plan.staged]
        staged = RootPlan(boot.root, send=_ancestors(boot.files) + files)
        staged.bytes = sum(boot.root.entries[rel].size for rel in files)
        relay.pythons.append(f"{boot.root.path}/{STAGING}/{boot.python}")
        relay.boot_plans.append(staged)
    return relay


def run_relay(
    hosts: Sequence[Host],
    ssh: list[str],
    plans: list[list[RootPlan]],
    relay: RelayPlan,
    show: Callable[[str, bool], None] | None,
) -> None:
    """The whole relay (see the module docstring); an interrupt stops every Mac at once and
    keeps only what arrived whole, under the staging folders."""
    job = Relay(hosts, ssh, plans, relay, show)
    if show is not None:
        for line in relay.lines(hosts):
            show(line, True)
    try:
        job.stage_interpreters()
        job.total = _head_bytes(relay.route, plans)
        job.start_receivers()
        for index in range(len(plans[0])):
            job.send_root(index)
    except KeyboardInterrupt:
        raise MLXClusterError(
            "setup interrupted: what arrived is kept under temporary names (nothing is "
            "half-written under a final one); run setup again to resume"
        ) from None
    finally:
        job.close()
    job.apply()  # what each Mac has whole moves into place, even when another failed
    if job.failed:
        raise RelayIncomplete(job.failed, job.completed)
    if show is not None:
        show(job.progress(final=True), True)
