"""``%%px`` as a person meets it: one line where there is nothing to run on, ipyparallel's own
behaviour for its flags and for ``%px``, ``%pxresult``, ``%pxconfig``, ``%autopx`` (their
parsers, help and variable expansion compared with the stock magics; their behaviour checked
side by side with ipyparallel's magics on a raw cluster), progress in the cell, replay of
completed cells after a restart, and ``stop()`` that is harmless to repeat."""

from __future__ import annotations

import _thread
import re
import threading
import time

import pytest
from IPython.core.error import UsageError

from mlx_cluster_magic.cluster.px import Progress, progress_rows


@pytest.mark.parametrize(
    ("magic", "kind"), [("px", "cell"), ("px", "line"), ("autopx", "line"), ("pxresult", "line")]
)
def test_no_cluster_is_one_line(ip, magic: str, kind: str) -> None:
    with pytest.raises(UsageError, match=r"^no cluster is running: start one with %mlx_cluster"):
        if kind == "cell":
            ip.run_cell_magic(magic, "", "x = 1")
        else:
            ip.run_line_magic(magic, "x = 1" if magic == "px" else "")


def test_stopped_and_broken_clusters_are_one_line(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    ip.run_line_magic("mlx_cluster", "stop")
    for run in (
        lambda: ip.run_cell_magic("px", "", "x = 1"),
        lambda: ip.run_line_magic("px", "x = 1"),
        lambda: ip.run_line_magic("autopx", ""),
    ):
        with pytest.raises(UsageError, match=r"^no cluster is running: start one with") as e:
            run()
        assert "\n" not in str(e.value)
    cluster.start(activate=True)
    cluster.abort("rank 1 on vm died while a cell ran")
    assert cluster.state == "broken"
    with pytest.raises(UsageError) as e:
        ip.run_cell_magic("px", "", "x = 1")
    assert str(e.value) == (
        "the MLX cluster is broken: rank 1 on vm died while a cell ran; "
        "%mlx_cluster restart brings it back"
    )
    from mlx_cluster_magic import MLXClusterError

    with pytest.raises(MLXClusterError, match="the MLX cluster is broken: rank 1 on vm died"):
        cluster.view  # noqa: B018
    ip.run_line_magic("mlx_cluster", "restart")
    assert cluster.state == "running" and cluster.broken_reason is None
    ip.run_cell_magic("px", "", "y = 2")
    assert cluster.view["y"] == [2, 2]


@pytest.fixture(scope="module")
def raw():
    """A raw ipyparallel cluster (MPI engines, ipyparallel's own defaults) for the side-by-side
    tests, started once; its processes are checked at the end of the module."""
    import os
    import sys

    import ipyparallel as ipp

    from conftest import SHARED_PIDS, our_processes, wait_no_processes

    # raw ipyparallel finds mpiexec on PATH; Open MPI refuses root unless told
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cluster = ipp.Cluster(engines="mpi", n=2, log_level=40)
    rc, mine = None, set()
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(2, timeout=60)
        mine = {pid for pid, _ in our_processes()}
        SHARED_PIDS.update(mine)
        yield rc
    finally:
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()
        SHARED_PIDS.difference_update(mine)
        assert wait_no_processes() == []


def _raw_and_ours(
    ip, capsys, rc, line: str, cell: str, interrupt_after: float | None = None, config: str = ""
):
    """Run the same %%px line on a raw ipyparallel cluster with ipyparallel's own magic, then
    on ours; return (stdout, stderr, raised) for each."""
    from ipyparallel.client.magics import ParallelMagics

    outs = []
    dv = rc[:]
    dv.block = True
    raw_magics = ParallelMagics(ip, dv)
    for magics in ("raw", "ours"):
        if magics == "raw":
            ip.magics_manager.register(raw_magics)
        else:
            ip.run_line_magic("mlx_cluster", "start -n 2")
        if config:
            ip.run_line_magic("pxconfig", config)
        timer = None
        if interrupt_after is not None:
            timer = threading.Timer(interrupt_after, _thread.interrupt_main)
            timer.start()
        raised = None
        try:
            ip.run_cell_magic("px", line, cell)
        except BaseException as e:
            raised = type(e).__name__
        finally:
            if timer is not None:
                timer.join()
        out, err = capsys.readouterr()
        outs.append((out, err, raised))
    rc.wait(timeout=30)  # the raw ranks finish the cell before the next test uses them
    return outs


@pytest.mark.parametrize("sig", ["SIGINT", "2", "0"])
def test_signal_on_interrupt_as_ipyparallel_does(ip, capsys, raw, sig: str) -> None:
    # (long enough that the interrupt, late on a loaded machine, still finds the cell running)
    cell = "import time\nprint('before')\ntime.sleep(6)\nprint('after')"
    (_raw_out, raw_err, raw_raised), (_out, err, raised) = _raw_and_ours(
        ip, capsys, raw, f"--no-stream --signal-on-interrupt {sig}", cell, interrupt_after=1.0
    )
    notice = f"Received Keyboard Interrupt. Sending signal {int(sig) if sig.isdigit() else sig}"
    assert notice in raw_err and notice in err
    assert raised is None
    # ipyparallel's own magic ends with a TimeoutError when the ranks were sent no signal
    # (its output display finds the cell still running); ours ends the cell quietly
    assert raw_raised == ("TimeoutError" if sig == "0" else None)
    assert "Traceback" not in err
    cluster = ip.magics_manager.registry["MLXClusterMagics"].cluster
    if sig == "0":  # no signal: the ranks keep going and finish the cell
        ar = ip.magics_manager.registry["MLXParallelMagics"].last_result
        ar.get(timeout=10)
        ar.wait_for_output(5)
        assert [s.strip() for s in ar.stdout] == ["before\nafter"] * 2
    assert cluster.running


def test_verbose_prints_ipyparallels_line(ip, capsys, raw) -> None:
    (raw_out, _, _), (out, _, _) = _raw_and_ours(
        ip, capsys, raw, "--progress-after -1", "pass", config="--verbose"
    )
    assert "Parallel execution on engine(s): [0, 1]" in raw_out
    assert "Parallel execution on engine(s): [0, 1]" in out


def test_progress_shows_each_rank_and_collapses_when_done() -> None:
    nodes = [
        {"rank": 0, "state": "busy"},
        {"rank": 1, "state": "unresponsive", "silent_s": 3.0},
        {"rank": 2, "state": "busy"},
    ]
    rows = progress_rows(nodes, done=[2], targets=[0, 1, 2], elapsed=12.3)
    assert rows == [
        (0, "busy", "12 s"),
        (1, "unresponsive", "12 s, silent 3 s, process alive"),
        (2, "done", ""),
    ]
    live = Progress.bundle(rows, 12.3)._repr_mimebundle_()
    assert live["text/plain"].startswith("1/3 ranks done after 12 s: rank 0 busy 12 s;")
    assert (
        live["text/html"].count("mlx-px-rank") == 3 and "mlx-px-unresponsive" in live["text/html"]
    )
    final = Progress.bundle([(r, "done", "") for r in range(3)], 14.0, final=True)
    assert final._repr_mimebundle_()["text/plain"] == "3/3 ranks done after 14.0 s"


def test_progress_appears_in_the_cell_after_progress_after(ip, capsys) -> None:
    ip.run_line_magic("mlx_cluster", "start -n 2")
    capsys.readouterr()
    # a terminal shell prints each display and update of the progress line as text
    ip.run_cell_magic("px", "--progress-after 0.5 --no-stream", "import time\ntime.sleep(2)")
    shown = [ln for ln in capsys.readouterr().out.splitlines() if "ranks done after" in ln]
    assert any("0/2 ranks done after" in s and "rank 1 busy" in s for s in shown), shown
    assert shown[-1].startswith("2/2 ranks done after")
    ip.run_cell_magic("px", "--progress-after -1 --no-stream", "import time\ntime.sleep(1)")
    assert "ranks done after" not in capsys.readouterr().out


def test_the_troubleshooting_page_states_the_interrupt_waits_the_code_uses() -> None:
    from pathlib import Path

    from mlx_cluster_magic.cluster.px import HOPELESS_S, INTERRUPT_GRACE_S

    page = Path(__file__).parents[1] / "docs" / "troubleshooting.md"
    text = " ".join(page.read_text().split())
    assert f"after {INTERRUPT_GRACE_S:g} s (`px.INTERRUPT_GRACE_S`)" in text
    assert f"or {HOPELESS_S:g} s (`px.HOPELESS_S`)" in text


def _history_settles(cluster, n: int) -> list:
    """The history once it holds ``n`` cells (a cell is recorded as it completes, by the
    thread that completes it)."""
    deadline = time.monotonic() + 5
    while len(cluster.history()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return cluster.history()


def test_history_has_noblock_cells_in_the_order_they_completed(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    slow = ip.run_cell_magic("px", "--noblock --targets 0", "import time\ntime.sleep(1.5)\nslow = 1")
    ip.run_cell_magic("px", "--targets 1", "fast = 1")
    assert [h.cell for h in cluster.history()] == ["fast = 1"]  # there when the cell returns
    slow.get(timeout=10)
    history = _history_settles(cluster, 2)
    assert [(h.cell, h.targets) for h in history] == [
        ("fast = 1", (1,)),
        ("import time\ntime.sleep(1.5)\nslow = 1", (0,)),
    ]
    # what the ranks ran: the cell after its %%px line, so line numbers are the editor's
    assert history[0].code == "# %%px --targets 1\nfast = 1"
    failed = ip.run_cell_magic("px", "--noblock", "1 / 0")
    with pytest.raises(Exception):  # noqa: B017 - a failed cell is not history
        failed.get(timeout=10)
    time.sleep(0.3)
    assert len(cluster.history()) == 2
    shown = repr(ip.run_line_magic("mlx_cluster", "history"))
    assert shown.index("[1] on ranks [1]:") < shown.index("[2] on ranks [0]:")


def test_cell_lines_are_numbered_as_the_editor_shows_them(ip) -> None:
    """The %%px line is line 1: in the ranks' tracebacks and in why's verdict."""
    from ipyparallel.error import CompositeError

    from mlx_cluster_magic.observe import stack_capture as stacks

    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    with pytest.raises(CompositeError) as e:
        ip.run_cell_magic("px", "--no-stream", "x = 1\ny = int('no')")
    assert stacks.traceback_where(e.value.elist[0][2]) == ("cell line 3", "int")
    cell = (
        "import time\n"  # 2
        "if world.rank() == 0:\n"  # 3
        "    mx.eval(mx.distributed.all_sum(mx.ones(3)))\n"  # 4
        "else:\n"  # 5
        "    time.sleep(3)\n"  # 6
        "    mx.eval(mx.distributed.all_sum(mx.ones(3)))\n"  # 7
    )
    ar = ip.run_cell_magic("px", "--noblock", cell)
    try:
        time.sleep(1.5)
        verdict = cluster.why(stacks=False).verdict
        assert re.match(
            r"rank 1 is behind: rank 0 waits in all_sum #\d+ \(cell line 4\); rank 1 issued \d+ "
            r"collectives? and is in time.sleep \(cell line 6\)$",
            verdict,
        ), verdict
    finally:
        ar.get(timeout=15)


def test_replay_restores_variables_defined_across_cells(ip) -> None:
    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    ip.run_cell_magic("px", "", "a = world.rank() + 10")
    ip.run_cell_magic("px", "", "b = mx.distributed.all_sum(mx.array(a)).item()")
    ip.run_cell_magic("px", "--no-replay", "c = 'not replayed'")
    ip.run_cell_magic("px", "--targets 1", "only_one = 1")
    with pytest.raises(Exception):  # noqa: B017 - a failed cell is not history
        ip.run_cell_magic("px", "", "1 / 0")
    assert [h.cell for h in cluster.history()] == [
        "a = world.rank() + 10",
        "b = mx.distributed.all_sum(mx.array(a)).item()",
        "only_one = 1",
    ]
    assert cluster.history()[2].targets == (1,)
    cluster.abort("a test")
    t = time.monotonic()
    cluster.restart(activate=True, replay=True)
    assert time.monotonic() - t < 30
    assert cluster.view["a"] == [10, 11] and cluster.view["b"] == [21, 21]
    assert cluster.client[1]["only_one"] == 1
    with pytest.raises(Exception, match="NameError"):
        cluster.view["c"]
    assert len(cluster.history()) == 3


def test_replay_stops_at_the_first_failure_with_its_error(ip, tmp_path) -> None:
    from mlx_cluster_magic import MLXClusterError

    cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
    flag = tmp_path / "present"
    flag.write_text("x")
    ip.run_cell_magic("px", "", "ok = 1")
    ip.run_cell_magic("px", "", f"open({str(flag)!r}).read()")
    ip.run_cell_magic("px", "", "later = 1")
    flag.unlink()
    with pytest.raises(
        MLXClusterError, match=r"replay stopped at cell 2 of 3: .*FileNotFoundError"
    ):
        cluster.restart(replay=True)
    assert cluster.running and cluster.view["ok"] == [1, 1]


# ----------------------------------------------------------------- parity with ipyparallel


def _stock_and_ours(shell):  # type: ignore[no-untyped-def]
    from ipyparallel.client.magics import ParallelMagics

    from mlx_cluster_magic.cluster.px import MLXParallelMagics

    return ParallelMagics(shell, None), MLXParallelMagics(shell, None, None)


#: The options we add to a stock magic, and where.
OUR_OPTIONS = {"px": {"--timeout", "--no-replay"}}


def _options(parser) -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    return {
        o: (a.dest, a.default, a.const, a.choices, a.type, a.nargs, a.metavar, a.help)
        for a in parser._actions
        for o in a.option_strings
    }


def test_every_magic_keeps_what_ipyparallels_decorators_give_it() -> None:
    """Each of ipyparallel's magics, ours against stock: the same names, every attribute the
    decorators attach (parser, no_var_expand, ...), the same options (ours may add some),
    every stock option and the stock description in the help."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.magic import MAGIC_NO_VAR_EXPAND_ATTR

    stock, ours = _stock_and_ours(InteractiveShell.instance())
    for kind in ("line", "cell"):
        assert set(ours.magics[kind]) == set(stock.magics[kind])
        for name, stock_fn in stock.magics[kind].items():
            s, o = stock_fn.__func__, ours.magics[kind][name].__func__
            where = f"%{'%' if kind == 'cell' else ''}{name}"
            assert set(vars(s)) <= set(vars(o)), f"{where} lost {set(vars(s)) - set(vars(o))}"
            assert getattr(o, MAGIC_NO_VAR_EXPAND_ATTR, False) == getattr(
                s, MAGIC_NO_VAR_EXPAND_ATTR, False
            ), where
            assert (s.__doc__ is None) == (o.__doc__ is None), where
            if s.__doc__:
                first = (s.parser.description if hasattr(s, "parser") else s.__doc__).strip()
                assert first.splitlines()[0] in o.__doc__, where
            if not hasattr(s, "parser"):
                continue
            stock_opts, our_opts = _options(s.parser), _options(o.parser)
            added = OUR_OPTIONS.get(name, set()) if kind == "cell" else set()
            assert set(our_opts) == set(stock_opts) | added, where
            for opt, spec in stock_opts.items():
                assert our_opts[opt] == spec, f"{where} {opt}"
            for opt in our_opts:
                assert opt in o.__doc__, f"{where}: help does not show {opt}"


@pytest.mark.parametrize("magics", ["stock", "ours"])
def test_help_with_a_question_mark_as_ipyparallels(capfd, magics: str) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    manager = shell.magics_manager
    chosen = _stock_and_ours(shell)[magics == "ours"]
    name = type(chosen).__name__
    saved = (
        manager.registry.get(name),
        {
            (kind, magic): manager.magics[kind].get(magic)
            for kind in ("line", "cell")
            for magic in chosen.magics[kind]
        },
    )
    manager.register(chosen)
    try:
        capfd.readouterr()
        shell.run_cell("%pxresult?")
        shown = capfd.readouterr().out
        assert "Print the result of the last asynchronous %px command" in shown
        assert "--group-outputs" in shown and "-o SAVE_NAME, --out SAVE_NAME" in shown
        shell.run_cell("%%px?")
        shown = capfd.readouterr().out
        assert "Executes the cell in parallel" in shown and "--signal-on-interrupt" in shown
        assert ("--timeout S" in shown and "--no-replay" in shown) == (magics == "ours")
    finally:
        for (kind, magic), before in saved[1].items():
            if before is None:
                manager.magics[kind].pop(magic, None)
            else:
                manager.magics[kind][magic] = before
        if saved[0] is None:
            manager.registry.pop(name, None)
        else:
            manager.registry[name] = saved[0]


_BLOCK = re.compile(r"^(?=\[(?:stdout|stderr|output):\d+\]|Out\[\d+:)", re.M)


def _norm(text: str, any_order: bool = False) -> str:
    """Output without what differs between two clusters: colours, the engines' execution
    counts and, with ``any_order`` (streamed output), the order in which the ranks' blocks
    arrived."""
    text = re.sub(r"Out\[(\d+):\d+\]", r"Out[\1:N]", re.sub(r"\x1b\[[0-9;]*m", "", text))
    if any_order:
        first, *blocks = _BLOCK.split(text)
        text = first + "".join(sorted(blocks))
    return text


def _side_by_side(ip, capsys, rc, steps):  # type: ignore[no-untyped-def]
    """Run ``steps(ip, view, shown)`` with ipyparallel's own magics on the raw cluster, then
    with ours on a fresh cluster of ours; ``shown()`` is what the steps printed since it was
    last called, (stdout, stderr), normalised. Return what the steps returned, raw then ours."""
    from ipyparallel.client.magics import ParallelMagics

    def shown(any_order: bool = True) -> tuple[str, str]:
        out, err = capsys.readouterr()
        return _norm(out, any_order), _norm(err, any_order)

    got = []
    for which in ("raw", "ours"):
        if which == "raw":
            view = rc[:]
            view.block = True
            magics = ParallelMagics(ip, view)
            ip.magics_manager.register(magics)
        else:
            cluster = ip.run_line_magic("mlx_cluster", "start -n 2")
            view = cluster.view
            magics = ip.magics_manager.registry["MLXParallelMagics"]
        capsys.readouterr()
        try:
            got.append(steps(ip, view, shown))
        finally:
            if magics._autopx:
                magics._disable_autopx()
    rc.wait(timeout=30)
    return got


PXRESULT_OPTIONS = ["", "-r", "-e", "--group-outputs=order", "--group-outputs engine", "-o saved"]


def test_pxresult_and_each_option_after_a_noblock_cell_as_ipyparallel(ip, capsys, raw) -> None:
    cell = (
        "import sys\nprint('out', 1)\nprint('err', 2, file=sys.stderr)\n"
        "display('first')\ndisplay('second')\n'last'"
    )

    def steps(ip, view, shown):  # type: ignore[no-untyped-def]
        ar = ip.run_cell_magic("px", "--noblock", cell)
        assert type(ar).__name__ == "AsyncResult"
        ar.get(timeout=30)
        ar.wait_for_output(5)
        shown()
        each = {}
        for opt in PXRESULT_OPTIONS:
            ip.run_line_magic("pxresult", opt)
            each[opt] = shown(any_order=False)  # shown once all is in: in a fixed order
        assert ip.user_ns.pop("saved") is ar
        timed = ip.run_cell("%time %pxresult")  # as in ipyparallel's documentation
        assert timed.success, timed.error_in_exec
        assert "Wall time" in shown()[0]
        return each

    raw_each, each = _side_by_side(ip, capsys, raw, steps)
    assert each == raw_each
    assert "[stdout:0] \nout 1\n" in raw_each[""][0]
    assert "[stderr:1] \nerr 2\n" in raw_each[""][1]
    assert "Out[1:N]: 'last'" in raw_each[""][0]
    assert raw_each["-o saved"] == ("", "")
    # the groupings differ from each other, so the comparison tells them apart
    assert len({raw_each[o][0] for o in ("", "-r", "-e")}) == 3


def test_braces_and_fstrings_in_px_reach_the_ranks_as_written(ip, capsys, raw) -> None:
    lines = {
        "y": 'y = f"{x}"',
        "s": "s = {x}",
        "d": "d = {}",
        "z": 'z = "{x}"',
        "t": 't = "$x"',
    }

    def steps(ip, view, shown):  # type: ignore[no-untyped-def]
        ip.user_ns["x"] = "client"
        ip.run_line_magic("px", 'x = "engine"')
        for line in lines.values():
            ip.run_cell(f"%px {line}").raise_error()
        return {name: view[name] for name in lines}, shown()

    raw_got, got = _side_by_side(ip, capsys, raw, steps)
    assert raw_got == (
        {
            "y": ["engine"] * 2,
            "s": [{"engine"}] * 2,
            "d": [{}] * 2,
            "z": ["{x}"] * 2,
            "t": ["$x"] * 2,
        },
        ("", ""),
    )
    assert got == raw_got


def test_px_after_pxconfig_targets_as_ipyparallel(ip, capsys, raw) -> None:
    def steps(ip, view, shown):  # type: ignore[no-untyped-def]
        ip.run_line_magic("px", "only = 0")
        ip.run_line_magic("pxconfig", "--targets 1")
        ip.run_line_magic("px", "only = 1")
        ip.run_line_magic("px", "print('only', only)")
        one = shown()
        ip.run_line_magic("pxconfig", "--targets all")
        ip.run_line_magic("px", "print('all', only)")
        return one, shown()

    raw_got, got = _side_by_side(ip, capsys, raw, steps)
    assert raw_got == (
        ("[stdout:1] \nonly 1\n", ""),
        ("[stdout:0] \nall 0\n[stdout:1] \nall 1\n", ""),
    )
    assert got == raw_got
    cluster = ip.magics_manager.registry["MLXClusterMagics"].cluster
    # the magics' targets are theirs: the cluster's own view (gather, broadcast) keeps every rank
    assert cluster.view.targets == [0, 1] and cluster.view.block
    assert cluster.gather("only").values == [0, 1]
    assert [h.targets for h in cluster.history()] == [None, (1,), (1,), None]


def test_autopx_on_and_off_as_ipyparallel(ip, capsys, raw) -> None:
    def steps(ip, view, shown):  # type: ignore[no-untyped-def]
        ip.run_cell("%autopx")
        on = shown()
        ip.run_cell("auto_v = 41 + 1")
        ip.run_cell("print('auto', auto_v)")
        remote = shown()
        ip.run_cell("%autopx")
        off = shown()
        ip.run_cell("auto_local = 1")
        return on, remote, off, view["auto_v"], "auto_v" in ip.user_ns, ip.user_ns.pop("auto_local")

    raw_got, got = _side_by_side(ip, capsys, raw, steps)
    assert raw_got == (
        ("%autopx enabled\n", ""),
        ("[stdout:0] \nauto 42\n[stdout:1] \nauto 42\n", ""),
        ("%autopx disabled\n", ""),
        [42, 42],
        False,
        1,
    )
    assert got == raw_got


def test_suffixed_views_and_magics_on_the_engines_as_ipyparallel(ip, capsys, raw) -> None:
    suffixed = {"px0", "pxresult0", "pxconfig0", "autopx0"}

    def steps(ip, view, shown):  # type: ignore[no-untyped-def]
        one = view.client[0]
        one.block = True
        one.activate("0")  # %px0 and the rest, on rank 0 only
        try:
            ip.run_line_magic("px0", "sv = 7")
            ip.run_line_magic("px0", "print('sv', sv)")
            on_one = shown()
            ip.run_cell_magic("px0", "", "print('cell', sv)")
            on_one_cell = shown()
            # the unsuffixed magics stay the cluster's (ours on our cluster)
            px = ip.magics_manager.magics["line"]["px"].__self__
            ip.run_line_magic("px", "print('both')")
            on_both = shown()
            # a magic run by each engine's own shell
            ip.run_line_magic("px", "%precision 3")
            set_ = shown()
            view.execute("fmt = get_ipython().display_formatter.formatters['text/plain']")
            view.execute("fmt = fmt.float_format")
            fmt = view["fmt"]
            ip.run_line_magic("px", "%precision")
            return on_one, on_one_cell, on_both, set_, shown(), fmt, type(px).__name__
        finally:
            for kind in ("line", "cell"):
                for name in suffixed:
                    ip.magics_manager.magics[kind].pop(name, None)

    raw_got, got = _side_by_side(ip, capsys, raw, steps)
    assert raw_got == (
        ("[stdout:0] \nsv 7\n", ""),
        ("[stdout:0] \ncell 7\n", ""),
        ("[stdout:0] \nboth\n[stdout:1] \nboth\n", ""),
        ("Out[0:N]: '%.3f'\nOut[1:N]: '%.3f'\n", ""),
        ("Out[0:N]: '%r'\nOut[1:N]: '%r'\n", ""),
        ["%.3f", "%.3f"],
        "ParallelMagics",
    )
    assert got == (*raw_got[:-1], "MLXParallelMagics")


# ----------------------------------------------------------------------------- stop()


def test_stop_and_close_on_a_stopped_cluster_return_quietly(no_leaks, capsys) -> None:
    from mlx_cluster_magic import MLXCluster

    cluster = MLXCluster(n=2).start()
    pids = [r["pid"] for r in cluster.ranks]
    cluster.close()
    assert cluster.state == "stopped" and not any(_alive(p) for p in pids)
    assert cluster.stop() is None and cluster.close() is None
    assert cluster.state == "stopped"
    cluster.start()
    cluster.abort("a test")
    cluster.stop()  # a broken cluster is cleared
    assert cluster.state == "stopped" and cluster.broken_reason is None
    cluster.stop()
    with MLXCluster(n=2) as inside:
        assert inside.running
        inside.stop()  # inside the block, then again by the block
    assert inside.state == "stopped"
    assert capsys.readouterr() == ("", "")


def test_stop_from_two_threads_at_once_stops_once(no_leaks) -> None:
    """Both calls return only once every rank is gone; the teardown runs once (counted by a
    profiler hook, which changes nothing)."""
    import mlx_cluster_magic.launch.bringup as bringup
    from mlx_cluster_magic import MLXCluster

    cluster = MLXCluster(n=2).start()
    pids = [r["pid"] for r in cluster.ranks]
    teardowns: list[str] = []
    returned: dict[str, object] = {}
    go = threading.Barrier(2)

    def count(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call" and frame.f_code is bringup.tear_down.__code__:
            teardowns.append(threading.current_thread().name)

    def stop(name: str) -> None:
        go.wait()
        try:
            cluster.stop(origin=name)
            returned[name] = [p for p in pids if _alive(p)]
        except BaseException as e:
            returned[name] = e

    threading.setprofile(count)
    try:
        threads = [threading.Thread(target=stop, args=(n,), name=n) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert returned == {"a": [], "b": []}
    assert len(teardowns) == 1, teardowns
    assert cluster.state == "stopped"
    assert cluster.stopped_by() == f"stopped from {teardowns[0]}"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
