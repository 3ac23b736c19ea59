"""How gathered variables read, from summaries made as the engines make them (no cluster)."""

from __future__ import annotations

import datetime as dt

import numpy as np

from mlx_cluster_magic.rank.gather_summary import summarize
from mlx_cluster_magic.views.gather_view import (
    GatherResult,
    GatherResults,
    render_many,
    series_svg,
)


def result(name: str, values: list[object]) -> GatherResult:
    return GatherResult(
        name, [summarize(v) for v in values], [f"mac{r}" for r in range(len(values))]
    )


def test_identical_and_differing_values_use_one_wording() -> None:
    same = result("same", [np.arange(6, dtype=np.int32).reshape(2, 3)] * 2)
    assert repr(same) == "same: identical on 2/2 ranks: int32[2, 3] min 0 mean 2.5 max 5"
    assert "identical on 2/2 ranks" in same._repr_html_()

    mine = result("mine", [np.array([0]), np.array([1]), np.array([0])])
    text = repr(mine)
    assert text.splitlines()[0] == "mine: differs from rank 0 on 1/3 ranks (rank 1)"
    assert "* rank 1 (mac1): int64[1]" in text
    html = mine._repr_html_()
    assert "differs from rank 0 on 1/3 ranks (rank 1)" in html
    assert html.count("mlx-diverged") == 1 and "background:#ffebee" in html  # values: red


def test_series_that_differ_are_neutral_with_axes_and_one_legend() -> None:
    losses = result("losses", [[1.0 / (i + 1) + 0.1 * r for i in range(20)] for r in range(2)])
    html = losses._repr_html_()
    assert "differs from rank 0 on 1/2 ranks (rank 1)" in html and "differs from rank 0" in repr(
        losses
    )
    assert "#c62828" not in html.split("<svg")[0] and "#ffebee" not in html  # not an alarm
    assert "mlx-neutral" in html
    assert html.count("<polyline class='mlx-series'") == 2
    assert ">step</text>" in html and html.count("class='mlx-legend'") == 2
    assert ">0</text>" in html and ">15</text>" in html  # x ticks: steps


def test_identical_series_draw_one_line() -> None:
    same = result("lr", [[0.1 * 0.9**i for i in range(10)]] * 3)
    html = same._repr_html_()
    assert "identical on 3/3 ranks" in html and html.count("<polyline class='mlx-series'") == 1


def test_constant_series_say_so_instead_of_a_flat_chart() -> None:
    flat = result("c", [[3.0] * 20] * 2)
    assert (
        repr(flat)
        == "c: identical on 2/2 ranks: float64[20] min 3 mean 3 max 3 (constant 3 at every step)"
    )
    html = flat._repr_html_()
    assert "constant 3 at every step" in html and "<svg" not in html
    per_rank = result("c", [[3.0] * 5, [4.0] * 5])
    assert "constant at every step: rank 0 3, rank 1 4" in repr(per_rank)
    assert "<svg" not in per_rank._repr_html_()


def test_arrays_speak_of_elements_and_histories_of_steps() -> None:
    flat = result("y", [np.array([2, 2, 2, 2])] * 2)
    assert repr(flat) == "y: identical on 2/2 ranks: int64[4] min 2 mean 2 max 2 (every element is 2)"
    assert "step" not in repr(flat) and "step" not in flat._repr_html_()
    per_rank = result("y", [np.full(4, 2.0), np.full(4, 3.0)])
    assert "all elements equal on each rank: rank 0 2, rank 1 3" in repr(per_rank)
    import mlx.core as mx

    ramp = result("y", [mx.arange(8), mx.arange(8) * 2])
    html = ramp._repr_html_()
    assert ">element</text>" in html and ">step</text>" not in html
    history = result("loss", [[1.0, 0.5, 0.25], [1.0, 0.6, 0.3]])
    assert ">step</text>" in history._repr_html_()


def test_log_scale_when_a_series_spans_decades() -> None:
    loss = result("loss", [[10.0 * 0.5**i for i in range(20)], [11.0 * 0.5**i for i in range(20)]])
    html = loss._repr_html_()
    assert "loss (log)" in html
    assert "(log)" not in result("acc", [[0.5 + 0.01 * i for i in range(20)]] * 2)._repr_html_()


def test_strings_and_datetimes_are_shown_not_crashed() -> None:
    words = result("words", [np.array(["alpha", "beta", "gamma"])] * 2)
    assert repr(words) == "words: identical on 2/2 ranks: <U5[3] ['alpha' 'beta' 'gamma']"
    assert words.summaries[0].series is None and words.summaries[0].kind == "array"
    days = np.array(["2026-01-01", "2026-01-02"], dtype="datetime64[D]")
    when = result("when", [days, days + np.timedelta64(1, "D")])
    assert "datetime64[D][2] ['2026-01-01' '2026-01-02']" in repr(when)
    assert "differs from rank 0 on 1/2 ranks (rank 1)" in when._repr_html_()
    stamps = result("stamps", [np.array([dt.datetime(2026, 1, 1), None], dtype=object)] * 2)
    assert stamps.agree and "object[2]" in repr(stamps)  # object arrays compare by value
    long = summarize(np.array([f"word{i}" for i in range(1000)]))
    assert len(long.text) < 200 and long.text.startswith("<U7[1000] [")


def test_several_names_render_each_view() -> None:
    both = render_many([result("a", [1, 1]), result("b", [1, 2])])
    assert isinstance(both, GatherResults) and isinstance(both, list) and len(both) == 2
    assert repr(both).splitlines()[0] == "a: identical on 2/2 ranks: 1"
    assert "b: differs from rank 0 on 1/2 ranks (rank 1)" in repr(both)
    html = both._repr_html_()
    assert html.count("class='mlx-gather ") == 2


def test_series_svg_keeps_its_signature() -> None:
    svg = series_svg([[1.0, 2.0, 3.0], [1.0, 2.5, 3.5]], "x")
    assert svg.count("<polyline class='mlx-series'") == 2 and ">x per rank</text>" in svg
    assert series_svg([], "x") == ""
