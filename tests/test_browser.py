"""The live status widget in a real JupyterLab, seen through a real (headless) Chromium.

Starts JupyterLab on a free loopback port with a throw-away notebook, runs it in the browser
(Playwright), and checks what a user sees.

- On a real cluster: two rank rows, ``idle`` after start, ``busy`` with a growing busy time
  while a non-blocking execute runs (the kernel refreshes the widget from a background thread),
  then the Stop button stops the cluster. Screenshot: ``tests/artifacts/status-widget.png``.
- The view on its own (``StatusWidget`` given hand-built snapshots, no cluster): every state,
  the banner, live metric charts and the topology tab, a click that shows at once, Restart and
  replay, Stop, and the side panel. Screenshots: ``tests/artifacts/status-widget-live.png``,
  ``tests/artifacts/status-side-panel.png``, ``tests/artifacts/status-widget-stopped.png``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NOTEBOOK = "status-widget.ipynb"
BUSY_S = 5  # how long the non-blocking execute keeps both ranks busy
CELLS = [
    "%load_ext mlx_cluster_magic",
    "cluster = %mlx_cluster start -n 2",
    "cluster",
    f'ar = cluster.view.execute("import time; time.sleep({BUSY_S})", block=False)',
    # every rank reports a loss per step; the view draws it while the cell runs
    "%%px\nimport time\nfor i in range(60):\n"
    "    report(step=i, loss=1.0 / (i + 1) + 0.1 * world.rank())\n    time.sleep(0.1)",
    "%%px\nimport time\ntime.sleep(60)",  # stopped from the view while it runs
    "%mlx_cluster start -h",  # help, as a person asks for it
    "%%px\nx = 1",  # on the stopped cluster: one line, no traceback
    "%%px\nimport time\ntime.sleep(30)",  # interrupted from the toolbar
]

VIEW_NOTEBOOK = "status-view.ipynb"
#: The notebook on screen (another one may be open in a hidden tab).
NB = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"
TOPOLOGY_SVG = (
    "<svg xmlns='http://www.w3.org/2000/svg' width='200' height='60' class='mlx-topo-test'>"
    "<text x='10' y='30'>mac1 = mac2 = mac3 = mac4</text></svg>"
)
VIEW_CELLS = [
    # 0: the view alone, from hand-built snapshots; Stop answers after 2 s on purpose.
    f"""import threading, time
from mlx_cluster_magic.observe.snapshot import ClusterSnapshot, MetricPoint, NodeStatus
from mlx_cluster_magic.views.status_widget import StatusWidget
from mlx_cluster_magic.views.side_panel import open_side_panel

def node(rank, state):
    return NodeStatus(rank=rank, host=f"mac{{rank + 1}}", state=state,
        busy_s=4.0 if state in ("busy", "unresponsive") else 0.0, last_seen_s=0.2,
        rss_bytes=300 * 2**20, mlx_active_bytes=2**28, mlx_peak_bytes=2**30,
        device="Device(gpu, 0)", pid=100 + rank, silent_s=9.0 if state == "unresponsive" else None,
        why="killed by signal 9" if state == "dead" else None)

BANNER = "rank 1 is behind: ranks 0,2 wait in all_sum #5 (cell line 3)"

def snap(state="running", states=("idle", "busy", "unresponsive", "dead"), steps=20, **kw):
    metrics = tuple(MetricPoint(r, "loss", 2.0 / (i + 1) + 0.1 * r, float(i), 1000.0 + i)
                    for i in range(steps) for r in range(2))
    metrics += tuple(MetricPoint(r, "tok_s", 40.0 + 3 * r + i % 5, None, 1000.0 + i)
                     for i in range(steps) for r in range(2))
    return ClusterSnapshot(state=state, backend="ring", n=len(states), hosts=len(states),
        uptime_s=12.0, nodes=tuple(node(i, s) for i, s in enumerate(states)), metrics=metrics,
        **kw)

clicks = []
def on_stop():
    clicks.append("stop")
    time.sleep(2)  # the view must show the click before this answer comes
    w.update(snap("stopped", states=("stopped",) * 4))

w = StatusWidget(on_stop=on_stop, on_restart=lambda replay: clicks.append(f"restart {{replay}}"),
                 snapshot=snap(banner=BANNER, topology_svg={TOPOLOGY_SVG!r}))
w""",
    # 1: metrics arrive from another thread while the kernel is idle
    """def grow():
    for k in range(21, 41):
        time.sleep(0.2)
        w.update(snap(steps=k, banner=BANNER, topology_svg=w.topology_svg))
threading.Thread(target=grow, daemon=True).start()""",
    # 2: the side panel from code, once a view has said where it lives
    "print(open_side_panel(w))",
    # 3: what Python received
    "print(clicks)",
]


# Two notebooks, each with its own kernel and cluster (A's is stopped before B's starts).
TWO_NOTEBOOKS = ("nb-a.ipynb", "nb-b.ipynb")
TWO_CELLS = [
    "%load_ext mlx_cluster_magic",
    "cluster = %mlx_cluster start -n 2",
    "cluster",
    "cluster.stop()",
]


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}"
    for module, what in (("playwright", "playwright (PyPI)"), ("jupyterlab", "jupyterlab")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed"
    return None


pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(_missing() is not None, reason=str(_missing())),
]


# --------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(base: str, token: str, path: str, method: str = "GET") -> Any:
    req = urllib.request.Request(
        f"{base}{path}", method=method, headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body else None


def _wait(what: str, check: Callable[[], Any], timeout: float, period: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)


def _write_notebook(path: Path, cells: list[str] = CELLS) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nbformat.write(nb, path)


def _quiet_lab_settings(settings: Path) -> None:
    """No news / update toasts over the notebook (they would also try the network)."""
    f = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


class Lab:
    """A JupyterLab server of our own: started, waited for, shut down (kernels included).
    ``app`` is the server's module: ``jupyterlab``, or ``notebook`` for Jupyter Notebook 7
    (the same server and options, another front end)."""

    def __init__(self, root: Path, app: str = "jupyterlab") -> None:
        self.root = root
        self.app = app
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root.parent / "jupyter-lab.log"
        env = dict(os.environ)
        for var, sub in (
            ("JUPYTER_CONFIG_DIR", "config"),
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("JUPYTER_DATA_DIR", "data"),
            ("JUPYTERLAB_SETTINGS_DIR", "settings"),
            ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
            ("IPYTHONDIR", "ipython"),
        ):
            env[var] = str(root.parent / sub)
        _quiet_lab_settings(root.parent / "settings")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                app,
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={root}",
                "--allow-root",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._children: dict[int, psutil.Process] = {}

    def wait_ready(self, timeout: float = 45.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.app} exited ({self.proc.returncode}):\n{self.log()}")
            try:
                return "started" in _api(self.base, self.token, "/api/status")
            except (OSError, ValueError):
                return False

        _wait(f"{self.app} to answer /api/status", ready, timeout, period=0.3)

    def remember_children(self) -> None:
        """The kernel and whatever else the server started, to check they all end."""
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._children[p.pid] = p

    def kernels(self) -> list[dict[str, Any]]:
        try:
            return _api(self.base, self.token, "/api/kernels")
        except urllib.error.HTTPError as e:
            # jupyter_server lists a kernel that is still starting before it has set its
            # last_activity, and answers 500 for that moment: ask again on the next poll.
            if e.code == 500 and "last_activity" in self.log():
                return []
            raise

    def log(self, tail: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-tail:]
        return ""

    def stop(self) -> list[str]:
        """Shut kernels and server down cleanly; kill by pid what does not end. Returns
        the processes that had to be killed (empty on a clean shutdown)."""
        self.remember_children()
        killed: list[str] = []
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                for k in self.kernels():
                    _api(self.base, self.token, f"/api/kernels/{k['id']}", method="DELETE")
            with contextlib.suppress(OSError, ValueError):
                _api(self.base, self.token, "/api/shutdown", method="POST")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    killed.append(f"{self.app} server (pid {self.proc.pid})")
        _gone, alive = psutil.wait_procs(list(self._children.values()), timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                killed.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        self._log.close()
        return killed


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / NOTEBOOK)
    _write_notebook(root / VIEW_NOTEBOOK, VIEW_CELLS)
    for name in TWO_NOTEBOOKS:
        _write_notebook(root / name, TWO_CELLS)
    server = Lab(root)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- the page
@contextlib.contextmanager
def _lab_page(lab: Lab, failure_shot: Any) -> Iterator[Any]:
    """A Chromium page on the lab (30 s timeouts); on a failure a screenshot and the server
    log's tail; after, the browser closed and the lab shut down cleanly."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = None
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(30_000)
            yield page
        except BaseException:
            if page is not None:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(failure_shot))
            print(f"{lab.app} log tail:\n{lab.log()}")
            raise
        finally:
            browser.close()
    killed = lab.stop()
    assert not killed, f"{lab.app} did not shut down cleanly; killed {killed}"


def _header(page: Any, scope: str = NB) -> Any:
    """The status view's header line (the anywidget view's, or the older ipywidgets one's)."""
    return page.locator(
        f"{scope} .mlx-cluster-status .mlx-header, {scope} .mlx-cluster-status .widget-html"
    ).first


def _button(page: Any, name: str, scope: str = NB) -> Any:
    """A status view button by its name (``Stop``, ``Restart``), pending text included."""
    cls = {"Stop": "mlx-stop", "Restart": "mlx-restart"}[name]
    return page.locator(
        f"{scope} .mlx-cluster-status button.{cls}, "
        f"{scope} .mlx-cluster-status button.jupyter-button:text-is('{name}')"
    ).first


def _rows(page: Any, scope: str = NB) -> list[dict[str, Any]]:
    """The status table as the user sees it: one dict per rank row."""
    return page.evaluate(
        """(scope) => Array.from(document.querySelectorAll(
            scope + ' .mlx-cluster-status table.mlx-cluster-nodes tr.mlx-node'
        )).map(tr => ({
            rank: tr.dataset.rank,
            cls: tr.className,
            cells: Array.from(tr.cells).map(td => td.innerText.trim()),
        }))""",
        scope,
    )


def _busy_seconds(text: str) -> float | None:
    m = re.fullmatch(r"([\d.]+) s", text)
    return float(m.group(1)) if m else None


def _cell_errors(page: Any) -> str:
    """Tracebacks and one-line errors (UsageError) in the outputs; plain warnings pass."""
    texts = page.locator(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    ).all_inner_texts()
    return "\n".join(t for t in texts if re.search(r"Error|Traceback", t))


def _run_cell(page: Any, index: int) -> None:
    """Select code cell ``index`` and run it with Shift+Enter, as a user would."""
    cell = page.locator(f"{NB} .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _prompt(page: Any, index: int) -> str:
    return page.locator(f"{NB} .jp-Cell").nth(index).locator(".jp-InputPrompt").inner_text()


def _wait_executed(page: Any, index: int, timeout: float) -> None:
    def done() -> bool:
        errors = _cell_errors(page)
        if errors:
            raise AssertionError(f"a notebook cell failed:\n{errors}")
        return re.search(r"\[\d+\]", _prompt(page, index)) is not None

    _wait(f"cell {index} to finish", done, timeout, period=0.25)


@pytest.mark.cluster
def test_live_status_widget_in_jupyterlab(no_leaks: None, lab: Lab, artifacts: Path) -> None:
    # no_leaks first: its check runs after the lab fixture has shut the server down.

    assert importlib.util.find_spec("jupyterlab_widgets") is not None, (
        "jupyterlab_widgets (ipywidgets 8's widget manager for JupyterLab 4) is not installed: "
        "the status view would render as its text/plain fallback"
    )
    screenshot = artifacts / "status-widget.png"
    metrics_shot = artifacts / "status-widget-metrics.png"
    stopped_shot = artifacts / "status-widget-stopped-mid-cell.png"
    failure_shot = artifacts / "status-widget-failure.png"
    restarting_shot = artifacts / "status-widget-restarting.png"
    cleared_shot = artifacts / "status-widget-cleared.png"
    ended_shot = artifacts / "status-widget-kernel-restarted.png"
    for old in (
        screenshot, metrics_shot, stopped_shot, failure_shot, restarting_shot, cleared_shot,
        ended_shot,
    ):  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    with _lab_page(lab, failure_shot) as page:
        page.goto(f"{lab.base}/lab/tree/{NOTEBOOK}?token={lab.token}")
        # The notebook is open and its kernel is up and idle.
        page.wait_for_selector(".jp-Notebook .jp-Cell .jp-InputArea-editor", timeout=45_000)
        _wait(
            "the notebook's kernel to start",
            lambda: [k for k in lab.kernels() if k["execution_state"] == "idle"],
            timeout=45,
            period=0.5,
        )
        assert len(lab.kernels()) == 1
        lab.remember_children()
        page.wait_for_selector(
            ".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator[data-status='idle']",
        timeout=90_000,  # (a kernel starts slowly on a busy machine)
        )

        # Load, start, display: Shift+Enter runs a cell and moves to the next.
        _run_cell(page, 0)
        page.keyboard.press("Shift+Enter")
        page.keyboard.press("Shift+Enter")
        _wait_executed(page, 2, timeout=75)
        lab.remember_children()

        # The widget renders (jupyterlab_widgets' manager), one row per rank, both idle.
        page.wait_for_selector(".jp-OutputArea .mlx-cluster-status", timeout=15_000)
        rows = _wait("2 idle rank rows", lambda: _idle_rows(page), timeout=15)
        assert [r["rank"] for r in rows] == ["0", "1"]
        header = _header(page).inner_text()
        assert "MLX cluster (running)" in header and "2 ranks" in header
        stop = _button(page, "Stop")
        assert stop.is_enabled()
        assert _button(page, "Restart").count() == 1

        # A non-blocking execute: the kernel is idle again at once, the ranks sleep. The
        # table must follow on its own (refreshed from the kernel's status thread).
        _run_cell(page, 3)
        _wait_executed(page, 3, timeout=20)
        busy = _wait("a rank row to show busy", lambda: _busy_rows(page), timeout=10)
        first = _busy_seconds(busy[0]["cells"][3])
        assert first is not None, busy
        later = _wait(
            "the busy time to grow",
            lambda: _busy_rows(page, longer_than=first + 0.9),
            timeout=6,
        )
        assert "busy" in later[0]["cells"][2]
        page.locator(".mlx-cluster-status").screenshot(path=str(screenshot))
        assert screenshot.stat().st_size > 0

        # Back to idle when the sleep is over. A %%px cell reports a loss per step: the
        # chart draws one line per rank and they grow while the cell still runs.
        _wait("both ranks idle again", lambda: _idle_rows(page), timeout=BUSY_S + 10)
        _run_cell(page, 4)
        _wait("a loss chart", lambda: len(_points(page, "loss")) == 2, timeout=15)
        first_points = min(_points(page, "loss"))
        _wait(
            "the loss lines to grow",
            lambda: min(_points(page, "loss")) >= first_points + 10,
            timeout=10,
        )
        assert not re.search(r"\[\d+\]", _prompt(page, 4)), "drawn only after the cell"
        page.locator(".mlx-cluster-status").first.screenshot(path=str(metrics_shot))
        _wait_executed(page, 4, timeout=30)

        # A blocking %%px cell holds the kernel; the widget's own Stop button still acts
        # (its clicks are handled on a kernel subshell of their own).
        _run_cell(page, 5)
        _wait("the %%px cell's ranks to be busy", lambda: _busy_rows(page), timeout=15)
        time.sleep(1.0)  # well inside the cell
        assert not re.search(r"\[\d+\]", _prompt(page, 5)), "the %%px cell ended early"
        stop.click()
        clicked = time.monotonic()
        _wait(
            "the click to show",
            lambda: stop.is_disabled() and "stopping" in stop.inner_text(),
            timeout=1.5,
            period=0.05,
        )
        shown_s = time.monotonic() - clicked
        _wait(
            "the header to say stopped",
            lambda: "(stopped)" in _header(page).inner_text(),
            timeout=30,
            period=0.05,
        )
        stopped_s = time.monotonic() - clicked
        _wait(
            "the %%px cell to end",
            lambda: re.search(r"\[\d+\]", _prompt(page, 5)) is not None,
            timeout=30,
            period=0.05,
        )
        ended_s = time.monotonic() - clicked
        _wait("the Stop button to be disabled", stop.is_disabled, timeout=5)
        # What the user was looking at stays: the loss chart, marked as from the previous
        # run; the stopped rows show no live figures.
        assert len(_points(page, "loss")) == 2
        assert _previous_note(page) == "metrics from the previous run"
        for row in _rows(page):
            assert "mlx-stopped" in row["cls"] and row["cells"][4:8] == ["-"] * 4, row
        page.locator(".mlx-cluster-status").first.screenshot(path=str(stopped_shot))
        said = _output(page, 5)
        print(
            f"mid-cell Stop: click shown {shown_s * 1000:.0f} ms, cluster stopped "
            f"{stopped_s:.2f} s, cell ended {ended_s:.2f} s after the click; cell said {said!r}"
        )
        assert "Traceback" not in said and len(said.strip().splitlines()) <= 2, said
        # One line saying the cluster was stopped from the view (after the progress line).
        assert "stopped from the status view" in said, said

        # Help lists every option with its default; %%px on the stopped cluster is one line.
        for index in (6, 7):
            _run_cell(page, index)
            _wait(
                f"cell {index} to finish",
                lambda i=index: re.search(r"\[\d+\]", _prompt(page, i)) is not None,
                timeout=30,
                period=0.1,
            )
        help_text = _output(page, 6)
        for option in ("--check-collectives", "--collective-timeout", "--hostfile"):
            assert option in help_text, help_text
        assert "default" in help_text
        error = _output(page, 7).strip()
        assert error.count("\n") == 0 and "Traceback" not in error, error
        assert "no cluster is running: start one with %mlx_cluster start" in error, error
        page.locator(f"{NB} .jp-Cell").nth(7).screenshot(
            path=str(artifacts / "px-after-stop-one-line.png")
        )

        # Restart from the view: the header says restarting and every row starting at once;
        # the charts of the previous run stay until the new run reports.
        restart = _button(page, "Restart")
        restart.click()
        clicked = time.monotonic()
        _wait(
            "the header to say restarting, every row starting",
            lambda: (
                "(restarting)" in _header(page).inner_text()
                and [r["cells"][2] for r in _rows(page)] == ["● starting"] * 2
            ),
            timeout=3,
            period=0.05,
        )
        restarting_s = time.monotonic() - clicked
        assert len(_points(page, "loss")) == 2 and _previous_note(page)
        page.locator(".mlx-cluster-status").first.screenshot(path=str(restarting_shot))
        _wait("the restarted cluster", lambda: _idle_rows(page), timeout=90)
        assert "(running)" in _header(page).inner_text()
        assert not [n for n in _notices(page) if "busy" in n], _notices(page)
        assert len(_points(page, "loss")) == 2 and _previous_note(page)
        print(f"Restart: header said restarting {restarting_s * 1000:.0f} ms after the click")

        # New reports replace the previous run's charts.
        before = _prompt(page, 4)
        _run_cell(page, 4)
        _wait("the new run's charts", lambda: _previous_note(page) is None, timeout=30)
        _wait(
            "cell 4 to finish again",
            lambda: re.search(r"\[\d+\]", _prompt(page, 4)) and _prompt(page, 4) != before,
            timeout=60,
        )
        assert "Error" not in _output(page, 4), _output(page, 4)
        assert len(_points(page, "loss")) == 2

        # Stop keeps them (previous run) until Clear.
        stop.click()
        _wait("stopped", lambda: "(stopped)" in _header(page).inner_text(), timeout=30)
        _wait("the previous-run note", lambda: _previous_note(page) is not None, timeout=5)
        page.locator(".mlx-cluster-status button.mlx-clear").first.click()
        _wait("the charts to be cleared", lambda: _points(page, "loss") == [], timeout=10)
        page.locator(".mlx-cluster-status").first.screenshot(path=str(cleared_shot))

        # A kernel restart with a cluster running: every process goes with the kernel and
        # the view says so, its buttons off; no button claims the kernel is busy.
        restart.click()
        _wait("the restarted cluster", lambda: _idle_rows(page), timeout=90)

        # The toolbar's interrupt on a sleeping %%px cell: the notice, then one line per
        # rank saying where it stopped, lines numbered as the editor shows them (the %%px
        # line is line 1); no traceback.
        _run_cell(page, 8)
        _wait("the sleeping cell's ranks busy", lambda: _busy_rows(page), timeout=15)
        time.sleep(0.5)
        page.locator(
            ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-NotebookPanel-toolbar "
            "[data-command='notebook:interrupt-kernel']"
        ).first.click()
        interrupted = time.monotonic()
        _wait(
            "the interrupted cell to end",
            lambda: re.search(r"\[\d+\]", _prompt(page, 8)) is not None,
            timeout=15,
            period=0.05,
        )
        ended_s = time.monotonic() - interrupted
        said = _output(page, 8)
        print(f"toolbar interrupt: the cell ended {ended_s:.2f} s after the click: {said!r}")
        assert "Traceback" not in said and "Cell In[" not in said, said
        for rank in (0, 1):
            assert f"rank {rank}: KeyboardInterrupt at cell line 3 (time.sleep)" in said, said
        page.locator(f"{NB} .jp-Cell").nth(8).screenshot(
            path=str(artifacts / "px-interrupted-from-the-toolbar.png")
        )
        _wait("both ranks idle after the interrupt", lambda: _idle_rows(page), timeout=15)
        kernel = _kernel_process(lab)
        ours = kernel.children(recursive=True)
        assert ours, "the cluster's processes are the kernel's children"
        _lab_menu(page, "Kernel", "Restart Kernel…")
        page.locator(".jp-Dialog button.jp-mod-accept").click()
        _wait(
            "the view to say the cluster ended with its kernel",
            lambda: (
                "this cluster ended with its kernel"
                in page.locator(".mlx-cluster-status .mlx-broken").first.inner_text()
            ),
            timeout=15,
        )
        assert "(ended)" in _header(page).inner_text()
        for name in ("Stop", "Restart"):
            assert _button(page, name).is_disabled(), name
        assert all("mlx-stopped" in r["cls"] for r in _rows(page))
        _gone, alive = psutil.wait_procs([kernel, *ours], timeout=15)
        assert not alive, [p.pid for p in alive]
        time.sleep(3.5)  # past the moment a pending click would speak
        assert not [n for n in _notices(page) if "busy" in n], _notices(page)
        page.locator(".mlx-cluster-status").first.screenshot(path=str(ended_shot))


def _previous_note(page: Any, scope: str = NB) -> str | None:
    """The "metrics from the previous run" line above the charts, when shown."""
    text: str | None = page.evaluate(
        """(scope) => {
            const note = document.querySelector(scope + ' .mlx-cluster-status .mlx-previous-note span');
            return note ? note.innerText.trim() : null;
        }""",
        scope,
    )
    return text


def _kernel_process(lab: Lab) -> psutil.Process:
    """The notebook's kernel (the one ipykernel process the server runs)."""
    kernels = [
        p
        for p in psutil.Process(lab.proc.pid).children()
        if "ipykernel_launcher" in " ".join(p.cmdline())
    ]
    assert len(kernels) == 1, kernels
    return kernels[0]


def _lab_menu(page: Any, menu: str, item: str) -> None:
    """Choose ``item`` in JupyterLab's ``menu`` (the menu bar), as a person does."""
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=item).first.click()


def _idle_rows(page: Any) -> list[dict[str, Any]] | None:
    rows = _rows(page)
    ok = len(rows) == 2 and all("mlx-idle" in r["cls"] and "idle" in r["cells"][2] for r in rows)
    return rows if ok else None


def _busy_rows(page: Any, longer_than: float = -1.0) -> list[dict[str, Any]] | None:
    rows = _rows(page)
    busy = [
        r
        for r in rows
        if "mlx-busy" in r["cls"] and (_busy_seconds(r["cells"][3]) or -1.0) > longer_than
    ]
    return busy or None


# --------------------------------------------------------------------------- the view alone
def _open_notebook(page: Any, lab: Lab, name: str) -> None:
    page.goto(f"{lab.base}/lab/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell .jp-InputArea-editor", timeout=45_000)
    _wait(
        "the notebook's kernel to start",
        lambda: [k for k in lab.kernels() if k["execution_state"] == "idle"],
        timeout=45,
        period=0.5,
    )
    lab.remember_children()
    page.wait_for_selector(
        ".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator[data-status='idle']",
        timeout=90_000,  # (a kernel starts slowly on a busy machine)
    )


def _side_note(page: Any, scope: str) -> str | None:
    """The visible "also shown in the side panel" note of the view in ``scope``, else None."""
    text: str | None = page.evaluate(
        """(scope) => {
            const note = document.querySelector(scope + ' .mlx-cluster-status .mlx-side-note');
            return note && !note.hidden && note.offsetParent !== null ? note.innerText : null;
        }""",
        scope,
    )
    return text


def _notices(page: Any) -> list[str]:
    """Every visible answer line of every status view on the page."""
    texts: list[str] = page.evaluate(
        """() => Array.from(document.querySelectorAll('.mlx-cluster-status .mlx-notice'))
            .filter(n => !n.hidden && n.innerText.trim()).map(n => n.innerText.trim())"""
    )
    return texts


def _side_titles(page: Any) -> list[str]:
    """The titles of the side panels (their tabs in JupyterLab's right side bar)."""
    titles: list[str] = page.evaluate(
        """() => Array.from(document.querySelectorAll('.jupyterlab-sidecar')).map(p => {
            const tab = document.querySelector(`.lm-TabBar-tab[data-id="${p.id}"]`);
            return tab ? tab.innerText.trim() : '';
        })"""
    )
    return titles


def _table_fit(page: Any, scope: str) -> dict[str, Any]:
    """The status table's box in ``scope``: its content and visible widths, shown headers."""
    fit: dict[str, Any] = page.evaluate(
        """(scope) => {
            const box = document.querySelector(scope + ' .mlx-cluster-status .mlx-table-box');
            return {scroll: box.scrollWidth, client: box.clientWidth,
                    headers: Array.from(box.querySelectorAll('th'))
                        .filter(th => th.offsetParent !== null).map(th => th.innerText.trim())};
        }""",
        scope,
    )
    return fit


def _output(page: Any, index: int) -> str:
    cell = page.locator(f"{NB} .jp-Cell").nth(index)
    return "\n".join(cell.locator(".jp-OutputArea-output").all_inner_texts())


def _points(page: Any, metric: str, scope: str = NB) -> list[int]:
    """How many points each rank's line of ``metric`` has, as drawn."""
    return page.evaluate(
        """([scope, metric]) => Array.from(document.querySelectorAll(
            `${scope} .mlx-cluster-status svg.mlx-chart[data-metric="${metric}"] polyline`
        )).map(p => p.getAttribute('points').trim().split(/\\s+/).length)""",
        [scope, metric],
    )


@pytest.mark.kernel
def test_status_view_buttons_charts_and_side_panel(lab: Lab, artifacts: Path) -> None:

    shots = {
        "live": artifacts / "status-widget-live.png",
        "side": artifacts / "status-side-panel.png",
        "stopped": artifacts / "status-widget-stopped.png",
        "failure": artifacts / "status-view-failure.png",
    }
    for old in shots.values():
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    inline = ".jp-Notebook"
    side = ".jupyterlab-sidecar"
    with _lab_page(lab, shots["failure"]) as page:
        _open_notebook(page, lab, VIEW_NOTEBOOK)

        _run_cell(page, 0)
        _wait_executed(page, 0, timeout=60)
        page.wait_for_selector(f"{inline} .mlx-cluster-status.mlx-live", timeout=20_000)
        rows = _wait("4 rank rows", lambda: len(_rows(page)) == 4 and _rows(page), 10)
        assert [r["cls"] for r in rows] == [
            f"mlx-node mlx-{s}" for s in ("idle", "busy", "unresponsive", "dead")
        ]
        assert rows[2]["cells"][4] == "silent 9.0 s, process alive"
        assert rows[1]["cells"][3] == "4.0 s"
        header = _header(page).inner_text()
        assert (
            header == "MLX cluster (running): backend ring, 4 ranks on 4 hosts, uptime 12.0 s"
        )
        banner = page.locator(f"{inline} .mlx-banner")
        assert banner.is_visible() and "wait in all_sum #5" in banner.inner_text()

        # Metrics: one chart per name, one line per rank, x = step for loss, time else.
        charts = page.locator(f"{inline} svg.mlx-chart")
        _wait("two metric charts", lambda: charts.count() == 2, 10)
        assert _points(page, "loss") == [20, 20] and _points(page, "tok_s") == [20, 20]
        loss_chart = page.locator(f"{inline} svg.mlx-chart[data-metric='loss']")
        assert "step" in loss_chart.text_content()
        assert (
            "time (s)"
            in page.locator(f"{inline} svg.mlx-chart[data-metric='tok_s']").text_content()
        )
        legend = page.locator(f"{inline} .mlx-legend").inner_text()
        assert "rank 0" in legend and "rank 1" in legend

        # New points from a background thread are drawn while they come.
        _run_cell(page, 1)
        _wait_executed(page, 1, timeout=20)
        _wait("the loss lines to grow", lambda: min(_points(page, "loss") or [0]) >= 30, 15)
        page.locator(f"{inline} .mlx-cluster-status").screenshot(path=str(shots["live"]))

        # The topology tab shows the measured fabric.
        page.locator(f"{inline} button.mlx-tab-topology").click()
        page.wait_for_selector(f"{inline} .mlx-topology svg.mlx-topo-test")
        page.locator(f"{inline} button.mlx-tab-metrics").click()
        page.wait_for_selector(f"{inline} svg.mlx-chart")

        # "Side panel": the same live view opens on the right, without its own side button.
        side_button = page.locator(f"{inline} button.mlx-side")
        assert side_button.is_visible()
        side_button.click()
        page.wait_for_selector(f"{side} .mlx-cluster-status.mlx-live", timeout=15_000)
        _wait("the side panel's rows", lambda: len(_rows(page, side)) == 4, 10)
        assert not page.locator(f"{side} button.mlx-side").is_visible()
        _wait("the side button to be answered", side_button.is_enabled, 10)
        # The notebook's view says where the panel is; the panel does not say it of itself.
        _wait("the side note", lambda: _side_note(page, inline) is not None, 5)
        assert _side_note(page, side) is None
        assert _notices(page) == [], _notices(page)
        assert _side_titles(page) == ["status-view.ipynb: MLX cluster, 4 ranks"]
        # The table fits the narrow panel: columns drop, the heartbeat column stays.
        fit = _table_fit(page, side)
        assert fit["scroll"] <= fit["client"] and "heartbeat" in fit["headers"], fit
        assert "silent 9.0 s" in _rows(page, side)[2]["cells"][4]
        page.screenshot(path=str(shots["side"]))

        # From code, once the view has said it lives in JupyterLab: the open panel is
        # reused, not a second one.
        _run_cell(page, 2)
        _wait_executed(page, 2, timeout=20)
        said = _output(page, 2)
        assert (
            'already open in the side panel "status-view.ipynb: MLX cluster, 4 ranks"' in said
        ), said
        time.sleep(1)
        assert page.locator(f"{side} .mlx-cluster-status").count() == 1
        assert len(_side_titles(page)) == 1

        # Restart and replay: a choice under the Restart button, answered by Python.
        page.locator(f"{inline} button.mlx-restart-more").click()
        replay = page.locator(f"{inline} button.mlx-restart-replay")
        assert replay.is_visible() and replay.inner_text() == "Restart and replay"
        replay.click()
        restart = _button(page, "Restart")
        _wait("restart to be answered", lambda: restart.inner_text() == "Restart", 10)

        # Stop: the click shows at once, long before Python's answer (2 s later).
        stop = _button(page, "Stop")
        assert stop.is_enabled()
        stop.click()
        t0 = time.monotonic()
        _wait(
            "the click to show",
            lambda: stop.is_disabled() and stop.inner_text() == "stopping…",
            timeout=1.5,
            period=0.05,
        )
        shown_s = time.monotonic() - t0
        assert "(running)" in _header(page).inner_text()  # Python has not answered yet
        _wait(
            "the header to say stopped", lambda: "(stopped)" in _header(page).inner_text(), 10
        )
        _wait(
            "the side panel to say stopped",
            lambda: "(stopped)" in _header(page, side).inner_text(),
            5,
        )
        _wait(
            "Stop to read Stop again",
            lambda: stop.inner_text() == "Stop" and stop.is_disabled(),
            5,
        )
        assert all("mlx-stopped" in r["cls"] for r in _rows(page))
        page.locator(f"{inline} .mlx-cluster-status").screenshot(path=str(shots["stopped"]))
        print(f"click shown after {shown_s * 1000:.0f} ms")

        _run_cell(page, 3)
        _wait_executed(page, 3, timeout=20)
        assert _output(page, 3).strip() == "['restart True', 'stop']"


# --------------------------------------------------------------------------- two notebooks
def _side_scope(page: Any, title: str) -> str:
    """A CSS scope for the side panel titled ``title``."""
    ids: list[str] = page.evaluate(
        """(title) => Array.from(document.querySelectorAll('.jupyterlab-sidecar')).filter(p => {
            const tab = document.querySelector(`.lm-TabBar-tab[data-id="${p.id}"]`);
            return tab && tab.innerText.trim() === title;
        }).map(p => p.id)""",
        title,
    )
    assert len(ids) == 1, (title, ids, _side_titles(page))
    return f'.jupyterlab-sidecar[id="{ids[0]}"]'


def _open_from_file_browser(page: Any, lab: Lab, name: str, kernels: int) -> None:
    """Open ``name`` by a double click in JupyterLab's file browser; wait for its kernel."""
    page.locator(".jp-DirListing-item", has_text=name).first.dblclick()
    _wait(
        f"{kernels} idle kernels",
        lambda: len([k for k in lab.kernels() if k["execution_state"] == "idle"]) == kernels,
        timeout=45,
        period=0.5,
    )
    lab.remember_children()
    page.wait_for_selector(
        ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status='idle']",
        timeout=90_000,  # (a kernel starts slowly on a busy machine)
    )
    tab = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").first
    assert tab.is_visible()


def _start_and_show(page: Any) -> None:
    """Run the notebook's first three cells: load, start 2 ranks, show the view."""
    _run_cell(page, 0)
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")
    _wait_executed(page, 2, timeout=90)
    page.wait_for_selector(f"{NB} .mlx-cluster-status.mlx-live", timeout=15_000)
    _wait("2 idle rank rows", lambda: _idle_rows(page), timeout=20)


@pytest.mark.cluster
def test_side_panels_of_two_notebooks(no_leaks: None, lab: Lab, artifacts: Path) -> None:
    """Notebooks A and B each start a cluster and open a side panel: one panel per notebook,
    titled with its name and cluster, reused on a second click, the note in the notebook only
    while the panel is open; a kernel shut down leaves a view that says the cluster ended."""

    shots = {
        "a": artifacts / "side-panel-a-stopped.png",
        "two": artifacts / "side-panels-two-notebooks.png",
        "closed": artifacts / "side-panel-closed.png",
        "shutdown": artifacts / "status-widget-kernel-shut-down.png",
        "failure": artifacts / "side-panels-failure.png",
    }
    for old in shots.values():
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    a_name, b_name = TWO_NOTEBOOKS
    a_title, b_title = (f"{n}: MLX cluster, 2 ranks" for n in TWO_NOTEBOOKS)
    with _lab_page(lab, shots["failure"]) as page:

        # A: a cluster, its view, "Side panel".
        _open_notebook(page, lab, a_name)
        _start_and_show(page)
        side_a = page.locator(f"{NB} button.mlx-side")
        side_a.click()
        _wait("A's side panel", lambda: _side_titles(page) == [a_title], 15)
        a_panel = _side_scope(page, a_title)
        _wait("A's panel rows", lambda: len(_rows(page, a_panel)) == 2, 10)
        _wait("A's note", lambda: _side_note(page, NB) is not None, 5)
        assert _side_note(page, a_panel) is None and _notices(page) == [], _notices(page)
        fit = _table_fit(page, a_panel)
        assert fit["scroll"] <= fit["client"] and "heartbeat" in fit["headers"], fit

        # A second click reuses the panel.
        _wait("the side button to be answered", side_a.is_enabled, 10)
        side_a.click()
        _wait("the second click to be answered", side_a.is_enabled, 10)
        time.sleep(1)
        assert _side_titles(page) == [a_title]
        assert page.locator(".jupyterlab-sidecar .mlx-cluster-status").count() == 1

        # A stops its cluster; its panel says so.
        _run_cell(page, 3)
        _wait_executed(page, 3, timeout=30)
        _wait("A's panel to say stopped", lambda: "(stopped)" in _header(page, a_panel)
              .inner_text(), 10)  # fmt: skip
        page.screenshot(path=str(shots["a"]))

        # B, opened beside A: its own cluster and its own panel, titled with its name.
        _open_from_file_browser(page, lab, b_name, kernels=2)
        _start_and_show(page)
        side_b = page.locator(f"{NB} button.mlx-side")
        side_b.click()
        _wait("B's side panel", lambda: sorted(_side_titles(page)) == [a_title, b_title], 15)
        b_panel = _side_scope(page, b_title)
        _wait(
            "B's panel running", lambda: "(running)" in _header(page, b_panel).inner_text(), 10
        )
        assert "(stopped)" in _header(page, a_panel).inner_text()
        assert page.locator(b_panel).is_visible() and not page.locator(a_panel).is_visible()
        _wait("B's note", lambda: _side_note(page, NB) is not None, 5)
        assert _notices(page) == [], _notices(page)
        fit = _table_fit(page, b_panel)
        assert fit["scroll"] <= fit["client"] and "heartbeat" in fit["headers"], fit
        page.screenshot(path=str(shots["two"]))

        # With A's panel in front, "Side panel" in B brings B's panel back (not a new one).
        page.locator(f'.lm-TabBar-tab[data-id="{a_panel.split(chr(34))[1]}"]').click()
        _wait("A's panel in front", lambda: page.locator(a_panel).is_visible(), 5)
        assert not page.locator(b_panel).is_visible()
        side_b.click()
        _wait("B's panel in front again", lambda: page.locator(b_panel).is_visible(), 5)
        assert sorted(_side_titles(page)) == [a_title, b_title]

        # Closing B's panel takes B's note with it.
        tab = page.locator(f'.lm-TabBar-tab[data-id="{b_panel.split(chr(34))[1]}"]')
        # A middle click closes a JupyterLab tab (the small x lies under the rotated
        # label of a side-bar tab, where the browser's hit test finds the label).
        tab.click(button="middle")
        _wait("B's panel to close", lambda: _side_titles(page) == [a_title], 10)
        _wait("B's note to go", lambda: _side_note(page, NB) is None, 5)
        assert _notices(page) == [], _notices(page)
        page.screenshot(path=str(shots["closed"]))
        # ... and "Side panel" opens it again.
        _wait("the side button to be enabled", side_b.is_enabled, 10)
        side_b.click()
        _wait("B's panel again", lambda: sorted(_side_titles(page)) == [a_title, b_title], 15)

        # B's kernel shut down from the Kernel menu, its cluster running: the view says
        # the cluster ended with its kernel and its buttons are off.
        _lab_menu(page, "Kernel", "Shut Down Kernel")  # JupyterLab 4.6 asks nothing
        _wait(
            "B's view to say its cluster ended",
            lambda: (
                "this cluster ended with its kernel"
                in page.locator(f"{NB} .mlx-cluster-status .mlx-broken").first.inner_text()
            ),
            timeout=15,
        )
        assert _button(page, "Stop").is_disabled() and _button(page, "Restart").is_disabled()
        assert "(ended)" in _header(page).inner_text()
        page.screenshot(path=str(shots["shutdown"]))
