"""Size and speed of the students against their teacher: `energytools profile` on the quickstart's
runs (trained here, or reused from --runs) and on a resnet32x4 -> resnet8x4 pair with random
weights (CIFAR-100 shaped, speed only: their accuracy means nothing), each student exported to ONNX
first; the block goes into docs/benchmarks.md with the command, the machine, the date and the load
average (a machine that was not quiet is said to be so).

    python benchmarks/profile_students.py --runs runs/quickstart --doc docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import os
from datetime import date
from pathlib import Path

import torch

from common import command, emit, replace_block
from energytools.data import DatasetInfo
from energytools.deploy import machine_record, write_onnx
from energytools.io import sha256_file
from energytools.models import create_model, save_checkpoint
from energytools.pipeline import run_pipeline
from energytools.stages.export import export
from energytools.stages.profile import ProfileProtocol, profile

#: CIFAR-100 as a checkpoint records it (no files needed: the pair is timed on random inputs)
CIFAR100 = DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                       classes=tuple(str(i) for i in range(100)))


def random_pair(root: Path) -> list[Path]:
    """resnet32x4 (teacher) and resnet8x4 (student) with random weights, as run directories."""
    paths = []
    for arch in ("resnet32x4", "resnet8x4"):
        torch.manual_seed(0)
        directory = root / f"random-{arch}"
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"arch": arch, "num_classes": 100, "in_channels": 3, "image_size": 32,
                "dataset_info": CIFAR100.to_dict(), "normalization": {"mean": CIFAR100.mean, "std": CIFAR100.std}}
        model = create_model(arch, 100, 3, 32).eval()
        save_checkpoint(directory / "best.pt", model, meta)
        # no validation images to check on (export's check needs a dataset): written with the same core
        write_onnx(model, torch.zeros(2, 3, 32, 32), directory / "student.onnx",
                   {"source_sha256": sha256_file(directory / "best.pt")})
        paths.append(directory)
    return paths


def export_beside(run: Path) -> None:
    """student.onnx beside the run's best.pt (checked on its validation images)."""
    if not (run / "student.onnx").exists():
        export(run, run / "student.onnx", check_samples=256)


def table(frame, batches) -> list[str]:
    head = ["model", "role", "test %", "params", "MMACs", "best.pt MB"]
    head += [f"{k} b{b} ms (IQR)" for b in batches for k in ("eager", "onnx")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in frame.iter_rows(named=True):
        cells = [f"{r['run']} ({r['arch']})", r["role"], "—" if r["test_acc"] is None else f"{r['test_acc']:.2f}",
                 f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}", f"{r['checkpoint_mb']:.2f}"]
        for b in batches:
            for k in ("eager", "onnx"):
                ms = r.get(f"{k}_b{b}_ms")
                cells.append("—" if ms is None else f"{ms:.2f} ({r[f'{k}_b{b}_iqr_ms']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/quickstart"), help="the quickstart's output "
                        "(trained with pipelines/quickstart.toml when missing)")
    parser.add_argument("--work", type=Path, default=Path("runs/profile-students"))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--doc", type=Path, default=None, help="write the block into this Markdown file")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run_pipeline(Path(__file__).resolve().parent.parent / "pipelines" / "quickstart.toml", args.runs)
    students = sorted(p for p in (args.runs / "runs").iterdir() if (p / "best.pt").exists())
    for run in students:
        export_beside(run)
    protocol = ProfileProtocol((1, 64), args.warmup, args.repeats, args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    quick = profile(students, args.work / "quickstart.parquet", protocol=protocol, overwrite=True)
    pair = random_pair(args.work)
    cifar = profile(pair, args.work / "random-pair.parquet", teacher=False, protocol=protocol, overwrite=True)
    machine = machine_record(int(quick["threads"][0]))
    load = machine["load_average"]
    # read after the timing, the load average includes this script's own threads
    quiet = load is not None and load[0] <= machine["torch_threads"] + 0.5
    lines = [f"Command: `{command()}`  ",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch thread(s), "
             f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; date {date.today()}; load average "
             f"{load} {'(quiet: no more than this script’s own threads)' if quiet else '(NOT quiet: other jobs shared the CPU, so latencies are noisy)'}.  ",
             f"Protocol: {protocol.warmup} warm-up calls, then the median and interquartile range of "
             f"{protocol.runs} timed calls; float32 on the CPU; MACs = FLOPs / 2 (torch.utils.flop_counter) for one "
             "image.", "",
             "Quickstart (Fashion-MNIST subset, pipelines/quickstart.toml; students exported to ONNX and checked "
             "on 256 validation images):", "", *table(quick, protocol.batch_sizes), "",
             "resnet32x4 -> resnet8x4 with random weights (CIFAR-100 shaped 3x32x32 inputs; speed only, no "
             "accuracy; ONNX written without the validation check):", "", *table(cifar, protocol.batch_sizes)]
    body = "\n".join(lines)
    print(body)
    emit("profile students", {"quickstart": quick.to_dicts(), "random_pair": cifar.to_dicts(),
                              "load_average": load}, args.json)
    if args.doc:
        replace_block(args.doc, "profile students", "### Students against their teacher: size and latency\n\n"
                      + body)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
