"""Measure every link between the hosts of a running cluster: latency and bandwidth with MLX's
own ``send``/``recv`` in the cluster's group (what models use), and raw TCP over the same pair's
cluster addresses, so a slow cable, a cable that is really Wi-Fi, or a Thunderbolt 4 link taken
for Thunderbolt 5 shows up as a number beside the rate its kind should reach.

The head plans (which ranks, which address, how long) and the engines measure: one rank per
host pair sends, its peer answers; ranks agree on sizes and ports over their own MPI
communicator, never through the controller. Everything is bounded by time, not by size.
No IPython import.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MLXClusterError
from ..rank.link_probe import rank_facts, run_plan
from .placement import Placement
from .topology import rate_colour


@dataclass(frozen=True)
class LinkKind:
    """What a kind of link should carry: its nominal rate and the least a healthy one of its
    kind reaches (IP traffic reaches well below the nominal rate on Thunderbolt)."""

    key: str
    label: str
    nominal_gbit: float | None
    floor_gbit: float | None


#: Published figures: Thunderbolt 5 80 Gb/s (TCP 52-64 Gb/s by iperf3), Thunderbolt 4 40 Gb/s
#: (IP over the bridge 16-20 Gb/s); the floors sit well below what a healthy link reaches.
KINDS: dict[str, LinkKind] = {
    k.key: k
    for k in (
        LinkKind("thunderbolt5", "Thunderbolt 5", 80.0, 20.0),
        LinkKind("thunderbolt4", "Thunderbolt 4", 40.0, 8.0),
        LinkKind("thunderbolt", "Thunderbolt", 40.0, 8.0),
        LinkKind("10gbe", "10 GbE", 10.0, 5.0),
        LinkKind("ethernet", "Ethernet", 1.0, 0.5),
        LinkKind("wifi", "Wi-Fi", 1.0, None),
        LinkKind("virtual", "virtual link", None, None),
        LinkKind("loopback", "loopback", None, None),
        LinkKind("unknown", "unknown", None, None),
    )
}

#: A link this many times slower than the best one is flagged.
FAR_BELOW = 4.0


def classify(
    name: str | None,
    *,
    port: str | None = None,
    link_gbit: float | None = None,
    speed_mbit: int | None = None,
    virtual: bool = False,
) -> str:
    """The kind of an interface, from its name, its macOS hardware port ("Thunderbolt 1",
    "Wi-Fi"), the Thunderbolt link speed and the speed the OS reports."""
    if not name:
        return "unknown"
    if name == "lo" or name.startswith("lo0") or name == "lo0":
        return "loopback"
    port_l = (port or "").lower()
    if "thunderbolt" in port_l or name.startswith("bridge"):
        if link_gbit is not None and link_gbit >= 80:
            return "thunderbolt5"
        if link_gbit is not None and link_gbit >= 20:
            return "thunderbolt4"
        return "thunderbolt"
    if "wi-fi" in port_l or "wifi" in port_l or "airport" in port_l or name.startswith("wl"):
        return "wifi"
    if virtual:
        return "virtual"
    if speed_mbit and speed_mbit >= 10000:
        return "10gbe"
    if speed_mbit or "ethernet" in port_l:
        return "ethernet"
    return "unknown"


@dataclass(frozen=True)
class LinkRecord:
    """One measured pair of hosts (``src`` sends to ``dst``).

    ``latency_s`` is the median round trip of a 4-byte MLX message, ``gbit_s`` the rate of
    a large MLX ``send`` and ``tcp_gbit_s`` that of a plain TCP stream over the pair's
    cluster addresses; ``interface`` is ``src``'s interface on that path, ``kind`` its key in
    :data:`KINDS`, ``flag`` why the link looks wrong (None when it looks right).
    """

    src: str
    dst: str
    latency_s: float | None
    gbit_s: float | None
    tcp_gbit_s: float | None
    interface: str | None
    kind: str
    flag: str | None = None
    src_rank: int = 0
    dst_rank: int = 0
    address: str | None = None
    note: str | None = None

    @property
    def rate(self) -> float | None:
        """The figure judged: the better of the MLX and TCP rates."""
        rates = [r for r in (self.gbit_s, self.tcp_gbit_s) if r is not None]
        return max(rates) if rates else None

    @property
    def expected(self) -> LinkKind:
        return KINDS.get(self.kind, KINDS["unknown"])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LinkReport:
    """Every pair's record, with the hosts in rank order; text, HTML and a heatmap."""

    hosts: list[str]
    records: list[LinkRecord]
    backend: str = ""
    note: str | None = None
    advice: str | None = None
    elapsed_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    #: The topology picture (SVG) of these links over the hostfile's cables, when known.
    picture: str | None = None
    #: The master of a star: the one host whose cluster address is on a bridge of two or more
    #: cables (its Thunderbolt Bridge), the others reaching each other through it.
    hub: str | None = None

    def flagged(self) -> list[LinkRecord]:
        return [r for r in self.records if r.flag]

    def record(self, a: str, b: str) -> LinkRecord | None:
        for r in self.records:
            if {r.src, r.dst} == {a, b}:
                return r
        return None

    def matrix(self, what: str = "rate") -> list[list[float | None]]:
        """``what`` (rate, gbit_s, tcp_gbit_s, latency_s) per host pair, symmetric."""
        idx = {h: i for i, h in enumerate(self.hosts)}
        m: list[list[float | None]] = [[None] * len(self.hosts) for _ in self.hosts]
        for r in self.records:
            if r.src in idx and r.dst in idx:
                v = getattr(r, what)
                m[idx[r.src]][idx[r.dst]] = m[idx[r.dst]][idx[r.src]] = v
        return m

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]

    # ------------------------------------------------------------------ rendering
    def text(self) -> str:
        lines = [self._title()]
        if self.note:
            lines.append(self.note)
        if self.records:
            rows = [("link", "RTT", "MLX", "TCP", "interface", "kind (expected)", "flag")]
            for r in self.records:
                rows.append(
                    (
                        f"{r.src} -> {r.dst}",
                        _us(r.latency_s),
                        _gbit(r.gbit_s),
                        _gbit(r.tcp_gbit_s),
                        r.interface or "-",
                        _expected(r),
                        r.flag or r.note or "",
                    )
                )
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if len(self.hosts) > 1:
            lines.append("")
            lines.append("Gb/s (better of MLX and TCP):")
            lines.extend(_matrix_text(self.hosts, self.matrix()))
        if self.advice:
            lines.append(f"advice: {self.advice}")
        return "\n".join(lines)

    def html(self) -> str:
        parts = [f"<b>{html.escape(self._title())}</b>"]
        if self.note:
            parts.append(f"<div>{html.escape(self.note)}</div>")
        if self.records:
            head = "".join(
                f"<th>{h}</th>"
                for h in ("link", "RTT", "MLX", "TCP", "interface", "kind (expected)", "flag")
            )
            body = []
            for r in self.records:
                style = ' style="background:#fdd"' if r.flag else ""
                cells = (
                    f"{r.src} &rarr; {r.dst}",
                    _us(r.latency_s),
                    _gbit(r.gbit_s),
                    _gbit(r.tcp_gbit_s),
                    html.escape(r.interface or "-"),
                    html.escape(_expected(r)),
                    html.escape(r.flag or r.note or ""),
                )
                body.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            parts.append(
                f'<table class="mlx-links"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>"
            )
        if len(self.hosts) > 1:
            parts.append(f"<div>{self.heatmap_svg()}{self.picture or ''}</div>")
        if self.advice:
            parts.append(f"<div><b>advice:</b> {html.escape(self.advice)}</div>")
        return "\n".join(parts)

    def heatmap_svg(self, cell: int = 56) -> str:
        """Host-by-host matrix coloured by rate (red slow, green fast); flagged cells outlined."""
        n = len(self.hosts)
        m = self.matrix()
        flagged = {frozenset((r.src, r.dst)) for r in self.flagged()}
        rates = [v for row in m for v in row if v is not None]
        best = max(rates) if rates else 0.0
        label_w = max([len(h) for h in self.hosts] + [4]) * 7 + 10
        w, h = label_w + n * cell + 4, 20 + n * cell + 4
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'font-family="sans-serif" font-size="11" class="mlx-links-heatmap">'
        ]
        for j, name in enumerate(self.hosts):
            x = label_w + j * cell + cell / 2
            out.append(f'<text x="{x:.0f}" y="14" text-anchor="middle">{html.escape(name)}</text>')
        for i, name in enumerate(self.hosts):
            y = 20 + i * cell
            out.append(
                f'<text x="{label_w - 6}" y="{y + cell / 2 + 4:.0f}" text-anchor="end">'
                f"{html.escape(name)}</text>"
            )
            for j in range(n):
                v = m[i][j]
                x = label_w + j * cell
                fill = "#eee" if v is None else rate_colour(v, best)
                bad = frozenset((self.hosts[i], self.hosts[j])) in flagged and i != j
                stroke = ' stroke="#c00" stroke-width="3"' if bad else ' stroke="#fff"'
                out.append(
                    f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}"{stroke}>'
                    f"<title>{html.escape(self.hosts[i])} - {html.escape(self.hosts[j])}: "
                    f"{_gbit(v)} Gb/s</title></rect>"
                )
                if v is not None:
                    out.append(
                        f'<text x="{x + cell / 2:.0f}" y="{y + cell / 2 + 4:.0f}" '
                        f'text-anchor="middle">{_gbit(v)}</text>'
                    )
        out.append("</svg>")
        return "".join(out)

    def _title(self) -> str:
        n = len(self.hosts)
        return (
            f"links: {len(self.records)} measured, {len(self.flagged())} flagged, "
            f"{n} host{'s' if n != 1 else ''}, backend {self.backend or '?'}, "
            f"{self.elapsed_s:.1f} s"
        )

    def __str__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": self.text(), "text/html": self.html()}


def _gbit(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e6:.0f} us"


def _expected(r: LinkRecord) -> str:
    k = r.expected
    return f"{k.label} ({k.nominal_gbit:g} Gb/s)" if k.nominal_gbit else k.label


def _matrix_text(hosts: Sequence[str], m: Sequence[Sequence[float | None]]) -> list[str]:
    w = max([len(h) for h in hosts] + [6])
    lines = [" " * w + "  " + "  ".join(h.rjust(w) for h in hosts)]
    for h, row in zip(hosts, m):
        cells = ("-" if v is None else _gbit(v) for v in row)
        lines.append(h.ljust(w) + "  " + "  ".join(c.rjust(w) for c in cells))
    return lines


# ---------------------------------------------------------------------- judging


def judge(records: Sequence[LinkRecord]) -> list[LinkRecord]:
    """Flag links far below the best one or below what their kind reaches."""
    rates = [r.rate for r in records if r.rate is not None]
    best = max(rates) if rates else None
    out = []
    for r in records:
        reasons = []
        rate = r.rate
        if rate is None:
            if r.note:
                reasons.append(f"not measured: {r.note}")
        else:
            if best and rate * FAR_BELOW < best:
                reasons.append(f"{best / rate:.0f}x below the best link ({_gbit(best)} Gb/s)")
            floor = r.expected.floor_gbit
            if floor is not None and rate < floor:
                reasons.append(
                    f"below {r.expected.label} (a healthy one carries at least {floor:g} Gb/s)"
                )
        out.append(_replace(r, flag="; ".join(reasons) or None))
    return out


def _replace(r: LinkRecord, **kw: Any) -> LinkRecord:
    d = r.as_dict()
    d.update(kw)
    return LinkRecord(**d)


# ---------------------------------------------------------------------- planning (head)


def pick_address(
    dst_addrs: Sequence[Mapping[str, Any]],
    src_addrs: Sequence[Mapping[str, Any]],
    cluster_ips: set[str],
) -> tuple[str, str | None, str | None] | None:
    """The address of ``dst`` that ``src`` reaches directly: one on a network both have an
    address in (a cable), preferring the hostfile's cluster IPs. Returns (dst address,
    src interface, dst interface)."""
    best: tuple[int, str, str | None, str | None] | None = None
    for d in dst_addrs:
        dnet = _network(d)
        if dnet is None or ipaddress.ip_address(d["address"]).is_loopback:
            continue
        for s in src_addrs:
            try:
                sip = ipaddress.ip_address(s["address"])
            except ValueError:
                continue
            if sip.version != dnet.version or sip not in dnet or sip.is_loopback:
                continue
            score = 2 if d["address"] in cluster_ips else 1 if s["address"] in cluster_ips else 0
            if best is None or score > best[0]:
                best = (score, d["address"], s.get("iface"), d.get("iface"))
    return None if best is None else best[1:]


def _network(a: Mapping[str, Any]) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(f"{a['address']}/{a.get('prefixlen', 32)}", strict=False)
    except (ValueError, KeyError):
        return None


def _ring_like(backend: str) -> bool:
    """MLX's ring and jaccl-ring send only to a rank's two neighbours."""
    return backend in ("ring", "jaccl-ring")


def plan_pairs(host_of_rank: Sequence[int], backend: str) -> list[tuple[int, int, int, int, bool]]:
    """For every pair of hosts (by index): (host a, host b, rank a, rank b, MLX can send).

    With a ring backend the ranks chosen are ring neighbours where any are."""
    n = len(host_of_rank)
    hosts = sorted(set(host_of_rank))
    out = []
    for i, ha in enumerate(hosts):
        for hb in hosts[i + 1 :]:
            ra_all = [r for r in range(n) if host_of_rank[r] == ha]
            rb_all = [r for r in range(n) if host_of_rank[r] == hb]
            pair = (ra_all[0], rb_all[0])
            ok = True
            if _ring_like(backend):
                near = [(a, b) for a in ra_all for b in rb_all if (a - b) % n in (1, n - 1)]
                near.sort(key=lambda p: (p[1] - p[0]) % n != 1)  # a's right neighbour first
                ok = bool(near)
                if near:
                    pair = near[0]
            out.append((ha, hb, pair[0], pair[1], ok))
    return out


def measure(
    view: Any,
    placement: Placement,
    ranks: Sequence[Mapping[str, Any]],
    *,
    timeout: float = 10.0,
    backend: str | None = None,
    seconds: float | None = None,
    max_bytes: int = 256 << 20,
    kinds: Mapping[tuple[str, str], str] | None = None,
    advise: Callable[[LinkReport], str | None] | None = None,
) -> LinkReport:
    """Measure every pair of hosts of a running cluster; at most about ``timeout`` seconds.

    ``view`` is the cluster's blocking DirectView on every rank, ``ranks`` its ``cluster.ranks``
    (host, pid, rank...). ``seconds`` is how long each bandwidth test streams (default: the
    time budget shared out over the pairs). ``kinds`` overrides the kind of a link by
    (host, interface); ``advise`` turns the report into one line of backend advice.
    """
    started = time.monotonic()
    backend = backend or str((ranks[0] if ranks else {}).get("backend") or "mpi")
    if placement.size < 1:
        raise MLXClusterError("links: the cluster has no ranks")
    facts = view.apply_sync(rank_facts, macos_commands())
    for f in facts:
        f["kinds"] = _interface_kinds(f)
    names = _host_names(placement, ranks, facts)
    host_index: dict[str, int] = {}
    host_of_rank = [host_index.setdefault(name, len(host_index)) for name in names]
    hosts = list(host_index)
    steps, meta, note = _plan_steps(placement, facts, hosts, host_of_rank, backend, kinds)
    budget = max(timeout - (time.monotonic() - started) - 1.0, 1.0)
    per_pair = budget / max(len(steps), 1)
    cap = 0.2 if len(hosts) == 1 else 0.4  # one host: a quick look only
    stream_s = seconds if seconds is not None else max(min(per_pair / 8, cap), 0.05)
    by_pair = _run_steps(view, steps, stream_s, max_bytes, placement.size)
    records = _link_records(steps, meta, by_pair)
    report = LinkReport(
        hosts=hosts,
        records=judge(records) if len(hosts) > 1 else records,
        backend=backend,
        note=note,
        elapsed_s=time.monotonic() - started,
        meta={"seconds": stream_s},
    )
    report.hub = star_hub(placement, facts)
    if len(hosts) > 1:
        from .topology import topology_svg

        report.picture = topology_svg(placement, report.records, hub=report.hub)
    if advise is not None:
        report.advice = advise(report)
    return report


def _plan_steps(
    placement: Placement,
    facts: Sequence[Mapping[str, Any]],
    hosts: Sequence[str],
    host_of_rank: Sequence[int],
    backend: str,
    kinds: Mapping[tuple[str, str], str] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """What to measure: one step per pair of hosts (the ranks that send, the address the
    receiver is reached at) and, beside each, what the record will say of the link (its ends,
    the interface it leaves by, its kind); on one host, rank 0 to rank 1 over loopback."""
    steps: list[dict[str, Any]] = []
    meta: list[dict[str, Any]] = []
    if len(hosts) == 1:
        note = "one host: there are no links between hosts"
        if placement.size >= 2:
            note += "; measured rank 0 to rank 1 on this host instead"
            steps.append(_step(0, 1, True, "127.0.0.1"))
            meta.append(
                {"src": f"{hosts[0]}:0", "dst": f"{hosts[0]}:1", "iface": "lo", "kind": "loopback"}
            )
        return steps, meta, note
    cluster_ips = {ip for h in placement.hosts for ip in h.ips}
    for ha, hb, ra, rb, mlx_ok in plan_pairs(host_of_rank, backend):
        picked = pick_address(facts[rb]["addrs"], facts[ra]["addrs"], cluster_ips)
        addr, src_if = (picked[0], picked[1]) if picked else (None, None)
        if addr is None:
            dst_host = placement.ranks[rb]
            addr = dst_host.ips[0] if dst_host.ips else None
        kind = "unknown"
        if src_if:
            kind = (kinds or {}).get((hosts[ha], src_if)) or facts[ra]["kinds"].get(
                src_if, "unknown"
            )
        steps.append(_step(ra, rb, mlx_ok, addr))
        meta.append(
            {
                "src": hosts[ha],
                "dst": hosts[hb],
                "iface": src_if,
                "kind": kind,
                "note": None if mlx_ok else f"MLX {backend} sends only between ring neighbours",
            }
        )
    return steps, meta, None


def _run_steps(
    view: Any, steps: Sequence[dict[str, Any]], stream_s: float, max_bytes: int, n: int
) -> dict[tuple[int, int], dict[str, Any]]:
    """Run the steps one pair at a time; each pair's measurements by (rank a, rank b)."""
    plan = {"steps": list(steps), "seconds": stream_s, "max_bytes": max_bytes}
    results: list[list[dict[str, Any]]] = []
    targets = list(getattr(view, "targets", None) or range(n))
    for step in steps:
        # Only the pair's two ranks run, so no other rank competes for the CPUs or the wire.
        pair_view = view.client[[targets[step["a"]], targets[step["b"]]]]
        ar = pair_view.apply_async(run_plan, {**plan, "steps": [step]})
        wait = 4 * stream_s + 10.0
        try:
            results.extend(ar.get(timeout=wait))
        except Exception as e:
            if type(e).__name__ == "TimeoutError":
                raise MLXClusterError(
                    f"links: ranks {step['a']} and {step['b']} did not finish within {wait:.0f} s; "
                    "a transfer may be stuck on a broken link: %mlx_cluster restart"
                ) from None
            raise
    return {(d["a"], d["b"]): d for per_rank in results for d in per_rank}


def _link_records(
    steps: Sequence[Mapping[str, Any]],
    meta: Sequence[Mapping[str, Any]],
    by_pair: Mapping[tuple[int, int], Mapping[str, Any]],
) -> list[LinkRecord]:
    """One record per step: what was measured beside what the plan knew of the link."""
    records = []
    for step, m in zip(steps, meta):
        got = by_pair.get((step["a"], step["b"]), {})
        errors = [e for e in (got.get("mlx_error"), got.get("tcp_error")) if e]
        records.append(
            LinkRecord(
                src=m["src"],
                dst=m["dst"],
                latency_s=got.get("latency_s"),
                gbit_s=got.get("gbit_s"),
                tcp_gbit_s=got.get("tcp_gbit_s"),
                interface=m["iface"],
                kind=m["kind"],
                src_rank=step["a"],
                dst_rank=step["b"],
                address=step["tcp_ip"],
                note="; ".join([*errors, *([m["note"]] if m.get("note") else [])]) or None,
            )
        )
    return records


def _step(a: int, b: int, mlx_ok: bool, ip: str | None) -> dict[str, Any]:
    return {"a": a, "b": b, "mlx": mlx_ok, "tcp_ip": ip, "token": secrets.token_hex(32)}


def _host_names(
    placement: Placement, ranks: Sequence[Mapping[str, Any]], facts: Sequence[Mapping[str, Any]]
) -> list[str]:
    """A label per rank: the host name it reported, else the hostfile's ssh name."""
    out = []
    for r in range(placement.size):
        name = None
        if r < len(ranks):
            name = ranks[r].get("host")
        if not name and r < len(facts):
            name = facts[r].get("host")
        out.append(str(name or placement.ranks[r].ssh))
    return out


def _interface_kinds(facts: Mapping[str, Any]) -> dict[str, str]:
    """The kind of each interface a rank reported (``rank.link_probe.rank_facts``): macOS port
    names and Thunderbolt link rates parsed here, from the commands' output the rank sent."""
    ports = _macos_ports(facts.get("macos") or {})
    kinds = {}
    for iface, raw in (facts.get("interfaces") or {}).items():
        port, link = ports.get(iface, (None, None))
        kinds[iface] = classify(
            iface,
            port=port,
            link_gbit=link,
            speed_mbit=raw.get("speed_mbit"),
            virtual=bool(raw.get("virtual")),
        )
    return kinds


def _macos_ports(outputs: Mapping[str, str]) -> dict[str, tuple[str | None, float | None]]:
    """On a Mac: interface -> (hardware port name, Thunderbolt link Gb/s) from discovery."""
    out: dict[str, tuple[str | None, float | None]] = {}
    if not outputs:
        return out
    try:
        from .macos import HARDWARE_PORTS_COMMAND, discover, parse_hardware_ports

        def run(argv: Sequence[str]) -> str:
            return outputs[" ".join(argv)]

        for p in parse_hardware_ports(run(HARDWARE_PORTS_COMMAND)):
            if p.device:
                out[p.device] = (p.name, None)
        tb = discover(run)
        for t in tb:
            gbps = getattr(t.link, "gbps", None) if t.link is not None else None
            out[t.device] = (t.port, gbps)
        for t in tb:  # the bridge is as fast as its best member
            if t.is_bridge:
                speeds = [out.get(m, (None, None))[1] for m in t.members]
                known = [s for s in speeds if s]
                out[t.device] = (t.port, max(known) if known else None)
    except Exception:  # discovery is a best effort: the kinds fall back to names
        pass
    return out


def bridge_members(facts: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """A rank's bridges and their member ports: Linux's from the rank, a Mac's from its
    ``ifconfig -a`` (parsed here)."""
    out = {
        iface: tuple(raw.get("members") or ())
        for iface, raw in (facts.get("interfaces") or {}).items()
        if raw.get("members")
    }
    text = (facts.get("macos") or {}).get("ifconfig -a")
    if text:
        from .netif import parse_ifconfig

        with contextlib.suppress(Exception):
            out.update({i.name: i.members for i in parse_ifconfig(text).values() if i.members})
    return out


def star_hub(placement: Placement, facts: Sequence[Mapping[str, Any]]) -> str | None:
    """The star's master: the one host (of three or more) whose cluster address sits on a bridge
    of two or more ports, while no other host's does; None for any other cabling."""
    hosts = list(placement.hosts)
    if len(hosts) < 3:
        return None
    hubs = []
    for host in hosts:
        rank = placement.ranks.index(host)
        if rank >= len(facts) or not host.ips:
            continue
        iface = next((a["iface"] for a in facts[rank]["addrs"] if a["address"] in host.ips), None)
        if iface is not None and len(bridge_members(facts[rank]).get(iface, ())) >= 2:
            hubs.append(host.ssh)
    return hubs[0] if len(hubs) == 1 else None


def macos_commands() -> list[tuple[str, ...]]:
    """What a rank on a Mac runs for ``_macos_ports`` (passed to ``rank_facts``)."""
    from .macos import HARDWARE_PORTS_COMMAND, IFCONFIG_COMMAND, THUNDERBOLT_PROFILE_COMMAND

    return [HARDWARE_PORTS_COMMAND, IFCONFIG_COMMAND, THUNDERBOLT_PROFILE_COMMAND]
