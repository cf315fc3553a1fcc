"""Golden values: each loss against an independent float64 implementation."""
import numpy as np
import pytest
import torch

from energytools.losses import dkd_loss, kd_loss, mixed_cross_entropy


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(1)


def ref_kd(s, t, temps):
    temps = np.broadcast_to(temps, (len(s),))[:, None]
    return (kl(softmax(t / temps), softmax(s / temps)) * temps[:, 0] ** 2).mean()


def ref_dkd(s, t, y, alpha, beta, temps):
    temps = np.broadcast_to(temps, (len(s),))[:, None]
    ps, pt = softmax(s / temps), softmax(t / temps)
    idx = np.arange(len(s))
    bs = np.stack([ps[idx, y], 1 - ps[idx, y]], 1)
    bt = np.stack([pt[idx, y], 1 - pt[idx, y]], 1)
    tckd = kl(bt, bs)
    nckd = []
    for i in range(len(s)):
        keep = np.arange(s.shape[1]) != y[i]
        qs = softmax((s[i, keep] / temps[i])[None])
        qt = softmax((t[i, keep] / temps[i])[None])
        nckd.append(kl(qt, qs)[0])
    return ((alpha * tckd + beta * np.array(nckd)) * temps[:, 0] ** 2).mean()


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(0, 2, (16, 10)), rng.normal(0, 3, (16, 10)), rng.integers(0, 10, 16)


def t32(x):
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize("temps", [1.0, 4.0, "mixed"])
def test_kd_golden(logits, temps):
    s, t, _ = logits
    temps = np.random.default_rng(1).choice([2.0, 4.0, 6.0], 16) if temps == "mixed" else temps
    got = kd_loss(t32(s), t32(t), t32(temps) if isinstance(temps, np.ndarray) else temps)
    assert got.item() == pytest.approx(ref_kd(s, t, temps), rel=1e-5)


@pytest.mark.parametrize("temps", [1.0, 4.0, "mixed"])
def test_dkd_golden(logits, temps):
    s, t, y = logits
    temps = np.random.default_rng(2).choice([2.0, 4.0, 6.0], 16) if temps == "mixed" else temps
    got = dkd_loss(t32(s), t32(t), torch.tensor(y), 1.0, 8.0, t32(temps) if isinstance(temps, np.ndarray) else temps)
    assert got.item() == pytest.approx(ref_dkd(s, t, y, 1.0, 8.0, temps), rel=1e-4)


def test_one_hot_teacher(logits):
    s, _, y = logits
    t = np.full_like(s, -30.0)
    t[np.arange(16), y] = 30.0  # a (numerically) one-hot teacher
    assert kd_loss(t32(s), t32(t), 1.0).item() == pytest.approx(ref_kd(s, t, 1.0), rel=1e-4)
    assert np.isfinite(dkd_loss(t32(s), t32(t), torch.tensor(y), temperature=1.0).item())


def test_energy_kd_with_equal_temperatures_is_kd(logits):
    s, t, _ = logits
    assert kd_loss(t32(s), t32(t), torch.full((16,), 4.0)).item() == pytest.approx(kd_loss(t32(s), t32(t), 4.0).item())


def test_per_sample_form_and_mixed_ce(logits):
    s, t, y = logits
    per = kd_loss(t32(s), t32(t), 4.0, reduction="none")
    assert per.shape == (16,) and per.mean().item() == pytest.approx(kd_loss(t32(s), t32(t), 4.0).item())
    lam = torch.full((16,), 0.3)
    partner = torch.tensor((y + 1) % 10)
    mixed = mixed_cross_entropy(t32(s), torch.tensor(y), partner, lam)
    ce = torch.nn.functional.cross_entropy
    assert mixed.item() == pytest.approx((0.3 * ce(t32(s), torch.tensor(y)) + 0.7 * ce(t32(s), partner)).item(), rel=1e-5)
