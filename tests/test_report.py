import shutil
import subprocess

import numpy as np
import polars as pl
import pytest

from energytools.stages.report import build_report, discover, report, score_figures
from energytools.table import load_table


def test_figures_hold_the_tables_numbers(digits_run):
    frame, meta = load_table(digits_run["scores"])
    figures = score_figures(frame, meta, "train")
    energy = figures["energy"]
    assert [trace.name for trace in energy.data] == ["low", "mid", "high"]
    edges = np.linspace(frame["energy"].min(), frame["energy"].max(), 61)
    for trace in energy.data:
        expected, _ = np.histogram(frame.filter(pl.col("energy_group") == trace.name)["energy"].to_numpy(), edges)
        assert np.asarray(trace.y).tolist() == expected.tolist()
        assert int(np.sum(trace.y)) == frame.filter(pl.col("energy_group") == trace.name).height
    lines = sorted(shape.x0 for shape in energy.layout.shapes)
    thresholds = meta.thresholds
    assert lines == pytest.approx(sorted([thresholds["low_max"], thresholds["high_min"]]))
    assert "Spearman" in figures["density"].layout.title.text


def test_report_file_is_self_contained(digits_run, tmp_path):
    out = report([digits_run["root"]], tmp_path / "report.html")
    text = out.read_text()
    assert text.count("Plotly.newPlot") >= 8 and "<script src=" not in text
    assert "data:image/png;base64" in text  # the image strips
    inputs = discover([digits_run["root"]])
    titles = [title for title, _, _ in build_report(inputs, thumbnails=False)]
    assert any(t.startswith("Scores") for t in titles) and any(t.startswith("Curation") for t in titles)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make test installs it with apt-get)")
def test_report_renders_in_headless_chromium(digits_run, tmp_path):
    out = report([digits_run["root"]], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--window-size=1200,1600", f"--screenshot={shot}", out.as_uri()]
    shot_run = subprocess.run(cmd[:1] + ["--enable-logging=stderr", "--v=0"] + cmd[1:], capture_output=True, text=True,
                              timeout=120)
    console_errors = [line for line in shot_run.stderr.splitlines()
                      if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert not console_errors, console_errors
    dom = subprocess.run(cmd[:-2] + ["--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count('class="main-svg"') >= 8  # plotly drew the figures
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 5  # not a blank page


def test_train_and_test_tables_side_by_side(digits_run, tmp_path):
    from energytools.stages.score import ScoreConfig, score

    test_table = score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "test.parquet"),
                                   split="test", reference=str(digits_run["scores"])))
    sections = dict((title, figs) for title, figs, _ in build_report(discover([digits_run["scores"], test_table]),
                                                                    thumbnails=False))
    figures = sections["Splits side by side"]
    assert [t.name for t in figures["split_density"].data] == ["scores.parquet (train)", "test.parquet (test)"]
    for trace in figures["split_density"].data:
        assert abs(float(np.sum(trace.y)) - 1.0) < 1e-9
    frame, meta = load_table(test_table)
    assert meta.group_source.startswith("reference train table")
    # the test rows are grouped by the train table's rule (its boundaries), not by their own quantiles
    train_frame, train_meta = load_table(digits_run["scores"])
    groups, temps = train_meta.fit_groups(train_frame).assign(frame["energy"].to_numpy(), frame["sample_id"].to_numpy())
    assert frame["energy_group"].to_list() == list(groups) and frame["temperature"].to_list() == temps.tolist()
    own, _ = meta.rule.fit(frame["energy"].to_numpy(), frame["sample_id"].to_numpy()).assign(
        frame["energy"].to_numpy(), frame["sample_id"].to_numpy())
    assert list(own) != list(groups)  # the reference made a difference, so the check above can fail
