"""Augment stage images/s with 1 and 2 workers, and against bare loops without energytools.

    python benchmarks/augment_throughput.py [--ratio 0.5] [--repeats 2] [--json out.json]

Each worker count runs --repeats times, alternated (1, 2, 1, 2, ...); the figures use the
fastest run of each (the bare loops too), and every stage run's seconds are printed.

Bare loop A does the same CutMix draws and PNG encoding in plain numpy/PIL; bare loop B also
runs the teacher on the augmented images (the stage scores every augmented image). Targets:
workers 2 / workers 1 >= 1.7; stage / bare >= 0.8. Also printed: 2 workers / bare loop B, a
scaling figure that does not flatter itself when the 1-worker stage is slow.
"""
import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import benchmark_teacher, emit, timed
from energytools.config import DataConfig
from energytools.data.transforms import normalize
from energytools.models import load_model
from energytools.stages.augment import AugmentConfig, augment
from energytools.stages.score import ScoreConfig, score


def bare_cutmix(images: np.ndarray, seed: int = 0, model=None, info=None, batch: int = 256):
    rng = np.random.default_rng(seed)
    out, n = [], len(images)
    for i in range(n):
        j = (i + 1 + rng.integers(n - 1)) % n
        lam = rng.beta(1.0, 1.0)
        h, w = images.shape[1:3]
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = rng.integers(h), rng.integers(w)
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        mixed = images[i].copy()
        mixed[y0:y1, x0:x1] = images[j][y0:y1, x0:x1]
        buffer = io.BytesIO()
        Image.fromarray(mixed[..., 0]).save(buffer, format="PNG", compress_level=6)
        out.append(mixed)
    if model is not None:
        stacked = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        with torch.no_grad():
            for s in range(0, n, batch):
                model(normalize(stacked[s:s + batch], info))
    return n


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="default: the whole train split")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs per worker count")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    teacher = benchmark_teacher(work / "teacher.pt", limit=args.limit)
    data = DataConfig(dataset="fashion-mnist", limit=args.limit)
    table = score(ScoreConfig(teacher=str(teacher), out=str(work / "scores.parquet"), data=data, device="cpu"))
    dataset = data.build("train")
    count = int(args.ratio * len(dataset))
    images = np.stack([dataset.image(i) for i in range(count)])
    model, _ = load_model(teacher)
    torch.set_num_threads(1)  # the stage's workers run one thread each
    runs = {1: [], 2: []}
    for repeat, workers in enumerate((1, 2) * args.repeats):  # alternated, best of each: this machine is noisy
        cfg = AugmentConfig(scores=str(table), out=str(work / f"he-da-{repeat}"), ratio=args.ratio, workers=workers,
                            shard_size=1024)
        runs[workers].append(timed(augment, cfg)[1])
    seconds = {workers: min(times) for workers, times in runs.items()}
    bare_a = min(timed(bare_cutmix, images)[1] for _ in range(args.repeats))
    bare_b = min(timed(bare_cutmix, images, 0, model, dataset.info)[1] for _ in range(args.repeats))
    figures = {"images": count, "stage_1_worker_per_s": count / seconds[1], "stage_2_workers_per_s": count / seconds[2],
               "scaling_2_vs_1": seconds[1] / seconds[2], "scaling_target": ">= 1.7",
               "seconds_per_run": runs,
               "bare_aug_png_per_s": count / bare_a, "bare_aug_png_teacher_per_s": count / bare_b,
               "stage_vs_bare_aug_png": bare_a / seconds[1], "stage_vs_bare_with_teacher": bare_b / seconds[1],
               # the stricter scaling figure: 2 workers against the bare loop rather than the stage
               "stage_2_workers_vs_bare_with_teacher": bare_b / seconds[2],
               "ratio_target": ">= 0.8"}
    emit("augment_throughput", figures, args.json)


if __name__ == "__main__":
    main()
