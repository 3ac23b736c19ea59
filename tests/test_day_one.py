"""Day-one refusals that must name their real cause: a host name that resolves to nothing, and
MPI's traffic sent over the management network because every cable has its own subnet."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic import MLXCluster, MLXClusterError

from conftest import cabled_macs, no_leaks_on, release_shell

RING_PORT = 32496


def test_a_host_name_that_does_not_resolve_is_named_with_the_fix() -> None:
    t0 = time.monotonic()
    with pytest.raises(MLXClusterError) as e:
        MLXCluster(hosts="nosuchhost").start()
    msg = str(e.value)
    assert time.monotonic() - t0 < 10
    assert "\n" not in msg
    assert msg.startswith("nosuchhost: the name does not resolve"), msg
    assert "~/.ssh/config" in msg and "/etc/hosts" in msg and "nosuchhost.local" in msg


def test_setup_without_hosts_or_cluster_says_what_to_give() -> None:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mlx_cluster_magic")
    try:
        if ip.magics_manager.registry["MLXClusterMagics"].cluster is not None:
            pytest.skip("a cluster of an earlier test is current")
        with pytest.raises(UsageError, match=r"^setup: give --hosts or --hostfile"):
            ip.run_line_magic("mlx_cluster", "setup")
    finally:
        ip.run_line_magic("unload_ext", "mlx_cluster_magic")


@pytest.fixture(scope="module")
def split_star() -> Iterator[Any]:
    """mac1 cabled to two workers, the bridge off: one /30 per cable."""
    with cabled_macs(3, "star", "10.241.4.0/24", "10.242.4.0/24", "stps") as vc:
        yield vc


@pytest.mark.multihost
def test_mpi_over_a_split_star_warns_that_it_crosses_the_management_network(
    split_star: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mlx_cluster_magic")
    hostfile = split_star.cabled_hostfile(tmp_path / "star.json", "mpi")
    line = split_star.start_line(hostfile, "--no-live-status", "--backend", "mpi", ring_port=RING_PORT)
    try:
        cluster = ip.run_line_magic("mlx_cluster", line)
        assert isinstance(cluster, MLXCluster) and cluster.running
        out = capsys.readouterr().out
        warning = [ln for ln in out.splitlines() if ln.startswith("warning: MPI's traffic")]
        assert len(warning) == 1, out
        assert "10.241.4.0/24" in warning[0] and "Thunderbolt Bridge" in warning[0]
        ip.run_line_magic("mlx_cluster", "stop")
        # The ring backend keeps MLX's traffic on the cables: no warning there.
        with pytest.raises(UsageError):  # a split star has no worker-to-worker path for ring
            ip.run_line_magic("mlx_cluster", line.replace("--backend mpi", "--backend ring"))
        assert "warning: MPI" not in capsys.readouterr().out
    finally:
        release_shell(ip)
        no_leaks_on(split_star)
