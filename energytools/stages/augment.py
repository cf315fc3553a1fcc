"""`energytools augment`: select high-energy samples and materialize HE-DA shards.

The job list is (source_id, copy) for every selected sample in sample_id order; shard k
holds jobs [k * shard_size, (k + 1) * shard_size). Each job is seeded from
(seed, source_id, copy), so the bytes of every shard are the same whatever the number of
workers. Shards are written atomically as they finish; a killed run writes only the
missing ones; the manifest is written last and marks the directory complete.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..augment_workers import SCORING_THREADS, ShardPlan, start_workers, write_shards
from ..augmenter import NAMESPACE_BITS, SHARD_FORMAT, TABLE_COLUMNS, Augmenter
from ..config import AugmentConfig
from ..console import console, headline, progress_bar
from ..data.shards import MANIFEST, shard_name
from ..distributed import context
from ..errors import UserError, option_name
from ..io import check_output_path, sha256_file, sha256_json, write_json
from ..preemption import Stopped, stop_requested
from ..resume import resumable_parts
from ..selection import describe_selection
from ..table import load_table, versions


def augment(cfg: AugmentConfig) -> Path:
    """Write HE-DA shards for the selected samples; returns the shard directory."""
    cfg.check()
    out = Path(cfg.out)
    check_output_path(out, directory=True)
    finished = (out / MANIFEST).exists()
    if finished and not cfg.overwrite:
        raise UserError(f"{out} already holds HE-DA shards (pass {option_name('overwrite', True)} to replace them)")
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
    ctx = context("cpu")  # the augmented images are scored on the cpu (see Augmenter)
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
                    raise Stopped(signum, f"{done} of {len(work.mine)} shards written to {out}")
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
