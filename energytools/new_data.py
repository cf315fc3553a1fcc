"""Scoring new data against what the teacher knows (`score`): images without labels read as
the teacher's data, the ``--reference`` train table with its validation split, and the
out-of-distribution flags at the threshold that keeps a share of that split (energytools.ood).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl

from .config import DataConfig
from .data import DatasetInfo, ImageSet, read_as
from .energy import NO_LABEL
from .engine import float32_exact, make_loader
from .errors import UserError
from .io import sha256_file
from .models import checkpoint_meta
from .ood import (DEFAULT_TPR, OOD_ENERGY_TEMPERATURE, OOD_SCORES, OOD_SIGN_CONVENTION, encode_scores, oriented,
                  threshold_at_tpr)
from .preprocessing import reuse_preprocessing
from .table import OodRecord, TableMeta, load_table
from .teacher import TeacherRun
from .teacher_pass import ood_columns

#: the fields of a dataset's info that decide what the teacher is fed
INPUT_FIELDS = ("in_channels", "image_size", "mean", "std")


@dataclass
class Reference:
    """``score --reference``: a train table the same teacher scored (``frame``: its sample ids and
    energies, for the groups) and the validation split of its data (for the OOD threshold)."""

    path: str
    frame: pl.DataFrame
    meta: TableMeta
    validation: ImageSet

    def preprocessing(self, overrides: dict | None, info) -> dict | None:
        """What the teacher was fed for the reference; an override that contradicts it is refused."""
        return reuse_preprocessing(self.meta.teacher.preprocessing, overrides, info, f"--reference {self.path}")

    def check_teacher(self, teacher: TeacherRun) -> None:
        if self.meta.teacher.sha256 != teacher.sha256:
            raise UserError(f"--reference {self.path} was scored by another teacher (sha256 "
                            f"{self.meta.teacher.sha256[:12]}, not {teacher.sha256[:12]})")


def load_reference(path: str, energy_temperature: float) -> Reference:
    """The train table at ``path`` (scored at ``energy_temperature``) and its validation split:
    energytools carves it deterministically from the same training file, so it is rebuilt from
    the table's data config and checked to be that data as it is on this machine."""
    frame, meta = load_table(path, ["sample_id", "energy"])
    meta.require_train(path, "--reference")
    if meta.energy_temperature != energy_temperature:
        raise UserError(f"--reference {path} used T_E={meta.energy_temperature}, not {energy_temperature}")
    try:
        if meta.data.build("train", unlabelled=True).fingerprint() != meta.dataset.fingerprint:
            raise UserError(f"{meta.data.dataset} on this machine is not the data it scored (fingerprints differ)")
        validation = meta.data.build("val", unlabelled=True)
    except UserError as exc:
        raise UserError(f"--reference {path}: its validation split, which sets the OOD threshold, cannot be "
                        f"rebuilt: {exc}") from None
    return Reference(str(path), frame, meta, validation)


def teacher_data_info(path) -> DatasetInfo:
    """The dataset info an energytools checkpoint records: what its teacher was trained on."""
    recorded = checkpoint_meta(path).get("dataset_info")
    if not isinstance(recorded, dict):
        raise UserError(f"{path} does not record the data it was trained on, so images without labels cannot be read "
                        "as that data: pass --reference TRAIN_TABLE (a table this teacher scored)")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
    return DatasetInfo(**{k: v for k, v in fields.items() if k in DatasetInfo.__dataclass_fields__})


def read_for_teacher(dataset: ImageSet, data: DataConfig, reference: Reference | None, teacher_path):
    """``(dataset, note)``: with a reference, ``dataset`` read as its validation images are (so
    that its threshold applies); without, images without labels read as the teacher's training
    data (the checkpoint records it). ``note`` says what was changed (None: nothing)."""
    if reference is not None:
        like = reference.validation.info
        return read_as_data(dataset, data, like, f"the reference's data ({like.name})", always=True)
    if (dataset.labels == NO_LABEL).any():
        like = teacher_data_info(teacher_path)
        return read_as_data(dataset, data, like, f"the teacher's data ({like.name})", always=False)
    return dataset, None


def read_as_data(dataset: ImageSet, data: DataConfig, like: DatasetInfo, source: str, always: bool):
    """``(dataset, note)``: ``dataset`` read as the data ``like`` describes (``source`` names it)
    when it holds images without labels, or, with ``always``, whenever it is read otherwise: the
    same channels, size and normalisation. Labels of other classes than ``like``'s are dropped.
    ``note`` (None when nothing changed) says so, for after the input checks."""
    missing = int((dataset.labels == NO_LABEL).sum())
    info = dataset.info
    same_input = all(np.allclose(getattr(info, name), getattr(like, name), rtol=1e-6, atol=0) for name in INPUT_FIELDS)
    same_classes = info.num_classes == like.num_classes and tuple(info.classes) == tuple(like.classes)
    if (same_input and same_classes) or not (missing or always):
        return dataset, None
    if data.image_size is not None and data.image_size != like.image_size:
        raise UserError(f"--image-size {data.image_size} contradicts {source}, whose images are {like.image_size}x"
                        f"{like.image_size}: these are read as those are; drop the option or pass {like.image_size}")
    dropped = missing < len(dataset) and not same_classes
    labels = (f"their labels name other classes than the teacher's {like.num_classes} and are left out (null)"
              if dropped else f"{missing} have no label" if missing else "their labels are kept")
    note = (f"note: {len(dataset)} images read as {source} ({labels}): {like.in_channels} channel(s), "
            f"{like.image_size}x{like.image_size}, mean {','.join(f'{v:g}' for v in like.mean)} std "
            f"{','.join(f'{v:g}' for v in like.std)}")
    return read_as(dataset, like, keep_labels=same_classes), note


def validation_columns(teacher: TeacherRun, validation: ImageSet, batch_size: int, num_workers: int, amp: bool,
                       after_batch: Callable[[], None] = lambda: None) -> dict[str, np.ndarray]:
    """The OOD columns (energytools.ood.ood_statistics) of the reference's validation split, fed
    as score feeds its own split; ``after_batch`` runs after each batch (a stop check)."""
    chunks = []
    with float32_exact(teacher.device, not amp):
        for images, _, ids in make_loader(validation, batch_size, teacher.device, num_workers):
            chunks.append(ood_columns(teacher, images, ids, validation.info, batch_size))
            after_batch()
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}


def flag_ood(frame: pl.DataFrame, reference: Reference, columns: dict[str, np.ndarray], score: str | None,
             tpr: float | None) -> tuple[pl.DataFrame, OodRecord]:
    """Add ``ood_score`` (``score``, default energy) and ``ood`` (below the threshold that keeps
    ``tpr``, default 0.95, of the validation split's ``columns``) to ``frame``, which holds the
    OOD columns; returns it and what the metadata records."""
    score, tpr = score or "energy", tpr or DEFAULT_TPR
    in_scores = {name: oriented(columns, name) for name in OOD_SCORES}
    threshold = threshold_at_tpr(in_scores[score], tpr)
    values = oriented({c: frame[c].to_numpy() for c in ("energy_t1", "max_logit", "confidence")}, score)
    frame = frame.with_columns(pl.Series("ood_score", values, dtype=pl.Float32),
                               pl.Series("ood", values < threshold, dtype=pl.Boolean))
    validation, meta = reference.validation, reference.meta
    record = OodRecord(score, tpr, threshold, float(np.mean(in_scores[score] >= threshold)), int(frame["ood"].sum()),
                       OOD_ENERGY_TEMPERATURE, OOD_SIGN_CONVENTION,
                       {"path": reference.path, "sha256": sha256_file(reference.path),
                        "dataset": meta.dataset.name, "fingerprint": meta.dataset.fingerprint,
                        "validation": {"size": len(validation), "fingerprint": validation.fingerprint()}},
                       {name: encode_scores(values) for name, values in in_scores.items()})
    return frame, record


def describe_ood(ood: OodRecord, samples: int) -> str:
    """One line: how many were flagged, by which score and threshold, and what it keeps."""
    # the energy score is -E (the table's energy column is E at the table's temperature): say so
    score = f"energy score (-E at T = {ood.energy_temperature:g})" if ood.score == "energy" else f"{ood.score} score"
    return (f"ood: {ood.flagged} of {samples} samples ({100 * ood.flagged / max(samples, 1):.1f}%) below the "
            f"threshold {ood.threshold:.4f} of the {score}, higher = more in-distribution; it keeps "
            f"{100 * ood.kept:.1f}% of the reference's {ood.reference['validation']['size']} validation samples "
            f"(target {100 * ood.tpr:g}%)")
