"""Score throughput with 1 and 2 processes (torchrun, one thread each) on this machine.

    python benchmarks/scale_score.py [--limit 20000] [--json out.json]

Target: 2 processes >= 1.7x the samples/s of 1 process.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import benchmark_teacher, emit
from energytools.config import DataConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="default: the whole train split")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    teacher = benchmark_teacher(work / "teacher.pt", limit=args.limit)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seconds = {1: float("inf"), 2: float("inf")}
    for repeat, nproc in enumerate((1, 2, 1, 2)):  # alternated, best of two: this machine is noisy
        out = work / f"scores-{repeat}.parquet"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        "-m", "energytools", "score", "--teacher", str(teacher), "--out", str(out), "--part-size",
                        "1024", "--device", "cpu"], check=True, env=env, capture_output=True)
        seconds[nproc] = min(seconds[nproc], time.perf_counter() - started)
    samples = DataConfig(dataset="fashion-mnist", limit=args.limit).build("train").__len__()
    figures = {"samples": samples, "one_process_per_s": samples / seconds[1],
               "two_processes_per_s": samples / seconds[2], "speedup": seconds[1] / seconds[2],
               "target": ">= 1.7", "note": "wall time of the whole command, process start-up included"}
    emit("scale_score", figures, args.json)


if __name__ == "__main__":
    main()
