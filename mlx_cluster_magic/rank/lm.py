"""A small Llama-architecture model in the Hugging Face layout, written locally with no download.

The language-model notebooks need a checkpoint that mlx-lm's own loaders (``load``,
``sharded_load``, ``pipeline_load``) accept as they would a hub model, yet that is created in a
second on any machine: ``config.json``, safetensors weights drawn from a fixed seed, and a
byte-level BPE tokenizer trained offline with the ``tokenizers`` package on generated text
(``tokenizer.json`` + ``tokenizer_config.json``, which ``transformers.AutoTokenizer`` loads).

Also the rank side of a pipeline split by memory (``pipeline_plan`` plans it on the head):
``rank_memory()`` tells the head how much memory a rank may use, and
``pipeline_load(model_dir, plan)`` loads an mlx-lm model as pipeline stages with the plan's layer
ranges, where mlx-lm's own ``pipeline_load`` always splits evenly. Imports nothing else of the
package: the ranks import it.

Needs the ``lm`` extra (``pip install 'mlx_cluster_magic[lm]'``) for ``tokenizers``.
"""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import Any

import numpy as np

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MODEL_TYPES = ("llama", "ministral3")
_UNLIMITED = 1 << 62  # cgroup v1 reports "no limit" as a number near 2**63

_DETERMINERS = ("the", "a", "one", "every", "that")
_ADJECTIVES = ("small", "quick", "green", "quiet", "bright", "old", "busy", "warm", "heavy", "red")
_NOUNS = ("mac", "cable", "rank", "model", "cat", "river", "switch", "server", "robot", "garden")
_VERBS = ("sends", "finds", "watches", "trains", "follows", "carries", "reads", "builds")
_PLACES = ("near the desk", "over the bridge", "in the rack", "by the window", "on the table")


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` generated English-like sentences (a small fixed grammar), the same for a seed.

    Text to train the tokenizer on and to fine-tune with: no data set to download.
    """
    rng = random.Random(seed)

    def phrase() -> str:
        words = [rng.choice(_DETERMINERS)]
        if rng.random() < 0.6:
            words.append(rng.choice(_ADJECTIVES))
        words.append(rng.choice(_NOUNS))
        return " ".join(words)

    out = []
    for _ in range(n):
        s = f"{phrase()} {rng.choice(_VERBS)} {phrase()}"
        if rng.random() < 0.5:
            s += f" {rng.choice(_PLACES)}"
        out.append(s + ".")
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) trained on ``texts``; adds ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # EOS first, as id 0: mlx-lm's batching pads with 0 and its loss counts one position
        # past each sequence's end, so a fine-tuned model then learns to stop there.
        special_tokens=[EOS, BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def tokenizer_config() -> dict[str, Any]:
    """``tokenizer_config.json``: the fast tokenizer class and the special tokens."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }


def llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    intermediate_size: int = 512,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    model_type: str = "llama",
) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for a Llama model of this shape.

    ``model_type="ministral3"`` describes the same network (Mistral 3 is Llama's architecture;
    with ``llama_4_scaling_beta`` 0 it computes exactly the same function) under a name mlx-lm
    can also split into pipeline stages.
    """
    head_dim = hidden_size // num_heads
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }
    if model_type == "ministral3":
        config.update(
            architectures=["Ministral3ForCausalLM"],
            model_type="ministral3",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "llama_4_scaling_beta": 0.0,
                "original_max_position_embeddings": 2048,
            },
        )
    elif model_type != "llama":
        raise ValueError(f"model_type {model_type!r}: use 'llama' or 'ministral3'")
    return config


def llama_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under the Hugging Face names, the same for a seed on any machine.

    Scaled so the logits spread (about unit variance): greedy decoding then has clear winners,
    and a split model's rounding differences cannot change which token wins.
    """
    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]
    v, hd = config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def linear(out_f: int, in_f: int) -> np.ndarray:
        scale = 1.0 / float(np.sqrt(in_f))
        return rng.standard_normal((out_f, in_f)).astype(np.float32) * np.float32(scale)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)
    }
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "self_attn.q_proj.weight"] = linear(q, h)
        w[p + "self_attn.k_proj.weight"] = linear(kv, h)
        w[p + "self_attn.v_proj.weight"] = linear(kv, h)
        w[p + "self_attn.o_proj.weight"] = linear(h, q)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "mlp.gate_proj.weight"] = linear(i, h)
        w[p + "mlp.up_proj.weight"] = linear(i, h)
        w[p + "mlp.down_proj.weight"] = linear(h, i)
    w["model.norm.weight"] = np.ones(h, np.float32)
    w["lm_head.weight"] = linear(v, h) * 3.0
    return w


def write_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    texts: list[str] | None = None,
    model_type: str = "llama",
    **shape: int,
) -> Path:
    """Write a small Llama model in the Hugging Face layout to ``path`` and return the folder.

    ``config.json``, ``model.safetensors`` (+ ``model.safetensors.index.json``, which
    ``sharded_load`` reads to pick each pipeline stage's files), ``tokenizer.json``,
    ``tokenizer_config.json``, ``generation_config.json``. ``shape`` overrides
    ``llama_config``'s keyword arguments (``hidden_size``, ``num_layers``, ...). The tokenizer is
    trained on ``texts`` (default: ``sentences(2000, seed)``).
    """
    import mlx.core as mx

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: use 'llama' or 'ministral3'")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts if texts is not None else sentences(2000, seed), vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    config = llama_config(
        tok.get_vocab_size(),
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        model_type=model_type,
        **shape,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    weights = llama_weights(config, seed)
    mx.save_safetensors(
        str(out / "model.safetensors"),
        {k: mx.array(v) for k, v in weights.items()},
        metadata={"format": "pt"},
    )
    index = {
        "metadata": {"total_size": int(sum(v.nbytes for v in weights.values()))},
        "weight_map": dict.fromkeys(weights, "model.safetensors"),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def pipeline_load(
    model_dir: str | Path,
    plan: Any,
    *,
    group: Any = None,
    return_config: bool = False,
    tokenizer_config: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """On every rank (a ``%%px`` cell): ``model, tokenizer = pipeline_load(model_dir, plan)``.

    mlx-lm's own loading with the plan's layer counts: ``load_model(lazy=True)``, then
    ``model.model.pipeline(group, split=plan.split)`` (rank 0 runs the last layers), then only
    this rank's weights are read, as ``mlx_lm.utils.pipeline_load`` does with its even split.
    Generation works unchanged (``mlx_lm.generate`` / ``stream_generate`` on every rank).
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    if not hasattr(plan, "split") or not hasattr(plan, "ranks"):
        raise ValueError(
            f"pipeline_load takes the plan of cluster.plan_pipeline(...), got {type(plan).__name__}"
        )
    if not plan.fits:
        raise ValueError(plan.problem or "the plan does not fit the cluster's memory")
    group = group if group is not None else mx.distributed.init()
    rank, size = group.rank(), group.size()
    if size != len(plan.ranks):
        raise ValueError(
            f"the plan is for {len(plan.ranks)} ranks, this group has {size}: plan again with "
            "cluster.plan_pipeline on this cluster"
        )
    path = Path(model_dir).expanduser()
    mine = plan.ranks[rank]
    missing = [f for f in mine.files if not (path / f).exists()]
    if missing:
        raise ValueError(
            f"rank {rank} lacks {missing[0]} in {path} (its layers {mine.start}-{mine.end - 1} "
            "are there): copy the model's files to this host"
        )
    model, config = load_model(path, lazy=True, strict=False, trust_remote_code=trust_remote_code)
    inner: Any = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        raise ValueError(
            f"mlx-lm's {config.get('model_type')!r} model cannot run as pipeline stages "
            "(no pipeline() in mlx_lm.models); use mlx_lm.utils.sharded_load (tensor parallel)"
        )
    if len(inner.layers) != plan.num_layers:
        raise ValueError(
            f"the plan is for {plan.num_layers} layers, {path} has {len(inner.layers)}: "
            "plan this model"
        )
    inner.pipeline(group, split=list(plan.split))
    mx.eval(model.parameters())
    # every rank has its weights before anyone generates (as mlx-lm's loader does)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu, group=group))
    tokenizer = load_tokenizer(  # type: ignore[no-untyped-call,unused-ignore]
        path,
        tokenizer_config or {"trust_remote_code": True},
        eos_token_ids=config.get("eos_token_id", None),
    )
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _cgroup_limit() -> tuple[int | None, str | None]:
    """This process's memory cgroup limit (v1, else v2), and the cgroup's path."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit = None
            try:
                for stat in (base / "memory.stat").read_text().splitlines():
                    if stat.startswith("hierarchical_memory_limit "):
                        limit = int(stat.split()[1])
            except (OSError, ValueError):
                pass
            try:
                own = int((base / "memory.limit_in_bytes").read_text())
                limit = own if limit is None else min(limit, own)
            except (OSError, ValueError):
                pass
            return (limit if limit is not None and limit < _UNLIMITED else None), path
    for line in lines:
        if line.startswith("0::"):
            path = line[3:]
            try:
                text = (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").read_text()
            except OSError:
                return None, path
            return (None if text.strip() == "max" else int(text)), path
    return None, None


def rank_memory() -> dict[str, Any]:
    """Run on a rank: the memory this process may use. On Apple silicon MLX's recommended
    working-set size; the machine's memory elsewhere; and the memory cgroup's limit when lower.
    Ranks on one host share these (``pipeline_plan.resolve_memory`` divides them)."""
    machine = None
    try:
        machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    working_set = None
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            working_set = int(info["max_recommended_working_set_size"])
    except Exception:  # no MLX or no Metal: the machine's memory stands
        working_set = None
    cgroup, cgroup_path = _cgroup_limit()
    return {
        "hostname": socket.gethostname(),
        "machine": machine,
        "working_set": working_set,
        "cgroup": cgroup,
        "cgroup_path": cgroup_path,
    }
