"""A cell ended by the status view's Stop or Restart button says so in one plain line: a
person's own click is not a usage error, nor a list of the ranks' errors (real IPython shell,
real cluster)."""

from __future__ import annotations

import threading

import pytest


@pytest.mark.parametrize(
    ("button", "line", "state"),
    [
        ("stop", "the cell ended: the cluster was stopped from the status view", "stopped"),
        ("restart", "the cell ended: the cluster was restarted", "running"),
    ],
)
def test_a_button_in_the_view_ends_the_cell_with_a_plain_line(
    ip, capsys, button: str, line: str, state: str
) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    view = cluster.status_view()
    capsys.readouterr()
    clicker = threading.Timer(2.0, lambda: view.click(button))
    clicker.start()
    try:
        result = ip.run_cell("%%px --progress-after -1\nimport time\ntime.sleep(30)")
    finally:
        clicker.join(60)
    out = capsys.readouterr()
    text = out.out + out.err
    assert type(result.error_in_exec).__name__ == "CellStopped", text
    assert [ln for ln in text.splitlines() if ln.strip()] == [line], text
    assert cluster.state == state
    if state == "running":  # the restarted cluster runs cells
        ip.run_cell_magic("px", "", "s = mx.distributed.all_sum(mx.array(1.0)).item()")
        assert cluster.view["s"] == [2.0, 2.0]
        ip.run_line_magic("mlx_cluster", "stop")
