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
#: the label of a sample that has none (score writes it as null)
NO_LABEL = -1
SIGN_CONVENTION = "E = -T_E * logsumexp(logits / T_E); lower energy = more confident"


def energy(logits: torch.Tensor, energy_temperature: float = 4.0) -> torch.Tensor:
    """Per-row energy ``-T_E * logsumexp(z / T_E)`` of (N, C) logits."""
    return -energy_temperature * torch.logsumexp(logits / energy_temperature, dim=1)


def logit_statistics(logits: torch.Tensor, labels: torch.Tensor, energy_temperature: float = 4.0) -> dict:
    """Every per-sample column of the score table that derives from logits.

    ``confidence`` is the max softmax probability, ``true_prob`` the softmax probability of
    the label, ``entropy`` the softmax entropy in nats, ``margin`` the gap between the two
    largest softmax probabilities and ``el2n`` the L2 norm of softmax minus the one-hot label
    (Paul et al. 2021's EL2N, from this one teacher rather than an ensemble of early students).
    A label of :data:`NO_LABEL` (-1) marks a sample without one: its ``true_prob`` and ``el2n``
    are NaN and ``correct`` False (the score table stores all three as null).
    Computed in float32 whatever the logits' dtype.
    """
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0])
    pred = logits.argmax(dim=1)
    labels = labels.long()
    labelled = labels >= 0
    known = labels.clamp(min=0)  # a stand-in class for the unlabelled rows, whose values become NaN
    missing = torch.tensor(float("nan"))
    return {
        "pred": pred,
        "correct": (pred == labels) & labelled,
        "energy": energy(logits, energy_temperature),
        "confidence": top2[:, 0],
        "true_prob": torch.where(labelled, probs.gather(1, known.view(-1, 1)).squeeze(1), missing),
        "entropy": -(probs * log_probs).sum(dim=1),
        "margin": top2[:, 0] - second,
        "el2n": torch.where(labelled, (probs - torch.nn.functional.one_hot(known, probs.shape[1])).norm(dim=1),
                            missing),
    }


def _count(fraction: float, total: int) -> int:
    # round to 9 digits first so 0.29 * 100 counts 29, not 28
    return int(math.floor(round(fraction * total, 9)))


def check_fractions(low_frac: float, high_frac: float) -> None:
    for name, value in (("low_frac", low_frac), ("high_frac", high_frac)):
        if not 0 <= value < 1:
            raise UserError(f"{name} must be in [0, 1), got {value}")
    if low_frac + high_frac >= 1:
        raise UserError(f"low_frac + high_frac must be < 1, got {low_frac} + {high_frac}")


def parse_temperatures(text) -> tuple[float, float, float]:
    """'6,4,2' -> (6.0, 4.0, 2.0), the temperatures of the low, mid and high groups."""
    if isinstance(text, dict):
        text = [text.get(g) for g in GROUPS]
    parts = list(text) if isinstance(text, (list, tuple)) else [p for p in str(text).split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise UserError(f"temperatures take three numbers low,mid,high such as 6,4,2; got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"temperatures must be positive, got {text!r}")
    return values


def keys_below(ref_energies: np.ndarray, ref_ids: np.ndarray, energies: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each ``(energy, sample_id)`` key, how many reference keys are strictly smaller.

    Keys compare by energy, then by sample_id: the one tie-break of every grouping. For a
    reference sample this is its own position in (energy, sample_id) order.
    """
    energies = np.asarray(energies, dtype=np.float64)
    all_energies = np.concatenate([energies, np.asarray(ref_energies, dtype=np.float64)])
    all_ids = np.concatenate([np.asarray(ids, dtype=np.int64), np.asarray(ref_ids, dtype=np.int64)])
    is_ref = np.concatenate([np.zeros(len(energies), bool), np.ones(len(ref_energies), bool)])
    # on an equal key the query sorts first, so only strictly smaller reference keys precede it
    order = np.lexsort((is_ref, all_ids, all_energies))
    ref_sorted = is_ref[order]
    refs_before = np.cumsum(ref_sorted) - ref_sorted
    below = np.empty(len(energies), dtype=np.int64)
    below[order[~ref_sorted]] = refs_before[~ref_sorted]
    return below


# --- temperature rules: energy rank -> per-sample KD temperature -------------------------

#: name -> rule(groups, ranks in [0, 1], temperatures (low, mid, high)) -> T per sample
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


@dataclass(frozen=True)
class TemperatureRule:
    """How energies become groups and KD temperatures: the one rule of score, augment and distill.

    ``low`` is the lowest ``floor(low_frac * N)`` of a reference set of N samples in
    (energy, sample_id) order, ``high`` the highest ``floor(high_frac * N)``, ``mid`` the rest.
    ``rule`` maps a sample's group (``groups``) or its rank (``rank``) to a temperature.
    """

    temperatures: tuple[float, float, float] = (6.0, 4.0, 2.0)
    low_frac: float = 0.2
    high_frac: float = 0.2
    rule: str = "groups"

    def __post_init__(self) -> None:
        check_fractions(self.low_frac, self.high_frac)
        object.__setattr__(self, "temperatures", parse_temperatures(self.temperatures))
        if self.rule not in TEMPERATURE_RULES:
            raise UserError(f"unknown temperature rule {self.rule!r}; choose from {', '.join(TEMPERATURE_RULES)}")

    def fit(self, energies: np.ndarray, sample_ids: np.ndarray) -> "EnergyGroups":
        """Fix the group boundaries on a reference set (the training split's energies)."""
        if len(energies) == 0:
            raise UserError("cannot compute energy groups of an empty set")
        order = np.lexsort((sample_ids, energies))
        return EnergyGroups(self, np.asarray(energies, dtype=np.float64)[order],
                            np.asarray(sample_ids, dtype=np.int64)[order])

    def to_dict(self) -> dict:
        return {"temperatures": dict(zip(GROUPS, self.temperatures)), "low_frac": self.low_frac,
                "high_frac": self.high_frac, "rule": self.rule}


@dataclass(frozen=True)
class EnergyGroups:
    """A :class:`TemperatureRule` fitted on a reference set: assigns groups and temperatures to
    any samples (the reference itself, augmented images, test samples, online views)."""

    rule: TemperatureRule
    ref_energies: np.ndarray  # sorted by (energy, sample_id)
    ref_ids: np.ndarray

    @property
    def counts(self) -> tuple[int, int]:
        """(low count, high count) of the reference set."""
        total = len(self.ref_energies)
        return _count(self.rule.low_frac, total), _count(self.rule.high_frac, total)

    @property
    def thresholds(self) -> dict:
        """The boundary energies, for people and plots: low <= low_max, high >= high_min."""
        n_low, n_high = self.counts
        total = len(self.ref_energies)
        return {"low_max": float(self.ref_energies[n_low - 1]) if n_low else float("-inf"),
                "high_min": float(self.ref_energies[total - n_high]) if n_high else float("inf")}

    def assign(self, energies: np.ndarray, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(groups as str array, float32 temperatures)`` of samples keyed by (energy, sample_id)."""
        below = keys_below(self.ref_energies, self.ref_ids, energies, sample_ids)
        total = len(self.ref_energies)
        n_low, n_high = self.counts
        groups = np.full(len(below), "mid", dtype=object)
        groups[below < n_low] = "low"
        groups[below >= total - n_high] = "high"
        ranks = np.minimum(below, total - 1) / max(total - 1, 1)
        temperatures = TEMPERATURE_RULES[self.rule.rule](groups, ranks, self.rule.temperatures)
        return groups, temperatures
