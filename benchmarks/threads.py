"""What torch's thread count costs when two processes share the CPUs (`energytools --threads`).

    python benchmarks/threads.py [--limit 10000] [--epochs 3] [--threads 2,1] [--neighbour-seconds 900]
        [--write docs/benchmarks.md] [--json OUT]
    python benchmarks/threads.py --smoke      # a few seconds: 256 digits, cnn_tiny, one thread, one epoch

One training run (energytools' `train`, cnn_small on a Fashion-MNIST subset, no augmentation
workers) is timed per epoch at each thread count, first alone, then beside a busy neighbour:
another process training the same model on random data with the same thread count, what a
second `energytools` job on the machine is. idle OpenMP threads spin-wait before they sleep,
so two processes whose thread counts add up to more than the CPUs they share slow each other
by more than the factor of two their share would explain. The default count (what
`energytools` uses without `--threads` or OMP_NUM_THREADS: the CPUs this process may use) is
measured first, then the fewer ones asked for.

The figure per row is the fastest timed epoch (the first, warm-up, epoch is left out where
there are more), and "slowdown" is beside / alone. The neighbour is one process for the whole
run: it waits while a run is timed alone, is told its thread count before a run is timed beside
it, and ends on its own after --neighbour-seconds (or when this script goes away), so it never
outlives the measurement by more than that bound.
"""
from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from energytools import threads as thread_count  # standard library only: torch comes later (see main)

HERE = Path(__file__).resolve()


# --- the neighbour: a bounded busy process, steered through its stdin --------------------------------

def neighbour(seconds: float, model_name: str, image_size: int, channels: int) -> None:
    """Train ``model_name`` on random data until told to stop, the stdin closes or ``seconds``
    pass. Commands, one a line: ``run N`` (train with N threads), ``pause``, ``stop``; each
    is answered ``ok`` on stdout once it holds."""
    import torch
    import torch.nn.functional as F

    from energytools.models import create_model

    deadline = time.monotonic() + seconds
    state = {"run": False, "threads": torch.get_num_threads(), "stop": False}
    changed = threading.Event()

    def read_commands():
        for line in sys.stdin:
            word, *rest = line.split()
            if word == "run":
                state.update(run=True, threads=int(rest[0]))
            elif word == "pause":
                state["run"] = False
            else:
                break
            changed.set()
        state["stop"] = True  # "stop", or the parent went away
        changed.set()

    threading.Thread(target=read_commands, daemon=True).start()
    model = create_model(model_name, 10, channels, image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(64, channels, image_size, image_size), torch.randint(0, 10, (64,))
    print("ok", flush=True)
    while not state["stop"] and time.monotonic() < deadline:
        if changed.is_set():
            changed.clear()
            torch.set_num_threads(state["threads"])
            print("ok", flush=True)
        if not state["run"]:
            changed.wait(0.05)
            continue
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


class Neighbour:
    """The neighbour process, from the measuring side. It starts (imports torch) while this
    process does the same; :meth:`ready` waits for it, before anything is timed."""

    def __init__(self, seconds: float, model_name: str, image_size: int, channels: int):
        self.process = subprocess.Popen(
            [sys.executable, str(HERE), "--as-neighbour", "--neighbour-seconds", str(seconds), "--model", model_name,
             "--image-size", str(image_size), "--channels", str(channels)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def ready(self) -> None:
        self._answer(timeout=180)  # torch imported, the model built

    def _answer(self, timeout: float = 60) -> None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready or self.process.stdout.readline().strip() != "ok":
            ended = self.process.poll() is not None
            self.close()
            raise SystemExit("the neighbour process ended (its --neighbour-seconds bound passed) before the "
                             "measurement did: raise the bound" if ended else "the neighbour process did not answer")

    def tell(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("stop\n")
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# --- the measured run ----------------------------------------------------------------------------------

def epoch_seconds(cfg_kwargs: dict, threads: int, work: Path) -> float:
    """Seconds of the fastest timed epoch of one energytools training run with ``threads`` threads."""
    from energytools.config import DataConfig, TrainConfig, TrainStageConfig
    from energytools.stages.train import train

    out = Path(tempfile.mkdtemp(dir=work))
    cfg = TrainStageConfig(model=cfg_kwargs["model"], out=str(out), data=DataConfig(**cfg_kwargs["data"]),
                           train=TrainConfig(device="cpu", seed=0, **cfg_kwargs["train"]))
    with thread_count.using(threads):
        result = train(cfg)
    seconds = result.metrics["seconds"].to_list()
    return min(seconds[1:] or seconds)


def measure(counts: list[int], cfg_kwargs: dict, mate: Neighbour) -> list[dict]:
    rows, work = [], Path(tempfile.mkdtemp())
    try:
        mate.ready()
        for threads in counts:
            mate.tell("pause")
            alone = epoch_seconds(cfg_kwargs, threads, work)
            mate.tell(f"run {threads}")
            beside = epoch_seconds(cfg_kwargs, threads, work)
            rows.append({"threads": threads, "alone_s": alone, "beside_s": beside, "slowdown": beside / alone})
            print(f"{threads} thread(s): {alone:.2f} s/epoch alone, {beside:.2f} s beside a neighbour with as many "
                  f"({beside / alone:.2f}x)", flush=True)
    finally:
        mate.close()
    return rows


def table_lines(rows: list[dict], default: int, cpus: int, description: str) -> list[str]:
    from common import command, machine

    lines = [f"`{command()}` ({machine()}; {description}; the CPUs this process may use: {cpus}).", "",
             "| torch threads per process | alone, s/epoch | beside a neighbour, s/epoch | slowdown |",
             "|---|---|---|---|"]
    for row in rows:
        name = f"{row['threads']} (default)" if row["threads"] == default else str(row["threads"])
        lines.append(f"| {name} | {row['alone_s']:.2f} | {row['beside_s']:.2f} | **{row['slowdown']:.2f}** |")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="256 digits, cnn_tiny, one epoch, one thread: checks "
                        "that the script runs")
    parser.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST training samples")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is left out)")
    parser.add_argument("--threads", default=None,
                        help="the fewer thread counts to compare with the default (comma-separated; default: half "
                             "the CPUs and 1)")
    parser.add_argument("--neighbour-seconds", type=float, default=None,
                        help="the neighbour ends after this many seconds whatever happens (default: 900; smoke: 120)")
    parser.add_argument("--write", type=Path, help="replace this script's block in a Markdown file with the table")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    # the neighbour's own options (the script runs itself as the neighbour)
    parser.add_argument("--as-neighbour", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="cnn_small", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=28, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_neighbour:
        neighbour(args.neighbour_seconds, args.model, args.image_size, args.channels)
        return
    cpus = thread_count.available_cpus()
    fewer = ([int(n) for n in args.threads.split(",")] if args.threads else [max(1, cpus // 2), 1])
    counts = list(dict.fromkeys([cpus, *fewer]))  # the default first, each count once
    if args.smoke:
        cfg_kwargs = {"model": "cnn_tiny", "data": {"dataset": "digits", "limit": 256, "eval_limit": 64},
                      "train": {"epochs": 1, "batch_size": 64}}
        shape, description = (8, 1), "256 digits, cnn_tiny, one epoch, one thread (smoke: the figures mean nothing)"
        counts = [1]
    else:
        cfg_kwargs = {"model": "cnn_small", "data": {"dataset": "fashion-mnist", "limit": args.limit},
                      "train": {"epochs": args.epochs, "batch_size": 64}}
        shape, description = (28, 1), (f"cnn_small, batch 64, {args.limit} Fashion-MNIST training images, the "
                                       f"fastest of epochs 2..{args.epochs} with eval passes; the neighbour trains "
                                       "cnn_small on random data with the same thread count")
    started = time.perf_counter()
    mate = Neighbour(args.neighbour_seconds or (120 if args.smoke else 900), cfg_kwargs["model"], *shape)
    from common import emit, replace_block  # torch and energytools, imported while the neighbour starts

    rows = measure(counts, cfg_kwargs, mate)
    lines = table_lines(rows, cpus, cpus, description)
    print("\n".join(lines))
    figures = {"cpus": cpus, "default_threads": cpus, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    emit("threads", figures, args.json)
    if args.write:
        replace_block(args.write, "threads", "\n".join(lines))


if __name__ == "__main__":
    main()
