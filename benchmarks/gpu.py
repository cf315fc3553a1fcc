"""Score and distill on CUDA when there is one (images/s, and the ratio to a bare loop), and the
AMP path's energy error against float32; on a machine without CUDA the same on the CPU.

    python benchmarks/gpu.py [--device auto] [--samples 20000] [--views 2] [--json out.json]
    python benchmarks/gpu.py --smoke          # the CPU fallback in a minute (tests run it)

Data: CIFAR-100's files and shapes (32x32 RGB, pad-4 crop + flip) with random pixels; teacher
resnet32x4, student resnet8x4 with random weights (speed does not depend on them), unless
--teacher gives a checkpoint (then its dataset is scored, and the AMP figures mean something
for a trained model).

- score: the stage with --views K (float32, TF32 off) against a bare loop running the same
  teacher on the same (1 + K) x N images already on the device, in the same precision;
- AMP: the energies of --amp (bf16 autocast on cuda; on the CPU, bf16 CPU autocast as a
  stand-in, since the stage's autocast is cuda-only) against float32 on the same teacher and
  data: max and mean absolute error, and how many samples change energy group;
- distill: kd on cached views (the teacher never runs) against a bare loop doing the same on
  the device: random stored view, crop + flip, its logits, the student's step.
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import energytools.engine as engine
from common import EPOCH_STARTS, start_clock, emit
from energytools.config import DataConfig, TrainConfig
from energytools.data.synthetic import write_cifar
from energytools.data.transforms import normalize
from energytools.data.views import TrainTransform, crop_flip, draw_views
from energytools.energy import energy
from energytools.engine import autocast, model_meta, resolve_device
from energytools.models import create_model, load_model, save_checkpoint
from energytools.stages.distill import DistillConfig, distill
from energytools.stages.score import ScoreConfig, score
from energytools.table import load_table
from energytools.view_logits import read_views


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, images: torch.Tensor, info, device, batch_size: int, amp_dtype=None) -> tuple[float, torch.Tensor]:
    """Seconds to run ``model`` over uint8 ``images`` already on the device, and the energies."""
    out = []
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = normalize(images[i:i + batch_size], info)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if amp_dtype is None:
                logits = model(x)
            else:
                with torch.autocast(device.type, dtype=amp_dtype):
                    logits = model(x)
            out.append(energy(logits.float()))
    sync(device)
    return time.perf_counter() - started, torch.cat(out).cpu()


def group_flips(reference: np.ndarray, other: np.ndarray, ids: np.ndarray, rule) -> int:
    """Samples whose energy group differs when each energy set is grouped by its own quantiles."""
    a = rule.fit(reference, ids).assign(reference, ids)[0]
    b = rule.fit(other, ids).assign(other, ids)[0]
    return int((a != b).sum())


def bare_distill(student, images, labels, stored, params, count, info, device, epochs, batch_size, amp) -> float:
    """Seconds per epoch of kd on stored views in plain PyTorch, everything on the device: as a
    careful user writes it, the view boxes go to the device once, each epoch's order and views
    in one pinned non-blocking copy, and a step indexes on the device (no host-to-device copy
    and no host read per step)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    pad = info.train_crop_pad
    transform = TrainTransform("pad-crop", info.image_size, True, pad)
    boxes = type(params)(*(torch.from_numpy(np.asarray(getattr(params, name))).to(device)
                           for name in ("top", "left", "height", "width", "flip")))
    n, stamps = len(images), []
    for epoch in range(epochs):
        sync(device)
        stamps.append(time.perf_counter())
        generator = torch.Generator().manual_seed(epoch)
        drawn = torch.stack([torch.randperm(n, generator=generator), torch.randint(0, count, (n,), generator=generator)])
        if device.type == "cuda":
            drawn = drawn.pin_memory()
        order, views = drawn.to(device, non_blocking=True)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            v = views[index]
            flat = index * count + v
            chosen = type(params)(boxes.top[flat], boxes.left[flat], boxes.height[flat], boxes.width[flat],
                                  boxes.flip[flat])
            x = normalize(crop_flip(images[index], chosen, transform), info)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            teacher_logits = stored[index, v].float()
            with autocast(device, amp):
                logits = student(x)
                log_p_s = F.log_softmax(logits.float() / 4, dim=1)
                log_p_t = F.log_softmax(teacher_logits / 4, dim=1)
                loss = 0.1 * F.cross_entropy(logits.float(), labels[index]) + \
                    0.9 * 16 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)
    stamps.append(time.perf_counter())
    return (stamps[-2] - stamps[1]) / (len(stamps) - 3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--teacher", help="a trained teacher checkpoint (its dataset is scored)")
    parser.add_argument("--teacher-arch", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--limit", type=int, help="with --teacher: a class-stratified subset")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and models, on the CPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.samples, args.epochs, args.batch_size = "cpu", 400, 3, 64
        args.teacher_arch, args.student = "resnet8", "resnet8"
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp())
    if args.teacher:
        teacher_path = Path(args.teacher)
        meta_data = load_model(teacher_path)[1].get("data")
        data = DataConfig(**{**meta_data, "limit": args.limit or meta_data.get("limit"), "eval_limit": 500})
    else:
        root = write_cifar(work / "data", 100, args.samples, 500, np.random.default_rng(0))
        data = DataConfig(dataset="cifar100", data_root=str(root), eval_limit=500)
        torch.manual_seed(0)
        model = create_model(args.teacher_arch, 100, 3, 32)
        teacher_path = work / "teacher.pt"
        save_checkpoint(teacher_path, model, model_meta(args.teacher_arch, data.build("train"), data))
    train_set = data.build("train")
    info, n, k = train_set.info, len(train_set), args.views
    common = dict(teacher=str(teacher_path), data=data, device=str(device), batch_size=args.batch_size,
                  num_workers=0 if device.type == "cpu" else 8)

    # score: the stage against a bare forward loop over the same images, on the device
    started = time.perf_counter()
    table = score(ScoreConfig(out=str(work / "f32.parquet"), views=k, **common))
    stage_seconds = time.perf_counter() - started
    frame, meta = load_table(table)
    ids = frame["sample_id"].to_numpy()
    position = {int(s): i for i, s in enumerate(train_set.sample_ids)}
    rows = np.array([position[int(s)] for s in ids])
    clean = train_set.__getitems__(rows)[0]
    views = train_set.render_views(rows, np.broadcast_to(np.arange(k), (n, k)), meta.views.seed)[0].flatten(0, 1)
    everything = torch.cat([clean, views]).to(device)
    teacher, _ = load_model(teacher_path)
    teacher.to(device).eval()
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    with engine.float32_exact(device):
        bare_seconds, bare_energy = bare_forward(teacher, everything, info, device, args.batch_size)
    images_scored = (1 + k) * n

    # AMP: energies from bf16 logits against float32, same teacher and data
    amp_dtype = torch.bfloat16
    if device.type == "cuda":
        amp_table = score(ScoreConfig(out=str(work / "amp.parquet"), amp=True, **{**common, "num_workers": 8}))
        amp_energy = load_table(amp_table)[0]["energy"].to_numpy().astype(np.float64)
        amp_source = "the score stage with --amp (bf16 autocast on cuda)"
    else:
        _, amp_all = bare_forward(teacher, clean.to(device), info, device, args.batch_size, amp_dtype)
        amp_energy = amp_all.numpy().astype(np.float64)
        amp_source = "bf16 CPU autocast around the same teacher (the stage's autocast is cuda-only)"
    f32_energy = frame["energy"].to_numpy().astype(np.float64)
    error = np.abs(amp_energy - f32_energy)

    # distill: kd on cached views, the stage against a bare loop on the device
    start_clock()
    distill(DistillConfig(scores=str(table), student=args.student, out=str(work / "kd"), method="kd",
                          cached_logits=True, train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                                                device=str(device), schedule="timed",
                                                                num_workers=0 if device.type == "cpu" else 8,
                                                                channels_last=device.type == "cuda")))
    stage_epoch = (EPOCH_STARTS[-1] - EPOCH_STARTS[1]) / (len(EPOCH_STARTS) - 2)
    stored = torch.from_numpy(read_views(table, meta, info.num_classes)["view_logits"]).to(device)
    params = draw_views(TrainTransform.from_dict(meta.views.transform), meta.views.seed,
                        np.repeat(ids, k), np.tile(np.arange(k), n))
    torch.manual_seed(0)
    student = create_model(args.student, info.num_classes, info.in_channels, info.image_size).to(device)
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
    labels = torch.from_numpy(frame["label"].to_numpy()).to(device)
    bare_epoch = bare_distill(student, clean.to(device), labels, stored, params, k, info, device, args.epochs,
                              args.batch_size, True)
    figures = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "samples": n, "views": k, "teacher": str(args.teacher or args.teacher_arch), "student": args.student,
        "score": {"stage_images_per_s": images_scored / stage_seconds, "bare_images_per_s": images_scored / bare_seconds,
                  "stage_over_bare": bare_seconds / stage_seconds,
                  "note": "stage time includes loading, rendering views, statistics and writing the table"},
        "amp_energy_error": {"source": amp_source, "max_abs": float(error.max()), "mean_abs": float(error.mean()),
                             "relative_to_energy_std": float(error.mean() / max(f32_energy.std(), 1e-12)),
                             "group_flips": group_flips(f32_energy, amp_energy, ids, meta.rule),
                             "samples": n},
        "distill_kd_cached_views": {"stage_images_per_s": n / stage_epoch, "bare_images_per_s": n / bare_epoch,
                                    "stage_over_bare_time": stage_epoch / bare_epoch,
                                    "note": "stage epoch includes validation, test and checkpoints; bare: training only"},
        "float32_bare_energy_agrees": float((bare_energy[:n].numpy() - f32_energy).__abs__().max()),
    }
    if not math.isfinite(figures["score"]["stage_over_bare"]):
        raise SystemExit("no figures")
    emit("gpu", figures, args.json)


if __name__ == "__main__":
    main()
