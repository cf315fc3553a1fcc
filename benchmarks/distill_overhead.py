"""Distill epoch costs: energytools against a bare PyTorch loop doing the same work, and the
epoch of energy-kd on cached views against the ce epoch.

    python benchmarks/distill_overhead.py [--limit 10000] [--epochs 5] [--repeats 3] [--threads 1,2] [--only ce,kd]
        [--json out.json] [--write docs/benchmarks.md]

Fashion-MNIST (real data), cnn_small student, batch 64, SGD (momentum 0.9, wd 5e-4), resnet20
teacher with random weights (speed does not depend on them). An epoch is measured from its
start to the next one's (the paired bare epoch run in between left out), so everything an
epoch does counts: the training pass, validation and test passes, checkpoints and the metrics
file; the first epoch (warm-up)
and the last (whose end runs the stage's test predictions) are left out. Every energytools
epoch is paired with a bare epoch run right before it (``common.start_clock``), so a slow spell
of a shared machine hits both members of a pair; the figure is the median of the pairs' ratios
over all runs, with its quartiles (each side's fastest epoch is shown too). The bare loop does
the same per epoch: the training pass over in-memory tensors (normalised float32 NCHW, as a
user's loop on a dataset that fits would hold them, padded once for crops) with the same augmentation, the
same loss, evaluation of the same val and test sets, and one torch.save of model and optimizer
(as torchvision's reference script does).

Runs:
- flip (Fashion-MNIST's own transform): ce, kd with the online teacher, kd with cached logits
  (the clean and mirrored image's, --save-logits);
- crop (--crop-pad 2: pad-2 crop + flip): ce, and energy-kd on K = 4 cached views
  (--views 4, --temperature-source views), against a bare loop that picks a random stored
  view, crops and flips it and reads its logits.

Both sides use NCHW batches (energytools' default); ``ce-channels-last`` compares
``--channels-last`` with a channels-last bare loop.

Targets: energytools / bare <= 1.05 for ce, kd and cached kd; energy-kd on cached views / ce
<= 1.10.
"""
import argparse
import functools
import itertools
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from common import (BETWEEN_SECONDS, benchmark_teacher, command, emit, engine_epoch_seconds, machine, paired_ratios,
                    quantiles, replace_block, start_clock)
from energytools.config import DataConfig, TrainConfig
from energytools.data.transforms import normalize
from energytools.data.views import TrainTransform, draw_views
from energytools.models import create_model, load_model
from energytools.stages.distill import DistillConfig, distill
from energytools.stages.score import ScoreConfig, score
from energytools.table import load_table
from energytools.view_logits import read_views


def energytools_epochs(table, work, name, epochs, eval_limit, between=None, channels_last=False,
                       **kwargs) -> tuple[list[float], list[dict]]:
    """Seconds of each distill epoch but the last (its end runs the stage's test predictions),
    and each of those epochs' phases from metrics.parquet (the training pass, its wait for
    batches, evaluation; the rest is the checkpoint and metrics writes); ``between`` runs one
    bare epoch before each (:func:`common.start_clock`)."""
    start_clock(between)
    distill(DistillConfig(scores=str(table), student="cnn_small", out=str(work / name), eval_limit=eval_limit,
                          overwrite=True, train=TrainConfig(epochs=epochs, device="cpu", schedule="timed",
                                                            channels_last=channels_last), **kwargs))
    seconds = engine_epoch_seconds()
    rows = pl.read_parquet(work / name / "metrics.parquet").to_dicts()
    # the paired bare epoch ran inside the engine's training pass (the timed schedule's first ask)
    paired = BETWEEN_SECONDS if between is not None else [0.0] * len(rows)
    phases = [{"train": row["train_seconds"] - bare, "data": row["data_seconds"], "eval": row["eval_seconds"],
               "rest": epoch - (row["train_seconds"] - bare) - row["eval_seconds"]}
              for row, epoch, bare in zip(rows, seconds, paired)]
    return seconds, phases


class Bare:
    """The same work in plain PyTorch, on tensors held in memory as the model consumes them:
    normalised float32 NCHW, padded once for the crop (with the normalised zero)."""

    def __init__(self, data: DataConfig, eval_limit: int, teacher_path=None, cached=None, views=None):
        train = data.build("train")
        self.info = train.info
        evaluation = DataConfig(**{**data.__dict__, "eval_limit": eval_limit})
        # NCHW strides, as energytools' loader gives them: for one channel, .contiguous() would keep
        # the (HW, 1, W, 1) strides of the permuted array, which the conv kernels treat as
        # channels-last (1.5x faster for cnn_small on this CPU: a different computation)
        nchw = torch.contiguous_format
        pad = self.info.train_crop_pad

        def held(split, padding=0):
            uint8 = torch.from_numpy(split.images.array[split.positions]).permute(0, 3, 1, 2)
            if padding:  # the zero byte's normalised value around each image
                uint8 = F.pad(uint8, (padding,) * 4)
            return normalize(uint8, self.info).clone(memory_format=nchw)

        self.images = held(train, pad)
        self.labels = torch.from_numpy(train.labels)
        self.eval_sets = [(held(part), torch.from_numpy(part.labels))
                          for part in (evaluation.build(split) for split in ("val", "test"))]
        self.teacher = load_model(teacher_path)[0].eval() if teacher_path else None
        self.cached = cached  # (logits, flipped logits) in train order
        self.views = views  # (logits (N, K, C), params of every (sample, view), K)

    def epochs(self, kd: bool, out: Path, channels_last: bool = False, phases: list | None = None):
        """One epoch per ``next()`` (as many as asked); ``phases`` gets each epoch's seconds of the
        training pass, of its batch preparation (gather, crop and flip), of evaluation and of the
        checkpoint, as energytools' metrics give them."""
        torch.manual_seed(0)
        model = create_model("cnn_small", self.info.num_classes, self.info.in_channels, self.info.image_size)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        n, pad = len(self.labels), self.info.train_crop_pad
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(epoch)
            model.train()
            order = torch.randperm(n, generator=generator)
            started, data = time.perf_counter(), 0.0
            for start in range(0, n, 64):
                ready = time.perf_counter()
                index = order[start:start + 64]
                x, y = self.images.index_select(0, index), self.labels.index_select(0, index)  # the fastest gather
                if self.views is not None:  # a random stored view: its crop, flip and logits
                    logits_all, params, count = self.views
                    v = torch.randint(0, count, (len(index),), generator=generator)
                    flat = (index * count + v).numpy()
                    top, left, flip = params.top[flat], params.left[flat], params.flip[flat]
                    steps = torch.arange(x.shape[-1] - 2 * pad)
                    rows = torch.from_numpy(top)[:, None] + steps
                    cols = torch.from_numpy(left)[:, None] + steps
                    cols = torch.where(torch.from_numpy(flip)[:, None], cols.flip(1), cols)
                    b = torch.arange(len(index))[:, None, None]
                    x = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).clone(
                        memory_format=torch.contiguous_format)
                    teacher_logits = logits_all[index, v].float()
                else:
                    flipped = torch.rand(len(index), generator=generator) < 0.5
                    x[flipped] = x[flipped].flip(-1)  # x is the gather's own copy
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                data += time.perf_counter() - ready
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if kd:
                    if self.views is None and self.cached is not None:
                        plain, mirrored = self.cached
                        teacher_logits = torch.where(flipped[:, None], mirrored[index], plain[index])
                    elif self.views is None:
                        with torch.no_grad():
                            teacher_logits = self.teacher(x)
                    log_p_s = F.log_softmax(logits / 4, dim=1)
                    log_p_t = F.log_softmax(teacher_logits / 4, dim=1)
                    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean() * 16
                    loss = 0.1 * loss + 0.9 * kl
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            trained = time.perf_counter()
            model.eval()
            with torch.no_grad():
                for images, labels in self.eval_sets:
                    correct = sum(int((model(images[i:i + 512].contiguous(memory_format=layout))
                                       .argmax(1) == labels[i:i + 512]).sum()) for i in range(0, len(labels), 512))
            evaluated = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "correct": correct}, out)
            if phases is not None:
                phases.append({"train": trained - started, "data": data, "eval": evaluated - trained,
                               "rest": time.perf_counter() - evaluated})
            yield


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated; each runs every run")
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path, help="replace this script's block in a Markdown file with the results")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(thread_counts[0])
    work = Path(tempfile.mkdtemp())
    teacher = benchmark_teacher(work / "teacher.pt", limit=args.limit)
    flip_data = DataConfig(dataset="fashion-mnist", limit=args.limit)
    crop_data = DataConfig(dataset="fashion-mnist", limit=args.limit, crop_pad=2)
    logits_table = score(ScoreConfig(teacher=str(teacher), out=str(work / "logits.parquet"), save_logits=True,
                                     data=flip_data, device="cpu"))
    views_table = score(ScoreConfig(teacher=str(teacher), out=str(work / "views.parquet"), views=args.views,
                                    data=crop_data, device="cpu"))

    # what the bare loops hold in memory: cached logits and views in train order
    frame, meta = load_table(logits_table)
    order = np.argsort(frame["sample_id"].to_numpy())
    train_ids = flip_data.build("train").sample_ids
    rows = order[np.searchsorted(frame["sample_id"].to_numpy()[order], train_ids)]
    plain = torch.from_numpy(np.stack(frame["logits"].to_numpy())[rows].astype(np.float32))
    mirrored = torch.from_numpy(np.stack(frame["logits_flipped"].to_numpy())[rows].astype(np.float32))
    vframe, vmeta = load_table(views_table)
    stored = read_views(views_table, vmeta, 10)["view_logits"][rows]
    transform = TrainTransform.from_dict(vmeta.views.transform)
    params = draw_views(transform, vmeta.views.seed, np.repeat(train_ids, args.views), np.tile(np.arange(args.views),
                                                                                                len(train_ids)))
    bare_flip = Bare(flip_data, args.eval_limit, teacher, cached=(plain, mirrored))
    bare_online = Bare(flip_data, args.eval_limit, teacher)
    bare_crop = Bare(crop_data, args.eval_limit, views=(torch.from_numpy(stored), params, args.views))

    bare_out = work / "bare.pt"
    runs = {  # name: (score table, distill options, a new bare loop (its phases= list) or None)
        "ce": (logits_table, {"method": "ce"}, functools.partial(bare_flip.epochs, False, bare_out)),
        "kd": (logits_table, {"method": "kd"}, functools.partial(bare_online.epochs, True, bare_out)),
        "kd-cached": (logits_table, {"method": "kd", "cached_logits": True},
                      functools.partial(bare_flip.epochs, True, bare_out)),
        "ce-channels-last": (logits_table, {"method": "ce", "channels_last": True},
                             functools.partial(bare_flip.epochs, False, bare_out, channels_last=True)),
        "ce-crop": (views_table, {"method": "ce"}, None),
        "energy-kd-cached-views": (views_table, {"method": "energy-kd", "cached_logits": True,
                                                 "temperature_source": "views"},
                                   functools.partial(bare_crop.epochs, True, bare_out)),
    }
    if args.only:
        unknown = set(args.only.split(",")) - set(runs)
        if unknown:
            parser.error(f"--only: unknown run {sorted(unknown)[0]!r}; one of {', '.join(runs)}")
        runs = {name: runs[name] for name in args.only.split(",")}
    found = {(threads, name): {"engine": [], "bare": [], "ratios": [], "engine_phases": [], "bare_phases": []}
             for threads in thread_counts for name in runs}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for _ in range(args.repeats):  # alternate the runs, so drift on a noisy machine is spread over all
            for name, (table, options, new_bare) in runs.items():
                bare_phases = []
                bare = new_bare(phases=bare_phases) if new_bare is not None else None
                # a bare epoch before each engine epoch but the last, which is not timed
                between = functools.partial(next, itertools.islice(bare, args.epochs - 1), None) if bare else None
                engine, engine_phases = energytools_epochs(table, work, name, args.epochs, args.eval_limit,
                                                           between=between, **options)
                found[threads, name]["engine"] += engine[1:]
                if bare is not None:  # the warm-up pair left out, as for the ratios
                    found[threads, name]["bare"] += BETWEEN_SECONDS[1:len(engine)]
                    found[threads, name]["ratios"] += paired_ratios(engine, BETWEEN_SECONDS)
                    found[threads, name]["engine_phases"] += engine_phases[1:]
                    found[threads, name]["bare_phases"] += bare_phases[1:len(engine)]
    best = {key: [min(f["engine"]), min(f["bare"], default=math.inf)] for key, f in found.items()}
    steps = math.ceil(len(bare_flip.labels) / 64)
    phases = {key: phase_breakdown(f["engine_phases"], f["bare_phases"], steps) for key, f in found.items()
              if f["bare_phases"]}
    paired = {key: quantiles(f["ratios"]) for key, f in found.items() if f["ratios"]}
    figures = {"samples": args.limit, "eval_samples": 2 * args.eval_limit, "views": args.views,
               "torch_threads": thread_counts, "epochs_per_run": args.epochs, "repeats": args.repeats,
               "bare_loop": "normalised float32 NCHW images held in memory (padded once for crops)",
               "epoch_seconds": {run_label(*key): {"energytools": e, "bare": b if math.isfinite(b) else None}
                                 for key, (e, b) in best.items()},
               "paired_ratios": {run_label(*key): f["ratios"] for key, f in found.items() if f["ratios"]},
               **{f"{name.replace('-', '_')}_over_bare_{threads}t": median
                  for (threads, name), (_, median, _) in paired.items()},
               "phases_ms_per_step": {run_label(*key): value for key, value in phases.items()},
               "over_bare_target": "<= 1.05 (median of the paired ratios)",
               "energy_kd_views_over_ce_target": "<= 1.10"}
    for threads in thread_counts:
        for figure, (top, bottom) in {"energy_kd_views_over_ce": ("energy-kd-cached-views", "ce-crop"),
                                      "online_over_cached_flip": ("kd", "kd-cached")}.items():
            if (threads, top) in best and (threads, bottom) in best:
                figures[f"{figure}_{threads}t"] = best[threads, top][0] / best[threads, bottom][0]
    emit("distill_overhead", figures, args.json)
    if args.write:
        write_block(args.write, best, paired, phases, figures, args)


def run_label(threads: int, name: str) -> str:
    """A run's key in the JSON figures: its name and thread count."""
    return f"{name} @{threads}t"


#: an epoch's phases, in the order they run: the wait for batches (gather, copy, crop, flips,
#: normalisation), the rest of the training pass (forward, loss, backward, optimizer, bookkeeping),
#: the val and test passes, and the rest of the epoch (checkpoint and metrics writes)
PHASES = {"data": "batch preparation", "step": "rest of the training step", "eval": "val + test passes",
          "rest": "end-of-epoch writes"}


def phase_breakdown(engine: list[dict], bare: list[dict], steps: int) -> dict:
    """Each phase in ms per training step: energytools' and the bare loop's medians over the
    epochs, and the median of the paired differences (epoch k of each run beside each other)."""
    def split(p: dict) -> dict:
        return {"data": p["data"], "step": p["train"] - p["data"], "eval": p["eval"], "rest": p["rest"]}

    ours, theirs = [split(p) for p in engine], [split(p) for p in bare]
    return {phase: {"energytools": 1e3 * float(np.median([p[phase] for p in ours])) / steps,
                    "bare": 1e3 * float(np.median([p[phase] for p in theirs])) / steps,
                    "delta": 1e3 * float(np.median([a[phase] - b[phase] for a, b in zip(ours, theirs)])) / steps}
            for phase in PHASES}


def write_block(path: Path, best: dict, paired: dict, phases: dict, figures: dict, args) -> None:
    pairs = {key: len(f) for key, f in figures.get("paired_ratios", {}).items()}
    lines = [f"`{command()}` ({machine()}; cnn_small, batch 64, {args.limit} training and {2 * args.eval_limit} "
             f"val + test images; {args.repeats} runs of {args.epochs} epochs at each thread count, every "
             "energytools epoch paired with a bare epoch run right before it, the first (warm-up) and the last "
             "(test predictions) left out). The bare loop holds its images as normalised float32 NCHW tensors "
             "(padded once for the crops) and gathers each batch with one index_select.", "",
             "| run | threads | fastest energytools s/epoch | fastest bare s/epoch | paired energytools / bare, median "
             "| quartiles | pairs |", "|---|---|---|---|---|---|---|"]
    for (threads, name), (ours, bare) in best.items():
        if (threads, name) in paired:
            low, median, high = paired[threads, name]
            lines.append(f"| {name} | {threads} | {ours:.2f} | {bare:.2f} | **{median:.3f}** | {low:.3f}-{high:.3f} | "
                         f"{pairs[run_label(threads, name)]} |")
        else:
            lines.append(f"| {name} | {threads} | {ours:.2f} |  | (no bare loop) |  |  |")
    lines += ["", "Where the time goes: each phase of an epoch in **ms per training step** (the phase's seconds "
                  "divided by the epoch's steps), energytools − bare = difference (the median of the paired "
                  "epochs' differences); energytools' phases come from its metrics.parquet (`data_seconds`, "
                  "`train_seconds`, `eval_seconds`; the rest of the epoch is its checkpoint and metrics writes), "
                  "the bare loop times the same phases.", "",
              "| run | threads | " + " | ".join(PHASES.values()) + " | all phases, Δ |",
              "|---|---|" + "---|" * (len(PHASES) + 1)]
    for (threads, name), breakdown in phases.items():
        cells = [f"{b['energytools']:.2f} − {b['bare']:.2f} = {b['delta']:+.2f}" for b in breakdown.values()]
        total = sum(b["delta"] for b in breakdown.values())
        lines.append(f"| {name} | {threads} | " + " | ".join(cells) + f" | {total:+.2f} |")
    for threads in figures["torch_threads"]:
        if f"energy_kd_views_over_ce_{threads}t" in figures:
            lines += ["", f"energy-kd on cached views / ce on the same crops (fastest epochs, {threads} threads): "
                          f"{figures[f'energy_kd_views_over_ce_{threads}t']:.3f}."]
    replace_block(path, "distill overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
