"""A kept cluster as a person uses it, in JupyterLab through a real (headless) Chromium: three
virtual Macs holding a 200 MB array and an mlx-lm model, the kernel restarted from the menu,
``attach``, the same engines and the live view back; a second notebook attaches and runs a cell,
stops the cluster, and the first notebook says so; nothing is left on any host."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kernels import stop_our_kept_clusters
from test_browser import (
    NB,
    Lab,
    _lab_menu,
    _lab_page,
    _missing,
    _open_from_file_browser,
    _open_notebook,
    _output,
    _prompt,
    _rows,
    _run_cell,
    _wait,
    _wait_executed,
    _write_notebook,
)
from test_keep_hosts import nothing_left

from conftest import virtual_macs

pytestmark = [pytest.mark.browser, pytest.mark.multihost, pytest.mark.kernel]

FIRST, SECOND = "kept-a.ipynb", "kept-b.ipynb"
SHOW = "import json\nprint(json.dumps([c.view['pid'], c.view['said'], c.view['size']]))"


@pytest.fixture(scope="module")
def macs() -> Iterator[Any]:
    with virtual_macs(3, "10.97.3.0/24", "kepb") as vc:
        yield vc


@pytest.fixture
def lab(tmp_path: Path, macs: Any) -> Iterator[Lab]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("mlx_lm")
    from mlx_cluster_magic.rank import lm

    llama = lm.write_tiny_llama(tmp_path / "tiny-llama", seed=0)
    hostfile = macs.hostfile(tmp_path / "hosts.json")
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / FIRST, [
        f"%load_ext mlx_cluster_magic\nc = %mlx_cluster start --hostfile {hostfile} "
        f"--ssh '{macs.rsh_agent}' --timeout 60 --keep",
        "%%px\nimport os\nimport numpy as np\nfrom mlx_lm import load, generate\n"
        "pid = os.getpid()\nbig = np.full(25 * 2**20, world.rank() + 1.5)  # 200 MB\n"
        f"model, tokenizer = load({str(llama)!r})\nsaid = generate(model, tokenizer, "
        "'the quick cat', max_tokens=12)\nsize = big.nbytes",
        "c",
        SHOW,
        "%load_ext mlx_cluster_magic\nc = %mlx_cluster attach",
        "c",
        "%%px\nsaid = generate(model, tokenizer, 'the quick cat', max_tokens=12)\n"
        "size = big.nbytes",
        SHOW,
        "%%px\n1",
    ])  # fmt: skip
    _write_notebook(root / SECOND, [
        "%load_ext mlx_cluster_magic\nc = %mlx_cluster attach",
        "%%px\nprint('second notebook', world.rank(), big.nbytes)",
        "%mlx_cluster stop",
    ])  # fmt: skip
    server = Lab(root)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        stop_our_kept_clusters()
        nothing_left(macs)


def _shown(page: Any, index: int) -> list[Any]:
    out = _output(page, index).strip().splitlines()
    value: list[Any] = json.loads(out[-1])
    return value


def _live_rows(page: Any, n: int = 3) -> list[dict[str, Any]] | None:
    rows = _rows(page)
    return rows if len(rows) == n and all("mlx-idle" in r["cls"] for r in rows) else None


def _run(page: Any, index: int, timeout: float = 120) -> str:
    _run_cell(page, index)
    _wait_executed(page, index, timeout=timeout)
    return _output(page, index)


def test_a_kept_cluster_through_a_kernel_restart_and_a_second_notebook_in_jupyterlab(
    lab: Lab, macs: Any, artifacts: Path
) -> None:
    with _lab_page(lab, artifacts / "keep-failure.png") as page:
        _open_notebook(page, lab, FIRST)
        out = _run(page, 0, timeout=120)
        found = re.search(r"kept cluster ([0-9a-f]{6}) \(its own runtime\)", out)
        assert found, out
        cluster_id = found.group(1)
        _run(page, 1, timeout=300)
        _run(page, 2)
        _wait("3 idle rank rows", lambda: _live_rows(page), timeout=30)
        _run(page, 3)
        pids, said, sizes = _shown(page, 3)
        assert sizes == [209715200] * 3 and len(set(said)) == 1 and said[0]

        # The kernel restarted from the menu: the old view says the cluster runs on.
        _lab_menu(page, "Kernel", "Restart Kernel…")
        page.locator(".jp-Dialog button.jp-mod-accept").click()
        words = f"the cluster runs on: %mlx_cluster attach {cluster_id} brings it back"
        _wait("the old view's last words", lambda: words in page.locator(
            f"{NB} .mlx-cluster-status .mlx-broken").first.inner_text(), timeout=30)  # fmt: skip
        page.locator(f"{NB} .mlx-cluster-status").first.screenshot(
            path=str(artifacts / "keep-after-restart.png")
        )
        assert all(psutil.pid_exists(p) for p in pids)  # (the virtual Macs share our pids)
        page.wait_for_selector(
            ".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator[data-status='idle']",
            timeout=90_000,
        )

        # attach: the same engines, the array and the model answer, the live view is back.
        out = _run(page, 4)
        assert f"attached to kept cluster {cluster_id}: 3 ranks on 3 hosts, running" in out
        _run(page, 5)
        _wait("the live view back, every rank idle", lambda: _last_view(page)["idle"] == 3,
              timeout=30)  # fmt: skip
        assert re.search(rf"MLX cluster \(running\): backend mpi, 3 ranks on 3 hosts, uptime "
                         rf"[^,]+, kept {cluster_id}", _last_view(page)["said"])  # fmt: skip
        _run(page, 6, timeout=180)
        _run(page, 7)
        assert _shown(page, 7) == [pids, said, [209715200] * 3]
        page.locator(f"{NB} .mlx-cluster-status").last.screenshot(
            path=str(artifacts / "keep-attached.png")
        )

        # A second notebook attaches, runs a cell, stops the cluster for both.
        _open_from_file_browser(page, lab, SECOND, kernels=2)
        out = _run(page, 0)
        assert f"attached to kept cluster {cluster_id}" in out
        out = _run(page, 1)
        for rank in range(3):
            assert f"second notebook {rank} 209715200" in out, out
        out = _run(page, 2, timeout=60)
        assert f"MLX cluster stopped (kept cluster {cluster_id}, for every notebook attached)" \
            in out, out

        # Back in the first notebook: its view and its next cell say who stopped it.
        page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=FIRST).first.click()
        _wait("the first notebook's view to say who stopped it", lambda: "stopped from another "
              "notebook" in _last_view(page)["said"], timeout=30)  # fmt: skip
        _run_cell(page, 8)
        _wait("the cell on the stopped cluster to answer",
              lambda: re.search(r"\[\d+\]", _prompt(page, 8)) is not None, timeout=30)  # fmt: skip
        out = _output(page, 8)
        assert "stopped from another notebook" in out and "Traceback" not in out, out
        page.locator(f"{NB} .mlx-cluster-status").last.screenshot(
            path=str(artifacts / "keep-stopped-elsewhere.png")
        )
    nothing_left(macs)


def _last_view(page: Any) -> dict[str, Any]:
    """The notebook's last status view: its idle rows and what its header and line say."""
    found: dict[str, Any] = page.evaluate(
        """(scope) => {
            const views = document.querySelectorAll(scope + ' .mlx-cluster-status');
            const v = views[views.length - 1];
            if (!v) return {idle: 0, said: ''};
            const idle = v.querySelectorAll('tr.mlx-node.mlx-idle').length;
            const said = Array.from(v.querySelectorAll('.mlx-header, .mlx-broken'))
                .map(e => e.innerText).join(' ');
            return {idle, said};
        }""",
        NB,
    )
    return found
