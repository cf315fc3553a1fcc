"""`energytools train`: plain cross-entropy training (how a teacher is made here)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.nn.functional as F

from ..config import TrainStageConfig, as_dict, content_of, resume_may_change_keys
from ..console import console, headline
from ..distributed import context
from ..engine import Batch, FitResult, fit, model_meta, seed_everything, write_test_predictions
from ..models import create_model
from ..models.init import init_from
from ..resume import run_directory
from ..table import versions
from ..trackers import fit_callbacks, steps_per_epoch, watch_run


def train(cfg: TrainStageConfig, on_step: Callable | None = None) -> FitResult:
    """Train ``cfg.model`` with cross-entropy on ``cfg.data``; writes best.pt, last.pt, metrics.parquet.
    ``on_step`` (an :class:`energytools.engine.StepEvent` callback) sees every step."""
    out = Path(cfg.out)
    cfg.train.check()
    # under torchrun: join the process group for this device first; rank 0 speaks for the job
    main = context(cfg.train.device).is_main
    data = cfg.data
    train_set, val_set, test_set = data.build("train"), data.build("val"), data.build("test")
    info = train_set.info
    seed_everything(cfg.train.seed)  # the model's initial weights come from the seed
    net = create_model(cfg.model, info.num_classes, info.in_channels, info.image_size)
    config = {"stage": "train", **content_of(cfg)}
    if cfg.init:  # pretrained weights: the loaded, re-initialised and ignored tensors go into the run's config
        report = init_from(net, cfg.init, info.num_classes)
        config["init_weights"] = report.to_dict()
        if main:
            console.print(f"init from {cfg.init}: {report.summary()}")
    # a resumed run may change what is marked so, and init's path (its content is compared)
    may_change = resume_may_change_keys(cfg) | {"init_weights.path"}
    with run_directory(out, cfg.resume, cfg.overwrite, config, may_change) as writes_files:
        meta = {**model_meta(cfg.model, train_set, data), "method": "ce", "train": as_dict(cfg.train),
                "versions": versions()}

        def step(batch: Batch, forward):
            logits = forward(batch.images)
            return logits, {"ce": F.cross_entropy(logits, batch.labels, label_smoothing=cfg.train.label_smoothing)}

        if main:
            console.print(f"train {cfg.model} on {info.name} ({len(train_set)} train / {len(val_set)} val / "
                          f"{len(test_set)} test) for {cfg.train.epochs} epochs")
        steps = steps_per_epoch(len(train_set), cfg.train.batch_size, context().world)
        with watch_run(cfg.train.log if writes_files else (), out, config, cfg.resume, steps,
                       cfg.train.log_every) as watcher:
            result = fit(net, step, train_set, val_set, test_set, cfg.train, out, meta, resume=cfg.resume,
                         **fit_callbacks(watcher, on_step))
        if writes_files:
            write_test_predictions(net, test_set, out, cfg.train)
    if main:
        console.print(headline("done", f": {out}: {result.summary()}"))
    return result
