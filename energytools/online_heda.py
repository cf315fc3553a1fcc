"""The reference code's HE-DA, online: CutMix drawn afresh in every batch among the batch's
high-energy samples, and one more KD term on the mixed images (METHOD.md):

    L = w_ce CE(batch) + w_kd KD(batch) + w_kd KD(mixed high-energy subset, T = 4)

No CE on the mixed images. The teacher must see the mixed images, so this runs the teacher
even where the batch's own logits are cached. The student sees the batch and the mixed images
in one forward pass (DistributedDataParallel allows one per backward), so BatchNorm's batch
statistics cover both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .losses import kd_loss
from .policies import cutmix_box

#: the reference's KD temperature for the mixed images
MIXED_TEMPERATURE = 4.0
#: the reference's CutMix Beta(alpha, alpha)
CUTMIX_ALPHA = 1.0


def mix_high_energy(images: torch.Tensor, high: torch.Tensor, rng: np.random.Generator,
                    alpha: float = CUTMIX_ALPHA) -> tuple[torch.Tensor, float] | None:
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


def mixed_kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * KD(student, teacher)`` at T = 4 on the mixed high-energy images."""
    return weight * kd_loss(student_logits, teacher_logits.float(), MIXED_TEMPERATURE)


@dataclass
class OnlineHEDA:
    """The HE-DA term of one run. ``high_of(images, ...)`` says which of a batch's samples are
    high-energy; the boxes and partners come from a generator seeded by (seed, epoch, rank), so
    a run resumed at an epoch boundary draws what it would have drawn."""

    teacher: torch.nn.Module
    high_of: Callable[..., torch.Tensor]
    weight: float
    seed: int
    rank: int = 0
    _epoch: int | None = None
    _rng: np.random.Generator | None = None

    def mix(self, images: torch.Tensor, epoch: int, *keys) -> torch.Tensor | None:
        """This batch's mixed high-energy images (None with fewer than two); ``keys`` go to ``high_of``."""
        if epoch != self._epoch:
            self._epoch, self._rng = epoch, np.random.default_rng([self.seed, epoch, self.rank])
        mixed = mix_high_energy(images, self.high_of(*keys), self._rng)
        return None if mixed is None else mixed[0]

    def joint_forward(self, forward: Callable, mixed: torch.Tensor | None, kept: dict) -> Callable:
        """``forward`` run once on the batch and ``mixed`` together; returns the batch's logits
        and keeps the mixed images' in ``kept["mixed"]``."""
        if mixed is None:
            return forward

        def run(images: torch.Tensor) -> torch.Tensor:
            logits = forward(torch.cat([images, mixed]))
            kept["mixed"] = logits[len(images):]
            return logits[:len(images)]
        return run

    def loss(self, mixed: torch.Tensor | None, kept: dict, like: torch.Tensor) -> torch.Tensor:
        """The term; zero (the loss keeps its name) for a batch with nothing mixed."""
        if mixed is None:
            return like.new_zeros(())
        with torch.no_grad():
            teacher_logits = self.teacher(mixed)
        return mixed_kd_term(kept["mixed"], teacher_logits, self.weight)

    def to_dict(self) -> dict:
        return {"weight": self.weight, "temperature": MIXED_TEMPERATURE, "cutmix_alpha": CUTMIX_ALPHA}
