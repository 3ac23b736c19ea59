"""A pipeline split by memory on two virtual Macs whose memory is capped for real (a memory
cgroup per host, 1 : 2): mlx-lm's even split of a model is killed on the smaller host, the plan
by memory loads the same model and generates the tokens of one process.

The caps are on each host's sshd, so every session, prted and rank it starts is held to them,
as a smaller Mac holds its ranks; each rank reads its own limit (``rank.lm.rank_memory``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic.rank import lm

from conftest import no_leaks_on, virtual_macs

pytestmark = pytest.mark.multihost

MiB = 1 << 20
CAPS = {"mac1": 288 * MiB, "mac2": 576 * MiB}
#: What the plan leaves free on each rank: the engine process itself (about 112 MiB here) and
#: the KV cache of a short generation.
HEADROOM = "160MB"
#: 36 layers of about 12.6 MB (float32): about 455 MB, more than 288 MiB can hold in half.
SHAPE = {"num_layers": 36, "hidden_size": 512, "intermediate_size": 1536}
PROMPT, N = "the quick cat", 8

GENERATE = """
from mlx_lm import stream_generate
tokens = [r.token for r in stream_generate(model, tokenizer, {prompt!r}, max_tokens={n})]
"""


@pytest.fixture(scope="module")
def capped() -> Iterator[Any]:
    if not Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        pytest.skip("memory caps need the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    with virtual_macs(2, "10.77.14.0/24", "plcap", memory=CAPS) as vc:
        yield vc


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lm.write_tiny_llama(
        tmp_path_factory.mktemp("capped") / "m3", seed=3, model_type="ministral3", **SHAPE
    )


def test_the_plan_loads_what_the_even_split_cannot(
    ip: Any, capped: Any, model: Path, tmp_path: Path
) -> None:
    from mlx_lm import load, stream_generate

    one, tok = load(str(model))
    expected = [r.token for r in stream_generate(one, tok, PROMPT, max_tokens=N)]
    del one
    hostfile = capped.hostfile(tmp_path / "hosts.json")
    start = f"start --hostfile {hostfile} --ssh '{capped.rsh_agent}' --no-live-status --timeout 60"
    try:
        cluster = ip.run_line_magic("mlx_cluster", start)
        # mlx-lm's even split: 18 layers on each rank; the 288 MiB host cannot hold its half.
        with pytest.raises(UsageError, match=r"rank \d on mac1 died") as e:
            ip.run_cell_magic(
                "px",
                "",
                f"from mlx_lm.utils import pipeline_load as even_load\n"
                f"model, tokenizer = even_load({str(model)!r})\n",
            )
        assert "\n" not in str(e.value)
        # killed by its cap: the kernel's OOM killer of mac1's cgroup, not anything else
        oom = (capped.cgroups["mac1"] / "memory.oom_control").read_text()
        assert "oom_kill 1" in oom or "oom_kill 2" in oom, oom
        assert "oom_kill 0" in (capped.cgroups["mac2"] / "memory.oom_control").read_text()
        cluster = ip.run_line_magic("mlx_cluster", "restart")
        plan = cluster.plan_pipeline(str(model), headroom=HEADROOM)
        assert plan.fits, plan.problem
        # each rank read its own cap; the smaller host holds fewer layers (rank 0 the last ones)
        assert [r.memory for r in plan.ranks] == [CAPS["mac1"], CAPS["mac2"]]
        (s0, e0), (s1, e1) = plan.layers
        assert e0 == 36 and s1 == 0 and e1 == s0 and (e0 - s0) < 18 < (e1 - s1), plan.layers
        cluster.view.push({"plan": plan})
        ip.run_cell_magic(
            "px",
            "",
            "from mlx_cluster_magic.rank.lm import pipeline_load\n"
            f"model, tokenizer = pipeline_load({str(model)!r}, plan)\n"
            + GENERATE.format(prompt=PROMPT, n=N),
        )
        assert cluster.view["tokens"] == [expected, expected]
        # the caps held: each host's cgroup peaked under its limit, the small one nearly full
        peaks = {
            h: int((g / "memory.max_usage_in_bytes").read_text())
            for h, g in capped.cgroups.items()
        }
        assert all(peaks[h] <= CAPS[h] for h in CAPS), peaks
        ip.run_line_magic("mlx_cluster", "stop")
    finally:
        no_leaks_on(capped)
