import math
import re

import polars as pl
import pytest

from energytools.summaries import (aggregate_runs, betainc, comparison_count, format_value, half_width, holm_adjust,
                                   holm_verdicts, html_table, markdown_table, summary_cells, t_cdf, t_p_value,
                                   t_quantile, verdict)

# seeds 0-2 of kd; "a" is 1.0, 1.5, 1.5 above it, "b" -0.1, +0.2 (two seeds), "d" about -1,
# "e" one seed, "c" a seed kd lacks; "seconds" is averaged, "method" taken from the first run
RUNS = pl.DataFrame({
    "config": ["kd"] * 3 + ["a"] * 3 + ["b"] * 2 + ["d"] * 3 + ["e", "c"],
    "seed": [0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 0, 5],
    "best": [80.0, 81.0, 79.0, 81.0, 82.5, 80.5, 79.9, 81.2, 79.0, 79.9, 78.1, 85.0, 90.0],
    "last": [80.0, 80.0, 80.0, 81.0, 81.0, 82.0, 80.0, 80.0, 79.0, 79.0, 79.0, 80.0, 90.0],
    "seconds": [10.0, 12.0, 14.0] * 4 + [1.0],
    "method": ["kd"] * 13,
})


def row(frame, config):
    return frame.filter(pl.col("config") == config).row(0, named=True)


def test_aggregate_runs_pairs_seeds_with_the_baseline():
    out = aggregate_runs(RUNS, "kd")
    assert out["config"].to_list() == ["kd", "a", "b", "d", "e", "c"]  # first-seen order
    a = row(out, "a")
    assert a["seeds"] == 3 and a["paired"] == 3 and a["wins"] == 3
    assert a["best_mean"] == pytest.approx(81.0 + 1 / 3) and a["best_std"] == pytest.approx(math.sqrt(13 / 12))
    assert a["delta_best_mean"] == pytest.approx(4 / 3) and a["delta_best_std"] == pytest.approx(math.sqrt(1 / 12))
    assert a["delta_last_mean"] == pytest.approx(4 / 3)
    assert a["seconds"] == pytest.approx(12.0) and a["method"] == "kd"
    assert a["verdict"] == "better"  # 1.33 > 4.303 * 0.289 / sqrt(3) = 0.72
    assert a["delta_best_ci"] == pytest.approx(4.302653 * math.sqrt(1 / 12) / math.sqrt(3), rel=1e-6)
    assert a["delta_best_lo"] == pytest.approx(4 / 3 - a["delta_best_ci"])
    b = row(out, "b")
    assert (b["paired"], b["wins"]) == (2, 1) and b["delta_best_mean"] == pytest.approx(0.05)
    assert b["verdict"] == "no difference detected (±1.91 at 95%)"  # 12.706 * 0.212 / sqrt(2)
    assert row(out, "d")["verdict"] == "worse"
    assert row(out, "d")["holm"] == "worse" and row(out, "a")["holm"] == "better"
    assert comparison_count(out, "kd") == 3  # a, b, d: e has one seed, c none
    assert row(out, "e")["verdict"] == "one seed"
    c = row(out, "c")
    assert (c["paired"], c["wins"], c["verdict"]) == (0, 0, "no common seed") and c["delta_best_mean"] is None
    assert row(out, "kd")["verdict"] == "baseline"


def test_the_baseline_is_paired_within_each_setting():
    other = RUNS.with_columns(pl.lit("lt").alias("setting"), best=pl.col("best") + pl.when(pl.col("config") == "kd")
                              .then(10.0).otherwise(0.0))
    out = aggregate_runs(pl.concat([RUNS.with_columns(pl.lit("bal").alias("setting")), other]), "kd", by=["setting"])
    assert row(out.filter(pl.col("setting") == "bal"), "a")["delta_best_mean"] == pytest.approx(4 / 3)
    assert row(out.filter(pl.col("setting") == "lt"), "a")["delta_best_mean"] == pytest.approx(4 / 3 - 10)


def test_cells_round_and_dash_the_baseline():
    cells = summary_cells(aggregate_runs(RUNS, "kd"))
    a, kd, e = row(cells, "a"), row(cells, "kd"), row(cells, "e")
    assert (a["best"], a["delta_best"], a["wins"]) == ("81.33 ± 1.04", "1.33 ± 0.29", "3/3")
    assert a["interval"] == "[0.62, 2.05]"
    assert (kd["delta_best"], kd["delta_last"], kd["wins"], kd["interval"]) == ("—", "—", "—", "—")
    assert e["interval"] == "—"
    assert (e["best"], e["delta_best"], e["wins"]) == ("85.00", "5.00", "1/1")  # one run: no spread to show
    assert format_value(-0.001) == "0.00" and format_value(None) == "—" and format_value(float("nan")) == "—"
    assert format_value(2.0 / 3, 3) == "0.667" and format_value(7) == "7"


def test_markdown_and_html_show_the_same_cells():
    cells = summary_cells(aggregate_runs(RUNS, "kd"))
    columns = {"config": "config", "best": "best", "Δ kd": "delta_best", "wins": "wins", "verdict": "verdict",
               "s/run": "seconds"}
    markdown = markdown_table(cells, columns, decimals={"seconds": 0})
    assert "| a | 81.33 ± 1.04 | 1.33 ± 0.29 | 3/3 | better | 12 |" in markdown.splitlines()
    page = html_table(cells, columns, name="comparison", decimals={"seconds": 0}, sort_keys={"best": "best_mean"})
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page.split("<tbody>")[1])
    assert len(rows) == cells.height
    first_a = [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>.*?</td>", rows[1])]
    assert first_a == ["a", "81.33 ± 1.04", "1.33 ± 0.29", "3/3", "better", "12"]
    assert re.search(r"data-sort='81\.333", rows[1])  # sorts by the mean, not by the text


def test_html_table_escapes_and_marks_rows():
    frame = pl.DataFrame({"name": ["<b>x</b>", "y|z"], "value": [1.234567, 2.0], "flag": [True, False]})
    page = html_table(frame, {"<i>name</i>": "name", "value": "value"}, name="t", highlight="flag")
    assert "<b>" not in page and "<i>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;i&gt;name" in page
    assert "<tr class=highlight>" in page and page.count("<tr") == 3 and "1.23<" in page
    assert "y\\|z" in markdown_table(frame, {"name": "name"})


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045),
                                       (math.inf, 1.960)])
def test_t_quantile_matches_the_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-table, abs=5e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-9)


def test_t_cdf_and_incomplete_beta_at_known_points():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(-2.0, 2) == pytest.approx(0.5 - 1 / math.sqrt(6), abs=1e-12)  # closed form for df 2
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # I_0.4(2, 3) = 0.5248
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_interval_and_verdict_need_three_seeds():
    assert half_width(1.0, 3) == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert half_width(1.0, 1) is None and half_width(float("nan"), 4) is None
    assert verdict(1.0, 0.1, 3) == "better" and verdict(-1.0, 0.1, 5) == "worse"
    # the interval at n = 2 excludes 0 (1 ± 12.7 * 0.01 / 1.41), but two seeds never give a verdict
    assert verdict(1.0, 0.01, 2) == "no difference detected (±0.09 at 95%)"
    assert verdict(1.32, 0.60, 3) == "no difference detected (±1.49 at 95%)"  # round 2's pruning headline
    assert verdict(0.5, None, 1) == "one seed" and verdict(None, None, 0) == "no common seed"
    assert t_p_value(1.32, 0.60 / math.sqrt(3), 3) == pytest.approx(0.0625, abs=1e-3)
    assert t_p_value(0.0, 0.3, 4) == pytest.approx(1.0) and t_p_value(1.0, 0.3, 1) is None


def test_holm_rejects_step_down():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_verdicts([0.01, 0.04, 0.03]) == ["different", "no difference detected", "no difference detected"]
    assert holm_verdicts([0.01, None, 0.02]) == ["different", "not tested", "different"]  # m = 2: 0.02, 0.02
    # (mean, se, n): t = 10 at df 4 (p 0.0006) and t = 3 (p 0.04, x2 = 0.08) and -10 with two seeds
    tests = [(1.0, 0.1, 5), (0.3, 0.1, 5), (-1.0, 0.1, 2)]
    assert holm_verdicts(tests) == ["better", "no difference detected", "no difference detected"]
    assert holm_verdicts([(-1.0, 0.1, 5)]) == ["worse"]
