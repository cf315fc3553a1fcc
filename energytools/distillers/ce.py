"""No distillation: cross-entropy on the (possibly mixed) labels."""
from ..losses import mixed_cross_entropy
from .base import Distiller, register_method


@register_method("ce", teacher_logits=False)
class CrossEntropy(Distiller):
    def losses(self, logits, info):
        return {"ce": mixed_cross_entropy(logits, info.labels, info.partner_labels, info.lam,
                                   label_smoothing=info.label_smoothing)}
