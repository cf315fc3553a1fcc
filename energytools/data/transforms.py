"""Batch transforms, applied to uint8 batches after collation.

Working on whole batches keeps the per-sample Python cost out of the loop, runs on the
GPU when the batch is there, and draws all randomness from one explicit generator, so a
run is reproducible whatever the number of DataLoader workers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .base import DatasetInfo


#: (mean, std, device) -> the two (1, C, 1, 1) tensors: made once per device, not copied to it every batch
_STATISTICS: dict = {}


def _statistics(info: DatasetInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (info.mean, info.std, str(device))
    if key not in _STATISTICS:
        _STATISTICS[key] = (torch.tensor(info.mean, device=device).view(1, -1, 1, 1),
                            torch.tensor(info.std, device=device).view(1, -1, 1, 1))
    return _STATISTICS[key]


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
    mean, std = _statistics(info, images.device)
    return (images.float().div_(255.0) - mean) / std


def train_augment(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator):
    """The dataset's train-time augmentation on a uint8 batch.

    Returns ``(augmented, flipped)`` where ``flipped`` is a bool per sample (used to pick
    the matching cached teacher logits). Crop with zero padding, then horizontal flip. Runs
    that replay stored views render them with energytools.data.views instead.
    """
    batch = images.shape[0]
    flipped = torch.zeros(batch, dtype=torch.bool)
    out = images
    pad = info.train_crop_pad
    if pad:
        height, width = images.shape[-2:]
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
        rows = offsets[:, :1] + torch.arange(height)
        cols = offsets[:, 1:] + torch.arange(width)
        full = width + 2 * pad
        index = (rows[:, :, None] * full + cols[:, None, :]).view(batch, 1, -1).expand(-1, images.shape[1], -1)
        # one gather, with NCHW strides as the old torch.stack gave (the strides pick the conv kernel)
        out = padded.reshape(batch, images.shape[1], -1).gather(2, index).view(images.shape)
    if info.train_flip:
        flipped = torch.rand(batch, generator=generator) < 0.5
        if flipped.any():
            out = out.clone() if out is images else out
            out[flipped] = out[flipped].flip(-1)
    return out, flipped


#: a preprocessing's interpolation (PIL's filter names, as timm and transformers give them) -> torch's
#: mode; torch has no Lanczos, box or Hamming filter, so the nearest of its own stands in
INTERPOLATION = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic",
                 "box": "bilinear", "hamming": "bilinear"}


def _per_channel(values, channels: int, what: str) -> torch.Tensor:
    """``values`` for ``channels`` channels: one value is repeated, an RGB triple averaged for gray."""
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    elif channels == 1 and len(values) == 3:  # a gray-input model built from an RGB model's cfg
        values = [sum(values) / 3]
    if len(values) != channels:
        raise UserError(f"the model's preprocessing has {len(values)} {what} values for {channels}-channel images")
    return torch.tensor(values).view(1, -1, 1, 1)


class Preprocessed(nn.Module):
    """``model`` fed the way its own preprocessing says, from batches the dataset normalised.

    The stages normalise every batch with the dataset's mean and std (:func:`normalize`), and
    distill calls the teacher on that normalised training view. A model whose weights were
    trained elsewhere expects its own statistics and input size; this module undoes the
    dataset's normalisation, resizes to the model's ``input_size`` and normalises with the
    model's ``mean`` and ``std``, so every stage feeds the model the same thing. The crop of
    timm's and transformers' eval transforms is not repeated: the dataset is already square.
    """

    def __init__(self, model: nn.Module, info: DatasetInfo, preprocessing: dict):
        super().__init__()
        self.model = model
        channels = info.in_channels
        for name, values in (("source_mean", info.mean), ("source_std", info.std),
                             ("mean", preprocessing["mean"]), ("std", preprocessing["std"])):
            self.register_buffer(name, _per_channel(values, channels, name.rsplit("_")[-1]), persistent=False)
        size = preprocessing.get("input_size")
        self.size = None if size is None or tuple(size) == (info.image_size, info.image_size) else tuple(size)
        self.mode = INTERPOLATION.get(preprocessing.get("interpolation"), "bilinear")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * self.source_std + self.source_mean  # back to [0, 1]
        if self.size is not None:
            # antialias as PIL resizes; clamp the overshoot of bicubic as PIL's uint8 output does
            pixels = F.interpolate(pixels, size=self.size, mode=self.mode,
                                   antialias=self.mode != "nearest").clamp_(0.0, 1.0)
        return self.model((pixels - self.mean) / self.std)


def with_preprocessing(model: nn.Module, info: DatasetInfo, preprocessing: dict | None) -> nn.Module:
    """``model`` wrapped in :class:`Preprocessed`, or as it is when it has no preprocessing of its own."""
    return model if preprocessing is None else Preprocessed(model, info, preprocessing)
