"""What cached views save and what they cost: the online-teacher epoch against the cached-views
epoch at CIFAR's shapes, and the bytes a view takes in the score table.

    python benchmarks/views_cost.py [--samples 1000] [--views 2] [--epochs 3] [--json out.json]

Data: CIFAR-100's files and shapes (32x32 RGB, 100 classes, pad-4 crop + flip), written with
random pixels (no CIFAR here; speed does not depend on the pixels). Teacher resnet32x4,
student resnet8x4, both with random weights, batch 64. An epoch is measured from one epoch's
start to the next's (validation, test, checkpoints included), leaving out the first.

Bytes: the table scored with --views K (full float16 logits, and --top-k 10) minus the table
without views, per sample and view, as Parquet writes them (zstd) and as raw values.
Target: online / cached views >= 2.0.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import EPOCH_STARTS, start_clock, emit
from energytools.config import DataConfig, TrainConfig
from energytools.data.synthetic import write_cifar
from energytools.engine import model_meta
from energytools.models import create_model, save_checkpoint
from energytools.stages.distill import DistillConfig, distill
from energytools.stages.score import ScoreConfig, score


def epoch_seconds(table, work, name, epochs, **kwargs) -> float:
    start_clock()
    distill(DistillConfig(scores=str(table), student="resnet8x4", out=str(work / name), method="kd", overwrite=True,
                          train=TrainConfig(epochs=epochs, device="cpu", schedule="timed"), **kwargs))
    return (EPOCH_STARTS[-1] - EPOCH_STARTS[1]) / (len(EPOCH_STARTS) - 2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1000, help="training images (before the 10%% val carve)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    files = write_cifar(work / "data", 100, args.samples, 200, np.random.default_rng(0))
    data = DataConfig(dataset="cifar100", data_root=str(files), eval_limit=100)
    train_set = data.build("train")
    torch.manual_seed(0)
    teacher = create_model("resnet32x4", 100, 3, 32)
    save_checkpoint(work / "teacher.pt", teacher, model_meta("resnet32x4", train_set, data))
    common = dict(teacher=str(work / "teacher.pt"), data=data, device="cpu")
    started = time.perf_counter()
    plain = score(ScoreConfig(out=str(work / "plain.parquet"), **common))
    views = score(ScoreConfig(out=str(work / "views.parquet"), views=args.views, **common))
    score_seconds = time.perf_counter() - started
    top = score(ScoreConfig(out=str(work / "top.parquet"), views=args.views, top_k=args.top_k, **common))
    online, cached = [], []
    for r in range(args.repeats):
        online.append(epoch_seconds(views, work, f"online-{r}", args.epochs))
        cached.append(epoch_seconds(views, work, f"cached-{r}", args.epochs, cached_logits=True))
    n, k = len(train_set), args.views
    per_view = {name: (path.stat().st_size - plain.stat().st_size) / (n * k) for name, path in
                (("full", views), (f"top{args.top_k}", top))}
    figures = {"samples": n, "views": k, "classes": 100, "teacher": "resnet32x4", "student": "resnet8x4",
               "epoch_seconds": {"online": min(online), "cached_views": min(cached)},
               "online_over_cached": min(online) / min(cached), "target": ">= 2.0",
               "score_seconds_plain_plus_views": score_seconds,
               "bytes_per_sample_per_view_parquet": per_view,
               "bytes_per_sample_per_view_raw": {"full": 100 * 2 + 4, f"top{args.top_k}": args.top_k * (2 + 2) + 4 + 4},
               "note": "raw: float16 logits (or int16 index + float16 value per kept class, float32 fill) + float32 "
                       "energy; parquet: zstd-compressed file size difference (random-weight teacher)"}
    emit("views_cost", figures, args.json)


if __name__ == "__main__":
    main()
