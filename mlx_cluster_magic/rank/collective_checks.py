"""Checked collectives: compare each collective's signature across the ranks *before* MLX runs it.

``enable(timeout)`` (run on every rank) hooks the flight recorder: before each collective on the
world group, the ranks exchange (op, shape, dtype, sequence number, line) over a side channel,
a duplicate of MPI's world communicator, with nonblocking messages that a rank can abandon:

1. each rank sends its signature for ``(channel, seq)`` to its peers and waits for theirs;
2. when all have arrived and agree, it sends ``commit`` and waits for every peer's ``commit``;
   only then does MLX run the collective.

A peer that does not arrive within the timeout makes the waiting ranks send ``abort`` for that
``(channel, seq)`` and raise :class:`CollectiveTimeout`, naming the missing ranks and their last
known collective. Signatures that differ raise :class:`CollectiveMismatch` on every rank. A rank
that arrives after the others gave up finds their ``abort`` (messages between two ranks arrive in
order, and carry their sequence number, so a late message is never taken for a new one) and
raises :class:`CollectiveAbandoned` instead of entering a collective nobody else will join. A
rank that skipped the collective altogether learns of the others' ``abort`` at the start of its
next cell and moves its sequence number past it, so the next cell lines up again.

send/recv are checked pairwise on their own channel (``world:src>dst``, numbered per pair).
Collectives on subgroups (``group.split``) are recorded but not checked: MLX does not say which
world ranks a subgroup holds. No IPython import at module level.
"""

from __future__ import annotations

import time
from typing import Any

from . import flight_recorder

TAG = 0x4D43
#: Seconds of busy polling before the wait starts sleeping between polls.
SPIN_S = 0.002


class CollectiveCheckError(RuntimeError):
    """A checked collective did not run: the ranks disagree or one did not arrive."""


class CollectiveMismatch(CollectiveCheckError):
    """The ranks issued different collectives at the same sequence number."""


class CollectiveTimeout(CollectiveCheckError):
    """A rank did not reach the collective within the timeout."""


class CollectiveAbandoned(CollectiveCheckError):
    """The other ranks gave up on this collective before this rank reached it."""


def describe(sig: dict[str, Any]) -> str:
    """``all_sum float32[4]``, ``send float32[2] to rank 1``."""
    shape = ",".join(str(s) for s in sig["shape"])
    text = f"{sig['op']} {sig['dtype']}[{shape}]"
    if sig.get("peer") is not None:
        text += f" {'to' if sig['op'] == 'send' else 'from'} rank {sig['peer']}"
    return text


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))


class Checker:
    """One rank's side of the protocol; the module keeps one while checks are on."""

    def __init__(self, timeout: float) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.timeout = float(timeout)
        self.comm: Any = MPI.COMM_WORLD.Dup()
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        # (src, channel, seq) -> {"sig": ..., "commit": True, "abort": {...}}
        self.inbox: dict[tuple[int, str, int], dict[str, Any]] = {}
        self.last_sig: dict[int, dict[str, Any]] = {}
        self.sends: list[Any] = []
        self.failures = 0
        self.last_error = ""

    # ------------------------------------------------------------------ messages
    def pump(self) -> None:
        """Take every message that has arrived into the inbox; forget finished sends."""
        MPI, comm = self.MPI, self.comm
        status = MPI.Status()
        while comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status):
            src = status.Get_source()
            kind, channel, seq, body = comm.recv(source=src, tag=TAG)
            self.inbox.setdefault((src, channel, seq), {})[kind] = body
            if kind == "sig":
                self.last_sig[src] = body
        if self.sends:
            self.sends = [r for r in self.sends if not r.Test()]

    def post(self, peers: list[int], kind: str, channel: str, seq: int, body: Any) -> None:
        for p in peers:
            self.sends.append(self.comm.isend((kind, channel, seq, body), dest=p, tag=TAG))

    def _wait(self, done: Any, deadline: float) -> bool:
        start = time.monotonic()
        pause = 0.0002
        while True:
            self.pump()
            if done():
                return True
            now = time.monotonic()
            if now > deadline:
                return False
            if now - start > SPIN_S:
                time.sleep(pause)
                pause = min(pause * 2, 0.005)

    def _flush(self, deadline: float) -> None:
        """Wait until our own messages have left: a rank inside a native collective of the
        ring backend makes no MPI progress, so its commit must be out before it goes in."""
        while self.sends and time.monotonic() < deadline:
            self.sends = [r for r in self.sends if not r.Test()]

    # ------------------------------------------------------------------ the check
    def check(self, rec: flight_recorder.Record) -> None:
        __tracebackhide__ = True  # the error names the ranks and lines; hide this machinery
        _index, key, seq, op, shape, dtype, peer, code, offset, _t = rec
        if key == "world":
            channel, peers = key, [r for r in range(self.size) if r != self.rank]
        elif key.startswith("world:") and peer is not None:
            channel, peers = key, [int(peer)]
        else:
            return  # a subgroup: recorded, not checked
        if not peers:
            return
        sig = {
            "op": "recv" if op == "recv_like" else op,
            "shape": [int(s) for s in shape],
            "dtype": flight_recorder._dtype_name(dtype),
            "peer": peer,
            "seq": seq,
            "where": flight_recorder.site(code, flight_recorder._line(code, offset)),
            "rank": self.rank,
        }
        try:
            self._check(channel, seq, sig, peers)
        except CollectiveCheckError as e:
            self.failures += 1
            self.last_error = str(e)
            raise
        except BaseException:
            # Interrupted while waiting: the others must not go into the collective.
            self.post(peers, "abort", channel, seq, {"sig": sig, "why": "interrupted"})
            self._flush(time.monotonic() + 1.0)
            raise
        finally:
            self._forget(channel, seq)

    def _check(self, channel: str, seq: int, sig: dict[str, Any], peers: list[int]) -> None:
        __tracebackhide__ = True
        what = f"collective #{seq} {describe(sig)} ({sig['where']})"
        started = time.monotonic()
        self.pump()
        self.post(peers, "sig", channel, seq, sig)
        box = self.inbox

        def entry(p: int) -> dict[str, Any]:
            return box.get((p, channel, seq), {})

        def arrived() -> bool:
            return all("sig" in entry(p) or "abort" in entry(p) for p in peers)

        ok = self._wait(arrived, started + self.timeout)
        if all("sig" in entry(p) for p in peers):
            sigs = {self.rank: sig, **{p: entry(p)["sig"] for p in peers}}
            if not _agree(channel, sigs):
                text = _mismatch_text(seq, sigs)
                self.post(
                    peers, "abort", channel, seq, {"sig": sig, "why": "mismatch", "text": text}
                )
                self._flush(time.monotonic() + 1.0)
                raise CollectiveMismatch(text)
        gave_up = [p for p in peers if "abort" in entry(p)]
        reasons = [entry(p)["abort"] for p in gave_up]
        # Peers that gave up first waiting for ranks this one waits for too: the same timeout,
        # not this rank's lateness (which of the waiting ranks times out first is chance).
        timeouts = [r for r in reasons if r.get("why") == "timeout"]
        silent = [p for p in peers if "sig" not in entry(p)]
        same_wait = bool(
            timeouts and silent and all(self.rank not in r.get("missing", ()) for r in timeouts)
        )
        if gave_up and not same_wait:
            self.post(peers, "abort", channel, seq, {"sig": sig, "why": "abandoned"})
            self._flush(time.monotonic() + 1.0)
            found = next((r["text"] for r in reasons if r.get("why") == "mismatch"), None)
            if found:
                raise CollectiveMismatch(found)
            waited = max(float(r.get("waited", 0.0)) for r in reasons)
            raise CollectiveAbandoned(
                f"{what} was abandoned by {_ranks(gave_up)}: they waited {waited:.0f} s for "
                f"rank {self.rank}, which reached it too late; the cell failed, the cluster is "
                "still running"
            )
        if not ok or same_wait:
            missing = silent
            self.post(
                peers,
                "abort",
                channel,
                seq,
                {"sig": sig, "why": "timeout", "waited": self.timeout, "missing": missing},
            )
            self._flush(time.monotonic() + 1.0)
            where = "; ".join(self._last_seen(p) for p in missing)
            raise CollectiveTimeout(
                f"{what}: {_ranks(missing)} did not arrive within {self.timeout:g} s ({where}); "
                "the cell failed, the cluster is still running (cluster.why() shows where every "
                "rank is)"
            )
        self.post(peers, "commit", channel, seq, True)

        def committed() -> bool:
            return all("commit" in entry(p) or "abort" in entry(p) for p in peers)

        self._wait(committed, time.monotonic() + self.timeout)
        refused = [p for p in peers if "commit" not in entry(p)]
        if refused:
            self.post(peers, "abort", channel, seq, {"sig": sig, "why": "abandoned"})
            self._flush(time.monotonic() + 1.0)
            raise CollectiveAbandoned(
                f"{what} was abandoned by {_ranks(refused)} just as rank {self.rank} arrived; "
                "the cell failed, the cluster is still running"
            )
        self._flush(time.monotonic() + self.timeout)

    def _last_seen(self, rank: int) -> str:
        last = self.last_sig.get(rank)
        if last is None:
            return f"rank {rank} has issued no checked collective yet"
        return f"rank {rank}'s last was #{last['seq']} {describe(last)} at {last['where']}"

    def _forget(self, channel: str, seq: int) -> None:
        for k in [k for k in self.inbox if k[1] == channel and k[2] <= seq]:
            del self.inbox[k]

    # ------------------------------------------------------------------ cell start
    def resync(self) -> list[str]:
        """Move past collectives the others abandoned while this rank never reached them
        (it skipped them). Called before each cell; returns what was skipped."""
        # A message that has just arrived shows up only on the second progress round.
        for _ in range(3):
            self.pump()
        skipped = []
        while True:
            moved = False
            for src, channel, seq in sorted(self.inbox):
                body = self.inbox[(src, channel, seq)]
                if "abort" in body and seq == flight_recorder.next_seq(channel):
                    flight_recorder.advance(channel, seq)
                    theirs = body["abort"].get("sig") or {}
                    skipped.append(
                        f"#{seq} {describe(theirs)} ({theirs.get('where', '?')}) on rank {src}"
                        if theirs
                        else f"#{seq} on rank {src}"
                    )
                    self._forget(channel, seq)
                    moved = True
                    break
            if not moved:
                break
        # Messages about collectives this rank has issued already are stale.
        for k in [k for k in self.inbox if k[2] < flight_recorder.next_seq(k[1])]:
            del self.inbox[k]
        return skipped


def _agree(channel: str, sigs: dict[int, dict[str, Any]]) -> bool:
    if channel == "world":
        first = next(iter(sigs.values()))
        return all(
            (s["op"], s["shape"], s["dtype"]) == (first["op"], first["shape"], first["dtype"])
            for s in sigs.values()
        )
    ops = sorted(s["op"] for s in sigs.values())
    same = len({(tuple(s["shape"]), s["dtype"]) for s in sigs.values()}) == 1
    return ops == ["recv", "send"] and same


def _mismatch_text(seq: int, sigs: dict[int, dict[str, Any]]) -> str:
    groups: dict[tuple[str, str], list[int]] = {}
    for r in sorted(sigs):
        groups.setdefault((describe(sigs[r]), sigs[r]["where"]), []).append(r)
    parts = [f"{_ranks(rs)} {d} ({w})" for (d, w), rs in groups.items()]
    return (
        f"mismatch at collective #{seq}: {'; '.join(parts)}; no rank ran it, the cluster is "
        "still running"
    )


_checker: Checker | None = None
_skipped: list[str] = []


def _pre_execute() -> None:
    if _checker is not None and enabled():
        _skipped[:] = _checker.resync()


def enable(timeout: float = 30.0) -> None:
    """Check every world collective on this rank before it runs; call on every rank at once
    (``view.execute``): creating the side channel is itself collective."""
    global _checker
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"the collective timeout must be a positive number of seconds: {timeout}")
    flight_recorder.install()
    if _checker is None:
        _checker = Checker(timeout)
        _hook(True)
    _checker.timeout = float(timeout)
    flight_recorder.before_collective = _checker.check
    flight_recorder.checks_info = {"enabled": True, "timeout": _checker.timeout}


def disable() -> None:
    """Run collectives unchecked again (the recorder stays on)."""
    flight_recorder.before_collective = None
    flight_recorder.checks_info = {"enabled": False}


def enabled() -> bool:
    return flight_recorder.before_collective is not None


def status() -> dict[str, Any]:
    """Whether checks are on, their timeout, failures so far and the last error."""
    if _checker is None:
        return {"enabled": False}
    return {
        "enabled": enabled(),
        "timeout": _checker.timeout,
        "failures": _checker.failures,
        "last_error": _checker.last_error,
        "skipped": list(_skipped),
    }


def _hook(on: bool) -> None:
    """Resynchronise before each cell (IPython's ``pre_execute`` fires for every execute)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    if on:
        shell.events.register("pre_execute", _pre_execute)
    else:
        shell.events.unregister("pre_execute", _pre_execute)
