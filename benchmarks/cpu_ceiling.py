"""How far this machine itself scales: a bare resnet20 forward loop in 1 process vs 2 at once.

    python benchmarks/cpu_ceiling.py [--batches 12]

One torch thread per process, as the augment stage's processes use. The printed ratio is the
most any 2-process stage can gain here, before its own overheads.
"""
import argparse
import multiprocessing
import time

import torch

from energytools.models import create_model


def forward_seconds(batches: int) -> float:
    torch.set_num_threads(1)
    model = create_model("resnet20", 10, 1, 28).eval()
    images = torch.randn(256, 1, 28, 28)
    with torch.no_grad():
        model(images)  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            model(images)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        one = pool.apply(forward_seconds, (args.batches,))
        both = pool.map(forward_seconds, [args.batches] * 2)
    print(f"1 process: {one:.2f} s; 2 processes at once: {both[0]:.2f} s, {both[1]:.2f} s; "
          f"throughput ratio {2 * one / max(both):.2f}")


if __name__ == "__main__":
    main()
