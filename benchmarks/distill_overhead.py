"""Epoch time of energy-kd against kd, and of the online teacher against cached logits.

    python benchmarks/distill_overhead.py [--limit 10000] [--json out.json]

Fashion-MNIST shape, resnet20 teacher, cnn_small student, one epoch per measurement, each
pair alternated and repeated (best of repeats). Targets: energy-kd / kd <= 1.03;
online / cached >= 1.5.
"""
import argparse
import tempfile
from pathlib import Path

from common import benchmark_teacher, emit
from energytools.config import DataConfig
from energytools.engine import TrainConfig
from energytools.stages.distill import DistillConfig, distill
from energytools.stages.score import ScoreConfig, score


def epoch_seconds(table, work, name, **kwargs) -> float:
    result = distill(DistillConfig(scores=str(table), student="cnn_small", out=str(work / name), eval_limit=500,
                                   train=TrainConfig(epochs=1, device="cpu"), overwrite=True, **kwargs))
    return float(result.metrics["seconds"][0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    teacher = benchmark_teacher(work / "teacher.pt", limit=args.limit)
    table = score(ScoreConfig(teacher=str(teacher), out=str(work / "scores.parquet"), save_logits=True,
                              data=DataConfig(dataset="fashion-mnist", limit=args.limit), device="cpu"))
    runs = {"kd": {"method": "kd"}, "energy-kd": {"method": "energy-kd"},
            "kd-cached": {"method": "kd", "cached_logits": True}}
    best = {name: float("inf") for name in runs}
    for r in range(args.repeats):
        for name, kwargs in runs.items():
            best[name] = min(best[name], epoch_seconds(table, work, f"{name}-{r}", **kwargs))
    figures = {"samples": args.limit, "epoch_seconds": best,
               "energy_kd_over_kd": best["energy-kd"] / best["kd"], "energy_kd_target": "<= 1.03",
               "online_over_cached": best["kd"] / best["kd-cached"], "cached_target": ">= 1.5"}
    emit("distill_overhead", figures, args.json)


if __name__ == "__main__":
    main()
