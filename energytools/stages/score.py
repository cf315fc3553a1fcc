"""`energytools score`: the teacher's per-sample energy table (scores.parquet).

With ``--views K`` each row also holds K training views' energies and logits (float16, or
the top-k form of energytools.view_logits), views drawn by energytools.data.views from the
dataset's own train transform, so that distill can replay them without the teacher.

Rows are computed in parts of ``part_size`` samples, each written atomically to
``<out>.parts/``; a killed run re-scores only missing parts. When all parts exist they
are merged, groups and temperatures are assigned over the whole split, and the table is
written atomically under its final name.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DataConfig, ScoreConfig, as_dict, content_of
from ..console import console, headline, progress_bar
from ..data.device_decode import EncodedFiles, check_decodable, decode_batch
from ..data.views import ScoredViews
from ..distributed import collective_timeout, context
from ..engine import default_workers, float32_exact, make_loader
from ..errors import UserError, option_name
from ..io import check_output_free, sha256_json, write_json
from ..new_data import describe_ood, flag_ood, load_reference, read_for_teacher, validation_columns
from ..preemption import Stopped, stop_requested
from ..preprocessing import describe_preprocessing
from ..resume import resumable_parts
from ..score_table import finish_table, format_summary, rows_to_arrow
from ..table import DatasetRecord, TeacherRecord, ViewsRecord, write_parquet
from ..teacher import FROM_MODEL, FoldTeachers, open_score_teacher, teacher_data_config
from ..teacher_pass import teacher_columns


def resolve_data(cfg: ScoreConfig) -> DataConfig:
    """The dataset to score: the checkpoint's recorded one, with the fields set in ``cfg.data``."""
    if cfg.data.dataset is not None:
        return cfg.data
    given = {k: v for k, v in as_dict(cfg.data).items() if v is not None}
    return dataclasses.replace(teacher_data_config(cfg.teacher), **given)


#: the largest part a default run makes (rows)
MAX_PART_SIZE = 8192
#: seconds rank 0 may take to merge each row (and each stored view) before the other ranks give up on it;
#: a generous upper bound, ended early when rank 0 is gone from this host
MERGE_SECONDS_PER_ROW = 0.002


def choose_part_size(samples: int, world: int, batch_size: int, given: int | None) -> int:
    """Rows per part: ``given``, or the largest multiple of ``batch_size`` (at most
    MAX_PART_SIZE) that still gives every rank a part. Parts made of whole batches score the
    same batches as one process does, so the table's bytes do not depend on the number of
    ranks; only when there are fewer batches than ranks are parts cut inside a batch."""
    if samples < world:
        raise UserError(f"{samples} samples cannot be shared by {world} ranks: launch at most {samples} processes")
    if given is not None:
        return given
    batches = -(-samples // batch_size)
    if batches < world:
        console.print(f"note: {batches} batch(es) of {batch_size} for {world} ranks: parts of "
                      f"{-(-samples // world)} rows, so batches differ from a one-process run (energies may differ "
                      f"in the last bits); lower {option_name('batch_size')} to keep them")
        return -(-samples // world)
    return min(MAX_PART_SIZE // batch_size or 1, -(-batches // world)) * batch_size


def _parts_key(cfg: ScoreConfig, dataset, teacher_sha: str, part_size: int, ood: bool = False) -> str:
    """What the parts depend on; a resumed run reuses parts only when this matches."""
    key = {"dataset": dataset.fingerprint(), "teacher": teacher_sha, "T_E": cfg.energy_temperature,
           "save_logits": cfg.save_logits, "part_size": part_size, "batch_size": cfg.batch_size,
           "split": cfg.split, "amp": cfg.amp}
    if cfg.preprocessing.given():  # (keys of runs without overrides are as before)
        key["preprocessing"] = cfg.preprocessing.given()
    if ood:  # the parts hold the OOD columns
        key["ood"] = True
    if cfg.views:
        key.update(views=cfg.views, top_k=cfg.top_k, seed=cfg.seed, transform=dataset.info.train_transform.to_dict())
    if cfg.decode_on_device:
        key["decode_on_device"] = True
    return sha256_json(key, 16)


def _check_decode_on_device(cfg: ScoreConfig, dataset) -> None:
    """--decode-on-device reads an image folder's files itself; refused where it cannot."""
    if not cfg.decode_on_device:
        return
    flag = option_name("decode_on_device")
    check_decodable(dataset, flag)
    if cfg.views:
        raise UserError(f"{flag} cannot render {option_name('views')}: the views are cut from the decoded image "
                        "on the CPU; leave one of them out")


def _batches(part, cfg: ScoreConfig, device, workers: int):
    """A part's ``(images, labels, ids, *views)`` batches, images on ``device`` where decoded there."""
    source = (ScoredViews(part, cfg.views, cfg.seed) if cfg.views
              else EncodedFiles(part) if cfg.decode_on_device else part)
    for images, *rest in make_loader(source, cfg.batch_size, device, workers):
        yield (decode_batch(images, part.images, device) if cfg.decode_on_device else images), *rest


def _stop_if_requested(parts_dir: Path, mine: list[str]) -> None:
    """A stop signal came: drop the part being scored (the parts written stay) and stop."""
    signum = stop_requested()
    if signum is not None:
        done = sum((parts_dir / name).exists() for name in mine)
        raise Stopped(signum, f"{done} of {len(mine)} parts scored in {parts_dir}")


def score(cfg: ScoreConfig) -> Path:
    """Score every sample of a split with the teacher; returns the table's path."""
    cfg.check()
    ctx = context(cfg.device)  # under torchrun: join the process group for this device first
    out = Path(cfg.out)
    check_output_free(out, cfg.overwrite)
    data = resolve_data(cfg)
    dataset = data.build(cfg.split, unlabelled=True)
    reference = load_reference(cfg.reference, cfg.energy_temperature) if cfg.reference else None
    if reference is None and cfg.split != "train":
        console.print(f"note: grouping the {cfg.split} split by its own quantiles; pass --reference "
                      "TRAIN_TABLE to use the train groups")
    dataset, note = read_for_teacher(dataset, data, reference, cfg.teacher)
    overrides = cfg.preprocessing.given()
    # with a reference, the teacher is fed what it was fed there; an option that contradicts it is refused
    recorded = reference.preprocessing(overrides, dataset.info) if reference else FROM_MODEL
    # a checkpoint, or a `train --folds` directory: each train row by its fold's teacher, other splits by the mean
    teacher = open_score_teacher(cfg.teacher, dataset, cfg.teacher_arch, cfg.device, cfg.amp, overrides, recorded)
    folds = teacher if isinstance(teacher, FoldTeachers) else None
    if reference:
        reference.check_teacher(teacher)
    if note:
        console.print(note)
    info = dataset.info
    _check_decode_on_device(cfg, dataset)
    trained_on = (teacher.meta.get("data") or {}).get("dataset")
    if trained_on and trained_on != info.name:  # allowed (a related dataset), but rarely meant
        console.print(f"note: the teacher was trained on {trained_on}; scoring {info.name}", style="yellow")
    fed = describe_preprocessing(teacher.meta["preprocessing"], info)
    console.print(fed)
    if cfg.top_k is not None and not cfg.top_k < info.num_classes:
        raise UserError(f"{option_name('top_k')} must be smaller than the {info.num_classes} classes of {info.name}, got {cfg.top_k}")
    started = time.perf_counter()
    ctx.check_same(as_dict(cfg), "score config")
    part_size = choose_part_size(len(dataset), ctx.world, cfg.batch_size, cfg.part_size)
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(dataset)
    n_parts = (len(dataset) + part_size - 1) // part_size
    if n_parts < ctx.world:
        raise UserError(f"{len(dataset)} samples make {n_parts} part(s) of part_size {part_size}, fewer than "
                        f"the {ctx.world} ranks: lower part_size (or leave it out) or the number of processes")
    names = [f"part-{k:05d}.parquet" for k in range(n_parts)]

    def rows_in(name: str) -> range:
        k = names.index(name)
        return range(k * part_size, min((k + 1) * part_size, len(dataset)))

    parts_dir = out.parent / f"{out.name}.parts"
    # the other ranks wait while rank 0 merges the parts (and, with --reference, scores its validation
    # split): a wait sized to that work, not the collective timeout
    rows = len(dataset) * (1 + (cfg.views or 0)) + (len(reference.validation) if reference is not None else 0)
    merge_seconds = collective_timeout() + 60 + MERGE_SECONDS_PER_ROW * rows
    key = _parts_key(cfg, dataset, teacher.sha256, part_size, ood=reference is not None)
    with resumable_parts(out, parts_dir, key, names, finish_seconds=merge_seconds) as work:
        if len(work.todo) < len(work.mine):
            console.print(f"resuming: {len(work.mine) - len(work.todo)} of {len(work.mine)} parts already scored")
        with progress_bar() as progress:
            task = progress.add_task(f"score {info.name}/{cfg.split}" + (f" rank {ctx.rank}" if ctx.distributed else ""),
                                     total=sum(len(rows_in(n)) for n in work.mine),
                                     completed=sum(len(rows_in(n)) for n in work.mine if n not in work.todo), info="")
            for name in work.todo:
                part = dataset.subset(np.array(rows_in(name)))
                chunks = []
                with float32_exact(teacher.device, not cfg.amp):
                    for images, labels, ids, *views in _batches(part, cfg, teacher.device, workers):
                        chunks.append({"sample_id": ids.numpy(), "label": labels.numpy(),
                                       **teacher_columns(teacher, images, labels, ids, info, cfg.energy_temperature,
                                                         save_logits=cfg.save_logits,
                                                         views=views[0] if views else None, top_k=cfg.top_k,
                                                         batch_size=cfg.batch_size, ood=reference is not None),
                                       **({"fold": folds.folds_of(ids.numpy())} if folds else {})})
                        progress.update(task, advance=len(labels))
                        _stop_if_requested(parts_dir, work.mine)
                rows = {column: np.concatenate([c[column] for c in chunks]) for column in chunks[0]}
                paths = [part.path(i) for i in range(len(part))] if part.path(0) is not None else None
                write_parquet(rows_to_arrow(rows, paths), parts_dir / name, {"kind": "score-part"})
        if not work.gather():
            return out
        table = pa.concat_tables([pq.read_table(parts_dir / name) for name in names])
        frame = pl.from_arrow(table.replace_schema_metadata(None))
        ood = None
        if reference:
            columns = validation_columns(teacher, reference.validation, cfg.batch_size, workers, cfg.amp,
                                         lambda: _stop_if_requested(parts_dir, work.mine))
            frame, ood = flag_ood(frame, reference, columns, cfg.ood_score, cfg.ood_tpr)
        # where the table goes does not change its content, so out stays out of the bytes
        config = {k: v for k, v in content_of(cfg).items() if k != "data"}
        transform = info.train_transform
        views = (ViewsRecord(cfg.views, cfg.seed, transform.to_dict(), cfg.top_k, transform.describe())
                 if cfg.views else None)
        meta, summary = finish_table(frame, out, data=data, dataset=DatasetRecord(**dataset.describe()),
                                     teacher=TeacherRecord(**teacher.record()),
                                     energy_temperature=cfg.energy_temperature, rule=cfg.rule(),
                                     reference=(reference.frame, reference.meta) if reference else None,
                                     config=config, views=views, ood=ood, folds=folds.folds_record() if folds else None)
        write_json(out.parent / f"{out.stem}.config.json", {**config, "data": as_dict(data)})
        shutil.rmtree(parts_dir)
    console.print(format_summary(summary, meta.thresholds))
    if ood is not None:
        console.print(describe_ood(ood, frame.height))
    console.print(fed)
    console.print(headline("done", f": wrote {out} ({frame.height} rows) in {time.perf_counter() - started:.1f}s"))
    return out
