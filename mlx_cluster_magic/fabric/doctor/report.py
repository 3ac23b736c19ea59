"""The doctor's answer as data, and its two renderings (HTML for notebooks, plain text).

Both show the same thing in the same order: a one-line verdict, a compact table of marks (one
row per host, one column per check; the full detail of each cell on hover), the backend advice,
and then every failure and warning written out in full with the command that fixes it.
No IPython import: the report renders itself through ``_repr_html_`` and ``__repr__``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..macos import HostFacts
from ..netif import RouteFinding
from .advice import Advice

__all__ = ["Check", "DoctorReport", "HostCheck"]


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


@dataclass(frozen=True)
class PathResult:
    """Whether host ``src`` reached ``dst`` at ``address``, tested on ``src``: ``ok`` None when
    it could not be tested; ``interface`` is the one the route took."""

    src: str
    dst: str
    ok: bool | None
    address: str
    interface: str | None
    detail: str


_TEXT_MARKS = {True: "ok", False: "FAIL", None: "warn"}
_COLORS = {True: "#1a7f37", False: "#cf222e", None: "#9a6700"}
_HTML_MARKS = {True: "&#10004;", False: "&#10008;", None: "&#9650;"}
_GREY = "#8c959f"


@dataclass
class DoctorReport:
    """The doctor's answer: one :class:`HostCheck` per host, in placement order."""

    rows: list[HostCheck]
    python: str
    head_versions: dict[str, str | None]
    elapsed: float = 0.0
    columns: Sequence[str] = ()
    advice: Advice | None = None
    #: For every (host, peer IP): the interface traffic leaves by, judged (see netif).
    routes: list[RouteFinding] = field(default_factory=list)
    #: What each host said about itself (OS, macOS version, Thunderbolt cables, RDMA devices):
    #: the discovery :func:`~.advice.advise_backend` reads; None for a host that did not answer.
    facts: dict[str, HostFacts | None] = field(default_factory=dict)
    #: Every path the backend needs between two hosts, as the source host found it.
    paths: list[PathResult] = field(default_factory=list)

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

    def _columns(self) -> list[str]:
        cols = list(self.columns)
        for r in self.rows:  # a check no column names still shows
            cols += [c.name for c in r.checks if c.name not in cols]
        return cols

    def _summary(self) -> str:
        ready = sum(r.ok for r in self.rows)
        verdict = "all ready" if self.ok else f"{ready} of {len(self.rows)} hosts ready"
        return f"mlx_cluster doctor: {verdict} ({self.elapsed:.1f} s, python {self.python})"

    def _reach_cells(self) -> tuple[list[str], list[list[str]]]:
        """Who reaches whom: per source host (rows) and destination (columns), the interface
        the data left by, ``FAIL`` for no path, ``.`` where the backend needs none."""
        hosts = [r.host for r in self.rows]
        cells = [["-" if a == b else "." for b in hosts] for a in hosts]
        pos = {h: i for i, h in enumerate(hosts)}
        for p in self.paths:
            if p.src in pos and p.dst in pos:
                mark = {True: p.interface or "ok", False: "FAIL", None: "?"}[p.ok]
                cells[pos[p.src]][pos[p.dst]] = mark
        return hosts, cells

    def reach_text(self) -> str:
        """The matrix of who reaches whom, as text (empty with fewer than two hosts)."""
        if not self.paths:
            return ""
        hosts, cells = self._reach_cells()
        header = ["from \\ to", *hosts]
        table = [[h, *row] for h, row in zip(hosts, cells)]
        widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
        lines = ["who reaches whom (tested on each host; the interface the data leaves by):"]
        for row in [header, *table]:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        return "\n".join(lines)

    def _reach_html(self) -> str:
        if not self.paths:
            return ""
        e = html.escape
        hosts, cells = self._reach_cells()
        details = {(p.src, p.dst): p for p in self.paths}
        cell = "padding:2px 6px;text-align:center;white-space:nowrap"
        head = "".join(f"<th style='{cell}'>{e(h)}</th>" for h in hosts)
        body = []
        for src, row in zip(hosts, cells):
            tds = []
            for dst, mark in zip(hosts, row):
                p = details.get((src, dst))
                if p is None:
                    tds.append(f"<td style='{cell};color:{_GREY}'>{e(mark)}</td>")
                    continue
                tip = e(f"{src} -> {dst} at {p.address}: {p.detail}", quote=True)
                shown = _HTML_MARKS[False] if p.ok is False else e(mark)
                tds.append(f"<td style='{cell};color:{_COLORS[p.ok]}' title='{tip}'>{shown}</td>")
            body.append(f"<tr><th style='{cell};text-align:left'>{e(src)}</th>{''.join(tds)}</tr>")
        return (
            "<div class='mlx-cluster-doctor-reach' style='margin:6px 0'>"
            "<div>who reaches whom <small style='color:#57606a'>(tested on each host; the "
            "interface the data leaves by; &#10008; no path; &middot; not needed)</small></div>"
            "<table style='border-collapse:collapse;font-size:13px'>"
            f"<thead><tr><th style='{cell}'>from \\ to</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )

    def _advice_line(self) -> str | None:
        if self.advice is None:
            return None
        return f"backend: {self.advice.backend} ({self.advice.reason})"

    # ------------------------------------------------------------------------- text

    def __repr__(self) -> str:
        cols = self._columns()
        header = ["host", *cols]
        table = [
            [r.host, *[_TEXT_MARKS[c.ok] if (c := r.get(n)) else "-" for n in cols]]
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
        lines = [self._summary()]
        for row in [header, *table]:  # one space between the marks: 14 columns stay narrow
            cells = [v.ljust(w) for v, w in zip(row, widths)]
            lines.append((cells[0] + "  " + " ".join(cells[1:])).rstrip())
        advice = self._advice_line()
        if advice:
            lines.append(advice)
        reach = self.reach_text()
        if reach:
            lines.append(reach)
        for host, c in self.problems():
            lines.append(f"{_TEXT_MARKS[c.ok]} {host} {c.name}: {c.detail}")
            if c.fix:
                lines.append(f"    fix: {c.fix}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------- HTML

    def _repr_html_(self) -> str:
        e = html.escape
        cols = self._columns()
        cell = "padding:2px 4px;text-align:center"
        # A long package name may wrap after its underscores, so every column fits 1000 px.
        head = "".join(
            f"<th style='{cell};font-weight:600'>{e(n).replace('_', '_<wbr>')}</th>" for n in cols
        )
        body = []
        for r in self.rows:
            address = f" <small style='color:{_GREY}'>{e(r.address)}</small>" if r.address else ""
            cells = [f"<td style='padding:2px 6px;text-align:left;white-space:nowrap'>"
                     f"<b>{e(r.host)}</b>{address}</td>"]  # fmt: skip
            for n in cols:
                c = r.get(n)
                if c is None:
                    cells.append(
                        f"<td style='{cell};color:{_GREY}' title='not checked'>&ndash;</td>"
                    )
                else:
                    tip = e(f"{n}: {c.detail}" if c.detail else n, quote=True)
                    cells.append(
                        f"<td style='{cell};color:{_COLORS[c.ok]}' title='{tip}'>"
                        f"{_HTML_MARKS[c.ok]}</td>"
                    )
            body.append(f"<tr>{''.join(cells)}</tr>")
        color = _COLORS[True] if self.ok else _COLORS[False]
        parts = [
            "<div class='mlx-cluster-doctor' style='max-width:100%;overflow-wrap:anywhere'>",
            f"<p style='color:{color};margin:0 0 4px'><b>{e(self._summary())}</b></p>",
            "<table style='border-collapse:collapse;font-size:13px;table-layout:auto'>"
            f"<thead><tr><th style='padding:2px 6px;text-align:left'>host</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>",
        ]
        parts.append(self._reach_html())
        if self.advice is not None:
            parts.append(
                f"<p style='margin:6px 0'>backend: <b>{e(self.advice.backend)}</b> &mdash; "
                f"{e(self.advice.reason)}</p>"
            )
        for host, c in self.problems():
            fix = (
                f"<div>fix: <code style='white-space:pre-wrap;overflow-wrap:anywhere'>"
                f"{e(c.fix)}</code></div>"
                if c.fix
                else ""
            )
            parts.append(
                f"<div class='mlx-cluster-doctor-problem' style='border-left:3px solid "
                f"{_COLORS[c.ok]};padding:2px 8px;margin:4px 0'>"
                f"<span style='color:{_COLORS[c.ok]}'>{_HTML_MARKS[c.ok]}</span> "
                f"<b>{e(host)}</b> &middot; <b>{e(c.name)}</b>: {e(c.detail)}{fix}</div>"
            )
        parts.append(self._details_html())
        parts.append("</div>")
        return "".join(parts)

    def _details_html(self) -> str:
        """Every check's full detail (paths, versions), folded away until asked for."""
        e = html.escape
        hosts = []
        for r in self.rows:
            items = "".join(
                f"<li><span style='color:{_COLORS[c.ok]}'>{_HTML_MARKS[c.ok]}</span> "
                f"{e(c.name)}: <code style='overflow-wrap:anywhere'>{e(c.detail)}</code></li>"
                for c in r.checks
            )
            hosts.append(f"<div><b>{e(r.host)}</b><ul style='margin:0 0 4px'>{items}</ul></div>")
        return (
            "<details style='margin-top:4px'><summary>every check in full</summary>"
            f"{''.join(hosts)}</details>"
        )
