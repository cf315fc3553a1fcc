"""`energytools distill`: train a student with ce, kd, energy-kd, dkd or energy-dkd.

Per-sample temperatures are read from the score table by sample_id (the default,
"offline" design), from the energy of the stored view a sample trains on ("views", against
thresholds over all stored views), or recomputed every batch from the teacher's energy on the
augmented view ("online", as the reference code does), by the table's rule each way.

Teacher logits come from the teacher run on each batch, or with --cached-logits from the
table: per stored view for a table scored with --views K (each epoch a sample trains on one
of its K views, chosen from (seed, epoch, sample_id), and the loader renders exactly that
view), or the clean and mirrored image's logits for flip-only datasets (--save-logits). HE-DA shard rows join
the training set as extra samples: every batch is a uniform draw from originals + shard rows,
so a ratio-0.3 shard directory makes about 23% of each batch augmented (0.3 / 1.3).
--he-da online is the reference code's form instead (energytools.online_heda): CutMix among
each batch's high-energy samples, with one more KD term on the mixed images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from ..config import DataConfig, DistillConfig, as_dict, content_of
from ..console import console, headline
from ..data.base import ImageSet
from ..data.shards import read_manifest, shard_dataset
from ..data.training_set import TrainingSet
from ..data.views import ReplayViews, TrainTransform
from ..distillers import MethodSpec, SampleInfo, method_spec
from ..distributed import context
from ..energy import EnergyGroups, energy
from ..engine import (Batch, FitResult, fit, model_meta, resolve_device, seed_everything, to_device,
                      write_test_predictions)
from ..errors import UserError
from ..io import sha256_file, write_json
from ..lookup import CachedLogits, CachedViewLogits, LogitsSource, OnlineTeacher, SampleLookup
from ..models import create_model
from ..online_heda import OnlineHEDA
from ..resume import run_directory
from ..table import TableMeta, ViewsRecord, load_table, read_parquet, versions
from ..teacher import open_table_teacher
from ..view_logits import assign_view_groups, fit_view_groups, read_views, view_column_shapes, views_from_arrow


@dataclass
class TemperaturePlan:
    """The run's temperature rule: the table's, or re-derived from the table's energies."""

    groups: EnergyGroups
    rederived: bool
    energy_temperature: float
    view_groups: EnergyGroups | None = None  # the rule fitted over every stored view (--temperature-source views)
    # the last batch's (teacher logits, (groups, temperatures)) under --temperature-source online
    _online: tuple = field(default=(None, None), init=False, repr=False, compare=False)

    def assign_online(self, teacher_logits: torch.Tensor, sample_ids: torch.Tensor) -> tuple:
        """Groups and temperatures from the teacher's energies on a batch, computed once per batch
        however many per-sample values (T, high-energy mask) read them."""
        if self._online[0] is not teacher_logits:
            energies = energy(teacher_logits.float(), self.energy_temperature).cpu().numpy()
            self._online = (teacher_logits, self.groups.assign(energies, sample_ids.numpy()))
        return self._online[1]

    def temperatures(self, rows: pl.DataFrame) -> np.ndarray:
        """Per-sample T of table or shard rows: their own column, or by the re-derived rule."""
        if not self.rederived:
            return rows["temperature"].to_numpy()
        return self.groups.assign(rows["energy"].to_numpy(), rows["sample_id"].to_numpy())[1]

    def high(self, rows: pl.DataFrame) -> np.ndarray:
        """Whether each table or shard row is in the high-energy group (by the same rule)."""
        if not self.rederived:
            return (rows["energy_group"] == "high").to_numpy()
        return self.groups.assign(rows["energy"].to_numpy(), rows["sample_id"].to_numpy())[0] == "high"

    def to_dict(self) -> dict:
        out = {**self.groups.rule.to_dict(), "thresholds": self.groups.thresholds,
               "rederived_from_table_energies": self.rederived, "energy_temperature": self.energy_temperature}
        if self.view_groups is not None:
            out["view_thresholds"] = self.view_groups.thresholds
        return out


def plan_temperatures(cfg: DistillConfig, table: pl.DataFrame, meta: TableMeta) -> TemperaturePlan:
    """The table's rule with the options the config sets replaced, fitted on the table."""
    given = {"temperatures": cfg.temperatures, "low_frac": cfg.low_frac, "high_frac": cfg.high_frac,
             "rule": cfg.temperature_rule}
    rule = dataclasses.replace(meta.rule, **{k: v for k, v in given.items() if v is not None})
    return TemperaturePlan(meta.fit_groups(table, rule), rule != meta.rule, meta.energy_temperature)


def open_training_set(cfg: DistillConfig, meta: TableMeta) -> tuple[DataConfig, ImageSet]:
    """The table's dataset as it is on this machine, checked against the table's fingerprint."""
    data = meta.data if cfg.eval_limit is None else dataclasses.replace(meta.data, eval_limit=cfg.eval_limit)
    train_set = data.build("train")
    if train_set.fingerprint() != meta.dataset.fingerprint:
        raise UserError(f"{cfg.scores} was computed on another dataset than {data.dataset} "
                        "as it is on this machine (fingerprints differ)")
    for path, keep in ((cfg.exclude, False), (cfg.keep, True)):
        if path:
            chosen = np.isin(train_set.sample_ids, read_sample_ids(path))
            if not chosen.any():
                raise UserError(f"{path} names none of the training set's samples")
            train_set = train_set.subset(np.flatnonzero(chosen == keep))
            if len(train_set) == 0:
                raise UserError(f"--exclude {path} leaves no training samples")
    return data, train_set


def read_sample_ids(path: str) -> np.ndarray:
    """The ``sample_id`` column of a Parquet file (a selection written by `energytools select`)."""
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist")
    frame = read_parquet(path, None)
    if "sample_id" not in frame.columns or not frame["sample_id"].dtype.is_integer():
        raise UserError(f"{path} has no integer sample_id column")
    return frame["sample_id"].to_numpy()


def _logit_columns(rows: pl.DataFrame, names: list[str], where) -> dict:
    for name in names:
        if name not in rows.columns:
            raise UserError(f"--cached-logits: {where} lacks {name}; re-score with --save-logits")
    return {name: np.stack(rows[name].to_numpy()).astype(np.float32) for name in names}


@dataclass
class ViewReplay:
    """Training on the views score stored: the schedule that picks each epoch's view, and the
    per-view columns (aligned with the table's rows; see energytools.view_logits)."""

    schedule: ReplayViews
    columns: dict
    views: ViewsRecord
    num_classes: int


def plan_views(cfg: DistillConfig, spec: MethodSpec, meta: TableMeta, train_set: ImageSet) -> ViewReplay | None:
    """Replay stored views when the run reads their logits (--cached-logits on a table scored
    with --views) or their energies (--temperature-source views); None otherwise. Refuses a
    table whose views were drawn from another train transform than the dataset's."""
    by_views = uses_energy_groups(cfg, spec) and cfg.temperature_source == "views"
    cached = cfg.cached_logits and needs_teacher_logits(cfg, spec)
    if by_views and not meta.has_views:
        raise UserError(f"--temperature-source views needs a table scored with --views K; {cfg.scores} has no views")
    if cfg.he_da and cfg.shards:
        raise UserError("--he-da online and --shards are two forms of HE-DA; use one")
    if not (by_views or (cached and meta.has_views)):
        return None
    info = train_set.info
    recorded, transform = TrainTransform.from_dict(meta.views.transform), info.train_transform
    if recorded != transform:
        raise UserError(f"{cfg.scores} holds views of {recorded.describe()}, but {info.name} trains with "
                        f"{transform.describe()}: re-score with --views {meta.views.count}")
    return ViewReplay(ReplayViews(transform, meta.views.seed, meta.views.count, cfg.train.seed),
                      read_views(cfg.scores, meta, info.num_classes), meta.views, info.num_classes)


def shard_views(cfg: DistillConfig, plan: TemperaturePlan, replay: ViewReplay, rows: pl.DataFrame, directory) -> dict:
    """A shard's stored views (augment scores the table's K views of every new image), and with
    --temperature-source views their groups by the thresholds fitted on the dataset's views."""
    if "view_energy" not in rows.columns:
        raise UserError(f"shards in {directory} hold no per-view logits (made by an older energytools); re-run "
                        "augment on this table with --overwrite to replay views with them")
    wanted = list(view_column_shapes(replay.views, replay.num_classes))
    read = views_from_arrow(rows.select([n for n in wanted if n in rows.columns]).to_arrow(), replay.views,
                            replay.num_classes, f"shards in {directory}")
    columns = {name: values.astype(replay.columns[name].dtype, copy=False) for name, values in read.items()}
    if cfg.temperature_source == "views":
        keys = np.repeat(rows["sample_id"].to_numpy(), replay.views.count)
        columns["view_temperature"], columns["view_high"] = assign_view_groups(plan.view_groups,
                                                                               columns["view_energy"], keys)
    return columns


def collect_samples(cfg: DistillConfig, table: pl.DataFrame, plan: TemperaturePlan, train_set: ImageSet,
                    logit_names: list[str], replay: ViewReplay | None = None) -> tuple[TrainingSet, SampleLookup]:
    """Originals plus every shard directory's rows, and their per-sample values by sample_id."""
    table_sha = sha256_file(cfg.scores)
    parts = [train_set]
    columns = [{"sample_id": table["sample_id"].to_numpy(), "temperature": plan.temperatures(table),
                "high": plan.high(table), "partner_label": table["label"].to_numpy(),
                "lam": np.ones(table.height, dtype=np.float32),
                **_logit_columns(table, logit_names, cfg.scores)}]
    if replay is not None:
        columns[0].update(replay.columns)
        if cfg.temperature_source == "views":
            plan.view_groups, columns[0]["view_temperature"], columns[0]["view_high"] = fit_view_groups(
                plan.groups.rule, replay.columns["view_energy"], table["sample_id"].to_numpy())
    if len({Path(d).resolve() for d in cfg.shards}) < len(cfg.shards):
        raise UserError("the same shard directory is given twice")
    for directory in cfg.shards:
        if read_manifest(directory).get("scores", {}).get("sha256") != table_sha:
            raise UserError(f"shards in {directory} were made from another score table than {cfg.scores}")
        shard_set, rows = shard_dataset(directory, train_set.info)
        parts.append(shard_set)
        columns.append({"sample_id": rows["sample_id"].to_numpy(), "temperature": plan.temperatures(rows),
                        "high": plan.high(rows),
                        "partner_label": rows["partner_label"].to_numpy(),
                        "lam": rows["lam"].fill_null(1.0).to_numpy().astype(np.float32),
                        **_logit_columns(rows, logit_names, f"shards in {directory}"),
                        **(shard_views(cfg, plan, replay, rows, directory) if replay is not None else {})})
    merged = {name: columns[0][name] if len(columns) == 1 else np.concatenate([c[name] for c in columns])
              for name in columns[0]}
    if "logits_flipped" in merged:  # (N, 2, C): a step gathers both views and picks one in one indexing
        merged["logits"] = np.stack([merged["logits"], merged.pop("logits_flipped")], axis=1)
    lookup = SampleLookup(merged.pop("sample_id"), **merged)
    missing = np.setdiff1d(train_set.sample_ids, lookup.ids)
    if len(missing):
        raise UserError(f"{cfg.scores} lacks sample_id {missing[0]} of the training set")
    return TrainingSet(parts, train_set.info), lookup


def cached_logit_names(cfg: DistillConfig, spec: MethodSpec, meta: TableMeta, train_set: ImageSet) -> list[str]:
    """The logit columns a --cached-logits run reads (none when the method needs no teacher)."""
    if not (cfg.cached_logits and needs_teacher_logits(cfg, spec)):
        return []
    if train_set.info.train_transform.crops:
        info = train_set.info
        raise UserError(f"--cached-logits: {info.name} trains with {info.train_transform.describe()}, so the clean "
                        "image's logits do not match the training views; re-score with --views K")
    if not meta.has_logits:
        raise UserError(f"--cached-logits needs a table scored with --save-logits or --views K; {cfg.scores} has "
                        "no logits")
    return ["logits", "logits_flipped"] if train_set.info.train_flip else ["logits"]


def uses_energy_groups(cfg: DistillConfig, spec: MethodSpec) -> bool:
    """Whether the run reads energy groups per step: Energy KD's temperatures, --he-da's high-energy samples."""
    return spec.per_sample_temperature or cfg.he_da is not None


def needs_teacher_logits(cfg: DistillConfig, spec: MethodSpec) -> bool:
    return spec.teacher_logits or (uses_energy_groups(cfg, spec) and cfg.temperature_source == "online")


def open_logits_source(cfg: DistillConfig, spec: MethodSpec, meta: TableMeta, lookup: SampleLookup,
                       train_set: ImageSet, replay: ViewReplay | None = None) -> LogitsSource | None:
    if not needs_teacher_logits(cfg, spec):
        return None
    if cfg.cached_logits:
        if replay is not None:
            return CachedViewLogits(lookup, replay.views.top_k, replay.num_classes)
        return CachedLogits(lookup)
    teacher = open_table_teacher(meta, train_set, cfg.teacher, cfg.teacher_arch, cfg.train.device,
                                 cfg.preprocessing.given())
    # logits that decide energy groups are float32-exact, as score's that fitted the thresholds
    exact = uses_energy_groups(cfg, spec) and cfg.temperature_source == "online"
    return OnlineTeacher(teacher.model, teacher.device if exact else None)


#: (batch, positions, teacher logits) -> one value per sample of the batch, on the device
PerSample = Callable[[Batch, torch.Tensor, torch.Tensor | None], torch.Tensor]


def energy_group_source(cfg: DistillConfig, plan: TemperaturePlan, lookup: SampleLookup, column: str) -> PerSample:
    """Each sample's ``temperature`` (its group's T) or ``high`` (in the high-energy group), by
    --temperature-source: the table's row, the stored view's, or the teacher's energy on the view."""
    if cfg.temperature_source == "online":
        def online(batch: Batch, positions, teacher_logits):
            groups, temps = plan.assign_online(teacher_logits, batch.sample_ids)
            return to_device(torch.from_numpy(temps if column == "temperature" else groups == "high"),
                             teacher_logits.device)
        return online
    if cfg.temperature_source == "views":
        return lambda batch, positions, teacher_logits: lookup.view(f"view_{column}", positions, batch.views,
                                                                    batch.images.device)
    return lambda batch, positions, teacher_logits: lookup.get(column, positions, batch.images.device)


def temperature_source(cfg: DistillConfig, spec: MethodSpec, plan: TemperaturePlan,
                       lookup: SampleLookup) -> PerSample | None:
    """Each sample's T, or None for constant-T methods."""
    return energy_group_source(cfg, plan, lookup, "temperature") if spec.per_sample_temperature else None


def open_online_heda(cfg: DistillConfig, plan: TemperaturePlan, lookup: SampleLookup, meta: TableMeta,
                     train_set: ImageSet, teacher_logits_of, kd_weight: float) -> OnlineHEDA | None:
    if cfg.he_da is None:
        return None
    if isinstance(teacher_logits_of, OnlineTeacher):
        teacher = teacher_logits_of.model  # the one already open
    else:  # cached logits cover the batch, not the mixed images
        teacher = open_table_teacher(meta, train_set, cfg.teacher, cfg.teacher_arch, cfg.train.device,
                                     cfg.preprocessing.given()).model.eval()
    weight = cfg.he_da_weight if cfg.he_da_weight is not None else kd_weight
    return OnlineHEDA(teacher, energy_group_source(cfg, plan, lookup, "high"), weight, cfg.train.seed, context().rank)


def distill(cfg: DistillConfig, on_step: Callable | None = None) -> FitResult:
    """Train ``cfg.student`` on the table's dataset (plus shards) with ``cfg.method``; ``on_step``
    (an :class:`energytools.engine.StepEvent` callback) sees every step, with the step's
    :class:`SampleInfo` in ``event.batch.extras["sample_info"]``."""
    cfg.check()
    context()  # under torchrun: join the process group (and pick this rank's GPU) before any device
    spec = method_spec(cfg.method)
    out = Path(cfg.out)
    table, meta = load_table(cfg.scores)  # the per-view columns are read apart (plan_views)
    meta.require_train(cfg.scores, "distill")
    data, train_set = open_training_set(cfg, meta)
    plan = plan_temperatures(cfg, table, meta)
    replay = plan_views(cfg, spec, meta, train_set)
    logit_names = [] if replay is not None else cached_logit_names(cfg, spec, meta, train_set)
    training_set, lookup = collect_samples(cfg, table, plan, train_set, logit_names, replay)
    lookup.to(resolve_device(cfg.train.device))
    teacher_logits_of = open_logits_source(cfg, spec, meta, lookup, train_set, replay)
    temperature_of = temperature_source(cfg, spec, plan, lookup)
    info = train_set.info
    seed_everything(cfg.train.seed)  # the model's initial weights come from the seed
    student = create_model(cfg.student, info.num_classes, info.in_channels, info.image_size)
    distiller = spec.build(student, as_dict(cfg))
    he_da = open_online_heda(cfg, plan, lookup, meta, train_set, teacher_logits_of,
                             distiller.options.get("kd_weight", 0.9))

    mixed = bool((lookup.columns["lam"] < 1).any())  # any CutMix/MixUp rows: else CE needs no partner

    def step(batch: Batch, forward):
        device = batch.images.device
        positions = (lookup.positions(batch.sample_ids) if (teacher_logits_of or temperature_of or mixed or he_da)
                     else None)
        teacher_logits = teacher_logits_of(batch, positions) if teacher_logits_of else None
        temperature = temperature_of(batch, positions, teacher_logits) if temperature_of else None
        partner, lam = ((lookup.get("partner_label", positions, device), lookup.get("lam", positions, device))
                        if mixed else (None, None))
        sample_info = SampleInfo(batch.labels, partner, lam, temperature, teacher_logits, batch.epoch)
        batch.extras["sample_info"] = sample_info
        if he_da is None:
            return distiller.forward_train(batch.images, sample_info, forward)
        he_da_images, kept = he_da.mix(batch.images, batch.epoch, batch, positions, teacher_logits), {}
        logits, losses = distiller.forward_train(batch.images, sample_info,
                                                 he_da.joint_forward(forward, he_da_images, kept))
        return logits, {**losses, "he_da": he_da.loss(he_da_images, kept, logits)}

    resolved = {"stage": "distill", **content_of(cfg),
                "scores_sha256": sha256_file(cfg.scores), "method_options": distiller.options,
                "subset": {"samples": len(train_set), **{f"{name}_sha256": sha256_file(path)
                                                         for name, path in (("exclude", cfg.exclude), ("keep", cfg.keep))
                                                         if path}},
                "temperature_plan": plan.to_dict(), "teacher": dataclasses.asdict(meta.teacher), "data": as_dict(data)}
    if replay is not None:
        resolved["replayed_views"] = dataclasses.asdict(meta.views)
    if he_da is not None:
        resolved["he_da_online"] = {**he_da.to_dict(), "high_energy_by": cfg.temperature_source}
    val_set, test_set = data.build("val"), data.build("test")
    n_aug = len(training_set) - len(train_set)
    with run_directory(out, cfg.resume, cfg.overwrite, resolved) as writes_files:
        run_meta = {**model_meta(cfg.student, train_set, data), "method": cfg.method, "config": resolved,
                    "versions": versions()}
        console.print(f"distill {cfg.student} with {cfg.method} on {info.name}: {len(train_set)} samples"
                      f"{f' + {n_aug} HE-DA' if n_aug else ''}{' + online HE-DA' if he_da else ''}, temperatures {plan.to_dict()['temperatures']} "
                      f"({plan.groups.rule.rule}, {cfg.temperature_source})")
        result = fit(student, step, training_set, val_set, test_set, cfg.train, out, run_meta, resume=cfg.resume,
                     views=replay.schedule if replay is not None else None, distiller=distiller, on_step=on_step,
                     stateful={"he_da": he_da} if he_da is not None else None)
        if writes_files:
            write_test_predictions(student, test_set, out, cfg.train)  # before summary.json: a run with one has both
            write_json(out / "summary.json", {
                "method": cfg.method, "student": cfg.student, "best_epoch": result.best_epoch,
                "best_val_acc": result.best_val_acc, "best_test_acc": result.best_test_acc,
                "last_test_acc": result.last_test_acc, "seconds": result.seconds,
                "temperatures": plan.to_dict()["temperatures"], "shards": list(cfg.shards), "augmented_samples": n_aug})
    console.print(headline("done", f": {out}: {result.summary()}"))
    return result
