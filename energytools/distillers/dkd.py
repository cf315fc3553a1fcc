"""DKD and Energy DKD: alpha 1, beta 8, T 4, 20-epoch linear warm-up, w_ce 1."""
from ..losses import dkd_loss, mixed_cross_entropy
from .base import Distiller, register_method


@register_method("dkd")
class DKD(Distiller):
    def losses(self, logits, info):
        opts = self.options
        warmup = max(opts.get("dkd_warmup", 20), 1)
        temperature = info.temperature if info.temperature is not None else opts.get("kd_temperature", 4.0)
        weight = min((info.epoch + 1) / warmup, 1.0)
        return {"ce": opts.get("ce_weight", 1.0) * mixed_cross_entropy(logits, info.labels, info.partner_labels, info.lam),
                "dkd": weight * dkd_loss(logits, info.teacher_logits, info.labels, opts.get("dkd_alpha", 1.0),
                                         opts.get("dkd_beta", 8.0), temperature)}


@register_method("energy-dkd")
class EnergyDKD(DKD):
    """DKD with each sample's T_i scaling both terms."""
