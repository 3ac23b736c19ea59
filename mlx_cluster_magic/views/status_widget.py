"""The live status view: an anywidget whose synced traits are the cluster's snapshot.

Python only sets data (``update(snapshot)``, about twice a second from the status thread);
``status_widget.js`` renders it in the browser. Button clicks come back as custom messages and
call the callbacks given at construction; the front end shows at once that a click was received.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from ..observe.snapshot import ClusterSnapshot, MetricPoint, NodeStatus
from .text import snapshot_html, snapshot_text

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
#: Points per (metric, rank) sent to the browser; longer series are thinned evenly, last kept.
#: NaN and infinities travel as null (JSON has neither) and are not drawn.
MAX_CHART_POINTS = 500
NODE_FIELDS = tuple(f.name for f in dataclasses.fields(NodeStatus))


def _thin(n: int, limit: int = MAX_CHART_POINTS) -> list[int]:
    """Evenly spaced indices into a series of ``n`` points, the first and last included."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def metrics_series(points: Sequence[MetricPoint]) -> list[dict[str, Any]]:
    """The metric records as the widget syncs them: one entry per (name, rank), names in
    first-reported order then ranks, columns ``step``, ``time``, ``value`` (thinned to
    ``MAX_CHART_POINTS``). One pass over the records: this runs twice a second."""
    groups: dict[tuple[str, int], tuple[list[float | None], list[float], list[float | None]]] = {}
    order: dict[str, int] = {}
    finite = math.isfinite
    for p in points:
        g = groups.get((p.name, p.rank))
        if g is None:
            g = groups[(p.name, p.rank)] = ([], [], [])
            order.setdefault(p.name, len(order))
        g[0].append(p.step if p.step is None or finite(p.step) else None)
        g[1].append(p.time)
        g[2].append(p.value if finite(p.value) else None)
    out = []
    for (name, rank), (steps, times, values) in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
    ):
        if len(values) > MAX_CHART_POINTS:
            idx = _thin(len(values))
            steps, times, values = (
                [steps[i] for i in idx],
                [times[i] for i in idx],
                [values[i] for i in idx],
            )
        out.append({"name": name, "rank": rank, "step": steps, "time": times, "value": values})
    return out


def snapshot_state(s: ClusterSnapshot) -> dict[str, Any]:
    """The ``snapshot`` trait: the snapshot's header and rows (metrics and topology travel in
    their own traits, so a table refresh does not resend them). Equal to ``s.as_dict()`` less
    those two keys, built without ``asdict``'s deep copies."""
    return {
        "state": s.state,
        "backend": s.backend,
        "n": s.n,
        "hosts": s.hosts,
        "uptime_s": s.uptime_s,
        "nodes": [{f: getattr(n, f) for f in NODE_FIELDS} for n in s.nodes],
        "reason": s.reason,
        "advice": s.advice,
        "banner": s.banner,
        "metrics_previous": s.metrics_previous,
        "sparklines": list(s.sparklines),
        "kept": s.kept,
    }


def own_subshell(widget: Any) -> str | None:
    """Have the kernel handle ``widget``'s messages on a subshell thread of their own, so that
    a click acts while the main thread runs a cell (ipykernel 7's subshells, JEP 91).

    ipykernel routes each incoming comm message to the subshell its comm names
    (``_reply_subshell_for``); this widget's comm names one subshell created for it. Returns
    the subshell's id, or None where the kernel has no subshells (older ipykernel, terminal
    IPython): there the clicks wait for the running cell, or for a wait loop that polls them.
    """
    try:
        from ipykernel.kernelbase import Kernel

        if not Kernel.initialized():
            return None
        kernel = Kernel.instance()
        thread = kernel.shell_channel_thread
        comm = widget.comm
        if thread is None or comm is None or not hasattr(comm, "_reply_subshell_for"):
            return None
        manager = thread.manager
    except Exception:
        return None
    made: list[str] = []
    done = threading.Event()

    def create() -> None:  # the manager must be called on the shell channel thread
        try:
            made.append(manager._create_subshell())
        except Exception:
            log.debug("could not create a subshell for the status view", exc_info=True)
        finally:
            done.set()

    thread.io_loop.add_callback(create)
    if not done.wait(5) or not made:
        return None
    subshell_id = made[0]
    comm._reply_subshell_for = lambda _data, _default: subshell_id
    return subshell_id


def drop_subshell(subshell_id: str) -> None:
    """Stop the subshell thread ``own_subshell`` made (when the widget closes)."""
    try:
        from ipykernel.kernelbase import Kernel

        thread = Kernel.instance().shell_channel_thread
        manager = thread.manager
        thread.io_loop.add_callback(lambda: manager._delete_subshell(subshell_id))
    except Exception:
        log.debug("could not delete the status view's subshell", exc_info=True)


class StatusWidget(anywidget.AnyWidget):
    """Header, Stop / Restart (and "Restart and replay") / Side panel buttons, one row per
    rank, a banner, live metric charts and the topology, from ``ClusterSnapshot`` data.

    ``on_stop()`` runs on Stop; ``on_restart(replay)`` on Restart (``replay`` True for
    "Restart and replay"); ``on_side()`` on "Side panel" (None: the widget opens its own side
    panel with ``views.side_panel.open_side_panel``); a string it returns is shown in the view;
    ``on_clear()`` on the Clear button beside metrics of a previous run (None: the widget
    drops the charts it holds). A callback's exception is shown in the view as one line and
    logged with its traceback.

    In the browser, a view whose kernel restarts or shuts down says "this cluster ended with
    its kernel" and turns its buttons off; that needs no kernel, so it is ``status.js``'s alone.

    With ``own_thread`` (the default) and a kernel that has subshells (ipykernel 7), the
    callbacks run on a kernel subshell thread of this widget's own, so Stop acts while a cell
    runs: they must be safe to call from another thread than the cell's.
    """

    _esm = HERE / "status_widget.js"
    _css = HERE / "status_widget.css"

    snapshot = traitlets.Dict().tag(sync=True)
    metrics: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    topology_svg = traitlets.Unicode("").tag(sync=True)
    side_button = traitlets.Bool(True).tag(sync=True)
    #: Set by the browser: "jupyterlab", "notebook" or "other" ("" until a view renders).
    frontend = traitlets.Unicode("").tag(sync=True)
    #: Set by the browser: the name of the notebook that shows the view ("" where unknown).
    notebook = traitlets.Unicode("").tag(sync=True)
    #: Tells this widget's views apart from other widgets' on the page (the side panel's).
    key = traitlets.Unicode().tag(sync=True)

    @traitlets.default("key")
    def _new_key(self) -> str:
        return uuid.uuid4().hex

    def __init__(
        self,
        on_stop: Callable[[], object],
        on_restart: Callable[[bool], object],
        on_side: Callable[[], object] | None = None,
        snapshot: ClusterSnapshot | None = None,
        on_clear: Callable[[], object] | None = None,
        side_button: bool = True,
        own_thread: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(side_button=side_button, **kwargs)
        self._on_stop = on_stop
        self._on_restart = on_restart
        self._on_side = on_side
        self._on_clear = on_clear
        #: Views of this widget now shown in a side panel, as the browser reports them.
        self.side_views = 0
        #: While "Side panel" is handled: the keys of the widgets with a side panel open on the
        #: page that was clicked (None otherwise); ``views.side_panel`` reuses a panel that is.
        self.page_side_keys: list[str] | None = None
        self._lock = threading.Lock()
        self._metrics_src: tuple[MetricPoint, ...] = ()
        self.last: ClusterSnapshot | None = None
        self.side_panel: Any = None  # the Sidecar showing this widget, once opened
        self.on_msg(self._on_message)
        #: The kernel subshell whose thread handles this widget's clicks (None: the main one).
        self.subshell_id = own_subshell(self) if own_thread else None
        if snapshot is not None:
            self.update(snapshot)

    def close(self) -> None:
        subshell_id, self.subshell_id = getattr(self, "subshell_id", None), None
        super().close()
        if subshell_id is not None:
            drop_subshell(subshell_id)

    def update(self, snapshot: ClusterSnapshot) -> None:
        """Show ``snapshot``. Cheap and thread-safe: unchanged parts are not resent."""
        with self._lock:
            state = snapshot_state(snapshot)
            series = None
            if snapshot.metrics is not self._metrics_src:
                self._metrics_src = snapshot.metrics
                series = metrics_series(snapshot.metrics)
                if series == self.metrics:
                    series = None
            topology = snapshot.topology_svg or ""
            self.last = snapshot
            if state == self.snapshot and series is None and topology == self.topology_svg:
                return
            with self.hold_sync():
                if state != self.snapshot:
                    self.snapshot = state
                if series is not None:
                    self.metrics = series
                if topology != self.topology_svg:
                    self.topology_svg = topology

    # ------------------------------------------------------------------ clicks
    def _on_message(self, _widget: object, content: Any, _buffers: object) -> None:
        if not isinstance(content, dict):
            return
        if content.get("event") == "side_view":  # a view in a side panel rendered or went
            self.side_views = max(0, self.side_views + (1 if content.get("open") else -1))
            return
        if "action" not in content:
            return
        action = str(content["action"])
        view = content.get("view")
        # At once: the view then knows the kernel has the click (and is not busy elsewhere).
        with contextlib.suppress(Exception):
            self.send({"got": action, "view": view})
        error = None
        message = None
        try:
            if action == "stop":
                self._on_stop()
            elif action in ("restart", "replay"):
                self._on_restart(bool(content.get("replay", action == "replay")))
            elif action == "side":
                keys = content.get("side_keys")
                self.page_side_keys = [str(k) for k in keys] if isinstance(keys, list) else None
                try:
                    if self._on_side is not None:
                        said = self._on_side()
                        message = said if isinstance(said, str) else None
                    else:
                        from .side_panel import open_side_panel

                        message = open_side_panel(self)
                finally:
                    self.page_side_keys = None
            elif action == "clear":
                if self._on_clear is not None:
                    self._on_clear()
                else:
                    with self._lock:
                        self.metrics = []
            else:
                error = f"unknown action {action!r}"
        except Exception as e:  # shown in the view; the traceback goes to the log
            log.exception("the status view's %s button failed", action)
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
        self.send({"ack": action, "error": error, "message": message, "view": view})

    def click(self, action: str, replay: bool = False) -> None:
        """Act as the browser does when a button is clicked (``stop``, ``restart``, ``replay``,
        ``side``, ``clear``): for code and tests without a browser."""
        self._on_message(self, {"action": action, "replay": replay}, None)

    # ------------------------------------------------------------------ fallbacks
    def text(self) -> str:
        return snapshot_text(self.last) if self.last is not None else "MLX cluster"

    def html(self) -> str:
        return snapshot_html(self.last) if self.last is not None else "<b>MLX cluster</b>"

    def mimebundle(self) -> dict[str, Any]:
        """The display data: the widget view, with this snapshot as text and static HTML for
        front ends without widgets (terminal, nbconvert, a notebook opened without kernel)."""
        return self._repr_mimebundle_()[0]

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        found = super()._repr_mimebundle_(**kwargs)
        data, meta = (dict(found[0]), dict(found[1])) if found else ({}, {})
        data["text/plain"] = self.text()
        # beside the live view, the HTML is what a saved notebook shows in its place (opened
        # before its cells run, the docs site): a record of the moment, said as one
        data["text/html"] = (
            snapshot_html(self.last, saved_at=time.strftime("%H:%M:%S"))
            if self.last is not None
            else self.html()
        )
        return data, meta
