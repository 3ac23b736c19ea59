"""A laptop that sleeps far past the grace: the kept cluster's runtime runs on a Mac of the
cluster (``--runtime-on``), the notebook's machine loses its network for five minutes, and a
notebook attaches afterwards to the same engines with what they held."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kernels import Notebook, stop_our_kept_clusters

from conftest import our_processes, vhost_pids, virtual_macs, wait_no_processes

pytestmark = [pytest.mark.multihost, pytest.mark.kernel, pytest.mark.drops]

if shutil.which("iptables") is None:
    pytest.skip("the drop tests need iptables (Debian package iptables)", allow_module_level=True)

#: Five minutes: five times the grace, far past every timeout of ipyparallel and Open MPI.
AWAY_S = 300


@pytest.fixture(scope="module")
def macs() -> Iterator[Any]:
    with virtual_macs(3, "10.97.2.0/24", "kepd") as vc:
        yield vc


def test_the_notebooks_machine_away_for_five_minutes_loses_nothing(
    macs: Any, tmp_path: Path
) -> None:
    hostfile = macs.hostfile(tmp_path / "hosts.json")
    nb = Notebook()
    try:
        out = nb.ok(
            f"%load_ext mlx_cluster_magic\nc = %mlx_cluster start --hostfile {hostfile} "
            f"--ssh '{macs.rsh_agent}' --timeout 60 --runtime-on mac1"
        )
        assert "(its runtime on mac1)" in out
        nb.ok("%%px\nimport os\npid = os.getpid()\nheld = [world.rank()] * 1000")
        pids = nb.value("c.view['pid']")
        macs.drop_head()
        try:
            time.sleep(AWAY_S)
            # meanwhile the notebook's side hears nothing; it never declares the cluster dead
            assert nb.value("c.state") == "running"
        finally:
            macs.drop_head(undo=True)
        nb.restart(now=True)
        out = nb.ok("%load_ext mlx_cluster_magic\nc = %mlx_cluster attach")
        assert "3 ranks on 3 hosts, running" in out
        assert nb.value("c.view['pid']") == pids
        assert nb.value("c.view.apply_sync(lambda: sum(held))") == [0, 1000, 2000]
        out = nb.ok("%%px\nprint(mx.distributed.all_sum(mx.array([1.0])).item())")
        assert out.count("3.0") == 3, out
        nb.ok("%mlx_cluster stop")
    finally:
        nb.close()
        stop_our_kept_clusters(macs.rsh_agent)
    deadline = time.monotonic() + 30
    while our_processes(vhost_pids(macs)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert our_processes(vhost_pids(macs)) == []
    assert wait_no_processes(5) == []
