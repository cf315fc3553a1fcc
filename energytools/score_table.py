"""Building a score table from per-sample columns: energy groups and temperatures by the rule,
the summary a person reads, the metadata, and the one write. The score stage and
:func:`write_score_table` (logits computed anywhere) both go through :func:`finish_table`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from .config import DataConfig, resolve
from .energy import GROUPS, NO_LABEL, TemperatureRule, logit_statistics
from .errors import UserError
from .functional import as_indices, as_logits, check_energy_temperature
from .io import check_output_free
from .teacher import EXTERNAL_TEACHER
from .table import (OOD_COLUMNS, OPTIONAL_SCORE_COLUMNS, SCORE_COLUMNS, VIEW_COLUMNS, DatasetRecord, FoldsRecord,
                    OodRecord, TableMeta, TeacherRecord, ViewsRecord, column_type, versions, write_parquet)
from .view_logits import logits_array

#: the largest logit a float16 logits column holds
FLOAT16_MAX = float(np.finfo(np.float16).max)


#: the columns that need a label: null in a row without one
LABEL_COLUMNS = ("label", "correct", "true_prob", "el2n")


def rows_to_arrow(rows: dict[str, np.ndarray], paths: list | None = None) -> pa.Table:
    """Per-sample columns (NumPy, one row per sample) as Arrow with the score table's types; a
    label of NO_LABEL (-1) makes the row's :data:`LABEL_COLUMNS` null."""
    columns = {}
    unlabelled = np.asarray(rows["label"]) == NO_LABEL if "label" in rows else None
    for name, values in rows.items():
        if name in ("logits", "logits_flipped", *VIEW_COLUMNS):
            columns[name] = logits_array(name, values)
        else:
            mask = unlabelled if name in LABEL_COLUMNS and unlabelled is not None and unlabelled.any() else None
            columns[name] = pa.array(values, mask=mask, type=column_type(name))
    if paths is not None:
        columns["path"] = pa.array(paths, type=pa.string())
    return pa.table(columns)


def group_table(frame: pl.DataFrame, rule: TemperatureRule, reference: tuple[pl.DataFrame, TableMeta] | None):
    """Add energy_group and temperature; returns ``(frame, rule, thresholds, source)``.

    The groups are fitted on this table, or with ``reference`` on that train table (its
    fractions, this config's temperatures), by the one rule of :class:`EnergyGroups`.
    """
    if reference is None:
        fitted, source = rule.fit(frame["energy"].to_numpy(), frame["sample_id"].to_numpy()), "this table"
    else:
        ref_frame, ref_meta = reference
        rule = dataclasses.replace(rule, low_frac=ref_meta.rule.low_frac, high_frac=ref_meta.rule.high_frac)
        fitted = ref_meta.fit_groups(ref_frame, rule)
        source = f"reference {ref_meta.split} table {ref_meta.dataset.fingerprint[:12]}"
    groups, temps = fitted.assign(frame["energy"].to_numpy(), frame["sample_id"].to_numpy())
    frame = frame.with_columns(pl.Series("energy_group", groups.astype(str)),
                               pl.Series("temperature", temps, dtype=pl.Float32))
    return frame, rule, fitted.thresholds, source


def _percent(value) -> float | None:
    return None if value is None else float(value * 100)


def summarize(frame: pl.DataFrame) -> dict:
    """Accuracy, per-group confidence/accuracy and the energy-confidence Spearman correlation.
    Accuracies are over the labelled samples (None when there are none); ``unlabelled`` counts
    the others (present only when there are some)."""
    per_group = (frame.group_by("energy_group")
                 .agg(pl.len().alias("count"), pl.col("confidence").mean().alias("mean_confidence"),
                      (pl.col("correct").mean() * 100).alias("accuracy"),
                      pl.col("energy").mean().alias("mean_energy"))
                 .to_dicts())
    order = {g: i for i, g in enumerate(GROUPS)}
    per_group.sort(key=lambda r: order.get(r["energy_group"], 9))
    spearman = frame.select(pl.corr("energy", "confidence", method="spearman")).item()
    unlabelled = frame["label"].null_count()
    return {"samples": frame.height, "accuracy": _percent(frame["correct"].mean()),
            "spearman_energy_confidence": None if spearman is None else float(spearman), "groups": per_group,
            **({"unlabelled": unlabelled} if unlabelled else {})}


def _accuracy_text(accuracy) -> str:
    return "n/a (no labels)" if accuracy is None else f"{accuracy:.2f}%"


def format_summary(summary: dict, thresholds: dict) -> str:
    spearman = summary["spearman_energy_confidence"]
    unlabelled = f" ({summary['unlabelled']} without labels)" if summary.get("unlabelled") else ""
    scored_by = f" {summary['scored_by']}" if summary.get("scored_by") else ""
    lines = [f"{summary['samples']} samples{unlabelled}{scored_by}, teacher accuracy "
             f"{_accuracy_text(summary['accuracy'])}, "
             f"groups: low <= {thresholds['low_max']:.4f}, high >= {thresholds['high_min']:.4f}, "
             f"Spearman(energy, confidence) = {'n/a' if spearman is None else f'{spearman:.3f}'}"]
    for g in summary["groups"]:
        lines.append(f"  {g['energy_group']:<4} {g['count']:>7} samples  mean energy {g['mean_energy']:9.3f}  "
                     f"confidence {g['mean_confidence']:.3f}  accuracy {_accuracy_text(g['accuracy'])}")
    return "\n".join(lines)


def finish_table(frame: pl.DataFrame, out: Path | str, *, data: DataConfig, dataset: DatasetRecord,
                 teacher: TeacherRecord, energy_temperature: float, rule: TemperatureRule,
                 reference: tuple[pl.DataFrame, TableMeta] | None = None, config: dict | None = None,
                 views: ViewsRecord | None = None, ood: OodRecord | None = None,
                 folds: FoldsRecord | None = None) -> tuple[TableMeta, dict]:
    """Group ``frame`` (the per-sample columns, any order), sort it by sample_id, and write it
    atomically to ``out`` with its metadata; returns ``(meta, summary)``. ``folds``: the rows
    were scored by `train --folds` teachers (the summary and the metadata say how)."""
    frame, rule, thresholds, source = group_table(frame.sort("sample_id"), rule, reference)
    summary = summarize(frame)
    if folds is not None:
        summary["scored_by"] = folds.describe()
    meta = TableMeta(data, dataset, teacher, energy_temperature, rule, thresholds, source, config or {}, summary,
                     versions(), views=views, ood=ood, folds=folds)
    ordered = list(SCORE_COLUMNS) + [c for c in (*OPTIONAL_SCORE_COLUMNS, *OOD_COLUMNS, "path", "logits",
                                                 "logits_flipped", *VIEW_COLUMNS) if c in frame.columns]
    write_parquet(frame.select(ordered), out, meta.to_json(), row_group_size=65536)
    return meta, summary


def write_score_table(path: str | Path, logits, labels, *, sample_ids=None, class_names=None,
                      dataset: DataConfig | dict | None = None, energy_temperature: float = 4.0,
                      low_frac: float = 0.2, high_frac: float = 0.2, temperatures=(6.0, 4.0, 2.0),
                      temperature_rule: str = "groups", save_logits: bool = True,
                      source: str = "logits computed outside energytools", overwrite: bool = False) -> Path:
    """A score table (schema v2) from teacher ``logits`` (N, C) computed anywhere, and
    ``labels`` (N,): the per-sample scores, energy groups and temperatures, and (with
    ``save_logits``) the logits as float16, so ``distill --cached-logits`` can use them.

    ``sample_ids`` (N,) are the samples' positions in the dataset's canonical order (default
    0..N-1). ``dataset`` (a DataConfig or its keywords: ``{"dataset": "fashion-mnist", "limit":
    10000}``) names the train split the logits belong to: the table then records its fingerprint,
    and augment, select, distill and report accept it; the labels and ids must match the
    dataset's. Without it the table serves select and report only. The teacher is recorded as
    ``external`` with ``source`` as its path, and the sha256 of the logits as its identity.
    An existing ``path`` is refused unless ``overwrite=True`` (as ``score --out`` is without
    ``--overwrite``).
    """
    if not isinstance(overwrite, bool):
        raise UserError(f"overwrite must be True or False, got {overwrite!r}")
    check_output_free(path, overwrite)
    energy_temperature = check_energy_temperature(energy_temperature)
    ids = None if sample_ids is None else as_indices(sample_ids, "sample_ids")
    logit_tensor = as_logits(logits, "logits", ids)
    n, num_classes = logit_tensor.shape
    if labels is None:
        raise UserError("labels are required: the table's true_prob, el2n and correct columns need them")
    label_array = as_indices(labels, "labels")
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    if len(label_array) != n or len(ids) != n:
        raise UserError(f"labels ({len(label_array)}) and sample_ids ({len(ids)}) must have one entry per logits row ({n})")
    if len(np.unique(ids)) != n:
        raise UserError("sample_ids must be unique")
    if n and not (0 <= label_array.min() and label_array.max() < num_classes):
        raise UserError(f"labels must be class indices in [0, {num_classes})")
    if class_names is not None:
        class_names = [str(name) for name in class_names] if not isinstance(class_names, str) else None
        if class_names is None or len(class_names) != num_classes:
            raise UserError(f"class_names must name the {num_classes} classes in order")
    if save_logits and n and float(logit_tensor.abs().max()) > FLOAT16_MAX:
        raise UserError(f"logits beyond float16's range (±{FLOAT16_MAX:g}) cannot be stored: scale them, or pass "
                        "save_logits=False")
    data_config, record = _dataset_record(dataset, ids, label_array, num_classes, class_names)
    stats = logit_statistics(logit_tensor, torch.from_numpy(label_array), energy_temperature)
    rows = {"sample_id": ids, "label": label_array, **{k: v.numpy() for k, v in stats.items()}}
    if save_logits:
        rows["logits"] = logit_tensor.half().numpy()
    digest = hashlib.sha256(logit_tensor.numpy().tobytes()).hexdigest()
    teacher = TeacherRecord(EXTERNAL_TEACHER, digest, source, num_classes, 0, None, list(class_names) if class_names else None)
    rule = TemperatureRule(tuple(temperatures), low_frac, high_frac, temperature_rule)
    frame = pl.from_arrow(rows_to_arrow(rows))
    config = {"source": source, "energy_temperature": energy_temperature, "save_logits": save_logits}
    finish_table(frame, path, data=data_config, dataset=record, teacher=teacher,
                 energy_temperature=energy_temperature, rule=rule, config=config)
    return Path(path)


def _dataset_record(dataset, ids: np.ndarray, labels: np.ndarray, num_classes: int, class_names):
    """``(DataConfig, DatasetRecord)`` of the split the logits belong to, checked against it."""
    if dataset is None:
        names = tuple(class_names or ())
        return DataConfig(), DatasetRecord("external", "train", len(ids), "external:" + _ids_digest(ids, labels),
                                           num_classes, names)
    data = dataset if isinstance(dataset, DataConfig) else resolve(DataConfig, dict(dataset), "dataset")
    split = data.build("train")
    if split.info.num_classes != num_classes:
        raise UserError(f"the logits have {num_classes} classes but {split.info.name} has {split.info.num_classes}")
    if len(split) != len(ids) or not np.array_equal(np.sort(ids), np.sort(split.sample_ids)):
        raise UserError(f"sample_ids must be the {len(split)} sample ids of {split.info.name}'s train split "
                        "(its canonical positions)")
    expected = dict(zip(split.sample_ids.tolist(), split.labels.tolist()))
    wrong = next((int(i) for i, y in zip(ids, labels) if expected[int(i)] != int(y)), None)
    if wrong is not None:
        raise UserError(f"labels differ from {split.info.name}'s at sample_id {wrong}")
    return data, DatasetRecord(**split.describe())


def _ids_digest(ids: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(ids.tobytes() + labels.tobytes()).hexdigest()
