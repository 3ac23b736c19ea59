"""``all_sum`` bandwidth from the notebook path against the same script under bare launchers.

One timing function runs (a) on the engines of an ``MLXCluster`` through ``cluster.view.execute``
and (b) as a script under bare ``mpiexec`` (mpi backend) or ``mlx.launch`` (ring backend), on the
same ranks/hosts, alternating per repetition. On 2 local ranks always; on 2 and 3 virtual hosts
(network namespaces with sshd) when root.

    python bench/bandwidth.py [reps]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

KIB, MIB = 1024, 1024 * 1024
SIZES = [1 * KIB, 64 * KIB, 1 * MIB, 16 * MIB, 64 * MIB]
# Timed iterations per size: as many as fit in BUDGET_S (at least MIN_ITERS, at most these); the
# count is agreed on by all ranks (an all_sum of the first timing), as collectives must match.
MAX_ITERS = {1 * KIB: 100, 64 * KIB: 50, 1 * MIB: 20, 16 * MIB: 8, 64 * MIB: 5}
MIN_ITERS = 3
BUDGET_S = 0.3
WARMUP = 2

# Shared, verbatim, by the engines and the bare-launcher script.
TIMING_SRC = '''
def _mcmb_allsum_times(sizes, max_iters, min_iters, budget_s, warmup):
    """Median seconds of one float32 all_sum per size, barrier (1-float all_sum) before each."""
    import statistics
    import time

    import mlx.core as mx

    g = mx.distributed.init()
    bar = mx.ones((1,), dtype=mx.float32)
    mx.eval(bar)
    medians = []
    for nbytes in sizes:
        x = mx.ones((nbytes // 4,), dtype=mx.float32)
        mx.eval(x)
        for _ in range(warmup):
            mx.eval(mx.distributed.all_sum(x, group=g))
        t = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=g))
        us = mx.array([int((time.perf_counter() - t) * 1e6) + 1], dtype=mx.int32)
        est = mx.distributed.all_sum(us, group=g).item() / g.size() / 1e6  # same on all ranks
        n_iter = max(min_iters, min(max_iters[nbytes], int(budget_s / (2 * est))))
        samples = []
        for _ in range(n_iter):
            mx.eval(mx.distributed.all_sum(bar, group=g))
            t = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=g))
            samples.append(time.perf_counter() - t)
        medians.append(statistics.median(samples))
    return medians
'''

CALL = f"_mcmb_allsum_times({SIZES!r}, {MAX_ITERS!r}, {MIN_ITERS}, {BUDGET_S}, {WARMUP})"

SCRIPT_MAIN = f'''
if __name__ == "__main__":
    import json
    import os
    import sys
    import time

    import mlx.core as mx

    g = mx.distributed.init(backend=sys.argv[1], strict=True)
    print("{benchlib.READY_TAG}", g.rank(), flush=True)
    time.sleep(0.5)  # the runner renices mlx.launch's busy-looping launcher meanwhile
    medians = {CALL}
    report = {{"medians": medians, "affinity": sorted(os.sched_getaffinity(0))}}
    print("{benchlib.RESULT_TAG}", g.rank(), json.dumps(report), flush=True)
'''


def _label(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


def _per_rep(per_rank: list[list[float]]) -> list[float]:
    """Seconds per size for one repetition: the slowest rank's median (a collective ends when
    its last rank does)."""
    return [max(r[i] for r in per_rank) for i in range(len(SIZES))]


def _ours_run(cluster: Any) -> tuple[list[float], list[Any]]:
    cluster.view.execute(
        TIMING_SRC + f"\n_mcmb_bw = {CALL}\n"
        "import os as _os\n_mcmb_aff = sorted(_os.sched_getaffinity(0))\n"
    )
    return _per_rep(cluster.view["_mcmb_bw"]), cluster.view["_mcmb_aff"]


def _measure(
    where: str,
    backend: str,
    make_cluster: Any,
    base_cmd: list[str],
    base_env: dict[str, str],
    n: int,
    baseline_name: str,
    reps: int,
    notes: dict[str, Any],
) -> list[dict[str, Any]]:
    ours: list[list[float]] = []
    base: list[list[float]] = []
    renice = backend == "ring"  # mlx.launch
    cluster = make_cluster()
    durations = {"ours": 0.0, "baseline": 0.0}
    t0 = time.perf_counter()
    try:
        cluster.start()
        t_start = time.perf_counter() - t0

        def run_ours() -> None:
            t = time.perf_counter()
            times, aff = _ours_run(cluster)
            durations["ours"] += time.perf_counter() - t
            ours.append(times)
            notes.setdefault(f"affinity ours {backend} {where}", aff)

        def run_base() -> None:
            t = time.perf_counter()
            reports = benchlib.run_ranks(base_cmd, n, env=base_env, renice_launcher=renice)
            base.append(_per_rep([r["medians"] for r in reports]))
            durations["baseline"] += time.perf_counter() - t
            notes.setdefault(
                f"affinity baseline {backend} {where}", [r["affinity"] for r in reports]
            )

        benchlib.alternate(reps, run_ours, run_base)
    finally:
        if cluster.running:
            cluster.stop()
    print(
        f"bandwidth: {backend}, {where}: {time.perf_counter() - t0:.0f} s "
        f"(cluster start {t_start:.1f} s, runs: ours {durations['ours']:.0f} s, "
        f"baseline {durations['baseline']:.0f} s)",
        flush=True,
    )
    figures = []
    for i, nbytes in enumerate(SIZES):
        gbs_ours = [nbytes / rep[i] / 1e9 for rep in ours]
        gbs_base = [nbytes / rep[i] / 1e9 for rep in base]
        figures.append(
            compare(
                f"all_sum {_label(nbytes)} float32, {backend}, {where}",
                gbs_ours,
                gbs_base,
                "GB/s",
                ">= 0.95x" if nbytes >= MIB else "report only (target is for >= 1 MiB)",
                baseline_name,
                higher_is_better=True,
            )
        )
    return figures


def bench_bandwidth(reps: int) -> list[dict[str, Any]]:
    """all_sum algorithmic bandwidth (bytes / time): MLXCluster's view vs bare mpiexec and
    mlx.launch running the same timing code, mpi and ring backends, local and virtual hosts."""
    with benchlib.workdir("mcmb-bw-") as work:
        return _bench(reps, work)


def _bench(reps: int, work: str) -> list[dict[str, Any]]:
    from mlx_cluster_magic import MLXCluster

    mpiexec, libmpi = benchlib.mpi_paths()
    script = benchlib.write_script(TIMING_SRC + SCRIPT_MAIN, work, "allsum_times.py")
    mpi_env = {"MLX_MPI_LIBNAME": libmpi}
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    notes: dict[str, Any] = {}
    figures: list[dict[str, Any]] = []

    # 2 local ranks.
    figures += _measure(
        "2 local ranks",
        "mpi",
        lambda: MLXCluster(n=2, backend="mpi"),
        [mpiexec, "-n", "2", *root, "-x", "MLX_MPI_LIBNAME", benchlib.PYTHON, script, "mpi"],
        mpi_env,
        2,
        "bare mpiexec -n 2, same timing code",
        reps,
        notes,
    )
    figures += _measure(
        "2 local ranks",
        "ring",
        lambda: MLXCluster(n=2, backend="ring", ring_port=benchlib.RING_PORT_OURS),
        benchlib.mlx_launch("-n", "2", program=[script, "ring"]),
        {},
        2,
        "mlx.launch -n 2, same timing code",
        reps,
        notes,
    )

    reason = benchlib.vhost_skip_reason()
    if reason:
        print(f"bandwidth: virtual-host part skipped: {reason}", flush=True)
    else:
        with benchlib.vhosts(3) as vc:
            prted = str(Path(mpiexec).parent / "prted")
            sshbin = benchlib.ssh_wrapper_dir(vc, work)
            for k in (2, 3):
                hf = benchlib.write_hostfile(vc, k, Path(work) / f"hosts{k}.json")
                where = f"{k} virtual hosts"
                hosts = ",".join(f"{h}:1" for h in vc.hosts[:k])
                figures += _measure(
                    where,
                    "mpi",
                    lambda hf=hf: MLXCluster(
                        hostfile=hf, backend="mpi", ssh=vc.rsh_agent, timeout=60
                    ),
                    benchlib.vhost_mpiexec(mpiexec, vc, prted, hosts, script, "mpi"),
                    mpi_env,
                    k,
                    f"bare mpiexec --host {hosts} --bind-to none, same timing code",
                    reps,
                    notes,
                )
                figures += _measure(
                    where,
                    "ring",
                    lambda hf=hf: MLXCluster(
                        hostfile=hf,
                        backend="ring",
                        ssh=vc.rsh_agent,
                        ring_port=benchlib.RING_PORT_OURS,
                        timeout=60,
                    ),
                    benchlib.mlx_launch("--hostfile", hf, program=[script, "ring"]),
                    {"PATH": f"{sshbin}{os.pathsep}{os.environ['PATH']}"},
                    k,
                    f"mlx.launch --hostfile ({k} hosts), same timing code",
                    reps,
                    notes,
                )
    print("bandwidth: rank CPU affinity:", json.dumps(notes), flush=True)
    return figures


if __name__ == "__main__":
    benchlib.main(bench_bandwidth)
