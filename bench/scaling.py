"""Data-parallel training throughput: an MLP trained with ``nn.average_gradients`` on N ranks of
an ``MLXCluster`` against 1 rank (``MLXCluster(n=1)``) with the same per-rank batch.

    python bench/scaling.py [reps]
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compare

DIMS = [256, 1024, 1024, 10]
BATCH = 256  # per rank
SECONDS = 4.0  # per measurement

TRAIN_SRC = '''
def _mcmb_train(dims, batch, seconds, solo=False, seed=0):
    """Train an MLP data-parallel for about ``seconds``; return this rank's (steps, wall s).

    ``solo``: this rank trains alone (no collective; what nn.average_gradients does on a group
    of one), while the other ranks stay idle.
    """
    import time

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    g = mx.distributed.init()

    class MLP(nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nn.relu(layer(x))
            return self.layers[-1](x)

    mx.random.seed(seed)  # the same initial weights on every rank
    model = MLP(dims)
    optimizer = optim.SGD(learning_rate=0.01)
    mx.random.seed(seed + 1 + g.rank())  # each rank its own generated data
    X = mx.random.normal((batch, dims[0]))
    y = mx.random.randint(0, dims[-1], (batch,))
    mx.eval(model.parameters(), X, y)

    def loss_fn(model, X, y):
        return nn.losses.cross_entropy(model(X), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step():
        loss, grads = loss_and_grad(model, X, y)
        if not solo:
            grads = nn.average_gradients(grads)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)

    def agree(x):  # the same integer on every rank (the step count of a collective loop)
        if solo:
            return int(x)
        return int(mx.distributed.all_sum(mx.array([int(x)], dtype=mx.int32), group=g).item())

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(2):
        step()
    est_us = (time.perf_counter() - t) / 2 * 1e6
    size = 1 if solo else g.size()
    steps = max(3, int(seconds * 1e6 / (agree(est_us) / size)))
    agree(0)  # barrier
    t = time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t
    return steps, wall
'''

CALL = f"_mcmb_train({DIMS!r}, {BATCH}, {SECONDS}, solo={{solo}})"


def _samples_per_s(cluster: Any, solo: bool = False) -> float:
    """Samples/s of one measurement: on every rank, or on rank 0 alone (``solo``)."""
    view = cluster.client[0] if solo else cluster.view
    view.execute(TRAIN_SRC + f"\n_mcmb_r = {CALL.format(solo=solo)}\n", block=True)
    results = [view["_mcmb_r"]] if solo else cluster.view["_mcmb_r"]
    steps = results[0][0]
    return len(results) * BATCH * steps / max(wall for _, wall in results)


def _probe(cluster: Any) -> list[dict[str, Any]]:
    """Per rank: CPU affinity, threads in the process, host."""
    cluster.view.execute(
        "import os as _os, socket as _socket\n"
        "_mcmb_p = {'affinity': sorted(_os.sched_getaffinity(0)), "
        "'threads': len(_os.listdir('/proc/self/task')), 'host': _socket.gethostname()}"
    )
    return cluster.view["_mcmb_p"]


def bench_scaling(reps: int) -> list[dict[str, Any]]:
    """Samples/s of data-parallel MLP training on 2 local ranks (and 2, 3 virtual hosts when
    root) divided by samples/s of 1 rank with the same per-rank batch; measured in turns.

    The 1-rank baseline is rank 0 of the 2-local-rank cluster training alone (rank 1 idle):
    MLXCluster(n=1) does not start (MLX's mpi backend refuses a world of one process).
    """
    from mlx_cluster_magic import MLXCluster

    local = MLXCluster(n=2)
    runs: dict[str, Any] = {"2 local ranks": local}
    work = benchlib.tmpdir("mcmb-sc-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        reason = benchlib.vhost_skip_reason()
        if reason:
            print(f"scaling: virtual-host part skipped: {reason}", flush=True)
        else:
            vc = stack.enter_context(benchlib.vhosts(3))
            for k in (2, 3):
                hf = benchlib.write_hostfile(vc, k, Path(work) / f"hosts{k}.json")
                runs[f"{k} virtual hosts"] = MLXCluster(hostfile=hf, ssh=vc.rsh_agent, timeout=60)
        for c in runs.values():
            stack.enter_context(c)  # started now, stopped on the way out
        probes = {k: _probe(c) for k, c in runs.items()}
        print("scaling: ranks (affinity, threads, host):", json.dumps(probes), flush=True)
        # Measurements in rotating order (each run warms up and times its own steps).
        order = [("1 rank", local, True)] + [(k, c, False) for k, c in runs.items()]
        samples: dict[str, list[float]] = {name: [] for name, _, _ in order}
        for i in range(reps):
            k = i % len(order)
            for name, c, solo in order[k:] + order[:k]:
                samples[name].append(_samples_per_s(c, solo))
    figures = []
    for name in runs:
        figures.append(
            compare(
                f"data-parallel MLP {'-'.join(map(str, DIMS))} training, batch {BATCH}/rank, "
                f"{name}",
                samples[name],
                samples["1 rank"],
                "samples/s",
                ">= 1.8x" if name == "2 local ranks" else "report only (vhosts share 2 cores)",
                "1 rank, same per-rank batch (rank 0 alone)",
                higher_is_better=True,
            )
        )
    return figures


if __name__ == "__main__":
    benchlib.main(bench_scaling)
