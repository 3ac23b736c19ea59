"""The live status view's side panel in Jupyter Notebook 7 (a real ``python -m notebook`` server,
seen through a real headless Chromium): the view takes the page for Notebook 7, shows its "Side
panel" button, and a click opens the view, live, in Notebook 7's right-hand area (through the
``sidecar`` package and this package's front-end extension); collapsed with the area's own
button, "Side panel" brings it back. From a hand-built snapshot, no cluster. Screenshot: ``tests/artifacts/status-side-panel-notebook7.png``."""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_browser import (
    NB,
    Lab,
    _lab_page,
    _missing,
    _run_cell,
    _wait,
    _wait_executed,
    _write_notebook,
)
from test_browser_usage import PANEL_CELLS


def _no_notebook7() -> str | None:
    try:
        version = importlib.metadata.version("notebook")
    except importlib.metadata.PackageNotFoundError:
        return "notebook (Jupyter Notebook 7) is not installed"
    if int(version.split(".")[0]) < 7:
        return f"notebook {version} is installed, not Notebook 7"
    return _missing()


pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(_no_notebook7() is not None, reason=str(_no_notebook7())),
]

NOTEBOOK = "panel7.ipynb"
TITLE = f"{NOTEBOOK}: MLX cluster, 2 ranks"
CELLS = [
    PANEL_CELLS[0],  # the view, from a hand-built snapshot of 2 ranks
    # what Python was told, and what the code path (as %mlx_cluster status --side) answers
    "from mlx_cluster_magic.views.side_panel import detect_frontend\n"
    "print(detect_frontend(w)[0])\nprint(open_side_panel(w))",
    # the panel is live: a new snapshot shows there too
    "import dataclasses\nbusy = tuple(dataclasses.replace(n, state='busy', busy_s=7.0) for n in rows)\n"
    "w.update(ClusterSnapshot('running', 'mpi', 2, 1, 3.0, busy))",
]
#: The view in Notebook 7's right-hand area (sidecar's panel there).
SIDE = "#jp-right-stack .jupyterlab-sidecar"


@pytest.fixture
def notebook7(tmp_path: Path) -> Iterator[Lab]:
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / NOTEBOOK, CELLS)
    server = Lab(root, app="notebook")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _open(page: Any, server: Lab) -> None:
    """The notebook open in Notebook 7's own page (not JupyterLab's), its kernel idle."""
    page.goto(f"{server.base}/notebooks/{NOTEBOOK}?token={server.token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell .jp-InputArea-editor", timeout=45_000)
    _wait(
        "the notebook's kernel to start",
        lambda: [k for k in server.kernels() if k["execution_state"] == "idle"],
        timeout=45,
        period=0.5,
    )
    server.remember_children()
    assert page.locator(".jp-LabShell").count() == 0, "this page is JupyterLab's, not Notebook 7's"


def _output(page: Any, index: int) -> str:
    return page.locator(f"{NB} .jp-Cell").nth(index).locator(".jp-OutputArea").inner_text()


@pytest.mark.kernel
def test_side_panel_opens_in_notebook7s_right_area(notebook7: Lab, artifacts: Path) -> None:
    shot = artifacts / "status-side-panel-notebook7.png"
    failure_shot = artifacts / "status-side-panel-notebook7-failure.png"
    for old in (shot, failure_shot):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    with _lab_page(notebook7, failure_shot) as page:
        _open(page, notebook7)
        _run_cell(page, 0)
        _wait_executed(page, 0, timeout=60)
        view = f"{NB} .mlx-cluster-status"
        page.wait_for_selector(f"{view} tr.mlx-node")
        side = page.locator(f"{view} button.mlx-side").first
        _wait('the "Side panel" button', side.is_visible, 15)
        assert side.get_attribute("title") == "Show this view in a Notebook 7 side panel"
        assert page.locator(SIDE).count() == 0
        side.click()
        panel = page.locator(f"{SIDE} .mlx-cluster-status")
        _wait("the view in the right-hand area", lambda: panel.count() == 1, 20)
        _wait("the right-hand area on screen", panel.is_visible, 10)
        box, main = (
            page.locator("#jp-right-stack").bounding_box(),
            page.locator(NB).bounding_box(),
        )
        assert box and main and box["x"] >= main["x"] + main["width"] - 1, (box, main)
        assert panel.locator("tr.mlx-node").count() == 2
        assert panel.locator("button.mlx-side").is_hidden()  # no "Side panel" in the panel
        note = page.locator(f"{view} .mlx-side-note").first
        _wait("the notebook's view to say where", note.is_visible, 10)
        assert note.inner_text() == "also shown in the Notebook 7 side panel on the right"

        # Python knows the front end; the code path the magic takes finds the panel open
        _run_cell(page, 1)
        _wait_executed(page, 1, timeout=30)
        said = _output(page, 1)
        assert said.splitlines()[0] == "notebook7", said
        assert f'already open in the side panel "{TITLE}" on the right' in said, said
        assert page.locator(f"{SIDE} .mlx-cluster-status").count() == 1

        # the area's own collapse button hides the panel; "Side panel" brings it back
        page.locator("#jp-right-stack .jp-SidePanel-collapse").click()
        _wait("the right-hand area collapsed", panel.is_hidden, 10)
        side.click()
        _wait("the panel on screen again", panel.is_visible, 15)
        assert page.locator(f"{SIDE} .mlx-cluster-status").count() == 1

        # live: an update from the kernel shows in the panel
        _run_cell(page, 2)
        _wait_executed(page, 2, timeout=30)
        _wait(
            "the panel's rows to turn busy",
            lambda: panel.locator("tr.mlx-node.mlx-busy").count() == 2,
            10,
        )
        assert re.fullmatch(
            r"7\.0 s", panel.locator("tr.mlx-node td.mlx-col-busy").first.inner_text()
        )
        page.screenshot(path=str(shot))
