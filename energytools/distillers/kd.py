"""KD (one temperature) and Energy KD (per-sample temperatures from the energy table)."""
from ..losses import kd_loss, mixed_cross_entropy
from .base import Distiller, register_method


@register_method("kd")
class KD(Distiller):
    """``w_ce * CE + w_kd * T^2 KL``; reference weights 0.1 / 0.9, T = 4."""

    defaults = {"kd_temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize_logits": False}

    def losses(self, logits, info):
        opts = self.options
        temperature = info.temperature if info.temperature is not None else opts["kd_temperature"]
        student, teacher = self.distill_logits(logits, info.teacher_logits)
        return {"ce": opts["ce_weight"] * mixed_cross_entropy(logits, info.labels, info.partner_labels, info.lam,
                                   label_smoothing=info.label_smoothing),
                "kd": opts["kd_weight"] * kd_loss(student, teacher, temperature)}


@register_method("energy-kd", per_sample_temperature=True)
class EnergyKD(KD):
    """KD whose temperature is each sample's T_i (the stage supplies ``info.temperature``)."""
