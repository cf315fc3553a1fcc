"""`energytools train`: plain cross-entropy training (how a teacher is made here)."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch.nn.functional as F

from ..config import DataConfig, as_dict
from ..engine import seed_everything, Batch, FitResult, TrainConfig, console, fit, headline
from ..distributed import context
from ..errors import UserError
from ..io import run_lock, write_json
from ..models import create_model
from ..table import versions


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a finished or running directory unless asked."""
    if (out / "last.pt").exists() and not resume:
        if not overwrite:
            raise UserError(f"{out} already holds a run (pass --resume to continue it or --overwrite to replace it)")
        shutil.rmtree(out)


@contextlib.contextmanager
def run_directory(out: Path, resume: bool, overwrite: bool, config: dict):
    """Lock and prepare a run directory (rank 0 under torchrun); yields whether to write files."""
    ctx = context()
    ctx.check_same(config, "run config")
    with run_lock(out) if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:
            prepare_run_dir(out, resume, overwrite)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", config)
        ctx.barrier()
        yield ctx.is_main


def model_meta(arch: str, dataset, data_cfg: DataConfig) -> dict:
    info = dataset.info
    return {"arch": arch, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "dataset": dataset.describe(), "dataset_info": info.to_dict(),
            "data": as_dict(data_cfg), "normalization": {"mean": info.mean, "std": info.std}}


def train(data: DataConfig, model: str, cfg: TrainConfig, out: Path | str, resume: bool = False,
          overwrite: bool = False) -> FitResult:
    """Train ``model`` with cross-entropy on ``data``; writes best.pt, last.pt, metrics.parquet."""
    out = Path(out)
    cfg.check()
    train_set, val_set, test_set = data.build("train"), data.build("val"), data.build("test")
    info = train_set.info
    seed_everything(cfg.seed)  # the model's initial weights come from the seed
    net = create_model(model, info.num_classes, info.in_channels, info.image_size)
    config = {"stage": "train", "model": model, "data": as_dict(data), "train": as_dict(cfg)}
    with run_directory(out, resume, overwrite, config):
        meta = {**model_meta(model, train_set, data), "method": "ce", "train": as_dict(cfg), "versions": versions()}

        def step(batch: Batch, forward):
            logits = forward(batch.images)
            return logits, {"ce": F.cross_entropy(logits, batch.labels)}

        console.print(f"train {model} on {info.name} ({len(train_set)} train / {len(val_set)} val / "
                      f"{len(test_set)} test) for {cfg.epochs} epochs")
        result = fit(net, step, train_set, val_set, test_set, cfg, out, meta, resume=resume)
    console.print(headline("done", f": {out}: {result.summary()}"))
    return result
