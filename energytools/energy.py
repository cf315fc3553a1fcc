"""Pure math on logits: energy, confidence, entropy, margin; groups and temperatures.

Convention (stored with every table): E(x) = -T_E * logsumexp(z / T_E). Low (more
negative) energy means large logits, i.e. a confident teacher.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import UserError

GROUPS = ("low", "mid", "high")
SIGN_CONVENTION = "E = -T_E * logsumexp(logits / T_E); lower energy = more confident"


def energy(logits: torch.Tensor, energy_temperature: float = 4.0) -> torch.Tensor:
    """Per-row energy ``-T_E * logsumexp(z / T_E)`` of (N, C) logits."""
    return -energy_temperature * torch.logsumexp(logits / energy_temperature, dim=1)


def logit_statistics(logits: torch.Tensor, labels: torch.Tensor, energy_temperature: float = 4.0) -> dict:
    """Every per-sample column of the score table that derives from logits.

    ``confidence`` is the max softmax probability, ``true_prob`` the softmax probability of
    the label, ``entropy`` the softmax entropy in nats and ``margin`` the gap between the two
    largest softmax probabilities. Computed in float32 whatever the logits' dtype.
    """
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0])
    pred = logits.argmax(dim=1)
    return {
        "pred": pred,
        "correct": pred == labels,
        "energy": energy(logits, energy_temperature),
        "confidence": top2[:, 0],
        "true_prob": probs.gather(1, labels.view(-1, 1)).squeeze(1),
        "entropy": -(probs * log_probs).sum(dim=1),
        "margin": top2[:, 0] - second,
    }


def _count(fraction: float, total: int) -> int:
    # round to 9 digits first so 0.29 * 100 counts 29, not 28
    return int(math.floor(round(fraction * total, 9)))


@dataclass(frozen=True)
class Thresholds:
    """Energy cut points of a reference set: ``low`` = E <= low_max, ``high`` = E >= high_min."""

    low_frac: float
    high_frac: float
    low_max: float
    high_min: float

    def to_dict(self) -> dict:
        return {"low_frac": self.low_frac, "high_frac": self.high_frac,
                "low_max": self.low_max, "high_min": self.high_min}


def check_fractions(low_frac: float, high_frac: float) -> None:
    for name, value in (("--low-frac", low_frac), ("--high-frac", high_frac)):
        if not 0 <= value < 1:
            raise UserError(f"{name} must be in [0, 1), got {value}")
    if low_frac + high_frac >= 1:
        raise UserError(f"--low-frac + --high-frac must be < 1, got {low_frac} + {high_frac}")


def rank_groups(energies: np.ndarray, sample_ids: np.ndarray, low_frac: float, high_frac: float):
    """Assign groups by rank so counts are exact, ties broken by ``sample_id``.

    The lowest ``floor(low_frac * N)`` samples in (energy, sample_id) order are "low",
    the highest ``floor(high_frac * N)`` are "high", the rest "mid". Returns
    ``(groups as an array of str, Thresholds, ranks)`` where ``ranks`` is each sample's
    position in (energy, sample_id) order scaled to [0, 1] (the ``rank`` rule's input).
    """
    check_fractions(low_frac, high_frac)
    total = len(energies)
    if total == 0:
        raise UserError("cannot compute energy groups of an empty set")
    order = np.lexsort((sample_ids, energies))
    n_low, n_high = _count(low_frac, total), _count(high_frac, total)
    groups = np.full(total, "mid", dtype=object)
    groups[order[:n_low]] = "low"
    groups[order[total - n_high:]] = "high"
    ranks = np.empty(total)
    ranks[order] = np.arange(total) / max(total - 1, 1)
    sorted_e = energies[order]
    thresholds = Thresholds(low_frac, high_frac,
                            low_max=float(sorted_e[n_low - 1]) if n_low else float("-inf"),
                            high_min=float(sorted_e[total - n_high]) if n_high else float("inf"))
    return groups, thresholds, ranks


def groups_from_thresholds(energies, thresholds: Thresholds | dict) -> np.ndarray:
    """Groups of new samples (test split, augmented images) against reference thresholds."""
    if isinstance(thresholds, dict):
        thresholds = Thresholds(**thresholds)
    energies = np.asarray(energies, dtype=np.float64)
    groups = np.full(len(energies), "mid", dtype=object)
    groups[energies <= thresholds.low_max] = "low"
    groups[energies >= thresholds.high_min] = "high"
    return groups


# --- temperature rules: energy -> per-sample KD temperature ------------------------------

#: name -> rule(energies, groups, ranks in [0, 1], temperatures (low, mid, high)) -> T per sample
TEMPERATURE_RULES: dict[str, Callable] = {}


def register_rule(name: str):
    def decorator(fn):
        TEMPERATURE_RULES[name] = fn
        return fn
    return decorator


@register_rule("groups")
def _groups_rule(groups: np.ndarray, ranks: np.ndarray, temperatures: tuple[float, float, float]) -> np.ndarray:
    """The paper's rule: one temperature per energy group."""
    lookup = dict(zip(GROUPS, temperatures))
    return np.array([lookup[g] for g in groups], dtype=np.float32)


@register_rule("rank")
def _rank_rule(groups: np.ndarray, ranks: np.ndarray, temperatures: tuple[float, float, float]) -> np.ndarray:
    """A continuous variant: T moves linearly with the energy rank from T_low to T_high."""
    low, _, high = temperatures
    return (low + (high - low) * ranks).astype(np.float32)


def parse_temperatures(text) -> tuple[float, float, float]:
    """'6,4,2' -> (6.0, 4.0, 2.0), the temperatures of the low, mid and high groups."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p for p in str(text).split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UserError(f"--temperatures takes three numbers low,mid,high such as 6,4,2; got {text!r}") from None
    if len(values) != 3:
        raise UserError(f"--temperatures takes three numbers low,mid,high such as 6,4,2; got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"temperatures must be positive, got {text!r}")
    return values


def assign_temperatures(groups: np.ndarray, ranks: np.ndarray, temperatures, rule: str = "groups") -> np.ndarray:
    """Per-sample temperatures from groups (and energy ranks in [0, 1] for ``rank``)."""
    if rule not in TEMPERATURE_RULES:
        raise UserError(f"unknown temperature rule {rule!r}; choose from {', '.join(TEMPERATURE_RULES)}")
    return TEMPERATURE_RULES[rule](np.asarray(groups), np.asarray(ranks, dtype=np.float64),
                                   parse_temperatures(temperatures))


def energy_ranks(energies: np.ndarray, reference_sorted: np.ndarray) -> np.ndarray:
    """Rank of each energy within a sorted reference set, scaled to [0, 1]."""
    if len(reference_sorted) <= 1:
        return np.zeros(len(energies))
    return np.searchsorted(reference_sorted, energies, side="left").clip(0, len(reference_sorted) - 1) / (
        len(reference_sorted) - 1)
