"""``cluster.why()``: which rank is behind on which collective at which line, from plain data.

Input: every rank's flight-recorder snapshot (``recorder.snapshot()``, carried by the status
channel; None for a rank that sent none) and its stack dump (``stack_capture.capture``; None
when not taken). Output: a :class:`WhyReport` with a one-line verdict and, per rank, the
collective it is blocked in, its recent collectives and its main thread's stack; shown as text
and HTML.

The verdicts, in the order they are tried:

- ``mismatch at #5``: at one sequence number of the world group the ranks issued different
  collectives (op, shape or dtype);
- ``rank 1 is behind``: ranks wait in a collective that some rank has not issued yet (it
  issued fewer); the waiting ranks' record at the first number the late rank lacks is named;
- a send or recv waits for a peer that has not posted the matching call;
- every rank waits in the same collective: the collective itself is stuck;
- nothing blocked.

Pure: no IPython, no I/O.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .stack_capture import Frame, location, main_thread, parse


@dataclass(frozen=True)
class Collective:
    """One recorded collective."""

    seq: int
    op: str
    shape: tuple[int, ...]
    dtype: str
    group: str
    peer: int | None
    where: str
    t: float | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Collective:
        return Collective(
            seq=int(d.get("seq", 0)),
            op=str(d.get("op", "?")),
            shape=tuple(int(s) for s in d.get("shape", ())),
            dtype=str(d.get("dtype", "?")),
            group=str(d.get("group", "world")),
            peer=d.get("peer"),
            where=str(d.get("where") or location(str(d.get("file", "?")), d.get("line"))),
            t=d.get("t"),
        )

    @property
    def signature(self) -> str:
        """``all_sum float32[4]``; ``send float32[4] to rank 1``."""
        return f"{self.op} {self.dtype}[{','.join(map(str, self.shape))}]{self._peer_text}"

    @property
    def name(self) -> str:
        """``all_sum #5``; ``send #1 to rank 1``."""
        return f"{self.op} #{self.seq}{self._peer_text}"

    @property
    def _peer_text(self) -> str:
        """`` to rank 1`` for a send, `` from rank 1`` for a receive, else nothing."""
        if self.peer is None:
            return ""
        return f" {'to' if self.op == 'send' else 'from'} rank {self.peer}"

    def __str__(self) -> str:
        return f"#{self.seq} {self.signature} ({self.where})"


@dataclass
class RankWhy:
    """One rank's part of the report."""

    rank: int
    host: str
    state: str  # blocked, busy, idle, no status
    blocked_in: Collective | None
    blocked_s: float
    recent: list[Collective]
    issued: dict[str, int]
    where: str
    doing: str
    stack: list[Frame] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.state == "no status":
            return "no status (the rank is dead, or its status thread is starved)"
        if self.blocked_in is not None:
            return f"blocked in {self.blocked_in} for {self.blocked_s:.0f} s"
        return self.doing


def _shown(stack: list[Frame]) -> list[Frame]:
    """The frames worth showing: innermost first, up to the outermost cell frame."""
    cells = [i for i, f in enumerate(stack) if f.where.startswith("cell")]
    return stack[: cells[-1] + 1] if cells else stack[:6]


@dataclass(repr=False)
class WhyReport:
    """The verdict and every rank's view; ``print`` it or let the notebook show it."""

    verdict: str
    ranks: list[RankWhy]
    suspects: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [self.verdict]
        for r in self.ranks:
            lines.append(f"  rank {r.rank} ({r.host}): {r.summary()}")
            if r.recent:
                tail = ", ".join(f"{c.name} ({c.where})" for c in r.recent[-4:])
                lines.append(f"    last collectives: {tail}")
            if r.stack and r.state != "idle":
                lines.append("    stack: " + " <- ".join(str(f) for f in _shown(r.stack)))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = []
        for r in self.ranks:
            bad = r.rank in self.suspects
            style = ' style="background:#fde2e1"' if bad else ""
            recent = "<br>".join(esc(f"{c.name} {c.signature} ({c.where})") for c in r.recent[-5:])
            shown = _shown(r.stack)
            stack = "<br>".join(esc(str(f)) for f in shown)
            first = esc(str(shown[0])) if shown else ""
            stack_cell = f"<details><summary>{first}</summary>{stack}</details>" if shown else ""
            rows.append(
                f"<tr{style}><td>{r.rank}</td><td>{esc(r.host)}</td><td>{esc(r.state)}</td>"
                f"<td>{esc(str(r.blocked_in) if r.blocked_in else '')}</td>"
                f"<td>{esc(r.doing)}</td><td>{recent}</td>"
                f"<td>{stack_cell}</td></tr>"
            )
        head = "".join(
            f"<th>{h}</th>"
            for h in ("rank", "host", "state", "blocked in", "now", "last collectives", "stack")
        )
        return f"<div><b>{esc(self.verdict)}</b><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))


def _doing(snap: dict[str, Any], stack: list[Frame]) -> str:
    """``in time.sleep (cell line 6)``, ``idle``, ``at cell line 4``."""
    where = snap.get("where")
    if not snap.get("busy", where is not None):
        return "idle"
    if where:
        call = where.get("call") or ""
        at = where.get("where", "?")
        return f"in {call} ({at})" if call else f"at {at}"
    cell = next((f for f in stack if f.where.startswith("cell")), None)
    if cell is not None:
        return f"at {cell.where}"
    return "busy"


def _stack_of(text: str | None, snap: dict[str, Any] | None) -> list[Frame]:
    if not text:
        return []
    main = main_thread(parse(text), (snap or {}).get("main_thread"))
    return list(main.frames) if main is not None else []


def analyze(
    per_rank: list[dict[str, Any] | None],
    stacks: list[str | None] | None = None,
    hosts: list[str] | None = None,
) -> WhyReport:
    """The verdict and per-rank details from the ranks' snapshots and stack dumps."""
    n = len(per_rank)
    stacks = list(stacks or []) + [None] * (n - len(stacks or []))
    hosts = list(hosts or []) + ["?"] * (n - len(hosts or []))
    ranks: list[RankWhy] = []
    for r, snap in enumerate(per_rank):
        frames = _stack_of(stacks[r], snap)
        if snap is None:
            doing = f"at {frames[0].where}" if frames else "unknown"
            ranks.append(RankWhy(r, hosts[r], "no status", None, 0.0, [], {}, "", doing, frames))
            continue
        blocked = snap.get("blocked")
        state = "blocked" if blocked else ("busy" if snap.get("busy") else "idle")
        where = snap.get("where") or {}
        ranks.append(
            RankWhy(
                rank=r,
                host=hosts[r],
                state=state,
                blocked_in=Collective.from_dict(blocked) if blocked else None,
                blocked_s=float(snap.get("blocked_s", 0.0)),
                recent=[Collective.from_dict(d) for d in snap.get("recent", [])],
                issued={str(k): int(v) for k, v in (snap.get("seq") or {}).items()},
                where=str(where.get("where", "")),
                doing=_doing(snap, frames),
                stack=frames,
                checks=dict(snap.get("checks") or {}),
            )
        )
    verdict, suspects = _verdict(ranks)
    return WhyReport(verdict, ranks, suspects)


def stuck(per_rank: list[dict[str, Any] | None], threshold_s: float = 10.0) -> str | None:
    """The verdict when a rank has waited in a collective for ``threshold_s`` or longer and the
    ranks disagree about it (some other rank is elsewhere), else None: cheap (no stacks), for
    the status view's banner on every refresh and for abort messages."""
    if not any(s and s.get("blocked") and s.get("blocked_s", 0.0) >= threshold_s for s in per_rank):
        return None
    report = analyze(per_rank)
    if not report.suspects and not report.verdict.startswith("every rank waits"):
        return None
    return report.verdict


def waits_on_ended(per_rank: list[dict[str, Any] | None], pending: Sequence[int]) -> bool:
    """Whether every rank still running a cell waits inside a collective for ranks whose cell
    has ended (the verdict's suspects, none of them in ``pending``): an interrupt cannot reach
    a rank inside a native collective, and no rank is left to join it."""
    waiting = set(pending)
    if not waiting:
        return False
    report = analyze(per_rank)
    suspects = set(report.suspects)
    if not suspects or suspects & waiting:
        return False
    return all(
        0 <= r < len(report.ranks) and report.ranks[r].blocked_in is not None for r in waiting
    )


def _by_seq(r: RankWhy, group: str) -> dict[int, Collective]:
    return {c.seq: c for c in r.recent if c.group == group}


def _verdict(ranks: list[RankWhy]) -> tuple[str, list[int]]:
    known = [r for r in ranks if r.state != "no status"]
    silent = [r.rank for r in ranks if r.state == "no status"]
    note = f"; {_ranks(silent)} sent no status" if silent else ""
    if not known:
        return "no rank sent its status: the cluster is not running or every rank is stuck", []
    mismatch = _mismatch(known)
    if mismatch:
        return mismatch[0] + note, mismatch[1]
    waiting = [r for r in known if r.blocked_in is not None]
    p2p = [r for r in waiting if r.blocked_in is not None and r.blocked_in.peer is not None]
    for r in p2p:
        text = _p2p(r, {x.rank: x for x in ranks})
        if text:
            return text[0] + note, text[1]
    world_waiting = [r for r in waiting if r.blocked_in and r.blocked_in.group == "world"]
    issued = {r.rank: r.issued.get("world", 0) for r in known}
    if world_waiting:
        top = max(issued[r.rank] for r in world_waiting)
        behind = sorted(k for k, v in issued.items() if v < top)
        if behind:
            first_missing = min(issued[k] for k in behind) + 1
            waits = []
            for r in world_waiting:
                c = _by_seq(r, "world").get(first_missing) or r.blocked_in
                waits.append((r.rank, c))
            named = waits[0][1]
            assert named is not None
            late = []
            for k in behind:
                rk = ranks[k]
                count = issued[k]
                late.append(
                    f"{_ranks([k])} issued {count} collective{'s' if count != 1 else ''} and "
                    f"is {rk.doing}"
                )
            waiting_ranks = sorted(r for r, _c in waits)
            return (
                f"{_ranks(behind)} {'is' if len(behind) == 1 else 'are'} behind: "
                f"{_ranks(waiting_ranks)} wait{'s' if len(waiting_ranks) == 1 else ''} in "
                f"{named.op} #{first_missing} ({named.where}); " + "; ".join(late) + note,
                behind,
            )
        if len(world_waiting) == len(known) and not silent:
            c = world_waiting[0].blocked_in
            assert c is not None
            return (
                f"every rank waits in {c.op} #{c.seq} ({c.where}) and all issued it alike: the "
                "collective itself is stuck (network or backend), not the program",
                [],
            )
        others = sorted(set(r.rank for r in known) - set(r.rank for r in world_waiting))
        c = world_waiting[0].blocked_in
        assert c is not None
        waiters = [r.rank for r in world_waiting]
        verb = "waits" if len(waiters) == 1 else "wait"
        parts = [f"{_ranks(waiters)} {verb} in {c.op} #{c.seq} ({c.where})"]
        parts += [f"{_ranks([k])} is {ranks[k].doing}" for k in others]
        if silent:
            parts.append(f"{_ranks(silent)} sent no status (dead, or its status thread starved)")
        return "; ".join(parts), others or silent
    counts = sorted(set(issued.values()))
    if len(counts) > 1:
        low = sorted(k for k, v in issued.items() if v == counts[0])
        return (
            f"no rank is blocked, but the ranks issued different numbers of collectives "
            f"({', '.join(f'rank {k}: {v}' for k, v in sorted(issued.items()))}): "
            f"{_ranks(low)} skipped some" + note,
            low,
        )
    if silent:
        return f"no rank is blocked in a collective{note}", silent
    return "no rank is blocked in a collective; the ranks agree", []


def _mismatch(ranks: list[RankWhy]) -> tuple[str, list[int]] | None:
    """The lowest world sequence number at which the ranks' records differ."""
    tables = {r.rank: _by_seq(r, "world") for r in ranks}
    seqs = sorted(set().union(*[set(t) for t in tables.values()]))
    for s in seqs:
        have = {k: t[s] for k, t in tables.items() if s in t}
        if len(have) < 2:
            continue
        if len({(c.op, c.shape, c.dtype) for c in have.values()}) > 1:
            groups: dict[tuple[str, str], list[int]] = {}
            for k, c in sorted(have.items()):
                groups.setdefault((c.signature, c.where), []).append(k)
            parts = [f"{_ranks(rs)} {sig} ({w})" for (sig, w), rs in groups.items()]
            minority = min(groups.values(), key=len)
            return f"mismatch at #{s}: " + ", ".join(parts), minority
    return None


def _p2p(r: RankWhy, by_rank: dict[int, RankWhy]) -> tuple[str, list[int]] | None:
    """A send/recv that waits for a peer which has not posted the matching call."""
    c = r.blocked_in
    if c is None or c.peer is None or c.peer not in by_rank:
        return None
    peer = by_rank[c.peer]
    if peer.state == "no status":
        return None
    theirs = peer.issued.get(c.group, 0)
    if theirs >= c.seq:
        return None
    wanted = "recv" if c.op == "send" else "send"
    direction = "from" if wanted == "recv" else "to"
    return (
        f"rank {r.rank} waits in {c.name} ({c.where}); rank {peer.rank} has not posted the "
        f"matching {wanted} {direction} rank {r.rank} (it posted {theirs} on that pair) and is "
        f"{peer.doing}",
        [peer.rank],
    )
