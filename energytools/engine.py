"""The training engine shared by `train` (plain CE) and `distill` (every KD method).

Plain PyTorch in the style of torchvision's reference scripts: one loop, SGD + momentum,
validation-selected best.pt, last.pt every epoch for resume, metrics.parquet per epoch.
Randomness comes from generators seeded by (seed, epoch), so a run resumed from last.pt
ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl
import torch
import torch.nn as nn

from .config import TrainConfig, as_dict
from .console import console, progress_bar
from .data import ImageSet
from .data.base import collate
from .data.transforms import normalize, train_augment
from .data.views import EpochKeys, FreshViews, ViewedSet
from .distributed import context
from .errors import UserError
from .models import load_checkpoint, save_checkpoint
from .table import write_parquet

def model_meta(arch: str, dataset, data_cfg) -> dict:
    """What a checkpoint records so that later stages can rebuild the model and its dataset."""
    info = dataset.info
    return {"arch": arch, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "dataset": dataset.describe(), "dataset_info": info.to_dict(),
            "data": as_dict(data_cfg), "normalization": {"mean": info.mean, "std": info.std}}


def seed_everything(seed: int) -> None:
    """Seed the global generators; call before building a model so its init is reproducible."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_schedule(epoch: int, cfg: TrainConfig) -> float:
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    return cfg.lr_decay ** passed


def _cosine_schedule(epoch: int, cfg: TrainConfig) -> float:
    return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


#: name -> (epoch, cfg) -> lr multiplier for that epoch
SCHEDULES: dict[str, Callable] = {"step": _step_schedule, "cosine": _cosine_schedule}


def resolve_device(name: str = "auto") -> torch.device:
    """cuda if present, else mps, else cpu (or exactly what the user asked for)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on cuda (where supported, else fp16); a no-op elsewhere."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to cuda through pinned memory with a
    non-blocking copy, so the host does not wait for the device's queue."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def float32_exact(device: torch.device, enabled: bool = True):
    """On cuda, float32 convolutions and matmuls in full precision inside the block: PyTorch lets
    cuDNN use TF32 (10-bit mantissa) for float32 convolutions by default, which is not what a
    float32 energy table promises. Restores the previous settings; a no-op elsewhere."""
    if device.type != "cuda" or not enabled:
        yield
        return
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):  # torch >= 2.9
        saved = cudnn_conv.fp32_precision, matmul.fp32_precision
        cudnn_conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def loader_options(device: torch.device, num_workers: int, prefetch: int = 2, persistent: bool = False) -> dict:
    """DataLoader settings that keep a device fed: pinned memory on cuda (so ``non_blocking``
    copies overlap compute), and with workers, batches loaded ahead and workers kept alive
    across epochs."""
    options = {"num_workers": num_workers, "pin_memory": device.type == "cuda", "collate_fn": collate}
    if num_workers > 0:
        options.update(prefetch_factor=prefetch, persistent_workers=persistent)
    return options


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                shuffle: bool = False, generator: torch.Generator | None = None, prefetch: int = 2,
                persistent: bool = False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       **loader_options(device, num_workers, prefetch, persistent))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageSet | None, device: torch.device, batch_size: int = 512,
             num_workers: int = 0, amp: bool = True, channels_last: bool = False) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``dataset`` with the evaluation transform."""
    if dataset is None or len(dataset) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)  # counted on the device: one read at the end
    for images, labels, _ in make_loader(dataset, batch_size, device, num_workers):
        images = normalize(images.to(device, non_blocking=True), dataset.info)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        correct += (logits.argmax(1) == labels.to(device, non_blocking=True)).sum()
    model.train(was_training)
    return 100.0 * int(correct.item()) / len(dataset)


PREDICTION_SCHEMA = {"sample_id": pl.Int64, "label": pl.Int64, "pred": pl.Int64}
TEST_PREDICTIONS = "test_predictions.parquet"


@torch.no_grad()
def predict(model: nn.Module, dataset: ImageSet, device: torch.device, batch_size: int = 512, num_workers: int = 0,
            amp: bool = True) -> pl.DataFrame:
    """sample_id, label and predicted class of every sample of ``dataset`` (evaluation transform)."""
    was_training = model.training
    model.eval()
    parts = []
    for images, labels, ids in make_loader(dataset, batch_size, device, num_workers):
        with autocast(device, amp):
            logits = model(normalize(images.to(device, non_blocking=True), dataset.info))
        parts.append(pl.DataFrame({"sample_id": ids.numpy(), "label": labels.numpy(),
                                   "pred": logits.argmax(1).cpu().numpy()}, schema=PREDICTION_SCHEMA))
    model.train(was_training)
    return pl.concat(parts) if parts else pl.DataFrame(schema=PREDICTION_SCHEMA)


def write_test_predictions(model: nn.Module, test_set: ImageSet | None, out_dir: Path, cfg: TrainConfig) -> Path | None:
    """``out_dir/test_predictions.parquet``: each test sample's label, ``pred_best`` (best.pt, the
    validation-selected checkpoint) and ``pred_last`` (``model`` as training left it, i.e. last.pt).
    The report's per-class accuracies come from it; call it after :func:`fit`."""
    if test_set is None or len(test_set) == 0:
        return None
    device = resolve_device(cfg.device)
    last = predict(model, test_set, device, cfg.eval_batch_size, cfg.num_workers, cfg.amp)
    best_model = copy.deepcopy(model)
    best_model.load_state_dict(load_checkpoint(out_dir / "best.pt")["model"])
    best = predict(best_model, test_set, device, cfg.eval_batch_size, cfg.num_workers, cfg.amp)
    frame = best.rename({"pred": "pred_best"}).with_columns(pred_last=last["pred"])
    return write_parquet(frame, out_dir / TEST_PREDICTIONS,
                         {"kind": "test_predictions", "classes": list(test_set.info.classes),
                          "pred_best": "best.pt (validation-selected)", "pred_last": "last.pt (last epoch)"})


@dataclass
class Batch:
    """What a training step sees: the augmented, normalised view and per-sample keys."""

    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    flipped: torch.Tensor
    epoch: int
    views: torch.Tensor | None = None  # which stored view each sample is (replayed views), on the CPU


#: step(batch, forward) -> (logits, {loss name: value}); ``forward`` runs the trained model
#: (wrapped in DistributedDataParallel under torchrun, so gradients are synchronised)
StepFn = Callable[[Batch, Callable], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class FitResult:
    out_dir: Path
    best_epoch: int
    best_val_acc: float
    best_test_acc: float
    last_test_acc: float
    seconds: float
    metrics: pl.DataFrame = field(repr=False)

    def summary(self) -> str:
        return (f"best.pt (epoch {self.best_epoch}, val {self.best_val_acc:.2f}%): test {self.best_test_acc:.2f}% | "
                f"last.pt: test {self.last_test_acc:.2f}% | {self.seconds:.0f}s")


def _train_loader(train_set, cfg: TrainConfig, device: torch.device, ctx, views):
    """One DataLoader for the whole run (workers persist across epochs) and what to set per
    epoch: ``(loader, generator, sampler, keys)``. Without ``views`` it is the loader the run
    always had (shuffled by ``generator``); with them it hands out ``(index, epoch)`` keys so
    the workers render each sample's view for the epoch."""
    generator = torch.Generator()
    if ctx.distributed:  # each rank takes its share; cfg.batch_size is per rank
        sampler = torch.utils.data.DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=generator)
    keys = None
    if views is not None:
        keys = EpochKeys(sampler)
        dataset, batches = ViewedSet(train_set, views), torch.utils.data.BatchSampler(keys, cfg.batch_size, False)
    else:
        dataset, batches = train_set, torch.utils.data.BatchSampler(sampler, cfg.batch_size, False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                         generator=None if ctx.distributed else generator,
                                         **loader_options(device, cfg.num_workers, cfg.prefetch, persistent=True))
    return loader, generator, sampler, keys


def _as_fresh_iterator(loader) -> None:
    """What a new DataLoader iterator does before it shuffles: draw its workers' base seed from
    the loader's generator (the global one when it has none). A loader whose workers persist
    makes its iterator once, so from the second epoch on this draw is made here: the shuffles
    stay those of a loader made every epoch, as runs before persistent workers had."""
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)


def _check_finite(total: torch.Tensor, epoch: int) -> float:
    """The summed loss read from the device (the one synchronisation); raises when it is not finite."""
    value = float(total)
    if not math.isfinite(value):
        raise UserError(f"training diverged at epoch {epoch + 1} (loss {value}); lower --lr")
    return value


def fit(model: nn.Module, step: StepFn, train_set, val_set: ImageSet | None, test_set: ImageSet | None,
        cfg: TrainConfig, out_dir: Path, meta: dict, resume: bool = True, views=None,
        distiller=None) -> FitResult:
    """Train ``model`` with ``step`` and write best.pt, last.pt and metrics.parquet to ``out_dir``.

    ``step(batch) -> (logits, {name: loss})``; the losses are summed. ``train_set`` yields
    ``(uint8 image, label, sample_id)``; its ``info`` gives the train augmentation, applied to
    each batch here by :func:`train_augment` with a generator seeded by (seed, epoch). With
    ``views`` (energytools.data.views.ReplayViews or FreshViews) the loader renders each
    sample as the view the schedule picks for the epoch instead, a pure function of
    (seed, sample_id, view) wherever it runs; datasets whose train transform needs the
    original image (RandomResizedCrop) always train that way.
    ``meta`` is stored in every checkpoint and in the metrics file.

    The loss terms are summed on the device and read every ``cfg.sync_every`` steps and at the
    end of the epoch (no per-step host synchronisation); a non-finite sum ends the run.

    ``distiller`` (an energytools.distillers.Distiller, optional): its
    ``extra_parameter_groups()`` join the optimizer (their gradients averaged across ranks),
    its ``extra_state()`` is saved in last.pt and restored on resume, and its
    ``epoch_metrics()`` join each epoch's metrics row.
    """
    cfg.check()
    ctx = context()
    device = resolve_device(cfg.device)
    info = train_set.info
    if views is None and info.train_transform.kind == "resized-crop":
        views = FreshViews(info.train_transform, cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = model
    if ctx.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    extra_groups = []
    if distiller is not None:  # the method's own parameters (CTKD's temperature), beside the student's
        distiller.to(device)
        extra_groups = [{**group, "params": list(group["params"])} for group in distiller.extra_parameter_groups()]
    optimizer = torch.optim.SGD([{"params": model.parameters()}, *extra_groups], lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp
                                  and not torch.cuda.is_bf16_supported())
    # float64 sums reproduce the per-step Python-float sums exactly; mps has no float64
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start_epoch, best_val, best_epoch = 0, -1.0, 0
    last_path = out_dir / "last.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if distiller is not None and state.get("distiller"):
            distiller.load_extra_state(state["distiller"])
        start_epoch, best_val, best_epoch = state["epoch"], state["best_val_acc"], state["best_epoch"]
        rows = list(state["metrics"])
        console.print(f"resuming {out_dir} from epoch {start_epoch}")
    loader, generator, sampler, keys = _train_loader(train_set, cfg, device, ctx, views)
    with progress_bar() as progress:
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            lr = cfg.lr * SCHEDULES[cfg.schedule](epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator.manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + ctx.rank)
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)
            if ctx.distributed:
                sampler.set_epoch(epoch)
            if keys is not None:
                keys.epoch = epoch
            if cfg.num_workers > 0 and epoch > start_epoch:
                _as_fresh_iterator(loader)
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), info="",
                                     visible=ctx.is_main)
            model.train()
            sums: dict[str, torch.Tensor] = {}  # per loss term: sum over samples, on the device
            seen = 0
            for step_index, fetched in enumerate(loader, 1):
                if views is None:
                    images, labels, ids = fetched
                    images, flipped = train_augment(images, info, generator)  # on the CPU: its draws as ever
                    chosen = None
                else:
                    images, labels, ids, flipped, chosen = fetched
                images = normalize(to_device(images, device), info)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                batch = Batch(images, to_device(labels, device), ids, flipped, epoch, chosen)
                with autocast(device, cfg.amp):
                    _, losses = step(batch, forward)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if ctx.distributed and extra_groups:  # not in DDP: average their gradients here
                    ctx.all_mean_grads([p for group in extra_groups for p in group["params"]])
                scaler.step(optimizer)
                scaler.update()
                count = len(labels)
                seen += count
                for name, value in losses.items():
                    term = value.detach().to(sum_dtype) * count
                    sums[name] = sums[name] + term if name in sums else term
                if cfg.sync_every and step_index % cfg.sync_every == 0:
                    total = _check_finite(sum(sums.values()), epoch)
                    progress.update(task, advance=1, info=f"loss {total / seen:.3f}")
                else:
                    progress.update(task, advance=1)
            progress.remove_task(task)
            names = sorted(sums)
            if names:
                _check_finite(sum(sums.values()), epoch)
            values = torch.stack([sums[n] for n in names]).tolist() if names else []  # one read per epoch
            summed = ctx.all_sum(values + [seen])
            totals, seen = dict(zip(names, summed[:-1])), int(summed[-1])
            val_acc = evaluate(model, val_set, device, cfg.eval_batch_size, cfg.num_workers, cfg.amp, cfg.channels_last)
            test_acc = evaluate(model, test_set, device, cfg.eval_batch_size, cfg.num_workers, cfg.amp,
                                cfg.channels_last)
            row = {"epoch": epoch + 1, "lr": lr, "loss": sum(totals.values()) / max(seen, 1),
                   **{f"loss_{k}": v / max(seen, 1) for k, v in totals.items()},
                   "val_acc": val_acc, "test_acc": test_acc, "seconds": time.perf_counter() - started,
                   **(distiller.epoch_metrics() if distiller is not None else {})}
            rows.append(row)
            improved = val_acc > best_val or val_set is None or math.isnan(val_acc)  # no val samples: the last
            if improved:
                best_val, best_epoch = val_acc, epoch + 1
            if ctx.is_main:  # every rank holds the same weights; one writes them
                if improved:
                    save_checkpoint(out_dir / "best.pt", model, meta, epoch=epoch + 1, val_acc=val_acc,
                                    test_acc=test_acc)
                save_checkpoint(last_path, model, meta, epoch=epoch + 1, optimizer=optimizer.state_dict(),
                                best_val_acc=best_val, best_epoch=best_epoch, metrics=rows,
                                distiller=distiller.extra_state() if distiller is not None else {})
                write_parquet(pl.DataFrame(rows), out_dir / "metrics.parquet", {"kind": "metrics", **meta})
            ctx.barrier()
            if ctx.is_main:
                console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  val {val_acc:.2f}%  "
                              f"test {test_acc:.2f}%  lr {lr:.4g}  {row['seconds']:.1f}s")
    metrics = pl.DataFrame(rows)
    best_row = metrics.filter(pl.col("epoch") == best_epoch).row(0, named=True)
    return FitResult(out_dir, best_epoch, best_row["val_acc"], best_row["test_acc"], rows[-1]["test_acc"],
                     float(metrics["seconds"].sum()), metrics)
