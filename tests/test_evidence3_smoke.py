"""benchmarks/evidence3.py (the round-3 study) end to end on digits: a stop in the middle of a
run and its resume, the refusal of stale inputs, and a failing run stopping the pool."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from conftest import energytools_command, signal_when

ROOT = Path(__file__).resolve().parents[1]
STUDY = [sys.executable, str(ROOT / "benchmarks" / "evidence3.py")]


def study(out, doc, *extra):
    return subprocess.run([*STUDY, "--smoke", "--out", str(out), "--doc", str(doc), *extra], capture_output=True,
                          text=True, cwd=ROOT)


def test_evidence3_smoke_stops_resumes_refuses_stale_inputs_and_fails_fast(tmp_path):
    out, doc = tmp_path / "ev3", tmp_path / "results.md"
    doc.write_text("# Results\n\nearlier text\n")
    runs = out / "digits"
    # a scheduler's stop in the middle of the third run (after its first epoch's checkpoint)
    stopped = signal_when(["--smoke", "--workers", "1", "--out", out, "--doc", doc],
                          (runs / "ctkd" / "seed0" / "last.pt").exists, program=STUDY, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "re-run the same command to resume the study" in stopped.stderr
    assert not (runs / "ctkd" / "seed0" / "summary.json").exists()
    kept = (runs / "kd" / "seed0" / "summary.json").stat().st_mtime_ns
    # the resumed study in a pool, stopped again: its workers end with it (no orphan trains on)
    pooled = signal_when(["--smoke", "--workers", "2", "--out", out, "--doc", doc],
                         (runs / "kd" / "seed1" / "last.pt").exists, program=STUDY, timeout=600)
    assert pooled.returncode == 143, pooled.stderr[-2000:]
    time.sleep(3)
    frozen = sorted((f, f.stat().st_mtime_ns) for f in runs.rglob("*") if f.is_file())
    time.sleep(3)
    assert sorted((f, f.stat().st_mtime_ns) for f in runs.rglob("*") if f.is_file()) == frozen
    # the tables of what has finished, running nothing
    partial = study(out, tmp_path / "partial.md", "--report-only")
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert "Stopped for time before every seed ran" in (tmp_path / "partial.md").read_text()
    assert sorted((f, f.stat().st_mtime_ns) for f in runs.rglob("*") if f.is_file()) == frozen

    done = study(out, doc, "--workers", "2")  # the same study, resumed
    assert done.returncode == 0, done.stderr[-2000:]
    assert (runs / "kd" / "seed0" / "summary.json").stat().st_mtime_ns == kept  # finished runs are not redone
    results = pl.read_csv(out / "results.csv")
    assert results.height == 26 and results["best"].is_not_null().all()
    text = doc.read_text()
    assert text.count("<!-- evidence round 3: begin -->") == 1 and text.endswith("earlier text\n")
    assert "| kd + HE-DA shards 0.2 | kd + random shards 0.2 | 2 |" in text  # the control comparison
    assert "Δ kd, full pool (best)" in text and "--smoke --out" in text  # B's baseline; the command as typed
    assert (tmp_path / "evidence3.csv").exists()  # every run's numbers beside the doc

    # a selection made with other options than the study's is refused with one line naming it
    selection = runs / "drop-random-energy-0.5-s1.parquet"
    remade = subprocess.run(energytools_command("select", "--scores", runs / "scores.parquet", "--ratio", "0.3",
                                                "--mode", "random", "--seed", "1", "--out", selection,
                                                "--overwrite"), capture_output=True, text=True)
    assert remade.returncode == 0, remade.stderr
    refused = study(out, doc, "--workers", "1")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert str(selection) in refused.stderr and "ratio 0.3 (not 0.5)" in refused.stderr
    selection.unlink()
    # so is a score table made on other data (C's long-tailed split)
    shutil.copy(runs / "scores.parquet", out / "C" / "scores.parquet")
    refused = study(out, doc, "--workers", "1")
    assert refused.returncode == 1 and "imbalance_factor None (not 10.0)" in refused.stderr
    (out / "C" / "scores.parquet").unlink()

    # a run that fails (its shards lost a file) stops the pool: the runs queued after it are not run
    shard_dir = runs / "he-da-high-0.2-s0"
    next(shard_dir.glob("*.parquet")).unlink()
    shutil.rmtree(runs / "kd___HE-DA_shards_0.2" / "seed0")
    later = [runs / name / f"seed{s}" for name in ("kd__full_pool", "kd__drop_random_50_", "kd__drop_random_50___equal_steps")
             for s in (0, 1)] + [out / "C" / name / f"seed{s}" for name in ("kd", "energy-kd_2_4_6") for s in (0, 1)]
    for run in later:
        shutil.rmtree(run)
    failed = study(out, doc, "--workers", "2")
    assert failed.returncode != 0 and "is incomplete: missing" in failed.stderr
    assert not all((run / "summary.json").exists() for run in later)
