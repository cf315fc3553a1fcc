"""The reference code's HE-DA, online: CutMix drawn afresh in every batch among the batch's
high-energy samples, and one more KD term on the mixed images (METHOD.md):

    L = w_ce CE(batch) + w_kd KD(batch) + w_kd KD(mixed high-energy subset, T = 4)

No CE on the mixed images. The teacher must see the mixed images, so this runs the teacher
even where the batch's own logits are cached.
"""
from __future__ import annotations

import numpy as np
import torch

from .losses import kd_loss
from .policies import cutmix_box

#: the reference's KD temperature for the mixed images
MIXED_TEMPERATURE = 4.0


def mix_high_energy(images: torch.Tensor, high: torch.Tensor, rng: np.random.Generator,
                    alpha: float = 1.0) -> tuple[torch.Tensor, float] | None:
    """CutMix among the rows of ``images`` where ``high`` is true: each takes one box (one per
    batch, as the reference does) from another high row, drawn by ``rng``. Returns ``(mixed
    images, lam)`` or None when the batch holds fewer than two high-energy samples."""
    rows = torch.nonzero(high, as_tuple=False).flatten()
    if len(rows) < 2:
        return None
    chosen = images[rows]
    # a derangement: a random cyclic shift of a random order, so no sample mixes with itself
    order = torch.as_tensor(rng.permutation(len(rows)), device=images.device)
    partners = torch.empty_like(order)
    partners[order] = torch.roll(order, 1)
    top, left, bottom, right, lam = cutmix_box(rng, chosen.shape[-2], chosen.shape[-1], alpha)
    mixed = chosen.clone()
    mixed[..., top:bottom, left:right] = chosen[partners][..., top:bottom, left:right]
    return mixed, lam


def mixed_kd_term(student, teacher, images: torch.Tensor, high: torch.Tensor, rng: np.random.Generator,
                  weight: float) -> torch.Tensor | None:
    """``weight * KD(student, teacher)`` at T = 4 on the mixed high-energy images (None if none)."""
    mixed = mix_high_energy(images, high, rng)
    if mixed is None:
        return None
    with torch.no_grad():
        teacher_logits = teacher(mixed[0]).float()
    return weight * kd_loss(student(mixed[0]), teacher_logits, MIXED_TEMPERATURE)
