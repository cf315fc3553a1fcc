"""Score stage samples/s against a bare forward loop on the same model and in-memory inputs.

    python benchmarks/score_throughput.py [--limit 20000] [--json out.json]

Both run in this process on the same teacher (resnet20, Fashion-MNIST shape). The bare loop
feeds pre-normalised tensors already in memory; the stage does everything it does for real
(data loading, normalisation, statistics, Parquet parts, final table). Target: >= 0.90.
"""
import argparse
import tempfile
from pathlib import Path

import torch

from common import benchmark_teacher, emit, timed
from energytools.config import DataConfig
from energytools.data.transforms import normalize
from energytools.models import load_model
from energytools.stages.score import ScoreConfig, score


def bare_loop(model, batches):
    with torch.no_grad():
        for x in batches:
            model(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    teacher = benchmark_teacher(work / "teacher.pt", limit=args.limit)
    data = DataConfig(dataset="fashion-mnist", limit=args.limit)
    dataset = data.build("train")
    model, _ = load_model(teacher)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    batches = [normalize(images[i:i + args.batch_size], dataset.info) for i in range(0, len(images), args.batch_size)]
    bare, stage = [], []
    for r in range(args.repeats):  # alternate so drift on a noisy machine hits both
        bare.append(timed(bare_loop, model, batches)[1])
        out = work / f"scores-{r}.parquet"
        stage.append(timed(score, ScoreConfig(teacher=str(teacher), out=str(out), data=data,
                                              batch_size=args.batch_size, device="cpu"))[1])
    n = len(dataset)
    figures = {"samples": n, "bare_samples_per_s": n / min(bare), "score_samples_per_s": n / min(stage),
               "ratio": min(bare) / min(stage), "target": ">= 0.90"}
    emit("score_throughput", figures, args.json)


if __name__ == "__main__":
    main()
