"""Recovery after a crash, and what ``report()`` costs.

recovery: notebook 02's ``%%px`` cells run on 2 local ranks; a rank is killed; the time until
its state is back (the variables its cells define, the trained model included) with
``cluster.restart(replay=True)``, against a restart plus the same cells run again one by one
as a person would (``%%px`` per cell; the person's own time not counted).

report: one ``report(step=i, loss=x)`` call on an engine against the same loop without it
(per call, absolute target 20 us), and a ~4 s compute-bound cell calling ``report`` 1,000 times
a second against the same cell without it.

    python bench/recovery.py [reps]
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "02-data-parallel-mlp.ipynb"


def _px_cells() -> list[tuple[str, str]]:
    """(magic line, body) of every ``%%px`` cell of notebook 02, in order."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = []
    for c in nb.cells:
        if c.cell_type == "code" and c.source.startswith("%%px"):
            first, _, body = c.source.partition("\n")
            cells.append((first[len("%%px") :].strip(), body))
    return cells


def _kill_rank(cluster: Any) -> None:
    os.kill(cluster.ranks[1]["pid"], signal.SIGKILL)
    while not cluster.dead_ranks():
        time.sleep(0.01)
    cluster.abort("a rank was killed (benchmark)")


def bench_recovery(reps: int) -> list[dict[str, Any]]:
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic import MLXCluster

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    cells = _px_cells()
    replay: list[float] = []
    by_hand: list[float] = []
    cluster = MLXCluster(n=2).start(activate=True)
    try:
        for line, body in cells:
            shell.run_cell_magic("px", line, body)
        assert len(cluster.history()) == len(cells), cluster.history()

        def ours() -> None:
            _kill_rank(cluster)
            t = time.perf_counter()
            cluster.restart(activate=True, replay=True)
            replay.append(time.perf_counter() - t)
            assert cluster.view["test_accuracy"][0] > 0.5

        def base() -> None:
            _kill_rank(cluster)
            t = time.perf_counter()
            cluster.restart(activate=True)
            for line, body in cells:
                shell.run_cell_magic("px", line, body)
            by_hand.append(time.perf_counter() - t)
            assert cluster.view["test_accuracy"][0] > 0.5

        benchlib.alternate(reps, ours, base)
    finally:
        if cluster.running:
            cluster.stop()
    return [
        compare(
            f"killed rank to notebook 02's state restored ({len(cells)} %%px cells), "
            "restart --replay",
            replay,
            by_hand,
            "s",
            "report",
            "restart, then the same cells run again one by one",
        )
    ]


REPORT_LOOP = """
import time as _t
_n = {n}
_t0 = _t.perf_counter()
for _i in range(_n):
    {call}
_per = (_t.perf_counter() - _t0) / _n
"""

WORK_CELL = """
import time as _t
_a = mx.random.normal((256, 256), key=mx.random.key(world.rank()))
_t0 = _t.perf_counter()
_next = _t0
_i = 0
while _t.perf_counter() - _t0 < 4.0:
    _a = mx.tanh(_a @ _a)
    mx.eval(_a)
    _i += 1
    {call}
_steps = _i
"""

REPORT_EVERY_MS = """if _t.perf_counter() >= _next:
        report(step=_i, loss=0.5)
        _next += 0.001"""


def bench_report(reps: int) -> list[dict[str, Any]]:
    from mlx_cluster_magic import MLXCluster

    per_call: list[float] = []
    empty: list[float] = []
    steps_on: list[float] = []
    steps_off: list[float] = []
    with MLXCluster(n=2) as cluster:
        view = cluster.view

        def call_on() -> None:
            view.execute(REPORT_LOOP.format(n=200_000, call="report(step=_i, loss=0.5)"))
            per_call.append(statistics.median(view["_per"]) * 1e6)

        def call_off() -> None:
            view.execute(REPORT_LOOP.format(n=200_000, call="pass"))
            empty.append(statistics.median(view["_per"]) * 1e6)

        benchlib.alternate(reps, call_on, call_off)

        def work_on() -> None:
            view.execute(WORK_CELL.format(call=REPORT_EVERY_MS))
            steps_on.append(statistics.median(view["_steps"]))

        def work_off() -> None:
            view.execute(WORK_CELL.format(call="pass"))
            steps_off.append(statistics.median(view["_steps"]))

        view.execute(WORK_CELL.format(call="pass"))  # warm-up
        benchlib.alternate(reps, work_on, work_off)
    # work done in a fixed 4 s: time per step is its inverse
    return [
        compare(
            "report(step=i, loss=x) on an engine, per call",
            per_call,
            empty,
            "us",
            "<= 20 us (absolute)",
            "the same loop without the call",
        ),
        compare(
            "compute-bound cell calling report() 1,000 times a second: time per step",
            [4.0 / s for s in steps_on],
            [4.0 / s for s in steps_off],
            "s",
            "<= 1.01x",
            "the same cell without report()",
        ),
    ]


def bench_all(reps: int) -> list[dict[str, Any]]:
    return bench_report(reps) + bench_recovery(reps)


if __name__ == "__main__":
    benchlib.setup()
    benchlib.main(bench_all)
