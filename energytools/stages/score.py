"""`energytools score`: the teacher's per-sample energy table (scores.parquet).

Rows are computed in parts of ``part_size`` samples, each written atomically to
``<out>.parts/``; a killed run re-scores only missing parts. When all parts exist they
are merged, groups and temperatures are assigned over the whole split, and the table is
written atomically under its final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..config import DataConfig, as_dict
from ..data.transforms import normalize
from ..energy import (GROUPS, SIGN_CONVENTION, Thresholds, assign_temperatures, energy_ranks,
                      groups_from_thresholds, logit_statistics, parse_temperatures, rank_groups, check_fractions)
from ..engine import autocast, console, make_loader, progress_bar, resolve_device
from ..distributed import context
from ..errors import UserError
from ..io import check_output_free, run_lock, write_json
from ..models import adapt_to_dataset, checkpoint_meta, load_model
from ..table import SCORE_COLUMNS, load_table, versions, write_parquet


@dataclass
class ScoreConfig:
    teacher: str
    out: str = "scores.parquet"
    data: DataConfig | None = None  # None: the dataset the teacher was trained on
    teacher_arch: str | None = None  # for checkpoints that do not record it (mdistiller's)
    split: str = "train"
    energy_temperature: float = 4.0
    low_frac: float = 0.2
    high_frac: float = 0.2
    temperatures: tuple[float, float, float] = (6.0, 4.0, 2.0)  # low, mid, high: the paper's text
    temperature_rule: str = "groups"
    reference: str | None = None  # a train table whose thresholds group this split
    save_logits: bool = False
    batch_size: int = 256
    part_size: int = 8192
    device: str = "auto"
    num_workers: int = 0
    amp: bool = True
    overwrite: bool = False

    def check(self) -> None:
        check_fractions(self.low_frac, self.high_frac)
        self.temperatures = parse_temperatures(self.temperatures)
        if not self.energy_temperature > 0:
            raise UserError(f"--energy-temperature must be positive, got {self.energy_temperature}")
        if self.batch_size <= 0 or self.part_size <= 0:
            raise UserError("--batch-size must be positive")
        self.part_size = max(self.batch_size, self.part_size // self.batch_size * self.batch_size)


@dataclass
class TeacherRun:
    """A teacher ready to score a dataset: the model, its metadata and the device."""

    model: torch.nn.Module
    meta: dict
    device: torch.device
    amp: bool = True
    extras: dict = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, info) -> torch.Tensor:
        x = normalize(images_uint8.to(self.device, non_blocking=True), info)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            return self.model(x).float()


def open_teacher(path, dataset, arch: str | None = None, device: str = "auto", amp: bool = True) -> TeacherRun:
    """Load a teacher checkpoint for ``dataset`` and check it fits (classes, channels)."""
    info = dataset.info
    model, meta = load_model(path, arch, info.num_classes, info.in_channels, info.image_size)
    if meta["num_classes"] != info.num_classes:
        raise UserError(f"teacher {path} predicts {meta['num_classes']} classes but {info.name} has "
                        f"{info.num_classes}")
    if meta["in_channels"] != info.in_channels:
        raise UserError(f"teacher {path} takes {meta['in_channels']}-channel input but {info.name} has "
                        f"{info.in_channels}")
    model = adapt_to_dataset(model, meta, info)  # a model trained elsewhere gets its own preprocessing
    run_device = resolve_device(device)
    model.to(run_device).eval()
    if run_device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return TeacherRun(model, meta, run_device, amp)


def teacher_data_config(teacher_path, data: DataConfig | None) -> DataConfig:
    """The dataset to score: given explicitly, or the one the teacher checkpoint records."""
    if data is not None:
        return data
    recorded = checkpoint_meta(teacher_path).get("data")
    if not recorded:
        raise UserError(f"{teacher_path} does not record its dataset: pass --dataset")
    return DataConfig(**{k: v for k, v in recorded.items() if k in DataConfig.__dataclass_fields__})


def check_logits(logits: torch.Tensor, sample_ids: torch.Tensor) -> None:
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        first = int(sample_ids[bad.nonzero()[0, 0]].item())
        raise UserError(f"teacher produced NaN/Inf logits, first at sample_id {first}")


def score_rows(teacher: TeacherRun, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, info,
               energy_temperature: float, save_logits: bool) -> dict:
    """The per-sample columns for one batch (numpy arrays / lists)."""
    logits = teacher.logits(images, info).cpu()
    check_logits(logits, ids)
    stats = logit_statistics(logits, labels, energy_temperature)
    row = {"sample_id": ids.numpy().astype(np.int64), "label": labels.numpy().astype(np.int64)}
    row.update({k: v.numpy() for k, v in stats.items()})
    if save_logits:
        row["logits"] = logits.half().numpy()
        if info.train_flip:  # the other view a flip-only train transform can produce
            flipped = teacher.logits(images.flip(-1), info).cpu()
            check_logits(flipped, ids)
            row["logits_flipped"] = flipped.half().numpy()
    return row


def _rows_to_arrow(rows: dict, paths: list | None) -> pa.Table:
    columns = {}
    for name, values in rows.items():
        if name in ("logits", "logits_flipped"):
            columns[name] = pa.array(list(values), type=pa.list_(pa.float16()))
        else:
            columns[name] = pa.array(values, type=SCORE_COLUMNS.get(name))
    if paths is not None:
        columns["path"] = pa.array(paths, type=pa.string())
    return pa.table(columns)


def _parts_key(cfg: ScoreConfig, dataset, teacher_sha: str) -> str:
    """What the parts depend on; a resumed run reuses parts only when this matches."""
    key = {"dataset": dataset.fingerprint(), "teacher": teacher_sha, "T_E": cfg.energy_temperature,
           "save_logits": cfg.save_logits, "part_size": cfg.part_size, "batch_size": cfg.batch_size,
           "split": cfg.split}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def group_table(frame: pl.DataFrame, cfg: ScoreConfig, reference: tuple[pl.DataFrame, dict] | None):
    """Add energy_group and temperature; returns (frame, thresholds dict, source)."""
    energies = frame["energy"].to_numpy().astype(np.float64)
    ids = frame["sample_id"].to_numpy()
    if reference is None:
        groups, thresholds, ranks = rank_groups(energies, ids, cfg.low_frac, cfg.high_frac)
        source = "this table"
    else:
        ref_frame, ref_meta = reference
        thresholds = Thresholds(**ref_meta["groups"]["thresholds"])
        groups = groups_from_thresholds(energies, thresholds)
        ranks = energy_ranks(energies, np.sort(ref_frame["energy"].to_numpy().astype(np.float64)))
        source = f"reference {ref_meta['dataset']['split']} table {ref_meta['dataset']['fingerprint'][:12]}"
    temps = assign_temperatures(groups, ranks, cfg.temperatures, cfg.temperature_rule)
    frame = frame.with_columns(pl.Series("energy_group", groups.astype(str)),
                               pl.Series("temperature", temps, dtype=pl.Float32))
    return frame, thresholds.to_dict(), source


def summarize(frame: pl.DataFrame) -> dict:
    """Accuracy, per-group confidence/accuracy and the energy-confidence Spearman correlation."""
    per_group = (frame.group_by("energy_group")
                 .agg(pl.len().alias("count"), pl.col("confidence").mean().alias("mean_confidence"),
                      (pl.col("correct").mean() * 100).alias("accuracy"),
                      pl.col("energy").mean().alias("mean_energy"))
                 .to_dicts())
    order = {g: i for i, g in enumerate(GROUPS)}
    per_group.sort(key=lambda r: order.get(r["energy_group"], 9))
    spearman = frame.select(pl.corr("energy", "confidence", method="spearman")).item()
    return {"samples": frame.height, "accuracy": float(frame["correct"].mean() * 100),
            "spearman_energy_confidence": None if spearman is None else float(spearman), "groups": per_group}


def format_summary(summary: dict, thresholds: dict) -> str:
    lines = [f"{summary['samples']} samples, teacher accuracy {summary['accuracy']:.2f}%, "
             f"thresholds: low <= {thresholds['low_max']:.4f}, high >= {thresholds['high_min']:.4f}, "
             f"Spearman(energy, confidence) = {summary['spearman_energy_confidence']:.3f}"]
    for g in summary["groups"]:
        lines.append(f"  {g['energy_group']:<4} {g['count']:>7} samples  mean energy {g['mean_energy']:9.3f}  "
                     f"confidence {g['mean_confidence']:.3f}  accuracy {g['accuracy']:.2f}%")
    return "\n".join(lines)


def score(cfg: ScoreConfig) -> Path:
    """Score every sample of a split with the teacher; returns the table's path."""
    cfg.check()
    context()  # under torchrun: join the process group (and pick this rank's GPU) first
    out = Path(cfg.out)
    check_output_free(out, cfg.overwrite)
    data = teacher_data_config(cfg.teacher, cfg.data)
    dataset = data.build(cfg.split)
    reference = None
    if cfg.reference:
        reference = load_table(cfg.reference, ["sample_id", "energy"])
        ref_meta = reference[1]
        if ref_meta["energy"]["temperature"] != cfg.energy_temperature:
            raise UserError(f"--reference {cfg.reference} used T_E={ref_meta['energy']['temperature']}, "
                            f"not {cfg.energy_temperature}")
    elif cfg.split != "train":
        console.print(f"note: grouping the {cfg.split} split by its own quantiles; pass --reference "
                      "TRAIN_TABLE to use the train thresholds")
    teacher = open_teacher(cfg.teacher, dataset, cfg.teacher_arch, cfg.device, cfg.amp)
    if reference and reference[1]["teacher"]["sha256"] != teacher.meta["sha256"]:
        raise UserError(f"--reference {cfg.reference} was scored by another teacher")
    info = dataset.info
    started = time.perf_counter()
    ctx = context()
    ctx.check_same(as_dict(cfg), "score config")
    parts_dir = out.parent / f"{out.name}.parts"
    key = _parts_key(cfg, dataset, teacher.meta["sha256"])
    n_parts = (len(dataset) + cfg.part_size - 1) // cfg.part_size
    if n_parts < ctx.world:
        raise UserError(f"{len(dataset)} samples make {n_parts} part(s) of --part-size {cfg.part_size}, fewer than "
                        f"the {ctx.world} ranks: lower --part-size or the number of processes")
    # rank 0 alone holds the lock and writes the final table; every rank writes its own parts
    with run_lock(out) if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:
            if parts_dir.exists() and (parts_dir / "KEY").exists() and (parts_dir / "KEY").read_text() != key:
                shutil.rmtree(parts_dir)  # parts of another configuration are useless here
            parts_dir.mkdir(parents=True, exist_ok=True)
            (parts_dir / "KEY").write_text(key)
        ctx.barrier()
        mine = [k for k in range(n_parts) if k % ctx.world == ctx.rank]
        todo = [k for k in mine if not (parts_dir / f"part-{k:05d}.parquet").exists()]
        if len(todo) < len(mine):
            console.print(f"resuming: {len(mine) - len(todo)} of {len(mine)} parts already scored")
        with progress_bar() as progress:
            task = progress.add_task(f"score {info.name}/{cfg.split}" + (f" rank {ctx.rank}" if ctx.distributed else ""),
                                     total=sum(min(cfg.part_size, len(dataset) - k * cfg.part_size) for k in mine),
                                     completed=sum(min(cfg.part_size, len(dataset) - k * cfg.part_size)
                                                   for k in mine if k not in todo), info="")
            for k in todo:
                start, stop = k * cfg.part_size, min((k + 1) * cfg.part_size, len(dataset))
                part = dataset.subset(np.arange(start, stop))
                chunks = []
                for images, labels, ids in make_loader(part, cfg.batch_size, teacher.device, cfg.num_workers):
                    chunks.append(score_rows(teacher, images, labels, ids, info, cfg.energy_temperature,
                                             cfg.save_logits))
                    progress.update(task, advance=len(labels))
                rows = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
                paths = [part.path(i) for i in range(len(part))] if part.path(0) is not None else None
                write_parquet(_rows_to_arrow(rows, paths), parts_dir / f"part-{k:05d}.parquet", {"kind": "score-part"})
        ctx.barrier()
        if not ctx.is_main:
            ctx.barrier()  # wait for rank 0's final table
            return out
        table = pa.concat_tables([pq.read_table(parts_dir / f"part-{k:05d}.parquet") for k in range(n_parts)])
        frame = pl.from_arrow(table.replace_schema_metadata(None)).sort("sample_id")
        frame, thresholds, source = group_table(frame, cfg, reference)
        summary = summarize(frame)
        meta = {
            "kind": "scores", "versions": versions(), "dataset": dataset.describe(), "data": as_dict(data),
            "split": cfg.split,
            "teacher": {k: teacher.meta.get(k) for k in ("arch", "sha256", "path", "num_classes", "in_channels",
                                                         "preprocessing", "class_names")},
            "energy": {"temperature": cfg.energy_temperature, "sign": SIGN_CONVENTION},
            "groups": {"low_frac": cfg.low_frac, "high_frac": cfg.high_frac, "thresholds": thresholds,
                       "source": source},
            "temperatures": dict(zip(GROUPS, cfg.temperatures)), "temperature_rule": cfg.temperature_rule,
            # where the table goes does not change its content, so it stays out of the bytes
            "config": {k: v for k, v in as_dict(cfg).items() if k not in ("out", "overwrite")}, "summary": summary,
        }
        ordered = list(SCORE_COLUMNS) + [c for c in ("path", "logits", "logits_flipped") if c in frame.columns]
        write_parquet(frame.select(ordered), out, meta, row_group_size=65536)
        write_json(out.parent / f"{out.stem}.config.json", meta["config"])
        shutil.rmtree(parts_dir)
        ctx.barrier()
    console.print(format_summary(summary, thresholds))
    console.print(f"[bold]done[/]: wrote {out} ({frame.height} rows) in {time.perf_counter() - started:.1f}s")
    return out
