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


#: reduction -> how per-sample values become the returned loss (torch's names)
REDUCTIONS = {"mean": torch.mean, "sum": torch.sum, "none": lambda values: values}


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction](values)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) in float32; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _per_sample_t(temperature, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample temperatures in float32, or float64 for float64 logits (never bf16/fp16)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if isinstance(temperature, (int, float)):  # filled on the device: no host-to-device copy per step
        return torch.full((logits.shape[0],), float(temperature), dtype=dtype, device=logits.device)
    t = torch.as_tensor(temperature, dtype=dtype, device=logits.device)
    return t.expand(logits.shape[0]) if t.ndim == 0 else t


def mixed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, partner: torch.Tensor | None = None,
                        lam: torch.Tensor | None = None, reduction: str = "mean",
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """``lam * CE(logits, target) + (1 - lam) * CE(logits, partner)``; plain CE without a partner.
    ``label_smoothing`` as ``F.cross_entropy``'s (0: none)."""
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    if partner is not None and lam is not None:
        ce = lam * ce + (1 - lam) * F.cross_entropy(logits, partner, reduction="none", label_smoothing=label_smoothing)
    return _reduce(ce, reduction)


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature=4.0,
            reduction: str = "mean") -> torch.Tensor:
    """Hinton KD: ``T_i^2 * KL(softmax(z_t / T_i) || softmax(z_s / T_i))``, KL summed over classes."""
    logits_student, logits_teacher = _at_least_float32(logits_student), _at_least_float32(logits_teacher)
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
    logits_student, logits_teacher = _at_least_float32(logits_student), _at_least_float32(logits_teacher)
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


# --- per-sample temperature rules of other papers (docs/methods.md) --------------------------

def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row z-scored,
    ``(z - mean(z)) / (eps + std(z))`` with the unbiased std (torch's default), as the
    reference code does. Applied to teacher and student logits before a KD loss."""
    logits = _at_least_float32(logits)
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (eps + logits.std(dim=-1, keepdim=True))


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``weight`` (CTKD's
    gradient-reversal layer, whose weight runs from 0 to -1, so the gradient is reversed)."""

    @staticmethod
    def forward(ctx, x, weight: float):
        ctx.weight = weight
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None


def scale_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """``x`` unchanged, its gradient times ``weight`` (negative: a gradient-reversal layer)."""
    return _ReverseGradient.apply(x, weight)


def ctkd_reversal_weight(epoch: int, epochs: int = 10, final: float = 1.0) -> float:
    """CTKD's gradient-reversal weight at (1-based) ``epoch``: a cosine from 0 to ``-final``
    over ``epochs`` epochs, then ``-final`` (the reference's CosineDecay(0, -1, 10))."""
    import math

    if epochs <= 0:
        return -final
    i = min(max(epoch, 0), epochs)
    return -final * (1 - (math.cos(i * math.pi / epochs) + 1) / 2)


def ctkd_temperature(theta: torch.Tensor, t_start: float = 1.0, t_end: float = 20.0) -> torch.Tensor:
    """CTKD's learnable global temperature ``t_start + t_end * sigmoid(theta)``."""
    return t_start + t_end * torch.sigmoid(theta)


def dtkd_temperatures(logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                      temperature=4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DTKD's per-sample (teacher, student) temperatures: ``T_t = 2 max(z_t) / (max(z_t) +
    max(z_s)) * T`` and ``T_s = 2 max(z_s) / (max(z_t) + max(z_s)) * T``, each of shape (B,).
    As in the reference code the student's max is not detached (gradients flow through it)."""
    t = _per_sample_t(temperature, logits_student)
    max_s, max_t = logits_student.max(dim=1).values, logits_teacher.max(dim=1).values
    total = max_t + max_s
    return 2 * max_t / total * t, 2 * max_s / total * t


def dtkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature=4.0, alpha: float = 3.0,
              beta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """DTKD's distillation terms: ``alpha * T_t T_s KL(softmax(z_t / T_t) || softmax(z_s / T_s))
    + beta * T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` (KL summed over classes)."""
    logits_student, logits_teacher = _at_least_float32(logits_student), _at_least_float32(logits_teacher)
    t_t, t_s = dtkd_temperatures(logits_student, logits_teacher, temperature)
    log_p_s = F.log_softmax(logits_student / t_s.unsqueeze(1), dim=1)
    log_p_t = F.log_softmax(logits_teacher / t_t.unsqueeze(1), dim=1)
    dynamic = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * t_t * t_s
    return _reduce(alpha * dynamic + beta * kd_loss(logits_student, logits_teacher, temperature, "none"), reduction)
