"""``%mlx_cluster``: thin magics that parse arguments and call ``MLXCluster``.

Each subcommand has its own argparse parser, so ``SUB -h``/``--help`` print its options with
their defaults. ``%mlx_cluster -h`` (or ``help``) is a one-screen overview, one line per
subcommand; ``%mlx_cluster help all`` and ``%mlx_cluster?`` show every option. Misuse and every
``MLXClusterError`` become an IPython ``UsageError``: one line, no traceback.
"""

from __future__ import annotations

import argparse
import html
import shlex
from collections.abc import Callable
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from ..errors import MLXClusterError
from ..fabric.placement import BACKENDS
from ..launch.mpi_job import DEFAULT_RING_PORT
from ..launch.spec import COLLECTIVE_TIMEOUT_S, GRACE_S, START_TIMEOUT_S
from ..runtime.records import span
from .life_cycle import MLXCluster, current, set_current

HELP_WIDTH = 100  # fixed, so the help reads the same in a terminal, a notebook and `?`
START_HINT = "start one with %mlx_cluster start -n 2"


# --------------------------------------------------------------------------- argument parsing
class _HelpShown(Exception):
    """``-h`` printed the help: the subcommand does nothing else."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with each option's default, where it has a concrete one."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=HELP_WIDTH, max_help_position=34)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not argparse.SUPPRESS
            and not isinstance(default, bool)
            and default != []
            and "%(default)" not in text
        ):
            text += (
                " (default: %(default)g)"
                if isinstance(default, float)
                else " (default: %(default)s)"
            )
        return text


class _Parser(argparse.ArgumentParser):
    """An argparse parser that raises ``UsageError`` instead of exiting the kernel."""

    def __init__(self, name: str, description: str) -> None:
        super().__init__(
            prog=f"%mlx_cluster {name}",
            description=description,
            formatter_class=_Formatter,
        )

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; {self.prog} -h lists the options")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise UsageError(f"{self.prog}: {(message or 'failed').strip()}")
        raise _HelpShown


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``: seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1.0)
    try:
        value = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (90s, 30m, 12h)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _add_hosts_options(p: argparse.ArgumentParser) -> None:
    """The options that say where the ranks run, shared by start and doctor."""
    p.add_argument(
        "-n",
        type=int,
        default=None,
        help="ranks: on this machine (default 2), or per host with --hosts/--hostfile "
        "(default: the hostfile's slots, else 1)",
    )
    p.add_argument(
        "--hosts",
        default=None,
        help="comma-separated ssh host names, e.g. mac1,mac2 (mac1=10.0.1.1 sets the IP)",
    )
    p.add_argument(
        "--hostfile",
        default=None,
        help="mlx.launch / mlx.distributed_config JSON hostfile, or an Open MPI hostfile",
    )
    p.add_argument(
        "--python", default=None, help="python on the hosts (default: this kernel's python path)"
    )
    p.add_argument(
        "--ssh",
        default=None,
        help="ssh command for mpiexec to reach the hosts, e.g. 'ssh -F ~/.ssh/tb' (default: ssh)",
    )


#: Adds a subcommand's parser (name, description) and returns it.
_Sub = Callable[[str, str], _Parser]


def _build_parsers() -> dict[str, _Parser]:
    """One parser per subcommand, in the order the help lists them."""
    parsers: dict[str, _Parser] = {}

    def sub(name: str, description: str) -> _Parser:
        parsers[name] = _Parser(name, description)
        return parsers[name]

    for add in (_life_cycle_parsers, _data_parsers, _diagnosis_parsers, _preparation_parsers):
        add(sub)
    return parsers


def _add_start_options(p: _Parser) -> None:
    """Every option of ``start`` (``MLXCluster(...)``'s, by the same names)."""
    _add_hosts_options(p)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="MLX backend (default: the hostfile's backend, else mpi)",
    )
    p.add_argument("--mpiexec", default=None, help="path to Open MPI's mpiexec (default: found)")
    p.add_argument(
        "--mpi-lib", default=None, help="path to the libmpi matching --mpiexec (default: found)"
    )
    p.add_argument(
        "--workdir", default=None, help="working directory of the ranks (default: unchanged)"
    )
    p.add_argument(
        "--controller-ip",
        default=None,
        help="address the hosts reach this machine by (default: derived from the hostfile)",
    )
    p.add_argument(
        "--ring-port", type=int, default=DEFAULT_RING_PORT, help="first port of the ring backend"
    )
    p.add_argument(
        "--connections-per-ip",
        type=_positive_int,
        default=1,
        metavar="N",
        help="ring backend: connections (ports) per IP, as mlx.launch --connections-per-ip",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=START_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the ranks",
    )
    p.add_argument(
        "--grace",
        type=_positive_float,
        default=GRACE_S,
        metavar="S",
        help="seconds of silence from every host (the notebook's own network down) the cluster "
        "waits out before it counts itself lost (default %(default)g)",
    )
    p.add_argument(
        "--no-live-status",
        dest="live_status",
        action="store_false",
        help="no live status: no sidecar on the ranks, no status view",
    )
    p.add_argument(
        "--check-collectives",
        action="store_true",
        help="compare every collective across the ranks before MLX runs it: a mismatch fails "
        "the cell instead of hanging the cluster (switch later with %%mlx_cluster checks on|off)",
    )
    p.add_argument(
        "--collective-timeout",
        type=_positive_float,
        default=COLLECTIVE_TIMEOUT_S,
        metavar="S",
        help="with checks on: seconds to wait for every rank to reach a collective",
    )
    p.add_argument(
        "--verbose", action="store_true", help="MLX's own verbose logging of the backend"
    )
    _add_keep_options(p)
    _add_farm_options(p)


def _add_keep_options(p: _Parser) -> None:
    """A cluster that outlives the kernel: ``--keep``, where its runtime runs, when it ends."""
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the cluster when this kernel restarts or ends: it runs in a runtime of its "
        "own; %%mlx_cluster attach takes it up from any notebook of yours, stop ends it",
    )
    p.add_argument(
        "--runtime-on",
        default=None,
        metavar="HOST",
        help="run the kept cluster's runtime on this Mac of the cluster (implies --keep): the "
        "notebook's machine may sleep or leave; it attaches again over ssh",
    )
    p.add_argument(
        "--idle-timeout",
        type=_duration,
        default=None,
        metavar="T",
        help="end a kept cluster no notebook used for this long: 90s, 30m, 12h (default: 12h)",
    )


def _add_farm_options(p: _Parser) -> None:
    """A farm's options: independent engines for cluster.map, Macs lent only while idle."""
    p.add_argument(
        "--farm",
        action="store_true",
        help="a farm: independent engines (-n per host, each with a group of one) for "
        "cluster.map(fn, items); Macs may come and go (%%mlx_cluster add / remove)",
    )
    p.add_argument(
        "--when-idle",
        default=None,
        metavar="TIME",
        help="farm: a Mac takes tasks only while its owner has not touched keyboard or mouse "
        "for TIME (5m, 90s; macOS's HID idle time)",
    )
    p.add_argument(
        "--yield-policy",
        "--yield",
        choices=("finish", "requeue"),
        default="finish",
        help="farm with --when-idle: when the owner comes back, the Mac's task finishes there "
        "or is handed back to run elsewhere",
    )


def _life_cycle_parsers(sub: _Sub) -> None:
    """start, stop, restart, status, nodes."""
    p = sub(
        "start",
        "Start a cluster and point %%px at all its ranks; returns the MLXCluster.",
    )
    _add_start_options(p)

    p = sub("stop", "Stop the cluster: no engine, controller or mpiexec is left running.")

    p = sub(
        "restart",
        "Stop the cluster (even a broken one) and start a fresh one of the same shape.",
    )
    p.add_argument(
        "--replay",
        action="store_true",
        help="then re-run the %%%%px cells that completed on every rank (%%mlx_cluster "
        "history), stopping at the first failure",
    )
    p.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="HOST",
        help="start on the other hosts only (a Mac that is gone), by its name in the hostfile "
        "or the hostname the views show; repeat for several",
    )

    p = sub("status", "Show the live status of every rank.")
    p.add_argument(
        "--side",
        action="store_true",
        help="in a side panel that stays in sight (JupyterLab, Jupyter Notebook 7)",
    )

    sub("nodes", "Per-rank status records, as data.")

    p = sub(
        "attach",
        "Take up a kept cluster (after a kernel restart, or from another notebook of yours).",
    )
    p.add_argument(
        "id", nargs="?", default=None, help="its id, as list shows it (default: the only one)"
    )
    sub("list", "Your running kept clusters: id, hosts, ranks, runtime, started, notebooks, idle.")
    sub("detach", "Let go of a kept cluster in this notebook; it runs on for the others.")

    p = sub("add", "A Mac joins the running farm and takes tasks at once.")
    p.add_argument("host", help="the Mac's ssh name (a hostfile's name, or user@host)")
    p.add_argument(
        "-n", type=_positive_int, default=None, help="engines on it (default: as the first Mac)"
    )
    p = sub("remove", "A Mac leaves the running farm; its task runs elsewhere.")
    p.add_argument("host", help="the Mac's name in the farm (as %%mlx_cluster status shows)")
    p.add_argument(
        "--drain", action="store_true", help="let it finish the task it runs, then leave"
    )


def _data_parsers(sub: _Sub) -> None:
    """gather, sync."""
    p = sub("gather", "Fetch variables from every rank and show whether the ranks agree.")
    p.add_argument("names", nargs="+", help="variable names to fetch")

    p = sub("sync", "Copy a file or tree to every host, over the cables: only what is missing.")
    p.add_argument("path", help="file or directory on this machine")
    p.add_argument(
        "--to", default=None, metavar="DEST", help="where on every host (default: the same path)"
    )
    p.add_argument(
        "--shards",
        choices=("pipeline", "tensor"),
        default=None,
        help="an mlx-lm model: pipeline sends each host only the weight files its ranks load; "
        "tensor sends every file",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare checksums computed on each host, not only size and modification time",
    )


def _diagnosis_parsers(sub: _Sub) -> None:
    """why, checks, history, links, metrics."""
    p = sub(
        "why",
        "Why a cell hangs: where every rank is (collective, line, stack) and a one-line verdict.",
    )
    p.add_argument(
        "--no-stacks", action="store_true", help="leave out the ranks' Python stacks (quicker)"
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="seconds to wait for the ranks' stacks",
    )

    p = sub("checks", "Switch the cross-rank collective checks of a running cluster on or off.")
    p.add_argument("state", choices=("on", "off"), help="on or off")

    sub("history", "The %%px cells that completed since start, in that order (what --replay runs).")

    p = sub("links", "Measure every link between hosts: latency, bandwidth, route; flag slow ones.")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="time budget for measuring every pair of hosts",
    )
    p.add_argument(
        "--seconds",
        type=_positive_float,
        default=None,
        metavar="S",
        help="how long each bandwidth test streams (default: the time budget shared out over "
        "the pairs)",
    )

    sub("metrics", "The values ranks recorded with report(...), as records or a DataFrame.")


def _preparation_parsers(sub: _Sub) -> None:
    """plan, doctor, hosts, help."""
    p = sub(
        "plan",
        "Plan a model's pipeline split: each rank's layers in proportion to its memory.",
    )
    p.add_argument("model_dir", help="folder of an mlx-lm model (config.json, safetensors)")
    p.add_argument(
        "--memory",
        default=None,
        metavar="HOST=SIZE,...",
        help="cap the memory of a host (as the hostfile names it; shared by its ranks) or of "
        "a rank (rank1=8GB); default: what each rank reports",
    )
    p.add_argument(
        "--headroom",
        default="10%",
        help="left free on each rank for KV cache and activations: a share of its memory, or "
        "a size per rank (4GB)",
    )

    p = sub(
        "doctor",
        "Check every host is ready: ssh, python, versions, mpiexec, IP, MTU, route, peers.",
    )
    _add_hosts_options(p)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="also check this MLX backend (default: the cluster's or the hostfile's)",
    )
    p.add_argument(
        "--timeout", type=_positive_float, default=10.0, metavar="S", help="seconds per check"
    )

    p = sub(
        "setup",
        "Copy this kernel's Python environment to every host, same path: only what differs.",
    )
    p.add_argument(
        "--hosts",
        default=None,
        help="comma-separated ssh host names, e.g. mac1,mac2 (default: the cluster's hosts)",
    )
    p.add_argument(
        "--hostfile",
        default=None,
        help="mlx.launch / mlx.distributed_config JSON hostfile, or an Open MPI hostfile",
    )
    p.add_argument(
        "--ssh", default=None, help="ssh command to reach the hosts, e.g. 'ssh -F ~/.ssh/tb'"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only show each host's python and which distributions match; change nothing",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also compare every file's sha256 (the distributions' RECORD), not only size "
        "and mtime",
    )

    p = sub("hosts", "Thunderbolt discovery on macOS: interfaces, IPs, and a hostfile entry.")
    p.add_argument("--discover", action="store_true", help="list this Mac's Thunderbolt interfaces")
    p.add_argument(
        "--write", default=None, metavar="FILE", help="append this Mac to a JSON hostfile"
    )

    _network_parser(sub)

    p = sub("help", "This overview; help SUBCOMMAND: its options; help all: every option.")
    p.add_argument("subcommand", nargs="?", default=None, help="the subcommand to describe, or all")


def _network_parser(sub: _Sub) -> None:
    """network: the Macs' cables, their addresses and the hostfile, over ssh."""
    from ..fabric.network_plan import DEFAULT_POOL, LAYOUTS

    p = sub(
        "network",
        "Every Mac's Thunderbolt cables over ssh; --configure gives them addresses and a hostfile.",
    )
    p.add_argument(
        "--hosts",
        default=None,
        help="comma-separated ssh names, e.g. mac1,mac2,mac3 (default: the cluster's hosts)",
    )
    p.add_argument("--hostfile", default=None, help="a hostfile whose ssh names to read")
    p.add_argument(
        "--configure",
        action="store_true",
        help="apply the plan (with passwordless sudo; otherwise print each Mac's commands)",
    )
    p.add_argument(
        "--undo", action="store_true", help="put back what the last --configure changed"
    )
    p.add_argument(
        "--over",
        choices=("thunderbolt", "lan"),
        default="thunderbolt",
        help="lan: a hostfile on the addresses ssh reaches the Macs by (Ethernet, Wi-Fi)",
    )
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="ring, mesh or star")
    p.add_argument(
        "--subnets",
        default=DEFAULT_POOL,
        metavar="CIDR",
        help="where cable subnets come from; anything a Mac uses is skipped",
    )
    p.add_argument("--write", default=None, metavar="FILE", help="write the hostfile here")
    p.add_argument(
        "--ssh", default=None, help="ssh command to reach the Macs, e.g. 'ssh -F ~/.ssh/tb'"
    )
    p.add_argument(
        "--timeout", type=_positive_float, default=20.0, metavar="S", help="seconds per Mac"
    )


PARSERS = _build_parsers()
SUBCOMMANDS = tuple(PARSERS)


def overview() -> str:
    """The first screen of help: what each subcommand does."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: %mlx_cluster SUBCOMMAND [options]: start, stop and inspect an MLX cluster.",
        "%mlx_cluster SUBCOMMAND -h shows one subcommand's options; %mlx_cluster help all (or",
        "%mlx_cluster?) shows every option of every subcommand. Subcommands:",
    ]
    for name, parser in PARSERS.items():
        lines.append(f"  {name:<{width}}  {parser.description}")
    return "\n".join(lines)


def full_help() -> str:
    """Every subcommand's usage, options and defaults: ``help all`` and ``?`` show this."""
    parts = [overview()]
    for name, parser in PARSERS.items():
        if name != "help":
            parts.append(parser.format_help().rstrip())
    return ("\n\n" + "-" * 40 + "\n").join(parts) + "\n"


def parse(name: str, line: str) -> argparse.Namespace | None:
    """Parse one subcommand's arguments with shell quoting (``--ssh 'ssh -F cfg'`` is one
    value); ``None`` when ``-h`` printed the help instead."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise UsageError(f"%mlx_cluster {name}: {e} in {line!r}") from None
    try:
        return PARSERS[name].parse_args(words)
    except _HelpShown:
        return None


# --------------------------------------------------------------------------- displays
class GatherResults(list):  # type: ignore[type-arg]
    """Several ``GatherResult``: still a list, displayed as each result's own view."""

    def __repr__(self) -> str:
        return "\n".join(repr(r) for r in self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        parts = []
        for r in self:
            render = getattr(r, "_repr_html_", None)
            parts.append(render() if render else f"<pre>{html.escape(repr(r))}</pre>")
        return "<div class='mlx-gather-many'>" + "".join(parts) + "</div>"


class History(list):  # type: ignore[type-arg]
    """The replayable ``%%px`` cells: still a list, displayed as numbered cells."""

    def _lines(self) -> list[str]:
        if not self:
            return ["no %%px cell has completed since the cluster started"]
        lines = []
        for i, entry in enumerate(self, 1):
            targets = getattr(entry, "targets", None)
            where = "every rank" if targets is None else f"ranks {list(targets)}"
            lines.append(f"[{i}] on {where}:")
            lines += ["    " + line for line in str(getattr(entry, "cell", entry)).splitlines()]
        return lines

    def __repr__(self) -> str:
        return "\n".join(self._lines())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def kept_line(cluster: MLXCluster) -> str:
    """What a kept cluster's start says: how to take it up again, and how it ends."""
    where = f"its runtime on {cluster.runtime_on}" if cluster.runtime_on else "its own runtime"
    hours = span(cluster.idle_timeout)
    return (
        f"kept cluster {cluster.cluster_id} ({where}): it outlives this kernel; after a kernel "
        f"restart, or from another notebook: %mlx_cluster attach {cluster.cluster_id}; "
        f"%mlx_cluster stop ends it for every notebook (so does {hours} unused)"
    )


def _farm_line(cluster: MLXCluster) -> str:
    """``mac1 lent, mac2 draining, mac4 lent``."""
    return ", ".join(f"{h['host']} {h['state']}" for h in cluster.farm_hosts())


def _describe(cluster: MLXCluster) -> str:
    """``2 ranks on 1 host`` / ``6 ranks on 3 hosts``."""
    hosts = 1 if cluster.placement.is_local else len(cluster.placement.hosts)
    ranks = f"{cluster.n} rank{'s' if cluster.n != 1 else ''}"
    return f"{ranks} on {hosts} host{'s' if hosts != 1 else ''}"


# --------------------------------------------------------------------------- the magic
@magics_class
class MLXClusterMagics(Magics):
    """The ``%mlx_cluster`` line magic, on the notebook's current cluster (the one ``%%px``
    runs on: ``life_cycle.current()``)."""

    @property
    def cluster(self) -> MLXCluster | None:
        return current()

    @cluster.setter
    def cluster(self, cluster: MLXCluster | None) -> None:
        set_current(cluster)

    @line_magic
    def mlx_cluster(self, line: str) -> Any:
        # The docstring is the full help; it is set below, from the parsers.
        sub, _, rest = line.strip().partition(" ")
        if sub in ("-h", "--help"):
            sub = "help"
        if sub not in PARSERS:
            what = f"unknown subcommand {sub!r}" if sub else "missing subcommand"
            raise UsageError(
                f"%mlx_cluster: {what}; use one of: {', '.join(SUBCOMMANDS)} "
                "(%mlx_cluster -h says what each does)"
            )
        args = parse(sub, rest)
        if args is None:
            return None
        handler: Callable[[argparse.Namespace], Any] = getattr(self, f"_{sub}")
        try:
            return handler(args)
        except MLXClusterError as e:
            raise UsageError(str(e)) from None

    def _running(self) -> MLXCluster:
        if self.cluster is None:
            raise MLXClusterError(f"no cluster is running: {START_HINT}")
        if not self.cluster.running:
            raise MLXClusterError(self.cluster.not_running_message())
        return self.cluster

    def _any(self, what: str) -> MLXCluster:
        """The current cluster, running or not (after an abort its records still count)."""
        if self.cluster is None:
            raise MLXClusterError(f"no cluster {what}: {START_HINT}")
        return self.cluster

    # ------------------------------------------------------------------- subcommands
    def _help(self, args: argparse.Namespace) -> None:
        if args.subcommand is None:
            print(overview())
            return
        if args.subcommand == "all":
            print(full_help(), end="")
            return
        if args.subcommand not in PARSERS:
            raise UsageError(
                f"%mlx_cluster help: unknown subcommand {args.subcommand!r}; use one of: "
                f"{', '.join(SUBCOMMANDS)}, or all"
            )
        PARSERS[args.subcommand].print_help()

    def _start(self, args: argparse.Namespace) -> MLXCluster:
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
            live_status=args.live_status,
            check_collectives=args.check_collectives,
            collective_timeout=args.collective_timeout,
            verbose=args.verbose,
            connections_per_ip=args.connections_per_ip,
            grace=args.grace,
            keep=args.keep,
            runtime_on=args.runtime_on,
            idle_timeout=args.idle_timeout,
            farm=args.farm,
            when_idle=args.when_idle,
            yield_policy=args.yield_policy,
        )
        cluster.start(activate=True)
        self.cluster = cluster
        if cluster.keep:
            print(kept_line(cluster))
        return cluster

    def _attach(self, args: argparse.Namespace) -> MLXCluster:
        current = self.cluster
        if current is not None and current.running and current.cluster_id != args.id:
            raise MLXClusterError(
                f"this notebook runs a cluster already ({current.n} ranks): %mlx_cluster stop "
                "(or detach, for a kept one) first"
            )
        cluster = MLXCluster.attach(args.id, activate=True)
        self.cluster = cluster
        print(
            f"attached to kept cluster {cluster.cluster_id}: {_describe(cluster)}, "
            f"{cluster.state}; %%px on every rank"
        )
        return cluster

    def _list(self, args: argparse.Namespace) -> Any:
        from .attached import KeptClusters

        return KeptClusters.now()

    def _detach(self, args: argparse.Namespace) -> None:
        cluster = self._any("to detach from")
        cluster.detach()
        print(
            f"detached from kept cluster {cluster.cluster_id}: it runs on; "
            f"%mlx_cluster attach {cluster.cluster_id} takes it up again"
        )

    def _add(self, args: argparse.Namespace) -> None:
        cluster = self._running()
        cluster.add(args.host, args.n)
        cluster.activate()  # %%px on every engine of the farm, the new ones too
        print(f"{args.host} joined the farm: {_farm_line(cluster)}")

    def _remove(self, args: argparse.Namespace) -> None:
        cluster = self._running()
        cluster.remove(args.host, drain=args.drain)
        if not args.drain:
            cluster.activate()
        how = "drains: it leaves once its task ends" if args.drain else "left the farm"
        print(f"{args.host} {how}: {_farm_line(cluster)}")

    def _stop(self, args: argparse.Namespace) -> None:
        cluster = self.cluster
        if cluster is None or cluster.state == "stopped":
            print("no MLX cluster is running: nothing to stop")
            return
        kept = cluster.cluster_id if cluster.keep else None
        cluster.stop()  # a broken cluster stops too
        also = f" (kept cluster {kept}, for every notebook attached)" if kept else ""
        print(f"MLX cluster stopped{also}: {_describe(cluster)}, no process left")

    def _restart(self, args: argparse.Namespace) -> MLXCluster:
        cluster = self._any("to restart")
        without = [h for item in args.without for h in item.split(",") if h]
        if args.replay:
            cluster.restart(activate=True, replay=True, without=without)
            cells = len(cluster.history())
            state = f"replayed {cells} cell{'s' if cells != 1 else ''}"
        else:
            cluster.restart(activate=True, without=without)
            state = "fresh state (restart --replay re-runs the completed cells)"
        print(
            f"MLX cluster restarted: {_describe(cluster)}, backend {cluster.backend}, "
            f"%%px on every rank; {state}"
        )
        return cluster

    def _status(self, args: argparse.Namespace) -> Any:
        cluster = self._running()
        if args.side:
            shown = cluster.open_side_panel()
            if isinstance(shown, str):  # where it went, in words
                print(shown)
                return None
            return shown
        return cluster.status_view()

    def _nodes(self, args: argparse.Namespace) -> Any:
        return self._running().nodes()

    def _gather(self, args: argparse.Namespace) -> Any:
        cluster = self._running()
        results = [cluster.gather(name) for name in args.names]
        return results[0] if len(results) == 1 else GatherResults(results)

    def _sync(self, args: argparse.Namespace) -> Any:
        report = self._running().sync(args.path, args.to, shards=args.shards, verify=args.verify)
        if not report.ok:
            failed = [h for h in report.hosts if h.error]
            raise MLXClusterError(
                "sync: "
                + "; ".join(f"{h.host}: {h.error}" for h in failed)
                + "; the other hosts have every file; run the same sync again to resume"
            )
        return report

    def _why(self, args: argparse.Namespace) -> Any:
        return self._any("to examine").why(stacks=not args.no_stacks, timeout=args.timeout)

    def _checks(self, args: argparse.Namespace) -> None:
        on = args.state == "on"
        cluster = self._running()
        cluster.check_collectives(on)
        if on:
            wait = cluster.spec.collective_timeout
            print(
                "collective checks on: a mismatch, or a rank missing for more than "
                f"{wait:g} s, fails the cell and the cluster keeps running"
            )
        else:
            print("collective checks off")

    def _history(self, args: argparse.Namespace) -> Any:
        return History(self._any("yet").history())

    def _links(self, args: argparse.Namespace) -> Any:
        return self._running().links(timeout=args.timeout, seconds=args.seconds)

    def _metrics(self, args: argparse.Namespace) -> Any:
        cluster = self._any("yet")
        records = cluster.metrics()
        if len(records):
            return records
        if not cluster.live_status:
            print("no metrics: live status is off for this cluster (started with --no-live-status)")
        else:
            print(
                "no metrics reported yet: in a %%px cell, report(step=i, loss=loss) records "
                "numbers per rank (elsewhere: from mlx_cluster_magic import report)"
            )
        return None

    def _plan(self, args: argparse.Namespace) -> Any:
        from .pipeline_plan import parse_memory_spec

        memory = parse_memory_spec(args.memory) if args.memory is not None else None
        cluster = self._any("to plan for")
        if not cluster.running and not memory:
            raise MLXClusterError(cluster.not_running_message())
        return cluster.plan_pipeline(args.model_dir, memory=memory, headroom=args.headroom)

    def _doctor(self, args: argparse.Namespace) -> Any:
        from .tools import doctor_hosts

        if args.hosts is None and args.hostfile is None and self.cluster is not None:
            return self.cluster.doctor(
                timeout=args.timeout, backend=args.backend, python=args.python, ssh=args.ssh
            )
        return doctor_hosts(
            args.n, hosts=args.hosts, hostfile=args.hostfile, python=args.python, ssh=args.ssh,
            timeout=args.timeout, backend=args.backend,
        )  # fmt: skip

    def _setup(self, args: argparse.Namespace) -> Any:
        from .environment import setup

        if args.hosts is None and args.hostfile is None and self.cluster is not None:
            return self.cluster.setup(check=args.check, verify=args.verify, ssh=args.ssh)
        return setup(args.hosts, args.hostfile, ssh=args.ssh, check=args.check, verify=args.verify)

    def _hosts(self, args: argparse.Namespace) -> Any:
        from ..fabric import macos

        if not args.discover and not args.write:
            raise MLXClusterError("%mlx_cluster hosts: give --discover or --write FILE")
        return macos.discover_command(write=args.write)


    def _network(self, args: argparse.Namespace) -> Any:
        from ..fabric.network import network

        hosts = args.hosts
        if hosts is None and args.hostfile is None and self.cluster is not None:
            hosts = ",".join(h.ssh for h in self.cluster.placement.hosts if not h.is_local)
        return network(
            hosts or None,
            args.hostfile,
            configure=args.configure,
            undo=args.undo,
            over=args.over,
            layout=args.layout,
            subnets=args.subnets,
            write=args.write,
            ssh=args.ssh,
            timeout=args.timeout,
        )


MLXClusterMagics.mlx_cluster.__doc__ = full_help()


def load_ipython_extension(ipython: Any) -> None:
    """What the "Python 3 (MLX cluster)" kernel preloads (``--ext=mlx_cluster_magic.magics``):
    the package's extension, once. Listed under this module's name, it leaves a notebook's own
    ``%load_ext mlx_cluster_magic`` silent instead of "already loaded"."""
    if "MLXClusterMagics" not in ipython.magics_manager.registry:
        from .. import load_ipython_extension as load_package

        load_package(ipython)
