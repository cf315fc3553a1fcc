"""Deterministic subsets: the validation carve, the long tail, and --limit.

None of these depend on the run seed, so every stage of a pipeline sees the same samples.
"""
from __future__ import annotations

import math

import numpy as np

#: fraction of each class of the training file held out for model selection
VAL_FRACTION = 0.1
_CARVE_SEED = 20231124
_LIMIT_SEED = 7


def _per_class_positions(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def carve_validation(labels: np.ndarray, num_classes: int, fraction: float = VAL_FRACTION):
    """Split positions of a training file into (train, val), stratified per class.

    Each class contributes ``round(fraction * n_c)`` samples to val, chosen by a fixed
    permutation (independent of any run seed). Both outputs are sorted positions.
    """
    rng = np.random.default_rng(_CARVE_SEED)
    val = []
    for positions in _per_class_positions(labels, num_classes):
        count = int(round(fraction * len(positions)))
        val.append(rng.permutation(positions)[:count])
    val = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def long_tail_counts(class_counts: np.ndarray, imbalance_factor: float) -> np.ndarray:
    """Per-class counts of the CIFAR-LT recipe: n_c = floor(n_max * F^(-c / (C - 1)))."""
    num_classes = len(class_counts)
    n_max = int(class_counts.max())
    if num_classes == 1:
        return np.minimum(class_counts, n_max)
    wanted = [math.floor(n_max * imbalance_factor ** (-c / (num_classes - 1)) + 1e-9) for c in range(num_classes)]
    return np.minimum(class_counts, np.array(wanted, dtype=np.int64))


def long_tail(labels: np.ndarray, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """Positions kept by the long-tail recipe: the first n_c samples of class c in order."""
    groups = _per_class_positions(labels, num_classes)
    counts = long_tail_counts(np.array([len(g) for g in groups]), imbalance_factor)
    return np.sort(np.concatenate([g[:n] for g, n in zip(groups, counts)]))


def stratified_limit(labels: np.ndarray, num_classes: int, limit: int) -> np.ndarray:
    """Positions of a class-stratified subset of exactly ``min(limit, N)`` samples.

    Quotas are proportional to class sizes (largest remainder); within a class samples are
    taken in a fixed permuted order. Returned sorted.
    """
    groups = _per_class_positions(labels, num_classes)
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    total = int(sizes.sum())
    if limit >= total:
        return np.arange(len(labels))
    exact = sizes * limit / total
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.lexsort((np.arange(num_classes), -(exact - quota)))
    quota[remainder_order[: limit - int(quota.sum())]] += 1
    rng = np.random.default_rng(_LIMIT_SEED)
    keep = [rng.permutation(g)[:q] for g, q in zip(groups, quota)]
    return np.sort(np.concatenate(keep))
