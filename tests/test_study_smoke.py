import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]


def test_study_smoke_produces_the_table(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study.py"), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    results = pl.read_csv(tmp_path / "results.csv")
    assert results.height == 4 and set(results["config"]) == {"ce", "kd", "energy-kd 6,4,2", "energy-kd + HE-DA 0.3"}
    assert "| kd | 1 |" in result.stdout and "Spearman" in result.stdout
