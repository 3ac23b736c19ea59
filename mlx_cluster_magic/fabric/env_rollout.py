"""``setup`` from start to end: list every host, refuse before a byte moves, send what differs
to all hosts at once with progress, then ask each host's python what it runs, as a table.

:mod:`.env_manifest` says what the environment is, :mod:`.env_setup` how one host is listed,
compared and written. No IPython import: the progress goes to a ``show(line, final)`` callback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import MLXClusterError
from . import env_relay
from .doctor.collect import ssh_argv
from .env_manifest import Manifest, SetupRefused, build_manifest, list_files
from .env_setup import (
    Cancelled,
    HostListing,
    RootPlan,
    eta,
    host_versions,
    list_host,
    parallel,
    plan_root,
    refusals,
    send_root,
    size_text,
    verify_hashes,
)
from .placement import Host

#: Seconds a host has to list its environment directories (a big venv is ~30k files).
LIST_TIMEOUT_S = 120.0
#: Seconds between two progress lines.
PROGRESS_EVERY_S = 0.5

Show = Callable[[str, bool], None]


@dataclass
class HostRow:
    """One host in the table: what it runs, how it compares, what setup did there."""

    host: str
    python: str | None = None  # the host's interpreter version, None when it has none
    error: str | None = None  # why its python could not answer
    differ: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # name: (host, head)
    extra: list[str] = field(default_factory=list)  # distributions only the host has
    matching: int = 0
    to_send: int = 0  # files that differ (before setup, or still after --check)
    bytes: int = 0
    removed: int = 0
    refused: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return self.error is None and not self.differ and not self.extra


@dataclass
class SetupReport:
    """What ``setup`` found and did, per host; renders as a table."""

    rows: list[HostRow]
    python: str
    dists: int
    checked_only: bool
    elapsed: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.matches and not r.refused for r in self.rows)

    def lines(self) -> list[str]:
        verb = "to send" if self.checked_only else "sent"
        cells = [_row_cells(r) for r in self.rows]
        # each column as wide as its widest cell, so a long list of differences never runs
        # into the next column
        widths = [
            max([len(title), *(len(c[i]) for c in cells)])
            for i, title in enumerate(("host", "python", "distributions"))
        ]
        head = [
            f"setup{' --check' if self.checked_only else ''}: this kernel runs Python "
            f"{self.python} with {self.dists} distributions ({self.elapsed:.1f} s)",
            *self.notes,
            _columns(("host", "python", "distributions", verb), widths),
        ]
        for r, row in zip(self.rows, cells):
            head.append(_columns(row, widths))
            head += [f"  refused: {line}" for line in r.refused]
        if self.checked_only and not self.ok:
            head.append("%mlx_cluster setup makes every host match")
        return head

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _row_cells(r: HostRow) -> tuple[str, str, str, str]:
    """A host's row of the table: host, python, distributions, what moved."""
    if r.error is not None:
        dists = r.error
    elif r.matches:
        dists = f"all {r.matching} match"
    else:
        parts = [f"{k} {a or 'missing'} (head {b})" for k, (a, b) in sorted(r.differ.items())]
        parts += [f"{k} (not on the head)" for k in r.extra]
        dists = f"{len(parts)} differ: " + ", ".join(parts)
    moved = f"{r.to_send} files, {size_text(r.bytes)}" + (
        f"; {r.removed} extra removed" if r.removed else ""
    )
    return r.host, r.python or "missing", dists, moved


def _columns(cells: Sequence[str], widths: Sequence[int]) -> str:
    """One line of the table: every cell but the last padded to its column's width."""
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]


def _compare(row: HostRow, got: dict[str, Any], manifest: Manifest) -> None:
    if "error" in got:
        row.error = str(got["error"])
        return
    row.python = str(got.get("python"))
    theirs: dict[str, str] = got.get("dists") or {}
    for name, version in manifest.dists.items():
        if theirs.get(name) == version:
            row.matching += 1
        else:
            row.differ[name] = (theirs.get(name), version)
    row.extra = sorted(set(theirs) - set(manifest.dists))
    if row.python != manifest.version:
        row.differ["python"] = (row.python, manifest.version)


class _Sender:
    """Every host's streams at once; the caller's thread shows progress and takes Ctrl-C."""

    def __init__(self, hosts: list[Host], plans: list[list[RootPlan]], ssh: list[str]):
        self.hosts, self.plans, self.ssh = hosts, plans, ssh
        self.done = {h.ssh: 0 for h in hosts}
        self.total = {h.ssh: sum(p.wire_bytes for p in ps) for h, ps in zip(hosts, plans)}
        # Progress is counted on the wire (tar's headers and padding included) but said in the
        # files' own bytes, the size the table shows: one transfer, one size.
        self.content = {h.ssh: sum(p.bytes for p in ps) for h, ps in zip(hosts, plans)}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _one(self, host: Host, plans: list[RootPlan]) -> None:
        def tick(n: int) -> None:
            with self.lock:
                self.done[host.ssh] += n

        try:
            for plan in plans:
                if plan.idle:
                    continue
                err = send_root(host, self.ssh, plan, tick, self.stop)
                if err:
                    with self.lock:
                        self.errors.append(err)
                    return
        except Cancelled:
            return

    def line(self, t0: float, final: bool = False) -> str:
        with self.lock:
            done, total = sum(self.done.values()), sum(self.total.values())
            per = " · ".join(
                f"{h} {size_text(self._content_done(h, final))}"
                + ("" if final else f" of {size_text(self.content[h])}")
                for h in self.done
            )
        took = time.monotonic() - t0
        if final:
            return f"setup: sent {per} in {took:.1f} s"
        left = eta(done, total, took)
        return f"setup: {per}" + (f" · {left}" if left else "")

    def _content_done(self, host: str, final: bool) -> float:
        """How much of ``host``'s files has been sent, in the files' own bytes."""
        wire, content = self.total[host], self.content[host]
        if final and not self.errors:
            return content
        return min(content, self.done[host] * content / wire) if wire > 0 else 0

    def run(self, show: Show | None) -> None:
        threads = [
            threading.Thread(target=self._one, args=(h, p), daemon=True)
            for h, p in zip(self.hosts, self.plans)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(PROGRESS_EVERY_S / len(threads))
                if show is not None:
                    show(self.line(t0), False)
        except KeyboardInterrupt:
            self.stop.set()
            for t in threads:
                t.join()
            raise MLXClusterError(
                "setup interrupted: what arrived is kept under temporary names (nothing is "
                "half-written under a final one); run setup again to resume"
            ) from None
        if show is not None:
            show(self.line(t0, final=True), True)
        if self.errors:
            raise MLXClusterError("\n".join(self.errors))


def run_setup(
    hosts: Sequence[Host],
    *,
    ssh: str | Sequence[str] | None = None,
    check: bool = False,
    verify: bool = False,
    show: Show | None = None,
    manifest: Manifest | None = None,
) -> SetupReport:
    """Make every remote host's environment this kernel's (``check``: only say how they
    differ). Raises SetupRefused, one line per refusal, before anything is written."""
    t0 = time.monotonic()
    manifest = manifest or build_manifest(files=False)
    argv = ssh_argv(ssh)
    remote = [h for h in dict.fromkeys(hosts) if not h.is_local]
    if not remote:
        raise MLXClusterError("setup: no remote host given: pass --hosts or --hostfile")
    # The hosts list their directories and report their versions while this machine lists
    # its own: the versions stand for a host that is sent nothing.
    with ThreadPoolExecutor(max_workers=2 * len(remote) + 1) as pool:
        listed = [pool.submit(list_host, h, argv, manifest, verify, LIST_TIMEOUT_S) for h in remote]
        asked = [pool.submit(host_versions, h, argv, manifest.python, 30.0) for h in remote]
        if not any(root.entries for root in manifest.roots):
            list_files(manifest)
        listings: list[HostListing] = [f.result() for f in listed]
        versions: list[dict[str, Any]] = [f.result() for f in asked]
    hashes = verify_hashes(manifest) if verify else {}
    plans = [
        [
            plan_root(root, listing.roots.get(root.path), hashes.get(root.path) if verify else None)
            for root in manifest.roots
        ]
        for listing in listings
    ]
    refused = [refusals(manifest, lst, ps) for lst, ps in zip(listings, plans)]
    rows = [
        HostRow(
            h.ssh,
            to_send=sum(p.files for p in ps),
            bytes=sum(p.bytes for p in ps),
            removed=sum(len(p.remove) for p in ps),
            refused=r,
        )
        for h, ps, r in zip(remote, plans, refused)
    ]
    notes = list(manifest.notes)
    if not check:
        lines = [line for r in refused for line in r]
        if lines:
            raise SetupRefused("\n".join(lines))
        notes += _send(remote, listings, plans, manifest, argv, show)
        changed = [i for i, ps in enumerate(plans) if not all(p.idle for p in ps)]
        again = parallel(host_versions, [remote[i] for i in changed], argv, manifest.python, 30.0)
        for i, got in zip(changed, again):
            versions[i] = got
    for row, got in zip(rows, versions):
        _compare(row, got, manifest)
    return SetupReport(
        rows,
        manifest.version,
        len(manifest.dists),
        check,
        time.monotonic() - t0,
        notes,
    )


def _send(
    hosts: list[Host],
    listings: list[HostListing],
    plans: list[list[RootPlan]],
    manifest: Manifest,
    ssh: list[str],
    show: Show | None,
) -> list[str]:
    """Send what each host lacks: over the cables when they have addresses (the environment
    crosses this machine's link once, :mod:`.env_relay`), else to each host directly. Returns
    the lines that say which, for the report."""
    needy = [k for k, ps in enumerate(plans) if any(p.send for p in ps)]
    if len(needy) < 2:
        _Sender(hosts, plans, ssh).run(show)
        return []
    relay = env_relay.prepare(hosts, listings, plans, manifest)
    if isinstance(relay, str):
        line = f"setup: {relay}"
        if show is not None:
            show(line, True)
        _Sender(hosts, plans, ssh).run(show)
        return [line]
    try:
        env_relay.run_relay(hosts, ssh, plans, relay, show)
    except env_relay.RelayUnavailable as e:  # what was staged for it is used all the same
        line = f"setup: the relay could not start ({e}): each Mac gets it over this machine's link"
        if show is not None:
            show(line, True)
        _Sender(hosts, plans, ssh).run(show)
        return [line]
    except env_relay.RelayIncomplete as e:  # the others have it; these get the rest directly
        failed = sorted(e.failed)
        names = ", ".join(hosts[k].ssh for k in failed)
        line = (
            "setup: "
            + "; ".join(e.failed[k] for k in failed)
            + f": {names} {'gets' if len(failed) == 1 else 'get'} the rest over this machine's link"
        )
        if show is not None:
            show(line, True)
        rest = [  # a directory a Mac had whole over the cables is in place already
            [RootPlan(p.root) if (k, i) in e.completed else p for i, p in enumerate(plans[k])]
            for k in failed
        ]
        _Sender([hosts[k] for k in failed], rest, ssh).run(show)
        return [*relay.lines(hosts), line]
    return relay.lines(hosts)
