"""``--he-da online``, the reference code's HE-DA as a wrapper around the run's method: CutMix
drawn afresh in every batch among the batch's high-energy samples (``SampleInfo.high``, from the
run's temperature source), and one more KD term on the mixed images (METHOD.md):

    L = w_ce CE(batch) + w_kd KD(batch) + w_kd KD(mixed high-energy subset, T = 4)

No CE on the mixed images. The teacher must see the mixed images, so this runs the teacher
even where the batch's own logits are cached. The student sees the batch and the mixed images
in one forward pass (DistributedDataParallel allows one per backward), so BatchNorm's batch
statistics cover both.

No host read and no data-dependent shape on the step path: the mixed images are a tensor of
the batch's shape, where each high-energy row is CutMixed with another high-energy row and
every other row stays as it was; the term is the mean over the mixed rows only (weights 0 on
the others, and on every row of a batch with fewer than two high-energy samples), so its value
is the reference's. What differs from picking the high rows out (which needs the device to
say how many there are): the student's and the teacher's mixed pass run on the whole batch
(twice the forward images rather than ~1.3x at a 30% high fraction), and BatchNorm's batch
statistics of the student's joint pass see the unmixed rows twice.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from ..losses import kd_loss
from ..policies import cutmix_box
from .base import Distiller, SampleInfo

#: the reference's KD temperature for the mixed images
MIXED_TEMPERATURE = 4.0
#: the reference's CutMix Beta(alpha, alpha)
CUTMIX_ALPHA = 1.0


class Mixed(NamedTuple):
    """A batch's mixed images (the batch's shape) and which rows count (1.0) in the term."""

    images: torch.Tensor
    weights: torch.Tensor
    lam: float


def mix_high_energy(images: torch.Tensor, high: torch.Tensor, rng: np.random.Generator,
                    alpha: float = CUTMIX_ALPHA, generator: torch.Generator | None = None) -> Mixed:
    """CutMix among the rows of ``images`` where ``high`` is true: each takes one box (one per
    batch, as the reference does, drawn by ``rng``) from another high row (partners drawn on the
    device by ``generator``, default: one seeded from ``rng``). The other rows stay as they were
    and get weight 0, as does every row when the batch holds fewer than two high-energy samples.
    No host read: the shapes do not depend on how many rows are high."""
    device = images.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    high = high.to(device=device, dtype=torch.bool)
    count = high.sum()
    # the high rows first, in a random order; each takes its predecessor in the cycle over
    # them (a derangement, so no sample mixes with itself)
    order = (torch.rand(len(high), device=device, generator=generator) - high.float()).argsort()
    slot = torch.arange(len(high), device=device)
    previous = torch.where(slot == 0, count - 1, slot - 1).clamp_min(0)
    partners = torch.empty_like(order).scatter_(0, order, order[previous])
    top, left, bottom, right, lam = cutmix_box(rng, images.shape[-2], images.shape[-1], alpha)
    pasted = images.clone()
    pasted[..., top:bottom, left:right] = images[partners][..., top:bottom, left:right]
    mixed = torch.where(high.view(-1, *[1] * (images.ndim - 1)), pasted, images)
    return Mixed(mixed, (high & (count >= 2)).float(), lam)


def mixed_kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: float,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * KD(student, teacher)`` at T = 4 on the mixed high-energy images: the mean over
    the rows whose ``rows`` weight is 1 (zero when there are none), or over every row."""
    if rows is None:
        return weight * kd_loss(student_logits, teacher_logits.float(), MIXED_TEMPERATURE)
    per_row = kd_loss(student_logits, teacher_logits.float(), MIXED_TEMPERATURE, reduction="none")
    return weight * (per_row * rows).sum() / rows.sum().clamp_min(1)


class MixDraws:
    """Online HE-DA's random draws: the boxes (NumPy) and the partners (torch, on the batch's
    device), seeded by (seed, epoch, rank) at the first batch of each epoch. Its state is saved
    with a mid-epoch checkpoint (``state_dict``), so a run stopped inside an epoch draws on as an
    uninterrupted one would."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = seed, rank
        self.epoch, self.rng, self.generator = None, None, None

    def for_epoch(self, epoch: int, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
        if epoch != self.epoch:
            self.epoch, self.rng = epoch, np.random.default_rng([self.seed, epoch, self.rank])
            self.generator = torch.Generator(device=device).manual_seed(int(self.rng.integers(2**62)))
        return self.rng, self.generator

    def state_dict(self) -> dict:
        if self.epoch is None:
            return {}
        return {"epoch": self.epoch, "rng": self.rng.bit_generator.state, "generator": self.generator.get_state(),
                "device": str(self.generator.device)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.epoch, self.rng = int(state["epoch"]), np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.generator = torch.Generator(device=state.get("device", "cpu"))
        self.generator.set_state(state["generator"])


class OnlineHEDA(Distiller):
    """The run's method (``inner``) plus the HE-DA term. The boxes and partners come from
    generators seeded by (seed, epoch, rank), so a run resumed at an epoch boundary draws what it
    would have drawn. The teacher runs on the mixed images (the batch's own teacher logits,
    cached or not, do not cover them); it is not a submodule, so its weights stay out of the
    run's state."""

    def __init__(self, inner: Distiller, teacher: Callable, weight: float, seed: int, rank: int = 0):
        nn.Module.__init__(self)
        self.inner, self.options = inner, inner.options
        self._teacher = (teacher,)
        self.weight = weight
        self.draws = MixDraws(seed, rank)

    @property
    def student(self) -> nn.Module:
        return self.inner.student

    def mix(self, images: torch.Tensor, epoch: int, high: torch.Tensor) -> Mixed:
        """This batch's mixed images (see :func:`mix_high_energy`)."""
        rng, generator = self.draws.for_epoch(epoch, images.device)
        return mix_high_energy(images, high, rng, generator=generator)

    def joint_forward(self, forward: Callable, mixed: Mixed | None, kept: dict) -> Callable:
        """``forward`` run once on the batch and ``mixed`` together; returns the batch's logits
        and keeps the mixed images' in ``kept["mixed"]``."""
        if mixed is None:
            return forward

        def run(images: torch.Tensor) -> torch.Tensor:
            logits = forward(torch.cat([images, mixed.images]))
            kept["mixed"] = logits[len(images):]
            return logits[:len(images)]
        return run

    def loss(self, mixed: Mixed | None, kept: dict, like: torch.Tensor) -> torch.Tensor:
        """The term; zero (the loss keeps its name) for a batch with nothing mixed."""
        if mixed is None:
            return like.new_zeros(())
        with torch.no_grad():
            teacher_logits = self._teacher[0](mixed.images)
        return mixed_kd_term(kept["mixed"], teacher_logits, self.weight, mixed.weights)

    def forward_train(self, images: torch.Tensor, info: SampleInfo, forward=None):
        mixed, kept = self.mix(images, info.epoch, info.high), {}
        logits, losses = self.inner.forward_train(images, info, self.joint_forward(forward or self.student, mixed,
                                                                                       kept))
        return logits, {**losses, "he_da": self.loss(mixed, kept, logits)}

    def losses(self, logits: torch.Tensor, info: SampleInfo) -> dict[str, torch.Tensor]:
        return self.inner.losses(logits, info)

    # the method's own learnable parts are the inner method's
    def extra_parameter_groups(self) -> list[dict]:
        return self.inner.extra_parameter_groups()

    def extra_state(self) -> dict:
        return self.inner.extra_state()

    def load_extra_state(self, state: dict) -> None:
        self.inner.load_extra_state(state)

    def epoch_metrics(self) -> dict[str, float]:
        return self.inner.epoch_metrics()

    def to_dict(self) -> dict:
        return {"weight": self.weight, "temperature": MIXED_TEMPERATURE, "cutmix_alpha": CUTMIX_ALPHA}
