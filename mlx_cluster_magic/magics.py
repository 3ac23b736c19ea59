"""``%mlx_cluster``: thin magics that parse arguments and call ``MLXCluster``.

Subcommands: start, stop, restart, status, nodes, gather, doctor, hosts. Misuse and every
``MLXClusterError`` become an IPython ``UsageError``: one line, no traceback.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .cluster import MLXCluster
from .errors import MLXClusterError
from .hosts import BACKENDS


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _hosts_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say where the ranks run, shared by start and doctor."""
    for deco in reversed(
        [
            argument(
                "-n",
                type=int,
                default=None,
                help="ranks: on this machine (default 2), or per host with --hosts/--hostfile",
            ),
            argument(
                "--hosts",
                default=None,
                help="comma-separated ssh host names, e.g. mac1,mac2 (mac1=10.0.1.1 sets the IP)",
            ),
            argument(
                "--hostfile", default=None, help="mlx.launch JSON hostfile or Open MPI hostfile"
            ),
            argument(
                "--python",
                default=None,
                help="python on the hosts (default: this kernel's python path)",
            ),
            argument(
                "--ssh",
                default=None,
                help="ssh command for mpiexec to reach the hosts, e.g. 'ssh -F ~/.ssh/tb'",
            ),
        ]
    ):
        func = deco(func)
    return func


def parse_argstring(magic: Callable[..., Any], line: str) -> argparse.Namespace:
    """Like IPython's, but with shell quoting: ``--ssh 'ssh -F cfg'`` is one value, unquoted."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise UsageError(f"%mlx_cluster: {e} in {line!r}") from None
    return magic.parser.parse_args(words)  # type: ignore[attr-defined]


@magics_class
class MLXClusterMagics(Magics):
    """The ``%mlx_cluster`` line magic; holds the notebook's current cluster."""

    cluster: MLXCluster | None = None

    @line_magic
    def mlx_cluster(self, line: str) -> Any:
        """Start, stop and inspect an MLX cluster. ``%mlx_cluster SUBCOMMAND -h`` for options."""
        sub, _, rest = line.strip().partition(" ")
        handlers: dict[str, Callable[[str], Any]] = {
            "start": self._start,
            "stop": self._stop,
            "restart": self._restart,
            "status": self._status,
            "nodes": self._nodes,
            "gather": self._gather,
            "doctor": self._doctor,
            "hosts": self._hosts,
        }
        if sub not in handlers:
            what = f"unknown subcommand {sub!r}" if sub else "missing subcommand"
            raise UsageError(f"%mlx_cluster: {what}; use one of: {', '.join(handlers)}")
        try:
            return handlers[sub](rest)
        except MLXClusterError as e:
            raise UsageError(str(e)) from None

    def _running(self) -> MLXCluster:
        if self.cluster is None or not self.cluster.running:
            raise MLXClusterError("no cluster is running: start one with %mlx_cluster start -n 2")
        return self.cluster

    @magic_arguments()
    @_hosts_options
    @argument("--backend", choices=BACKENDS, default=None, help="MLX backend (default mpi)")
    @argument("--mpiexec", default=None, help="path to Open MPI's mpiexec")
    @argument("--mpi-lib", default=None, help="path to the libmpi matching --mpiexec")
    @argument("--workdir", default=None, help="working directory of the ranks")
    @argument("--controller-ip", default=None, help="address the hosts reach this machine by")
    @argument("--ring-port", type=int, default=32323, help="first port of the ring backend")
    @argument("--timeout", type=_positive_float, default=60.0, help="seconds to wait for ranks")
    @argument("--no-status", action="store_true", help="do not run the live status view")
    def _start(self, line: str) -> MLXCluster:
        """Start a cluster and point %%px at all its ranks."""
        args = parse_argstring(self._start, line)
        if self.cluster is not None and self.cluster.running:
            raise MLXClusterError(
                f"a cluster is already running ({self.cluster.n} ranks): use %mlx_cluster "
                "restart, or %mlx_cluster stop first"
            )
        cluster = MLXCluster(
            args.n,
            hosts=args.hosts,
            hostfile=args.hostfile,
            backend=args.backend,
            mpiexec=args.mpiexec,
            mpi_lib=args.mpi_lib,
            python=args.python,
            workdir=args.workdir,
            controller_ip=args.controller_ip,
            ring_port=args.ring_port,
            ssh=args.ssh,
            timeout=args.timeout,
            live_status=not args.no_status,
        )
        cluster.start(activate=True)
        self.cluster = cluster
        return cluster

    @magic_arguments()
    def _stop(self, line: str) -> None:
        """Stop the cluster: no engine, controller or mpiexec is left running."""
        parse_argstring(self._stop, line)
        self._running().stop()

    @magic_arguments()
    def _restart(self, line: str) -> MLXCluster:
        """Stop the cluster (even a broken one) and start a fresh one of the same shape."""
        parse_argstring(self._restart, line)
        if self.cluster is None:
            raise MLXClusterError("no cluster to restart: start one with %mlx_cluster start -n 2")
        return self.cluster.restart(activate=True)

    @magic_arguments()
    def _status(self, line: str) -> Any:
        """Show the live status of every rank."""
        parse_argstring(self._status, line)
        return self._running().status_view()

    @magic_arguments()
    def _nodes(self, line: str) -> Any:
        """Per-rank status records, as data."""
        parse_argstring(self._nodes, line)
        return self._running().nodes()

    @magic_arguments()
    @argument("names", nargs="+", help="variable names to fetch from every rank")
    def _gather(self, line: str) -> Any:
        """Fetch variables from every rank and show whether they agree."""
        args = parse_argstring(self._gather, line)
        cluster = self._running()
        results = [cluster.gather(name) for name in args.names]
        return results[0] if len(results) == 1 else results

    @magic_arguments()
    @_hosts_options
    @argument("--backend", choices=BACKENDS, default=None, help="also check this MLX backend")
    @argument("--timeout", type=_positive_float, default=10.0, help="seconds per check")
    def _doctor(self, line: str) -> Any:
        """Check every host is ready: ssh, python, versions, mpiexec, IP, MTU."""
        args = parse_argstring(self._doctor, line)
        from .doctor import run_doctor

        if args.hosts is None and args.hostfile is None and self.cluster is not None:
            cluster = self.cluster
            return run_doctor(
                cluster.placement,
                python=args.python or cluster.python,
                ssh=args.ssh or cluster.ssh,
                timeout=args.timeout,
                backend=args.backend or cluster.backend,
            )
        placement = MLXCluster.placement_from(args.n, hosts=args.hosts, hostfile=args.hostfile)
        return run_doctor(
            placement,
            python=args.python,
            ssh=args.ssh,
            timeout=args.timeout,
            backend=args.backend or placement.backend,
        )

    @magic_arguments()
    @argument("--discover", action="store_true", help="list this Mac's Thunderbolt interfaces")
    @argument("--write", default=None, metavar="FILE", help="append this Mac to a JSON hostfile")
    def _hosts(self, line: str) -> Any:
        """Thunderbolt discovery on macOS: interfaces, IPs, and a hostfile entry."""
        args = parse_argstring(self._hosts, line)
        from . import macos

        if not args.discover and not args.write:
            raise MLXClusterError("%mlx_cluster hosts: give --discover or --write FILE")
        return macos.discover_command(write=args.write)
