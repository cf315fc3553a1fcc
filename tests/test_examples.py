import runpy
import sys
from pathlib import Path

import pytest

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
