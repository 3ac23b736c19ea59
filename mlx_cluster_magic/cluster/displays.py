"""What a cluster shows: node records, metrics, the snapshot every view renders, the cached live
widget and its side panel, and the display fallbacks. Mixed into ``MLXCluster``; reads its
state, never changes its life cycle (the widget's buttons call back into it)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..errors import MLXClusterError
from ..observe.snapshot import ClusterSnapshot, MetricPoint, NodeStatus

if TYPE_CHECKING:
    from ..fabric.placement import Placement
    from ..launch.spec import ClusterSpec
    from ..views.status_widget import StatusWidget
    from .attached import Run as Running

#: A cell blocked this long in collectives that other ranks have not reached shows a banner.
HANG_BANNER_S = 10.0
#: Metric points per series a snapshot carries to the views.
SNAPSHOT_POINTS = 2000


class ClusterViews:
    """Node records, metrics, snapshot and widget of an ``MLXCluster``."""

    # provided by MLXCluster
    _run: Running | None
    _link: Any
    cluster_id: str | None
    _widget: StatusWidget | None
    _state: str  # (a ClusterState: a str)
    _reason: str | None
    health: Any
    _topology_svg: str | None
    banner: str | None
    #: a line about work in progress on the hosts (a sync's progress), shown like the banner
    activity: str | None = None
    last_nodes: list[NodeStatus]
    spec: ClusterSpec
    placement: Placement
    backend: str
    n: int
    running: bool
    live_status: bool
    _require: Callable[[], Running]
    stop: Callable[..., None]
    restart: Callable[..., Any]

    #: The last metrics of the run that ended (stop, restart, abort), shown marked as from the
    #: previous run until the new run reports or the user clears them.
    _previous_metrics: tuple[MetricPoint, ...] = ()
    #: The run the kept metrics came from (its own reports, while it is torn down, are no news).
    _previous_of: Running | None = None
    #: Set from the moment a restart is asked for until its start is done or failed.
    _restarting: bool = False

    if TYPE_CHECKING:

        def hang_verdict(self, threshold_s: float = 0.0) -> str | None: ...

    def nodes(self) -> list[dict[str, Any]]:
        """Per rank: rank, host, state (starting/idle/busy/unresponsive/dead/stopped), busy_s,
        last_seen_s, silent_s, rss_bytes, mlx_active_bytes, mlx_peak_bytes, device, pid, why;
        how hard it works: cpu_percent (its process; 100 is one core), and of its host
        host_cpu_percent, mem_percent, and on a Mac with macmon gpu_percent, cpu_w, gpu_w,
        cpu_temp_c, gpu_temp_c (None where unknown), usage_hint (what adds those), waiting
        (``mac2 waits on the network (GPU 3 %)``)."""
        return [n.as_dict() for n in self._node_records()]

    def _node_records(self) -> list[NodeStatus]:
        run = self._run
        if run is None or run.status is None:
            if run is None:
                return self.last_nodes
            raise MLXClusterError(
                "live status is off for this cluster (started with --no-live-status)"
            )
        self.last_nodes = run.status.nodes()
        return self.last_nodes

    def metrics(self) -> Any:
        """Every number the ranks passed to ``report()``: records (rank, name, value, step,
        time), as a pandas DataFrame when pandas is installed. ``time`` is a (local)
        ``datetime``; ``step`` an integer where it was given as one."""
        run = self._require()
        points = [] if run.status is None else run.status.metrics()
        records = [{**p.as_dict(), "time": datetime.datetime.fromtimestamp(p.time)} for p in points]
        try:
            import pandas as pd
        except ImportError:
            return records
        frame = pd.DataFrame(records, columns=["rank", "name", "value", "step", "time"])
        steps = [p.step for p in points if p.step is not None]
        if steps and len(steps) < len(points) and all(type(s) is int for s in steps):
            frame["step"] = frame["step"].astype("Int64")  # integers, with <NA> where not given
        return frame

    def utilisation(self) -> Any:
        """How hard every host worked, as series: records (host, time, field, value, rank), a
        pandas DataFrame when pandas is installed. Fields: ``cpu_percent`` (a rank's process,
        ``rank`` says which), ``host_cpu_percent``, ``mem_percent``, and on a Mac with macmon
        ``gpu_percent``, ``cpu_w``, ``gpu_w``, ``cpu_temp_c``, ``gpu_temp_c``. ``time`` is a
        (local) ``datetime`` of the notebook's clock; each series keeps its newest 5000 points."""
        run = self._require()
        points = [] if run.status is None else run.status.usage.points()
        records = [{**asdict(p), "time": datetime.datetime.fromtimestamp(p.time)} for p in points]
        try:
            import pandas as pd
        except ImportError:
            return records
        frame = pd.DataFrame(records, columns=["host", "time", "field", "value", "rank"])
        frame["rank"] = frame["rank"].astype("Int64")  # <NA> for a host's own figures
        return frame

    def snapshot(self) -> ClusterSnapshot:
        """The plain data every view renders.

        While a restart runs the header says ``restarting`` and every rank ``starting`` (the old
        ranks are going, the new ones not there yet). Metrics of a run that ended stay, marked
        ``metrics_previous``, until the new run reports one or ``clear_previous_metrics()``.
        """
        if self._link is not None and self._state != "stopped":
            with contextlib.suppress(Exception):
                snap: ClusterSnapshot = self._link.call("snapshot", timeout=5)
                return dataclasses.replace(
                    snap, topology_svg=self._topology_svg or snap.topology_svg, kept=self.cluster_id
                )
        run = self._run
        restarting = self._restarting
        if restarting:
            nodes: list[NodeStatus] = [self._starting_row(r) for r in range(self.n)]
        elif run is None or run.status is None or self._state == "broken":
            nodes = self.last_nodes  # (a broken cluster's rows as they stay, even mid-teardown)
        elif self._state in ("stopped", "stopping"):  # its teardown runs: rows as they will stay
            nodes = [
                n if n.state == "dead" else dataclasses.replace(n, state="stopped", silent_s=None)
                for n in self.last_nodes
            ]
        else:
            nodes = self._node_records()
        # (a cluster stopped or broken shows what it kept, even while its teardown runs)
        ended = self._state in ("stopped", "stopping", "broken")
        live = (
            () if run is None or run.status is None or ended
            else run.status.metrics(SNAPSHOT_POINTS)
        )
        if live and run is not self._previous_of:  # a new run reports: the previous run's go
            self._previous_metrics, self._previous_of = (), None
        points = tuple(live) if live else self._previous_metrics
        sparklines: tuple[dict[str, Any], ...] = ()
        if run is not None and run.status is not None and not restarting:
            sparklines = tuple(run.status.usage.sparklines([n.host for n in nodes]))
        return ClusterSnapshot(
            state="restarting" if restarting else self._state,
            backend=self.backend,
            n=self.n,
            hosts=len({h.ssh for h in self.placement.hosts}),
            uptime_s=None if run is None or restarting else time.time() - run.started_at,
            nodes=tuple(nodes),
            reason=None if restarting else self._view_reason(),
            advice=None if restarting or self.health is None else self.health.advice,
            banner=None if restarting else (self.banner or self.activity),
            metrics=points,
            topology_svg=self._topology_svg,
            metrics_previous=not live and bool(points),
            sparklines=sparklines,
            kept=self.cluster_id,
        )

    def _view_reason(self) -> str | None:
        """What the header says beside the state: why it broke, or who stopped it."""
        return self.health.what if self.health is not None else self._reason

    def _starting_row(self, rank: int) -> NodeStatus:
        """A rank of a cluster being (re)started: no report yet, nothing live to show."""
        host = (
            self.last_nodes[rank].host
            if rank < len(self.last_nodes)
            else self.placement.ranks[rank].ssh
        )
        return NodeStatus(rank, host, "starting", 0.0, None, None, None, None, None, None)

    def _keep_metrics_of(self, run: Running) -> None:
        """Before ``run`` is torn down: keep its metrics for the views (previous run)."""
        if run.status is not None:
            with contextlib.suppress(Exception):
                self._previous_metrics = tuple(run.status.metrics(SNAPSHOT_POINTS))
                self._previous_of = run

    def clear_previous_metrics(self) -> None:
        """Drop the metrics kept from a run that ended (the view's Clear button)."""
        self._previous_metrics, self._previous_of = (), None
        self._refresh_widget()

    def status_view(self) -> StatusWidget:
        """The live status widget; cached, so every display shows the same live object."""
        if self._widget is None:
            from ..views.status_widget import StatusWidget

            self._widget = StatusWidget(
                on_stop=lambda: self._stop_from_view(),
                on_restart=lambda replay: self.restart(activate=True, replay=replay),
                on_side=lambda: self.open_side_panel(),
                on_clear=lambda: self.clear_previous_metrics(),
            )
            self._widget.update(self.snapshot())
        return self._widget

    def _stop_from_view(self) -> None:
        if self._run is not None:
            self.stop(origin="the status view")

    def open_side_panel(self) -> str:
        """Show the live status in a side panel in JupyterLab or Notebook 7 (inline elsewhere)."""
        from ..views.side_panel import open_side_panel

        return open_side_panel(self.status_view())

    def _refresh_widget(self) -> None:
        """Called about twice a second by the status thread (and on every change)."""
        if self._run is not None and self._link is None:  # (a runtime sets its own banner)
            with contextlib.suppress(Exception):
                verdict = self.hang_verdict(threshold_s=HANG_BANNER_S)
                self.banner = f"the cell may be hung: {verdict}" if verdict else None
        if self._widget is not None:
            with contextlib.suppress(Exception):
                self._widget.update(self.snapshot())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from ..views.text import snapshot_html, snapshot_text

        snap = self.snapshot()
        bundle = {"text/plain": snapshot_text(snap), "text/html": snapshot_html(snap)}
        if self.running and self.live_status:
            widget = self.status_view()._repr_mimebundle_(include=include, exclude=exclude)
            data = widget[0] if isinstance(widget, tuple) else widget
            bundle.update({k: v for k, v in (data or {}).items() if k != "text/plain"})
        return bundle
