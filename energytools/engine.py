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


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                shuffle: bool = False, generator: torch.Generator | None = None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       collate_fn=collate)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageSet | None, device: torch.device, batch_size: int = 512,
             num_workers: int = 0, amp: bool = True) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``dataset`` with the evaluation transform."""
    if dataset is None or len(dataset) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for images, labels, _ in make_loader(dataset, batch_size, device, num_workers):
        with autocast(device, amp):
            logits = model(normalize(images.to(device, non_blocking=True), dataset.info))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(dataset)


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


def fit(model: nn.Module, step: StepFn, train_set, val_set: ImageSet | None, test_set: ImageSet | None,
        cfg: TrainConfig, out_dir: Path, meta: dict, resume: bool = True) -> FitResult:
    """Train ``model`` with ``step`` and write best.pt, last.pt and metrics.parquet to ``out_dir``.

    ``step(batch) -> (logits, {name: loss})``; the losses are summed. ``train_set`` yields
    ``(uint8 image, label, sample_id)``; its ``info`` gives the train augmentation.
    ``meta`` is stored in every checkpoint and in the metrics file.
    """
    cfg.check()
    ctx = context()
    device = resolve_device(cfg.device)
    info = train_set.info
    model.to(device)
    forward = model
    if ctx.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp
                                  and not torch.cuda.is_bf16_supported())
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start_epoch, best_val, best_epoch = 0, -1.0, 0
    last_path = out_dir / "last.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_val, best_epoch = state["epoch"], state["best_val_acc"], state["best_epoch"]
        rows = list(state["metrics"])
        console.print(f"resuming {out_dir} from epoch {start_epoch}")
    with progress_bar() as progress:
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            lr = cfg.lr * SCHEDULES[cfg.schedule](epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + ctx.rank)
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)
            if ctx.distributed:  # each rank takes its share; cfg.batch_size is per rank
                sampler = torch.utils.data.DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed)
                sampler.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                                     num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                                     collate_fn=collate)
            else:
                loader = make_loader(train_set, cfg.batch_size, device, cfg.num_workers, shuffle=True, generator=generator)
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), info="",
                                     visible=ctx.is_main)
            model.train()
            totals: dict[str, float] = {}
            seen = 0
            for images, labels, ids in loader:
                images, flipped = train_augment(images, info, generator)
                batch = Batch(normalize(images.to(device, non_blocking=True), info), labels.to(device), ids,
                              flipped, epoch)
                with autocast(device, cfg.amp):
                    _, losses = step(batch, forward)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise UserError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                count = len(labels)
                seen += count
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + value.item() * count
                progress.update(task, advance=1, info=f"loss {loss.item():.3f}")
            progress.remove_task(task)
            names = sorted(totals)
            summed = ctx.all_sum([totals[n] for n in names] + [seen])
            totals, seen = dict(zip(names, summed[:-1])), int(summed[-1])
            val_acc = evaluate(model, val_set, device, cfg.eval_batch_size, cfg.num_workers, cfg.amp)
            test_acc = evaluate(model, test_set, device, cfg.eval_batch_size, cfg.num_workers, cfg.amp)
            row = {"epoch": epoch + 1, "lr": lr, "loss": sum(totals.values()) / max(seen, 1),
                   **{f"loss_{k}": v / max(seen, 1) for k, v in totals.items()},
                   "val_acc": val_acc, "test_acc": test_acc, "seconds": time.perf_counter() - started}
            rows.append(row)
            improved = val_acc > best_val or val_set is None
            if improved:
                best_val, best_epoch = val_acc, epoch + 1
            if ctx.is_main:  # every rank holds the same weights; one writes them
                if improved:
                    save_checkpoint(out_dir / "best.pt", model, meta, epoch=epoch + 1, val_acc=val_acc,
                                    test_acc=test_acc)
                save_checkpoint(last_path, model, meta, epoch=epoch + 1, optimizer=optimizer.state_dict(),
                                best_val_acc=best_val, best_epoch=best_epoch, metrics=rows)
                write_parquet(pl.DataFrame(rows), out_dir / "metrics.parquet", {"kind": "metrics", **meta})
            ctx.barrier()
            if ctx.is_main:
                console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  val {val_acc:.2f}%  "
                              f"test {test_acc:.2f}%  lr {lr:.4g}  {row['seconds']:.1f}s")
    metrics = pl.DataFrame(rows)
    best_row = metrics.filter(pl.col("epoch") == best_epoch).row(0, named=True)
    return FitResult(out_dir, best_epoch, best_row["val_acc"], best_row["test_acc"], rows[-1]["test_acc"],
                     float(metrics["seconds"].sum()), metrics)
