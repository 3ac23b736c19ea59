"""A kept cluster on three virtual Macs: what its ranks hold (a 200 MB array, an mlx-lm model)
survives the notebook's kernel restart and is shared with a second notebook; its runtime may
run on one of the Macs (``--runtime-on``), reached over ssh only; killed there, it leaves
nothing on any host."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kernels import Notebook, stop_our_kept_clusters

from conftest import our_processes, vhost_pids, virtual_macs, wait_no_processes

pytestmark = [pytest.mark.multihost, pytest.mark.kernel]


@pytest.fixture(scope="module")
def macs() -> Iterator[Any]:
    with virtual_macs(3, "10.97.1.0/24", "kepk") as vc:
        yield vc


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_lm")
    from mlx_cluster_magic.rank import lm

    return lm.write_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama", seed=0)


def nothing_left(macs: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while our_processes(vhost_pids(macs)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert our_processes(vhost_pids(macs)) == []
    assert wait_no_processes(5) == []


@pytest.fixture
def notebooks(macs: Any) -> Iterator[list[Notebook]]:
    opened: list[Notebook] = []
    try:
        yield opened
    finally:
        for nb in opened:
            nb.close()
        stop_our_kept_clusters(macs.rsh_agent)
        nothing_left(macs)


LOAD = """%%px
import os
import numpy as np
from mlx_lm import load, generate
pid = os.getpid()
big = np.full(25 * 2**20, world.rank() + 1.5)  # 200 MB a rank
model, tokenizer = load({llama!r})
said = generate(model, tokenizer, "the quick cat", max_tokens=12)
"""


def start_line(macs: Any, tmp_path: Path, extra: str = "") -> str:
    hostfile = macs.hostfile(tmp_path / "hosts.json")
    return (f"%load_ext mlx_cluster_magic\nc = %mlx_cluster start --hostfile {hostfile} "
            f"--ssh '{macs.rsh_agent}' --timeout 60 --keep {extra}").rstrip()  # fmt: skip


def kept_id(out: str) -> str:
    found = re.search(r"kept cluster ([0-9a-f]{6}) \(", out)
    assert found, out
    return found.group(1)


def test_the_ranks_keep_an_array_and_a_model_through_a_restart_and_a_second_notebook(
    notebooks: list[Notebook], macs: Any, llama: Path, tmp_path: Path
) -> None:
    nb = Notebook()
    notebooks.append(nb)
    cluster_id = kept_id(nb.ok(start_line(macs, tmp_path)))
    nb.ok(LOAD.format(llama=str(llama)), timeout=300)
    pids = nb.value("c.view['pid']")
    said = nb.value("c.view['said']")
    assert len(set(said)) == 1 and said[0]  # every rank generated the same text

    nb.restart()
    out = nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster attach")
    assert f"attached to kept cluster {cluster_id}: 3 ranks on 3 hosts, running" in out
    assert nb.value("c.view['pid']") == pids
    assert nb.value("[r['host'] for r in c.ranks]") == ["mac1", "mac2", "mac3"]
    again = nb.value("c.view.apply_sync(lambda: generate(model, tokenizer, 'the quick cat', "
                     "max_tokens=12))")  # fmt: skip
    assert again == said
    assert nb.value("c.view.apply_sync(lambda: (big.nbytes, float(big[0])))") == [
        [209715200, 1.5], [209715200, 2.5], [209715200, 3.5]
    ]
    rows = nb.value("[(n['host'], n['state']) for n in c.nodes()]")
    assert [h for h, _ in rows] == ["mac1", "mac2", "mac3"] and all(s == "idle" for _, s in rows)

    other = Notebook()
    notebooks.append(other)
    other.ok(f"%load_ext mlx_cluster_magic\nc = %mlx_cluster attach {cluster_id}")
    out = other.ok("%%px\nprint(mx.distributed.all_sum(mx.array([float(big[0])])).item())")
    assert out.count("7.5") == 3, out
    assert other.value("len(c.history())") >= 2  # the first notebook's cells too

    out = other.ok("%mlx_cluster stop")
    assert f"kept cluster {cluster_id}, for every notebook attached" in out
    nothing_left(macs)
    time.sleep(1.0)
    status, out = nb.run("%%px\n1")
    assert status == "error" and "stopped from another notebook" in out


def test_a_runtime_on_a_mac_is_reached_over_ssh_and_killed_there_leaves_nothing(
    notebooks: list[Notebook], macs: Any, tmp_path: Path
) -> None:
    nb = Notebook()
    notebooks.append(nb)
    out = nb.ok(start_line(macs, tmp_path, "--runtime-on mac1"))
    cluster_id = kept_id(out)
    assert "(its runtime on mac1)" in out
    nb.ok("%%px\nkept = world.rank() * 11")
    # the runtime runs in mac1's namespace, its channel on mac1's loopback: only ssh reaches it
    shown = macs.ssh("mac1", f"cat ~/.mlx-cluster/runtimes/{cluster_id}/record.json")
    record = json.loads(shown.stdout)
    assert record["host"] == "mac1" and record["channel"].startswith("tcp://127.0.0.1:")
    assert record["pid"] in vhost_pids(macs)
    nb.restart(now=True)
    nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster attach")
    assert nb.value("c.view['kept']") == [0, 11, 22]
    listed = nb.ok("%mlx_cluster list")
    assert re.search(rf"{cluster_id}\s+mac1,mac2,mac3\s+3\s+mac1\s", listed), listed

    macs.ssh("mac1", f"kill -9 {record['pid']}")
    nothing_left(macs, timeout=30)
    listed = nb.ok("%mlx_cluster list")
    assert f"cluster {cluster_id} (mac1, mac2, mac3) is gone: its runtime (pid {record['pid']} " \
        "on mac1" in listed, listed
    assert "no kept cluster of yours is running" in listed
