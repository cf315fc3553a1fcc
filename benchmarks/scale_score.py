"""Score throughput with 1 and 2 processes (torchrun) on this machine, and where the time goes.

    python benchmarks/scale_score.py [--limit 20000] [--repeats 3] [--threads-per-rank 1] [--json out.json]

Each configuration runs ``--repeats`` times, alternated (1, 2, 1, 2, ...), and the best run of
each counts: other jobs on a shared machine only ever slow a run down. Every rank gets
``--threads-per-rank`` torch/OpenMP threads (OMP_NUM_THREADS), so 2 ranks of 1 thread use 2
cores. Two figures: the whole command (process start-up, imports, process group, merge and
final write included) and the stage's own time between the teacher being loaded and the table
written (what the stage prints as "done ... in Xs"), whose ratio is what more ranks can speed
up. The load average before and after is recorded: on a machine shared with other jobs a
figure under the target may be the machine's, not the code's.

Target: 2 processes >= 1.7x the samples/s of 1 process.
"""
import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import benchmark_teacher, emit
from energytools.config import DataConfig


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(teacher: Path, out: Path, nproc: int, threads: int) -> tuple[float, float, float]:
    """(wall seconds, the stage's own seconds, CPU seconds of all its processes) of one scoring command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cpu = cpu_of_children()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc}", "-m", "energytools", "score", "--teacher", str(teacher),
                             "--out", str(out), "--device", "cpu"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    stage = float(re.search(r"\(\d+ rows\) in ([\d.]+)s", result.stderr + result.stdout).group(1))
    return wall, stage, cpu_of_children() - cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="default: the whole train split")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; the best counts")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    teacher = benchmark_teacher(work / "teacher.pt", limit=args.limit)
    load_before = os.getloadavg()
    wall = {1: [], 2: []}
    stage = {1: [], 2: []}
    cpu = {1: [], 2: []}
    for repeat in range(args.repeats):
        for nproc in (1, 2):
            w, s, c = run(teacher, work / f"scores-{nproc}-{repeat}.parquet", nproc, args.threads_per_rank)
            wall[nproc].append(w)
            stage[nproc].append(s)
            cpu[nproc].append(c)
    load_after = os.getloadavg()
    samples = len(DataConfig(dataset="fashion-mnist", limit=args.limit).build("train"))
    best = {n: min(wall[n]) for n in wall}
    best_stage = {n: min(stage[n]) for n in stage}
    cores = os.cpu_count()
    figures = {"samples": samples, "repeats": args.repeats, "threads_per_rank": args.threads_per_rank,
               "cores": cores, "cores_per_rank_at_2": cores / 2,
               "one_process_per_s": samples / best[1], "two_processes_per_s": samples / best[2],
               "speedup": best[1] / best[2], "stage_speedup": best_stage[1] / best_stage[2],
               "startup_and_teardown_s": {n: best[n] - best_stage[n] for n in best},
               "wall_s": wall, "stage_s": stage, "cpu_s": cpu,
               # cores the command got on average: at most nproc x threads; less means other jobs had them
               "cores_used": {n: [c / w for c, w in zip(cpu[n], wall[n])] for n in wall},
               "load_average_before": load_before, "load_average_after": load_after,
               "target": ">= 1.7",
               "note": "speedup: whole commands (start-up included); stage_speedup: scoring, merge and write only; "
                       "best of the repeats, alternated"}
    emit("scale_score", figures, args.json)


if __name__ == "__main__":
    main()
