"""``%mlx_cluster`` in a real IPython shell: help for every subcommand, one-line misuse, the
stop/restart confirmations, ``gather a b`` rendered, and the kernel spec (logo, preload)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from IPython.core.error import UsageError
from nbclient import NotebookClient
from PIL import Image

from mlx_cluster_magic import MLXCluster
from mlx_cluster_magic.cluster.magics import SUBCOMMANDS, GatherResults
from mlx_cluster_magic.rank.gather_summary import summarize
from mlx_cluster_magic.views.gather_view import GatherResult

from conftest import our_processes, wait_no_processes

ROOT = Path(__file__).parent.parent

# Every option of every subcommand, with the default its help must state (None: no default
# shown because the flag is off, or the help text says what is chosen instead).
HOSTS_OPTIONS = {
    "-n": "default 2",
    "--hosts": None,
    "--hostfile": None,
    "--python": None,
    "--ssh": "default: ssh",
}
OPTIONS: dict[str, dict[str, str | None]] = {
    "start": {
        **HOSTS_OPTIONS,
        "--backend": "else mpi",
        "--mpiexec": None,
        "--mpi-lib": None,
        "--workdir": None,
        "--controller-ip": None,
        "--ring-port": "default: 32323",
        "--connections-per-ip": "default: 1",
        "--timeout": "default: 60",
        "--grace": "default 60",
        "--no-live-status": None,
        "--check-collectives": None,
        "--collective-timeout": "default: 30",
        "--verbose": None,
        "--keep": None,
        "--runtime-on": None,
        "--idle-timeout": "default: 12h",
        "--farm": None,
        "--when-idle": None,
        "--yield-policy": "default: finish",
    },
    "stop": {},
    "restart": {"--replay": None, "--without": None},
    "status": {"--side": None},
    "nodes": {},
    "attach": {"id": "default: the only one"},
    "list": {},
    "detach": {},
    "add": {"host": None, "-n": None},
    "remove": {"host": None, "--drain": None},
    "gather": {"names": None},
    "sync": {"path": None, "--to": None, "--shards": None, "--verify": None},
    "why": {"--no-stacks": None, "--timeout": "default: 2"},
    "checks": {"{on,off}": None},
    "history": {},
    "links": {"--timeout": "default: 10", "--seconds": "shared out over the pairs"},
    "metrics": {},
    "plan": {"model_dir": None, "--memory": None, "--headroom": "default: 10%"},
    "doctor": {**HOSTS_OPTIONS, "--backend": None, "--timeout": "default: 10"},
    "setup": {
        "--hosts": None,
        "--hostfile": None,
        "--ssh": None,
        "--check": "change nothing",
        "--verify": "sha256",
    },
    "hosts": {"--discover": None, "--write": None},
    "network": {
        "--hosts": None,
        "--hostfile": None,
        "--configure": None,
        "--undo": None,
        "--over": "default: thunderbolt",
        "--layout": "default: auto",
        "--subnets": "default: 10.76.0.0/16",
        "--write": None,
        "--ssh": None,
        "--timeout": "default: 20",
    },
    "help": {"subcommand": None},
}


def magic(ip, line: str):  # type: ignore[no-untyped-def]
    return ip.run_line_magic("mlx_cluster", line)


def option_line(text: str, option: str) -> str:
    """The help entry of ``option``: its line and the wrapped lines after it."""
    m = re.search(rf"^  {re.escape(option)}(?=[ ,]|$).*(?:\n {{10,}}\S.*)*", text, re.M)
    assert m, f"{option} is not in the help:\n{text}"
    return " ".join(m.group(0).split())


def check_help(text: str, sub: str) -> None:
    assert f"usage: %mlx_cluster {sub} [-h]" in text
    assert "-h, --help" in text
    assert "(default: [])" not in text and "(default: None)" not in text, text
    for option, default in OPTIONS[sub].items():
        entry = option_line(text, option)
        if default is not None:
            assert default in entry, entry


def test_the_subcommands_are_the_documented_ones() -> None:
    assert set(SUBCOMMANDS) == set(OPTIONS)


@pytest.mark.parametrize("sub", sorted(OPTIONS))
def test_every_subcommand_prints_its_help(ip, capsys, sub: str) -> None:
    for line in (f"{sub} -h", f"{sub} --help", f"help {sub}", f"-h {sub}"):
        assert magic(ip, line) is None
        check_help(capsys.readouterr().out, sub)
    # -h wins over everything else on the line, and nothing runs
    assert magic(ip, f"{sub} --bogus -h") is None
    check_help(capsys.readouterr().out, sub)
    assert our_processes() == []


@pytest.mark.parametrize("line", ["-h", "--help", "help"])
def test_help_is_a_one_screen_overview(ip, capsys, line: str) -> None:
    assert magic(ip, line) is None
    text = capsys.readouterr().out
    lines = text.splitlines()
    # (one notebook output's height without scrolling: a line per subcommand, three above)
    assert len(lines) <= 30 and max(len(ln) for ln in lines) <= 100, text
    for sub in OPTIONS:
        assert len(re.findall(rf"^  {sub}  +\S", text, re.M)) == 1, f"{sub} not one line"
    assert "%mlx_cluster SUBCOMMAND -h shows one subcommand's options" in text
    assert "usage: %mlx_cluster start" not in text and "--collective-timeout" not in text


def test_help_all_lists_every_subcommand_with_its_options(ip, capsys) -> None:
    assert magic(ip, "help all") is None
    text = capsys.readouterr().out
    for sub in OPTIONS:
        assert re.search(rf"^  {sub}  +\S", text, re.M), f"{sub} missing from the overview"
        if sub != "help":
            usage = text.index(f"usage: %mlx_cluster {sub} [-h]")
            end = text.find("\nusage: ", usage + 1)
            check_help(text[usage : end if end > 0 else len(text)], sub)


def test_question_mark_shows_the_full_help(ip, capsys) -> None:
    ip.run_cell("%mlx_cluster?")
    text = capsys.readouterr().out
    assert "%mlx_cluster SUBCOMMAND -h" in text
    for sub in OPTIONS:
        if sub != "help":
            assert f"usage: %mlx_cluster {sub} [-h]" in text
    for option in OPTIONS["start"]:
        assert option in text
    assert "--collective-timeout S" in text and "(default: 30)" in text


def test_help_needs_no_cluster_and_starts_nothing(ip, capsys) -> None:
    magics = ip.magics_manager.registry["MLXClusterMagics"]
    assert magic(ip, "start -n 2 -h") is None
    assert magic(ip, "gather -h") is None  # no name demanded
    assert magic(ip, "stop --help") is None  # no "no cluster is running"
    assert magics.cluster is None
    assert our_processes() == []
    capsys.readouterr()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("-x", "unknown subcommand '-x'; use one of: start, stop"),
        ("help nope", "unknown subcommand 'nope'"),
        ("-h nope", "unknown subcommand 'nope'"),
        ("checks", "the following arguments are required: state"),
        ("checks maybe", "invalid choice: 'maybe'"),
        ("checks on", "no cluster is running: start one with %mlx_cluster start"),
        ("start --collective-timeout 0", "--collective-timeout: must be more than 0 seconds"),
        ("start --collective-timeout never", "'never' is not a number of seconds"),
        ("start --grace 0", "--grace: must be more than 0 seconds"),
        ("start --grace soon", "'soon' is not a number of seconds"),
        ("restart --without mac3", "no cluster to restart"),
        ("start --connections-per-ip 0", "--connections-per-ip: must be at least 1"),
        ("start --connections-per-ip two", "'two' is not a whole number"),
        ("start --bogus", "%mlx_cluster start -h lists the options"),
        ("status --side", "no cluster is running"),
        ("why", "no cluster to examine: start one with"),
        ("why --timeout -1", "--timeout: must be more than 0 seconds"),
        ("history", "no cluster yet"),
        ("metrics", "no cluster yet"),
        ("links", "no cluster is running"),
        ("links --timeout 0", "--timeout: must be more than 0 seconds"),
        ("restart --replay", "no cluster to restart"),
        ("stop now", "unrecognized arguments: now"),
        ("gather 'a", "No closing quotation"),
        ("plan", "the following arguments are required: model_dir"),
        ("plan /models/x", "no cluster to plan for: start one with"),
        ("plan /models/x --memory mac1:64GB", "--memory 'mac1:64GB': give HOST=SIZE pairs"),
        ("plan /models/x --memory mac1=lots", "memory of mac1: 'lots' is not a size"),
    ],
)
def test_misuse_is_one_line(ip, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        magic(ip, line)
    assert "\n" not in str(e.value).strip()
    assert our_processes() == []


def test_gather_of_several_names_renders_each_view(ip) -> None:
    a = GatherResult("a", [summarize(1), summarize(1)], ["h", "h"])
    b = GatherResult("b", [summarize([1.0, 2.0]), summarize([1.0, 3.0])], ["h", "h"])
    both = GatherResults([a, b])
    assert len(both) == 2 and both[1] is b
    shown, _ = ip.display_formatter.format(both)
    assert a._repr_html_() in shown["text/html"] and b._repr_html_() in shown["text/html"]
    assert shown["text/plain"] == f"{a!r}\n{b!r}"


def test_stop_and_restart_say_what_they_did(ip, capsys) -> None:
    cluster = magic(ip, "start -n 2")
    ip.run_cell_magic("px", "", "a = 7\nb = [1.0, 2.0 + world.rank()]")
    both = magic(ip, "gather a b")
    assert isinstance(both, GatherResults) and [r.name for r in both] == ["a", "b"]
    html = ip.display_formatter.format(both)[0]["text/html"]
    assert all(r._repr_html_() in html for r in both)
    # the doctor of the running cluster: its hosts, python and backend
    assert type(magic(ip, "doctor --timeout 10")).__name__ == "DoctorReport"
    capsys.readouterr()

    assert magic(ip, "restart") is cluster and cluster.running
    out = capsys.readouterr().out.strip()
    assert out.startswith("MLX cluster restarted: 2 ranks on 1 host, backend mpi")
    assert "fresh state" in out and "\n" not in out

    assert magic(ip, "stop") is None
    assert capsys.readouterr().out == "MLX cluster stopped: 2 ranks on 1 host, no process left\n"
    assert not cluster.running
    assert wait_no_processes() == []
    # stopping again is harmless and says so in one line
    assert magic(ip, "stop") is None
    assert capsys.readouterr() == ("no MLX cluster is running: nothing to stop\n", "")
    assert not cluster.running


def test_stop_with_no_cluster_says_there_is_nothing_to_stop(ip, capsys) -> None:
    capsys.readouterr()
    assert magic(ip, "stop") is None
    assert capsys.readouterr() == ("no MLX cluster is running: nothing to stop\n", "")


def test_new_subcommands_reach_the_cluster(ip, capsys) -> None:
    """The flags and subcommands of the hang doctor, fabric and metrics features on a running
    cluster: each answers with a value to display, or (links on one host, say) one line."""
    missing = [
        m
        for m in ("why", "check_collectives", "history", "links", "metrics")
        if not callable(getattr(MLXCluster, m, None))
    ]
    cluster = magic(ip, "start -n 2 --check-collectives --collective-timeout 5 --verbose")
    assert cluster.running and cluster.spec.check_collectives
    assert cluster.spec.collective_timeout == 5 and cluster.spec.verbose
    ip.run_cell_magic("px", "", "x = world.rank()")
    for sub, method in (
        ("why", "why"),
        ("why --no-stacks --timeout 1", "why"),
        ("checks off", "check_collectives"),
        ("checks on", "check_collectives"),
        ("history", "history"),
        ("links --timeout 5 --seconds 0.2", "links"),
        ("metrics", "metrics"),
    ):
        if method in missing:
            continue
        try:
            result = magic(ip, sub)
        except UsageError as e:  # an expected refusal is one line
            assert "\n" not in str(e).strip(), sub
            assert sub.split()[0] in ("links", "metrics"), f"{sub}: {e}"
            continue
        assert result is not None or sub.startswith(("checks", "metrics")), sub
        if sub.startswith("why"):
            assert len(result.ranks) == 2 and hasattr(result, "verdict")
    out = capsys.readouterr().out
    if "check_collectives" not in missing:
        assert "collective checks off\n" in out and "more than 5 s, fails the cell" in out
    assert "x = world.rank()" in repr(magic(ip, "history"))
    capsys.readouterr()
    magic(ip, "restart --replay")
    out = capsys.readouterr().out
    assert "MLX cluster restarted: 2 ranks on 1 host" in out and "replayed 1 cell" in out
    assert cluster.view["x"] == [0, 1]
    magic(ip, "stop")
    if missing:
        pytest.skip(f"cluster side not there yet: {', '.join(missing)}")


def test_metrics_say_how_to_report_then_show_datetimes_and_integer_steps(ip, capsys) -> None:
    import pandas as pd

    magic(ip, "start -n 2")
    capsys.readouterr()
    assert magic(ip, "metrics") is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("no metrics reported yet:")
    assert "report(step=i, loss=loss)" in out and "from mlx_cluster_magic import report" in out
    ip.run_cell_magic("px", "", "for i in range(3):\n    report(step=i, loss=1.0 / (i + 1))")
    deadline = time.monotonic() + 10
    frame = magic(ip, "metrics")
    while (frame is None or len(frame) < 6) and time.monotonic() < deadline:
        time.sleep(0.2)
        frame = magic(ip, "metrics")
    assert list(frame.columns) == ["rank", "name", "value", "step", "time"] and len(frame) == 6
    assert frame["step"].tolist() == [0, 1, 2, 0, 1, 2]
    assert pd.api.types.is_integer_dtype(frame["step"])
    assert pd.api.types.is_datetime64_any_dtype(frame["time"])
    assert abs(frame["time"].iloc[0] - pd.Timestamp.now()) < pd.Timedelta(minutes=1)
    magic(ip, "stop")


def test_loading_twice_keeps_the_cluster(ip) -> None:
    from mlx_cluster_magic.cluster import magics

    first = ip.magics_manager.registry["MLXClusterMagics"]
    magics.load_ipython_extension(ip)
    assert ip.magics_manager.registry["MLXClusterMagics"] is first


# --------------------------------------------------------------------------- kernel spec
def installed_spec() -> dict:
    listing = subprocess.run(
        [sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(listing.stdout)["kernelspecs"]["mlx-cluster"]


def test_kernel_spec_has_logos_in_the_checkout_the_wheel_and_the_install() -> None:
    source = ROOT / "jupyter-config" / "kernels" / "mlx-cluster"
    installed = Path(installed_spec()["resource_dir"])
    for folder in (source, installed):
        for px in (32, 64):
            with Image.open(folder / f"logo-{px}x{px}.png") as img:
                assert img.format == "PNG" and img.size == (px, px)
    # what JupyterLab's launcher is served for the kernel
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_server.services.kernelspecs.handlers import kernelspec_model

    spec = KernelSpecManager().get_kernel_spec("mlx-cluster")

    class Handler:
        base_url = "/"

    model = kernelspec_model(Handler(), "mlx-cluster", spec.to_dict(), spec.resource_dir)
    assert model["resources"] == {
        "logo-32x32": "/kernelspecs/mlx-cluster/logo-32x32.png",
        "logo-64x64": "/kernelspecs/mlx-cluster/logo-64x64.png",
    }
    # pip installs the kernel spec through data-files: the logos must be listed there
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("kernel.json", "logo-32x32.png", "logo-64x64.png"):
        assert f"jupyter-config/kernels/mlx-cluster/{name}" in pyproject


def test_build_outputs_are_ignored() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "build/", "mlx_cluster_magic.egg-info/", "dist/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == ["build/", "mlx_cluster_magic.egg-info/", "dist/"]


def test_notebooks_declare_the_cluster_kernel_and_run_py_falls_back() -> None:
    spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "notebooks/run.py")
    assert spec and spec.loader
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    for path in sorted((ROOT / "notebooks").glob("0[1-4]-*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        spec = nb.metadata.kernelspec
        assert (spec.name, spec.display_name) == ("mlx-cluster", "Python 3 (MLX cluster)")
        assert any("%load_ext mlx_cluster_magic" in c.source for c in nb.cells), path.name
        assert run.kernel_for(nb) == "mlx-cluster"
        nb.metadata.kernelspec.name = "not-installed-here"
        assert run.kernel_for(nb) == "python3"


def test_cluster_kernel_preloads_and_a_notebooks_load_ext_stays_silent(
    tmp_path: Path, no_leaks: None
) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext mlx_cluster_magic"),
        nbformat.v4.new_code_cell("%mlx_cluster start -h"),
    ]
    NotebookClient(
        nb, timeout=120, kernel_name="mlx-cluster", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert nb.cells[0].outputs == []
    outputs = nb.cells[1].outputs
    assert {o.output_type for o in outputs} == {"stream"}
    check_help("".join(o.text for o in outputs), "start")


def test_ring_connections_per_ip_from_the_magic(ip) -> None:
    cluster = magic(ip, "start -n 2 --backend ring --ring-port 31811 --connections-per-ip 2")
    assert cluster.spec.connections_per_ip == 2
    ip.run_cell_magic("px", "", "s = mx.distributed.all_sum(mx.arange(4) * (world.rank() + 1))")
    assert [v.tolist() for v in cluster.view["s"]] == [[0, 3, 6, 9]] * 2
