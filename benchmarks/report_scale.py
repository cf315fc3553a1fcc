"""Report time and HTML size for a synthetic ImageNet-sized (1.28M-row) score table, and for
two such tables on the same samples (energies overlaid, group transitions, samples that moved).

    python benchmarks/report_scale.py [--rows 1281167] [--json out.json]
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from common import emit, timed
from energytools.config import DataConfig
from energytools.energy import TemperatureRule
from energytools.stages.report import report
from energytools.table import DatasetRecord, TableMeta, TeacherRecord, write_parquet


def synthetic_table(rows: int, path: Path, noise: float = 0.0) -> Path:
    """``noise``: the std of a perturbation of every energy (a second teacher on the same samples)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, rows)
    energy = rng.normal(-12, 1.5, rows).astype(np.float32)
    energy += np.random.default_rng(1).normal(0, noise, rows).astype(np.float32)
    confidence = (1 / (1 + np.exp(energy + 11 + rng.normal(0, 0.5, rows)))).astype(np.float32)
    fitted = TemperatureRule().fit(energy, np.arange(rows))
    groups, temps = fitted.assign(energy, np.arange(rows))
    frame = pl.DataFrame({"sample_id": np.arange(rows), "label": labels, "pred": labels,
                          "correct": rng.random(rows) < confidence, "energy": energy, "confidence": confidence,
                          "true_prob": confidence, "entropy": 1 - confidence, "margin": confidence / 2,
                          "energy_group": groups.astype(str), "temperature": temps})
    meta = TableMeta(DataConfig(dataset="synthetic"), DatasetRecord("synthetic", "train", rows, "0" * 64, 1000),
                     TeacherRecord("synthetic", "0" * 64, "none", 1000, 3), 4.0, fitted.rule, fitted.thresholds,
                     "this table", {}, {"samples": rows, "accuracy": float(frame["correct"].mean() * 100)}, {})
    return write_parquet(frame, path, meta.to_json())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # two 1.28M-row tables: do not leave them behind
        work = Path(tmp)
        table = synthetic_table(args.rows, work / "scores.parquet")
        second = synthetic_table(args.rows, work / "scores-b.parquet", noise=0.5)
        out, seconds = timed(report, [table], work / "report.html", thumbnails=False)
        both, both_seconds = timed(report, [table, second], work / "report-two.html", thumbnails=False)
        emit("report_scale", {"rows": args.rows, "seconds": seconds, "html_mb": out.stat().st_size / 1e6,
                              "two_tables_seconds": both_seconds, "two_tables_html_mb": both.stat().st_size / 1e6,
                              "target": "seconds, a few MB"}, args.json)


if __name__ == "__main__":
    main()
