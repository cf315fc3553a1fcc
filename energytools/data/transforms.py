"""Batch transforms, applied to uint8 batches after collation.

Working on whole batches keeps the per-sample Python cost out of the loop, runs on the
GPU when the batch is there, and draws all randomness from one explicit generator, so a
run is reproducible whatever the number of DataLoader workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..transfer import to_device
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


@dataclass
class AugmentDraw:
    """The random part of :func:`train_augment` for one batch, drawn on the CPU: crop offsets
    ``(B, 2)`` (row, column; None without a crop) and a flip flag per sample."""

    offsets: torch.Tensor | None
    flipped: torch.Tensor
    any_flipped: bool  # read on the CPU when drawn, so applying on a device never waits for it


def draw_augment(batch: int, info: DatasetInfo, generator: torch.Generator) -> AugmentDraw:
    """Draw a batch's crop offsets and flips from ``generator`` (on the CPU, in this order)."""
    offsets = None
    pad = info.train_crop_pad
    if pad:
        offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flipped, any_flipped = torch.zeros(batch, dtype=torch.bool), False
    if info.train_flip:
        flipped = torch.rand(batch, generator=generator) < 0.5
        any_flipped = bool(flipped.any())  # a CPU tensor: nothing waits for a device
    return AugmentDraw(offsets, flipped, any_flipped)


def apply_augment(images: torch.Tensor, info: DatasetInfo, draw: AugmentDraw) -> torch.Tensor:
    """Crop with zero padding, then flip, as ``draw`` says, on the device ``images`` are on.

    Integer gathers and selections only: the same bytes on any device, and no data-dependent
    shape or host read (nothing a GPU stream would wait on)."""
    pad = info.train_crop_pad
    padded = F.pad(images, (pad, pad, pad, pad)) if draw.offsets is not None else images
    return crop_and_flip(padded, pad, draw)


def crop_and_flip(padded: torch.Tensor, pad: int, draw: AugmentDraw) -> torch.Tensor:
    """:func:`apply_augment` on a batch already padded by ``pad`` on every side (unpadded
    without a crop): the crop at ``draw``'s offsets, then its flips."""
    out, device = padded, padded.device
    if draw.offsets is not None:
        batch, channels = padded.shape[:2]
        height, width = padded.shape[-2] - 2 * pad, padded.shape[-1] - 2 * pad
        offsets = to_device(draw.offsets, device)
        rows = offsets[:, :1] + torch.arange(height, device=device)
        cols = offsets[:, 1:] + torch.arange(width, device=device)
        full = width + 2 * pad
        index = (rows[:, :, None] * full + cols[:, None, :]).view(batch, 1, -1).expand(-1, channels, -1)
        # one gather, with NCHW strides as the old torch.stack gave (the strides pick the conv kernel)
        out = padded.reshape(batch, channels, -1).gather(2, index).view(batch, channels, height, width)
    if draw.any_flipped:
        flip = to_device(draw.flipped, device).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    return out


def train_augment(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator):
    """The dataset's train-time augmentation on a uint8 batch: :func:`draw_augment`, then
    :func:`apply_augment` where the batch is.

    Returns ``(augmented, flipped)`` where ``flipped`` is a bool per sample (used to pick
    the matching cached teacher logits). Crop with zero padding, then horizontal flip. Runs
    that replay stored views render them with energytools.data.views instead.
    """
    draw = draw_augment(images.shape[0], info, generator)
    return apply_augment(images, info, draw), draw.flipped
