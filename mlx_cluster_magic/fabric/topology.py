"""A picture of the cluster's fabric: hosts as nodes, cables and links as edges.

Edges come from the hostfile (``rdma`` cells name the cables between two Macs; a ring hostfile
cables each host to the next) and from measured links (``links.LinkRecord``), coloured by their
measured rate, the flagged ones drawn thick, dashed and red. Plain SVG (no front-end build) and
a text form. Pure functions of their arguments. No IPython import.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .placement import Placement


class LinkRecord(Protocol):
    """What the picture needs of a measured link (``links.LinkRecord`` has it)."""

    @property
    def src(self) -> str: ...
    @property
    def dst(self) -> str: ...
    @property
    def src_rank(self) -> int: ...
    @property
    def dst_rank(self) -> int: ...
    @property
    def rate(self) -> float | None: ...
    @property
    def flag(self) -> str | None: ...


def rate_colour(value: float, best: float) -> str:
    """Red (far below the best link) through amber to green (as fast as the best)."""
    frac = 0.0 if best <= 0 else max(0.0, min(1.0, value / best))
    hue = int(120 * frac)
    return f"hsl({hue},70%,{72 - 12 * frac:.0f}%)"


@dataclass(frozen=True)
class Edge:
    """A cable or link between hosts ``a`` and ``b`` (indices into the placement's hosts)."""

    a: int
    b: int
    cables: tuple[str, ...] = ()  # device names where the hostfile gives them
    rate: float | None = None
    flag: str | None = None
    label: str = ""


def edges(placement: Placement, records: Sequence[LinkRecord] | None = None) -> list[Edge]:
    """The hostfile's cables, then each measured link laid over (or added to) them."""
    hosts = placement.hosts
    names = [h.ssh for h in hosts]
    found: dict[tuple[int, int], Edge] = {}
    n = len(hosts)
    for i, h in enumerate(hosts):
        for j, cell in enumerate(h.rdma):
            if cell is None or j == i or j >= n:
                continue
            key = (min(i, j), max(i, j))
            devices = cell if isinstance(cell, tuple) else (cell,)
            old = found.get(key)
            cables = tuple(dict.fromkeys((*(old.cables if old else ()), *devices)))
            found[key] = Edge(key[0], key[1], cables)
    if not found and n > 1:
        if placement.backend == "ring" and n > 2:
            pairs = [(i, (i + 1) % n) for i in range(n)]  # mlx.distributed_config's ring order
        else:
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        for i, j in pairs:
            key = (min(i, j), max(i, j))
            found[key] = Edge(key[0], key[1])
    labels = {name: k for k, name in enumerate(names)}
    for r in records or ():
        ia, ib = (
            _index(r.src, labels, r.src_rank, placement),
            _index(r.dst, labels, r.dst_rank, placement),
        )
        if ia is None or ib is None or ia == ib:
            continue
        key = (min(ia, ib), max(ia, ib))
        old = found.get(key, Edge(*key))
        rate = r.rate
        label = "-" if rate is None else f"{rate:.1f} Gb/s" if rate >= 1 else f"{rate:.2f} Gb/s"
        found[key] = Edge(key[0], key[1], old.cables, rate, r.flag, label)
    return [found[k] for k in sorted(found)]


def _index(name: str, labels: dict[str, int], rank: int, placement: Placement) -> int | None:
    """A record's host: by name, else by the rank it was measured from."""
    if name in labels:
        return labels[name]
    if 0 <= rank < placement.size:
        host = placement.ranks[rank]
        return placement.hosts.index(host)
    return None


def _host_labels(placement: Placement, records: Sequence[LinkRecord] | None) -> list[str]:
    """The ssh name, or the name the host reported in the measurement."""
    out = [h.ssh for h in placement.hosts]
    for r in records or ():
        for name, rank in ((r.src, r.src_rank), (r.dst, r.dst_rank)):
            if 0 <= rank < placement.size:
                i = placement.hosts.index(placement.ranks[rank])
                if out[i] in ("localhost", "127.0.0.1"):
                    out[i] = name
    return out


def topology_svg(
    placement: Placement,
    records: Sequence[LinkRecord] | None = None,
    size: int = 360,
    hub: str | None = None,
) -> str:
    """Hosts on a circle, an edge per cable/link, coloured by measured Gb/s. With ``hub`` (a
    star's master, by its ssh name) the master sits at the centre with a cable to each host,
    and the pairs that pass through it are not drawn as cables of their own."""
    labels = _host_labels(placement, records)
    es = edges(placement, records)
    n = len(labels)
    cx = cy = size / 2
    radius = size / 2 - 50 if n > 1 else 0
    names = [h.ssh for h in placement.hosts]
    centre = names.index(hub) if hub in names else None
    ring = [i for i in range(n) if i != centre]
    pos = [(cx, cy)] * n
    for k, i in enumerate(ring):
        angle = 2 * math.pi * k / len(ring)
        pos[i] = (cx + radius * math.sin(angle), cy - radius * math.cos(angle))
    if centre is not None:
        es = [e for e in es if centre in (e.a, e.b)]
    rates = [e.rate for e in es if e.rate is not None]
    best = max(rates) if rates else 0.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
        f'font-family="sans-serif" font-size="12" class="mlx-topology">'
    ]
    for e in es:
        (x1, y1), (x2, y2) = pos[e.a], pos[e.b]
        colour = "#999" if e.rate is None else rate_colour(e.rate, best)
        width = 3 + 2 * max(len(e.cables) - 1, 0)
        extra = ""
        if e.flag:
            colour, width, extra = "#d00", 6, ' stroke-dasharray="8 4" class="flagged"'
        title = f"{labels[e.a]} - {labels[e.b]}"
        if e.cables:
            title += f" ({', '.join(e.cables)})"
        if e.label:
            title += f": {e.label}"
        if e.flag:
            title += f"; {e.flag}"
        out.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
            f'stroke-width="{width}"{extra}><title>{html.escape(title)}</title></line>'
        )
        if e.label:
            mx_, my_ = (x1 + x2) / 2, (y1 + y2) / 2
            out.append(
                f'<text x="{mx_:.1f}" y="{my_ - 4:.1f}" text-anchor="middle" '
                f'fill="{"#d00" if e.flag else "#333"}">{html.escape(e.label)}</text>'
            )
    for (x, y), name in zip(pos, labels):
        out.append(
            f'<g class="host"><rect x="{x - 40:.1f}" y="{y - 14:.1f}" width="80" height="28" '
            f'rx="6" fill="#f4f4f8" stroke="#446"/><text x="{x:.1f}" y="{y + 4:.1f}" '
            f'text-anchor="middle">{html.escape(name)}</text></g>'
        )
    if centre is not None:
        out.append(
            f'<text x="{cx:.1f}" y="{size - 8}" text-anchor="middle" fill="#555" '
            f'class="mlx-hub-note">the others reach each other through '
            f"{html.escape(labels[centre])}'s bridge</text>"
        )
    out.append("</svg>")
    return "".join(out)


def topology_text(placement: Placement, records: Sequence[LinkRecord] | None = None) -> str:
    """One line per edge: ``mac1 -- mac2  rdma_en1  18.2 Gb/s  FLAGGED: ...``."""
    labels = _host_labels(placement, records)
    es = edges(placement, records)
    if not es:
        return f"{labels[0] if labels else 'no host'}: one host, no links"
    lines = []
    for e in es:
        parts = [f"{labels[e.a]} -- {labels[e.b]}"]
        if e.cables:
            parts.append(", ".join(e.cables))
        parts.append(e.label or "not measured")
        if e.flag:
            parts.append(f"FLAGGED: {e.flag}")
        lines.append("  ".join(parts))
    return "\n".join(lines)
