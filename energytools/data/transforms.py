"""Batch transforms, applied to uint8 batches after collation.

Working on whole batches keeps the per-sample Python cost out of the loop, runs on the
GPU when the batch is there, and draws all randomness from one explicit generator, so a
run is reproducible whatever the number of DataLoader workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
