"""``%%px pass`` against ipyparallel's own ``%%px``, alternating round by round on two live
clusters of 2 local ranks in one process (each round runs both back to back: the figure is the
median of the per-round ratios, with its interval), and what each request costs on an engine
(the request hooks and the status notices they send; the flight recorder records collectives,
not requests, so it adds nothing here).

    python bench/px_parity.py [reps]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import benchlib
from benchlib import compare, median_interval

ROUNDS = 300
PER_REQUEST = """
import timeit as _ti
from mlx_cluster_magic.rank.status_sidecar import ACTIVITY as _act
_n = 5000
_hooks_us = _ti.timeit(lambda: (_act.started(), _act.finished()), number=_n) / _n * 1e6
"""


def bench_px_parity(reps: int) -> list[dict[str, Any]]:
    import ipyparallel as ipp
    from ipyparallel.client.magics import ParallelMagics
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic import MLXCluster
    from mlx_cluster_magic.cluster.px import MLXParallelMagics

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    raw = ipp.Cluster(engines="mpi", n=2, log_level=40)
    rc = raw.start_and_connect_sync()
    cluster = MLXCluster(n=2).start()
    ours_t: list[float] = []
    stock_t: list[float] = []
    ratios: list[float] = []  # per round: ours / stock, run back to back
    hooks: list[float] = []
    try:
        dv = rc[:]
        dv.block = True
        stock = ParallelMagics(shell, dv)
        ours = MLXParallelMagics(shell, cluster.view, cluster)
        for f in (stock, ours):
            for _ in range(20):  # warm-up
                f.cell_px("", "pass")
        for _ in range(max(reps, 1)):
            o, s = [], []
            for i in range(ROUNDS):
                for name, f in (
                    (("o", ours), ("s", stock)) if i % 2 == 0 else (("s", stock), ("o", ours))
                ):
                    t = time.perf_counter()
                    f.cell_px("", "pass")
                    (o if name == "o" else s).append((time.perf_counter() - t) * 1e3)
                ratios.append(o[-1] / s[-1])
            ours_t.append(statistics.median(o))
            stock_t.append(statistics.median(s))
        cluster.view.execute(PER_REQUEST, block=True)
        hooks = [float(x) for x in cluster.view["_hooks_us"]]
    finally:
        cluster.stop()
        rc.close()
        raw.stop_cluster_sync()
    lo, hi = median_interval(ratios)
    print(f"px: request hooks + status notices per request on each engine: {hooks} us", flush=True)
    print(
        f"px: {len(ratios)} rounds, per-round ratio ours/stock: median "
        f"{statistics.median(ratios):.3f}x, ~95% interval of the median {lo:.3f}..{hi:.3f}x",
        flush=True,
    )
    return [
        compare(
            f"%%px pass, alternating with ipyparallel's own %%px on a second live cluster: "
            f"per-round ratio ({len(ratios)} rounds; ~95% interval of the median "
            f"{lo:.3f}..{hi:.3f}x)",
            ratios,
            [1.0] * len(ratios),
            "x",
            "<= 1.03x",
            "ipyparallel's %%px (ParallelMagics), raw cluster, same process (ratio 1)",
        ),
        compare(
            f"%%px pass round trip, alternating with ipyparallel's own %%px (medians of {ROUNDS} "
            "rounds per run)",
            ours_t,
            stock_t,
            "ms",
            "report",
            "ipyparallel's %%px (ParallelMagics), raw cluster, same process",
        ),
        compare(
            "per request on an engine: request hooks and their two status notices",
            hooks,
            hooks,
            "us",
            "report",
            "(absolute)",
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_px_parity)
