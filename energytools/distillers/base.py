"""The distiller interface and the per-sample information a step needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

#: name -> factory(student, teacher_logits_fn, options) -> Distiller
METHODS: dict[str, Callable] = {}
#: methods that need teacher logits
NEEDS_TEACHER: set[str] = set()


def register_method(name: str, needs_teacher: bool = True):
    def decorator(cls):
        METHODS[name] = cls
        if needs_teacher:
            NEEDS_TEACHER.add(name)
        return cls
    return decorator


@dataclass
class SampleInfo:
    """Per-sample inputs of the losses for one batch, already on the device."""

    labels: torch.Tensor
    partner_labels: torch.Tensor  # equals labels for unmixed samples
    lam: torch.Tensor  # 1 for unmixed samples
    temperature: torch.Tensor | None  # per-sample T_i (Energy KD); None for constant-T methods
    teacher_logits: torch.Tensor | None
    epoch: int


class Distiller(nn.Module):
    """Holds the student; subclasses define ``losses``."""

    def __init__(self, student: nn.Module, **options):
        super().__init__()
        self.student = student
        self.options = options

    def losses(self, logits: torch.Tensor, info: SampleInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_train(self, images: torch.Tensor, info: SampleInfo, forward=None):
        """``forward`` runs the student (its DDP wrapper under torchrun); default: the student."""
        logits = (forward or self.student)(images)
        return logits, self.losses(logits, info)
