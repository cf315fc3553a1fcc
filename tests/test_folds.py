"""Out-of-fold scores: `train --folds K` (a stratified, seeded split; K fold teachers; a stopped
run continues), `score --teacher DIR` (each train row by its fold's teacher, val by the mean of
the K), the refusals (a missing or foreign fold; one teacher wanted by distill and augment)."""
import numpy as np
import pytest

from energytools.errors import UserError
from energytools.folds import assign_folds


def test_the_split_is_stratified_deterministic_and_puts_each_sample_in_one_fold():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 203)
    ids = rng.permutation(1000)[:203]  # ids need not be positions
    folds = assign_folds(labels, ids, 5, seed=7)
    assert folds.shape == (203,) and set(folds.tolist()) == set(range(5))  # one fold each, every fold used
    assert np.ptp(np.bincount(folds)) <= 1  # fold sizes differ by at most one
    for c in range(4):  # and so do each class's counts per fold
        assert np.ptp(np.bincount(folds[labels == c], minlength=5)) <= 1
    assert np.array_equal(assign_folds(labels, ids, 5, seed=7), folds)  # the seed decides
    assert not np.array_equal(assign_folds(labels, ids, 5, seed=8), folds)
    order = rng.permutation(203)  # not the order the samples come in
    assert np.array_equal(assign_folds(labels[order], ids[order], 5, seed=7), folds[order])
    with pytest.raises(UserError, match="at least 2"):
        assign_folds(labels, ids, 1, seed=0)
    with pytest.raises(UserError, match="fewer than the folds"):
        assign_folds(labels[:3], ids[:3], 5, seed=0)
