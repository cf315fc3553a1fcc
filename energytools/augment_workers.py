"""Writing HE-DA shards with worker processes: the unit of work is a chunk of jobs (one teacher
batch), built by this process and by a pool of workers, and a shard is written atomically as
soon as its last chunk is in. Every chunk is a pure function of its jobs, so the bytes do not
depend on who builds it or on --workers.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import torch

from .augmenter import Augmenter
from .config import AugmentConfig
from .data.shards import shard_compression
from .errors import UserError
from .table import write_parquet


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
