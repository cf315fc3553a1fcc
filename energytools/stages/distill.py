"""`energytools distill`: train a student with ce, kd, energy-kd, dkd or energy-dkd.

Per-sample temperatures are read from the score table by sample_id (the default,
"offline" design) or recomputed every batch from the teacher's energy on the augmented view
("online", as the reference code does). HE-DA shard rows join the training set as extra
samples: every batch is a uniform draw from originals + shard rows, so a ratio-0.3 shard
directory makes about 23% of each batch augmented (0.3 / 1.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ..config import DataConfig, as_dict
from ..data.base import Collated
from ..data.shards import read_manifest, shard_dataset
from ..distillers import METHODS, SampleInfo
from ..distillers.base import NEEDS_TEACHER
from ..energy import (GROUPS, assign_temperatures, energy, energy_ranks, groups_from_thresholds, parse_temperatures,
                      rank_groups)
from ..engine import seed_everything, Batch, FitResult, TrainConfig, console, fit, headline
from ..errors import UserError
from ..io import sha256_file, write_json
from ..models import create_model
from ..table import load_table, versions
from .score import open_teacher
from .train import model_meta, run_directory

TEMPERATURE_SOURCES = ("table", "online")


@dataclass
class DistillConfig:
    scores: str
    student: str
    out: str
    method: str = "energy-kd"
    shards: tuple[str, ...] = ()
    teacher: str | None = None  # default: the checkpoint that scored the table
    teacher_arch: str | None = None
    temperature_source: str = "table"
    temperatures: str | tuple | None = None  # re-derive from the table's energies when set
    low_frac: float | None = None
    high_frac: float | None = None
    temperature_rule: str | None = None
    kd_temperature: float = 4.0
    ce_weight: float | None = None  # method default: 0.1 for kd methods, 1.0 for dkd methods
    kd_weight: float | None = None
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 20
    cached_logits: bool = False
    eval_limit: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    overwrite: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.temperature_source not in TEMPERATURE_SOURCES:
            raise UserError(f"--temperature-source must be table or online, got {self.temperature_source!r}")
        if not self.kd_temperature > 0:
            raise UserError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        self.train.check()


class SampleLookup:
    """Per-sample values keyed by sample_id (originals and shard rows alike)."""

    def __init__(self, ids: np.ndarray, **columns: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        if len(self.ids) > 1 and (np.diff(self.ids) == 0).any():
            dup = self.ids[1:][np.diff(self.ids) == 0][0]
            raise UserError(f"sample_id {dup} appears twice among the training samples and shards")
        self.columns = {name: torch.as_tensor(values[order]) for name, values in columns.items()}

    def positions(self, sample_ids: torch.Tensor) -> torch.Tensor:
        ids = sample_ids.numpy()
        pos = np.searchsorted(self.ids, ids).clip(0, max(len(self.ids) - 1, 0))
        if len(ids) and not (self.ids[pos] == ids).all():
            missing = ids[self.ids[pos] != ids][0]
            raise UserError(f"sample_id {missing} is not in the score table")
        return torch.from_numpy(pos)

    def get(self, name: str, positions: torch.Tensor, device) -> torch.Tensor:
        return self.columns[name][positions].to(device, non_blocking=True)


@dataclass
class TemperaturePlan:
    """The resolved temperature rule: what the run config records."""

    temperatures: tuple[float, float, float]
    low_frac: float
    high_frac: float
    rule: str
    thresholds: dict
    rederived: bool
    energy_temperature: float
    reference_energies: np.ndarray = field(repr=False)

    def for_energies(self, energies: np.ndarray) -> np.ndarray:
        groups = groups_from_thresholds(energies, self.thresholds)
        ranks = energy_ranks(energies, self.reference_energies)
        return assign_temperatures(groups, ranks, self.temperatures, self.rule)

    def to_dict(self) -> dict:
        return {"temperatures": dict(zip(GROUPS, self.temperatures)), "low_frac": self.low_frac,
                "high_frac": self.high_frac, "rule": self.rule, "thresholds": self.thresholds,
                "rederived_from_table_energies": self.rederived, "energy_temperature": self.energy_temperature}


def plan_temperatures(cfg: DistillConfig, table: pl.DataFrame, meta: dict):
    """Temperatures per training sample: the table's, or re-derived from its energies."""
    temps = parse_temperatures(cfg.temperatures) if cfg.temperatures is not None else \
        tuple(meta["temperatures"][g] for g in GROUPS)
    low = cfg.low_frac if cfg.low_frac is not None else meta["groups"]["low_frac"]
    high = cfg.high_frac if cfg.high_frac is not None else meta["groups"]["high_frac"]
    rule = cfg.temperature_rule or meta.get("temperature_rule", "groups")
    energies = table["energy"].to_numpy().astype(np.float64)
    same = (temps == tuple(meta["temperatures"][g] for g in GROUPS) and low == meta["groups"]["low_frac"]
            and high == meta["groups"]["high_frac"] and rule == meta.get("temperature_rule", "groups"))
    if same:
        thresholds, per_sample = meta["groups"]["thresholds"], table["temperature"].to_numpy()
    else:
        groups, found, ranks = rank_groups(energies, table["sample_id"].to_numpy(), low, high)
        thresholds, per_sample = found.to_dict(), assign_temperatures(groups, ranks, temps, rule)
    plan = TemperaturePlan(temps, low, high, rule, thresholds, not same, meta["energy"]["temperature"],
                           np.sort(energies))
    return plan, per_sample.astype(np.float32)


class TrainingSet(torch.utils.data.ConcatDataset):
    """Originals plus shard rows; ``info`` (the train augmentation) is the dataset's."""

    def __init__(self, parts, info):
        super().__init__(parts)
        self.info = info

    def __getitems__(self, indices) -> Collated:
        """Fetch each part's share of the batch in one call, then restore the sampler's order."""
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.cumulative_sizes, indices, side="right")
        starts = np.concatenate([[0], self.cumulative_sizes[:-1]])
        images = labels = ids = None
        for part in np.unique(which):
            mask = which == part
            got = self.datasets[part].__getitems__(indices[mask] - starts[part])
            if images is None:
                images = got[0].new_empty((len(indices), *got[0].shape[1:]))
                labels, ids = got[1].new_empty(len(indices)), got[2].new_empty(len(indices))
            selector = torch.from_numpy(mask)
            images[selector], labels[selector], ids[selector] = got
        return Collated((images, labels, ids))


def distill(cfg: DistillConfig) -> FitResult:
    """Train ``cfg.student`` on the table's dataset (plus shards) with ``cfg.method``."""
    cfg.check()
    out = Path(cfg.out)
    table, meta = load_table(cfg.scores)
    if meta.get("split") != "train":
        raise UserError(f"{cfg.scores} scores the {meta.get('split')} split; distill needs a train table")
    data = DataConfig.from_options(meta["dataset"]["options"])
    data.eval_limit = cfg.eval_limit
    train_set = data.build("train")
    if train_set.fingerprint() != meta["dataset"]["fingerprint"]:
        raise UserError(f"{cfg.scores} was computed on another dataset than {data.dataset} "
                        "as it is on this machine (fingerprints differ)")
    info = train_set.info
    plan, temperatures = plan_temperatures(cfg, table, meta)
    table_sha = sha256_file(cfg.scores)

    uses_teacher = cfg.method in NEEDS_TEACHER
    needs_logits = uses_teacher or cfg.temperature_source == "online"
    columns = {"temperature": temperatures, "partner_label": table["label"].to_numpy(),
               "lam": np.ones(table.height, dtype=np.float32)}
    if cfg.cached_logits:
        if "logits" not in table.columns:
            raise UserError(f"--cached-logits needs a table scored with --save-logits; {cfg.scores} has no logits")
        if info.train_crop_pad:
            raise UserError(f"--cached-logits is valid only for flip-only train transforms; {info.name} also "
                            "crops, so the stored logits do not match the training views")
        columns["logits"] = np.stack(table["logits"].to_numpy()).astype(np.float32)
        if info.train_flip:
            if "logits_flipped" not in table.columns:
                raise UserError(f"{cfg.scores} lacks logits of flipped images; re-score with --save-logits")
            columns["logits_flipped"] = np.stack(table["logits_flipped"].to_numpy()).astype(np.float32)

    parts, ids = [train_set], [table["sample_id"].to_numpy()]
    for directory in cfg.shards:
        manifest = read_manifest(directory)
        if manifest.get("scores", {}).get("sha256") != table_sha:
            raise UserError(f"shards in {directory} were made from another score table than {cfg.scores}")
        shard_set, rows = shard_dataset(directory, info)
        parts.append(shard_set)
        ids.append(rows["sample_id"].to_numpy())
        shard_temps = plan.for_energies(rows["energy"].to_numpy()) if plan.rederived else rows["temperature"].to_numpy()
        extra = {"temperature": shard_temps.astype(np.float32), "partner_label": rows["partner_label"].to_numpy(),
                 "lam": rows["lam"].fill_null(1.0).to_numpy().astype(np.float32)}
        if cfg.cached_logits:
            for name in [c for c in ("logits", "logits_flipped") if c in columns]:
                if name not in rows.columns:
                    raise UserError(f"--cached-logits: shards in {directory} lack {name}")
                extra[name] = np.stack(rows[name].to_numpy()).astype(np.float32)
        for name, values in extra.items():
            columns[name] = np.concatenate([columns[name], values])
    lookup = SampleLookup(np.concatenate(ids), **columns)
    missing = np.setdiff1d(train_set.sample_ids, lookup.ids)
    if len(missing):
        raise UserError(f"{cfg.scores} lacks sample_id {missing[0]} of the training set")

    teacher = None
    if needs_logits and not (cfg.cached_logits and cfg.temperature_source == "table"):
        teacher_path = cfg.teacher or meta["teacher"]["path"]
        teacher = open_teacher(teacher_path, train_set, cfg.teacher_arch or meta["teacher"]["arch"], cfg.train.device)
        if teacher.meta["sha256"] != meta["teacher"]["sha256"]:
            raise UserError(f"teacher {teacher_path} is not the checkpoint that scored {cfg.scores}")
    seed_everything(cfg.train.seed)  # the model's initial weights come from the seed
    student = create_model(cfg.student, info.num_classes, info.in_channels, info.image_size)
    options = {"kd_temperature": cfg.kd_temperature, "dkd_alpha": cfg.dkd_alpha, "dkd_beta": cfg.dkd_beta,
               "dkd_warmup": cfg.dkd_warmup}
    options.update({k: v for k, v in (("ce_weight", cfg.ce_weight), ("kd_weight", cfg.kd_weight)) if v is not None})
    distiller = METHODS[cfg.method](student, **options)
    per_sample_t = cfg.method.startswith("energy-")

    def step(batch: Batch, forward):
        device = batch.images.device
        pos = lookup.positions(batch.sample_ids)
        teacher_logits = None
        if needs_logits:
            if cfg.cached_logits:
                teacher_logits = lookup.get("logits", pos, device)
                if "logits_flipped" in lookup.columns:
                    flipped = lookup.get("logits_flipped", pos, device)
                    teacher_logits = torch.where(batch.flipped.to(device).unsqueeze(1), flipped, teacher_logits)
            else:
                with torch.no_grad():
                    teacher_logits = teacher.model(batch.images).float()
        temperature = None
        if per_sample_t:
            if cfg.temperature_source == "online":
                e = energy(teacher_logits, plan.energy_temperature).cpu().numpy()
                temperature = torch.as_tensor(plan.for_energies(e), device=device)
            else:
                temperature = lookup.get("temperature", pos, device)
        info_ = SampleInfo(batch.labels, lookup.get("partner_label", pos, device), lookup.get("lam", pos, device),
                           temperature, teacher_logits, batch.epoch)
        return distiller.forward_train(batch.images, info_, forward)

    resolved = {"stage": "distill", "method": cfg.method, "student": cfg.student, "scores": str(cfg.scores),
                "scores_sha256": table_sha, "shards": list(cfg.shards), "temperature_source": cfg.temperature_source,
                "temperature_plan": plan.to_dict(), "cached_logits": cfg.cached_logits, "options": options,
                "teacher": meta["teacher"], "train": as_dict(cfg.train), "data": as_dict(data)}
    val_set, test_set = data.build("val"), data.build("test")
    with run_directory(out, cfg.resume, cfg.overwrite, resolved) as writes_files:
        run_meta = {**model_meta(cfg.student, train_set, data), "method": cfg.method, "config": resolved,
                    "versions": versions()}
        n_aug = sum(len(p) for p in parts[1:])
        console.print(f"distill {cfg.student} with {cfg.method} on {info.name}: {len(train_set)} samples"
                      f"{f' + {n_aug} HE-DA' if n_aug else ''}, temperatures {plan.to_dict()['temperatures']} "
                      f"({plan.rule}, {cfg.temperature_source})")
        result = fit(student, step, TrainingSet(parts, info), val_set, test_set, cfg.train, out, run_meta,
                     resume=cfg.resume)
        if writes_files:
            write_json(out / "summary.json", {
                "method": cfg.method, "student": cfg.student, "best_epoch": result.best_epoch,
                "best_val_acc": result.best_val_acc, "best_test_acc": result.best_test_acc,
                "last_test_acc": result.last_test_acc, "seconds": result.seconds,
                "temperatures": plan.to_dict()["temperatures"], "shards": list(cfg.shards), "augmented_samples": n_aug})
    console.print(headline("done", f": {out}: {result.summary()}"))
    return result
