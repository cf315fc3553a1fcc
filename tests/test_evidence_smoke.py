"""benchmarks/evidence.py (the round-2 study) end to end on digits, and its resume."""
import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]


def slug(name: str) -> str:  # benchmarks/evidence.py's run folder names
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def evidence(out, doc):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evidence.py"), "--smoke", "--workers", "1",
                             "--out", str(out), "--doc", str(doc)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return pl.read_csv(out / "results.csv")


def test_evidence_smoke_writes_its_tables_and_resumes(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nthe first study's text\n")
    first = evidence(tmp_path / "ev", doc)
    assert first.height == 10 and set(first["seed"]) == {0, 1}
    steps = {r["config"]: r["samples"] * r["epochs"] for r in first.filter(pl.col("seed") == 0).iter_rows(named=True)}
    assert steps["kd + HE-DA shards 0.25"] > steps["kd"] > steps["kd, drop low-energy 25%"]
    text = doc.read_text()
    assert text.count("evidence round 2: begin") == 1 and text.endswith("the first study's text\n")
    assert "| kd + online HE-DA | kd | 2 |" in text  # the paired comparison against its control
    # an interrupted study: one run lost its summary (stopped after its last checkpoint), one never
    # started; the same command finishes them and skips the rest
    runs = tmp_path / "ev" / "digits"
    (runs / "kd" / "seed1" / "summary.json").unlink()
    subprocess.run(["rm", "-r", str(runs / slug("kd + online HE-DA") / "seed0")], check=True)
    kept = (runs / "ce" / "seed0" / "summary.json").stat().st_mtime_ns
    second = evidence(tmp_path / "ev", doc)
    assert (runs / "ce" / "seed0" / "summary.json").stat().st_mtime_ns == kept
    assert second.drop("seconds").equals(first.drop("seconds"))
    assert doc.read_text().count("evidence round 2: begin") == 1
    assert len((tmp_path / "ev" / "wall.jsonl").read_text().splitlines()) == 2
