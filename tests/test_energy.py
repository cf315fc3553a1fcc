import numpy as np
import torch

import pytest

from energytools.energy import TemperatureRule, keys_below, logit_statistics, parse_temperatures
from energytools.errors import UserError


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
    np.testing.assert_allclose(stats["el2n"].numpy(), np.linalg.norm(p - np.eye(10)[y], axis=1), rtol=1e-5, atol=1e-6)
    assert (stats["pred"].numpy() == z.argmax(1)).all()


def test_groups_are_exact_with_ties():
    energies = np.array([1.0] * 7 + [2.0] * 6 + [3.0] * 7)  # 20 samples, heavy ties
    ids = np.arange(100, 120)[::-1].copy()
    fitted = TemperatureRule((6, 4, 2), 0.25, 0.25).fit(energies, ids)
    groups, temps = fitted.assign(energies, ids)
    assert (groups == "low").sum() == 5 and (groups == "high").sum() == 5
    # ties broken by sample_id: among energy 1.0 the five smallest ids are low
    assert sorted(ids[groups == "low"]) == sorted(ids[:7])[:5]
    assert sorted(ids[groups == "high"]) == sorted(ids[13:])[2:]
    assert fitted.thresholds == {"low_max": 1.0, "high_min": 3.0}
    assert temps.tolist() == [{"low": 6, "mid": 4, "high": 2}[g] for g in groups]


def test_new_samples_follow_the_tables_rule_at_ties():
    """A tie at a boundary: the table splits it by sample_id, and so does any new sample with the
    same energy (a shard row, an online view), so one (energy, id) has one temperature everywhere."""
    energies = np.array([1.0] * 7 + [2.0] * 6 + [3.0] * 7)
    ids = np.arange(20)
    fitted = TemperatureRule((6, 4, 2), 0.25, 0.25).fit(energies, ids)
    table_groups, _ = fitted.assign(energies, ids)
    # the same keys assigned one at a time, as the shards and online mode do, give the same groups
    one_by_one = [fitted.assign(energies[i:i + 1], ids[i:i + 1])[0][0] for i in range(20)]
    assert list(table_groups) == one_by_one
    # a new id at the tied boundary energy: low only below the last low key
    new_groups, _ = fitted.assign(np.array([1.0, 1.0, 0.5, 3.0, 3.5, 2.0]), np.array([-1, 99, 99, 99, -5, 7]))
    assert list(new_groups) == ["low", "mid", "low", "high", "high", "mid"]


def test_keys_below_counts_strictly_smaller_keys():
    ref_e, ref_ids = np.array([1.0, 1.0, 2.0]), np.array([5, 7, 1])
    got = keys_below(ref_e, ref_ids, np.array([0.0, 1.0, 1.0, 1.0, 2.0, 9.0]), np.array([0, 5, 6, 8, 1, 0]))
    assert got.tolist() == [0, 0, 1, 2, 2, 3]


def test_group_counts_use_exact_fractions():
    fitted = TemperatureRule(low_frac=0.29, high_frac=0.3).fit(np.arange(100.0), np.arange(100))
    groups, _ = fitted.assign(np.arange(100.0), np.arange(100))
    assert (groups == "low").sum() == 29 and (groups == "high").sum() == 30


def test_temperature_rules():
    energies, ids = np.array([0.0, 1.0, 2.0]), np.arange(3)
    _, temps = TemperatureRule("6,4,2", 1 / 3, 1 / 3).fit(energies, ids).assign(energies, ids)
    assert temps.tolist() == [6, 4, 2]
    _, temps = TemperatureRule((2, 4, 6), 1 / 3, 1 / 3, "rank").fit(energies, ids).assign(energies, ids)
    assert temps.tolist() == [2, 4, 6]
    assert parse_temperatures("2,4,6") == (2.0, 4.0, 6.0)
    for bad in ("2,4", "0,4,2", "a,b,c"):
        with pytest.raises(UserError, match="temperatures"):
            TemperatureRule(bad)
    with pytest.raises(UserError, match="rule"):
        TemperatureRule(rule="nope")
