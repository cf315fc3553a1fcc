"""The distiller interface, the method registry and the per-sample information a step needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UserError
from ..losses import standardize_logits


@dataclass(frozen=True)
class MethodSpec:
    """A registered method and what it needs from the distill stage."""

    name: str
    distiller: type["Distiller"]
    teacher_logits: bool  # the step must supply teacher logits (cached or online)
    per_sample_temperature: bool  # the step must supply each sample's T_i (Energy KD)

    def options(self, given: dict) -> dict:
        """The method's options: its defaults, overridden by the values in ``given`` that are not None."""
        return {name: given[name] if given.get(name) is not None else default
                for name, default in self.distiller.defaults.items()}

    def build(self, student: nn.Module, given: dict) -> "Distiller":
        return self.distiller(student, **self.options(given))


#: name -> MethodSpec
METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, teacher_logits: bool = True, per_sample_temperature: bool = False):
    def decorator(cls):
        METHODS[name] = MethodSpec(name, cls, teacher_logits, per_sample_temperature)
        return cls
    return decorator


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


@dataclass
class SampleInfo:
    """Per-sample inputs of the losses for one batch, already on the device."""

    labels: torch.Tensor
    partner_labels: torch.Tensor | None  # equals labels for unmixed samples; None when no sample of the run is mixed
    lam: torch.Tensor | None  # 1 for unmixed samples; None when no sample of the run is mixed
    temperature: torch.Tensor | None  # per-sample T_i (Energy KD); None for constant-T methods
    teacher_logits: torch.Tensor | None
    epoch: int
    high: torch.Tensor | None = None  # in the high-energy group (online HE-DA mixes these); None when unused
    label_smoothing: float = 0.0  # of the CE term (--label-smoothing)


class Distiller(nn.Module):
    """Holds the student; subclasses define ``losses`` and the ``defaults`` of their options."""

    #: option name -> default; the distill config's value replaces it when set
    defaults: dict = {}

    def __init__(self, student: nn.Module, **options):
        super().__init__()
        self.student = student
        self.options = options

    def losses(self, logits: torch.Tensor, info: SampleInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def distill_logits(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (student, teacher) logits the distillation terms see: each sample's z-scored
        (logit standardization) when the method's ``standardize_logits`` option is set, else
        as given. CE always sees the raw student logits; energies and groups come from the raw
        teacher logits (the score table, or the online rule before this is called)."""
        if self.options.get("standardize_logits"):
            return standardize_logits(logits), standardize_logits(teacher_logits)
        return logits, teacher_logits

    # --- what the engine asks of a method with learnable parts (CTKD's temperature) ----------

    def extra_parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups of the method's own parameters (not the student's); the
        engine appends them to the student's SGD (a group's missing keys: the run's lr, momentum
        and weight decay) and averages their gradients across ranks under torchrun."""
        return []

    def extra_state(self) -> dict:
        """The method's own parameters and buffers (everything but the student), for last.pt."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` saved (exactly: resume continues the same run)."""
        self.load_state_dict({**self.student.state_dict(prefix="student."), **state}, strict=True)

    def epoch_metrics(self) -> dict[str, float]:
        """Per-epoch values of the method (its temperature ...) for metrics.parquet; called once
        at the end of each epoch."""
        return {}

    def forward_train(self, images: torch.Tensor, info: SampleInfo, forward=None):
        """``forward`` runs the student (its DDP wrapper under torchrun); default: the student."""
        logits = (forward or self.student)(images)
        return logits, self.losses(logits, info)
