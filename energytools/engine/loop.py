"""The training loop shared by `train` (plain CE) and `distill` (every KD method), in timm's
shape: :func:`train_one_epoch` and :func:`~energytools.engine.evaluation.evaluate` are plain
functions, :func:`fit` is resume + a loop over them + checkpoints.

Randomness comes from generators seeded by (seed, epoch), so a run resumed from last.pt ends
with the same weights as an uninterrupted one on the CPU. On CUDA a resumed run has the same
schedule, data order, augmentations and GradScaler state (saved in last.pt), and its weights are
equal up to the GPU's float non-determinism (atomics in cuDNN weight gradients and some backward
kernels); with ``--deterministic`` they are equal, at some cost in speed. ``on_step`` sees every optimizer step (tests and
callers watch the loop through it instead of patching its internals).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl
import torch
import torch.nn as nn

from ..console import console, progress_bar
from ..data import ImageSet
from ..data.views import FreshViews
from ..distributed import context
from ..errors import UserError
from ..models import load_checkpoint, save_checkpoint
from ..optim import create_optimizer, create_schedule, set_lr
from ..options import as_dict
from ..table import write_parquet
from ..preemption import RESUME_RUN, Stopped, stop_requested
from .checkpoint import Position, StepBoundary, own_rngs, restore_rngs
from .ema import ModelEma, create_ema
from .evaluation import Evaluator
from .loaders import TrainLoader
from .runtime import amp_dtype, autocast, deterministic, resolve_device


def model_meta(arch: str, dataset, data_cfg) -> dict:
    """What a checkpoint records so that later stages can rebuild the model and its dataset."""
    info = dataset.info
    return {"arch": arch, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "dataset": dataset.describe(), "dataset_info": info.to_dict(),
            "data": as_dict(data_cfg), "normalization": {"mean": info.mean, "std": info.std}}


#: the metrics columns that time an epoch (they differ between runs of the same weights)
TIMING_COLUMNS = ("seconds", "train_seconds", "data_seconds", "eval_seconds")


@dataclass
class Batch:
    """What a training step sees: the augmented, normalised view and per-sample keys."""

    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    flipped: torch.Tensor
    epoch: int
    views: torch.Tensor | None = None  # which stored view each sample is (replayed views), on the CPU
    #: what the step worked out per sample (a distill step: teacher logits, temperatures), for ``on_step``
    extras: dict = field(default_factory=dict)


#: step(batch, forward) -> (logits, {loss name: value}); ``forward`` runs the trained model
#: (wrapped in DistributedDataParallel under torchrun, so gradients are synchronised)
StepFn = Callable[[Batch, Callable], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepEvent:
    """What ``on_step`` receives after each optimizer step."""

    epoch: int  # 0-based
    step: int  # 1-based, within the epoch
    batch: Batch
    logits: torch.Tensor
    losses: dict[str, torch.Tensor]
    lr: float | None = None  # the lr of the model's parameters at this step


@dataclass
class FitResult:
    out_dir: Path
    best_epoch: int
    best_val_acc: float
    best_test_acc: float
    last_test_acc: float
    seconds: float
    metrics: pl.DataFrame = field(repr=False)
    best_weights: str = "raw"  # which weights best.pt holds: "raw" or "ema" (--ema-decay)

    def summary(self) -> str:
        which = " EMA" if self.best_weights == "ema" else ""
        return (f"best.pt (epoch {self.best_epoch}{which}, val {self.best_val_acc:.2f}%): test {self.best_test_acc:.2f}% | "
                f"last.pt: test {self.last_test_acc:.2f}% | {self.seconds:.0f}s")


def _check_finite(total: torch.Tensor, epoch: int) -> float:
    """The summed loss read from the device (the one synchronisation); raises when it is not finite."""
    value = float(total)
    if not math.isfinite(value):
        raise UserError(f"training diverged at epoch {epoch + 1} (loss {value}); lower --lr")
    return value


def _total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the loss terms, without ``sum()``'s extra ``0 + first`` op a step."""
    if not losses:
        raise ValueError("the training step returned no loss terms")
    terms = iter(losses.values())
    total = next(terms)
    for term in terms:
        total = total + term
    return total


def train_one_epoch(epoch: int, model: nn.Module, forward: Callable, step: StepFn, loader: TrainLoader,
                    optimizer: torch.optim.Optimizer, scaler, cfg, device: torch.device, info,
                    progress=None, on_step: Callable[[StepEvent], None] | None = None,
                    extra_groups: list[dict] = (), lr_at: Callable[[float], float] | None = None,
                    ema: ModelEma | None = None, position: Position | None = None,
                    at_boundary: Callable[[int, int, dict, int], None] | None = None,
                    timings: dict | None = None) -> tuple[dict, int]:
    """One pass over ``loader``: returns each loss term summed over samples (on the device) and
    the number of samples seen. The sums are read every ``cfg.sync_every`` steps (progress and
    the divergence check), never per step.

    ``lr_at`` (fractional epoch -> lr, :func:`energytools.optim.create_schedule`) sets the lr
    before each optimizer step; ``ema`` is updated after each. With ``cfg.accumulate`` N the
    optimizer steps every N batches (and at the epoch's end) on the mean of their losses;
    ``on_step`` still sees every batch. ``position`` (a resumed epoch) gives the batches already
    done, which ``loader`` skips, and the sums so far; ``at_boundary(epoch, step, sums, seen)``
    runs after each optimizer step (mid-epoch checkpoints, stop requests). ``timings`` (a dict)
    gets the seconds spent waiting for batches (fetch, copy to the device, augmentation) added
    under ``data_seconds``, as timm's data_time."""
    # float64 sums reproduce the per-step Python-float sums exactly; mps has no float64
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64
    task = None
    if progress is not None:
        task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), info="",
                                 visible=context().is_main)
    # the bar moves at most 10 times a second (rich redraws it no faster): an update per step
    # costs more than a tiny model's step
    next_update = 0.0
    model.train()
    sums: dict[str, torch.Tensor] = {k: v.clone() for k, v in position.sums.items()} if position is not None else {}
    seen = position.seen if position is not None else 0
    done = position.step if position is not None else 0
    if task is not None and done:
        progress.update(task, completed=done)
    accumulate, steps, clip = getattr(cfg, "accumulate", 1), len(loader), getattr(cfg, "clip_grad", None)
    data_seconds, ready = 0.0, time.perf_counter()
    for step_index, (images, labels, ids, flipped, chosen) in enumerate(loader.on_device(info), done + 1):
        data_seconds += time.perf_counter() - ready  # waiting for the batch: fetch, copy, augmentation
        first = (step_index - 1) % accumulate == 0  # the first batch of an optimizer step
        last = step_index % accumulate == 0 or step_index == steps  # the batch that steps
        if lr_at is not None and first:  # the lr of this optimizer step, at its fractional epoch
            set_lr(optimizer, lr_at(epoch + (step_index - 1) / steps))
        batch = Batch(images, labels, ids, flipped, epoch, chosen)
        # --accumulate under torchrun: the batches before the one that steps keep their gradients
        # local (DDP's no_sync, around the forward too); the last one's backward all-reduces the sum
        with forward.no_sync() if not last and hasattr(forward, "no_sync") else contextlib.nullcontext():
            with autocast(device, cfg.amp):
                logits, losses = step(batch, forward)
            loss = _total(losses)
            if first:
                optimizer.zero_grad(set_to_none=True)
            if accumulate > 1:  # --accumulate: the mean over the step's batches (fewer in the epoch's last)
                loss = loss / min(accumulate, steps - (step_index - 1) // accumulate * accumulate)
            scaler.scale(loss).backward()
        if last:
            if extra_groups and context().distributed:  # not in DDP: average their gradients here
                context().all_mean_grads([p for group in extra_groups for p in group["params"]])
            if clip:  # --clip-grad: the global norm of every optimized gradient, unscaled first
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
        count = len(labels)
        seen += count
        for name, value in losses.items():  # one in-place op a term; value * count is exact in float64
            if name not in sums:
                sums[name] = torch.zeros((), dtype=sum_dtype, device=value.device)
            sums[name].add_(value.detach().reshape(()), alpha=count)
        if on_step is not None:
            on_step(StepEvent(epoch, step_index, batch, logits, losses, optimizer.param_groups[0]["lr"]))
        if at_boundary is not None and last:  # between optimizer steps: no gradient is half accumulated
            at_boundary(epoch, step_index, sums, seen)
        if task is not None and cfg.sync_every and step_index % cfg.sync_every == 0:
            total = _check_finite(sum(sums.values()), epoch)
            progress.update(task, completed=step_index, info=f"loss {total / seen:.3f}")
        elif task is not None and time.perf_counter() >= next_update:
            progress.update(task, completed=step_index)
            next_update = time.perf_counter() + 0.1
        ready = time.perf_counter()
    if task is not None:
        progress.remove_task(task)
    if sums:
        _check_finite(sum(sums.values()), epoch)
    if timings is not None:
        timings["data_seconds"] = timings.get("data_seconds", 0.0) + data_seconds
    return sums, seen


def fit(model: nn.Module, step: StepFn, train_set, val_set: ImageSet | None, test_set: ImageSet | None,
        cfg, out_dir: Path, meta: dict, resume: bool = True, views=None,
        on_step: Callable[[StepEvent], None] | None = None, distiller=None, stateful: dict | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``model`` with ``step`` and write best.pt, last.pt and metrics.parquet to ``out_dir``.

    ``step(batch, forward) -> (logits, {name: loss})``; the losses are summed. ``train_set``
    yields ``(uint8 image, label, sample_id)``; its ``info`` gives the train augmentation,
    applied to each batch by :func:`train_augment` with a generator seeded by (seed, epoch).
    With ``views`` (energytools.data.views.ReplayViews or FreshViews) the loader renders each
    sample as the view the schedule picks for the epoch instead, a pure function of
    (seed, sample_id, view) wherever it runs; datasets whose train transform needs the
    original image (RandomResizedCrop) always train that way. ``meta`` is stored in every
    checkpoint and in the metrics file.

    ``distiller`` (an energytools.distillers.Distiller, optional): its
    ``extra_parameter_groups()`` join the optimizer (their gradients averaged across ranks),
    its ``extra_state()`` is saved in last.pt and restored on resume, and its
    ``epoch_metrics()`` join each epoch's metrics row.

    A stop signal (energytools.preemption) ends the run after the current optimizer step with
    last.pt holding the position inside the epoch (energytools.engine.checkpoint), as
    ``cfg.checkpoint_every_steps`` does periodically; ``resume`` continues from there.
    ``stateful`` names objects with ``state_dict()``/``load_state_dict()`` whose random state a
    step advances (online HE-DA's generators), saved with that position.
    ``on_epoch(row)`` sees each epoch's metrics row on rank 0 (trackers log it).
    """
    cfg.check()
    ctx = context(cfg.device)
    device = resolve_device(cfg.device)
    info = train_set.info
    if views is None and info.train_transform.kind == "resized-crop":
        views = FreshViews(info.train_transform, cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = model
    if ctx.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    extra_groups = []
    if distiller is not None:  # the method's own parameters (CTKD's temperature), beside the student's
        distiller.to(device)
        extra_groups = [{**group, "params": list(group["params"])} for group in distiller.extra_parameter_groups()]
    optimizer = create_optimizer(cfg, model, extra_groups)
    lr_at = create_schedule(cfg)
    ema = create_ema(model, cfg)
    # fp16 (a GPU without native bf16) needs loss scaling; bf16 and float32 do not
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and amp_dtype(device) == torch.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start_epoch, best_val, best_epoch, best_weights = 0, -1.0, 0, "raw"
    last_path = out_dir / "last.pt"
    position, stateful = None, stateful or {}
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if distiller is not None and state.get("distiller"):
            distiller.load_extra_state(state["distiller"])
        if state.get("scaler"):  # fp16 runs: the loss scale goes on where it was
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.restore(state)
        best_weights = state.get("best_weights", "raw")
        start_epoch, best_val, best_epoch = state["epoch"], state["best_val_acc"], state["best_epoch"]
        rows = list(state["metrics"])
        position = Position.from_state(state["position"], device) if state.get("position") else None
        if position is not None:
            own_rngs(position.rngs)  # refused now, before anything runs, when another number of ranks wrote it
        if ctx.is_main:
            console.print(f"{out_dir} is complete: {start_epoch} of {cfg.epochs} epochs trained; nothing to resume"
                          if start_epoch >= cfg.epochs else f"resuming {out_dir} at epoch {start_epoch + 1}"
                          + (f", after step {position.step}" if position is not None else ""))
    loader = TrainLoader(train_set, cfg, device, ctx, views)
    # one loader per evaluation set for the run (raw and EMA weights), each rank a share of the set
    evaluators = {name: Evaluator(dataset, device, cfg.eval_batch_size, cfg.num_workers, cfg.amp, cfg.channels_last, ctx)
                  for name, dataset in (("val", val_set), ("test", test_set))}

    def save_last(epochs_done: int, epoch_position: Position | None = None) -> None:
        """last.pt: everything a resumed run needs, after ``epochs_done`` epochs (and a position
        inside the next one); rank 0 writes it, every rank holding the same weights."""
        if ctx.is_main:
            save_checkpoint(last_path, model, meta, epoch=epochs_done, optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), best_val_acc=best_val, best_epoch=best_epoch, metrics=rows,
                            distiller=distiller.extra_state() if distiller is not None else {},
                            position=epoch_position.to_state() if epoch_position else None,
                            **({**ema.checkpoint_state(), "best_weights": best_weights} if ema is not None else {}))

    at_boundary = StepBoundary(getattr(cfg, "checkpoint_every_steps", 0), len(loader),
                               lambda p: save_last(p.epoch, p), loader.generator, stateful, out_dir,
                               getattr(cfg, "accumulate", 1), device)
    with progress_bar() as progress, deterministic(cfg.deterministic, device):
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            lr = lr_at(epoch)
            set_lr(optimizer, lr)
            loader.start_epoch(epoch)
            resumed = position if position is not None and position.epoch == epoch else None
            if resumed is not None:
                loader.resume_at(resumed.step, lambda p=resumed: restore_rngs(p.rngs, loader.generator, stateful,
                                                                                device))
            position = None
            timings = {}
            sums, seen = train_one_epoch(epoch, model, forward, step, loader, optimizer, scaler, cfg, device, info,
                                         progress, on_step, extra_groups, lr_at, ema, resumed, at_boundary, timings)
            train_seconds = time.perf_counter() - started
            names = sorted(sums)
            values = torch.stack([sums[n] for n in names]).tolist() if names else []  # one read per epoch
            summed = ctx.all_sum(values + [seen])
            totals, seen = dict(zip(names, summed[:-1])), int(summed[-1])
            evaluated = time.perf_counter()
            val_acc, test_acc = evaluators["val"].accuracy(model), evaluators["test"].accuracy(model)
            row = {"epoch": epoch + 1, "lr": lr, "loss": sum(totals.values()) / max(seen, 1),
                   **{f"loss_{k}": v / max(seen, 1) for k, v in totals.items()},
                   "val_acc": val_acc, "test_acc": test_acc,
                   **(distiller.epoch_metrics() if distiller is not None else {})}
            candidate, which = (model, "raw")
            if ema is not None:  # the averaged weights, evaluated beside the raw ones; best.pt takes either
                row["ema_val_acc"] = evaluators["val"].accuracy(ema.module)
                row["ema_test_acc"] = evaluators["test"].accuracy(ema.module)
                if row["ema_val_acc"] > val_acc:
                    candidate, which, val_acc, test_acc = ema.module, "ema", row["ema_val_acc"], row["ema_test_acc"]
            # where the epoch went (the checkpoint and metrics writes below are not in "seconds")
            now = time.perf_counter()
            row.update(zip(TIMING_COLUMNS, (now - started, train_seconds, timings.get("data_seconds", 0.0),
                                            now - evaluated)))
            rows.append(row)
            improved = val_acc > best_val or val_set is None or math.isnan(val_acc)  # no val samples: the last
            if improved:
                best_val, best_epoch, best_weights = val_acc, epoch + 1, which
            if ctx.is_main:  # every rank holds the same weights; one writes them
                if improved:
                    save_checkpoint(out_dir / "best.pt", candidate, meta, epoch=epoch + 1, val_acc=val_acc,
                                    test_acc=test_acc, **({"weights": which} if ema is not None else {}))
                save_last(epoch + 1)
                write_parquet(pl.DataFrame(rows), out_dir / "metrics.parquet", {"kind": "metrics", **meta})
            ctx.barrier()
            if ctx.is_main and on_epoch is not None:
                on_epoch(row)
            if ctx.is_main:
                ema_text = f"  EMA val {row['ema_val_acc']:.2f}%" if ema is not None else ""
                console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  val {row['val_acc']:.2f}%  "
                              f"test {row['test_acc']:.2f}%{ema_text}  lr {lr:.4g}  {row['seconds']:.1f}s")
            _stop_after_epoch(epoch, cfg.epochs, last_path)
    metrics = pl.DataFrame(rows)
    best_row = metrics.filter(pl.col("epoch") == best_epoch).row(0, named=True)
    prefix = "ema_" if best_weights == "ema" else ""
    return FitResult(out_dir, best_epoch, best_row[f"{prefix}val_acc"], best_row[f"{prefix}test_acc"],
                     rows[-1]["test_acc"], float(metrics["seconds"].sum()), metrics, best_weights)


def _stop_after_epoch(epoch: int, epochs: int, last_path: Path) -> None:
    """A stop signal that came during evaluation or the epoch's checkpoint: last.pt holds the
    finished epoch, so stop there (every rank agrees first)."""
    signum = context().agree_stop(stop_requested())
    if signum is not None and epoch + 1 < epochs:
        raise Stopped(signum, f"epoch {epoch + 1} saved in {last_path}", RESUME_RUN)
