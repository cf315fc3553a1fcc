import json
import runpy
import sys
from pathlib import Path

import pytest

import energytools

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script,target", [("query_scores.py", "scores"), ("load_shards.py", "shards")])
def test_examples_run_on_real_outputs(digits_run, monkeypatch, capsys, script, target):
    monkeypatch.setattr(sys, "argv", [script, str(digits_run[target])])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert capsys.readouterr().out.strip()


def test_custom_dataset_example(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["custom_dataset.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "custom_dataset.py"), run_name="__main__")
    assert (tmp_path / "student" / "best.pt").exists() and (tmp_path / "scores.parquet").exists()


def run_example(script, out, monkeypatch):
    pytest.importorskip("timm")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    monkeypatch.setattr(sys, "argv", [script, str(out)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_timm_teacher_example(tmp_path, monkeypatch):
    run_example("timm_teacher.py", tmp_path, monkeypatch)
    meta = energytools.load_table(tmp_path / "scores.parquet")[1]
    assert meta.teacher.arch == "timm:test_resnet" and meta.teacher.preprocessing["input_size"] == [160, 160]
    assert (tmp_path / "student" / "best.pt").exists()


def test_hf_dataset_example(tmp_path, monkeypatch):
    run_example("hf_dataset.py", tmp_path, monkeypatch)
    assert (tmp_path / "stripes" / "data" / "train-00000-of-00001.parquet").exists()
    # the stripes are easy: a student far above chance (33%) shows images and labels stayed together
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["best_test_acc"] > 70


@pytest.mark.parametrize("script,framework", [("lightning_energy_kd.py", "pytorch_lightning"),
                                              ("hf_trainer_energy_kd.py", "accelerate")])
def test_energy_kd_in_another_frameworks_trainer(tmp_path, monkeypatch, capsys, script, framework):
    """Energy KD with TableTemperatures in a Lightning module and in a transformers.Trainer."""
    import re

    pytest.importorskip(framework)
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    printed = capsys.readouterr().out
    steps, accuracy = re.search(r"after (\d+) steps of Energy KD: train accuracy ([\d.]+)%", printed).groups()
    assert int(steps) == 60 and float(accuracy) > 50  # it learned: chance is 10%
    assert (tmp_path / "scores.parquet").exists()
