"""Out-of-fold scores: `train --folds K` (a stratified, seeded split; K fold teachers; a stopped
run continues), `score --teacher DIR` (each train row by its fold's teacher, val by the mean of
the K), the refusals (a missing or foreign fold; one teacher wanted by distill and augment)."""
import json
import os
import shutil

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from conftest import invoke
from energytools import preemption
from energytools.api import score, train
from energytools.config import DataConfig
from energytools.errors import UserError
from energytools.folds import assign_folds, read_manifest
from energytools.io import sha256_file
from energytools.models import load_checkpoint
from energytools.table import METADATA_KEY, load_table, scores_out_of_fold

K = 3
#: the digits recipe of every fold run here: 300 training samples, 7 steps an epoch
RECIPE = {"dataset": "digits", "limit": 300, "eval_limit": 100, "epochs": 1, "batch_size": 32, "seed": 0,
          "device": "cpu"}


def cli_flags(recipe: dict) -> list:
    return [str(a) for key, value in recipe.items() for a in (f"--{key.replace('_', '-')}", value)]


@pytest.fixture(autouse=True)
def no_stop_left_over():
    preemption.reset()
    yield
    preemption.reset()


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """K fold teachers on digits, trained without a stop."""
    out = tmp_path_factory.mktemp("folds") / "folds"
    train("cnn_tiny", out, folds=K, **RECIPE)
    return out


@pytest.fixture(scope="module")
def oof(folds):
    """The out-of-fold train table (with logits) and the val table of the fold teachers."""
    root = folds.parent
    return {"train": score(folds, root / "oof.parquet", save_logits=True),
            "val": score(folds, root / "oof-val.parquet", split="val", save_logits=True)}


def stored_logits(path) -> np.ndarray:
    return np.stack(pl.read_parquet(path)["logits"].to_numpy()).astype(np.float32)


def same_weights(a, b) -> bool:
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_split_is_stratified_deterministic_and_puts_each_sample_in_one_fold():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 203)
    ids = rng.permutation(1000)[:203]  # ids need not be positions
    folds = assign_folds(labels, ids, 5, seed=7)
    assert folds.shape == (203,) and set(folds.tolist()) == set(range(5))  # one fold each, every fold used
    assert np.ptp(np.bincount(folds)) <= 1  # fold sizes differ by at most one
    for c in range(4):  # and so do each class's counts per fold
        assert np.ptp(np.bincount(folds[labels == c], minlength=5)) <= 1
    assert np.array_equal(assign_folds(labels, ids, 5, seed=7), folds)  # the seed decides
    assert not np.array_equal(assign_folds(labels, ids, 5, seed=8), folds)
    order = rng.permutation(203)  # not the order the samples come in
    assert np.array_equal(assign_folds(labels[order], ids[order], 5, seed=7), folds[order])
    with pytest.raises(UserError, match="at least 2"):
        assign_folds(labels, ids, 1, seed=0)
    with pytest.raises(UserError, match="fewer than the folds"):
        assign_folds(labels[:3], ids[:3], 5, seed=0)


def test_train_folds_writes_each_fold_run_and_the_manifest(folds):
    manifest, frame = read_manifest(folds)
    train_set = DataConfig(dataset="digits", limit=300).build("train")
    assert (manifest.folds, manifest.seed) == (K, 0)
    assert manifest.dataset["fingerprint"] == train_set.fingerprint()  # the training split after the val carve
    assert frame["sample_id"].to_list() == sorted(train_set.sample_ids.tolist())
    assert np.array_equal(frame["fold"].to_numpy(), assign_folds(frame["label"], frame["sample_id"], K, 0))
    for k in range(K):
        run = folds / f"fold-{k}"
        assert {"best.pt", "last.pt", "metrics.parquet", "config.json"} <= {p.name for p in run.iterdir()}
        assert manifest.teachers[k] == sha256_file(run / "best.pt")
        meta = load_checkpoint(run / "best.pt")["energytools"]
        assert meta["fold"] == manifest.fold_record(k)
        # fold k's teacher trained on the training split less fold k
        held_out = frame.filter(pl.col("fold") == k)["sample_id"].to_numpy()
        rest = train_set.subset(np.flatnonzero(~np.isin(train_set.sample_ids, held_out)))
        assert meta["dataset"]["size"] == 200 and meta["dataset"]["fingerprint"] == rest.fingerprint()
        assert json.loads((run / "config.json").read_text())["fold"]["fold"] == k


def test_a_stopped_fold_run_continues_to_the_same_weights_without_training_fold_0_again(runner, folds, tmp_path):
    out = tmp_path / "folds"

    def stop_in_fold_1(event):  # what the SIGTERM handler does, at the third step of fold 1
        if (out / "fold-1").exists() and event.step == 3:
            preemption.request_stop()

    with pytest.raises(preemption.Stopped) as stopped:
        train("cnn_tiny", out, folds=K, on_step=stop_in_fold_1, **RECIPE)
    assert "fold 1 of 3" in str(stopped.value) and "re-run the same command to continue" in str(stopped.value)
    assert stopped.value.exit_code == 143
    assert read_manifest(out)[0].teachers[1:] == (None, None) and not (out / "fold-2").exists()
    fold_0 = {name: os.stat(out / "fold-0" / name).st_mtime_ns for name in ("best.pt", "last.pt")}
    preemption.reset()
    # the same command again, no --resume: fold 0 is kept, fold 1 resumes at its step, fold 2 starts
    result = invoke(runner, "train", "--model", "cnn_tiny", "--out", out, "--folds", K, *cli_flags(RECIPE))
    assert result.exit_code == 0, result.output
    assert "fold 0 of 3: trained before, kept" in result.output and "step 3" in result.output
    assert {name: os.stat(out / "fold-0" / name).st_mtime_ns for name in fold_0} == fold_0
    for k in range(K):
        for name in ("best.pt", "last.pt"):
            assert same_weights(folds / f"fold-{k}" / name, out / f"fold-{k}" / name), (k, name)
    assert read_manifest(out)[0].teachers == read_manifest(folds)[0].teachers
    # finished: the same command again trains nothing; other options are refused, --overwrite starts again
    again = invoke(runner, "train", "--model", "cnn_tiny", "--out", out, "--folds", K, *cli_flags(RECIPE))
    assert again.exit_code == 0 and again.output.count("trained before, kept") == K
    other = invoke(runner, "train", "--model", "cnn_tiny", "--out", out, "--folds", K, *cli_flags(RECIPE), "--lr", 0.1)
    assert other.exit_code == 2 and "train.lr 0.05 (now 0.1)" in other.stderr and "--overwrite" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    replaced = invoke(runner, "train", "--model", "cnn_tiny", "--out", out, "--folds", K, *cli_flags(RECIPE), "--lr", 0.1,
                      "--overwrite")
    assert replaced.exit_code == 0 and "kept" not in replaced.output and read_manifest(out)[0].config["train"]["lr"] == 0.1
    assert not same_weights(folds / "fold-0" / "best.pt", out / "fold-0" / "best.pt")
    nothing = invoke(runner, "train", "--model", "cnn_tiny", "--out", tmp_path / "none", "--folds", K, "--resume",
                     *cli_flags(RECIPE))
    assert "holds no fold teachers to resume" in one_error_line(nothing) and not (tmp_path / "none").exists()


def test_score_gives_train_rows_their_fold_teachers_logits_and_val_rows_the_mean(folds, oof, tmp_path, capsys):
    table, meta = load_table(oof["train"])
    manifest, split = read_manifest(folds)
    assert table["fold"].to_list() == split["fold"].to_list()  # both sorted by sample_id
    logits, fold = stored_logits(oof["train"]), table["fold"].to_numpy()
    by_fold = [stored_logits(score(folds / f"fold-{k}" / "best.pt", tmp_path / f"fold-{k}.parquet",
                                   save_logits=True)) for k in range(K)]
    for k in range(K):
        rows = fold == k
        np.testing.assert_allclose(logits[rows], by_fold[k][rows], atol=1e-3)
        other = by_fold[(k + 1) % K][rows]
        assert np.abs(logits[rows] - other).max() > 1e-2  # the teachers differ: the fold picks one
    assert scores_out_of_fold(oof["train"]) and meta.folds.logits == "own fold"
    assert list(meta.folds.teachers) == list(manifest.teachers) and meta.teacher.path == str(folds)

    val, val_meta = load_table(oof["val"])
    assert val["fold"].null_count() == val.height  # no fold: scored by all K
    mean = np.mean([stored_logits(score(folds / f"fold-{k}" / "best.pt", tmp_path / f"val-{k}.parquet", split="val",
                                        save_logits=True)) for k in range(K)], axis=0)
    np.testing.assert_allclose(stored_logits(oof["val"]), mean, atol=1e-3)
    assert val_meta.folds.logits == "mean" and scores_out_of_fold(oof["val"])
    assert "mean logits of the 3 fold teachers" in val_meta.summary["scored_by"]
    raw = json.loads(pq.read_schema(oof["val"]).metadata[METADATA_KEY])
    assert raw["scores"] == "out-of-fold" and raw["folds"]["teachers"] == list(manifest.teachers)


def test_select_and_label_issues_read_the_out_of_fold_table(runner, oof, tmp_path):
    pytest.importorskip("cleanlab")
    selected = invoke(runner, "select", "--scores", oof["train"], "--ratio", 0.3, "--out", tmp_path / "sel.parquet")
    assert selected.exit_code == 0, selected.output
    assert pl.read_parquet(tmp_path / "sel.parquet").height == 90
    issues = invoke(runner, "label-issues", "--scores", oof["train"], "--out", tmp_path / "issues.parquet")
    assert issues.exit_code == 0, issues.output
    assert "warning" not in issues.stderr  # out of fold: no in-sample warning
    meta = json.loads(pq.read_schema(tmp_path / "issues.parquet").metadata[METADATA_KEY])
    assert meta["scores"]["out_of_sample"] is True


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("energytools: error:"), result.stderr
    return lines[0]


def test_a_missing_or_foreign_fold_is_refused_and_nothing_is_written(runner, folds, tmp_path):
    def refused(directory, *extra) -> str:
        out = tmp_path / "scores.parquet"
        line = one_error_line(invoke(runner, "score", "--teacher", directory, "--out", out, *extra))
        assert not out.exists() and not (tmp_path / "scores.parquet.parts").exists()
        return line

    missing = tmp_path / "missing"
    shutil.copytree(folds, missing)
    (missing / "fold-2" / "best.pt").unlink()
    assert "fold 2's teacher" in refused(missing) and "fold-2/best.pt is missing" in refused(missing)

    swapped = tmp_path / "swapped"  # another fold's teacher in fold 1's place
    shutil.copytree(folds, swapped)
    shutil.copy(swapped / "fold-0" / "best.pt", swapped / "fold-1" / "best.pt")
    assert "is not fold 1 of this folds directory" in refused(swapped)

    replaced = tmp_path / "replaced"  # fold 1's own record, but not the teacher the manifest recorded
    shutil.copytree(folds, replaced)
    shutil.copy(replaced / "fold-1" / "last.pt", replaced / "fold-1" / "best.pt")
    assert "sha256 differs" in refused(replaced)

    # a training split other than the one the folds divide
    assert "fingerprints differ" in refused(folds, "--dataset", "digits", "--limit", 250)


def test_distill_and_augment_need_their_teacher_named_on_an_out_of_fold_table(runner, oof, folds, tmp_path):
    distill = ["distill", "--scores", oof["train"], "--student", "cnn_tiny", "--method", "kd", "--epochs", 1,
               "--device", "cpu", "--out", tmp_path / "kd"]
    line = one_error_line(invoke(runner, *distill))
    assert "out-of-fold scores of 3 fold teachers" in line and "--teacher" in line
    assert not (tmp_path / "kd").exists()
    line = one_error_line(invoke(runner, "augment", "--scores", oof["train"], "--ratio", 0.3, "--out", tmp_path / "he"))
    assert "out-of-fold" in line and "--teacher" in line and not (tmp_path / "he" / "manifest.json").exists()
    line = one_error_line(invoke(runner, *distill, "--teacher", folds))  # K teachers are not one
    assert "holds the fold teachers of `train --folds`" in line and not (tmp_path / "kd").exists()
    # named, it is the one used (here a fold's teacher, chosen by the user)
    named = invoke(runner, *distill, "--teacher", folds / "fold-0" / "best.pt")
    assert named.exit_code == 0, named.output


def test_a_recipe_cannot_train_fold_teachers(tmp_path):
    from energytools.pipeline import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "digits"\n[teacher]\nmodel = "cnn_tiny"\nfolds = 3\n')
    with pytest.raises(UserError, match="train --folds K"):
        load_recipe(recipe)
