"""Which hosts the head cannot hear, and what that silence means: evidence, never silence alone.

Silence has several causes, each with its own answer:

- every remote host silent at once: the notebook's own link (Wi-Fi roaming, a lid closed a
  moment). Nothing is lost by waiting, so the hosts read ``unreachable`` until the grace ends;
  only then is the cluster ``lost``.
- one host silent while the others report: that host or its only cable. The head asks the hosts
  that still report (over ssh, which does not need the silent host) to reach it on its cluster
  addresses; when none can, the host is ``lost``, named at once with what was tried.
- a host silent whose ssh port still answers the head: the network is fine. The host is asked
  over ssh whether its ranks' processes still run: they do (their status threads are starved by
  a C call holding the GIL): ``quiet``, and the ranks read ``unresponsive``; a process gone is
  evidence of a death (``gone``). Until a silent host has been judged, its ranks read
  ``unreachable``: silence alone says nothing of the process.

A reachability probe is a TCP connection: an answer, even a refusal, proves the path; only a
timeout or an unreachable route counts against it. The keeper runs in its own thread; the
cluster reads ``verdicts()`` and is told once when the grace ends (``on_lost``). No IPython.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..fabric.placement import Placement
from .health import Breakage

#: A host none of whose ranks reported for this long is checked (reports come every 0.5 s).
SILENT_AFTER_S = 1.2
#: How often the keeper looks.
PERIOD_S = 0.5
#: Seconds a probe from the head (or from a peer) waits for a path to answer.
PROBE_TIMEOUT_S = 0.7
#: How often a host's verdict is checked again while it stays silent.
RECHECK_S = 3.0

#: Run on a peer with the environment's python: which ``ip:port`` answer (a refusal answers).
_PEER_PROBE = """
import json, socket, sys, threading
found = {}
def probe(target):
    ip, port = target.rsplit(":", 1)
    try:
        socket.create_connection((ip.strip("[]"), int(port)), timeout=float(sys.argv[1])).close()
        found[target] = True
    except ConnectionRefusedError:
        found[target] = True
    except OSError:
        found[target] = False
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[2:]]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(found))
"""


@dataclass(frozen=True)
class HostVerdict:
    """What the head knows of a silent host: ``unreachable`` (waiting), ``lost`` (no one
    reaches it), ``quiet`` (it answers and its ranks' processes run) or ``gone`` (it answers
    and ``gone_ranks`` have no process)."""

    host: str
    state: str
    silent_since: float  # time.monotonic() of the host's last word
    detail: str
    gone_ranks: tuple[int, ...] = ()


def answers(ip: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``ip:port`` answers a TCP connection from here (a refusal is an answer)."""
    try:
        socket.create_connection((ip, port), timeout=timeout).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True


#: Run on a host with sh: which of the given pids still run (``kill -0``: ours, same user).
_ALIVE_PROBE = 'for p in "$@"; do kill -0 "$p" 2>/dev/null && echo "$p"; done; echo end'


def ask_alive(
    host: str, pids: Sequence[int], *, ssh: str | None, timeout: float
) -> set[int] | None:
    """Which of ``pids`` run on ``host`` (asked over ssh); None when the host could not be
    asked."""
    argv = [
        *shlex.split(ssh or "ssh"),
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=2",
        host,
        "sh -c " + shlex.quote(_ALIVE_PROBE) + " sh " + " ".join(str(int(p)) for p in pids),
    ]  # fmt: skip
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.split()
    if "end" not in lines:
        return None
    return {int(x) for x in lines if x.isdigit()}


def ask_peer(
    peer: str, targets: Sequence[str], *, ssh: str | None, python: str, timeout: float
) -> dict[str, bool] | None:
    """Ask ``peer`` (over ssh) which of ``targets`` (``ip:port``) it reaches; None when the
    peer itself could not be asked."""
    argv = [
        *shlex.split(ssh or "ssh"),
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=2",
        peer,
        " ".join(shlex.quote(a) for a in [python, "-c", _PEER_PROBE, f"{timeout:g}", *targets]),
    ]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return {str(k): bool(v) for k, v in found.items()} if isinstance(found, dict) else None


class LivenessKeeper:
    """Watches the silence of every remote host and turns it into verdicts with evidence.

    ``silence()`` gives, per rank, the seconds since its last report (None before the first);
    ``addresses`` the address ssh reaches each host at (the management network); ``ssh_port``
    the port that answers there.
    """

    def __init__(
        self,
        placement: Placement,
        silence: Callable[[], Mapping[int, float | None]],
        *,
        addresses: Mapping[str, str],
        grace: float,
        on_lost: Callable[[Breakage], None],
        ssh: str | None = None,
        python: str = "python3",
        ssh_port: int = 22,
        pids: Callable[[], Mapping[int, int]] = dict,
    ) -> None:
        self.placement = placement
        self.grace = grace
        self._silence = silence
        self._addresses = dict(addresses)
        self._on_lost = on_lost
        self._ssh, self._python, self._port = ssh, python, ssh_port
        self._pids = pids
        self._verdicts: dict[str, HostVerdict] = {}
        self._checked_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._told = False
        self._thread = threading.Thread(target=self._run, name="mlx-cluster-liveness", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ reading
    def verdicts(self) -> dict[str, HostVerdict]:
        """Host -> verdict, for the silent hosts only."""
        with self._lock:
            return dict(self._verdicts)

    def lost_ranks(self) -> dict[int, str]:
        """Ranks on hosts that no one can reach, with the evidence in words."""
        lost = {h: v.detail for h, v in self.verdicts().items() if v.state == "lost"}
        return {
            r: lost[h.ssh] for r, h in enumerate(self.placement.ranks) if h.ssh in lost
        }

    def gone_ranks(self) -> dict[int, str]:
        """Ranks whose host answers but has no process for them (asked over ssh)."""
        return {
            r: v.detail for v in self.verdicts().values() if v.state == "gone" for r in v.gone_ranks
        }

    def quiet_hosts(self) -> dict[str, str]:
        """Silent hosts that answer and whose ranks' processes run: host -> what was seen."""
        return {h: v.detail for h, v in self.verdicts().items() if v.state == "quiet"}

    def close(self) -> None:
        """Stop watching; a probe under way ends within its own time bound."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=0.5)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self._look()
            except Exception:  # a probe's surprise must not end the watch
                continue

    def host_silence(self) -> dict[str, float]:
        """Remote host -> seconds since any of its ranks last reported (hosts that reported)."""
        ages = self._silence()
        out: dict[str, float] = {}
        for r, host in enumerate(self.placement.ranks):
            age = ages.get(r)
            if host.is_local or age is None:
                continue
            out[host.ssh] = min(age, out.get(host.ssh, age))
        return out

    def _look(self) -> None:
        now = time.monotonic()
        silence = self.host_silence()
        silent = {h: s for h, s in silence.items() if s > SILENT_AFTER_S}
        with self._lock:
            for host in list(self._verdicts):
                if host not in silent:  # it spoke again: whatever it was, it is over
                    del self._verdicts[host]
                    self._checked_at.pop(host, None)
        witnesses = [h for h in silence if h not in silent]
        for host, age in silent.items():
            old = self._verdicts.get(host)
            if old is not None and old.state in ("lost", "gone"):
                continue
            if now - self._checked_at.get(host, 0.0) < RECHECK_S and old is not None:
                continue
            self._checked_at[host] = now
            verdict = self._judge(host, now - age, witnesses)
            with self._lock:
                if verdict is None:
                    self._verdicts.pop(host, None)
                else:
                    self._verdicts[host] = verdict
        self._check_grace(now)

    def _judge(self, host: str, since: float, witnesses: Sequence[str]) -> HostVerdict | None:
        """What the silence of ``host`` means, from what answers."""
        address = self._addresses.get(host)
        if address is not None and answers(address, self._port):
            return self._processes_on(host, since)
        with self._lock:  # the views say so while the peers are asked
            if host not in self._verdicts:
                self._verdicts[host] = HostVerdict(
                    host, "unreachable", since, "asking the other hosts"
                )
        if not witnesses:
            return HostVerdict(
                host, "unreachable", since,
                "no host answers the notebook: its own network is down? waiting",
            )  # fmt: skip
        targets = self._addresses_of(host)
        with ThreadPoolExecutor(max_workers=len(witnesses)) as pool:
            replies = list(
                pool.map(
                    lambda w: ask_peer(
                        w, targets, ssh=self._ssh, python=self._python, timeout=PROBE_TIMEOUT_S
                    ),
                    witnesses,
                )
            )
        asked = [w for w, r in zip(witnesses, replies) if r is not None]
        if any(any(r.values()) for r in replies if r is not None):
            return HostVerdict(
                host, "unreachable", since, "the other hosts still reach it; waiting"
            )
        if not asked:
            return HostVerdict(host, "unreachable", since, "waiting")
        tried = ", ".join(targets)
        return HostVerdict(
            host,
            "lost",
            since,
            f"{host} cannot be reached: not from the notebook, nor from "
            f"{', '.join(asked)} (tried {tried}): a pulled cable or a Mac that slept",
        )

    def _processes_on(self, host: str, since: float) -> HostVerdict:
        """A host that answers the head: do its ranks' processes still run?"""
        known = self._pids()
        ranks = {
            r: known[r] for r, h in enumerate(self.placement.ranks) if h.ssh == host and r in known
        }
        running = ask_alive(host, list(ranks.values()), ssh=self._ssh, timeout=PROBE_TIMEOUT_S * 3)
        if running is None:
            return HostVerdict(host, "unreachable", since, "it answers, but ssh to it does not")
        gone = tuple(r for r, pid in ranks.items() if pid not in running)
        if gone:
            pids = ", ".join(str(ranks[r]) for r in gone)
            return HostVerdict(
                host, "gone", since, f"no process {pids} on {host} (asked over ssh)", gone
            )
        return HostVerdict(
            host, "quiet", since,
            "process alive (asked over ssh); status reports stopped (a long C call holding "
            "the GIL?)",
        )  # fmt: skip

    def _addresses_of(self, host: str) -> list[str]:
        """Every address of ``host`` a peer could reach it at: its cluster addresses, then the
        management one."""
        found = next((h for h in self.placement.hosts if h.ssh == host), None)
        ips = list(found.ips) if found is not None else []
        address = self._addresses.get(host)
        if address is not None and address not in ips:
            ips.append(address)
        return [f"[{ip}]:{self._port}" if ":" in ip else f"{ip}:{self._port}" for ip in ips]

    def _check_grace(self, now: float) -> None:
        """Tell the cluster once when a host has been out of reach for longer than the grace."""
        if self._told:
            return
        waiting = [v for v in self.verdicts().values() if v.state == "unreachable"]
        overdue = [v for v in waiting if now - v.silent_since > self.grace]
        if not overdue:
            return
        self._told = True
        hosts = ", ".join(sorted(v.host for v in overdue))
        everyone = len(waiting) == len({h.ssh for h in self.placement.hosts if not h.is_local})
        what = "the notebook's network" if everyone else "the network to them"
        advice = "%mlx_cluster restart brings it back once the network is back"
        self._on_lost(
            Breakage(
                f"lost: no word from {hosts} for more than the {self.grace:g} s grace ({what} "
                "is down?)",
                advice if everyone else f"{advice}, or restart --without {overdue[0].host}",
                "network",
                tuple(sorted(v.host for v in overdue)),
            )
        )
