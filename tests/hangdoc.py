"""Test helpers for the hang doctor: per-rank recorder snapshots written by a thread on each
engine (a path of the tests' own, beside the status channel), stacks, and the deliberate bugs.

Every scenario parks the ranks that must not take part in a loop of ``time.sleep`` until a gate
file appears, so a test can look at the hang and then release it: the late rank issues the
missing call and every rank finishes, leaving the cluster healthy for the next scenario.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mlx_cluster_magic.observe import hang_verdict as why
from mlx_cluster_magic.observe import stack_capture as stacks

SETUP = """
import json as _json, os as _os, threading as _threading, time
from mlx_cluster_magic.rank import stack_dump as _stacks
from mlx_cluster_magic.rank import flight_recorder as _recorder
from mlx_cluster_magic.rank.status_sidecar import ACTIVITY as _activity
_recorder.install()
_stacks.install()

def _hd_dump(path):
    while True:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            # busy/idle as the status channel reports it: the engine's own request handling
            _json.dump(_recorder.snapshot(busy=_activity.busy_since is not None), f)
        _os.replace(tmp, path)
        time.sleep(0.2)

def _hd_gate(path):
    while not _os.path.exists(path):
        time.sleep(0.05)

_threading.Thread(target=_hd_dump, args=({dir!r} + f"/rank{{world.rank()}}.json",),
                  daemon=True).start()
"""


def setup(view: Any, where: Path) -> None:
    """Install the recorder and the stack dumper on every rank; start the snapshot writers."""
    view.execute(SETUP.format(dir=str(where)))


def snapshots(where: Path, n: int) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for r in range(n):
        try:
            out.append(json.loads((where / f"rank{r}.json").read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out


#: Where the scenarios' real snapshots and stack dumps are kept for the fast analysis tests;
#: ``MLX_CLUSTER_CAPTURE=1`` when running test_why.py rewrites them.
CAPTURED = Path(__file__).parent / "fixtures" / "hangdoc"


def analyze(
    where: Path, n: int, hosts: list[str], settle: float = 1.0, name: str | None = None
) -> why.WhyReport:
    """Snapshots (after ``settle`` seconds, so they show the hang) and live stacks -> report."""
    time.sleep(settle)
    snaps = snapshots(where, n)
    targets = [
        None
        if s is None or not s.get("stack_file")
        else (int(s["pid"]), str(s["stack_file"]), None)
        for s in snaps
    ]
    dumps = stacks.capture_all(targets)
    report = why.analyze(snaps, dumps, hosts)
    if name and os.environ.get("MLX_CLUSTER_CAPTURE") == "1":
        CAPTURED.mkdir(parents=True, exist_ok=True)
        data = {"snapshots": snaps, "stacks": dumps, "hosts": hosts, "verdict": report.verdict}
        (CAPTURED / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return report


def gate(where: Path, name: str) -> str:
    path = where / name
    if path.exists():
        os.unlink(path)
    return str(path)


def late_rank_cell(gate_path: str) -> str:
    """A cell whose rank 1 waits at ``gate_path`` before the all_sum on line 3 (the others are
    already in it): the late-rank case of the hang tests."""
    return (
        "if world.rank() == 1:\n"
        f"    _hd_gate({gate_path!r})\n"
        "y = mx.distributed.all_sum(mx.ones(4)).sum().item()\n"
    )
