"""Tokens/s of mlx-lm generation from the notebook path against a plain script under launchers.

One generation function (mlx-lm's ``sharded_load`` with tensor parallelism, then greedy
``stream_generate``) runs (a) on the engines of an ``MLXCluster`` through ``cluster.view.execute``
exactly as notebook 06 does, calling ``report(tok_s=...)`` on every token, and (b) as a plain
script under ``mlx.launch`` (ring backend) or bare ``mpiexec`` (mpi backend) on the same ranks,
without ``report``; alternating per repetition. The model is the notebook's: the small Llama
that ``mlx_cluster_magic.rank.lm.write_tiny_llama`` writes (no download). Both must produce the
same tokens.
On 2 local ranks always; on 2 virtual hosts (network namespaces with sshd) when root.

The like-for-like figure is mpi against bare ``mpiexec``. Against ``mlx.launch`` (ring) the
launcher itself costs: its I/O threads busy-loop (measured at 25-55 % of a core while the ranks
generate, even re-niced to 19), which on the 2-core test machine the ranks feel.

    python bench/lm.py [reps]
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

PROMPT = "a small robot"  # greedy decoding of this prompt runs 200 tokens before an end token
MAX_TOKENS = 128
RUNS = 5  # timed generations per measurement (after one warm-up); the median counts
# This section's own virtual hosts (another prefix and subnet than the other sections' and the
# tests'), so that it cannot collide with them.
VHOST_PREFIX = "mcml"
VHOST_SUBNET = "10.213.23.0/24"

# Shared, verbatim, by the engines and the bare-launcher script.
GEN_SRC = '''
def _mcmb_lm_tok_s(model_path, prompt, max_tokens, runs, report=None):
    """Median tokens/s (mlx-lm's generation_tps) of ``runs`` greedy generations after one
    warm-up, with the model split over every rank (tensor parallel); also the tokens.

    ``report``: called with ``step`` and ``tok_s`` on every token, as the notebook does.
    """
    import statistics

    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init()
    cache = globals().setdefault("_mcmb_lm_models", {})
    if model_path not in cache:
        cache[model_path] = sharded_load(model_path, tensor_group=group)
    model, tokenizer = cache[model_path]
    rates, tokens = [], []
    for _ in range(runs + 1):
        tokens = []
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            tokens.append(r.token)
            if report is not None:
                report(step=r.generation_tokens, tok_s=r.generation_tps)
        rates.append(r.generation_tps)
    return statistics.median(rates[1:]), tokens
'''

CALL = "_mcmb_lm_tok_s({model!r}, {PROMPT!r}, {MAX_TOKENS}, {RUNS}{report})"

SCRIPT_MAIN = f'''
if __name__ == "__main__":
    import json
    import sys
    import time

    import mlx.core as mx

    g = mx.distributed.init(backend=sys.argv[1], strict=True)
    print("{benchlib.READY_TAG}", g.rank(), flush=True)
    time.sleep(0.5)  # the runner renices mlx.launch's busy-looping launcher meanwhile
    tok_s, tokens = _mcmb_lm_tok_s(sys.argv[2], {PROMPT!r}, {MAX_TOKENS}, {RUNS})
    print("{benchlib.RESULT_TAG}", g.rank(), json.dumps({{"tok_s": tok_s, "tokens": tokens}}),
          flush=True)
'''


def _call(model: str, report: bool) -> str:
    return CALL.format(
        model=model,
        PROMPT=PROMPT,
        MAX_TOKENS=MAX_TOKENS,
        RUNS=RUNS,
        report=", report=report" if report else "",
    )


def _measure(
    label: str,
    make_cluster: Any,
    base_cmd: list[str],
    base_env: dict[str, str],
    model: str,
    reps: int,
    renice: bool,
) -> tuple[list[float], list[float], list[int]]:
    """tokens/s per repetition (the slowest rank's), ours and baseline; the greedy tokens."""
    ours: list[float] = []
    base: list[float] = []
    tokens: dict[str, list[int]] = {}
    cluster = make_cluster()
    t0 = time.perf_counter()
    try:
        cluster.start()
        cluster.view.execute(GEN_SRC)

        def run_ours() -> None:
            cluster.view.execute(f"_mcmb_lm = {_call(model, report=True)}")
            results = cluster.view["_mcmb_lm"]
            ours.append(min(r[0] for r in results))
            tokens.setdefault("ours", results[0][1])

        def run_base() -> None:
            reports = benchlib.run_ranks(base_cmd, 2, env=base_env, renice_launcher=renice)
            base.append(min(r["tok_s"] for r in reports))
            tokens.setdefault("baseline", reports[0]["tokens"])

        benchlib.alternate(reps, run_ours, run_base)
    finally:
        if cluster.running:
            cluster.stop()
    if tokens["ours"] != tokens["baseline"]:
        raise RuntimeError(f"lm {label}: the notebook path and the script generated other tokens")
    print(
        f"lm: {label}: {time.perf_counter() - t0:.0f} s; ours {statistics.median(ours):.0f}, "
        f"baseline {statistics.median(base):.0f} tokens/s",
        flush=True,
    )
    return ours, base, tokens["ours"]


def bench_lm(reps: int) -> list[dict[str, Any]]:
    """Tokens/s of tensor-parallel generation (mlx-lm sharded_load + stream_generate) on 2 local
    ranks: MLXCluster engines with report() per token vs the same code as a plain script under
    mlx.launch (ring) and bare mpiexec (mpi)."""
    with benchlib.workdir("mcmb-lm-") as work:
        return _bench(reps, work)


def _bench(reps: int, work: str) -> list[dict[str, Any]]:
    from mlx_cluster_magic import MLXCluster
    from mlx_cluster_magic.rank.lm import write_tiny_llama

    model = str(write_tiny_llama(Path(work) / "tiny-llama", seed=0))
    script = benchlib.write_script(GEN_SRC + SCRIPT_MAIN, work, "lm_generate.py")
    mpiexec, libmpi = benchlib.mpi_paths()
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    figures = []
    runs = [
        (
            "ring",
            lambda: MLXCluster(n=2, backend="ring", ring_port=benchlib.RING_PORT_OURS),
            benchlib.mlx_launch("-n", "2", program=[script, "ring", model]),
            {},
            "mlx.launch -n 2 --backend ring, same generation code",
            True,
        ),
        (
            "mpi",
            lambda: MLXCluster(n=2, backend="mpi"),
            [
                mpiexec,
                "-n",
                "2",
                *root,
                "-x",
                "MLX_MPI_LIBNAME",
                benchlib.PYTHON,
                script,
                "mpi",
                model,
            ],
            {"MLX_MPI_LIBNAME": libmpi},
            "bare mpiexec -n 2, same generation code",
            False,
        ),
    ]
    for backend, make, cmd, env, name, renice in runs:
        ours, base, _ = _measure(f"{backend}, 2 local ranks", make, cmd, env, model, reps, renice)
        figures.append(_figure(backend, "2 local ranks", ours, base, name, ">= 0.95x"))

    reason = benchlib.vhost_skip_reason()
    if reason:
        print(f"lm: virtual-host part skipped: {reason}", flush=True)
        return figures
    from vcluster import VirtualCluster

    vc = VirtualCluster(2, subnet=VHOST_SUBNET, prefix=VHOST_PREFIX)
    try:
        vc.start()
        hf = benchlib.write_hostfile(vc, 2, Path(work) / "hosts2.json")
        hosts = ",".join(f"{h}:1" for h in vc.hosts)
        prted = str(Path(mpiexec).parent / "prted")
        sshbin = benchlib.ssh_wrapper_dir(vc, work)
        where = "2 virtual hosts"
        vruns = [
            (
                "ring",
                lambda: MLXCluster(
                    hostfile=hf,
                    backend="ring",
                    ssh=vc.rsh_agent,
                    ring_port=benchlib.RING_PORT_OURS,
                    timeout=60,
                ),
                benchlib.mlx_launch("--hostfile", hf, program=[script, "ring", model]),
                {"PATH": f"{sshbin}{os.pathsep}{os.environ['PATH']}"},
                "mlx.launch --hostfile (2 hosts) --backend ring, same generation code",
                True,
            ),
            (
                "mpi",
                lambda: MLXCluster(hostfile=hf, backend="mpi", ssh=vc.rsh_agent, timeout=60),
                benchlib.vhost_mpiexec(mpiexec, vc, prted, hosts, script, "mpi", model),
                {"MLX_MPI_LIBNAME": libmpi},
                f"bare mpiexec --host {hosts} --bind-to none, same generation code",
                False,
            ),
        ]
        for backend, make, cmd, env, name, renice in vruns:
            ours, base, _ = _measure(f"{backend}, {where}", make, cmd, env, model, reps, renice)
            target = "report only (the virtual hosts share 2 cores; spreads are wide)"
            figures.append(_figure(backend, where, ours, base, name, target))
    finally:
        vc.stop()
    return figures


def _figure(
    backend: str, where: str, ours: list[float], base: list[float], name: str, target: str
) -> dict[str, Any]:
    return compare(
        f"mlx-lm tensor-parallel generation, {MAX_TOKENS} tokens, {backend}, {where} "
        "(report() on every token)",
        ours,
        base,
        "tokens/s",
        target,
        name,
        higher_is_better=True,
    )


if __name__ == "__main__":
    benchlib.main(bench_lm)
