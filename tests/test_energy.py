import numpy as np
import torch

from energytools.energy import (assign_temperatures, groups_from_thresholds, logit_statistics, parse_temperatures,
                                rank_groups)


def test_statistics_match_float64():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (64, 10))
    y = rng.integers(0, 10, 64)
    stats = logit_statistics(torch.tensor(z, dtype=torch.float32), torch.tensor(y), energy_temperature=4.0)
    zt = z / 4.0
    energy = -4.0 * (np.log(np.exp(zt - zt.max(1, keepdims=True)).sum(1)) + zt.max(1))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.sort(p, 1)
    np.testing.assert_allclose(stats["energy"].numpy(), energy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["confidence"].numpy(), top[:, -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["margin"].numpy(), top[:, -1] - top[:, -2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["entropy"].numpy(), -(p * np.log(p)).sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["true_prob"].numpy(), p[np.arange(64), y], rtol=1e-5, atol=1e-6)
    assert (stats["pred"].numpy() == z.argmax(1)).all()


def test_groups_are_exact_with_ties():
    energies = np.array([1.0] * 7 + [2.0] * 6 + [3.0] * 7)  # 20 samples, heavy ties
    ids = np.arange(100, 120)[::-1].copy()
    groups, thresholds, _ = rank_groups(energies, ids, 0.25, 0.25)
    assert (groups == "low").sum() == 5 and (groups == "high").sum() == 5
    # ties broken by sample_id: among energy 1.0 the five smallest ids are low
    low_ids = sorted(ids[groups == "low"])
    assert low_ids == sorted(ids[:7])[:5]
    assert thresholds.low_max == 1.0 and thresholds.high_min == 3.0
    assert list(groups_from_thresholds([0.5, 2.0, 3.5], thresholds)) == ["low", "mid", "high"]


def test_group_counts_use_exact_fractions():
    groups, _, _ = rank_groups(np.arange(100.0), np.arange(100), 0.29, 0.3)
    assert (groups == "low").sum() == 29 and (groups == "high").sum() == 30


def test_temperature_rules():
    groups = np.array(["low", "mid", "high"])
    assert assign_temperatures(groups, np.zeros(3), "6,4,2").tolist() == [6, 4, 2]
    assert assign_temperatures(groups, np.array([0, 0.5, 1]), (2, 4, 6), "rank").tolist() == [2, 4, 6]
    assert parse_temperatures("2,4,6") == (2.0, 4.0, 6.0)
