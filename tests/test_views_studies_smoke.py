"""The views studies (benchmarks/views_study.py, online_heda_ablation.py, shards_equal_steps.py)
on a small Fashion-MNIST stand-in: each runs, prints its table, and they share one directory."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script(name, *args) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_views_studies_run_and_share_their_runs(fashion_root, tmp_path):
    out = tmp_path / "study"
    common = ["--out", out, "--data-root", fashion_root, "--limit", 200, "--eval-limit", 20, "--seeds", "0,1",
              "--epochs", 1, "--teacher-epochs", 1, "--records", tmp_path / "records"]
    printed = script("views_study.py", *common, "--views", "2,8", "--shards", 0.3)
    assert "| online + HE-DA 0.3 | 2 |" in printed and "| views K=8 + HE-DA 0.3 | 2 |" in printed
    assert (out / "he-da-k8-r0.3" / "manifest.json").exists()
    printed = script("online_heda_ablation.py", *common, "--weights", "0.9,0")
    assert "| kd + online HE-DA, weight 0 | 2 |" in printed and "Δ kd (best)" in printed
    finished = (out / "views8+heda0.3-s0" / "summary.json").stat().st_mtime
    printed = script("shards_equal_steps.py", *common)
    assert "| kd + random shards 0.3 | 2 |" in printed
    assert (out / "views8+heda0.3-s0" / "summary.json").stat().st_mtime == finished  # reused, not re-run
    assert (out / "random-k8-r0.3-s1" / "manifest.json").exists()  # the random control drawn per seed
    record = (tmp_path / "records" / "shards-equal-steps.md").read_text()
    assert "Command: `python " in record and "shards_equal_steps.py --out" in record and "95% CI" in record
    assert (tmp_path / "records" / "views-study+heda0.3.csv").read_text().count("\n") == 1 + 3 * 2
