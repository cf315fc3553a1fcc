"""DKD and Energy DKD: alpha 1, beta 8, T 4, 20-epoch linear warm-up, w_ce 1."""
from ..losses import dkd_loss, mixed_cross_entropy
from .base import Distiller, register_method


@register_method("dkd")
class DKD(Distiller):
    defaults = {"kd_temperature": 4.0, "ce_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 20,
                "standardize_logits": False}

    def losses(self, logits, info):
        opts = self.options
        temperature = info.temperature if info.temperature is not None else opts["kd_temperature"]
        weight = min((info.epoch + 1) / max(opts["dkd_warmup"], 1), 1.0)
        student, teacher = self.distill_logits(logits, info.teacher_logits)
        return {"ce": opts["ce_weight"] * mixed_cross_entropy(logits, info.labels, info.partner_labels, info.lam,
                                   label_smoothing=info.label_smoothing),
                "dkd": weight * dkd_loss(student, teacher, info.labels, opts["dkd_alpha"],
                                         opts["dkd_beta"], temperature)}


@register_method("energy-dkd", per_sample_temperature=True)
class EnergyDKD(DKD):
    """DKD with each sample's T_i scaling both terms."""
