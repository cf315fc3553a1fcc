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

Paired epochs: energytools' loop runs with a bare epoch run at the start of each of its epochs
(``common.start_clock``), so every energytools epoch has a bare epoch beside it in time, and a
slow spell of a shared machine (the noise that moved unpaired fastest-epoch ratios by +-5%
here) hits both members of a pair. The first pair (warm-up) is left out; the figure is the
median of the pairs' ratios over all runs, with its quartiles, and the median of the pairs'
differences for the per-step split. Each side's fastest epoch is shown too.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import itertools
import math
import pstats
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (BETWEEN_SECONDS, command, engine_epoch_seconds, machine, paired_ratios, quantiles, replace_block,
                    start_clock, stop_clock)
from energytools.config import DataConfig, TrainConfig
from energytools.data.transforms import normalize, train_augment
from energytools.engine import Batch, fit
from energytools.models import create_model


def make_model(name: str, info) -> nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        return nn.Sequential(nn.Flatten(), nn.Linear(info.in_channels * info.image_size ** 2, info.num_classes))
    return create_model(name, info.num_classes, info.in_channels, info.image_size)


def engine_epochs(model_name: str, train_set, epochs: int, work: Path, between=None) -> list[float]:
    """Seconds of each epoch of energytools' loop (the first is the warm-up); ``between`` runs
    one bare epoch before each of them (:func:`common.start_clock`)."""
    model = make_model(model_name, train_set.info)

    def step(batch: Batch, forward):
        logits = forward(batch.images)
        return logits, {"ce": F.cross_entropy(logits, batch.labels)}

    start_clock(between)
    cfg = TrainConfig(epochs=epochs + 1, device="cpu", schedule="timed")
    fit(model, step, train_set, None, None, cfg, work / "engine", {"arch": model_name}, resume=False)
    stop_clock()
    return engine_epoch_seconds()


def bare_epochs(model_name: str, train_set, work: Path):
    """The bare loop, one epoch per ``next()`` (it runs as long as it is asked)."""
    info = train_set.info
    images = torch.from_numpy(train_set.images.array[train_set.positions]).permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format)
    labels = torch.from_numpy(train_set.labels)
    model = make_model(model_name, info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in itertools.count():
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
        yield


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


def measure(model_name: str, train_set, epochs: int, repeats: int, work: Path) -> dict:
    """Engine epochs, each paired with a bare epoch run right before it, over ``repeats`` runs:
    the pairs' ratios and differences (warm-up pairs left out) and each side's fastest epoch."""
    ratios, differences, fastest = [], [], [math.inf, math.inf]
    for _ in range(repeats):
        bare = bare_epochs(model_name, train_set, work)
        engine = engine_epochs(model_name, train_set, epochs, work, between=functools.partial(next, bare))
        ratios += paired_ratios(engine, BETWEEN_SECONDS)
        differences += [e - b for e, b in list(zip(engine, BETWEEN_SECONDS))[1:]]
        fastest = [min(fastest[0], min(engine[1:])), min(fastest[1], min(BETWEEN_SECONDS[1:]))]
    return {"ratios": ratios, "differences": differences, "fastest": fastest}


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
        found = measure(model_name, train_set, args.epochs, args.repeats, work)
        low, ratio, high = quantiles(found["ratios"])
        difference = quantiles(found["differences"])[1]
        rows.append((model_name, len(train_set), steps, *found["fastest"], ratio, low, high, difference,
                     len(found["ratios"])))
        print(f"{model_name}: {steps} steps, fastest epoch energytools {found['fastest'][0]:.3f} s, bare "
              f"{found['fastest'][1]:.3f} s; paired ratio median {ratio:.3f} (quartiles {low:.3f}-{high:.3f}, "
              f"{len(found['ratios'])} pairs), difference {difference / steps * 1e6:.0f} us/step")
    tiny = [(steps, difference) for m, _, steps, *_, difference, _ in rows if m == "tiny"]
    split = ""
    if len(tiny) == 2 and tiny[0][0] != tiny[1][0]:  # difference = per_epoch + steps * per_step, from two sizes
        (short_steps, short_diff), (long_steps, long_diff) = tiny
        per_step = (long_diff - short_diff) / (long_steps - short_steps)
        per_epoch = short_diff - short_steps * per_step
        split = (f"tiny model, the median paired difference split by the two sizes: **{per_step * 1e6:.0f} µs per "
                 f"step** and **{per_epoch * 1e3:.1f} ms per epoch** (checkpoints, metrics file, the epoch's setup).")
        print(split.replace("**", ""))
    if args.profile:
        print(profile_engine(sizes[args.limit], work))
    if args.write:
        lines = [f"`{command()}` ({machine()}; each of {args.repeats} runs trains {args.epochs} timed epochs after "
                 "a warm-up one, every energytools epoch paired with a bare epoch run right before it; batch 64, "
                 "no eval passes).", "",
                 "| model | samples | steps | fastest energytools s/epoch | fastest bare s/epoch | paired ratio, "
                 "median | quartiles | pairs | difference per step |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {n} | {steps} | {e:.3f} | {b:.3f} | **{ratio:.3f}** | {low:.3f}-{high:.3f} | {pairs} | "
                  f"{difference / steps * 1e6:.0f} µs |"
                  for m, n, steps, e, b, ratio, low, high, difference, pairs in rows]
        if split:
            lines += ["", split]
        replace_block(args.write, "loop overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
