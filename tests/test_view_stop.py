"""A cell ended by the status view's Stop button says so in one plain line: a person's own
click is not a usage error (real IPython shell, real cluster)."""

from __future__ import annotations

import threading


def test_stop_in_the_view_ends_the_cell_with_a_plain_line(ip, capsys) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    view = cluster.status_view()
    capsys.readouterr()
    clicker = threading.Timer(2.0, lambda: view.click("stop"))
    clicker.start()
    try:
        result = ip.run_cell("%%px --progress-after -1\nimport time\ntime.sleep(30)")
    finally:
        clicker.join(60)
    out = capsys.readouterr()
    text = out.out + out.err
    assert type(result.error_in_exec).__name__ == "CellStopped"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines == ["the cell ended: the cluster was stopped from the status view"], text
    assert cluster.state == "stopped"


def test_restart_in_the_view_ends_the_cell_with_a_plain_line(ip, capsys) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    view = cluster.status_view()
    capsys.readouterr()
    clicker = threading.Timer(2.0, lambda: view.click("restart"))
    clicker.start()
    try:
        result = ip.run_cell("%%px --progress-after -1\nimport time\ntime.sleep(30)")
    finally:
        clicker.join(60)
    out = capsys.readouterr()
    text = out.out + out.err
    assert type(result.error_in_exec).__name__ == "CellStopped", text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines == ["the cell ended: the cluster was restarted"], text
    ip.run_cell_magic("px", "", "s = mx.distributed.all_sum(mx.array(1.0)).item()")
    assert cluster.view["s"] == [2.0, 2.0]
    ip.run_line_magic("mlx_cluster", "stop")
