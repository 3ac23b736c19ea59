"""A pipeline split of a language model's layers weighted by each rank's memory.

mlx-lm's ``pipeline_load`` splits the layers evenly, so the smallest Mac decides the largest
model a cluster can hold. Here every rank gets a contiguous range of layers, in proportion to what
it can hold: its memory, less a stated headroom (KV cache, activations), less the weights every
pipeline stage keeps (embeddings, final norm, head). mlx-lm's convention holds (``models/
pipeline.py``, ``PipelineMixin.pipeline(group, split)``): rank 0 holds the LAST layers, rank
``size - 1`` the first; ``PipelinePlan.split`` is the ``split`` argument mlx-lm takes.

Tensor sizes come from the safetensors headers (a few KB per file; no weight is read), the files
from ``model.safetensors.index.json`` when there is one; tensors are matched to layers by number
as mlx-lm's ``sharded_load`` does. Sizes: ``"64GB"`` means 64 * 2**30 bytes, as Apple counts
memory. No IPython import: unit-tested directly. What each rank reports of its memory is
``lm.rank_memory`` (run on the ranks).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MLXClusterError
from ..fabric.placement import parse_size

#: Default headroom: this fraction of each rank's memory stays free for KV cache and activations.
DEFAULT_HEADROOM = 0.1

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # as mlx_lm.utils.sharded_load matches
_RANK_KEY_RE = re.compile(r"^rank\s*(\d+)$", re.IGNORECASE)
_BITS = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "F8_E5M2": 8}
_FEWER_BITS = (8, 6, 4, 3, 2)
_QUANT_OVERHEAD_BITS = 0.5  # affine, group 64: a 16-bit scale and bias per 64 weights


# --------------------------------------------------------------------------- sizes
def format_size(n: float) -> str:
    """``1.5 GB``, ``320 MB``, ``12 KB`` (powers of 1024, as ``parse_size`` reads them)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{sign}{value:.1f} {unit}" if value < 100 else f"{sign}{value:.0f} {unit}"
    return f"{sign}{n:.0f} B"


def parse_headroom(value: object) -> float | int:
    """A fraction of each rank's memory (``0.1``, ``"10%"``) or bytes per rank (``"4GB"``)."""
    bad = f"headroom {value!r}: give a fraction of memory (0.1 or '10%') or a size ('4GB')"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            if text.endswith("%"):
                raise MLXClusterError(bad) from None
            return parse_size(text, "headroom")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise MLXClusterError(bad)
    if value < 1:
        return float(value)
    if float(value).is_integer():
        return int(value)
    raise MLXClusterError(bad)


def parse_memory_spec(text: str) -> dict[str, str]:
    """``host=64GB,rank1=8GB`` (the magic's ``--memory``) as a mapping."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        host, sep, size = part.partition("=")
        if not sep or not host.strip() or not size.strip():
            raise MLXClusterError(
                f"--memory {part!r}: give HOST=SIZE pairs, e.g. mac1=64GB,mac2=128GB"
            )
        parse_size(size.strip(), f"memory of {host.strip()}")
        out[host.strip()] = size.strip()
    if not out:
        raise MLXClusterError("--memory is empty: give HOST=SIZE pairs, e.g. mac1=64GB")
    return out


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelWeights:
    """What the plan needs to know of a checkpoint: bytes per layer and of the rest."""

    model_dir: str
    num_layers: int
    layer_bytes: tuple[int, ...]
    shared_bytes: int  # embeddings, final norm, head: every pipeline stage keeps them
    layer_files: tuple[tuple[str, ...], ...]  # the files holding each layer's tensors
    shared_files: tuple[str, ...]
    bits: float  # bits per weight of the layers (quantized: the quantization's bits)
    quantized: bool
    tensors: int

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.shared_bytes


def _header(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > 100 << 20:
                raise ValueError(f"header of {length} bytes")
            data = json.loads(f.read(length))
    except FileNotFoundError:
        raise MLXClusterError(
            f"{path} is missing: the plan reads every weight file's header on this machine; "
            "copy the whole model here first"
        ) from None
    except (OSError, ValueError) as e:
        raise MLXClusterError(f"{path} is not a safetensors file ({e})") from None
    if not isinstance(data, dict):
        raise MLXClusterError(f"{path} is not a safetensors file (header is not a table)")
    return data


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise MLXClusterError(
            f"{model_dir} has no config.json: give the folder of an mlx-lm / Hugging Face model"
        ) from None
    except ValueError as e:
        raise MLXClusterError(f"{model_dir / 'config.json'} is not JSON ({e})") from None
    return config if isinstance(config, dict) else {}


def read_weights(model_dir: str | os.PathLike[str]) -> ModelWeights:
    """Per-layer weight bytes of the model in ``model_dir`` from its safetensors headers."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise MLXClusterError(f"{root} is not a folder: give the folder of the model")
    config = _config(root)
    index_path = root / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise MLXClusterError(f"{index_path} has no weight_map ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in root.glob("model*.safetensors"))
        if not files:
            raise MLXClusterError(
                f"{root} has no model*.safetensors and no model.safetensors.index.json"
            )
    sizes: dict[str, tuple[int, str, str]] = {}  # tensor -> (bytes, dtype, file)
    for name in files:
        for tensor, info in _header(root / name).items():
            if tensor == "__metadata__" or not isinstance(info, dict):
                continue
            start, end = info["data_offsets"]
            sizes[tensor] = (int(end) - int(start), str(info.get("dtype", "")), name)
    if weight_map is not None:
        missing = [t for t in weight_map if t not in sizes]
        if missing:
            raise MLXClusterError(
                f"{len(missing)} tensor(s) of the index are in no weight file, e.g. "
                f"{missing[0]!r} (in {weight_map[missing[0]]}): the download is incomplete"
            )
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    num_layers = config.get("num_hidden_layers") or (text or {}).get("num_hidden_layers")
    per_layer: dict[int, int] = {}
    files_of: dict[int, set[str]] = {}
    shared, shared_files = 0, set()
    bits_bytes: dict[str, int] = {}
    for tensor, (nbytes, dtype, name) in sizes.items():
        m = _LAYER_RE.search(tensor)
        if m is None:
            shared += nbytes
            shared_files.add(name)
            continue
        layer = int(m.group(1))
        per_layer[layer] = per_layer.get(layer, 0) + nbytes
        files_of.setdefault(layer, set()).add(name)
        bits_bytes[dtype] = bits_bytes.get(dtype, 0) + nbytes
    if not isinstance(num_layers, int) or num_layers <= 0:
        num_layers = max(per_layer) + 1 if per_layer else 0
    if num_layers == 0:
        raise MLXClusterError(
            f"{root}: no tensor is named like 'model.layers.N.': not a layered model"
        )
    absent = [n for n in range(num_layers) if n not in per_layer]
    if absent:
        raise MLXClusterError(
            f"{root} has no weights for layers {absent[:8]}{'...' if len(absent) > 8 else ''}: "
            "convert the model with mlx_lm.convert first"
        )
    # Layers past the model's last are extra (multi-token prediction) layers mlx-lm drops.
    quant = config.get("quantization") or (text or {}).get("quantization")
    if isinstance(quant, dict) and isinstance(quant.get("bits"), (int, float)):
        bits, quantized = float(quant["bits"]), True
    else:
        main = max(bits_bytes, key=lambda d: bits_bytes[d]) if bits_bytes else "BF16"
        bits, quantized = float(_BITS.get(main.upper(), 16)), False
    return ModelWeights(
        model_dir=str(root),
        num_layers=num_layers,
        layer_bytes=tuple(per_layer[n] for n in range(num_layers)),
        shared_bytes=shared,
        layer_files=tuple(tuple(sorted(files_of[n])) for n in range(num_layers)),
        shared_files=tuple(sorted(shared_files)),
        bits=bits,
        quantized=quantized,
        tensors=len(sizes),
    )


# --------------------------------------------------------------------------- memory
def _rank_key(key: object) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    m = _RANK_KEY_RE.match(key) if isinstance(key, str) else None
    return int(m.group(1)) if m else None


def resolve_memory(
    hosts: Sequence[str],
    reports: Sequence[Mapping[str, Any] | None] | None = None,
    memory: Mapping[object, object] | None = None,
) -> list[tuple[int, str]]:
    """Each rank's memory and where it came from (``cap``, ``cgroup``, ``working set``,
    ``machine``). ``hosts`` names each rank's host as the hostfile does; ``reports`` are the
    ranks' ``lm.rank_memory()``; ``memory`` caps a host (shared evenly by its ranks) or a rank
    (``rank1`` or the number 1), as bytes or ``"64GB"``. A measured limit below a cap wins."""
    n = len(hosts)
    reports = list(reports) if reports is not None else [None] * n
    names: list[set[str]] = []
    for r, host in enumerate(hosts):
        rep = reports[r] or {}
        names.append({host, str(rep.get("hostname") or host)})
    # ranks sharing a machine (and a cgroup) share its memory
    machine_of = [str((reports[r] or {}).get("hostname") or hosts[r]) for r in range(n)]
    on_machine = {m: machine_of.count(m) for m in machine_of}
    cgroup_of = [(machine_of[r], (reports[r] or {}).get("cgroup_path")) for r in range(n)]
    in_cgroup = {c: cgroup_of.count(c) for c in cgroup_of}
    caps: list[int | None] = [None] * n
    for key, value in (memory or {}).items():
        rank = _rank_key(key)
        if rank is not None:
            if not 0 <= rank < n:
                raise MLXClusterError(f"memory: rank{rank} is not a rank (0 to {n - 1})")
            caps[rank] = parse_size(value, f"memory of rank{rank}")
            continue
        ranks = [r for r in range(n) if key in names[r]]
        if not ranks:
            known = ", ".join(sorted(set(hosts)))
            raise MLXClusterError(
                f"memory: {key!r} is not a host of the cluster; use one of {known} or rankN"
            )
        size = parse_size(value, f"memory of {key}")
        for r in ranks:
            if caps[r] is None:  # a rank's own cap wins over its host's
                caps[r] = size // len(ranks)
    out: list[tuple[int, str]] = []
    for r in range(n):
        rep = reports[r] or {}
        found: list[tuple[int, str]] = []
        if rep.get("working_set"):
            found.append((int(rep["working_set"]) // on_machine[machine_of[r]], "working set"))
        elif rep.get("machine"):
            found.append((int(rep["machine"]) // on_machine[machine_of[r]], "machine"))
        if rep.get("cgroup"):
            found.append((int(rep["cgroup"]) // in_cgroup[cgroup_of[r]], "cgroup"))
        cap = caps[r]
        if cap is not None:
            found.append((cap, "cap"))
        if not found:
            raise MLXClusterError(
                f"rank {r} on {hosts[r]}: its memory is unknown; give it with memory={{...}} "
                "(--memory HOST=SIZE)"
            )
        # the lowest limit wins; a cap wins a tie
        out.append(min(found, key=lambda f: (f[0], f[1] != "cap")))
    return out


# --------------------------------------------------------------------------- the split
def _proportional(n_layers: int, weights: Sequence[float]) -> list[int]:
    """Layer counts in proportion to ``weights`` (largest remainder; ties to the lower rank,
    which with equal weights is exactly mlx-lm's even split)."""
    total = sum(weights)
    exact = [n_layers * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    left = n_layers - sum(counts)
    order = sorted(range(len(weights)), key=lambda r: (-(exact[r] - counts[r]), r))
    for r in order[:left]:
        counts[r] += 1
    return counts


def _loads(layer_bytes: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Bytes of each rank's layers: rank 0 holds the last ``counts[0]`` layers."""
    out, end = [], len(layer_bytes)
    for c in counts:
        out.append(sum(layer_bytes[end - c : end]))
        end -= c
    return out


def _greedy(layer_bytes: Sequence[int], limits: Sequence[float]) -> list[int] | None:
    """Counts (rank 0 from the last layer back) with every rank under its limit, each at least
    one layer; None when none exist. Taking as many as fit is optimal for feasibility."""
    n, end, counts = len(limits), len(layer_bytes), []
    for r, limit in enumerate(limits):
        keep = n - 1 - r  # layers left for the ranks after this one
        taken, load = 0, 0
        while end - taken > keep and load + layer_bytes[end - taken - 1] <= limit:
            load += layer_bytes[end - taken - 1]
            taken += 1
        if taken == 0 or (r == n - 1 and end - taken > 0):
            return None
        counts.append(taken)
        end -= taken
    return counts if end == 0 else None


def _minimax(layer_bytes: Sequence[int], capacity: Sequence[float]) -> tuple[list[int], float]:
    """The split that minimises the largest ratio of a rank's layer bytes to its capacity."""
    total = float(sum(layer_bytes))
    lo, hi = 0.0, total / min(capacity) + 1.0
    best = _greedy(layer_bytes, [hi * c for c in capacity])
    assert best is not None
    for _ in range(60):
        mid = (lo + hi) / 2
        counts = _greedy(layer_bytes, [mid * c for c in capacity])
        if counts is None:
            lo = mid
        else:
            hi, best = mid, counts
    loads = _loads(layer_bytes, best)
    return best, max(ld / c for ld, c in zip(loads, capacity))


def split_layers(layer_bytes: Sequence[int], capacity: Sequence[float]) -> tuple[list[int], bool]:
    """Each rank's layer count (rank order; rank 0 holds the last layers) and whether every
    rank's layers fit its ``capacity`` bytes. Proportional to capacity when that fits; else the
    split that fits best."""
    n = len(capacity)
    if len(layer_bytes) < n or n == 0:
        return [], False
    if any(c <= 0 for c in capacity):
        ok = [max(c, 0.0) for c in capacity]
        counts = _proportional(len(layer_bytes), ok) if sum(ok) > 0 else [0] * n
        return counts, False
    counts = _proportional(len(layer_bytes), capacity)
    loads = _loads(layer_bytes, counts)
    if all(c >= 1 for c in counts) and all(ld <= c for ld, c in zip(loads, capacity)):
        return counts, True
    best, ratio = _minimax(layer_bytes, capacity)
    return best, ratio <= 1.0


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RankPlan:
    """One rank's part: its layers ``[start, end)`` and the bytes it holds."""

    rank: int
    host: str
    memory: int
    memory_from: str
    start: int
    end: int
    layer_bytes: int
    shared_bytes: int
    headroom: int
    files: tuple[str, ...]

    @property
    def layers(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def weight_bytes(self) -> int:
        return self.layer_bytes + self.shared_bytes

    @property
    def spare(self) -> int:
        return self.memory - self.weight_bytes - self.headroom


_COLUMNS = ("rank", "host", "memory", "layers", "weights", "headroom", "spare")


@dataclass(frozen=True)
class PipelinePlan:
    """Which layers each rank holds, in rank order, and whether that fits (plain, picklable
    data: push it to the ranks for ``mlx_cluster_magic.rank.lm.pipeline_load``)."""

    model_dir: str
    num_layers: int
    ranks: tuple[RankPlan, ...]
    fits: bool
    problem: str | None  # one line when it does not fit: the shortfall and what would fit
    total_bytes: int
    tensors: int
    #: Why this plan was made again (a restart on fewer hosts), for its table.
    note: str | None = None

    @property
    def layers(self) -> list[tuple[int, int]]:
        """Each rank's ``(start, end)`` layer range, in rank order."""
        return [r.layers for r in self.ranks]

    @property
    def split(self) -> list[int]:
        """Each rank's layer count: ``model.model.pipeline(group, split=plan.split)``."""
        return [r.end - r.start for r in self.ranks]

    @property
    def weight_bytes(self) -> list[int]:
        return [r.weight_bytes for r in self.ranks]

    @property
    def headroom(self) -> list[int]:
        return [r.headroom for r in self.ranks]

    @property
    def memory(self) -> list[int]:
        return [r.memory for r in self.ranks]

    def _rows(self) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = []
        for r in self.ranks:
            layers = f"{r.start}-{r.end - 1} ({r.end - r.start})" if r.end > r.start else "none"
            rows.append(
                (
                    str(r.rank),
                    r.host,
                    f"{format_size(r.memory)} ({r.memory_from})",
                    layers,
                    format_size(r.weight_bytes),
                    format_size(r.headroom),
                    format_size(r.spare),
                )
            )
        return rows

    def summary(self) -> str:
        name = Path(self.model_dir).name or self.model_dir
        state = "fits" if self.fits else "does NOT fit"
        note = f" ({self.note})" if self.note else ""
        return (
            f"pipeline plan for {name}: {self.num_layers} layers, "
            f"{format_size(self.total_bytes)} of weights over {len(self.ranks)} ranks: {state}"
            f"{note}"
        )

    def __repr__(self) -> str:
        rows = [_COLUMNS, *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        lines = [self.summary()]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if self.problem:
            lines.append(self.problem)
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self._rows()
        )
        problem = (
            f"<p class='mlx-plan-problem' style='color:#b00'>{html.escape(self.problem)}</p>"
            if self.problem
            else ""
        )
        return (
            f"<div class='mlx-plan'><p>{html.escape(self.summary())}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{problem}</div>"
        )


def _headroom_bytes(headroom: float | int, memory: int) -> int:
    return int(memory * headroom) if isinstance(headroom, float) else int(headroom)


def _capacity(w: ModelWeights, memory: Sequence[int], headroom: float | int) -> list[float]:
    return [float(m - _headroom_bytes(headroom, m) - w.shared_bytes) for m in memory]


def _fits(w: ModelWeights, memory: Sequence[int], headroom: float | int) -> bool:
    return split_layers(w.layer_bytes, _capacity(w, memory, headroom))[1]


def _scaled(w: ModelWeights, factor: float) -> ModelWeights:
    return ModelWeights(
        w.model_dir,
        w.num_layers,
        tuple(int(b * factor) for b in w.layer_bytes),
        int(w.shared_bytes * factor),
        w.layer_files,
        w.shared_files,
        w.bits,
        w.quantized,
        w.tensors,
    )


def _advice(w: ModelWeights, memory: Sequence[int], headroom: float | int) -> str:
    """What would make it fit: another Mac of some memory, or fewer bits."""
    ways = []
    if len(memory) < w.num_layers:
        # the smallest added rank that makes the split fit (found by doubling, then bisection)
        lo, hi = 0, max(1 << 30, w.total_bytes)
        while not _fits(w, [*memory, hi], headroom) and hi < (1 << 50):
            lo, hi = hi, hi * 2
        if _fits(w, [*memory, hi], headroom):
            while hi - lo > max(hi // 200, 1 << 20):
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if _fits(w, [*memory, mid], headroom) else (mid, hi)
            ways.append(f"another Mac giving MLX {format_size(hi)}")
    source = w.bits + (_QUANT_OVERHEAD_BITS if w.quantized else 0.0)
    fewer: list[tuple[str, float]] = []
    if not w.quantized and w.bits > 16:
        fewer.append(("16-bit weights (mlx_lm.convert --dtype bfloat16", 16 / source))
    fewer += [
        (
            f"{bits}-bit weights (mlx_lm.convert -q --q-bits {bits}",
            (bits + _QUANT_OVERHEAD_BITS) / source,
        )
        for bits in _FEWER_BITS
        if bits < w.bits
    ]
    for what, factor in fewer:  # the most bits that fit
        smaller = _scaled(w, factor)
        if _fits(smaller, memory, headroom):
            ways.append(f"{what}: about {format_size(smaller.total_bytes)})")
            break
    if not ways:
        return "no Mac added or fewer bits would make it fit"
    return "it would fit with " + " or ".join(ways)


def make_plan(
    weights: ModelWeights,
    hosts: Sequence[str],
    memory: Sequence[tuple[int, str]] | Sequence[int],
    headroom: object = DEFAULT_HEADROOM,
) -> PipelinePlan:
    """The plan for ``weights`` on ranks on ``hosts`` (rank order) with ``memory`` bytes each
    (or ``(bytes, source)`` pairs, as ``resolve_memory`` gives)."""
    room = parse_headroom(headroom)
    mem = [(m, "given") if isinstance(m, int) else (int(m[0]), str(m[1])) for m in memory]
    if len(mem) != len(hosts) or not hosts:
        raise MLXClusterError(f"{len(hosts)} hosts but {len(mem)} memory sizes")
    w, n = weights, len(hosts)
    sizes = [m for m, _ in mem]
    capacity = _capacity(w, sizes, room)
    counts, fits = split_layers(w.layer_bytes, capacity)
    name = Path(w.model_dir).name or w.model_dir
    problem = None
    if n > w.num_layers:
        problem = (
            f"{name} has {w.num_layers} layers, too few for {n} pipeline ranks: "
            f"use at most {w.num_layers} ranks"
        )
        counts = [1] * w.num_layers + [0] * (n - w.num_layers)
    elif not fits:
        heads = [_headroom_bytes(room, m) for m in sizes]
        needed = sum(w.layer_bytes) + n * w.shared_bytes + sum(heads)
        short = needed - sum(sizes)
        what = (
            f"{name} does not fit: {format_size(sum(w.layer_bytes))} of layers, "
            f"{format_size(w.shared_bytes)} of embeddings and head on each rank and "
            f"{format_size(sum(heads))} of headroom need {format_size(needed)}, "
            f"the {n} ranks have {format_size(sum(sizes))}"
        )
        small = [r for r, c in enumerate(capacity) if c <= 0]
        if short > 0:
            what += f": {format_size(short)} short"
        elif small:
            what += (
                f", but rank {small[0]} ({format_size(sizes[small[0]])}) cannot hold the "
                "embeddings and head beside its headroom"
            )
        else:
            loads = _loads(w.layer_bytes, counts)
            over = max(ld - c for ld, c in zip(loads, capacity))
            what += f", but whole layers do not divide to fit: {format_size(over)} short"
        problem = f"{what}; {_advice(w, sizes, room)}"
    ranks, end = [], w.num_layers
    for r in range(n):
        count = counts[r] if r < len(counts) else 0
        start = max(end - count, 0)
        files = sorted(
            {f for i in range(start, end) for f in w.layer_files[i]} | set(w.shared_files)
        )
        ranks.append(
            RankPlan(
                rank=r,
                host=hosts[r],
                memory=sizes[r],
                memory_from=mem[r][1],
                start=start,
                end=end,
                layer_bytes=sum(w.layer_bytes[start:end]),
                shared_bytes=w.shared_bytes,
                headroom=_headroom_bytes(room, sizes[r]),
                files=tuple(files),
            )
        )
        end = start
    return PipelinePlan(
        model_dir=w.model_dir,
        num_layers=w.num_layers,
        ranks=tuple(ranks),
        fits=problem is None,
        problem=problem,
        total_bytes=w.total_bytes,
        tensors=w.tensors,
    )


def plan_pipeline(
    model_dir: str | os.PathLike[str],
    hosts: Sequence[str],
    reports: Sequence[Mapping[str, Any] | None] | None = None,
    memory: Mapping[object, object] | None = None,
    headroom: object = DEFAULT_HEADROOM,
) -> PipelinePlan:
    """Read the model in ``model_dir`` and plan it on ranks on ``hosts`` (rank order), with the
    ranks' ``lm.rank_memory()`` reports and/or ``memory`` caps (see ``resolve_memory``)."""
    return make_plan(
        read_weights(model_dir), hosts, resolve_memory(hosts, reports, memory), headroom
    )
