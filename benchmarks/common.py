"""Helpers shared by the benchmark scripts (not part of the package)."""
from __future__ import annotations

import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from energytools.config import DataConfig
from energytools.models import create_model, save_checkpoint
from energytools.engine import model_meta


def benchmark_teacher(path: Path, arch: str = "resnet20", limit: int | None = None) -> Path:
    """A Fashion-MNIST teacher checkpoint with random weights: speed does not depend on them."""
    data = DataConfig(dataset="fashion-mnist", limit=limit)
    dataset = data.build("train")
    info = dataset.info
    torch.manual_seed(0)
    model = create_model(arch, info.num_classes, info.in_channels, info.image_size)
    save_checkpoint(path, model, model_meta(arch, dataset, data))
    return path


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {date.today()}"


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def emit(name: str, figures: dict, out: Path | None) -> None:
    """Print the figures and write them as JSON for run_all.py."""
    print(json.dumps({"benchmark": name, **figures}, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": name, "machine": machine(), **figures}, indent=2))


def teacher_check(table: Path) -> str:
    """One sentence on the teacher over a score table: accuracy, Spearman(energy, confidence),
    and each energy group's confidence and accuracy (from the table's summary)."""
    from energytools.table import TableMeta

    s = TableMeta.read(table).summary
    groups = "; ".join(f"{g['energy_group']}: confidence {g['mean_confidence']:.3f}, accuracy {g['accuracy']:.1f}%"
                       for g in s["groups"])
    return (f"{s['samples']} samples, teacher accuracy {s['accuracy']:.2f}%, Spearman(energy, confidence) "
            f"{s['spearman_energy_confidence']:.3f}; {groups}.")
