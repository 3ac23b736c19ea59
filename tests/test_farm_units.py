"""The farm's pieces that need no cluster: macOS's HID idle time parsed from a real ``ioreg``
capture, the farm's start options and their one-line refusals, the sweep table from plain data,
and the remote engine's command line (no secret on it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_cluster_magic import MLXCluster, MLXClusterError
from mlx_cluster_magic.fabric.hid_idle import parse_duration, parse_idle_seconds
from mlx_cluster_magic.launch.farm_engines import remote_command
from mlx_cluster_magic.views.sweep_view import HostProgress, SweepProgress, render_html, text

MACOS = Path(__file__).parent / "fixtures" / "macos"


def test_hid_idle_time_from_a_real_ioreg_capture() -> None:
    tree = (MACOS / "ioreg-c-IOHIDSystem_mac-mini_notes-2026-05-18.txt").read_text()
    # "HIDIdleTime" = 40165394 (nanoseconds), among 30 other properties of the service
    assert parse_idle_seconds(tree) == pytest.approx(0.040165394)
    grep = (MACOS / "ioreg-c-IOHIDSystem-grep_mac-mini_notes-2026-05-18.txt").read_text()
    assert parse_idle_seconds(grep) == pytest.approx(0.031068206)


def test_hid_idle_time_absent_or_from_several_systems() -> None:
    assert parse_idle_seconds("") is None
    tree = (MACOS / "ioreg-c-IOHIDSystem_mac-mini_notes-2026-05-18.txt").read_text()
    assert parse_idle_seconds(tree.replace('"HIDIdleTime"', '"HIDIdle"')) is None
    # two HID systems: the owner touched the more recent one
    assert parse_idle_seconds(tree + '    | | |   "HIDIdleTime" = 12000000\n') == 0.012


@pytest.mark.parametrize(
    ("typed", "seconds"),
    [("5m", 300.0), ("90s", 90.0), ("1h", 3600.0), ("30", 30.0), ("1.5m", 90.0)],
)
def test_idle_durations(typed: str, seconds: float) -> None:
    assert parse_duration(typed) == seconds


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"when_idle": "5m"}, "--when-idle is for a farm: start with --farm"),
        ({"farm": True, "when_idle": "five"}, "--when-idle 'five' is not a duration"),
        ({"farm": True, "when_idle": "0s"}, "must be more than zero"),
        ({"farm": True, "yield_policy": "later"}, "--yield must be finish or requeue"),
    ],
)
def test_farm_options_refused_in_one_line(options: dict[str, object], words: str) -> None:
    with pytest.raises(MLXClusterError) as e:
        MLXCluster(n=1, **options)  # type: ignore[arg-type]
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_farm_is_declared_with_its_idle_policy() -> None:
    cluster = MLXCluster(n=2, farm=True, when_idle="5m", yield_policy="requeue")
    assert (cluster.spec.farm, cluster.spec.when_idle, cluster.spec.yield_policy) == (
        True,
        300.0,
        "requeue",
    )


def test_map_on_a_cluster_that_is_not_a_farm_says_so() -> None:
    with pytest.raises(MLXClusterError, match="no cluster is running"):
        MLXCluster(n=2).map(abs, [1])


def _progress(**changes: object) -> SweepProgress:
    base = {
        "total": 40, "done": 12, "running": 3, "queued": 25, "failed": 1, "elapsed_s": 65.0,
        "eta_s": 151.7, "last_result": "[11] 0.25",
        "hosts": (
            HostProgress("mac1", "lent", 1, 7, 1, 400.0),
            HostProgress("mac2", "in use", 1, 5, 1, 3.0),
            HostProgress("mac3", "lost", 1, 0, 0),
        ),
        "failures": ("item 4 on mac2: ValueError: bad <lr>",), "rerun": 1,
    }  # fmt: skip
    base.update(changes)
    return SweepProgress(**base)  # type: ignore[arg-type]


def test_the_sweep_table_in_text() -> None:
    shown = text(_progress())
    assert shown.splitlines()[0] == (
        "sweep 12/40 done, 3 running, 25 queued, 1 failed, 1 re-run elsewhere; 1m05s so far, "
        "2m32s left"
    )
    assert "last result: [11] 0.25" in shown
    rows = {line.split()[0]: line.split() for line in shown.splitlines()[3:6]}
    assert rows["mac1"][1:5] == ["lent", "1", "7", "1"]
    assert rows["mac2"][1:3] == ["in", "use"]
    assert rows["mac3"][1] == "lost"
    assert "failed: item 4 on mac2: ValueError: bad <lr>" in shown


def test_the_sweep_table_in_html_escapes_what_tasks_return() -> None:
    page = render_html(_progress(last_result="[3] <script>x</script>"))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "bad &lt;lr&gt;" in page
    assert "width:30.0%" in page  # 12 of 40 done
    assert "finished" in text(_progress(done=40, running=0, queued=0, finished=True))


def test_the_remote_engine_command_names_a_file_not_a_secret() -> None:
    line = remote_command(
        "/opt/venv/bin/python",
        "/work dir",
        {"MLX_CLUSTER_SECRETS_FILE": ".mlx-cluster/run/secrets.json", "MLX_CLUSTER_FARM_SLOT": "3"},
        ["--IPEngine.startup_command=import mlx.core as mx"],
    )
    assert line.startswith("cd '/work dir' && exec env ")
    assert "MLX_CLUSTER_FARM_SLOT=3" in line
    assert "-m mlx_cluster_magic.rank.farm_engine" in line
    assert "key" not in line.lower()
