"""`energytools export`: a trained model (a run's best.pt, or any checkpoint energytools loads)
to a deployable file, checked against the PyTorch model on the run's own validation images.

The exported graph takes what the stages feed a model: float32 NCHW images scaled to [0, 1] and
normalised with the dataset's mean and std (``(pixel / 255 - mean) / std``, both recorded in
the file's metadata). A model trained elsewhere with its own preprocessing (timm's or a Hugging
Face processor's mean, std and input size) has that step inside the graph, as the stages run it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig, resolve
from ..console import console, headline
from ..data.transforms import normalize
from ..deploy import DEFAULT_OPSET, INPUT_NAME, compare_logits, export_format, metadata_text
from ..errors import UserError
from ..io import atomic_path, check_output_free
from ..models import checkpoint_meta
from ..teacher import open_teacher
from ..version import __version__

#: the largest absolute logit difference between PyTorch and the exported file that passes the check
TOLERANCE = 1e-4

#: what a run directory's model is
RUN_CHECKPOINT = "best.pt"


def resolve_checkpoint(path: Path | str) -> Path:
    """A run directory means its best.pt; a file is itself."""
    path = Path(path)
    if path.is_dir():
        if not (path / RUN_CHECKPOINT).is_file():
            raise UserError(f"run directory {path} has no {RUN_CHECKPOINT} (has the run finished an epoch?)")
        return path / RUN_CHECKPOINT
    if not path.exists():
        raise UserError(f"{path} does not exist")
    return path


def recorded_data(checkpoint: Path) -> DataConfig:
    """The dataset the checkpoint records it was trained on (its validation split is the check's)."""
    recorded = checkpoint_meta(checkpoint).get("data")
    if not recorded:
        raise UserError(f"{checkpoint} does not record its dataset, so there are no validation images to check "
                        "the export on (export a checkpoint energytools wrote)")
    return resolve(DataConfig, recorded, f"{checkpoint}: recorded dataset")


def open_for_export(checkpoint: Path):
    """``(model fed dataset-normalised batches, its meta, the validation split)`` on the CPU."""
    val_set = recorded_data(checkpoint).build("val")
    run = open_teacher(checkpoint, val_set, device="cpu", amp=False)
    return run.model.float().eval(), run.meta, val_set


def export_metadata(meta: dict, info, opset: int, fmt: str) -> dict[str, str]:
    """What a deployment needs to feed the graph and read its output, and where it came from."""
    return {key: metadata_text(value) for key, value in {
        "energytools_version": __version__, "format": fmt, "opset": opset, "exporter": "torch.onnx.export "
        f"(TorchScript, dynamo=False), torch {torch.__version__}",
        "input_name": INPUT_NAME, "input_shape": ["batch", info.in_channels, info.image_size, info.image_size],
        "input_dtype": "float32",
        "input": "float32 NCHW, RGB/gray pixels scaled to [0, 1] then normalised per channel: (x - mean) / std",
        "mean": list(info.mean), "std": list(info.std),
        "model_preprocessing": meta.get("preprocessing"),  # inside the graph when not null
        "class_names": list(info.classes), "num_classes": info.num_classes, "arch": meta.get("arch"),
        "dataset": info.name, "source_checkpoint": str(meta.get("path")), "source_sha256": meta.get("sha256"),
    }.items()}


def validation_images(val_set, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` validation images (uint8 NCHW) and labels, in the split's order."""
    indices = list(range(min(count, len(val_set))))
    if not indices:
        raise UserError(f"the validation split of {val_set.info.name} is empty: nothing to check the export on")
    images, labels, _ = val_set.__getitems__(indices)
    return images, labels


@torch.no_grad()
def check_export(run_file, model, val_set, count: int, batch_size: int = 64) -> dict:
    """Logits of the exported file (``run_file``: float32 array -> logits) against the model's on
    ``count`` real validation images."""
    images, _ = validation_images(val_set, count)
    expected, got = [], []
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start:start + batch_size], val_set.info)
        expected.append(model(batch).float().numpy())
        got.append(run_file(batch.numpy()))
    return compare_logits(np.concatenate(expected), np.concatenate(got))


def export(source: Path | str, out: Path | str | None = None, fmt: str = "onnx", check_samples: int = 256,
           opset: int = DEFAULT_OPSET, overwrite: bool = False) -> Path:
    """Export ``source`` (a run directory or a checkpoint) to ``out`` (default: beside the
    checkpoint, ``student.onnx``) in format ``fmt``, checked on ``check_samples`` validation
    images: the file is written only if every logit is within :data:`TOLERANCE` of PyTorch's and
    every arg-max agrees. Returns the path written."""
    format_ = export_format(fmt)
    if check_samples < 1:
        raise UserError(f"--check-samples must be at least 1, got {check_samples}")
    format_.require()
    checkpoint = resolve_checkpoint(source)
    out = Path(out) if out is not None else checkpoint.parent / f"student{format_.suffix}"
    check_output_free(out, overwrite)
    model, meta, val_set = open_for_export(checkpoint)
    info = val_set.info
    example = normalize(validation_images(val_set, 2)[0], info)
    with atomic_path(out) as tmp:
        format_.write(model, example, tmp, export_metadata(meta, info, opset, fmt), opset)
        check = check_export(format_.runner(tmp), model, val_set, check_samples)
        agree = check["samples"] - check["argmax_disagree"]
        console.print(f"check on {check['samples']} {info.name} validation images: largest |logit difference| "
                      f"{check['max_abs_diff']:.2e} (tolerance {TOLERANCE:g}); arg-max agrees on {agree}/"
                      f"{check['samples']}")
        if check["max_abs_diff"] > TOLERANCE or check["argmax_disagree"]:
            raise UserError(f"the exported {fmt} model does not match PyTorch on {info.name} validation images: "
                            f"largest |logit difference| {check['max_abs_diff']:.2e} > {TOLERANCE:g} or arg-max "
                            f"differs on {check['argmax_disagree']} image(s); nothing written")
    console.print(headline("done", f": wrote {out} ({out.stat().st_size / 1e6:.2f} MB) from {checkpoint}, "
                                   f"input {json.loads(export_metadata(meta, info, opset, fmt)['input_shape'])}"))
    return out
