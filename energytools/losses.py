"""Distillation losses as pure functions with a per-sample form.

Every function returns one value per sample when ``reduction="none"`` and the batch mean
otherwise. ``temperature`` may be a float or a tensor of shape (B,): a per-sample
temperature is what Energy KD adds to KD and DKD.

The KD losses compute in float32 whatever the logits' dtype (bf16 under autocast): the
temperatures, the division, softmax/logsumexp and the KL. They make no host read and no
data-dependent shape, so a step does not wait for the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values.sum() if reduction == "sum" else values


def _per_sample_t(temperature, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample temperatures in float32 (never the logits' bf16/fp16)."""
    if isinstance(temperature, (int, float)):  # filled on the device: no host-to-device copy per step
        return torch.full((logits.shape[0],), float(temperature), dtype=torch.float32, device=logits.device)
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    return t.expand(logits.shape[0]) if t.ndim == 0 else t


def mixed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, partner: torch.Tensor | None = None,
                        lam: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """``lam * CE(logits, target) + (1 - lam) * CE(logits, partner)``; plain CE without a partner."""
    ce = F.cross_entropy(logits, target, reduction="none")
    if partner is not None and lam is not None:
        ce = lam * ce + (1 - lam) * F.cross_entropy(logits, partner, reduction="none")
    return _reduce(ce, reduction)


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature=4.0,
            reduction: str = "mean") -> torch.Tensor:
    """Hinton KD: ``T_i^2 * KL(softmax(z_t / T_i) || softmax(z_s / T_i))``, KL summed over classes."""
    logits_student, logits_teacher = logits_student.float(), logits_teacher.float()
    t = _per_sample_t(temperature, logits_student).unsqueeze(1)
    log_p_s = F.log_softmax(logits_student / t, dim=1)
    log_p_t = F.log_softmax(logits_teacher / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return _reduce(kl * t.squeeze(1) ** 2, reduction)


def _binary_kl(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """KL between the (target, not-target) two-point distributions."""
    q_t, q_s = 1 - p_t, 1 - p_s
    eps = torch.finfo(p_s.dtype).tiny
    return (torch.xlogy(p_t, p_t) - p_t * torch.log(p_s.clamp_min(eps))
            + torch.xlogy(q_t, q_t) - q_t * torch.log(q_s.clamp_min(eps)))


def dkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature=4.0, reduction: str = "mean") -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, both scaled by ``T_i^2``.

    TCKD is the KL between the binary (target vs. rest) distributions; NCKD the KL between the
    distributions over the non-target classes alone.
    """
    logits_student, logits_teacher = logits_student.float(), logits_teacher.float()
    t = _per_sample_t(temperature, logits_student).unsqueeze(1)
    gt = F.one_hot(target, logits_student.shape[1]).bool()
    p_s = F.softmax(logits_student / t, dim=1)
    p_t = F.softmax(logits_teacher / t, dim=1)
    index = target.unsqueeze(1)  # gather, not p[gt]: a boolean index waits for the device
    tckd = _binary_kl(p_t.gather(1, index).squeeze(1), p_s.gather(1, index).squeeze(1))
    neg_inf = torch.finfo(logits_student.dtype).min
    log_q_s = F.log_softmax((logits_student / t).masked_fill(gt, neg_inf), dim=1)
    log_q_t = F.log_softmax((logits_teacher / t).masked_fill(gt, neg_inf), dim=1)
    nckd = torch.where(gt, 0.0, log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1)
    return _reduce((alpha * tckd + beta * nckd) * t.squeeze(1) ** 2, reduction)
