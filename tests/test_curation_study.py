"""benchmarks/curation.py (the curation study of issue 38): its label corruption, its metric
checks, and the whole study end to end on digits, resumed without training again."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
curation = pytest.importorskip("curation")


def test_symmetric_noise_moves_the_rate_to_other_classes_only():
    labels = np.repeat(np.arange(10), 2000)
    noisy = curation.corrupt(labels, curation.Noise("symmetric", 0.2), 10, (), np.random.default_rng(0))
    changed = noisy != labels
    assert abs(changed.mean() - 0.2) < 0.01
    assert set(np.unique((noisy[changed] - labels[changed]) % 10)) == set(range(1, 10))  # never the same class


def test_pair_noise_swaps_within_the_pairs_and_leaves_other_classes_clean():
    labels = np.repeat(np.arange(10), 2000)
    noisy = curation.corrupt(labels, curation.Noise("pairs", 0.4), 10, ((0, 6), (2, 4)), np.random.default_rng(1))
    changed = noisy != labels
    assert set(zip(labels[changed], noisy[changed])) == {(0, 6), (6, 0), (2, 4), (4, 2)}
    for label in (0, 2, 4, 6):
        assert abs(changed[labels == label].mean() - 0.4) < 0.03
    assert not changed[~np.isin(labels, (0, 2, 4, 6))].any()


def test_label_aware_margin_is_negative_exactly_where_another_class_wins():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 0.5], [1.0, 1.0, 5.0]])
    margin = curation.label_aware_margin(logits, np.array([0, 0, 2]))
    assert margin[0] > 0 and margin[1] < 0 and margin[2] > 0


def test_ood_rows_match_scikit_learn():
    rng = np.random.default_rng(0)
    inside = {"energy_t1": -rng.normal(3, 1, 500), "confidence": rng.uniform(0.5, 1, 500),
              "max_logit": rng.normal(4, 1, 500)}
    outside = {"energy_t1": -rng.normal(2, 1, 300), "confidence": rng.uniform(0.3, 0.9, 300),
               "max_logit": rng.normal(3, 1, 300)}
    rows = curation.ood_rows(inside, outside)
    assert [r["score"] for r in rows] == ["energy", "msp", "max-logit"]
    assert all(r["check"] < 1e-9 and 0.5 < r["auroc"] < 1 for r in rows)


def test_the_study_runs_on_digits_writes_its_block_and_resumes_without_training_again(tmp_path):
    out, doc = tmp_path / "curation", tmp_path / "results.md"
    doc.write_text("# Results\n\nearlier text\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "curation.py"), "--smoke", "--out", str(out),
               "--doc", str(doc)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# Results\n\nearlier text") and curation.HEADING in text
    for section in ("### Label noise", "### Downstream", "### Out of distribution", "### Does Energy KD help"):
        assert section in text.split(curation.HEADING)[1]
    csv = pl.read_csv(doc.parent / "results" / "curation.csv")
    assert set(csv["part"]) == {"label noise", "ood", "students"}
    noise = csv.filter(pl.col("part") == "label noise")
    assert noise.height == 3 * 2 * 2 * 2  # noises x seeds x lengths x (in-sample, out-of-fold)
    assert noise["auroc_self_confidence"].is_between(0, 1).all()
    assert csv.filter(pl.col("part") == "ood")["check"].max() < 1e-9
    teacher = out / "noise" / "symmetric-20" / "seed0" / "folds-2" / "fold-1" / "best.pt"
    trained = teacher.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert teacher.stat().st_mtime_ns == trained
    assert doc.read_text().count("<!-- curation: begin -->") == 1
    assert len((out / "wall.jsonl").read_text().splitlines()) == 2  # every invocation writes its line
