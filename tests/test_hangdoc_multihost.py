"""The hang doctor across two virtual Macs over ssh, with the mpi and the ring backend: ``why``
names the late rank and line (stacks fetched over ssh), and checked collectives fail the cell
and leave the cluster running."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hangdoc
import pytest
from ipyparallel import error

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.observe import hang_verdict as why
from mlx_cluster_magic.observe import stack_capture as stacks

from conftest import our_processes, vhost_pids, virtual_macs

pytestmark = pytest.mark.multihost

TIMEOUT = 3.0


@pytest.fixture(scope="module")
def macs():
    with virtual_macs(2, "10.213.11.0/24", "mchd") as vc:
        yield vc


def _healthy(cluster: MLXCluster) -> None:
    cluster.view.execute("_ok = mx.distributed.all_sum(mx.ones(2) * (world.rank() + 1)).tolist()")
    assert cluster.view["_ok"] == [[3.0, 3.0], [3.0, 3.0]]


def _report(cluster: MLXCluster, where: Path, ssh: str) -> why.WhyReport:
    time.sleep(1.5)
    snaps = hangdoc.snapshots(where, 2)
    targets: list[tuple[int, str, str | None] | None] = []
    for rank, s in enumerate(snaps):
        assert s is not None
        targets.append((int(s["pid"]), str(s["stack_file"]), cluster.placement.ranks[rank].ssh))
    dumps = stacks.capture_all(targets, ssh=ssh)
    return why.analyze(snaps, dumps, [r["host"] for r in cluster.ranks])


def _errors(ar: Any) -> dict[int, tuple[str, str]]:
    ar.wait(60)
    assert ar.ready()
    try:
        ar.get()
    except error.CompositeError as e:
        return {info["engine_id"]: (name, str(value)) for name, value, _tb, info in e.elist}
    return {}


@pytest.mark.parametrize("backend", ["mpi", "ring"])
def test_why_and_checks_across_hosts(macs, tmp_path: Path, backend: str) -> None:
    hostfile = macs.hostfile(tmp_path / "hosts.json")
    where = tmp_path / "snaps"
    where.mkdir()
    cluster = MLXCluster(
        hostfile=hostfile,
        backend=backend,
        ssh=macs.rsh_agent,
        timeout=60,
        live_status=False,
        ring_port=31500,
    )
    with cluster:
        assert [r["host"] for r in cluster.ranks] == ["mac1", "mac2"]
        hangdoc.setup(cluster.view, where)
        cluster.view.execute("mx.eval(mx.distributed.all_sum(mx.ones(4)))")

        # why: rank 1 (mac2) parked in a sleep loop while rank 0 waits in all_sum.
        g = hangdoc.gate(where, "sleep")
        cell = hangdoc.late_rank_cell(g)
        ar = cluster.view.execute(cell, block=False)
        try:
            report = _report(cluster, where, macs.rsh_agent)
            assert report.verdict.startswith(
                "rank 1 is behind: rank 0 waits in all_sum #2 (cell line 3); rank 1 issued 1 "
                "collective and is in time.sleep (cell line "
            ), report.verdict
            assert report.ranks[0].host == "mac1"
            assert report.ranks[0].stack and report.ranks[0].stack[0].where == "cell line 3"
            assert any(f.func == "_hd_gate" for f in report.ranks[1].stack)
        finally:
            Path(g).touch()
            ar.get(timeout=30)
        _healthy(cluster)

        # Checked: a skipped collective and a mismatch each fail the cell; the next one runs.
        cluster.view.execute(
            f"from mlx_cluster_magic.rank import collective_checks as _checks; _checks.enable(timeout={TIMEOUT})"
        )
        t = time.monotonic()
        errors = _errors(
            cluster.view.execute(
                "if world.rank() == 0:\n    mx.eval(mx.distributed.all_sum(mx.ones(3)))\n",
                block=False,
            )
        )
        assert time.monotonic() - t < TIMEOUT + 5
        assert set(errors) == {0} and errors[0][0] == "CollectiveTimeout", errors
        assert "rank 1 did not arrive within 3 s" in errors[0][1]
        _healthy(cluster)
        errors = _errors(
            cluster.view.execute(
                "x = mx.distributed.all_sum(mx.ones(4)) if world.rank() == 0 else "
                "mx.distributed.all_gather(mx.ones(4))\nmx.eval(x)\n",
                block=False,
            )
        )
        assert {n for n, _m in errors.values()} == {"CollectiveMismatch"}
        assert (
            "rank 0 all_sum float32[4] (cell line 1); rank 1 all_gather float32[4]"
            in (errors[1][1])
        )
        _healthy(cluster)
    deadline = time.monotonic() + 10
    while our_processes(vhost_pids(macs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not our_processes(vhost_pids(macs))
