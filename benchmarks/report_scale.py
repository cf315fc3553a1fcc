"""Report time and HTML size for a synthetic ImageNet-sized (1.28M-row) score table.

    python benchmarks/report_scale.py [--rows 1281167] [--json out.json]
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from common import emit, timed
from energytools.energy import GROUPS, SIGN_CONVENTION, rank_groups
from energytools.stages.report import report
from energytools.table import write_parquet


def synthetic_table(rows: int, path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, rows)
    energy = rng.normal(-12, 1.5, rows).astype(np.float32)
    confidence = (1 / (1 + np.exp(energy + 11 + rng.normal(0, 0.5, rows)))).astype(np.float32)
    groups, thresholds, _ = rank_groups(energy.astype(np.float64), np.arange(rows), 0.2, 0.2)
    temps = np.select([groups == "low", groups == "high"], [6.0, 2.0], 4.0).astype(np.float32)
    frame = pl.DataFrame({"sample_id": np.arange(rows), "label": labels, "pred": labels,
                          "correct": rng.random(rows) < confidence, "energy": energy, "confidence": confidence,
                          "true_prob": confidence, "entropy": 1 - confidence, "margin": confidence / 2,
                          "energy_group": groups.astype(str), "temperature": temps})
    meta = {"kind": "scores", "split": "train", "teacher": {"arch": "synthetic"},
            "dataset": {"name": "synthetic", "split": "train", "options": {"name": "synthetic"}},
            "energy": {"temperature": 4.0, "sign": SIGN_CONVENTION},
            "groups": {"low_frac": 0.2, "high_frac": 0.2, "thresholds": thresholds.to_dict()},
            "temperatures": dict(zip(GROUPS, (6.0, 4.0, 2.0))),
            "summary": {"samples": rows, "accuracy": float(frame["correct"].mean() * 100)}}
    return write_parquet(frame, path, meta)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    table = synthetic_table(args.rows, work / "scores.parquet")
    out, seconds = timed(report, [table], work / "report.html", thumbnails=False)
    emit("report_scale", {"rows": args.rows, "seconds": seconds, "html_mb": out.stat().st_size / 1e6,
                          "target": "seconds, a few MB"}, args.json)


if __name__ == "__main__":
    main()
