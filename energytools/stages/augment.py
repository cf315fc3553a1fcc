"""`energytools augment`: select high-energy samples and materialize HE-DA shards.

The job list is (source_id, copy) for every selected sample in sample_id order; shard k
holds jobs [k * shard_size, (k + 1) * shard_size). Each job is seeded from
(seed, source_id, copy), so the bytes of every shard are the same whatever the number of
workers. Shards are written atomically as they finish; a killed run writes only the
missing ones; the manifest is written last and marks the directory complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from ..config import DataConfig, as_dict
from ..data.base import ImageSet
from ..data.shards import LOGITS_FIELD, MANIFEST, SHARD_SCHEMA, encode_png
from ..distributed import context
from ..energy import assign_temperatures, energy_ranks, groups_from_thresholds, logit_statistics
from ..engine import console, headline, progress_bar
from ..errors import UserError
from ..io import remove_partial_files, run_lock, sha256_file, write_json
from ..policies import make_policy
from ..selection import describe_selection, select_samples
from ..table import load_table, versions, write_parquet
from .score import check_logits, open_teacher

#: augmented sample ids start here, far above any dataset's own ids
AUG_ID_BASE = 1 << 40
#: the score table's columns this stage reads
TABLE_COLUMNS = ["sample_id", "label", "energy"]


@dataclass
class AugmentConfig:
    scores: str = "scores.parquet"
    out: str = "he-da"
    ratio: float = 0.3
    select: str = "high"
    per_class: bool = False
    policy: str = "cutmix"
    copies: int = 1
    seed: int = 0
    workers: int = 1
    shard_size: int = 2048
    teacher: str | None = None  # default: the checkpoint that scored the table
    teacher_arch: str | None = None
    batch_size: int = 256
    overwrite: bool = False

    def content(self) -> dict:
        """The options that decide the shards' bytes: not where the input and output live (the
        table is identified by its sha256) nor how many processes write them."""
        return {k: v for k, v in as_dict(self).items() if k not in ("scores", "out", "workers", "overwrite")}

    def check(self) -> None:
        if not 0 < self.ratio <= 1:
            raise UserError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.copies < 1:
            raise UserError(f"--copies must be >= 1, got {self.copies}")
        if self.workers < 1 or self.shard_size < 1:
            raise UserError("--workers and shard size must be >= 1")
        make_policy(self.policy)  # fail on an unknown policy before any work


class Augmenter:
    """Builds augmented, scored rows; one per process (dataset, teacher and policy load once)."""

    def __init__(self, cfg: AugmentConfig, dataset: ImageSet, table: pl.DataFrame, meta: dict):
        try:
            import cv2

            cv2.setNumThreads(0)  # one process per core: OpenCV's own threads would only compete
        except ImportError:
            pass
        self.cfg, self.dataset, self.meta = cfg, dataset, meta
        self.selection = select_samples(table, cfg.ratio, cfg.select, cfg.per_class, cfg.seed)
        self.selected_ids = self.selection["sample_id"].to_numpy()
        self.reference = np.sort(table["energy"].to_numpy().astype(np.float64))
        position_of = {int(s): i for i, s in enumerate(dataset.sample_ids)}
        self.positions = np.array([position_of[int(s)] for s in self.selected_ids], dtype=np.int64)
        self.labels = dataset.labels[self.positions]
        self.policy = make_policy(cfg.policy)
        self.teacher = open_teacher(cfg.teacher or meta["teacher"]["path"], dataset,
                                    cfg.teacher_arch or meta["teacher"]["arch"], "cpu")
        self.save_logits = bool(meta["config"].get("save_logits"))

    @classmethod
    def open(cls, cfg: AugmentConfig) -> "Augmenter":
        """What a spawned worker does: load ``cfg.scores`` and its dataset itself (the selection
        is a pure function of the table, so recomputing it keeps the start-up arguments small)."""
        table, meta = load_table(cfg.scores, TABLE_COLUMNS)
        return cls(cfg, DataConfig.from_options(meta["dataset"]["options"]).build("train"), table, meta)

    def image(self, index: int) -> np.ndarray:
        return self.dataset.image(self.positions[index])

    def build(self, jobs: list[tuple[int, int]]) -> pa.Table:
        rows = {name: [] for name in SHARD_SCHEMA.names}
        pixels = []
        for index, copy in jobs:
            source_id = int(self.selected_ids[index])
            rng = np.random.default_rng([self.cfg.seed, source_id, copy])
            result = self.policy(rng, index, self.image, len(self.selected_ids))
            pixels.append(result.image)
            partner = result.partner_index
            rows["image"].append({"bytes": encode_png(result.image), "path": f"{source_id}-{copy}.png"})
            rows["sample_id"].append(AUG_ID_BASE + source_id * self.cfg.copies + copy)
            rows["source_id"].append(source_id)
            rows["partner_id"].append(None if partner is None else int(self.selected_ids[partner]))
            rows["lam"].append(result.lam)
            rows["label"].append(int(self.labels[index]))
            rows["partner_label"].append(int(self.labels[partner if partner is not None else index]))
            rows["aug"].append(self.policy.name)
            rows["aug_params"].append(json.dumps(result.params, sort_keys=True))
        stats, logits = self._score(np.stack(pixels), np.array(rows["label"]), np.array(rows["sample_id"]))
        groups = groups_from_thresholds(stats["energy"], self.meta["groups"]["thresholds"])
        ranks = energy_ranks(stats["energy"].astype(np.float64), self.reference)
        temps = assign_temperatures(groups, ranks, [self.meta["temperatures"][g] for g in ("low", "mid", "high")],
                                    self.meta.get("temperature_rule", "groups"))
        rows.update(energy=stats["energy"], confidence=stats["confidence"], energy_group=list(groups),
                    temperature=temps)
        table = pa.table({field.name: pa.array(rows[field.name], type=field.type) for field in SHARD_SCHEMA})
        for name, values in logits.items():
            table = table.append_column(pa.field(name, LOGITS_FIELD.type), pa.array(list(values), LOGITS_FIELD.type))
        return table

    @torch.no_grad()
    def _score(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray):
        info = self.dataset.info
        batch = torch.from_numpy(images).permute(0, 3, 1, 2)
        chunks, flipped = [], []
        for start in range(0, len(batch), self.cfg.batch_size):
            part = batch[start:start + self.cfg.batch_size]
            chunks.append(self.teacher.logits(part, info).cpu())
            if self.save_logits and info.train_flip:
                flipped.append(self.teacher.logits(part.flip(-1), info).cpu())
        logits = torch.cat(chunks)
        check_logits(logits, torch.from_numpy(ids))
        stats = logit_statistics(logits, torch.from_numpy(labels), self.meta["energy"]["temperature"])
        saved = {}
        if self.save_logits:
            saved["logits"] = logits.half().numpy()
            if flipped:
                saved["logits_flipped"] = torch.cat(flipped).half().numpy()
        return {k: v.numpy() for k, v in stats.items()}, saved


@dataclass
class ShardPlan:
    """One shard to write: its path and its jobs in scoring-batch-sized chunks."""

    path: Path
    chunks: list[list[tuple[int, int]]]

    @classmethod
    def make(cls, path: Path, jobs: list[tuple[int, int]], batch_size: int) -> "ShardPlan":
        # chunks start at multiples of the scoring batch, so each chunk is exactly one of the
        # teacher batches that scoring the whole shard would run: same batches, same bits
        return cls(path, [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)])

    @property
    def rows(self) -> int:
        return sum(map(len, self.chunks))


# PNG bytes are already compressed: storing them again costs time for nothing
SHARD_COMPRESSION = {name: "zstd" for name in SHARD_SCHEMA.names + ["image.path", "logits", "logits_flipped"]
                     if name != "image"} | {"image.bytes": "none"}

#: how worker processes start. On Linux they fork, as torch's DataLoader workers do: a forked
#: worker shares this process's dataset, teacher and policy and is ready at once. Elsewhere a
#: spawned worker imports torch and loads them itself (about 3.5 s).
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"

_WORKER: Augmenter | None = None  # the Augmenter a worker process builds chunks with
#: every augment process scores with this many threads: the count changes the last bits of the
#: logits, and the bytes must not depend on --workers
SCORING_THREADS = 1


def _init_worker(cfg: AugmentConfig, parent: int) -> None:
    global _WORKER
    torch.set_num_threads(SCORING_THREADS)
    if _WORKER is None:  # spawned
        _WORKER = Augmenter.open(cfg)
    else:
        _die_with(parent)


def _die_with(parent: int) -> None:
    """Have Linux kill this forked worker when ``parent`` dies: the worker holds copies of the
    parent's files, the output's lock among them, so an orphan would lock out the re-run."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the call above
        os._exit(1)


def _build_chunk(jobs: list[tuple[int, int]]) -> pa.Table:
    return _WORKER.build(jobs)


@contextlib.contextmanager
def start_workers(count: int, builder: Augmenter) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of ``count`` worker processes that build chunks as ``builder`` does, started now
    (None when ``count`` is 0). Start it before any other thread of this process: a fork
    copies only the thread that makes it, and a lock another thread held would stay locked.
    """
    global _WORKER
    if count == 0:
        yield None
        return
    _WORKER = builder  # what a forked worker inherits
    pool = ProcessPoolExecutor(count, mp_context=get_context(START_METHOD), initializer=_init_worker,
                               initargs=(builder.cfg, os.getpid()))
    try:
        for _ in range(count):
            pool.submit(int)  # the pool starts its processes on submitted calls
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _WORKER = None


def write_shards(plans: list[ShardPlan], metadata: dict, builder: Augmenter,
                 pool: ProcessPoolExecutor | None = None) -> Iterator[int]:
    """Write the shards in ``plans``, each with ``metadata``; yields each chunk's row count as it is built.

    ``builder`` builds chunks in this process, helped by ``pool``'s workers when there is one.
    The unit of work is a chunk (one scoring batch), not a shard, so that the processes
    finish together; a shard is written, atomically, as soon as its last chunk is in. Every
    chunk is a pure function of its jobs, so who builds it does not change the bytes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(SCORING_THREADS)
    units = [(k, c) for k, plan in enumerate(plans) for c in range(len(plan.chunks))]
    chunks = [plans[k].chunks[c] for k, c in units]
    built: dict[int, dict[int, pa.Table]] = {}
    try:
        results = enumerate(map(builder.build, chunks)) if pool is None else _build_in_parallel(chunks, builder, pool)
        for i, table in results:
            k, c = units[i]
            built.setdefault(k, {})[c] = table
            if len(built[k]) == len(plans[k].chunks):
                parts = built.pop(k)
                write_parquet(pa.concat_tables([parts[c] for c in sorted(parts)]), plans[k].path, metadata,
                              row_group_size=256, compression=SHARD_COMPRESSION)
            yield table.num_rows
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _build_in_parallel(chunks: list, builder: Augmenter, pool: ProcessPoolExecutor) -> Iterator[tuple[int, pa.Table]]:
    """Yields ``(index, table)`` for every chunk, built by ``builder`` here and by the pool's workers.

    All chunks go to the pool at once, which hands them to its processes in order as they
    free up; this process takes chunks from the far end (a chunk not yet handed out can be
    cancelled). When the two ends meet, each worker has a chunk or two left (the pool hands
    out one call more than it has processes).
    """
    try:
        futures = [pool.submit(_build_chunk, chunk) for chunk in chunks]
        index = {future: i for i, future in enumerate(futures)}
        remaining = set(futures)

        def finished():
            done, _ = wait(remaining, timeout=0)
            remaining.difference_update(done)
            return [(index[f], f.result()) for f in done]

        for i in reversed(range(len(chunks))):
            if not futures[i].cancel():
                break  # a worker has it, and every chunk before it
            remaining.discard(futures[i])
            yield i, builder.build(chunks[i])
            yield from finished()
        while remaining:
            wait(remaining, return_when=FIRST_COMPLETED)
            yield from finished()
    except BrokenProcessPool:
        hint = ("from a Python script, call energytools under `if __name__ == \"__main__\":`, as multiprocessing "
                "requires" if START_METHOD == "spawn" else "was it killed, or out of memory?")
        raise UserError(f"an augment worker process died (any error it printed is above); {hint}") from None


def augment(cfg: AugmentConfig) -> Path:
    """Write HE-DA shards for the selected samples; returns the shard directory."""
    cfg.check()
    out = Path(cfg.out)
    if (out / MANIFEST).exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds HE-DA shards (pass --overwrite to replace them)")
    table, meta = load_table(cfg.scores, TABLE_COLUMNS)
    if meta.get("split") != "train":
        raise UserError(f"{cfg.scores} scores the {meta.get('split')} split; augment needs a train table")
    data = DataConfig.from_options(meta["dataset"]["options"])
    dataset = data.build("train")
    if dataset.fingerprint() != meta["dataset"]["fingerprint"]:
        raise UserError(f"{cfg.scores} was computed on another dataset than {data.dataset} as it is on this "
                        "machine (fingerprints differ)")
    builder = Augmenter(cfg, dataset, table, meta)
    chosen, selected_ids = builder.selection, builder.selected_ids
    console.print(describe_selection(chosen, table.height))
    jobs = [(i, c) for i in range(len(selected_ids)) for c in range(cfg.copies)]
    n_shards = (len(jobs) + cfg.shard_size - 1) // cfg.shard_size
    names = [f"shard-{k:05d}-of-{n_shards:05d}.parquet" for k in range(n_shards)]
    table_sha = sha256_file(cfg.scores)
    resolved = cfg.content()
    plan_key = hashlib.sha256(json.dumps([resolved, table_sha], sort_keys=True).encode()).hexdigest()
    metadata = {"kind": "he-da", "config": resolved, "versions": {**versions(), "torch_threads": SCORING_THREADS},
                # the table's hash, not its path: where files live does not change the shards' bytes
                "scores": {"sha256": table_sha, "dataset": meta["dataset"]},
                "teacher": meta["teacher"], "groups": meta["groups"], "temperatures": meta["temperatures"]}
    started = time.perf_counter()
    ctx = context()
    ctx.check_same(resolved, "augment config")
    if n_shards < ctx.world:
        raise UserError(f"{len(jobs)} augmented samples make {n_shards} shard(s), fewer than the {ctx.world} ranks")
    # under torchrun rank r writes shards r, r + world, ...; rank 0 alone locks and writes the manifest
    with run_lock(out) if ctx.is_main else contextlib.nullcontext():
        plan_file = out / ".plan"
        if ctx.is_main:
            if out.exists() and (cfg.overwrite or not plan_file.exists() or plan_file.read_text() != plan_key):
                if any(out.iterdir()) and not cfg.overwrite and not plan_file.exists():
                    raise UserError(f"{out} exists and is not an energytools shard directory")
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            remove_partial_files(out)  # a killed run's half-written shard; this process holds the lock
            plan_file.write_text(plan_key)
        ctx.barrier()
        mine = [k for k in range(n_shards) if k % ctx.world == ctx.rank]
        todo = [ShardPlan.make(out / names[k], jobs[k * cfg.shard_size:(k + 1) * cfg.shard_size], cfg.batch_size)
                for k in mine if not (out / names[k]).exists()]
        if len(todo) < len(mine):
            console.print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already written")
        # the pool before the progress bar, whose refresh thread must not exist when workers fork
        with start_workers(cfg.workers - 1 if todo else 0, builder) as pool, progress_bar() as progress:
            total = sum(len(jobs[k * cfg.shard_size:(k + 1) * cfg.shard_size]) for k in mine)
            task = progress.add_task(f"augment ({cfg.policy})", total=total,
                                     completed=total - sum(plan.rows for plan in todo), info="")
            for count in write_shards(todo, metadata, builder, pool):
                progress.update(task, advance=count)
        ctx.barrier()
        if not ctx.is_main:
            return out
        manifest = {**metadata, "shards": names, "rows": len(jobs),
                    "selection": {"ratio": cfg.ratio, "select": cfg.select, "per_class": cfg.per_class,
                                  "count": len(selected_ids), "seed": cfg.seed,
                                  "energy_min": float(chosen["energy"].min()),
                                  "energy_max": float(chosen["energy"].max())}}
        write_parquet(chosen.select("sample_id", "label", "energy"), out / "selection.parquet",
                      {"kind": "selection", **manifest["selection"], "scores": metadata["scores"]})
        write_json(out / MANIFEST, manifest)
        plan_file.unlink()
    console.print(headline("done", f": wrote {len(jobs)} augmented samples in {n_shards} shard(s) to {out} "
                                    f"in {time.perf_counter() - started:.1f}s"))
    return out


def select(scores: str, out: str | None, ratio: float, mode: str = "high", per_class: bool = False,
           seed: int = 0, overwrite: bool = False) -> pl.DataFrame:
    """`energytools select`: the selection alone, optionally written as a Parquet file of ids."""
    table, meta = load_table(scores, ["sample_id", "label", "energy"])
    chosen = select_samples(table, ratio, mode, per_class, seed)
    console.print(describe_selection(chosen, table.height))
    if out:
        if Path(out).exists() and not overwrite:
            raise UserError(f"{out} already exists (pass --overwrite to replace it)")
        write_parquet(chosen, out, {"kind": "selection", "ratio": ratio, "select": mode, "per_class": per_class,
                                    "seed": seed, "count": chosen.height, "scores": {"path": scores}})
    return chosen
