"""Validation and test passes: accuracy counted on the device, predictions per sample."""
from __future__ import annotations

import copy
from pathlib import Path

import polars as pl
import torch
import torch.nn as nn

from ..data import ImageSet
from ..data.transforms import normalize
from ..models import load_checkpoint
from ..table import write_parquet
from .loaders import make_loader
from .runtime import autocast, resolve_device


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
