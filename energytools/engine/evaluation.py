"""Validation and test passes: accuracy counted on the device, predictions per sample."""
from __future__ import annotations

import copy
from pathlib import Path

import polars as pl
import torch
import torch.distributed as dist
import torch.nn as nn

from ..data import ImageSet
from ..data.transforms import normalize
from ..distributed import Context
from ..models import load_checkpoint
from ..table import write_parquet
from .loaders import loader_options, make_loader
from .runtime import autocast, resolve_device


def shard_batches(size: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The evaluation batches of ``rank``: the one-process batches (consecutive runs of
    ``batch_size`` indices of a ``size`` set), dealt out in turn. Each sample is one rank's, none
    is repeated (no DistributedSampler padding), and every batch holds what it holds in one
    process, so each prediction is the one-process one."""
    return [list(range(start, min(start + batch_size, size)))
            for start in range(rank * batch_size, size, world * batch_size)]


@torch.no_grad()
def share_buffers(model: nn.Module, ctx: Context) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them only at
    the start of a forward, so after the epoch's last step each rank holds its own; rank 0's are
    those best.pt and last.pt save. One broadcast per dtype (and device)."""
    groups: dict = {}
    for buffer in model.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    with ctx.collective("taking rank 0's buffers before evaluating"):
        for buffers in groups.values():
            flat = torch.cat([b.reshape(-1) for b in buffers]).to(ctx.device)
            dist.broadcast(flat, src=0)
            if not ctx.is_main:
                parts = flat.to(buffers[0].device).split([b.numel() for b in buffers])
                torch._foreach_copy_(buffers, [part.view_as(b) for part, b in zip(parts, buffers)])


class Evaluator:
    """Top-1 accuracy (percent) on one evaluation set with the evaluation transform, through one
    loader made once (:meth:`accuracy` may run every epoch, for the raw and the EMA weights: with
    ``num_workers`` its workers persist rather than start again for each pass).

    With ``ctx`` a torchrun job's context (energytools.distributed.context()) the set is shared
    by the ranks (:func:`shard_batches`), each rank evaluates its batches with rank 0's buffers
    (:func:`share_buffers`; the weights must already be equal, as DDP keeps them) and the correct
    counts are summed: every rank gets the accuracy one process gets, and every rank must call
    :meth:`accuracy` for it."""

    def __init__(self, dataset: ImageSet | None, device: torch.device, batch_size: int = 512, num_workers: int = 0,
                 amp: bool = True, channels_last: bool = False, ctx: Context | None = None, persistent: bool = True):
        self.dataset, self.device, self.amp, self.channels_last = dataset, device, amp, channels_last
        self.ctx = ctx if ctx is not None and ctx.distributed else None
        self.loader = None
        if dataset is None or len(dataset) == 0:
            return
        rank, world = (self.ctx.rank, self.ctx.world) if self.ctx is not None else (0, 1)
        batches = shard_batches(len(dataset), batch_size, rank, world)
        workers = num_workers if batches else 0  # a rank without a batch starts no worker
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                                  **loader_options(device, workers, persistent=persistent))

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """``model``'s accuracy on the set (nan without samples), in eval mode; its mode is restored."""
        if self.loader is None:
            return float("nan")
        if self.ctx is not None:
            share_buffers(model, self.ctx)
        was_training = model.training
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)  # counted on the device: one read
        for images, labels, _ in self.loader:
            images = normalize(images.to(self.device, non_blocking=True), self.dataset.info)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                logits = model(images)
            correct += (logits.argmax(1) == labels.to(self.device, non_blocking=True)).sum()
        model.train(was_training)
        if self.ctx is not None:
            with self.ctx.collective("summing the ranks' correct predictions"):
                correct = correct.to(self.ctx.device)
                dist.all_reduce(correct)
        return 100.0 * int(correct.item()) / len(self.dataset)


def evaluate(model: nn.Module, dataset: ImageSet | None, device: torch.device, batch_size: int = 512,
             num_workers: int = 0, amp: bool = True, channels_last: bool = False, ctx: Context | None = None) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``dataset`` with the evaluation transform, through
    a loader made for this call (:class:`Evaluator` keeps one for a run). With ``ctx`` (a torchrun
    job's context) the ranks share the work and every rank must call it; without, this process
    evaluates the whole set."""
    return Evaluator(dataset, device, batch_size, num_workers, amp, channels_last, ctx, persistent=False).accuracy(model)


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


def write_test_predictions(model: nn.Module, test_set: ImageSet | None, out_dir: Path, cfg) -> Path | None:
    """``out_dir/test_predictions.parquet``: each test sample's label, ``pred_best`` (best.pt, the
    validation-selected checkpoint) and ``pred_last`` (``model`` as training left it, i.e. last.pt).
    The report's per-class accuracies come from it; call it after :func:`~energytools.engine.fit`."""
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
