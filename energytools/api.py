"""The Python API: one function per stage, taking keyword arguments like the CLI's flags.

    import energytools
    table = energytools.score(teacher="runs/teacher/best.pt", out="runs/scores.parquet")
    scores, meta = energytools.load_table(table)
    shards = energytools.augment(scores=table, ratio=0.3, out="runs/he-da")
    result = energytools.distill(scores=table, student="cnn_small", method="energy-kd", out="runs/ekd",
                                 shards=[shards], epochs=10)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import DataConfig, resolve
from .engine import FitResult, TrainConfig

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}


def _split(kwargs: dict, fields: set[str]) -> tuple[dict, dict]:
    return {k: v for k, v in kwargs.items() if k in fields}, {k: v for k, v in kwargs.items() if k not in fields}


def train(model: str, out: str | Path, resume: bool = False, overwrite: bool = False, **kwargs) -> FitResult:
    """Train ``model`` with cross-entropy. Dataset keywords (``dataset``, ``limit``, ...) and
    training keywords (``epochs``, ``lr``, ...) are those of :class:`DataConfig` and :class:`TrainConfig`."""
    from .stages.train import train as run

    data_kwargs, rest = _split(kwargs, _DATA_FIELDS)
    return run(resolve(DataConfig, data_kwargs, "train"), model, resolve(TrainConfig, rest, "train"), out,
               resume=resume, overwrite=overwrite)


def score(teacher: str | Path, out: str | Path = "scores.parquet", **kwargs) -> Path:
    """Score a split with the teacher; returns the table's path. Keywords: :class:`ScoreConfig`'s
    fields, plus dataset keywords (``dataset``, ``data_root``, ``limit``, ...) to override the
    dataset the checkpoint records."""
    from .stages.score import ScoreConfig, score as run

    data_kwargs, rest = _split(kwargs, _DATA_FIELDS)
    data = resolve(DataConfig, data_kwargs, "score") if data_kwargs else None
    return run(resolve(ScoreConfig, {"teacher": str(teacher), "out": str(out), "data": data, **rest}, "score"))


def augment(scores: str | Path = "scores.parquet", out: str | Path = "he-da", **kwargs) -> Path:
    """Write HE-DA shards; returns the shard directory. Keywords: :class:`AugmentConfig`'s fields."""
    from .stages.augment import AugmentConfig, augment as run

    return run(resolve(AugmentConfig, {"scores": str(scores), "out": str(out), **kwargs}, "augment"))


def select(scores: str | Path = "scores.parquet", ratio: float = 0.3, mode: str = "high", per_class: bool = False,
           seed: int = 0, out: str | Path | None = None, overwrite: bool = False):
    """The selected rows (a polars DataFrame), optionally written to ``out``."""
    from .stages.augment import select as run

    return run(str(scores), str(out) if out else None, ratio, mode, per_class, seed, overwrite)


def distill(scores: str | Path, student: str, out: str | Path, **kwargs) -> FitResult:
    """Distill ``student``. Keywords: :class:`DistillConfig`'s fields plus training keywords
    (``epochs``, ``lr``, ``batch_size``, ``seed``, ...)."""
    from .stages.distill import DistillConfig, distill as run

    train_kwargs, rest = _split(kwargs, _TRAIN_FIELDS)
    if "shards" in rest:
        rest["shards"] = tuple(str(s) for s in rest["shards"])
    return run(resolve(DistillConfig, {"scores": str(scores), "student": student, "out": str(out),
                                       "train": resolve(TrainConfig, train_kwargs, "distill"), **rest}, "distill"))


def report(*paths: str | Path, out: str | Path = "report.html", thumbnails: bool = True) -> Path:
    """Write the HTML report for run directories or files."""
    from .stages.report import report as run

    return run(list(paths), out, thumbnails=thumbnails)
