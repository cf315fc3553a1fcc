"""CTKD (Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023; code:
zhengli97/CTKD): KD at one learnable temperature ``tau = t_start + t_end * sigmoid(theta)``,
trained adversarially: theta's gradient passes a reversal layer whose weight follows a cosine
from 0 to -1 over the first ``ctkd_grl_epochs`` epochs, so the temperature moves to make the
KD term harder while the student makes it easier.

theta is a parameter of the distiller (initialised to 1, as the reference), in its own
optimizer parameter group with the run's lr, momentum and weight decay (the reference trains
it in the student's SGD); it is saved in last.pt and restored on resume; its value at the end
of each epoch is the ``method_temperature`` column of metrics.parquet.
"""
import torch
import torch.nn as nn

from ..losses import ctkd_reversal_weight, ctkd_temperature, kd_loss, mixed_cross_entropy, scale_gradient
from .base import Distiller, register_method


@register_method("ctkd")
class CTKD(Distiller):
    """``w_ce * CE + w_kd * tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))``; weights 0.1 / 0.9."""

    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "ctkd_t_start": 1.0, "ctkd_t_end": 20.0, "ctkd_grl_epochs": 10,
                "ctkd_grl_weight": 1.0, "standardize_logits": False}

    def __init__(self, student: nn.Module, **options):
        super().__init__(student, **options)
        self.theta = nn.Parameter(torch.ones(1))

    def temperature(self, reversal: float = 1.0) -> torch.Tensor:
        """The learned temperature (a 0-d tensor); ``reversal`` scales the gradient reaching theta."""
        theta = self.theta if reversal == 1.0 else scale_gradient(self.theta, reversal)
        return ctkd_temperature(theta, self.options["ctkd_t_start"], self.options["ctkd_t_end"]).reshape(())

    def reversal_weight(self, epoch: int) -> float:
        """The gradient-reversal weight in (0-based) ``epoch``: the reference counts epochs from 1."""
        return ctkd_reversal_weight(epoch + 1, self.options["ctkd_grl_epochs"], self.options["ctkd_grl_weight"])

    def losses(self, logits, info):
        opts = self.options
        tau = self.temperature(self.reversal_weight(info.epoch)).float()
        student, teacher = self.distill_logits(logits, info.teacher_logits)
        return {"ce": opts["ce_weight"] * mixed_cross_entropy(logits, info.labels, info.partner_labels, info.lam,
                                   label_smoothing=info.label_smoothing),
                "kd": opts["kd_weight"] * kd_loss(student.float(), teacher.float(), tau)}

    def extra_parameter_groups(self) -> list[dict]:
        return [{"params": [self.theta]}]

    def epoch_metrics(self) -> dict[str, float]:
        return {"method_temperature": float(self.temperature().detach())}
