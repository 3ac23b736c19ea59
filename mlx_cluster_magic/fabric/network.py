"""``%mlx_cluster network``: every Mac's cables from one cell, their addresses, the hostfile.

:func:`network` reads the Macs over ssh (:mod:`.network_discover`), shows the cabling and the
plan (:mod:`.network_plan`), and with ``configure`` applies it: over ssh with ``sudo -n`` when
every Mac has passwordless sudo, otherwise it prints each Mac's commands to paste into that
Mac's terminal and returns at once (nothing waits on input). The addresses are set with
``networksetup`` and survive a reboot; the commands that undo them are kept in a record
beside the hostfile, which ``undo`` runs. The hostfile is then written and checked with the
doctor across the new addresses. No IPython import.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MLXClusterError
from .doctor.report import Check
from .network_discover import MacNetwork, discover_hosts, run_script
from .network_plan import (
    DEFAULT_POOL,
    LAYOUTS,
    Cable,
    Plan,
    PlanRefused,
    cabling_summary,
    find_cables,
    loops,
    plan_lan,
    plan_network,
    rdma_possible,
    route_warnings,
    star_master,
)
from .placement import Host, Placement, parse_host_list, read_hostfile, write_hostfile
from .topology import topology_svg

__all__ = ["NetworkReport", "network", "undo_record_path"]

PERSISTENCE = (
    "persistent: networksetup writes the system's network preferences, so these addresses "
    "survive a reboot; network --undo puts back what each Mac had"
)
LAN_BANDWIDTH = (
    "bandwidth over the LAN is not assumed: after start, %mlx_cluster links measures every "
    "pair (Wi-Fi is often 10-50 times slower than a Thunderbolt cable)"
)


@dataclass
class NetworkReport:
    """What ``network`` found, planned and did; shown as a picture and a table."""

    macs: list[MacNetwork]
    cables: list[Cable]
    summary: dict[str, str]
    plan: Plan | None = None
    refused: str | None = None
    applied: bool = False
    pasted: bool = False  # commands printed for a person to paste
    undone: bool = False
    hostfile: Path | None = None
    hostfile_json: dict[str, Any] | None = None
    doctor: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def names(self) -> list[str]:
        return [m.host for m in self.macs]

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """One row per cable: ends, speed, docks between, RDMA."""
        out = []
        for c in self.cables:
            a = f"{self.names[c.a]} {c.port_a} ({c.dev_a or '?'})"
            b = f"{self.names[c.b]} {c.port_b} ({c.dev_b or '?'})"
            speed = f"{c.gbps:g} Gb/s" if c.gbps else "?"
            via = ", ".join(c.via) or "direct"
            out.append((a, b, speed, via, rdma_possible(self.macs, c)))
        return out

    def _lines(self) -> list[str]:
        lines = [
            f"{len(self.macs)} Macs, {len(self.cables)} Thunderbolt cables "
            f"(read in {self.elapsed_s:.1f} s)"
        ]
        lines += [f"  {a} -- {b}  {s}  {v}  rdma {r}" for a, b, s, v, r in self.rows()]
        lines += [f"  {k}: {v}" for k, v in self.summary.items()]
        lines += [f"warning: {n}" for n in self.notes]
        if self.refused:
            lines.append(f"plan refused: {self.refused}")
        if self.plan is not None:
            lines += _plan_lines(self.plan, self.applied, self.pasted, self.undone)
        if self.hostfile_json is not None:
            where = f"hostfile {self.hostfile}" if self.hostfile else "hostfile (not written)"
            lines.append(f"{where}: {json.dumps(self.hostfile_json)}")
        lines += self.doctor
        lines += self.done
        return lines

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def picture(self) -> str:
        """The cabling in the topology view (hosts on a circle, a line per cable)."""
        n = len(self.macs)
        cells: list[list[Any]] = [[None] * n for _ in range(n)]
        for c in self.cables:
            via = f" through {', '.join(c.via)}" if c.via else ""
            cells[c.a][c.b] = f"{c.dev_a}/{c.dev_b}{via}"  # one entry per cable
        hosts = tuple(Host(m.host, (), None, tuple(cells[i])) for i, m in enumerate(self.macs))
        master = star_master(n, self.cables)
        hub = self.names[master] if master is not None and n > 2 else None
        return topology_svg(Placement(hosts, (1,) * n), hub=hub)

    def _repr_html_(self) -> str:
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
            for row in self.rows()
        )
        table = (
            "<table><tr><th>from</th><th>to</th><th>speed</th><th>through</th><th>RDMA</th>"
            f"</tr>{rows}</table>"
        )
        text = html.escape("\n".join(self._lines()[len(self.cables) + 1 :]))
        return f'<div class="mlx-network">{self.picture()}{table}<pre>{text}</pre></div>'


def _plan_lines(plan: Plan, applied: bool, pasted: bool, undone: bool) -> list[str]:
    lines = [f"plan: {plan.layout}, backend {plan.backend} ({plan.reason})"]
    for a in plan.assignments:
        state = "kept" if a.kept else "new"
        lines.append(
            f"  {plan.names[a.host]} {a.port} ({a.device}): {a.address}/"
            f"{a.network.prefixlen} {state}"
        )
    if undone:
        return lines
    if not plan.changes:
        lines.append("nothing to change: every cable already has its addresses")
    elif applied:
        lines.append(f"applied over ssh with sudo -n; {PERSISTENCE}")
    elif pasted:
        lines.append(
            "not every Mac has passwordless sudo, so nothing was changed: paste each "
            "block into that Mac's terminal, then run this cell again"
        )
        for host, commands in plan.commands.items():
            if commands:
                lines += [f"--- on {host} ---", *commands, f"# check: {plan.checks[host]}"]
        lines.append(PERSISTENCE)
    else:
        lines.append("--configure applies this plan")
    return lines


def undo_record_path(write: str | os.PathLike[str] | None, hostfile: str | None) -> Path:
    """Beside the hostfile written (or read); else in ~/.mlx_cluster."""
    base = write or hostfile
    if base:
        path = Path(base)
        return path.with_name(path.name + ".undo.json")
    return Path.home() / ".mlx_cluster" / "network-undo.json"


def _read_record(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    hosts = data.get("hosts") if isinstance(data, dict) else None
    return {k: list(v) for k, v in hosts.items()} if isinstance(hosts, dict) else {}


def _write_record(path: Path, record: dict[str, list[str]]) -> None:
    """Private: 0600 in a 0700 folder when the folder is ours."""
    if path.parent == Path.home() / ".mlx_cluster":
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not record:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"hosts": record}, f, indent=2)
    os.replace(tmp, path)


def _names(hosts: str | None, hostfile: str | None) -> list[str]:
    if hosts and hostfile:
        raise MLXClusterError("network: give --hosts or --hostfile, not both")
    if hosts:
        return [h.ssh for h in parse_host_list(hosts).hosts]
    if hostfile:
        return [h.ssh for h in read_hostfile(hostfile).hosts]
    raise MLXClusterError("network: give the Macs' ssh names, e.g. --hosts mac1,mac2,mac3")


def _run_commands(
    macs: Sequence[MacNetwork], commands: dict[str, list[str]], ssh: str | None, timeout: float
) -> list[str]:
    """Run each Mac's commands over ssh, ``sudo -n`` so nothing asks for a password; the
    failures, one line each."""
    from concurrent.futures import ThreadPoolExecutor

    def one(m: MacNetwork) -> str | None:
        lines = [c.replace("sudo ", "sudo -n ", 1) for c in commands.get(m.host, [])]
        if not lines:
            return None
        rc, _, err = run_script(m.host, "set -e\n" + "\n".join(lines) + "\n", ssh, timeout)
        if rc == 0:
            return None
        last = (err.strip().splitlines() or [f"exit status {rc}"])[-1]
        return f"{m.host}: {last}"

    with ThreadPoolExecutor(max_workers=max(1, len(macs))) as pool:
        return [e for e in pool.map(one, macs) if e]


_NOT_RUN = Check("peers", None)


def _check_hostfile(path: Path, ssh: str | None, python: str | None, timeout: float) -> list[str]:
    """The doctor across the new addresses: the network's checks, one line."""
    from .doctor import run_doctor

    placement = read_hostfile(path)
    report = run_doctor(
        placement, ssh=ssh, python=python, timeout=timeout, backend=placement.backend, advice=False
    )
    network_checks = ("ssh", "ip", "route", "peers")
    bad = [
        f"{row.host} {c.name}: {c.detail}"
        for row in report.rows
        for c in row.checks
        if c.name in network_checks and c.ok is False
    ]
    if bad:
        return [f"doctor: {'; '.join(bad)}"]
    untested = [row.host for row in report.rows if (row.get("peers") or _NOT_RUN).ok is not True]
    if untested:
        return [
            f"doctor: the addresses are in place; who reaches whom could not be tested on "
            f"{', '.join(untested)} (no python there yet): %mlx_cluster setup, then start "
            "tests it"
        ]
    return [f"doctor: every Mac reaches its peers over the new addresses ({report.elapsed:.1f} s)"]


def _undo(
    macs: Sequence[MacNetwork],
    record_path: Path,
    ssh: str | None,
    timeout: float,
    report: NetworkReport,
) -> NetworkReport:
    record = _read_record(record_path)
    todo = {m.host: record[m.host] for m in macs if m.host in record}
    unread = [f"{m.host} ({m.error})" for m in macs if m.error and m.host in todo]
    if unread:
        raise MLXClusterError(
            f"network --undo: could not read {', '.join(unread)}; nothing was undone: run it "
            "again once ssh reaches every Mac"
        )
    if not todo:
        raise MLXClusterError(
            f"network --undo: no record of a change to these Macs in {record_path}; nothing to undo"
        )
    if all(m.sudo for m in macs if m.host in todo):
        failed = _run_commands(macs, todo, ssh, timeout)
        if failed:
            raise MLXClusterError(
                f"network --undo failed on {'; '.join(failed)}; run it again once that Mac is back"
            )
        for host in todo:
            record.pop(host, None)
        _write_record(record_path, record)
        report.done.append(f"undone on {', '.join(todo)}: each Mac has what it had before")
    else:
        blocks = [line for h, cmds in todo.items() for line in (f"--- on {h} ---", *cmds)]
        report.done += [
            "not every Mac has passwordless sudo, so nothing was undone: paste each block into "
            "that Mac's terminal",
            *blocks,
        ]
    report.undone = True
    return report


def network(
    hosts: str | None = None,
    hostfile: str | None = None,
    *,
    configure: bool = False,
    undo: bool = False,
    over: str = "thunderbolt",
    layout: str = "auto",
    subnets: str = DEFAULT_POOL,
    write: str | os.PathLike[str] | None = None,
    ssh: str | None = None,
    python: str | None = None,
    timeout: float = 20.0,
) -> NetworkReport:
    """Read every Mac's cables over ssh; with ``configure`` give them addresses and write the
    hostfile; ``undo`` puts back what the last configure changed. Errors are one line."""
    if layout not in LAYOUTS:
        raise MLXClusterError(f"network: --layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if over not in ("thunderbolt", "lan"):
        raise MLXClusterError(f"network: --over {over!r}: use thunderbolt or lan")
    try:
        pool = ipaddress.IPv4Network(subnets)
    except ValueError:
        raise MLXClusterError(
            f"network: --subnets {subnets!r} is not an IPv4 network: give one such as "
            f"{DEFAULT_POOL}"
        ) from None
    if pool.prefixlen > 30:
        raise MLXClusterError(
            f"network: --subnets {subnets} is smaller than one /30: give a "
            f"larger one such as {DEFAULT_POOL}"
        )
    names = _names(hosts, hostfile)
    t0 = time.monotonic()
    macs = discover_hosts(names, ssh, timeout)
    cables = find_cables(macs) if over == "thunderbolt" else []
    report = NetworkReport(
        macs,
        cables,
        cabling_summary(names, cables) if cables else {},
        elapsed_s=time.monotonic() - t0,
    )
    report.notes = loops(macs, cables) + route_warnings(macs)
    if undo:
        return _undo(macs, undo_record_path(write, hostfile), ssh, timeout, report)
    if over == "lan":
        return _lan(report, write, ssh, python, timeout)
    try:
        report.plan = plan_network(macs, layout=layout, pool=subnets, avoid=_head_networks())
    except (PlanRefused, ValueError) as e:
        if configure:
            raise MLXClusterError(f"network --configure: {e}") from None
        report.refused = str(e)
        return report
    report.hostfile_json = report.plan.hostfile
    if configure:
        _configure(report, write, hostfile, ssh, python, timeout)
    return report


def _lan(
    report: NetworkReport, write: Any, ssh: str | None, python: str | None, timeout: float
) -> NetworkReport:
    try:
        report.hostfile_json = plan_lan(report.macs)
    except PlanRefused as e:
        raise MLXClusterError(f"network --over lan: {e}") from None
    if write is not None:
        report.hostfile = write_hostfile(write, report.hostfile_json["hosts"], backend="ring")
        report.doctor = _check_hostfile(report.hostfile, ssh, python, timeout)
    report.done.append(LAN_BANDWIDTH)
    return report


def _configure(
    report: NetworkReport,
    write: Any,
    hostfile: str | None,
    ssh: str | None,
    python: str | None,
    timeout: float,
) -> None:
    plan = report.plan
    assert plan is not None
    macs = report.macs
    if plan.changes:
        record_path = undo_record_path(write, hostfile)
        record = _read_record(record_path)
        for host, commands in plan.undo.items():
            if commands and host not in record:  # the first record holds what the Mac had
                record[host] = commands
        _write_record(record_path, record)
        if not all(m.sudo for m in macs if plan.commands.get(m.host)):
            report.pasted = True
            return
        failed = _run_commands(macs, plan.commands, ssh, timeout)
        if failed:
            raise MLXClusterError(
                f"network --configure failed on {'; '.join(failed)}; the "
                "other Macs are configured: fix that Mac and run it again"
            )
        report.applied = True
        _verify(report, ssh, timeout)
    if write is not None:
        report.hostfile = write_hostfile(
            write,
            report.hostfile_json["hosts"] if report.hostfile_json else [],
            backend=plan.backend,
        )
        report.doctor = _check_hostfile(report.hostfile, ssh, python, timeout)


def _verify(report: NetworkReport, ssh: str | None, timeout: float) -> None:
    """Read every Mac's interfaces again (``ifconfig -a`` alone): each planned address must
    now be on its port."""
    from concurrent.futures import ThreadPoolExecutor

    from .netif import parse_ifconfig

    plan = report.plan
    assert plan is not None

    def read(host: str) -> dict[str, Any]:
        rc, out, _ = run_script(host, "ifconfig -a </dev/null\n", ssh, timeout)
        return dict(parse_ifconfig(out)) if rc == 0 else {}

    with ThreadPoolExecutor(max_workers=max(1, len(plan.names))) as pool:
        again = list(pool.map(read, plan.names))
    missing = []
    for a in plan.assignments:
        iface = again[a.host].get(a.device or "")
        if iface is None or a.address not in iface.addresses:
            missing.append(f"{plan.names[a.host]} {a.device} {a.address}")
    if missing:
        raise MLXClusterError(
            f"network --configure: the commands ran but {', '.join(missing)} is not in place; "
            "run network again to see what each Mac has"
        )


def _head_networks() -> list[str]:
    """The notebook's own networks, so a cable subnet never shadows one of them."""
    from .netif import local_interfaces

    try:
        found = local_interfaces()
    except Exception:  # a head that cannot list its interfaces: the Macs' own still count
        return []
    return [cidr for i in found.values() for cidr in i.inet]
