import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]


def study(*args):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study.py"), "--smoke", *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_study_smoke_produces_the_table_and_a_second_run_reproduces_it(tmp_path):
    doc = tmp_path / "results.md"
    marker = "<!-- discussion: kept when the study re-writes this file -->"
    doc.write_text(f"round 2 block\n# Results: the accuracy study\nold table\n{marker}\nthe discussion\n")
    stdout = study("--out", tmp_path / "first", "--doc", doc)
    written = doc.read_text()  # the study's own part replaced, what stands before and after it kept
    assert written.startswith("round 2 block\n# Results: the accuracy study") and "old table" not in written
    assert written.endswith(f"{marker}\nthe discussion\n") and "| kd | 1 |" in written
    results = pl.read_csv(tmp_path / "first" / "results.csv")
    assert results.height == 4 and set(results["config"]) == {"ce", "kd", "energy-kd 6,4,2", "energy-kd + HE-DA 0.3"}
    assert "| kd | 1 |" in stdout and "Spearman" in stdout
    # from scratch (teacher, scores, shards, students) in another directory: the same accuracies
    again = study("--out", tmp_path / "second", "--compare", tmp_path / "first" / "results.csv")
    assert "4 of 4 runs reproduced exactly." in again, again
