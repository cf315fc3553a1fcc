"""Models by name and the checkpoint format that lets later stages need no --arch."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..io import atomic_path, sha256_file
from . import cifar_resnet, imagenet, mobile, small, vgg, wrn  # noqa: F401  (fill the registry)
from .registry import DESCRIPTIONS, MODELS, register_model

__all__ = ["MODELS", "DESCRIPTIONS", "register_model", "create_model", "save_checkpoint", "load_checkpoint",
           "load_model"]


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """Build a registered model adapted to the dataset's class count and channels."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; run `energytools models` to list them")
    builder = MODELS[name]
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if image_size is not None and "image_size" in inspect.signature(builder).parameters:
        kwargs["image_size"] = image_size
    return builder(**kwargs)


def save_checkpoint(path: Path | str, model: nn.Module, meta: dict, **state) -> None:
    """Write ``{"model": state_dict, "energytools": meta, **state}`` atomically.

    ``meta`` carries arch, num_classes, in_channels, image_size and the dataset, so
    :func:`load_model` can rebuild the model from the file alone. The "model" key is the
    layout mdistiller uses, so its tools read these files too.
    """
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "energytools": meta, **state}, tmp)


def load_checkpoint(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(payload, dict) and "model" in payload and isinstance(payload["model"], dict):
        return payload
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"model": payload}  # a bare state dict (torchvision weights files)
    raise UserError(f"{path} is not a model checkpoint (expected a state dict or a dict with a 'model' entry)")


def load_model(path: Path | str, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, image_size: int | None = None):
    """Rebuild a model from a checkpoint; returns ``(model in eval mode, meta)``.

    energytools checkpoints carry their architecture; for others (mdistiller's, torchvision
    weights) pass ``arch`` and the dataset's ``num_classes``/``in_channels``. Loading is
    strict: a checkpoint for another class count is refused with a clear message.
    """
    payload = load_checkpoint(path)
    meta = dict(payload.get("energytools") or {})
    arch = arch or meta.get("arch")
    if arch is None:
        raise UserError(f"{path} does not record its architecture: pass --teacher-arch")
    num_classes = meta.get("num_classes", num_classes)
    in_channels = meta.get("in_channels", in_channels or 3)
    image_size = meta.get("image_size", image_size)
    if num_classes is None:
        raise UserError(f"{path} does not record its class count")
    model = create_model(arch, num_classes, in_channels, image_size)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
        detail = first or str(exc).splitlines()[0]
        raise UserError(f"{path} does not fit {arch} with {num_classes} classes and {in_channels} input "
                        f"channel(s): {detail[:300]}") from None
    meta.update(arch=arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                sha256=sha256_file(path), path=str(path))
    return model.eval(), meta
