"""Show the live status view in a side panel (``sidecar``) in JupyterLab or Jupyter Notebook 7,
or inline elsewhere.

Which front end shows the notebook is known only to the browser, so the widget's view reports
it (``StatusWidget.frontend``, from the shell's elements in the page). Before any view has
rendered, the kernel's ancestry is the best evidence: a kernel started by a ``jupyter lab``
server is taken to be shown in JupyterLab. The ``sidecar`` panel needs the right-hand area of
JupyterLab's or Notebook 7's shell (in Notebook 7 with this package's small front-end extension,
``jupyter-config/labextensions/mlx-cluster-magic``), so every other front end (classic
Notebook 6, VS Code, a terminal) gets the inline view.

A kernel runs one notebook, so it keeps one panel: titled with the notebook's name and the
cluster, reused while it is open (a second click, or a new cluster of the same notebook, shows
in the same panel), opened anew once the user has closed it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any


def _server_is_jupyter_lab() -> bool:
    """Whether an ancestor of this process runs ``jupyter lab`` / ``jupyter-lab``."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        proc = psutil.Process(os.getpid()).parent()
        for _ in range(6):
            if proc is None:
                return False
            cmd = [os.path.basename(c) for c in proc.cmdline()]
            if any(c in ("jupyter-lab", "jupyter-lab.exe") for c in cmd):
                return True
            if any(a == "jupyter" and b == "lab" for a, b in itertools.pairwise(cmd)):
                return True
            proc = proc.parent()
    except Exception:
        return False
    return False


def detect_frontend(widget: Any) -> tuple[str, str]:
    """``(front end, evidence)``: "jupyterlab", "notebook7" (Jupyter Notebook 7), "notebook"
    (the classic Notebook 6), "other" or "terminal"."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - IPython is a dependency
        shell = None
    if shell is None or getattr(shell, "kernel", None) is None:
        return "terminal", "no Jupyter kernel (terminal IPython or plain Python)"
    reported = str(getattr(widget, "frontend", "") or "")
    if reported:
        return reported, "reported by the view in the browser"
    if _server_is_jupyter_lab():
        return "jupyterlab", "this kernel was started by a jupyter lab server"
    return "other", "no view has reported its front end and the server is not jupyter lab"


#: The front ends whose shell has the right-hand area sidecar opens its panel in, by name.
SIDE_PANEL_HOSTS = {"jupyterlab": "JupyterLab", "notebook7": "Notebook 7"}

#: This kernel's side panel: {"panel": Sidecar, "widget": the view it shows, "title": str}.
_PANEL: dict[str, Any] = {}


def notebook_name(widget: Any) -> str:
    """The notebook showing ``widget``: as its view reports it, else the kernel's session name
    (``JPY_SESSION_NAME``, set by jupyter_server), else ``notebook``."""
    name = str(getattr(widget, "notebook", "") or "") or os.environ.get("JPY_SESSION_NAME", "")
    return os.path.basename(name.rstrip("/")) or "notebook"


def panel_title(widget: Any) -> str:
    """``quickstart.ipynb: MLX cluster, 2 ranks``: which notebook, which cluster."""
    snap = getattr(widget, "snapshot", None) or {}
    n = snap.get("n") if isinstance(snap, dict) else None
    cluster = f"MLX cluster, {n} rank{'' if n == 1 else 's'}" if n else "MLX cluster"
    return f"{notebook_name(widget)}: {cluster}"


def _is_open(shown: Any, asking: Any) -> bool:
    """Whether the panel showing ``shown`` is still open: as the page ``asking`` was clicked on
    says (its ``page_side_keys``), else as the views have reported to this kernel."""
    keys = getattr(asking, "page_side_keys", None)
    if keys is not None:
        return getattr(shown, "key", None) in keys
    return int(getattr(shown, "side_views", 0) or 0) > 0


def open_side_panel(widget: Any, title: str | None = None) -> str:
    """Show ``widget`` (live) in this notebook's side panel in JupyterLab or Notebook 7;
    elsewhere display it inline. Returns one line saying which it did and why.

    One panel per notebook: while it is open it is reused (it already shows ``widget``, or it
    now shows it in place of an earlier cluster's view); once closed, a new one opens.
    """
    from IPython.display import display as _display

    def display(obj: Any) -> None:
        _display(obj)  # type: ignore[no-untyped-call]

    frontend, evidence = detect_frontend(widget)
    if frontend in SIDE_PANEL_HOSTS:
        try:
            from sidecar import Sidecar  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            display(widget)
            return "shown inline: the sidecar package is not installed (pip install sidecar)"
        title = title or panel_title(widget)
        old = dict(_PANEL)
        if old and old["title"] == title and _is_open(old["widget"], widget):
            if old["widget"] is widget:
                with contextlib.suppress(Exception):
                    widget.send({"reveal": True})  # its view brings the panel on screen
                return f'already open in the side panel "{title}" on the right'
            panel = old["panel"]
            panel.clear_output()
            panel.append_display_data(widget)
            _PANEL["widget"] = widget
            with contextlib.suppress(AttributeError):
                widget.side_panel = panel
            return f'shown in the side panel "{title}" in place of the earlier view'
        if old:
            with contextlib.suppress(Exception):
                old["panel"].close()
        panel = Sidecar(title=title)
        # Not ``with panel: display(...)``: appending works from a button's message handler too.
        panel.append_display_data(widget)
        _PANEL.update(panel=panel, widget=widget, title=title)
        with contextlib.suppress(AttributeError):
            widget.side_panel = panel
        return f'opened in a {SIDE_PANEL_HOSTS[frontend]} side panel "{title}" ({evidence})'
    display(widget)
    return f"shown inline: the side panel needs JupyterLab or Notebook 7 ({frontend}: {evidence})"
