"""What a distill run trains on: the table's dataset as it is on this machine (less any
``--exclude``/``--keep`` ids), HE-DA shard rows as extra samples, the stored views a run
replays, the per-sample values looked up by sample_id (temperatures, high-energy flags, mixing
partners, cached logits and views), and where each batch's teacher logits come from.

HE-DA shard rows join the training set: every batch is a uniform draw from originals + shard
rows, so a ratio-0.3 shard directory makes about 23% of each batch augmented (0.3 / 1.3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .data.base import ImageSet
from .data.draws import TrainTransform
from .data.shards import read_manifest, shard_dataset
from .data.training_set import TrainingSet
from .data.views import ReplayViews
from .errors import UserError, option_name
from .io import require_file, sha256_file
from .lookup import CachedLogits, CachedViewLogits, LogitsSource, OnlineTeacher, SampleLookup
from .table import LABEL_ISSUE_FLAG, DatasetRecord, TableMeta, ViewsRecord, read_metadata, read_parquet
from .teacher import open_table_teacher
from .temperatures import TemperatureSource
from .view_logits import read_views, view_column_shapes, views_from_arrow


def open_training_set(cfg, meta: TableMeta):
    """``(data config, train set)``: the table's dataset as it is on this machine, checked against
    the table's fingerprint, less the ids of ``cfg.exclude`` or only those of ``cfg.keep``."""
    data = meta.data if cfg.eval_limit is None else dataclasses.replace(meta.data, eval_limit=cfg.eval_limit)
    train_set = data.build("train")
    if train_set.fingerprint() != meta.dataset.fingerprint:
        raise UserError(f"{cfg.scores} was computed on another dataset than {data.dataset} "
                        "as it is on this machine (fingerprints differ)")
    for path, keep in ((cfg.exclude, False), (cfg.keep, True)):
        if path:
            chosen = np.isin(train_set.sample_ids, read_sample_ids(path, meta.dataset))
            if not chosen.any():
                raise UserError(f"{path} names none of the training set's samples")
            train_set = train_set.subset(np.flatnonzero(chosen == keep))
            if len(train_set) == 0:
                raise UserError(f"{option_name('exclude', path)} leaves no training samples")
    return data, train_set


def read_sample_ids(path: str, dataset: DatasetRecord | None = None) -> np.ndarray:
    """The sample ids a Parquet file names: every ``sample_id`` of a selection (`energytools
    select`), the flagged ones of a label-issues file (every sample with its ``is_label_issue``).
    A file that records its dataset must name ``dataset``'s (ids are positions in a split's
    canonical order, so another split's or dataset's ids would name other images)."""
    require_file(path)
    frame = read_parquet(path, None)
    if "sample_id" not in frame.columns or not frame["sample_id"].dtype.is_integer():
        raise UserError(f"{path} has no integer sample_id column")
    recorded = read_metadata(path).get("dataset")
    if dataset is not None and isinstance(recorded, dict) and \
            (recorded.get("name"), recorded.get("split")) != (dataset.name, dataset.split):
        raise UserError(f"{path} names samples of {recorded.get('name')}'s {recorded.get('split')} split, not of "
                        f"{dataset.name}'s {dataset.split} split")
    if LABEL_ISSUE_FLAG in frame.columns:
        if frame[LABEL_ISSUE_FLAG].dtype != pl.Boolean:
            raise UserError(f"{path}: column {LABEL_ISSUE_FLAG!r} must be boolean")
        frame = frame.filter(pl.col(LABEL_ISSUE_FLAG))
        if frame.height == 0:
            raise UserError(f"{path} flags no label issues: there is nothing to exclude or keep")
    return frame["sample_id"].to_numpy()


@dataclass
class ViewReplay:
    """Training on the views score stored: the schedule that picks each epoch's view, and the
    per-view columns (aligned with the table's rows; see energytools.view_logits)."""

    schedule: ReplayViews
    columns: dict
    views: ViewsRecord
    num_classes: int


@dataclass
class TrainingInputs:
    """Everything a distill step reads besides the batch."""

    training_set: TrainingSet
    lookup: SampleLookup
    replay: ViewReplay | None
    teacher_logits: LogitsSource | None  # None when the run needs no teacher logits

    @property
    def mixed(self) -> bool:
        """Whether any row is a CutMix/MixUp (else CE needs no partner labels)."""
        return bool((self.lookup.columns["lam"] < 1).any())


def needs_teacher_logits(cfg, spec, source: TemperatureSource) -> bool:
    """The method's KD terms, or the temperature source, read the teacher's logits on each batch."""
    return spec.teacher_logits or (uses_energy_groups(cfg, spec) and source.needs_teacher_logits)


def uses_energy_groups(cfg, spec) -> bool:
    """Whether the run reads energy groups per step: Energy KD's temperatures, --he-da's high-energy samples."""
    return spec.per_sample_temperature or cfg.he_da is not None


def plan_views(cfg, spec, source: TemperatureSource, meta: TableMeta, train_set: ImageSet) -> ViewReplay | None:
    """Replay stored views when the run reads their logits (--cached-logits on a table scored
    with --views) or their energies (--temperature-source views); None otherwise. Refuses a
    table whose views were drawn from another train transform than the dataset's."""
    by_views = uses_energy_groups(cfg, spec) and source.needs_views
    cached = cfg.cached_logits and needs_teacher_logits(cfg, spec, source)
    if by_views and not meta.has_views:
        raise UserError(f"{option_name('temperature_source', source.name)} needs a table scored with "
                        f"{option_name('views', metavar='K')}; {cfg.scores} "
                        "has no views")
    if not (by_views or (cached and meta.has_views)):
        return None
    info = train_set.info
    recorded, transform = TrainTransform.from_dict(meta.views.transform), info.train_transform
    if recorded != transform:
        raise UserError(f"{cfg.scores} holds views of {recorded.describe()}, but {info.name} trains with "
                        f"{transform.describe()}: re-score with {option_name('views', meta.views.count)}")
    return ViewReplay(ReplayViews(transform, meta.views.seed, meta.views.count, cfg.train.seed),
                      read_views(cfg.scores, meta, info.num_classes), meta.views, info.num_classes)


def cached_logit_names(cfg, spec, source: TemperatureSource, meta: TableMeta, train_set: ImageSet) -> list[str]:
    """The logit columns a --cached-logits run reads from the table (none when the method needs
    no teacher, or when it replays stored views)."""
    if not (cfg.cached_logits and needs_teacher_logits(cfg, spec, source)):
        return []
    info = train_set.info
    if info.train_transform.crops:
        raise UserError(f"{option_name('cached_logits')}: {info.name} trains with {info.train_transform.describe()}, "
                        "so the clean image's logits do not match the training views; re-score with "
                        f"{option_name('views', metavar='K')}")
    if not meta.has_logits:
        raise UserError(f"{option_name('cached_logits')} needs a table scored with {option_name('save_logits', True)} "
                        f"or {option_name('views', metavar='K')}; {cfg.scores} has no logits")
    return ["logits", "logits_flipped"] if info.train_flip else ["logits"]


def _logit_columns(rows: pl.DataFrame, names: list[str], where) -> dict:
    for name in names:
        if name not in rows.columns:
            raise UserError(f"{option_name('cached_logits')}: {where} lacks {name}; re-score with "
                            f"{option_name('save_logits', True)}")
    return {name: np.stack(rows[name].to_numpy()).astype(np.float32) for name in names}


def _shard_views(replay: ViewReplay, rows: pl.DataFrame, directory) -> dict:
    """A shard's stored views (augment scores the table's K views of every new image)."""
    if "view_energy" not in rows.columns:
        raise UserError(f"shards in {directory} hold no per-view logits (made by an older energytools); re-run "
                        f"augment on this table with {option_name('overwrite', True)} to replay views with them")
    wanted = list(view_column_shapes(replay.views, replay.num_classes))
    read = views_from_arrow(rows.select([n for n in wanted if n in rows.columns]).to_arrow(), replay.views,
                            replay.num_classes, f"shards in {directory}")
    return {name: values.astype(replay.columns[name].dtype, copy=False) for name, values in read.items()}


def _rows_columns(rows: pl.DataFrame, source: TemperatureSource, logit_names, where, replay, directory=None) -> dict:
    """The per-sample lookup columns of table rows (``directory`` None) or of a shard's rows."""
    is_shard = directory is not None
    views = (_shard_views(replay, rows, directory) if is_shard else replay.columns) if replay is not None else {}
    view_energy = views.get("view_energy")
    groups = (source.shard_columns(rows, view_energy, replay.views.count if replay else 0) if is_shard
              else source.columns(rows, view_energy))
    return {"sample_id": rows["sample_id"].to_numpy(), **groups,
            "partner_label": rows["partner_label" if is_shard else "label"].to_numpy(),
            "lam": (rows["lam"].fill_null(1.0).to_numpy().astype(np.float32) if is_shard
                    else np.ones(rows.height, dtype=np.float32)),
            **_logit_columns(rows, logit_names, where), **views}


def collect_samples(cfg, table: pl.DataFrame, source: TemperatureSource, train_set: ImageSet,
                    logit_names: list[str], replay: ViewReplay | None = None) -> tuple[TrainingSet, SampleLookup]:
    """Originals plus every shard directory's rows, and their per-sample values by sample_id."""
    table_sha = sha256_file(cfg.scores)
    parts, columns = [train_set], [_rows_columns(table, source, logit_names, cfg.scores, replay)]
    if len({Path(d).resolve() for d in cfg.shards}) < len(cfg.shards):
        raise UserError("the same shard directory is given twice")
    for directory in cfg.shards:
        if read_manifest(directory).get("scores", {}).get("sha256") != table_sha:
            raise UserError(f"shards in {directory} were made from another score table than {cfg.scores}")
        shard_set, rows = shard_dataset(directory, train_set.info)
        parts.append(shard_set)
        columns.append(_rows_columns(rows, source, logit_names, f"shards in {directory}", replay, directory))
    merged = {name: columns[0][name] if len(columns) == 1 else np.concatenate([c[name] for c in columns])
              for name in columns[0]}
    if "logits_flipped" in merged:  # (N, 2, C): a step gathers both views and picks one in one indexing
        merged["logits"] = np.stack([merged["logits"], merged.pop("logits_flipped")], axis=1)
    lookup = SampleLookup(merged.pop("sample_id"), **merged)
    missing = np.setdiff1d(train_set.sample_ids, lookup.ids)
    if len(missing):
        raise UserError(f"{cfg.scores} lacks sample_id {missing[0]} of the training set")
    return TrainingSet(parts, train_set.info), lookup


def open_logits_source(cfg, spec, source: TemperatureSource, meta: TableMeta, lookup: SampleLookup,
                       train_set: ImageSet, replay: ViewReplay | None) -> LogitsSource | None:
    """Where each batch's teacher logits come from: the table (per view, or the clean and
    mirrored image's), or the teacher run online; None when the run needs none."""
    if not needs_teacher_logits(cfg, spec, source):
        return None
    if cfg.cached_logits:
        if replay is not None:
            return CachedViewLogits(lookup, replay.views.top_k, replay.num_classes)
        return CachedLogits(lookup)
    teacher = open_table_teacher(meta, train_set, cfg.teacher, cfg.teacher_arch, cfg.train.device,
                                 cfg.preprocessing.given())
    # logits that decide energy groups are float32-exact, as score's that fitted the thresholds
    exact = uses_energy_groups(cfg, spec) and source.needs_teacher_logits
    return OnlineTeacher(teacher.model, teacher.device if exact else None)


def training_inputs(cfg, spec, source: TemperatureSource, table: pl.DataFrame, meta: TableMeta,
                    train_set: ImageSet, device) -> TrainingInputs:
    """The training set, the per-sample lookup (on ``device`` when it fits) and the teacher-logits source."""
    replay = plan_views(cfg, spec, source, meta, train_set)
    logit_names = [] if replay is not None else cached_logit_names(cfg, spec, source, meta, train_set)
    training_set, lookup = collect_samples(cfg, table, source, train_set, logit_names, replay)
    lookup.to(device)
    return TrainingInputs(training_set, lookup, replay,
                          open_logits_source(cfg, spec, source, meta, lookup, train_set, replay))
