import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import invoke
from energytools.config import DataConfig
from energytools.energy import TemperatureRule
from energytools.stages.report import build_report, discover, read_runs, report, run_names, score_figures
from energytools.summaries import aggregate_runs
from energytools.table import DatasetRecord, TableMeta, TeacherRecord, load_table, write_parquet

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


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


def test_report_replaces_its_own_report_but_not_another_file(runner, digits_run, tmp_path):
    scores = digits_run["scores"]
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my notes</html>")
    refused = invoke(runner, "report", scores, "--out", mine, "--no-images")
    assert refused.exit_code == 2 and "mine.html already exists" in refused.stderr, refused.output
    assert mine.read_text() == "<html>my notes</html>"  # nothing lost
    assert invoke(runner, "report", scores, "--out", mine, "--no-images", "--overwrite").exit_code == 0
    assert "energytools report" in mine.read_text()
    again = invoke(runner, "report", scores, "--out", mine, "--no-images")  # its own report: replaced
    assert again.exit_code == 0, again.output
    kept = invoke(runner, "report", scores, "--out", mine, "--no-images", "--no-overwrite")
    assert kept.exit_code == 2 and "already exists" in kept.stderr


def test_report_file_is_self_contained(digits_run, tmp_path):
    out = report([digits_run["root"]], tmp_path / "report.html")
    text = out.read_text()
    assert text.count("Plotly.newPlot") >= 8 and "<script src=" not in text
    assert "data:image/png;base64" in text  # the image strips
    inputs = discover([digits_run["root"]])
    titles = [title for title, _, _ in build_report(inputs, thumbnails=False)]
    assert any(t.startswith("Scores") for t in titles) and any(t.startswith("Curation") for t in titles)


def test_train_and_test_tables_side_by_side(digits_run, tmp_path):
    from energytools.stages.score import ScoreConfig, score

    test_table = score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "test.parquet"),
                                   split="test", reference=str(digits_run["scores"])))
    sections = dict((title, figs) for title, figs, _ in build_report(discover([digits_run["scores"], test_table]),
                                                                    thumbnails=False))
    figures = sections["Tables compared"]
    assert not any(name.startswith("transitions") for name in figures)  # other samples: nothing to pair
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


# --- synthetic runs and tables, in the layout distill and score write ------------------------

def fake_run(directory: Path, method: str, seed: int, best: float, last: float, shards=(),
             temperatures=(6.0, 4.0, 2.0), epochs: int = 3) -> Path:
    """A distill run directory: metrics, config.json, summary.json and test predictions whose
    per-class accuracy is about ``best``%. Numbers carry many digits, as real ones do."""
    directory.mkdir(parents=True)
    write_parquet(pl.DataFrame({"epoch": range(1, epochs + 1), "val_acc": np.linspace(50, best + 1.23456789, epochs),
                                "test_acc": np.linspace(49, last, epochs), "seconds": [1.23456789] * epochs}),
                  directory / "metrics.parquet", {"kind": "metrics"})
    temps = dict(zip(("low", "mid", "high"), temperatures))
    config = {"stage": "distill", "method": method, "shards": list(shards), "train": {"seed": seed, "epochs": epochs},
              "temperature_plan": {"temperatures": temps, "rule": "groups"},
              "method_options": {} if method == "ce" else {"kd_temperature": 4.0}, "teacher": {"sha256": "a" * 64}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "summary.json").write_text(json.dumps({
        "method": method, "best_test_acc": best, "last_test_acc": last, "best_val_acc": best + 1.23456789,
        "seconds": 1.23456789 * epochs, "temperatures": temps, "augmented_samples": 3000 if shards else 0}))
    labels = np.repeat(np.arange(10), 30)
    right = np.random.default_rng(seed).random(len(labels)) < best / 100
    pred = np.where(right, labels, (labels + 1) % 10)
    write_parquet(pl.DataFrame({"sample_id": np.arange(len(labels)), "label": labels, "pred_best": pred,
                                "pred_last": pred}), directory / "test_predictions.parquet",
                  {"kind": "test_predictions", "classes": list(FASHION)})
    return directory


def fake_table(path: Path, energy: np.ndarray, split: str = "test", seed: int = 0) -> Path:
    """A score table of Fashion-MNIST's 10 classes (label = sample_id % 10) with these energies."""
    ids = np.arange(len(energy))
    energy = np.asarray(energy, dtype=np.float32)
    confidence = (1 / (1 + np.exp(energy + 11))).astype(np.float32)
    fitted = TemperatureRule().fit(energy, ids)
    groups, temps = fitted.assign(energy, ids)
    correct = np.random.default_rng(seed).random(len(ids)) < confidence
    labels = ids % 10
    frame = pl.DataFrame({"sample_id": ids, "label": labels, "pred": np.where(correct, labels, (labels + 1) % 10),
                          "correct": correct, "energy": energy, "confidence": confidence, "true_prob": confidence,
                          "entropy": 1 - confidence, "margin": confidence / 2, "energy_group": groups.astype(str),
                          "temperature": temps})
    meta = TableMeta(DataConfig(dataset="synthetic"), DatasetRecord("synthetic", split, len(ids), "0" * 64, 10, FASHION),
                     TeacherRecord("resnet8", "a" * 64, "teacher.pt", 10, 1), 4.0, fitted.rule, fitted.thresholds,
                     "this table", {}, {"samples": len(ids), "accuracy": float(correct.mean() * 100)}, {})
    return write_parquet(frame, path, meta.to_json())


#: six configurations (name, method, HE-DA, temperatures, accuracy offset); two seeds each
CONFIGS = [("ce", "ce", False, (6.0, 4.0, 2.0), -3.1), ("kd", "kd", False, (6.0, 4.0, 2.0), 0.0),
           ("energy-kd", "energy-kd", False, (6.0, 4.0, 2.0), 0.41234),
           ("energy-kd-246", "energy-kd", False, (2.0, 4.0, 6.0), -0.3),
           ("kd+he-da", "kd", True, (6.0, 4.0, 2.0), 1.27777), ("energy-kd+he-da", "energy-kd", True, (6.0, 4.0, 2.0), 1.9)]


@pytest.fixture
def many_runs(tmp_path):
    root = tmp_path / "study"
    for name, method, heda, temps, offset in CONFIGS:
        for seed in (0, 1):
            fake_run(root / "runs" / name / f"seed{seed}", method, seed, 80 + offset + 0.7 * seed + 0.123456789 * (seed + 1),
                     79.9 + offset + 0.2 * seed, shards=("he-da",) * heda, temperatures=temps)
    fake_table(root / "test.parquet", np.random.default_rng(0).normal(-12, 1.5, 600))
    return root


def table_rows(page: str, name: str) -> list[list[str]]:
    """The cell texts of each body row of the report's table ``name``."""
    table = re.search(rf"<table[^>]*data-table='{re.escape(name)}'.*?</table>", page, re.S).group(0)
    return [[html.unescape(re.sub("<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>.*?</td>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table.split("<tbody>")[1])]


def test_run_names_drop_the_seed(tmp_path):
    runs = [tmp_path / "study" / "kd" / "seed0", tmp_path / "study" / "kd" / "seed1", tmp_path / "study" / "ce-seed2",
            tmp_path / "study" / "ce_s3"]
    assert run_names(runs) == (["kd/seed0", "kd/seed1", "ce-seed2", "ce_s3"], ["kd", "kd", "ce", "ce_s3"])


def test_seeds_of_a_configuration_are_aggregated(many_runs):
    runs = read_runs(discover([many_runs]).runs)
    assert runs["config"].unique(maintain_order=True).to_list() == sorted(name for name, *_ in CONFIGS)
    assert runs.group_by("config").len()["len"].to_list() == [2] * 6
    page = report([many_runs], many_runs / "report.html", thumbnails=False).read_text()
    rows = {row[0]: row for row in table_rows(page, "comparison")}
    assert len(rows) == 6
    # the default baseline is kd without HE-DA, though kd+he-da's method is kd too
    assert rows["kd"][4] == "—" and rows["kd"][8] == "baseline" and "Δ vs kd" in page
    expected = aggregate_runs(runs.select("config", "seed", "best", "last"), "kd")
    energy = expected.filter(pl.col("config") == "energy-kd").row(0, named=True)
    assert rows["energy-kd"][:9] == [
        "energy-kd", "energy-kd", "2", f"{energy['best_mean']:.2f} ± {energy['best_std']:.2f}",
        f"{energy['delta_best_mean']:.2f} ± {energy['delta_best_std']:.2f}",
        f"{energy['last_mean']:.2f} ± {energy['last_std']:.2f}",
        f"{energy['delta_last_mean']:.2f} ± {energy['delta_last_std']:.2f}", "2/2", energy["verdict"]]
    assert rows["energy-kd"][9:] == ["1.2", "6 / 4 / 2", "0"]
    assert rows["energy-kd-246"][10] == "2 / 4 / 6" and rows["kd"][10] == "4 (one T)" and rows["ce"][10] == "—"
    assert rows["kd+he-da"][11] == "3000"
    assert len(table_rows(page, "runs")) == 12  # and every run on its own


def test_baseline_is_chosen_by_name(many_runs, runner):
    out = many_runs / "report.html"
    result = invoke(runner, "report", many_runs, "--out", out, "--no-images", "--baseline", "energy-kd")
    assert result.exit_code == 0, result.output
    rows = {row[0]: row for row in table_rows(out.read_text(), "comparison")}
    assert rows["energy-kd"][8] == "baseline" and rows["kd"][8] != "baseline" and "Δ vs energy-kd" in out.read_text()
    result = invoke(runner, "report", many_runs, "--out", out, "--baseline", "nope")
    assert result.exit_code == 2 and "--baseline nope names no configuration" in result.output


def test_per_class_accuracy_of_students_and_teacher_with_class_names(many_runs):
    page = report([many_runs], many_runs / "report.html", thumbnails=False).read_text()
    header = re.search(r"data-table='per-class-accuracy'><thead><tr>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th>(.*?)</th>", header)[:3] == ["class", "teacher (test split, test.parquet)", "ce"]
    rows = table_rows(page, "per-class-accuracy")
    assert [row[0] for row in rows] == [f"{i} {name}" for i, name in enumerate(FASHION)]
    predictions = [pl.read_parquet(many_runs / "runs" / "kd" / f"seed{s}" / "test_predictions.parquet") for s in (0, 1)]
    trouser = np.mean([(p.filter(pl.col("label") == 1)["pred_best"] == 1).mean() * 100 for p in predictions])
    kd_column = 2 + sorted(name for name, *_ in CONFIGS).index("kd")
    assert rows[1][kd_column] == f"{trouser:.2f}"
    scores, _ = load_table(many_runs / "test.parquet")
    assert rows[1][1] == f"{scores.filter(pl.col('label') == 1)['correct'].mean() * 100:.2f}"


def test_two_tables_on_the_same_samples_show_how_samples_move(tmp_path):
    energy = np.linspace(-15, -9, 100)
    swapped = energy.copy()
    swapped[[0, 99]] = swapped[[99, 0]]  # the lowest and the highest sample trade places
    a, b = fake_table(tmp_path / "a.parquet", energy), fake_table(tmp_path / "b" / "a.parquet", swapped)
    page = report([a, b], tmp_path / "report.html", thumbnails=False).read_text()
    assert table_rows(page, "transitions") == [["low", "19", "0", "1", "20"], ["mid", "0", "60", "0", "60"],
                                               ["high", "1", "0", "19", "20"]]
    assert re.search(r"A = [^/ ]+/a\.parquet \(test\) → B = b/a\.parquet \(test\)", page)  # same file names: folders too
    assert "2 samples (2.0%) change group" in page
    moved = table_rows(page, "moved")
    assert [(row[0], row[1], row[2]) for row in moved[:2]] == [("0", "0 T-shirt/top", "low → high"),
                                                               ("99", "9 Ankle boot", "high → low")]


def test_distill_and_train_write_test_predictions(digits_run, tmp_path):
    from energytools.config import DistillConfig, TrainConfig
    from energytools.models import load_checkpoint
    from energytools.stages.distill import distill

    run = tmp_path / "kd"
    result = distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(run), method="kd",
                                   cached_logits=True, train=TrainConfig(epochs=2, seed=0)))
    predictions = pl.read_parquet(run / "test_predictions.parquet")
    test_ids = DataConfig(dataset="digits").build("test").sample_ids
    assert predictions["sample_id"].to_list() == test_ids.tolist()
    assert (predictions["pred_best"] == predictions["label"]).mean() * 100 == pytest.approx(result.best_test_acc)
    assert (predictions["pred_last"] == predictions["label"]).mean() * 100 == pytest.approx(result.last_test_acc)
    teacher = pl.read_parquet(digits_run["teacher"].parent / "test_predictions.parquet")
    best = load_checkpoint(digits_run["teacher"])
    assert (teacher["pred_best"] == teacher["label"]).mean() * 100 == pytest.approx(best["test_acc"])
    # the report finds the teacher's run beside the table and compares per class on the test split
    page = report([digits_run["root"], run], tmp_path / "report.html", thumbnails=False).read_text()
    header = re.search(r"data-table='per-class-accuracy'><thead><tr>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["class", "teacher (test split, teacher/best.pt)", "kd"]
    rows = table_rows(page, "per-class-accuracy")
    three = teacher.filter(pl.col("label") == 3)
    assert rows[3][:2] == ["3 3", f"{(three['pred_best'] == 3).mean() * 100:.2f}"]


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


#: run in the page after load: each table's rows (present, visible: not clipped by a scrolling
#: box) and position, and every text node, as JSON in <pre id=check> for --dump-dom to return
CHECK_SCRIPT = """<script>
addEventListener('load', () => {
  const shown = el => {
    const r = el.getBoundingClientRect();
    if (r.width <= 0 || r.height <= 0 || getComputedStyle(el).visibility !== 'visible') return false;
    for (let box = el.parentElement; box; box = box.parentElement) {
      const s = getComputedStyle(box);
      if (s.display === 'none' || s.opacity === '0') return false;
      const b = box.getBoundingClientRect();
      if ((s.overflowX !== 'visible' || s.overflowY !== 'visible') && box !== document.documentElement
          && (r.top < b.top - 1 || r.bottom > b.bottom + 1 || r.left < b.left - 1 || r.right > b.right + 1)) return false;
    }
    return true;
  };
  const tables = [...document.querySelectorAll('table[data-table]')].map(t => {
    const r = t.getBoundingClientRect();
    return {name: t.dataset.table, top: r.top + scrollY, bottom: r.bottom + scrollY, right: r.right,
            rows: [...t.tBodies[0].rows].map(row => ({first: row.cells[0].textContent, shown: shown(row)}))};
  });
  const texts = [];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node; (node = walk.nextNode());) if (!node.parentElement.closest('script, style')) texts.push(node.data);
  const pre = document.createElement('pre');
  pre.id = 'check';
  pre.textContent = JSON.stringify({tables, texts, width: innerWidth});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make test installs it with apt-get)")
def test_report_reads_at_a_glance_in_headless_chromium(many_runs, tmp_path):
    """At 1400x900, as a person opens it: the whole comparison table on the first screen, every row
    of every table present and visible (no scroll box), no number with more than 4 decimals."""
    out = report([many_runs], tmp_path / "report.html", thumbnails=False)
    checked = tmp_path / "checked.html"
    checked.write_text(out.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--window-size=1400,900", "--hide-scrollbars"]
    shot_run = subprocess.run(cmd[:1] + ["--enable-logging=stderr", "--v=0"] + cmd[1:] + [f"--screenshot={shot}",
                              out.as_uri()], capture_output=True, text=True, timeout=120)
    console_errors = [line for line in shot_run.stderr.splitlines()
                      if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert not console_errors, console_errors
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1400) and pixels.std() > 5  # the first screen, not a blank page
    dom = subprocess.run(cmd + ["--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 8  # plotly drew the figures
    check = json.loads(html.unescape(re.search(r'<pre id="check">(.*?)</pre>', dom, re.S).group(1)))
    tables = {t["name"]: t for t in check["tables"]}
    # --dump-dom lays the page out 1400 wide as the screenshot does (its window is shorter, which
    # moves nothing): the table ends within the screenshot's 900 pixels
    assert check["width"] == 1400
    comparison = tables["comparison"]
    assert comparison["bottom"] <= 900 and comparison["right"] <= 1400  # on the first screen
    assert [row["first"] for row in comparison["rows"]] == sorted(name for name, *_ in CONFIGS)
    assert [row["first"] for row in tables["per-class-accuracy"]["rows"]] == [f"{i} {n}" for i, n in enumerate(FASHION)]
    assert [row["first"] for row in tables["per-class"]["rows"]] == [f"{i} {n}" for i, n in enumerate(FASHION)]
    hidden = [(t["name"], row["first"]) for t in check["tables"] for row in t["rows"] if not row["shown"]]
    assert not hidden
    long_numbers = [m for text in check["texts"] for m in re.findall(r"\d+\.\d{5,}", text)]
    assert not long_numbers
