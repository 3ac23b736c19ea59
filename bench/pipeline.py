"""Models bigger than the smaller Mac: two virtual Macs whose memory is capped 1 : 2 (a memory
cgroup each), one model family (the same Mistral-3/Llama layers, more of them).

- the largest model of the family that loads and generates with the plan by memory
  (``cluster.plan_pipeline`` + ``rank.lm.pipeline_load``) against mlx-lm's even split
  (``mlx_lm.utils.pipeline_load``) under the same caps: parameters, target >= 1.4x;
- generation tokens/s with the plan against the even split on a model both hold: >= 0.95x.

    python bench/pipeline.py [reps]
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

MiB = 1 << 20
CAPS = {"mac1": 288 * MiB, "mac2": 576 * MiB}
HEADROOM = "160MB"
SHAPE = {"hidden_size": 512, "intermediate_size": 1536}
LADDER = (16, 20, 24, 28, 32, 36, 40, 44, 48)
BOTH_HOLD = 16
TOKENS = 24

RUN = """
import time as _t
from mlx_lm import stream_generate
from mlx_lm.utils import pipeline_load as even_load
from mlx_cluster_magic.rank.lm import pipeline_load
model, tokenizer = {load}
_t0 = _t.perf_counter()
tokens = [r.token for r in stream_generate(model, tokenizer, "the quick cat", max_tokens={n})]
tok_s = len(tokens) / (_t.perf_counter() - _t0)
del model
"""


def _params(layers: int) -> int:
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    per_layer = 2 * h * h + 2 * h * (h // 2) + 3 * h * i + 2 * h
    return layers * per_layer + 2 * 512 * h + h


def bench_pipeline(reps: int) -> list[dict[str, Any]]:
    reason = benchlib.vhost_skip_reason()
    if reason or not Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        print(f"pipeline: skipped: {reason or 'no cgroup v1 memory controller'}", flush=True)
        return []
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic.rank import lm

    from vcluster import VirtualCluster

    vc = VirtualCluster(2, subnet="10.77.15.0/24", prefix="mcmbp", memory=CAPS)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    with contextlib.ExitStack() as stack, benchlib.workdir("mcmb-pl-") as work:
        vc.start()
        stack.callback(vc.stop)
        hostfile = vc.hostfile(Path(work) / "hosts.json")
        cluster = shell.run_line_magic(
            "mlx_cluster", f"start --hostfile {hostfile} --ssh '{vc.rsh_agent}' --no-live-status"
        )
        stack.callback(lambda: cluster.running and cluster.stop())

        def model(layers: int) -> str:
            path = Path(work) / f"m{layers}"
            if not path.exists():
                lm.write_tiny_llama(
                    path, seed=5, model_type="ministral3", num_layers=layers, **SHAPE
                )
            return str(path)

        def run(path: str, planned: bool) -> float | None:
            """Load and generate on both ranks; tokens/s, or None when a rank was killed."""
            nonlocal cluster
            if planned:
                plan = cluster.plan_pipeline(path, headroom=HEADROOM)
                if not plan.fits:
                    return None
                cluster.view.push({"plan": plan})
            load = f"pipeline_load({path!r}, plan)" if planned else f"even_load({path!r})"
            try:
                shell.run_cell_magic("px", "", RUN.format(load=load, n=TOKENS))
            except UsageError:
                cluster = shell.run_line_magic("mlx_cluster", "restart")
                return None
            return float(min(cluster.view["tok_s"]))

        largest: dict[str, int] = {}
        for planned in (False, True):
            name = "plan" if planned else "even"
            for layers in LADDER:
                if run(model(layers), planned) is None:
                    break
                largest[name] = layers
            print(
                f"pipeline: largest with the {name} split: {largest.get(name)} layers", flush=True
            )
        ours_tok: list[float] = []
        even_tok: list[float] = []
        both = model(BOTH_HOLD)
        benchlib.alternate(
            max(reps, 3),
            lambda: ours_tok.append(run(both, True) or 0.0),
            lambda: even_tok.append(run(both, False) or 0.0),
        )
        for layers in LADDER:
            shutil.rmtree(Path(work) / f"m{layers}", ignore_errors=True)
    return [
        compare(
            "largest model of a family loaded and generating on 2 virtual Macs capped 1 : 2 "
            f"(288 / 576 MiB): plan by memory ({largest.get('plan')} layers) vs mlx-lm's even "
            f"split ({largest.get('even')} layers)",
            [float(_params(largest.get("plan", 0)))],
            [float(_params(largest.get("even", 0)))],
            "parameters",
            ">= 1.4x",
            "mlx-lm's even split under the same caps",
            higher_is_better=True,
        ),
        compare(
            f"generation, {BOTH_HOLD}-layer model both hold, 2 capped virtual Macs",
            ours_tok,
            even_tok,
            "tokens/s",
            ">= 0.95x",
            "mlx-lm's even split (mlx_lm.utils.pipeline_load)",
            higher_is_better=True,
        ),
    ]


if __name__ == "__main__":
    benchlib.main(bench_pipeline)
