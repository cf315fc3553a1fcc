"""`energytools augment`: select high-energy samples and materialize HE-DA shards.

The job list is (source_id, copy) for every selected sample in sample_id order; shard k
holds jobs [k * shard_size, (k + 1) * shard_size). Each job is seeded from
(seed, source_id, copy), so the bytes of every shard are the same whatever the number of
workers. Shards are written atomically as they finish; a killed run writes only the
missing ones; the manifest is written last and marks the directory complete.
"""
from __future__ import annotations

import contextlib
import json
import os
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

from ..config import AugmentConfig, SelectConfig, content_of
from ..console import console, headline, progress_bar
from ..data.base import ArrayImages, ImageSet
from ..data.shards import MANIFEST, SHARD_SCHEMA, encode_png, huggingface_metadata, shard_name
from ..distributed import context
from ..energy import logit_statistics
from ..errors import UserError
from ..io import check_output_free, check_output_path, sha256_file, sha256_json, write_json
from ..policies import make_policy
from ..preemption import Stopped, stop_requested
from ..resume import resumable_parts
from ..selection import describe_selection, select_samples
from ..table import TableMeta, load_table, versions, write_parquet
from ..teacher import check_logits, open_table_teacher
from ..view_logits import logits_array, score_views

#: an augmented sample's id: this bit set (far above any dataset's own ids), a namespace drawn
#: from the shard directory's content key, and (source_id * copies + copy) in the low bits, so
#: two shard directories made from one table with other options have disjoint ids
AUG_ID_FLAG = 1 << 62
NAMESPACE_BITS, INDEX_BITS = 21, 41


def augmented_ids(namespace: int, source_ids: np.ndarray, copies: int, copy: np.ndarray) -> np.ndarray:
    index = np.asarray(source_ids, dtype=np.int64) * copies + np.asarray(copy, dtype=np.int64)
    if len(index) and index.max() >= 1 << INDEX_BITS:
        raise UserError(f"sample ids up to {int(np.max(source_ids))} with {copies} copies do not fit HE-DA's ids")
    return AUG_ID_FLAG | (namespace << INDEX_BITS) | index


#: the shard layout's version: a partial directory of another layout is not resumed (2: per-view columns)
SHARD_FORMAT = 2
#: the score table's columns this stage reads
TABLE_COLUMNS = ["sample_id", "label", "energy"]


class Augmenter:
    """Builds augmented, scored rows; one per process (dataset, teacher and policy load once)."""

    def __init__(self, cfg: AugmentConfig, dataset: ImageSet, table: pl.DataFrame, meta: TableMeta, namespace: int):
        try:
            import cv2

            cv2.setNumThreads(0)  # one process per core: OpenCV's own threads would only compete
        except ImportError:
            pass
        self.cfg, self.dataset, self.meta, self.namespace = cfg, dataset, meta, namespace
        self.selection = select_samples(table, cfg.ratio, cfg.select, cfg.per_class, cfg.seed)
        self.selected_ids = self.selection["sample_id"].to_numpy()
        self.groups = meta.fit_groups(table)
        position_of = {int(s): i for i, s in enumerate(dataset.sample_ids)}
        self.positions = np.array([position_of[int(s)] for s in self.selected_ids], dtype=np.int64)
        self.labels = dataset.labels[self.positions]
        self.policy = make_policy(cfg.policy)
        self.teacher = open_table_teacher(meta, dataset, cfg.teacher, cfg.teacher_arch, "cpu",
                                          cfg.preprocessing.given())

    @classmethod
    def open(cls, cfg: AugmentConfig, namespace: int) -> "Augmenter":
        """What a spawned worker does: load ``cfg.scores`` and its dataset itself (the selection
        is a pure function of the table, so recomputing it keeps the start-up arguments small)."""
        table, meta = load_table(cfg.scores, TABLE_COLUMNS)
        return cls(cfg, meta.data.build("train"), table, meta, namespace)

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
            rows["sample_id"].append(int(augmented_ids(self.namespace, [source_id], self.cfg.copies, [copy])[0]))
            rows["source_id"].append(source_id)
            rows["partner_id"].append(None if partner is None else int(self.selected_ids[partner]))
            rows["lam"].append(result.lam)
            rows["label"].append(int(self.labels[index]))
            rows["partner_label"].append(int(self.labels[partner if partner is not None else index]))
            rows["aug"].append(self.policy.name)
            rows["aug_params"].append(json.dumps(result.params, sort_keys=True))
        stats, logits = self._score(np.stack(pixels), np.array(rows["label"]), np.array(rows["sample_id"]))
        groups, temps = self.groups.assign(stats["energy"], np.array(rows["sample_id"]))
        rows.update(energy=stats["energy"], confidence=stats["confidence"], energy_group=list(groups),
                    temperature=temps)
        table = pa.table({field.name: pa.array(rows[field.name], type=field.type) for field in SHARD_SCHEMA})
        for name, values in logits.items():
            table = table.append_column(name, logits_array(name, values))
        return table.replace_schema_metadata(huggingface_metadata(self.dataset.info.classes))

    @torch.no_grad()
    def _score(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray):
        info = self.dataset.info
        batch = torch.from_numpy(images).permute(0, 3, 1, 2)
        chunks, flipped = [], []
        for start in range(0, len(batch), self.cfg.batch_size):
            part = batch[start:start + self.cfg.batch_size]
            chunks.append(self.teacher.logits(part, info).cpu())
            if self.meta.has_logits and info.train_flip:
                flipped.append(self.teacher.logits(part.flip(-1), info).cpu())
        logits = torch.cat(chunks)
        check_logits(logits, torch.from_numpy(ids))
        stats = logit_statistics(logits, torch.from_numpy(labels), self.meta.energy_temperature)
        saved = {}
        if self.meta.has_logits:
            saved["logits"] = logits.half().numpy()
            if flipped:
                saved["logits_flipped"] = torch.cat(flipped).half().numpy()
        if self.meta.has_views:  # the table's K views of each new image, so distill can replay them too
            saved.update(self._score_views(images, labels, ids))
        return {k: v.numpy() for k, v in stats.items()}, saved

    def _score_views(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> dict:
        """Per-view columns of augmented images, drawn as score draws the dataset's (seed, sample_id, view)."""
        views = self.meta.views
        augmented = ImageSet(self.dataset.info, "he-da", ArrayImages(images), labels, ids)
        rendered = augmented.render_views(np.arange(len(ids)), np.broadcast_to(np.arange(views.count),
                                                                               (len(ids), views.count)), views.seed)[0]
        return score_views(self.teacher, rendered, torch.from_numpy(ids), self.dataset.info,
                           self.meta.energy_temperature, views.top_k, self.cfg.batch_size)


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


def leaf_columns(field: pa.Field, prefix: str = "") -> list[str]:
    """The Parquet leaf paths of a column ("image.bytes", "view_logits.list.element.list.element"):
    pyarrow matches per-column compression by these, and writes a column it does not match plain."""
    name, kind = prefix + field.name, field.type
    if pa.types.is_struct(kind):
        return [leaf for child in kind for leaf in leaf_columns(child, name + ".")]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return leaf_columns(pa.field("element", kind.value_type), name + ".list.")
    return [name]


def shard_compression(schema: pa.Schema) -> dict[str, str]:
    """zstd for every column but the PNG bytes, which are compressed already."""
    return {leaf: "none" if leaf == "image.bytes" else "zstd" for field in schema for leaf in leaf_columns(field)}


#: how worker processes start. On Linux they fork, as torch's DataLoader workers do: a forked
#: worker shares this process's dataset, teacher and policy and is ready at once. Elsewhere a
#: spawned worker imports torch and loads them itself (about 3.5 s).
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"

_WORKER: Augmenter | None = None  # the Augmenter a worker process builds chunks with
#: every augment process scores with this many threads: the count changes the last bits of the
#: logits, and the bytes must not depend on --workers
SCORING_THREADS = 1


def _init_worker(cfg: AugmentConfig, namespace: int, parent: int) -> None:
    global _WORKER
    torch.set_num_threads(SCORING_THREADS)
    if _WORKER is None:  # spawned
        _WORKER = Augmenter.open(cfg, namespace)
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
                               initargs=(builder.cfg, builder.namespace, os.getpid()))
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
                shard = pa.concat_tables([parts[c] for c in sorted(parts)])
                write_parquet(shard, plans[k].path, metadata, row_group_size=256,
                              compression=shard_compression(shard.schema))
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
    check_output_path(out, directory=True)
    finished = (out / MANIFEST).exists()
    if finished and not cfg.overwrite:
        raise UserError(f"{out} already holds HE-DA shards (pass --overwrite to replace them)")
    table, meta = load_table(cfg.scores, TABLE_COLUMNS)
    meta.require_train(cfg.scores, "augment")
    dataset = meta.data.build("train")
    if dataset.fingerprint() != meta.dataset.fingerprint:
        raise UserError(f"{cfg.scores} was computed on another dataset than {meta.data.dataset} as it is on this "
                        "machine (fingerprints differ)")
    table_sha = sha256_file(cfg.scores)
    resolved = cfg.content()
    plan_key = sha256_json([resolved, table_sha, SHARD_FORMAT])
    builder = Augmenter(cfg, dataset, table, meta, namespace=int(plan_key[:8], 16) % (1 << NAMESPACE_BITS))
    chosen, selected_ids = builder.selection, builder.selected_ids
    console.print(describe_selection(chosen, table.height, meta.dataset.classes))
    jobs = [(i, c) for i in range(len(selected_ids)) for c in range(cfg.copies)]
    n_shards = (len(jobs) + cfg.shard_size - 1) // cfg.shard_size
    names = [shard_name(k, n_shards) for k in range(n_shards)]
    shard_jobs = {name: jobs[k * cfg.shard_size:(k + 1) * cfg.shard_size] for k, name in enumerate(names)}
    recorded = meta.to_json()
    metadata = {"kind": "he-da", "config": resolved, "versions": {**versions(), "torch_threads": SCORING_THREADS},
                # the table's hash, not its path: where files live does not change the shards' bytes
                "scores": {"sha256": table_sha, "dataset": recorded["dataset"]},
                **{key: recorded[key] for key in ("teacher", "groups", "temperatures", "temperature_rule")}}
    started = time.perf_counter()
    ctx = context()
    ctx.check_same(resolved, "augment config")
    if n_shards < ctx.world:
        raise UserError(f"{len(jobs)} augmented samples make {n_shards} shard(s), fewer than the {ctx.world} ranks")
    # under torchrun rank r writes shards r, r + world, ...; rank 0 alone writes the manifest
    with resumable_parts(out, out, plan_key, names, restart=finished and cfg.overwrite) as work:
        todo = [ShardPlan.make(out / name, shard_jobs[name], cfg.batch_size) for name in work.todo]
        if len(work.todo) < len(work.mine):
            console.print(f"resuming: {len(work.mine) - len(work.todo)} of {len(work.mine)} shards already written")
        # the pool before the progress bar, whose refresh thread must not exist when workers fork
        with start_workers(cfg.workers - 1 if todo else 0, builder) as pool, progress_bar() as progress:
            total = sum(len(shard_jobs[name]) for name in work.mine)
            task = progress.add_task(f"augment ({cfg.policy})", total=total,
                                     completed=total - sum(plan.rows for plan in todo), info="")
            for count in write_shards(todo, metadata, builder, pool):
                progress.update(task, advance=count)
                signum = stop_requested()
                if signum is not None:  # the shards written so far stay; a half-built one is dropped
                    done = len(work.mine) - sum(not (out / name).exists() for name in work.mine)
                    raise Stopped(signum, f"{done} of {len(work.mine)} shards written to {out}; re-run the same "
                                          "command to resume")
        if not work.gather():
            return out
        manifest = {**metadata, "shards": names, "rows": len(jobs),
                    "selection": {"ratio": cfg.ratio, "select": cfg.select, "per_class": cfg.per_class,
                                  "count": len(selected_ids), "seed": cfg.seed,
                                  "energy_min": float(chosen["energy"].min()),
                                  "energy_max": float(chosen["energy"].max())}}
        write_json(out / MANIFEST, manifest)
    console.print(headline("done", f": wrote {len(jobs)} augmented samples in {n_shards} shard(s) to {out} "
                                    f"in {time.perf_counter() - started:.1f}s"))
    return out


def select(cfg: SelectConfig) -> pl.DataFrame:
    """`energytools select`: the selection alone, optionally written as a Parquet file of ids."""
    if cfg.out:
        check_output_free(cfg.out, cfg.overwrite)
    table, meta = load_table(cfg.scores, list(dict.fromkeys(["sample_id", "label", "energy", cfg.by])))
    chosen = select_samples(table, cfg.ratio, cfg.mode, cfg.per_class, cfg.seed, cfg.by)
    console.print(describe_selection(chosen, table.height, meta.dataset.classes, cfg.by))
    if cfg.out:
        config = content_of(cfg)
        write_parquet(chosen, cfg.out, {"kind": "selection", "config": config, "count": chosen.height,
                                        "scores": {"sha256": sha256_file(cfg.scores)}})
    return chosen
