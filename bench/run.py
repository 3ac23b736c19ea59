"""``make bench``: mlx_cluster_magic against the raw baselines, side by side in one run.

Every figure is a median over repeated runs with its spread (min..max), measured alternately
with its baseline so that machine noise hits both alike; the ratio is ours / baseline.
Writes bench/results.json and bench/results.md (the table the README shows).

    python bench/run.py [--quick] [--only startup,roundtrip,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bandwidth import bench_bandwidth
from broadcast import bench_broadcast
from cabled import bench_cabled
from cabling import bench_cabling
from encryption import bench_encryption
from farm import bench_farm
from keep import bench_keep
from links import bench_links
from lm import bench_lm
from network import bench_network
from overhead import bench_overhead
from pipeline import bench_pipeline
from px_parity import bench_px_parity
from rank_import import bench_rank_import
from recorder import bench_recorder
from recovery import bench_recovery, bench_report
from relay import bench_relay
from scaling import bench_scaling
from setup_env import bench_setup
from sync import bench_sync

import benchlib
from benchlib import compare

HERE = Path(__file__).parent


# ----------------------------------------------------------------------------- sections
def _median_call(f: Callable[[], Any], calls: int = 300, warm: int = 30) -> float:
    for _ in range(warm):
        f()
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        f()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def bench_startup(reps: int) -> list[dict[str, Any]]:
    """Start-to-ready and the %%px round trip, against raw ipyparallel with engines="mpi"."""
    import ipyparallel as ipp
    from ipyparallel.client.magics import ParallelMagics
    from IPython.core.interactiveshell import InteractiveShell

    from mlx_cluster_magic import MLXCluster

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mlx_cluster_magic")
    m: dict[str, list[float]] = {
        k: []
        for k in (
            "ours start", "raw start", "ours px", "raw exec", "raw px", "ours exec",
            "ours stop", "raw stop",
        )
    }  # fmt: skip
    for _ in range(reps):
        t = time.perf_counter()
        raw = ipp.Cluster(engines="mpi", n=2, log_level=40)
        rc = raw.start_and_connect_sync()
        m["raw start"].append(time.perf_counter() - t)
        dv = rc[:]
        dv.block = True
        m["raw exec"].append(_median_call(lambda dv=dv: dv.execute("pass", block=True)))
        shell.magics_manager.register(ParallelMagics(shell, dv))  # ipyparallel's own %%px
        m["raw px"].append(_median_call(lambda: shell.run_cell_magic("px", "", "pass")))
        rc.close()
        t = time.perf_counter()
        raw.stop_cluster_sync()
        m["raw stop"].append(time.perf_counter() - t)

        t = time.perf_counter()
        cluster = MLXCluster(n=2).start(activate=True)
        m["ours start"].append(time.perf_counter() - t)
        m["ours px"].append(_median_call(lambda: shell.run_cell_magic("px", "", "pass")))
        view = cluster.view
        m["ours exec"].append(_median_call(lambda v=view: v.execute("pass", block=True)))
        t = time.perf_counter()
        cluster.stop()
        m["ours stop"].append(time.perf_counter() - t)
    ms = {k: [x * 1e3 for x in v] for k, v in m.items()}
    return [
        compare(
            "start to ready, 2 local ranks",
            m["ours start"],
            m["raw start"],
            "s",
            "<= 0.60x",
            "ipp.Cluster(engines='mpi', n=2).start_and_connect_sync()",
        ),
        compare(
            "stop, 2 local ranks (ours also checks every process is gone)",
            m["ours stop"],
            m["raw stop"],
            "s",
            "report",
            "ipp.Cluster.stop_cluster_sync()",
        ),
        compare(
            "%%px pass round trip",
            ms["ours px"],
            ms["raw exec"],
            "ms",
            "<= 1.10x",
            "dv.execute('pass', block=True)",
        ),
        compare(
            "%%px pass round trip vs ipyparallel's own %%px",
            ms["ours px"],
            ms["raw px"],
            "ms",
            "report",
            "%%px pass (ipyparallel's magic, raw cluster)",
        ),
        compare(
            "dv.execute('pass') on our engines",
            ms["ours exec"],
            ms["raw exec"],
            "ms",
            "report",
            "dv.execute('pass', block=True)",
        ),
    ]


SECTIONS: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "startup": bench_startup,
    "rank_import": bench_rank_import,
    "px": bench_px_parity,
    "bandwidth": bench_bandwidth,
    "overhead": bench_overhead,
    "report": bench_report,
    "recovery": bench_recovery,
    "broadcast": bench_broadcast,
    "scaling": bench_scaling,
    "recorder": bench_recorder,
    "links": bench_links,
    "cabling": bench_cabling,
    "cabled": bench_cabled,
    "pipeline": bench_pipeline,
    "lm": bench_lm,
    "sync": bench_sync,
    "network": bench_network,
    "setup": bench_setup,
    "relay": bench_relay,
    "encryption": bench_encryption,
    "keep": bench_keep,
    "farm": bench_farm,
}


def machine() -> dict[str, Any]:
    import mlx.core as mx

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cell(s: dict[str, Any], unit: str) -> str:
    return f"{s['median']:.3g} {unit} ({s['min']:.3g}..{s['max']:.3g})"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, MLX {m['mlx']} "
        f"({m['device']}); {m['date']}.",
        "",
        "| measure | ours (median, min..max) | baseline (median, min..max) | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["figures"]:
        o, b, u = r["ours"], r["baseline"], r["unit"]
        lines.append(
            f"| {r['name']} | {_cell(o, u)} | {_cell(b, u)} {r['baseline_name']} "
            f"| {r['ratio']:.2f}x | {r['target']} |"
        )
    return "\n".join(lines) + "\n"


_TARGET = re.compile(
    r"^\s*(?P<op><=|>=|<|>)\s*(?P<value>[\d.]+)\s*(?P<unit>x|%|us|ms|s)?"
    r"|^\s*(?P<lo>[\d.]+)\s*(?:x\s*)?(?:\.\.|-|to)\s*(?P<hi>[\d.]+)\s*x?"
)


def missed(fig: dict[str, Any]) -> str | None:
    """Why a figure misses its target (None when it meets it or only reports). ``<= 1.02x``
    and ``0.9..1.1x`` judge the ratio; a target with a unit judges our median (absolute)."""
    m = _TARGET.search(fig["target"])
    if m is None:
        return None
    if m.group("lo"):
        lo, hi = float(m.group("lo")), float(m.group("hi"))
        ok = lo <= fig["ratio"] <= hi
        return None if ok else f"ratio {fig['ratio']:.2f}x outside {lo:g}..{hi:g}x"
    value, op, unit = float(m.group("value")), m.group("op"), m.group("unit") or "x"
    got = fig["ratio"] if unit == "x" else fig["ours"]["median"]
    ok = {"<=": got <= value, ">=": got >= value, "<": got < value, ">": got > value}[op]
    shown = f"{got:.2f}x" if unit == "x" else f"{got:.3g} {fig['unit']}"
    return None if ok else f"{shown}, target {fig['target']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--only", default="", help="comma-separated sections: " + ",".join(SECTIONS)
    )
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    reps = args.reps or (2 if args.quick else 3)
    out = HERE / "results.json"
    previous = json.loads(out.read_text()) if out.exists() else {"figures": []}
    figures = [f for f in previous.get("figures", []) if f.get("section") not in chosen]
    benchlib.setup()
    for section in chosen:
        print(f"== {section} ({reps} runs)", flush=True)
        where = machine()  # each section says where and when it was measured
        for fig in SECTIONS[section](reps):
            fig["section"] = section
            fig["machine"] = where
            figures.append(fig)
            print(
                f"{fig['name']}: ours {fig['ours']['median']:.4g} {fig['unit']}, baseline "
                f"{fig['baseline']['median']:.4g} {fig['unit']}, ratio {fig['ratio']:.2f}x "
                f"(target {fig['target']})",
                flush=True,
            )
    order = list(SECTIONS)
    figures.sort(key=lambda f: order.index(f["section"]) if f["section"] in order else 99)
    results = {"machine": machine(), "figures": figures}
    out.write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    print(markdown(results))
    misses = [(f["name"], why) for f in figures if f["section"] in chosen and (why := missed(f))]
    for name, why in misses:
        print(f"MISSED: {name}: {why}", file=sys.stderr)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
