"""`energytools train`: plain cross-entropy training (how a teacher is made here), and with
``--folds K`` the K fold teachers that out-of-fold scores come from (energytools.folds)."""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch.nn.functional as F

from ..config import TrainStageConfig, as_dict, content_of, resume_may_change_keys
from ..console import console, headline
from ..distributed import context
from ..engine import Batch, FitResult, fit, model_meta, seed_everything, write_test_predictions
from ..errors import UserError
from ..folds import (MANIFEST, assign_folds, check_same_folds, fold_checkpoint, fold_dir, fold_status, new_manifest,
                     read_manifest, remove_folds, write_manifest)
from ..io import check_output_path, run_lock, sha256_file
from ..models import create_model
from ..models.init import init_from
from ..preemption import Interrupted, Stopped
from ..resume import first_missing, run_directory
from ..table import versions
from ..trackers import fit_callbacks, steps_per_epoch, watch_run

#: how a stopped `train --folds` continues: finished folds are kept, the stopped one resumes
CONTINUE_FOLDS = "re-run the same command to continue"


def train(cfg: TrainStageConfig, on_step: Callable | None = None) -> FitResult | FoldsResult:
    """Train ``cfg.model`` with cross-entropy on ``cfg.data``; writes best.pt, last.pt, metrics.parquet.
    With ``cfg.folds`` K, K fold teachers instead (:func:`train_folds`). ``on_step`` (an
    :class:`energytools.engine.StepEvent` callback) sees every step."""
    if cfg.folds is not None:
        return train_folds(cfg, on_step)
    return train_run(cfg, on_step)


@dataclass(frozen=True)
class FoldRun:
    """Fold ``index`` of a `train --folds` split: its teacher trains on the training split less
    the fold's samples (``held_out``); its checkpoints carry ``record`` (FoldsManifest.fold_record)."""

    index: int
    held_out: np.ndarray
    record: dict


def train_run(cfg: TrainStageConfig, on_step: Callable | None = None, fold: FoldRun | None = None) -> FitResult:
    """One training run into ``cfg.out``; with ``fold``, on the training split less that fold."""
    out = Path(cfg.out)
    cfg.train.check()
    # under torchrun: join the process group for this device first; rank 0 speaks for the job
    main = context(cfg.train.device).is_main
    data = cfg.data
    train_set, val_set, test_set = data.build("train"), data.build("val"), data.build("test")
    if fold is not None:
        train_set = train_set.subset(np.flatnonzero(~np.isin(train_set.sample_ids, fold.held_out)))
    info = train_set.info
    seed_everything(cfg.train.seed)  # the model's initial weights come from the seed
    net = create_model(cfg.model, info.num_classes, info.in_channels, info.image_size)
    fold_record = {"fold": fold.record} if fold is not None else {}
    config = {"stage": "train", **content_of(cfg), **fold_record}
    if cfg.init:  # pretrained weights: the loaded, re-initialised and ignored tensors go into the run's config
        report = init_from(net, cfg.init, info.num_classes)
        config["init_weights"] = report.to_dict()
        if main:
            console.print(f"init from {cfg.init}: {report.summary()}")
    # a resumed run may change what is marked so, and init's path (its content is compared)
    may_change = resume_may_change_keys(cfg) | {"init_weights.path"}
    with run_directory(out, cfg.resume, cfg.overwrite, config, may_change) as writes_files:
        meta = {**model_meta(cfg.model, train_set, data), "method": "ce", "train": as_dict(cfg.train),
                "versions": versions(), **fold_record}

        def step(batch: Batch, forward):
            logits = forward(batch.images)
            return logits, {"ce": F.cross_entropy(logits, batch.labels, label_smoothing=cfg.train.label_smoothing)}

        if main:
            which = f"fold {fold.index} of {fold.record['folds']}: " if fold is not None else ""
            console.print(f"{which}train {cfg.model} on {info.name} ({len(train_set)} train / {len(val_set)} val / "
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


@dataclass
class FoldsResult:
    """What `train --folds` did: the folds directory, its manifest, and the folds this call
    trained or finished (by fold; the others were finished before and kept)."""

    out: Path
    manifest: Path
    trained: dict[int, FitResult] = field(default_factory=dict)

    def summary(self) -> str:
        kept = read_manifest(self.out)[0].folds - len(self.trained)
        return (f"{len(self.trained)} fold teacher(s) trained" + (f", {kept} kept" if kept else "")
                + f"; `energytools score --teacher {self.out}` scores out of fold")


def train_folds(cfg: TrainStageConfig, on_step: Callable | None = None) -> FoldsResult:
    """K teachers on a stratified, seeded K-fold split of the training split (after the val
    carve-out; energytools.folds.assign_folds with --seed), fold k's on the other K - 1 folds
    with the same recipe, into ``OUT/fold-k/`` (an ordinary run directory; under torchrun an
    ordinary DDP run, one after the other), and ``OUT/folds.parquet``: every sample's fold, K,
    the seed, the split's fingerprint and each finished teacher's sha256.

    The same command run again continues: finished folds are kept (not retrained), a stopped one
    resumes from its last.pt, the others start. A folds directory made with other options is
    refused (``--overwrite`` trains every fold again)."""
    cfg.check()
    cfg.train.check()
    ctx = context(cfg.train.device)  # under torchrun: join the process group for this device first
    out = Path(cfg.out)
    check_output_path(out, directory=True)
    if (out / "last.pt").exists():
        raise UserError(f"{out} holds a train run, not fold teachers: choose another --out")
    train_set = cfg.data.build("train")
    ids, labels = train_set.sample_ids, train_set.labels
    assigned = assign_folds(labels, ids, cfg.folds, cfg.train.seed)
    wanted = new_manifest(cfg.folds, cfg.train.seed, train_set.describe(), as_dict(cfg.data), ids, assigned,
                          {"stage": "train", **content_of(cfg)})
    ctx.check_same(wanted.to_json(), "fold split")
    existing = None if cfg.overwrite or not (out / MANIFEST).is_file() else read_manifest(out)[0]
    if existing is None and cfg.resume and not cfg.overwrite:
        raise UserError(f"--resume: {out} holds no fold teachers to resume (no {MANIFEST})")
    if existing is not None:
        check_same_folds(existing, wanted, out)
    manifest = existing or wanted
    created = first_missing(out) if ctx.is_main else None
    result = FoldsResult(out, out / MANIFEST)
    try:
        with run_lock(out / MANIFEST) if ctx.is_main else contextlib.nullcontext():
            ctx.barrier()  # every rank has read the manifest before rank 0 replaces it
            if ctx.is_main and existing is None:
                if cfg.overwrite:
                    remove_folds(out)
                write_manifest(out, manifest, ids, labels, assigned)
            ctx.barrier()
            plan = [fold_status(out, manifest, k) for k in range(cfg.folds)]
            ctx.check_same(plan, "folds to train")
            for k, status in enumerate(plan):
                if status == "done":
                    console.print(f"fold {k} of {cfg.folds}: trained before, kept ({fold_checkpoint(out, k)})")
                    continue
                fold_cfg = dataclasses.replace(cfg, out=str(fold_dir(out, k)), resume=status == "resume",
                                               overwrite=False)
                try:
                    result.trained[k] = train_run(fold_cfg, on_step,
                                                  FoldRun(k, ids[assigned == k], manifest.fold_record(k)))
                except Stopped as stopped:
                    raise Stopped(stopped.signum, f"fold {k} of {cfg.folds}: {stopped.where}", CONTINUE_FOLDS) from None
                except KeyboardInterrupt:
                    raise Interrupted(f"fold {k} of {cfg.folds} stopped; {CONTINUE_FOLDS}") from None
                if ctx.is_main:  # the finished teacher's sha256: score refuses any other file in its place
                    manifest = manifest.with_teacher(k, sha256_file(fold_checkpoint(out, k)))
                    write_manifest(out, manifest, ids, labels, assigned)
            ctx.barrier()  # every rank returns with the manifest complete (a score may follow in the same job)
    except BaseException:
        if created is not None and not any(out.glob("fold-*/last.pt")):  # nothing to continue from: leave nothing
            shutil.rmtree(created, ignore_errors=True)
        raise
    console.print(headline("done", f": {out}: {result.summary()}"))
    return result

