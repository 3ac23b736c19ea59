"""Show the live status view in a JupyterLab side panel (``sidecar``), or inline elsewhere.

Which front end shows the notebook is known only to the browser, so the widget's view reports
it (``StatusWidget.frontend``, from JupyterLab's shell element in the page). Before any view
has rendered, the kernel's ancestry is the best evidence: a kernel started by a ``jupyter lab``
server is taken to be shown in JupyterLab. The ``sidecar`` panel needs JupyterLab's shell, so
every other front end (classic Notebook, VS Code, a terminal) gets the inline view.
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
    """``(front end, evidence)``: "jupyterlab", "notebook", "other" or "terminal"."""
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


def open_side_panel(widget: Any, title: str = "MLX cluster") -> str:
    """Show ``widget`` (live) in a JupyterLab side panel; elsewhere display it inline.

    Returns one line saying which it did and why. A panel opened earlier for the same widget is
    closed first, so there is one panel per widget.
    """
    from IPython.display import display as _display

    def display(obj: Any) -> None:
        _display(obj)  # type: ignore[no-untyped-call]

    frontend, evidence = detect_frontend(widget)
    if frontend == "jupyterlab":
        try:
            from sidecar import Sidecar  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            display(widget)
            return "shown inline: the sidecar package is not installed (pip install sidecar)"
        old = getattr(widget, "side_panel", None)
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        panel = Sidecar(title=title)
        # Not ``with panel: display(...)``: appending works from a button's message handler too.
        panel.append_display_data(widget)
        with contextlib.suppress(AttributeError):
            widget.side_panel = panel
        return f"opened in a JupyterLab side panel ({evidence})"
    display(widget)
    return f"shown inline: the side panel needs JupyterLab ({frontend}: {evidence})"
