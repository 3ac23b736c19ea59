"""The pipeline planner: layers split by each rank's memory in mlx-lm's rank order, read from
safetensors headers (generated here: sparse files whose headers claim any size), the one-line
refusal of a model that cannot fit, caps, and the memory a rank reports inside a real cgroup."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_cluster_magic.cluster import pipeline_plan as pp
from mlx_cluster_magic.errors import MLXClusterError
from mlx_cluster_magic.rank import lm

GB = 1 << 30
MB = 1 << 20


def fake_model(
    root: Path,
    layers: int,
    layer_bytes: int | list[int],
    shared_bytes: int = 0,
    *,
    files: int = 1,
    tensors_per_layer: int = 9,
    index: bool = True,
    dtype: str = "BF16",
    config: dict[str, object] | None = None,
) -> Path:
    """A model folder whose safetensors files have real headers and sparse (empty) data."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = layer_bytes if isinstance(layer_bytes, list) else [layer_bytes] * layers
    tensors: list[tuple[str, int]] = []
    if shared_bytes:
        tensors += [("model.embed_tokens.weight", shared_bytes // 2)]
        tensors += [("lm_head.weight", shared_bytes - shared_bytes // 2)]
    for n, size in enumerate(sizes):
        part = size // tensors_per_layer
        for t in range(tensors_per_layer):
            last = t == tensors_per_layer - 1
            tensors.append((f"model.layers.{n}.w{t}.weight", size - part * t if last else part))
    per_file = -(-len(tensors) // files)
    weight_map = {}
    for f in range(files):
        name = f"model-{f + 1:05d}-of-{files:05d}.safetensors" if files > 1 else "model.safetensors"
        chunk = tensors[f * per_file : (f + 1) * per_file]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor, size in chunk:
            header[tensor] = {
                "dtype": dtype,
                "shape": [size // 2],
                "data_offsets": [offset, offset + size],
            }
            offset += size
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        with (root / name).open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
    cfg = {"model_type": "ministral3", "num_hidden_layers": layers, **(config or {})}
    (root / "config.json").write_text(json.dumps(cfg))
    if index:
        (root / "model.safetensors.index.json").write_text(
            json.dumps(
                {"metadata": {"total_size": sum(s for _, s in tensors)}, "weight_map": weight_map}
            )
        )
    return root


def mlx_lm_even(layers: int, size: int) -> list[tuple[int, int]]:
    """mlx-lm 0.32.2's even split (models/pipeline.py): low ranks get the extra layers, and
    rank r runs the layers after those of ranks r+1 ... size-1."""
    base, extra = divmod(layers, size)
    split = [base + (1 if r < extra else 0) for r in range(size)]
    return [(sum(split[r + 1 :]), sum(split[r:])) for r in range(size)]


@pytest.mark.parametrize(("layers", "ranks"), [(4, 2), (5, 2), (10, 4), (32, 3), (61, 8), (80, 2)])
def test_even_memory_gives_mlx_lms_even_split(tmp_path: Path, layers: int, ranks: int) -> None:
    model = fake_model(tmp_path / "m", layers, 100 * MB, 400 * MB)
    plan = pp.plan_pipeline(
        model, ["localhost"] * ranks, memory={f"rank{r}": "64GB" for r in range(ranks)}
    )
    assert plan.fits and plan.problem is None
    assert plan.layers == mlx_lm_even(layers, ranks)


def test_rank_zero_holds_the_last_layers(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "m", 12, 100 * MB)
    plan = pp.plan_pipeline(
        model, ["mac1", "mac2", "mac3"], memory={"mac1": "8GB", "mac2": "8GB", "mac3": "8GB"}
    )
    assert plan.layers == [(8, 12), (4, 8), (0, 4)]
    assert plan.split == [4, 4, 4]
    assert [r.host for r in plan.ranks] == ["mac1", "mac2", "mac3"]


def test_one_to_two_memory_gives_about_one_to_two_layers(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "m", 48, 200 * MB, 200 * MB)
    plan = pp.plan_pipeline(model, ["small", "big"], memory={"small": "8GB", "big": "16GB"})
    assert plan.fits
    small, big = plan.split
    assert small + big == 48 and abs(big / small - 2) < 0.25, plan.split
    assert plan.layers == [(48 - small, 48), (0, 48 - small)]
    # every rank's weights and headroom fit its memory
    assert all(r.weight_bytes + r.headroom <= r.memory for r in plan.ranks)
    assert plan.headroom == [int(0.1 * 8 * GB), int(0.1 * 16 * GB)]


def test_the_even_split_would_not_fit_where_the_plan_does(tmp_path: Path) -> None:
    """The issue's example: 380 GB of weights on 192 GB + 256 GB Macs."""
    model = fake_model(tmp_path / "m", 80, int(4.7 * GB), 4 * GB, files=8)
    memory = {"studio192": "192GB", "studio256": "256GB"}
    plan = pp.plan_pipeline(model, list(memory), memory=memory, headroom="4GB")
    assert plan.fits, plan.problem
    even = [b - a for a, b in mlx_lm_even(80, 2)]
    assert even[0] * 4.7 * GB + 4 * GB + 4 * GB > 192 * GB  # mlx-lm's split overflows the 192
    assert plan.split[0] < plan.split[1]


def test_cannot_fit_is_one_line_with_the_shortfall_and_what_would_fit(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "big", 40, 1 * GB, 2 * GB)  # 42 GB of 16-bit weights
    plan = pp.plan_pipeline(
        model, ["mac1", "mac2"], memory={"mac1": "16GB", "mac2": "16GB"}, headroom="1GB"
    )
    assert not plan.fits
    assert plan.problem is not None and "\n" not in plan.problem
    # 40 + 2*2 + 2*1 = 46 GB needed on 32 GB: 14 GB short
    assert "does not fit" in plan.problem and "14.0 GB short" in plan.problem
    assert "another Mac giving MLX" in plan.problem
    assert "8-bit weights (mlx_lm.convert -q --q-bits 8" in plan.problem
    assert plan.problem in repr(plan) and "does NOT fit" in repr(plan)
    # the suggested Mac is enough, and not much more than enough
    size = plan.problem.split("another Mac giving MLX ")[1].split(" or ")[0]
    extra = pp.parse_size(size.replace(" ", ""))
    assert 16 * GB <= extra <= 18 * GB
    again = pp.plan_pipeline(
        model,
        ["mac1", "mac2", "mac3"],
        memory={"mac1": "16GB", "mac2": "16GB", "mac3": extra},
        headroom="1GB",
    )
    assert again.fits


def test_a_32_bit_model_is_advised_16_bits_first(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "f32", 12, 1 * GB, dtype="F32")  # 12 GB on 10 GB
    plan = pp.plan_pipeline(model, ["a", "b"], memory={"a": "5GB", "b": "5GB"}, headroom=0)
    assert plan.problem is not None
    assert "16-bit weights (mlx_lm.convert --dtype bfloat16: about 6.0 GB)" in plan.problem


def test_a_rank_too_small_for_the_embeddings_is_named(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "m", 8, 100 * MB, 3 * GB)
    plan = pp.plan_pipeline(model, ["a", "b"], memory={"a": "64GB", "b": "2GB"})
    assert not plan.fits and plan.problem is not None
    assert "rank 1 (2.0 GB) cannot hold the embeddings and head" in plan.problem


def test_too_few_layers_for_the_ranks(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "m", 2, 10 * MB)
    plan = pp.plan_pipeline(model, ["localhost"] * 3, memory={"localhost": "24GB"})
    assert not plan.fits
    assert plan.problem == "m has 2 layers, too few for 3 pipeline ranks: use at most 2 ranks"


def test_uneven_layers_get_the_split_that_fits(tmp_path: Path) -> None:
    """Heavy last layers (as in MoE models with dense first layers, reversed): the proportional
    count split overflows rank 0, the byte-aware one fits."""
    sizes = [100 * MB] * 6 + [500 * MB] * 2
    model = fake_model(tmp_path / "m", 8, sizes)
    plan = pp.plan_pipeline(model, ["a", "b"], memory={"a": "1000MB", "b": "1000MB"}, headroom=0)
    assert plan.fits, plan
    assert plan.split == [2, 6]  # counts in proportion ([4, 4]) put 1.2 GB on rank 0
    assert all(r.layer_bytes <= r.memory for r in plan.ranks)


def test_caps_a_host_b_rank_and_never_above_what_the_rank_reports() -> None:
    reports = [
        {"hostname": "mac1.local", "machine": 64 * GB, "cgroup": None, "cgroup_path": "/"},
        {"hostname": "mac2.local", "machine": 128 * GB, "cgroup": None, "cgroup_path": "/"},
        {"hostname": "mac2.local", "machine": 128 * GB, "cgroup": None, "cgroup_path": "/"},
    ]
    hosts = ["mac1", "mac2", "mac2"]
    assert pp.resolve_memory(hosts, reports) == [
        (64 * GB, "machine"),
        (64 * GB, "machine"),
        (64 * GB, "machine"),
    ]
    capped = pp.resolve_memory(hosts, reports, {"mac2": "100GB", "mac1": 128 * GB})
    # a host's cap is shared by its ranks; a cap above what the rank has does not count
    assert capped == [(64 * GB, "machine"), (50 * GB, "cap"), (50 * GB, "cap")]
    # a rank's own cap wins over its host's; the rank's hostname names the host too
    assert pp.resolve_memory(hosts, reports, {"mac2.local": "100GB", "rank2": "10GB"})[1:] == [
        (50 * GB, "cap"),
        (10 * GB, "cap"),
    ]
    cg = [{"hostname": "h", "machine": 64 * GB, "cgroup": 3 * GB, "cgroup_path": "/mac1"}]
    assert pp.resolve_memory(["mac1"], cg) == [(3 * GB, "cgroup")]
    mac = [{"hostname": "h", "machine": 64 * GB, "working_set": 48 * GB}]
    assert pp.resolve_memory(["mac1"], mac) == [(48 * GB, "working set")]


def test_a_plan_respects_explicit_caps(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "m", 30, 100 * MB, 100 * MB)
    reports = [{"hostname": "vm", "machine": 24 * GB}] * 2
    plan = pp.plan_pipeline(
        model, ["localhost", "localhost"], reports, memory={"rank0": "1GB", "rank1": "3GB"}
    )
    assert [(r.memory, r.memory_from) for r in plan.ranks] == [(1 * GB, "cap"), (3 * GB, "cap")]
    assert plan.fits and all(r.spare >= 0 for r in plan.ranks)
    assert plan.ranks[0].weight_bytes + plan.ranks[0].headroom <= 1 * GB
    assert plan.split[0] < plan.split[1]


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        MLXClusterError, match="is not a host of the cluster; use one of localhost or rankN"
    ):
        pp.resolve_memory(["localhost"], None, {"mac9": "1GB"})
    with pytest.raises(MLXClusterError, match="rank3 is not a rank"):
        pp.resolve_memory(["localhost"], None, {"rank3": "1GB"})
    with pytest.raises(MLXClusterError, match=r"'lots' is not a size; give bytes or e.g. '64GB'"):
        pp.parse_size("lots")
    with pytest.raises(MLXClusterError, match="memory is unknown"):
        pp.resolve_memory(["localhost"])
    with pytest.raises(MLXClusterError, match="headroom"):
        pp.parse_headroom("ten%")
    with pytest.raises(MLXClusterError, match="give HOST=SIZE pairs"):
        pp.parse_memory_spec("mac1:64GB")
    with pytest.raises(MLXClusterError, match="has no config.json"):
        pp.read_weights(tmp_path)
    with pytest.raises(MLXClusterError, match="is not a folder"):
        pp.read_weights(tmp_path / "nowhere")
    model = fake_model(tmp_path / "m", 4, MB, files=2)
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        MLXClusterError, match="is missing: the plan reads every weight file's header"
    ):
        pp.read_weights(model)


def test_sizes_and_headroom_parse() -> None:
    assert pp.parse_size("64GB") == pp.parse_size("64 GiB") == pp.parse_size("64g") == 64 * GB
    assert pp.parse_size("512MB") == 512 * MB and pp.parse_size(1000) == 1000
    assert pp.parse_headroom("10%") == pp.parse_headroom(0.1) == pp.parse_headroom("0.1") == 0.1
    assert pp.parse_headroom("4GB") == 4 * GB and pp.parse_headroom(0) == 0.0
    assert pp.parse_memory_spec("mac1=64GB, rank1=8GB") == {"mac1": "64GB", "rank1": "8GB"}
    assert pp.format_size(1.5 * GB) == "1.5 GB" and pp.format_size(380 * GB) == "380 GB"


def test_reads_headers_without_an_index_and_knows_the_bits(tmp_path: Path) -> None:
    with_index = pp.read_weights(fake_model(tmp_path / "a", 6, 9 * MB, 2 * MB, files=3))
    no_index = pp.read_weights(fake_model(tmp_path / "b", 6, 9 * MB, 2 * MB, files=3, index=False))
    assert with_index.layer_bytes == no_index.layer_bytes == (9 * MB,) * 6
    assert with_index.shared_bytes == 2 * MB and with_index.bits == 16
    assert no_index.layer_files[0] == ("model-00001-of-00003.safetensors",)
    q = pp.read_weights(
        fake_model(
            tmp_path / "q",
            2,
            MB,
            dtype="U32",
            config={"quantization": {"bits": 4, "group_size": 64}},
        )
    )
    assert q.bits == 4 and q.quantized


def test_each_rank_lists_the_files_of_its_layers(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "m", 8, 10 * MB, 10 * MB, files=4, tensors_per_layer=1)
    plan = pp.plan_pipeline(model, ["a", "b"], memory={"a": "1GB", "b": "1GB"})
    # files 1..4 hold [embed, head, L0, L1], [L2..L5]... by the generator's chunking
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    for r in plan.ranks:
        wanted = {index[f"model.layers.{n}.w0.weight"] for n in range(r.start, r.end)}
        wanted |= {index["model.embed_tokens.weight"], index["lm_head.weight"]}
        assert set(r.files) == wanted


def test_the_plan_is_plain_data_and_renders(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "tiny", 4, MB, MB)
    plan = pp.plan_pipeline(model, ["localhost", "localhost"], memory={"localhost": "2GB"})
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and again.layers == [(2, 4), (0, 2)]
    text = repr(plan)
    assert text.splitlines()[0].startswith("pipeline plan for tiny: 4 layers")
    assert "rank  host" in text and "1.0 GB (cap)" in text and "2-3 (2)" in text
    page = plan._repr_html_()
    assert "<table>" in page and "<th>headroom</th>" in page and "0-1 (2)" in page


def test_plans_an_index_of_1000_tensors_in_under_a_second(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "m", 111, 2 * GB, 4 * GB, files=20, tensors_per_layer=9)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 1001
    hosts = [f"mac{i}" for i in range(8)]
    memory = {h: f"{64 * (i + 1)}GB" for i, h in enumerate(hosts)}
    times = []
    for _ in range(3):
        t = time.perf_counter()
        plan = pp.plan_pipeline(model, hosts, memory=memory)
        times.append(time.perf_counter() - t)
    print(f"plan of 1001 tensors in 20 files on 8 ranks: {min(times) * 1000:.1f} ms (best of 3)")
    assert plan.fits and sum(plan.split) == 111
    assert min(times) < 1.0
    # and when it does not fit (the advice plans many more times)
    t = time.perf_counter()
    small = pp.plan_pipeline(model, hosts, memory=dict.fromkeys(hosts, "16GB"))
    assert not small.fits and time.perf_counter() - t < 1.0


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _own_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_V1 / path.lstrip("/")
    return None


@pytest.mark.skipif(
    not (CGROUP_V1 / "memory.limit_in_bytes").exists() or os.geteuid() != 0,
    reason="needs root and the cgroup v1 memory controller",
)
def test_a_rank_in_a_memory_cgroup_reports_its_limit() -> None:
    """As a virtual host's ranks do: a process moved into a capped cgroup sees that cap."""
    parent = _own_memory_cgroup()
    assert parent is not None and parent.is_dir()
    group = parent / f"mcm-plan-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(300 * MB))
        code = (
            f"import os, json; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()));"
            "from mlx_cluster_magic.rank.lm import rank_memory; print(json.dumps(rank_memory()))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        report = json.loads(out.stdout)
        assert report["cgroup"] == 300 * MB and report["cgroup_path"].endswith(group.name)
        assert report["machine"] > 300 * MB
        assert pp.resolve_memory(["localhost"], [report]) == [(300 * MB, "cgroup")]
    finally:
        group.rmdir()
    here = lm.rank_memory()  # this process: no cap below the machine
    assert here["machine"] and (here["cgroup"] is None or here["cgroup"] > 300 * MB)


def test_a_hostfile_memory_caps_its_host_and_the_option_overrides_it(tmp_path: Path) -> None:
    from mlx_cluster_magic import MLXCluster
    from mlx_cluster_magic.fabric.placement import read_hostfile

    model = fake_model(tmp_path / "m", 12, 1 * GB)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(
        json.dumps(
            [
                {"ssh": "mac1", "ips": ["10.0.0.1"], "memory": "8GB"},
                {"ssh": "mac2", "ips": ["10.0.0.2"], "memory": 16 * GB},
            ]
        )
    )
    assert [h.memory for h in read_hostfile(hostfile).hosts] == [8 * GB, 16 * GB]
    # not started: the hostfile gives every rank's memory
    cluster = MLXCluster(hostfile=hostfile, controller_ip="127.0.0.1")
    plan = cluster.plan_pipeline(str(model), headroom=0)
    assert [r.memory for r in plan.ranks] == [8 * GB, 16 * GB]
    assert [r.end - r.start for r in plan.ranks] == [4, 8]
    again = cluster.plan_pipeline(str(model), memory={"mac1": "16GB"}, headroom=0)
    assert [r.end - r.start for r in again.ranks] == [6, 6]
    hostfile.write_text(json.dumps([{"ssh": "mac1", "memory": "lots"}]))
    with pytest.raises(MLXClusterError, match=r'hosts.json: host 1: "memory": .lots. is not a size'):
        read_hostfile(hostfile)
