import math
import re

import polars as pl
import pytest

from energytools.summaries import aggregate_runs, format_value, html_table, markdown_table, summary_cells

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
    assert a["verdict"] == "better"  # 1.33 > 2 * 0.289 / sqrt(3)
    b = row(out, "b")
    assert (b["paired"], b["wins"]) == (2, 1) and b["delta_best_mean"] == pytest.approx(0.05)
    assert b["verdict"] == "inside noise"  # 0.05 < 2 * 0.212 / sqrt(2)
    assert row(out, "d")["verdict"] == "worse"
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
    assert (kd["delta_best"], kd["delta_last"], kd["wins"]) == ("—", "—", "—")
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
