"""Batch transforms, applied to uint8 batches after collation.

Working on whole batches keeps the per-sample Python cost out of the loop, runs on the
GPU when the batch is there, and draws all randomness from one explicit generator, so a
run is reproducible whatever the number of DataLoader workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DatasetInfo


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def train_augment(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator):
    """The dataset's train-time augmentation on a uint8 batch.

    Returns ``(augmented, flipped)`` where ``flipped`` is a bool per sample (used to pick
    the matching cached teacher logits). Crop with zero padding, then horizontal flip.
    """
    batch = images.shape[0]
    flipped = torch.zeros(batch, dtype=torch.bool)
    out = images
    pad = info.train_crop_pad
    if pad:
        height, width = images.shape[-2:]
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
        out = torch.stack([padded[i, :, y:y + height, x:x + width]
                           for i, (y, x) in enumerate(offsets.tolist())])
    if info.train_flip:
        flipped = torch.rand(batch, generator=generator) < 0.5
        if flipped.any():
            out = out.clone() if out is images else out
            out[flipped] = out[flipped].flip(-1)
    return out, flipped
