"""Logit standardization presets (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024; code: sunshangquan/logit-standardization-KD).

Standardization itself is the ``standardize_logits`` option every logit method has
(``--standardize-logits``): each sample's teacher and student logits are z-scored before the
KD terms. These names are the method with the paper's defaults set: KD at base T 2 with KD
weight 9 (CE 0.1); DKD with alpha and beta times 9 (9, 72) at T 2 (CE 1, 20-epoch warm-up);
CTKD with KD weight 9 and CE 0.1 (the reference's CTKD+LS runs: ``CTKD/scripts/run_cifar_distill.sh``,
``-r 0.1 -a 9``), its learned temperature and reversal ramp as ``ctkd``'s.
The energy variants read each sample's T from its energy group as the base temperature on
standardized logits; the energies and groups are those of the raw teacher logits.
"""
from .base import register_method
from .ctkd import CTKD
from .dkd import DKD
from .kd import KD


@register_method("ls-kd")
class StandardizedKD(KD):
    defaults = {**KD.defaults, "kd_temperature": 2.0, "kd_weight": 9.0, "standardize_logits": True}


@register_method("ls-energy-kd", per_sample_temperature=True)
class StandardizedEnergyKD(StandardizedKD):
    """ls-kd with each sample's group temperature T_i as its base temperature."""


@register_method("ls-dkd")
class StandardizedDKD(DKD):
    defaults = {**DKD.defaults, "kd_temperature": 2.0, "dkd_alpha": 9.0, "dkd_beta": 72.0, "standardize_logits": True}


@register_method("ls-energy-dkd", per_sample_temperature=True)
class StandardizedEnergyDKD(StandardizedDKD):
    """ls-dkd with each sample's group temperature T_i as its base temperature."""


@register_method("ls-ctkd")
class StandardizedCTKD(CTKD):
    """ctkd on standardized logits with the KD weight of the reference's CTKD+LS runs (9; CE 0.1)."""

    defaults = {**CTKD.defaults, "kd_weight": 9.0, "standardize_logits": True}
