"""The local Llama checkpoint the language-model notebooks load: the Hugging Face layout, read by
mlx-lm's and transformers' own loaders, the same bytes for a seed, and the Mistral 3 variant
computing the same function (the one mlx-lm can split into pipeline stages)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("tokenizers")

import mlx.core as mx

from mlx_cluster_magic.rank import lm

FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join((folder / f).read_bytes() for f in FILES)).hexdigest()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lm.write_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama", seed=0)


def test_sentences_are_generated_text_fixed_by_the_seed() -> None:
    a, b, c = lm.sentences(50, seed=3), lm.sentences(50, seed=3), lm.sentences(50, seed=4)
    assert a == b and a != c and len(a) == 50
    assert all(s.endswith(".") and len(s.split()) >= 4 for s in a)


def test_writes_the_hugging_face_layout(llama: Path) -> None:
    assert sorted(p.name for p in llama.iterdir()) == FILES
    config = json.loads((llama / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    weights = mx.load(str(llama / "model.safetensors"))
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], 256)
    assert weights["model.layers.3.self_attn.k_proj.weight"].shape == (4 * 32, 256)
    assert weights["lm_head.weight"].dtype == mx.float32
    tok = json.loads((llama / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["decoder"]["type"] == "ByteLevel"
    ids = [*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]
    assert max(ids) == config["vocab_size"] - 1  # every token has a row in the embedding


def test_the_same_seed_writes_the_same_bytes(llama: Path, tmp_path: Path) -> None:
    again = lm.write_tiny_llama(tmp_path / "again", seed=0)
    other = lm.write_tiny_llama(tmp_path / "other", seed=1)
    assert digest(again) == digest(llama)
    assert digest(other) != digest(llama)


def test_transformers_loads_the_tokenizer(llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama))
    ids = tok.encode("the quick mac sends the cable over the bridge.")
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == (
        "the quick mac sends the cable over the bridge."
    )
    config = json.loads((llama / "config.json").read_text())
    assert (tok.bos_token_id, tok.eos_token_id) == (
        config["bos_token_id"],
        config["eos_token_id"],
    )


def test_mlx_lm_loads_it_and_generates_greedily(llama: Path) -> None:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(llama))
    assert type(model).__module__ == "mlx_lm.models.llama"
    assert type(tokenizer.detokenizer).__name__ == "BPEStreamingDetokenizer"
    runs = [
        [r.token for r in stream_generate(model, tokenizer, "the quick cat", max_tokens=16)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 16


def test_ministral3_variant_is_the_same_function_and_can_be_a_pipeline(
    llama: Path, tmp_path: Path
) -> None:
    from mlx_lm import load

    m3 = lm.write_tiny_llama(tmp_path / "m3", seed=0, model_type="ministral3")
    assert json.loads((m3 / "config.json").read_text())["model_type"] == "ministral3"
    a, _ = load(str(llama))
    b, _ = load(str(m3))
    assert hasattr(b.model, "pipeline") and not hasattr(a.model, "pipeline")
    x = mx.array([[0, 5, 9, 40, 41, 7]])
    assert mx.allclose(a(x), b(x), atol=1e-4).item()


def test_unknown_model_type_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use 'llama' or 'ministral3'"):
        lm.write_tiny_llama(tmp_path / "x", model_type="gpt2")


GENERATE = """
from mlx_lm import stream_generate
from mlx_lm.utils import pipeline_load, sharded_load

def _tokens(model, tokenizer, metric):
    out = []
    for r in stream_generate(model, tokenizer, {prompt!r}, max_tokens={n}):
        out.append(r.token)
        report(step=r.generation_tokens, **{{metric: r.generation_tps}})
    return out

tp_tokens = _tokens(*sharded_load({llama!r}, tensor_group=world), "tok_s_tp")
pp_model, pp_tokenizer = pipeline_load({m3!r})
stage = (pp_model.model.start_idx, pp_model.model.end_idx)
pp_tokens = _tokens(pp_model, pp_tokenizer, "tok_s_pp")
"""


def test_split_over_two_ranks_generates_the_single_process_tokens_and_reports_rates(
    llama: Path, tmp_path: Path, no_leaks: None
) -> None:
    """mlx-lm's tensor-parallel and pipeline loaders on 2 local ranks: the greedy tokens of one
    process on every rank, and every token's rate reaches cluster.metrics() by rank."""
    from mlx_lm import load, stream_generate

    from mlx_cluster_magic import MLXCluster

    prompt, n = "a small robot", 24
    model, tokenizer = load(str(llama))
    expected = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=n)]
    m3 = lm.write_tiny_llama(tmp_path / "m3", seed=0, model_type="ministral3")
    with MLXCluster(n=2) as cluster:
        cluster.view.execute(GENERATE.format(prompt=prompt, n=n, llama=str(llama), m3=str(m3)))
        assert cluster.view["tp_tokens"] == [expected, expected]
        assert cluster.view["pp_tokens"] == [expected, expected]
        assert [tuple(s) for s in cluster.view["stage"]] == [(2, 4), (0, 2)]
        # Reported numbers travel with the ranks' periodic status; wait for the last ones.
        deadline = time.monotonic() + 10
        while True:
            records = cluster.metrics()
            records = records.to_dict("records") if hasattr(records, "to_dict") else records
            steps = {
                (name, rank): sorted(
                    r["step"] for r in records if r["name"] == name and r["rank"] == rank
                )
                for name in ("tok_s_tp", "tok_s_pp")
                for rank in (0, 1)
            }
            if all(len(s) == n for s in steps.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert all(s == list(range(1, n + 1)) for s in steps.values()), steps
    assert all(r["value"] > 0 for r in records if r["name"].startswith("tok_s"))


PLANNED = """
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import pipeline_load as even_load
from mlx_cluster_magic.rank.lm import pipeline_load

def _tokens(model, tokenizer):
    return [r.token for r in stream_generate(model, tokenizer, {prompt!r}, max_tokens={n})]

mx.clear_cache()
_before = mx.get_active_memory()
model, tokenizer = pipeline_load({m3!r}, plan)
plan_loaded = mx.get_active_memory() - _before
plan_stage = (model.model.start_idx, model.model.end_idx)
plan_tokens = _tokens(model, tokenizer)
del model, tokenizer
mx.clear_cache()
model, tokenizer = even_load({m3!r})
even_stage = (model.model.start_idx, model.model.end_idx)
even_tokens = _tokens(model, tokenizer)
del model, tokenizer
"""


def test_a_plan_by_memory_loads_and_generates_the_tokens_of_the_even_split_and_one_process(
    ip, tmp_path: Path
) -> None:
    """2 local ranks with unequal memory caps: the plan gives rank 0 fewer layers where mlx-lm's
    even split would overflow rank 0's cap; pipeline_load loads exactly those layers (and only
    their bytes), and greedy generation gives the tokens of the even split and of one process."""
    from mlx_lm import load, stream_generate

    prompt, n = "the busy robot", 20
    m3 = lm.write_tiny_llama(tmp_path / "m3", seed=2, model_type="ministral3", num_layers=6)
    model, tokenizer = load(str(m3))
    expected = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=n)]
    del model

    cluster = ip.run_line_magic("mlx_cluster", "start -n 2 --no-live-status")
    # what the ranks report: this machine's memory (or cgroup) shared by the 2 ranks
    measured = cluster.plan_pipeline(str(m3))
    assert measured.fits and measured.layers == [(3, 6), (0, 3)]  # even memory: mlx-lm's split
    assert {r.memory_from for r in measured.ranks} <= {"machine", "cgroup"}
    assert measured.ranks[0].memory == measured.ranks[1].memory

    plan = ip.run_line_magic(
        "mlx_cluster", f"plan {m3} --memory rank0=8MB,rank1=16MB --headroom 1MB"
    )
    assert cluster.pipeline_plan is plan
    assert plan.fits and plan.layers == [(4, 6), (0, 4)] and plan.split == [2, 4]
    assert [(r.memory, r.memory_from) for r in plan.ranks] == [(8 << 20, "cap"), (16 << 20, "cap")]
    assert all(r.weight_bytes + r.headroom <= r.memory for r in plan.ranks)
    # mlx-lm's even split puts 3 layers on rank 0: more than its 8 MB cap holds
    per_layer = plan.ranks[0].layer_bytes // 2
    assert 3 * per_layer + plan.ranks[0].shared_bytes + plan.ranks[0].headroom > 8 << 20

    cluster.view.push({"plan": plan})
    cluster.view.execute(PLANNED.format(prompt=prompt, n=n, m3=str(m3)))
    assert [tuple(s) for s in cluster.view["plan_stage"]] == plan.layers
    assert [tuple(s) for s in cluster.view["even_stage"]] == [(3, 6), (0, 3)]
    assert cluster.view["plan_tokens"] == [expected, expected]
    assert cluster.view["even_tokens"] == [expected, expected]
    # each rank read its own layers' weights and no others
    loaded = cluster.view["plan_loaded"]
    for r, got in enumerate(loaded):
        assert abs(got - plan.weight_bytes[r]) <= 0.02 * plan.weight_bytes[r], (r, got, plan)

    # a model that cannot fit: one line with the shortfall, and pipeline_load refuses it
    small = ip.run_line_magic("mlx_cluster", f"plan {m3} --memory localhost=6MB --headroom 0")
    assert not small.fits and small.problem and " short" in small.problem
    assert "\n" not in small.problem
    cluster.view.push({"plan": small})
    with pytest.raises(Exception, match="ValueError.*does not fit"):
        cluster.view.execute(f"pipeline_load({str(m3)!r}, plan)")
