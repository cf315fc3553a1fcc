"""The functional API (arrays in, arrays out) and score tables written from logits computed elsewhere."""
import json
import math

import numpy as np
import polars as pl
import pytest
import torch

import energytools as et
from conftest import invoke
from energytools.table import load_table


def _logits(n=200, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, classes)) * rng.uniform(0.5, 4.0, size=(n, 1)), rng.integers(0, classes, n)


def test_energy_is_minus_t_logsumexp_in_float64_and_takes_torch_too():
    logits, _ = _logits()
    for t in (1.0, 4.0):
        expected = [-t * math.log(sum(math.exp(v / t) for v in row)) for row in logits.tolist()]
        np.testing.assert_allclose(et.energy_scores(logits, energy_temperature=t), expected, rtol=1e-5)
    np.testing.assert_array_equal(et.energy_scores(torch.tensor(logits)), et.energy_scores(logits))


def test_sample_scores_need_labels_for_label_scores():
    logits, labels = _logits()
    assert {"true_prob", "el2n", "correct"} <= set(et.sample_scores(logits, labels))
    assert not {"true_prob", "el2n", "correct"} & set(et.sample_scores(logits))
    probs = torch.softmax(torch.tensor(logits), 1).numpy()
    np.testing.assert_allclose(et.sample_scores(logits)["confidence"], probs.max(1), rtol=1e-5)


def test_groups_and_temperatures_follow_the_tables_rule_with_ties_by_position():
    energies = np.array([3.0, 1.0, 1.0, 1.0, 2.0, 5.0, 4.0, 0.0, 2.0, 6.0])
    groups = et.energy_groups(energies, low_frac=0.2, high_frac=0.3)
    # lowest 2: energy 0.0 (pos 7) and the first of the tied 1.0s (pos 1); highest 3: 6, 5, 4
    assert groups.tolist() == ["mid", "low", "mid", "mid", "mid", "high", "high", "low", "mid", "high"]
    temps = et.sample_temperatures(energies, temperatures=(2, 4, 6), low_frac=0.2, high_frac=0.3)
    assert temps.dtype == np.float32 and temps.tolist() == [{"low": 2, "mid": 4, "high": 6}[g] for g in groups]
    rank = et.sample_temperatures(energies, temperatures=(2, 4, 6), rule="rank")
    assert rank.min() == 2 and rank.max() == 6 and rank[7] == 2 and rank[9] == 6
    # against a reference set: everything above the reference's highest 20% is high
    reference = np.arange(100.0)
    assert et.energy_groups(np.array([-1.0, 50.0, 99.5]), reference=reference).tolist() == ["low", "mid", "high"]


def test_select_indices_counts_modes_and_classes():
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    assert et.select_indices(scores, ratio=0.5, mode="high").tolist() == [0, 2, 4]
    assert et.select_indices(scores, ratio=0.5, mode="low").tolist() == [1, 3, 5]
    picked = et.select_indices(scores, ratio=0.5, mode="random", seed=3)
    assert len(picked) == 3 and picked.tolist() == et.select_indices(scores, ratio=0.5, mode="random", seed=3).tolist()
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert et.select_indices(scores, ratio=1 / 3, mode="high", labels=labels, per_class=True).tolist() == [0, 4]
    with pytest.raises(ValueError, match="per_class"):  # UserError is a ValueError
        et.select_indices(scores, ratio=0.5, per_class=True)


def test_bad_arrays_are_one_clear_error():
    with pytest.raises(et.UserError, match=r"shape \(N, C\)"):
        et.energy_scores(np.zeros(5))
    with pytest.raises(et.UserError, match="NaN or Inf, first at row 1"):
        et.energy_scores(np.array([[0.0, 1.0], [np.nan, 0.0]]))
    with pytest.raises(et.UserError, match="labels"):
        et.sample_scores(np.zeros((3, 2)), [0, 1])


LOGITS, LABELS = _logits(8, 4)
ENERGIES = np.linspace(-3.0, 3.0, 10)


@pytest.mark.parametrize("call,needle", [
    (lambda: et.energy_groups(np.r_[np.nan, ENERGIES[1:]]), "energies hold NaN or Inf, first at position 0"),
    (lambda: et.sample_temperatures(ENERGIES, reference=[np.inf, 1.0, 2.0]), "reference hold NaN or Inf"),
    (lambda: et.select_indices([np.nan, 1.0, 2.0, 3.0], ratio=0.25), "scores hold NaN or Inf"),
    (lambda: et.energy_groups(np.ones(10), sample_ids=np.zeros(10, int)), "sample_ids must be unique"),
    (lambda: et.sample_scores(LOGITS, LABELS, energy_temperature=-4), "energy_temperature must be a positive finite"),
    (lambda: et.energy_scores(LOGITS, energy_temperature=math.inf), "energy_temperature must be a positive finite"),
    (lambda: et.energy_scores(LOGITS, energy_temperature="4"), "energy_temperature must be a positive finite"),
    (lambda: et.sample_scores(LOGITS, LABELS + 0.5), "labels must be whole numbers"),
    (lambda: et.energy_scores(None), "logits must be an array of numbers"),
    (lambda: et.energy_scores([[1.0, 2.0], [3.0]]), "logits must be an array of numbers"),
    (lambda: et.energy_scores(np.array([[1e39, 0.0]])), "beyond float32's range"),
    (lambda: et.select_indices(ENERGIES, ratio="0.5"), "ratio must be a number"),
    (lambda: et.select_indices(ENERGIES, ratio=0.5, mode="random", seed=None), "seed must be a non-negative"),
    (lambda: et.sample_temperatures(ENERGIES, temperatures=5), "temperatures must be three numbers"),
    (lambda: et.energy_groups(ENERGIES, low_frac=None), "low_frac must be a number"),
])
def test_odd_inputs_are_one_user_error_naming_the_argument(call, needle):
    with pytest.raises(et.UserError, match=needle):
        call()


def test_other_layouts_and_spellings_give_the_same_answers():
    reversed_rows = LOGITS[::-1]  # a view with negative strides
    assert np.array_equal(et.energy_scores(reversed_rows), et.energy_scores(np.ascontiguousarray(reversed_rows)))
    float_labels = et.sample_scores(LOGITS, LABELS.astype(float))["true_prob"]
    assert np.array_equal(float_labels, et.sample_scores(LOGITS, LABELS)["true_prob"])
    assert np.array_equal(et.sample_temperatures(ENERGIES, temperatures="6,4,2"),
                          et.sample_temperatures(ENERGIES, temperatures=(6, 4, 2)))
    assert "logsumexp" in et.SIGN_CONVENTION
    with pytest.raises(ValueError, match="reduction must be one of"):
        et.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 4.0, reduction="meen")


def test_write_score_table_checks_names_range_and_labels(tmp_path):
    with pytest.raises(et.UserError, match="class_names must name the 4 classes"):
        et.write_score_table(tmp_path / "a.parquet", LOGITS, LABELS, class_names=["a", "b"])
    with pytest.raises(et.UserError, match="float16's range"):
        et.write_score_table(tmp_path / "b.parquet", LOGITS * 1e5, LABELS)
    with pytest.raises(et.UserError, match="labels are required"):
        et.write_score_table(tmp_path / "c.parquet", LOGITS, None)
    with pytest.raises(et.UserError, match="energy_temperature"):
        et.write_score_table(tmp_path / "d.parquet", LOGITS, LABELS, energy_temperature=0)
    assert not any(tmp_path.iterdir())  # nothing written for any of them
    table = et.write_score_table(tmp_path / "e.parquet", LOGITS, LABELS, class_names=np.array(list("abcd")))
    assert et.load_table(table)[1].dataset.classes == tuple("abcd")


def test_a_table_from_outside_logits_is_what_the_stages_take(tmp_path, runner):
    from energytools.data import build_dataset

    train = build_dataset("digits", "train")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(train), 10))
    logits[np.arange(len(train)), train.labels] += 4  # a teacher that is mostly right
    path = et.write_score_table(tmp_path / "scores.parquet", logits, train.labels, sample_ids=train.sample_ids,
                                dataset={"dataset": "digits"}, temperatures=(2, 4, 6), source="my model")
    frame, meta = load_table(path)
    assert meta.has_logits and meta.teacher.arch == "external" and meta.teacher.path == "my model"
    assert frame["sample_id"].to_list() == sorted(train.sample_ids.tolist())
    order = np.argsort(train.sample_ids)
    np.testing.assert_allclose(frame["energy"].to_numpy(), et.energy_scores(logits)[order], rtol=1e-6)
    expected = et.sample_temperatures(et.energy_scores(logits), temperatures=(2, 4, 6), sample_ids=train.sample_ids)
    np.testing.assert_array_equal(frame["temperature"].to_numpy(), expected[order])
    # select and distill --cached-logits take it from the CLI; report reads it
    assert invoke(runner, "select", "--scores", path, "--ratio", "0.25", "--mode", "low",
                  "--out", tmp_path / "drop.parquet").exit_code == 0
    result = invoke(runner, "distill", "--scores", path, "--student", "cnn_tiny", "--method", "energy-kd",
                    "--cached-logits", "--epochs", "1", "--out", tmp_path / "student")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["teacher"]["arch"] == "external"
    assert invoke(runner, "report", path, "--out", tmp_path / "r.html").exit_code == 0
    # without the teacher's file, what needs the teacher asks for it in one line
    result = invoke(runner, "augment", "--scores", path, "--out", tmp_path / "he-da")
    assert result.exit_code == 2 and "pass --teacher" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_write_score_table_refuses_what_does_not_fit(tmp_path):
    from energytools.data import build_dataset

    train = build_dataset("digits", "train")
    logits = np.zeros((len(train), 10))
    wrong = train.labels.copy()
    wrong[5] = (wrong[5] + 1) % 10
    with pytest.raises(et.UserError, match=f"labels differ from digits's at sample_id {train.sample_ids[5]}"):
        et.write_score_table(tmp_path / "a.parquet", logits, wrong, sample_ids=train.sample_ids,
                             dataset={"dataset": "digits"})
    with pytest.raises(et.UserError, match="sample ids of digits"):
        et.write_score_table(tmp_path / "b.parquet", logits[:10], train.labels[:10], dataset={"dataset": "digits"})
    assert not list(tmp_path.iterdir())
    # without a dataset: a table for select and report
    path = et.write_score_table(tmp_path / "c.parquet", *_logits())
    assert pl.read_parquet(path).height == 200 and load_table(path)[1].dataset.name == "external"


def test_the_notebook_example_runs(tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["functional_api.py", str(tmp_path)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "functional_api.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "pruning the easiest quarter drops 323 samples" in printed and "distilled from the table" in printed
    assert (tmp_path / "student" / "best.pt").exists()
