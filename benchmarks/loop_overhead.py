"""The training loop's own cost: energytools' engine (``energytools.engine.fit``) against a bare
PyTorch loop doing the same work, per step and as a ratio of epoch times.

    python benchmarks/loop_overhead.py [--limit 10000] [--long-limit 50000] [--epochs 4] [--repeats 3] [--threads 2]
        [--write docs/benchmarks.md]

Both sides train on the same Fashion-MNIST samples held in memory as uint8, apply the same
random flip (energytools.data.transforms.train_augment), normalise per batch, run SGD (momentum
0.9, wd 5e-4, batch 64) with cross-entropy, and save model and optimizer once per epoch; no
validation or test pass on either side, so what differs is the loop itself (the batch and
loss bookkeeping, the progress bar, the checkpoint and metrics files). Two models:

- ``tiny``: one linear layer, where compute is negligible: the difference is the engine's own
  overhead, what a GPU run pays. It runs at two sizes (``--limit`` and ``--long-limit``), so
  the difference splits into a cost per step and a cost per epoch (checkpoints, metrics file,
  the epoch's setup): difference = per_epoch + steps * per_step;
- ``cnn_small``: a 2-second epoch on this 2-core CPU with 2 threads, the ratio a short real epoch sees.

The bare loop gathers its batches with ``index_select`` from an NCHW tensor, the fastest way
(plain ``images[index]`` costs ~25 µs more a step), so the baseline is the strict one.

An epoch is timed from its start to the next one's; the first epoch (warm-up) is left out and
the fastest of the others over all repeats is kept, on each side, alternating the sides.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import EPOCH_STARTS, command, fastest_epoch, machine, replace_block
from energytools.config import DataConfig, TrainConfig
from energytools.data.transforms import normalize, train_augment
from energytools.engine import Batch, fit
from energytools.models import create_model


def make_model(name: str, info) -> nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        return nn.Sequential(nn.Flatten(), nn.Linear(info.in_channels * info.image_size ** 2, info.num_classes))
    return create_model(name, info.num_classes, info.in_channels, info.image_size)


def engine_epochs(model_name: str, train_set, epochs: int, work: Path) -> float:
    model = make_model(model_name, train_set.info)

    def step(batch: Batch, forward):
        logits = forward(batch.images)
        return logits, {"ce": F.cross_entropy(logits, batch.labels)}

    EPOCH_STARTS.clear()
    cfg = TrainConfig(epochs=epochs + 1, device="cpu", schedule="timed")
    fit(model, step, train_set, None, None, cfg, work / "engine", {"arch": model_name}, resume=False)
    EPOCH_STARTS.append(time.perf_counter())
    return fastest_epoch(EPOCH_STARTS)


def bare_epochs(model_name: str, train_set, epochs: int, work: Path) -> float:
    info = train_set.info
    images = torch.from_numpy(train_set.images.array[train_set.positions]).permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format)
    labels = torch.from_numpy(train_set.labels)
    model = make_model(model_name, info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stamps = []
    for epoch in range(epochs + 1):
        stamps.append(time.perf_counter())
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(labels), generator=generator)
        total = torch.zeros((), dtype=torch.float64)
        model.train()
        for start in range(0, len(labels), 64):
            index = order[start:start + 64]
            x, flipped = train_augment(images.index_select(0, index), info, generator)
            logits = model(normalize(x, info))
            loss = F.cross_entropy(logits, labels.index_select(0, index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
        float(total)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, work / "bare.pt")
    stamps.append(time.perf_counter())
    return fastest_epoch(stamps)


def profile_engine(train_set, work: Path) -> str:
    """The engine's own functions by cumulative time over two tiny-model epochs."""
    profiler = cProfile.Profile()
    profiler.enable()
    engine_epochs("tiny", train_set, 1, work)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(r"energytools|rich|torch/utils/data", 12)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())[-3000:]


def measure(model_name: str, train_set, epochs: int, repeats: int, work: Path) -> tuple[float, float]:
    """The fastest epoch of each side, (energytools, bare), alternating the sides so that drift in
    the machine's load hits both."""
    engine_best = bare_best = float("inf")
    for _ in range(repeats):
        engine_best = min(engine_best, engine_epochs(model_name, train_set, epochs, work))
        bare_best = min(bare_best, bare_epochs(model_name, train_set, epochs, work))
    return engine_best, bare_best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=10000, help="the short epoch's samples (both models)")
    parser.add_argument("--long-limit", type=int, default=50000,
                        help="a second size for the tiny model, to split its overhead into per step and per epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="tiny,cnn_small")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the engine's tiny epochs")
    parser.add_argument("--write", type=Path, help="replace this script's block in a Markdown file with the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    runs = [(model, args.limit) for model in args.models.split(",")]
    if "tiny" in args.models.split(",") and args.long_limit and args.long_limit != args.limit:
        runs.append(("tiny", args.long_limit))
    sizes = {limit: DataConfig(dataset="fashion-mnist", limit=limit).build("train") for limit in {n for _, n in runs}}
    rows = []
    for model_name, limit in runs:
        train_set = sizes[limit]
        steps = (len(train_set) + 63) // 64
        engine_best, bare_best = measure(model_name, train_set, args.epochs, args.repeats, work)
        per_step_us = (engine_best - bare_best) / steps * 1e6
        rows.append((model_name, len(train_set), steps, engine_best, bare_best, per_step_us))
        print(f"{model_name}: {steps} steps, energytools {engine_best:.3f} s/epoch, bare {bare_best:.3f} s/epoch, "
              f"ratio {engine_best / bare_best:.3f}, difference {per_step_us:.0f} us/step")
    tiny = [(steps, (e - b)) for m, _, steps, e, b, _ in rows if m == "tiny"]
    split = ""
    if len(tiny) == 2 and tiny[0][0] != tiny[1][0]:  # difference = per_epoch + steps * per_step, from two sizes
        (short_steps, short_diff), (long_steps, long_diff) = tiny
        per_step = (long_diff - short_diff) / (long_steps - short_steps)
        per_epoch = short_diff - short_steps * per_step
        split = (f"tiny model, the difference split by the two sizes: **{per_step * 1e6:.0f} µs per step** and "
                 f"**{per_epoch * 1e3:.1f} ms per epoch** (checkpoints, metrics file, the epoch's setup).")
        print(split.replace("**", ""))
    if args.profile:
        print(profile_engine(sizes[args.limit], work))
    if args.write:
        lines = [f"`{command()}` ({machine()}; {args.epochs} timed epochs a run after a warm-up one, "
                 f"the fastest of {args.repeats} repeats; batch 64, no eval passes).", "",
                 "| model | samples | steps | energytools s/epoch | bare s/epoch | ratio | difference per step |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {n} | {steps} | {e:.3f} | {b:.3f} | {e / b:.3f} | {us:.0f} µs |"
                  for m, n, steps, e, b, us in rows]
        if split:
            lines += ["", split]
        replace_block(args.write, "loop overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
