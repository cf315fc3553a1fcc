"""DTKD (Dynamic Temperature KD, Wei et al. 2024, arXiv 2404.12711; code: JinYu1998/DTKD):
per-sample temperatures for teacher and student from their largest logits,
``T_t = 2 max(z_t) / (max(z_t) + max(z_s)) * T`` and ``T_s = 2 max(z_s) / (...) * T``, and
``loss = w_ce CE + warm-up * (alpha * T_t T_s KL(softmax(z_t/T_t) || softmax(z_s/T_s)) + beta * KD(T))``
with alpha 3, beta 1, T 4, CE weight 1 and a 20-epoch linear warm-up of both KD terms (the
reference's defaults; its published configs change alpha and beta per teacher-student pair, from
1 / 0.5 to 3 / 2: docs/methods.md lists them). The range of T_t and T_s over each epoch's samples goes to metrics.parquet.
"""
import torch

from ..distributed import context
from ..losses import dtkd_loss, dtkd_temperatures, mixed_cross_entropy
from .base import Distiller, register_method


@register_method("dtkd")
class DTKD(Distiller):
    defaults = {"kd_temperature": 4.0, "ce_weight": 1.0, "dtkd_alpha": 3.0, "dtkd_beta": 1.0, "dkd_warmup": 20,
                "standardize_logits": False}

    def __init__(self, student, **options):
        super().__init__(student, **options)
        self._range: torch.Tensor | None = None  # (min T_t, max T_t, min T_s, max T_s) of the epoch, on the device

    def losses(self, logits, info):
        opts = self.options
        weight = min((info.epoch + 1) / max(opts["dkd_warmup"], 1), 1.0)
        student, teacher = self.distill_logits(logits.float(), info.teacher_logits.float())
        self._track(student, teacher)
        return {"ce": opts["ce_weight"] * mixed_cross_entropy(logits, info.labels, info.partner_labels, info.lam,
                                   label_smoothing=info.label_smoothing),
                "dtkd": weight * dtkd_loss(student, teacher, opts["kd_temperature"], opts["dtkd_alpha"],
                                           opts["dtkd_beta"])}

    @torch.no_grad()
    def _track(self, student, teacher) -> None:
        t_t, t_s = dtkd_temperatures(student, teacher, self.options["kd_temperature"])
        low, high = torch.stack([t_t.min(), t_s.min()]), torch.stack([t_t.max(), t_s.max()])
        if self._range is not None:
            low, high = torch.minimum(low, self._range[0]), torch.maximum(high, self._range[1])
        self._range = torch.stack([low, high])

    def epoch_metrics(self) -> dict[str, float]:
        """The range of the two temperatures over the epoch's samples (every rank's under torchrun)."""
        if self._range is None:
            return {}
        (t_min, s_min), (t_max, s_max) = self._range.tolist()
        self._range = None
        low_t, low_s, t_max, s_max = context().all_max([-t_min, -s_min, t_max, s_max])
        t_min, s_min = -low_t, -low_s
        return {"method_teacher_t_min": t_min, "method_teacher_t_max": t_max,
                "method_student_t_min": s_min, "method_student_t_max": s_max}
