"""The Python API: one function per stage, taking keyword arguments like the CLI's flags.

    import energytools
    table = energytools.score(teacher="runs/teacher/best.pt", out="runs/scores.parquet")
    scores, meta = energytools.load_table(table)
    shards = energytools.augment(scores=table, ratio=0.3, out="runs/he-da")
    result = energytools.distill(scores=table, student="cnn_small", method="energy-kd", out="runs/ekd",
                                 shards=[shards], epochs=10)

Every function builds its stage's config with :func:`energytools.config.resolve`, as the CLI
and recipes do, so the defaults, the checks and the resolved config are the same all three
ways. Keywords of nested configs are given flat: ``dataset=``, ``limit=`` (:class:`DataConfig`),
``epochs=``, ``lr=`` (:class:`TrainConfig`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import (AugmentConfig, DistillConfig, LabelIssuesConfig, ScoreConfig, SelectConfig, TrainStageConfig,
                     resolve)
from .engine import FitResult


def train(model: str, out: str | Path, *, on_step: Callable | None = None, **kwargs):
    """Train ``model`` with cross-entropy; returns the :class:`~energytools.engine.FitResult`, or
    with ``folds=K`` (K fold teachers for out-of-fold scores) a ``FoldsResult``. Keywords:
    :class:`TrainStageConfig`'s fields; ``on_step`` is called with an
    :class:`energytools.engine.StepEvent` after every step."""
    from .stages.train import train as run

    return run(resolve(TrainStageConfig, {"model": model, "out": out, **kwargs}, "train"), on_step=on_step)


def score(teacher: str | Path, out: str | Path = "scores.parquet", **kwargs) -> Path:
    """Score a split with the teacher; returns the table's path. Keywords: :class:`ScoreConfig`'s
    fields; dataset keywords change the dataset the checkpoint records."""
    from .stages.score import score as run

    return run(resolve(ScoreConfig, {"teacher": teacher, "out": out, **kwargs}, "score"))


def augment(scores: str | Path = "scores.parquet", out: str | Path = "he-da", **kwargs) -> Path:
    """Write HE-DA shards; returns the shard directory. Keywords: :class:`AugmentConfig`'s fields."""
    from .stages.augment import augment as run

    return run(resolve(AugmentConfig, {"scores": scores, "out": out, **kwargs}, "augment"))


def select(scores: str | Path = "scores.parquet", **kwargs):
    """The selected rows (a polars DataFrame), written to ``out`` when given. Keywords:
    :class:`SelectConfig`'s fields (``ratio``, ``mode``, ``by``, ``per_class``, ``seed``, ``out``)."""
    from .stages.select import select as run

    return run(resolve(SelectConfig, {"scores": scores, **kwargs}, "select"))


def label_issues(scores: str | Path = "scores.parquet", out: str | Path = "label-issues.parquet", **kwargs) -> Path:
    """Write the label-issues file (cleanlab's label quality and flags from the table's logits);
    returns its path. Keywords: :class:`LabelIssuesConfig`'s fields (``method``, ``filter_by``)."""
    from .stages.label_issues import label_issues as run

    return run(resolve(LabelIssuesConfig, {"scores": scores, "out": out, **kwargs}, "label-issues"))


def distill(scores: str | Path, student: str, out: str | Path, *, on_step: Callable | None = None,
            **kwargs) -> FitResult:
    """Distill ``student``. Keywords: :class:`DistillConfig`'s fields, training ones flat
    (``epochs``, ``lr``, ``batch_size``, ``seed``, ...); ``on_step`` is called with an
    :class:`energytools.engine.StepEvent` after every step (``event.batch.extras["sample_info"]``
    holds what the loss received: teacher logits, temperatures)."""
    from .stages.distill import distill as run

    return run(resolve(DistillConfig, {"scores": scores, "student": student, "out": out, **kwargs}, "distill"),
               on_step=on_step)


def report(*paths: str | Path, out: str | Path = "report.html", thumbnails: bool = True,
           baseline: str | None = None, overwrite: bool | None = None, label_issues=(), ood=(),
           known_ood=()) -> Path:
    """Write the HTML report for run directories or files; ``baseline`` names the configuration,
    run or method the runs are compared with (default: kd); ``label_issues`` are label-issues
    files, a section each. An existing ``out`` is replaced when energytools wrote it, or with
    ``overwrite=True``. ``ood`` and ``known_ood`` (paths) are tables scored with
    ``score(reference=...)``, the second of inputs known to be out of distribution (AUROC and FPR
    per score)."""
    from .stages.report import report as run

    return run(list(paths), out, overwrite=overwrite, thumbnails=thumbnails, baseline=baseline,
               label_issues=list(label_issues), ood=[ood] if isinstance(ood, (str, Path)) else list(ood),
               known_ood=[known_ood] if isinstance(known_ood, (str, Path)) else list(known_ood))
