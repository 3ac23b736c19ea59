"""The plain data every view renders: a frozen snapshot of one cluster, taken on the head.

Views (the live widget, the HTML and text fallbacks, the side panel) get a ``ClusterSnapshot``
and callbacks, never the cluster itself; this module imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

#: Every state a rank can be in, in the order the views explain them.
NODE_STATES = ("starting", "idle", "busy", "unresponsive", "unreachable", "dead", "stopped")
class ClusterState(StrEnum):
    """The cluster's life cycle: ``stopped`` -> ``starting`` -> ``running`` -> ``stopping`` ->
    ``stopped``; ``broken`` (with its reason) after an abort, until the next stop or start. A
    ``StrEnum``: each state is its own name as a string (``ClusterState.RUNNING == "running"``),
    so the views and the records that carry it read plain text."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BROKEN = "broken"


#: Every state of the cluster's life cycle.
CLUSTER_STATES = tuple(str(s) for s in ClusterState)
#: What a view's header can say: the life cycle, plus ``restarting`` from the moment a restart is
#: asked for until its new start is done (the old ranks stopping, the new ones starting).
VIEW_STATES = (*CLUSTER_STATES, "restarting")
#: Rank states whose figures (busy time, heartbeat, RSS, MLX memory) are live; a ``stopped`` or
#: ``dead`` rank's last report is not, and the views show ``-`` for it.
LIVE_NODE_STATES = ("idle", "busy", "unresponsive", "unreachable")


@dataclass(frozen=True)
class NodeStatus:
    """One rank, as ``cluster.nodes()`` returns it and the status view shows it.

    ``state``: ``starting`` (no report yet), ``idle``, ``busy`` (a request runs: ``busy_s`` since
    it started), ``unresponsive`` (the process lives but its reports stopped ``silent_s`` ago,
    e.g. a C call holding the GIL), ``unreachable`` (neither the rank nor its host answers the
    head since ``silent_s`` ago: the network, not the rank; waited out up to the grace),
    ``dead`` (evidence the process is gone) or ``stopped``.
    The usage fields (``cpu_percent`` ...) are the newest the host's sampler sent.
    """

    rank: int
    host: str
    state: str
    busy_s: float
    last_seen_s: float | None
    rss_bytes: int | None
    mlx_active_bytes: int | None
    mlx_peak_bytes: int | None
    device: str | None
    pid: int | None
    silent_s: float | None = None
    why: str | None = None
    #: How hard the rank and its host work (``rank.host_usage``): the rank's process CPU (100
    #: is one core), the host's CPU and memory in use (%), and on a Mac with macmon GPU use
    #: (%), CPU and GPU power (W) and temperatures (C). None where not known (GPU on Linux).
    cpu_percent: float | None = None
    host_cpu_percent: float | None = None
    mem_percent: float | None = None
    gpu_percent: float | None = None
    cpu_w: float | None = None
    gpu_w: float | None = None
    cpu_temp_c: float | None = None
    gpu_temp_c: float | None = None
    #: What would add the figures this host lacks (a Mac without macmon), else None.
    usage_hint: str | None = None
    #: ``mac2 waits on the network (GPU 3 %)``: the rank has waited in a collective, and its
    #: host's GPU idled, for more than 2 s (only where GPU use is known).
    waiting: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MetricPoint:
    """One number a rank recorded with ``report(name=value, step=...)``: ``step`` is an int
    when it was given as one; ``time`` is the rank's clock (seconds since the epoch)."""

    rank: int
    name: str
    value: float
    step: int | float | None
    time: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClusterSnapshot:
    """The header and rows of the status view at one moment."""

    state: str  # one of VIEW_STATES
    backend: str
    n: int
    hosts: int
    uptime_s: float | None
    nodes: tuple[NodeStatus, ...]
    reason: str | None = None  # why the cluster is broken
    banner: str | None = None  # a warning to show above the table (e.g. a hang verdict)
    metrics: tuple[MetricPoint, ...] = field(default_factory=tuple)
    topology_svg: str | None = None  # the measured fabric, once ``links()`` has run
    #: ``metrics`` are the last ones of a run that has ended (kept through stop and restart
    #: until the new run reports or the user clears them), not this run's.
    metrics_previous: bool = False
    #: Per host, its GPU (else CPU) use over the last minute:
    #: ``{"host", "field", "values"}`` (``observe.utilisation.UsageStore.sparklines``).
    sparklines: tuple[dict[str, Any], ...] = ()
    #: What to type to bring a broken cluster back (``restart --without HOST`` for a lost Mac).
    advice: str | None = None
    #: A kept cluster's id: it outlives the notebook's kernel (``%mlx_cluster attach ID``).
    kept: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
