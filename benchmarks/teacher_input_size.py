"""What a teacher's input size costs score (issue 31): a timm resnet18 teacher on 32x32 RGB
images, scored at its pretrained_cfg's 224x224 (the default) against the data's own size
(`--teacher-input-size data`), as a ratio in one run; writes its block into docs/benchmarks.md.

    python benchmarks/teacher_input_size.py [--samples 300] [--repeats 2] [--json out.json] [--no-doc]

Data: CIFAR-10's files and shapes (32x32 RGB, 10 classes), written with random pixels (no
CIFAR here; speed does not depend on the pixels). Teacher: timm resnet18 with 10 classes and
random weights, saved as a bare .safetensors state dict, so its preprocessing comes from timm's
pretrained_cfg (224x224, bicubic, ImageNet mean and std). Each side is the whole score stage
(loading, resizing, forward, statistics, table), best of ``--repeats``, the two sides
alternating so that drift on a shared machine hits both. (224/32)^2 = 49 times the pixels.
"""
import argparse
import os
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common import emit, machine, timed
from energytools.config import ScoreConfig, resolve
from energytools.data.synthetic import write_cifar

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- teacher input size: begin -->", "<!-- teacher input size: end -->"
NOTES = "\n## Notes\n"


def write_doc(figures: dict) -> None:
    """Replace this benchmark's block in docs/benchmarks.md (or put it first under Notes, which
    run_all.py keeps when it re-writes the figures)."""
    block = "\n".join([
        BEGIN,
        f"### A teacher's input size: 32x32 data scored at 224 or at 32 (issue 31), {date.today()}",
        "",
        f"`python benchmarks/teacher_input_size.py` ({machine()}). A timm resnet18 teacher (random "
        f"weights, 10 classes) scores {figures['samples']} CIFAR-shaped 32x32 RGB images: at its "
        "pretrained_cfg's 224x224 (what score does by default for a weights file with "
        "`--teacher-arch timm:resnet18`) and at the data's own size (`--teacher-input-size data`). "
        f"Whole score stage, best of {figures['repeats']} each, alternating; 1-minute load average "
        f"{figures['load_average_1min']:.1f} when it started (other work on the machine slows both sides).",
        "",
        "| teacher input | seconds | samples/s |",
        "|---|---|---|",
        f"| 224x224 (model config) | {figures['seconds_224']:.2f} | {figures['samples_per_s_224']:.1f} |",
        f"| 32x32 (`--teacher-input-size data`) | {figures['seconds_data']:.2f} | "
        f"{figures['samples_per_s_data']:.1f} |",
        "",
        f"**score at 224 / score at the data's size: {figures['ratio']:.1f}x the time.** The teacher's "
        f"own passes over the same images (resize, normalise, forward; no loading or writing) take "
        f"{figures['forward_seconds_224']:.2f} s against {figures['forward_seconds_data']:.2f} s: "
        f"**{figures['forward_ratio']:.1f}x**, the part that grows with the dataset ((224/32)^2 = "
        f"{figures['pixel_ratio']:.0f}x the pixels; a small input uses the cores less well). The stage's "
        "ratio is lower because loading the model and data and writing the table cost the same at "
        "either size; on a larger dataset it tends to the teacher's. Which size is right depends "
        "on the teacher: one fine-tuned at 224 needs 224; one fine-tuned on the data as it is needs "
        "`--teacher-input-size data`, and at 224 it would cost this much more and give logits it "
        "was never trained to give.",
        END])
    old = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    elif NOTES in old:
        head, rest = old.split(NOTES, 1)
        new = head + NOTES + "\n" + block + "\n" + rest
    else:
        new = old.rstrip("\n") + "\n" + NOTES + "\n" + block + "\n"
    DOC.write_text(new)


def teacher_pass(run, images, info, batch_size: int) -> None:
    """The teacher alone on every batch (resize, normalise, forward): what grows with the data."""
    for start in range(0, len(images), batch_size):
        run.logits(images[start:start + batch_size], info)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=300, help="CIFAR-10 training images written "
                        "(a multiple of 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    import timm
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp())
    root = write_cifar(work / "data", 10, args.samples, 10, np.random.default_rng(0))
    torch.manual_seed(0)
    teacher = work / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict(), teacher)
    common = {"teacher": str(teacher), "teacher_arch": "timm:resnet18", "dataset": "cifar10", "data_root": str(root),
              "batch_size": args.batch_size, "device": "cpu", "overwrite": True}
    from energytools.stages.score import score

    from energytools.teacher import open_teacher

    sides = (("224", {}), ("data", {"teacher_input_size": "data"}))
    dataset = resolve(ScoreConfig, common).data.build("train")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # uint8, as the loader gives them
    teachers = {side: open_teacher(str(teacher), dataset, "timm:resnet18", "cpu",
                                   overrides=resolve(ScoreConfig, {**common, **extra}).preprocessing.given())
                for side, extra in sides}
    for run in teachers.values():  # warm-up: the first pass at a shape sets up its kernels
        teacher_pass(run, images[:args.batch_size], dataset.info, args.batch_size)
    seconds, forward = {"224": [], "data": []}, {"224": [], "data": []}
    load = os.getloadavg()[0]  # a shared machine: how busy it was when the timing started
    for r in range(args.repeats):
        for side, extra in sides:
            cfg = resolve(ScoreConfig, {**common, **extra, "out": str(work / f"scores-{side}-{r}.parquet")})
            seconds[side].append(timed(score, cfg)[1])
            forward[side].append(timed(teacher_pass, teachers[side], images, dataset.info, args.batch_size)[1])
    from energytools.table import TableMeta

    samples = TableMeta.read(work / "scores-data-0.parquet").dataset.size
    sizes = {side: TableMeta.read(work / f"scores-{side}-0.parquet").teacher.preprocessing["input_size"]
             for side in seconds}
    assert sizes == {"224": [224, 224], "data": [32, 32]}, sizes
    best = {side: min(values) for side, values in seconds.items()}
    figures = {"samples": samples, "repeats": args.repeats, "seconds_224": best["224"], "seconds_data": best["data"],
               "samples_per_s_224": samples / best["224"], "samples_per_s_data": samples / best["data"],
               "ratio": best["224"] / best["data"], "pixel_ratio": (224 / 32) ** 2,
               "forward_seconds_224": min(forward["224"]), "forward_seconds_data": min(forward["data"]),
               "forward_ratio": min(forward["224"]) / min(forward["data"]), "load_average_1min": load}
    emit("teacher_input_size", figures, args.json)
    if not args.no_doc:
        write_doc(figures)


if __name__ == "__main__":
    main()
