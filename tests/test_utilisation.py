"""How hard each host works: macmon's JSON lines (real captured output), the head's bounded
series, the network-wait line, and a real cluster's CPU figure per rank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_cluster_magic.observe.utilisation import (
    SPARK_POINTS,
    UsageStore,
    gpu_idle_for,
    network_wait,
)
from mlx_cluster_magic.rank.host_usage import (
    HOST_FIELDS,
    MACMON_HINT,
    PipeReader,
    UsageSampler,
    first_on_host,
    parse_macmon_line,
    parse_powermetrics_line,
)

FIXTURES = Path(__file__).parent / "fixtures" / "macos"
VIEWS = Path(__file__).parents[1] / "mlx_cluster_magic" / "views"
#: One line of ``macmon pipe``, as henrygd/beszel captured it (source in fixtures/macos/README.md).
MACMON_FILE = FIXTURES / "macmon-pipe_beszel-gpu-darwin-test.jsonl"
MACMON_LINE = MACMON_FILE.read_text()
#: ``sudo powermetrics --samplers gpu_power -i 500 -n 1`` on a Mac14,10, as published in
#: henrygd/beszel issue 1746 (fixtures/macos/README.md).
POWERMETRICS_FILE = FIXTURES / "powermetrics-samplers-gpu_power_mac14-10_beszel-issue-1746.txt"


def test_macmon_line_gives_gpu_power_and_temperatures() -> None:
    doc = json.loads(MACMON_LINE)  # the capture is one JSON object per line, as macmon prints
    parsed = parse_macmon_line(MACMON_LINE)
    assert parsed == pytest.approx(
        {
            "gpu_percent": doc["gpu_usage"][1] * 100,  # [MHz, ratio 0-1]
            "cpu_w": doc["cpu_power"],
            "gpu_w": doc["gpu_power"],
            "cpu_temp_c": doc["temp"]["cpu_temp_avg"],
            "gpu_temp_c": doc["temp"]["gpu_temp_avg"],
        }
    )
    assert parsed["gpu_percent"] == pytest.approx(1.3633, abs=1e-3)
    assert parsed["cpu_w"] == pytest.approx(0.636, abs=1e-3)
    assert parsed["gpu_temp_c"] == pytest.approx(29.445, abs=1e-3)
    # bytes as read from the pipe, with its newline
    assert parse_macmon_line(MACMON_LINE.encode()) == parsed


def test_macmon_line_cut_short_or_not_json_gives_nothing() -> None:
    line = MACMON_LINE.strip()
    assert parse_macmon_line(line[: len(line) // 2]) == {}
    assert parse_macmon_line("error: no IOReport channels") == {}
    assert parse_macmon_line("[]") == {}
    # a field macmon left out is left out, not zero
    doc = json.loads(line)
    del doc["temp"]
    assert "gpu_temp_c" not in parse_macmon_line(json.dumps(doc))


def test_powermetrics_gpu_lines_give_gpu_use_and_power() -> None:
    found: dict[str, float] = {}
    for line in POWERMETRICS_FILE.read_bytes().splitlines():
        found.update(parse_powermetrics_line(line))
    assert found == pytest.approx({"gpu_percent": 0.97, "gpu_w": 0.004})
    # the per-frequency residencies and the idle line are not GPU use
    assert parse_powermetrics_line("GPU idle residency:  99.03%") == {}
    assert parse_powermetrics_line("GPU HW active frequency: 444 MHz") == {}


def _read_until_done(reader: PipeReader) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        latest = dict(reader.latest())
        if reader.exited:
            return latest
        time.sleep(0.05)
    raise AssertionError("the tool's output was not read")


def test_pipe_reader_reads_a_tools_lines_without_blocking() -> None:
    # a real process printing the captured lines, read as the sampler reads macmon's pipe
    reader = PipeReader(["cat", str(MACMON_FILE)], parse_macmon_line)
    try:
        t = time.monotonic()
        reader.latest()  # nothing may be there yet: it does not wait
        assert time.monotonic() - t < 0.5
        assert _read_until_done(reader) == parse_macmon_line(MACMON_LINE)
        assert reader.exited and not reader.failed  # all read, then the end seen
    finally:
        reader.close()
    reader = PipeReader(["cat", str(POWERMETRICS_FILE)], parse_powermetrics_line)
    try:
        assert _read_until_done(reader) == pytest.approx({"gpu_percent": 0.97, "gpu_w": 0.004})
    finally:
        reader.close()
    # a tool that ends without a figure (sudo -n asking for a password) is failed
    reader = PipeReader(
        ["sh", "-c", "echo 'sudo: a password is required' >&2; exit 1"], parse_macmon_line
    )
    try:
        assert _read_until_done(reader) == {} and reader.failed
    finally:
        reader.close()


def test_first_on_host_is_open_mpi_local_rank_zero() -> None:
    assert first_on_host({"OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert not first_on_host({"OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert first_on_host({})  # not under Open MPI: every rank samples


def test_sampler_measures_this_process_and_host_and_no_gpu_on_linux() -> None:
    sampler = UsageSampler(samples_host=True, interval_s=0.5)
    try:
        first = sampler.sample()
        assert "cpu_percent" not in first  # no interval yet
        end = time.monotonic() + 0.4
        while time.monotonic() < end:  # one core busy
            pass
        busy = sampler.sample()
        time.sleep(0.4)
        idle = sampler.sample()
    finally:
        sampler.close()
    # (the machine's cores are shared: a busy loop gets what the others leave it)
    assert busy["cpu_percent"] > 25 and busy["cpu_percent"] > 2 * idle["cpu_percent"] + 10
    assert idle["cpu_percent"] < 15, idle
    assert 0 < busy["host_cpu_percent"] <= 100 and 0 < busy["mem_percent"] < 100
    if sys.platform != "darwin":
        assert not {"gpu_percent", "cpu_w", "gpu_w", "cpu_temp_c", "gpu_temp_c"} & set(busy)
        assert "usage_hint" not in busy
    other = UsageSampler(samples_host=False, interval_s=0.5)
    other.sample()
    assert set(other.sample()) == {"cpu_percent"}  # a second rank on the host: itself only


def _record(host: str, **fields: object) -> dict[str, object]:
    return {"host": host, "samples_host": True, **fields}


def test_store_keeps_newest_per_host_and_bounded_series() -> None:
    store = UsageStore(points_per_series=10)
    for i in range(25):
        store.add(0, _record("mac1", cpu_percent=i, host_cpu_percent=i / 2, mem_percent=40.0), i)
    store.add(1, {"host": "mac1", "cpu_percent": 7.0}, 25)  # a second rank: no host figures
    store.add(0, {"host": "mac1", "state": "idle"}, 26)  # a notice: nothing to keep
    fields = store.host_fields("mac1")
    assert set(fields) == {*HOST_FIELDS, "usage_hint"}
    assert fields["host_cpu_percent"] == 12.0 and fields["gpu_percent"] is None
    points = store.points()
    by = {(p.field, p.rank): [] for p in points}
    for p in points:
        by[(p.field, p.rank)].append(p.value)
    assert len(by[("cpu_percent", 0)]) == 10 and by[("cpu_percent", 0)][-1] == 24
    assert by[("cpu_percent", 1)] == [7.0]
    assert ("gpu_percent", None) not in by  # unknown: absent, not zero
    assert {p.host for p in points} == {"mac1"}
    # junk is not kept
    store.add(0, _record("mac1", host_cpu_percent="lots", gpu_percent=float("nan")), 27)
    assert store.host_fields("mac1")["host_cpu_percent"] is None


def test_sparkline_is_gpu_where_known_else_cpu_over_the_last_minute() -> None:
    store = UsageStore()
    for i in range(200):
        t = 1000.0 + i * 0.5
        store.add(0, _record("mac1", host_cpu_percent=50.0, gpu_percent=float(i % 100)), t)
        store.add(1, _record("linux1", host_cpu_percent=20.0), t)
    lines = store.sparklines(["mac1", "mac1", "linux1", "nohost"], now=1100.0)
    assert [(s["host"], s["field"]) for s in lines] == [
        ("mac1", "gpu_percent"),
        ("linux1", "host_cpu_percent"),
    ]
    assert all(len(s["values"]) == SPARK_POINTS for s in lines)
    assert lines[1]["values"] == [20.0] * SPARK_POINTS


def test_network_wait_needs_an_idle_gpu_and_a_long_collective() -> None:
    store = UsageStore()
    for i in range(10):
        store.add(0, _record("mac2", gpu_percent=3.0), 100.0 + i * 0.5)
    blocked = {"recorder": {"blocked": {"op": "all_sum"}, "blocked_s": 3.1}}
    assert gpu_idle_for(store, "mac2", 2.0, now=104.6) == 3.0
    said = network_wait(store, "mac2", blocked, "busy", now=104.6)
    assert said == "mac2 waits on the network (GPU 3 %)"
    short = {"recorder": {"blocked": {"op": "all_sum"}, "blocked_s": 1.0}}
    assert network_wait(store, "mac2", short, "busy", now=104.6) is None
    assert network_wait(store, "mac2", blocked, "idle", now=104.6) is None
    assert network_wait(store, "linux1", blocked, "busy", now=104.6) is None  # GPU unknown
    store.add(0, _record("mac2", gpu_percent=90.0), 104.5)
    assert network_wait(store, "mac2", blocked, "busy", now=104.6) is None  # GPU at work


def test_macmon_hint_names_the_install() -> None:
    assert "brew install macmon" in MACMON_HINT


def _cpu(cluster) -> list[float | None]:
    return [n["cpu_percent"] for n in cluster.nodes()]


def _wait_for(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_cpu_per_rank_rises_in_a_busy_cell_and_falls_after(no_leaks) -> None:
    from mlx_cluster_magic import MLXCluster

    with MLXCluster(n=2) as cluster:
        _wait_for("a CPU figure from every rank", lambda: None not in _cpu(cluster), 10)
        time.sleep(1.5)
        before = _cpu(cluster)
        busy_cell = cluster.view.execute(
            "import time\n_end = time.monotonic() + 4\nwhile time.monotonic() < _end:\n    pass\n",
            block=False,
        )
        time.sleep(2.5)
        during = _cpu(cluster)
        nodes = cluster.nodes()
        busy_cell.get(timeout=30)
        time.sleep(2.0)
        after = _cpu(cluster)
        series = cluster.utilisation()
    print(f"rank CPU % before {before}, during {during}, after {after}")
    # 2 ranks on 2 cores that other work shares: each busy rank's figure rises well above
    # its idle one, and falls back once the cell is done
    for b, d, a in zip(before, during, after, strict=True):
        assert b is not None and d is not None and a is not None
        assert b < 15 and a < 15, (before, after)
        assert d > 3 * max(b, a) + 10, (before, during, after)
    # one host, sampled once: host figures on both rows, GPU absent (not zero) here
    assert nodes[0]["host"] == nodes[1]["host"]
    assert all(n["host_cpu_percent"] is not None and n["mem_percent"] is not None for n in nodes)
    if sys.platform != "darwin":
        assert all(n["gpu_percent"] is None and n["usage_hint"] is None for n in nodes)
    rank_cpu = series[series["field"] == "cpu_percent"]
    assert set(rank_cpu["rank"]) == {0, 1}
    host_cpu = series[series["field"] == "host_cpu_percent"]
    assert len(host_cpu) > 5 and host_cpu["rank"].isna().all()
    # one sampler for the host: a host figure per report of one rank, not of both
    per_rank = rank_cpu.groupby("rank").size()
    assert len(host_cpu) <= max(per_rank) + 2, (len(host_cpu), per_rank.to_dict())
    assert list(series.columns) == ["host", "time", "field", "value", "rank"]


# --------------------------------------------------------------------------- the views
def _node(rank: int, state: str = "busy", **usage: object):
    from mlx_cluster_magic.observe.snapshot import NodeStatus

    return NodeStatus(rank, "mac1", state, 1.0, 0.1, 1 << 20, 0, 0, "cpu", 100 + rank, **usage)


MAC = dict(
    cpu_percent=97.5,
    host_cpu_percent=51.0,
    mem_percent=40.0,
    gpu_percent=3.4,
    cpu_w=4.26,
    gpu_w=11.0,
    cpu_temp_c=55.0,
    gpu_temp_c=52.4,
)


def test_text_view_shows_usage_columns_only_where_known() -> None:
    from mlx_cluster_magic.views.text import nodes_html, nodes_text, usage_cells, usage_columns

    linux = [_node(0, cpu_percent=99.0, host_cpu_percent=50.0, mem_percent=30.0), _node(1)]
    assert usage_columns(linux) == ["CPU", "host CPU"]  # no GPU, power, temperature columns
    head = nodes_text(linux).splitlines()[0].split()
    assert head[-4:] == ["device", "CPU", "host", "CPU"] and "GPU" not in head
    mac = [_node(0, **MAC), _node(1, "stopped", **MAC)]
    assert usage_columns(mac) == ["CPU", "host CPU", "GPU", "power", "temp"]
    assert usage_cells(mac[0]) == {
        "CPU": "98 %",
        "host CPU": "51 %",
        "GPU": "3 %",
        "power": "4.3 / 11.0 W",
        "temp": "55 / 52 °C",
    }
    assert set(usage_cells(mac[1]).values()) == {"-"}  # a stopped rank shows no live figures
    assert "<th style='text-align:left;padding:2px 8px'>GPU</th>" in nodes_html(mac)
    hinted = [_node(0, cpu_percent=5.0, usage_hint=MACMON_HINT)]
    assert nodes_text(hinted).splitlines()[-1] == f"GPU, power and temperature: {MACMON_HINT}"
    assert usage_columns([_node(0)]) == []  # no figures yet: the table as before


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_es_module_words_usage_as_the_text_view(tmp_path: Path) -> None:
    from mlx_cluster_magic.views.text import usage_cells, usage_columns

    nodes = [_node(0, **MAC), _node(1, "dead", **MAC), _node(2, cpu_percent=12.0)]
    rows = [n.as_dict() for n in nodes]
    spark = {"host": "mac1", "field": "gpu_percent", "values": [0, 50, 100]}
    script = tmp_path / "usage.mjs"
    script.write_text(
        f"import * as m from {json.dumps((VIEWS / 'status_widget.js').as_uri())};\n"
        f"const nodes = {json.dumps(rows)};\n"
        "console.log(JSON.stringify({cells: nodes.map(m.usageCells),\n"
        f"  columns: m.usageColumns(nodes, []), spark: m.sparkline({json.dumps(spark)})}}));\n"
    )
    out = json.loads(
        subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout
    )
    assert out["cells"] == [usage_cells(n) for n in nodes]
    assert out["columns"] == usage_columns(nodes)
    points = re.search(r'points="([^"]+)"', out["spark"]).group(1).split()
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[0] > ys[1] > ys[2]  # 0 % at the bottom, 100 % at the top
    assert "mac1: GPU use over the last minute (now 100 %)" in out["spark"]


def test_widget_syncs_sparklines_with_the_snapshot() -> None:
    from mlx_cluster_magic.observe.snapshot import ClusterSnapshot
    from mlx_cluster_magic.views.status_widget import StatusWidget

    spark = {"host": "mac1", "field": "host_cpu_percent", "values": [1.0, 2.0]}
    s = ClusterSnapshot("running", "mpi", 1, 1, 1.0, (_node(0, **MAC),), sparklines=(spark,))
    w = StatusWidget(on_stop=lambda: None, on_restart=lambda replay: None, snapshot=s)
    assert w.snapshot["sparklines"] == [spark]
    assert w.snapshot["nodes"][0]["gpu_percent"] == 3.4


def test_progress_line_says_which_host_waits_on_the_network() -> None:
    from mlx_cluster_magic.cluster.px import Progress, progress_rows

    nodes = [
        {"rank": 0, "state": "busy"},
        {"rank": 1, "state": "busy", "waiting": "mac2 waits on the network (GPU 3 %)"},
    ]
    rows = progress_rows(nodes, done=[], targets=[0, 1], elapsed=9.2)
    assert rows == [(0, "busy", "9 s"), (1, "busy", "9 s, mac2 waits on the network (GPU 3 %)")]
    assert Progress.bundle(rows, 9.2).plain.endswith(
        "rank 1 busy 9 s, mac2 waits on the network (GPU 3 %)"
    )


# --------------------------------------------------------------------------- several hosts
@pytest.fixture(scope="module")
def two_macs():
    from conftest import virtual_macs

    with virtual_macs(2, "10.243.1.0/24", "utl") as vc:
        yield vc


@pytest.mark.multihost
def test_one_sampler_per_host_on_two_virtual_macs(two_macs, tmp_path: Path) -> None:
    from mlx_cluster_magic import MLXCluster

    hostfile = two_macs.hostfile(tmp_path / "hosts.json")
    with MLXCluster(2, hostfile=hostfile, ssh=two_macs.rsh_agent, timeout=60) as cluster:
        assert [r["host"] for r in cluster.ranks] == ["mac1", "mac1", "mac2", "mac2"]
        _wait_for(
            "every row's figures",
            lambda: all(
                n["cpu_percent"] is not None and n["host_cpu_percent"] is not None
                for n in cluster.nodes()
            ),
            20,
        )
        time.sleep(3)
        series = cluster.utilisation()
        nodes = cluster.nodes()
    assert [n["host"] for n in nodes] == ["mac1", "mac1", "mac2", "mac2"]
    host_cpu = series[series["field"] == "host_cpu_percent"]
    assert set(host_cpu["host"]) == {"mac1", "mac2"}
    rank_cpu = series[series["field"] == "cpu_percent"]
    assert set(rank_cpu["rank"]) == {0, 1, 2, 3}
    per_rank = rank_cpu.groupby("rank").size()
    for host in ("mac1", "mac2"):  # one sampler on each host, not one per rank
        assert (host_cpu["host"] == host).sum() <= max(per_rank) + 2, host_cpu.groupby(
            "host"
        ).size()
    if sys.platform != "darwin":
        assert all(n["gpu_percent"] is None for n in nodes)
