"""Pure math of out-of-distribution scoring: scores from logits, the threshold at a target
true-positive rate, AUROC and the false-positive rate at that threshold.

Convention (Liu et al., NeurIPS 2020; Hendrycks & Gimpel 2017): every OOD score is oriented
**higher = more in-distribution**, and in-distribution is the positive class. The energy score
is ``-E(x)`` at T = 1, i.e. ``logsumexp(z)``: the opposite sign of the score table's energy
columns (``energy`` at T_E, default 4; ``energy_t1`` at T = 1). A sample is flagged out of
distribution when its score is below the threshold that keeps a fraction ``tpr`` of
in-distribution samples. (pytorch-ood orients its scores the other way, "larger = more outlying".)
"""
from __future__ import annotations

import base64
import math

import numpy as np
import torch

#: the temperature of the energy OOD score: Liu et al.'s
OOD_ENERGY_TEMPERATURE = 1.0
OOD_SIGN_CONVENTION = ("higher = more in-distribution; ood = score < threshold; the energy score is -E at T = 1, "
                       "i.e. logsumexp(logits) = -energy_t1")
DEFAULT_TPR = 0.95

#: score name -> (the column of :func:`ood_statistics` and of the score table it is read from,
#: the sign that orients it higher = more in-distribution)
OOD_SCORES = {"energy": ("energy_t1", -1.0), "msp": ("confidence", 1.0), "max-logit": ("max_logit", 1.0)}


def ood_statistics(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The columns every OOD score is read from, of (N, C) logits, in float32: ``energy_t1``
    (``E = -logsumexp(z)``, the energy at T = 1 in the score table's sign: lower = more
    confident), ``max_logit`` and ``confidence`` (the max softmax probability, computed as the
    score table's ``confidence`` is)."""
    logits = logits.float()
    return {"energy_t1": -OOD_ENERGY_TEMPERATURE * torch.logsumexp(logits / OOD_ENERGY_TEMPERATURE, dim=1),
            "max_logit": logits.max(dim=1).values,
            "confidence": torch.log_softmax(logits, dim=1).exp().max(dim=1).values}


def oriented(columns: dict, score: str) -> np.ndarray:
    """OOD score ``score`` (higher = more in-distribution) from ``columns`` (:func:`ood_statistics`
    or a score table's), as float32."""
    column, sign = OOD_SCORES[score]
    values = columns[column]
    values = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return (np.float32(sign) * values.astype(np.float32)).astype(np.float32)


def kept_count(tpr: float, total: int) -> int:
    """How many of ``total`` in-distribution samples a threshold at ``tpr`` keeps: ceil(tpr * total)
    (rounded to 9 digits first, so 0.95 * 100 keeps 95, not 96)."""
    return int(math.ceil(round(tpr * total, 9)))


def threshold_at_tpr(in_scores: np.ndarray, tpr: float = DEFAULT_TPR) -> float:
    """The largest threshold ``t`` with ``mean(in_scores >= t) >= tpr``: the ``ceil(tpr * N)``-th
    largest in-distribution score (ties keep more). ``in_scores`` (N,) finite, N >= 1."""
    ordered = np.sort(np.asarray(in_scores, dtype=np.float64))[::-1]
    return float(ordered[max(kept_count(tpr, len(ordered)), 1) - 1])


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve with in-distribution as the positive class: the probability that
    an in-distribution score exceeds an OOD one, ties counting one half (Mann-Whitney U)."""
    in_scores, out_scores = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    _, inverse, counts = np.unique(np.concatenate([in_scores, out_scores]), return_inverse=True,
                                   return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # of each distinct value, 1-based
    rank_sum = average_rank[inverse[:len(in_scores)]].sum()
    n_in, n_out = len(in_scores), len(out_scores)
    return float((rank_sum - n_in * (n_in + 1) / 2.0) / (n_in * n_out))


def false_positive_rate(out_scores: np.ndarray, threshold: float) -> float:
    """The share of OOD samples kept as in-distribution (score >= threshold)."""
    return float(np.mean(np.asarray(out_scores, np.float64) >= threshold))


def encode_scores(values: np.ndarray) -> str:
    """(N,) scores as base64 of float32 little-endian bytes: compact and exact in JSON metadata."""
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_scores(text: str) -> np.ndarray:
    """The inverse of :func:`encode_scores`: a (N,) float32 array."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()
