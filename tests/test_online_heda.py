import numpy as np
import pytest
import torch

from energytools.losses import kd_loss
from energytools.online_heda import mix_high_energy, mixed_kd_term


def test_cutmix_stays_inside_the_high_energy_samples():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 8, 8).clone()
    high = torch.tensor([False, True, False, True, True, False])
    mixed, lam = mix_high_energy(images, high, np.random.default_rng(0))
    assert mixed.shape == (3, 1, 8, 8) and 0 <= lam <= 1
    for row, source in zip(mixed, (1.0, 3.0, 4.0)):
        values = set(row.unique().tolist())
        assert source in values or lam == 0  # its own pixels outside the box
        assert values <= {1.0, 3.0, 4.0} and len(values) <= 2  # a partner from the high set only
        if len(values) == 2:
            partner = (values - {source}).pop()
            assert (row == partner).float().mean().item() == pytest.approx(1 - lam)  # the box covers 1 - lam
    assert mix_high_energy(images, torch.tensor([True] + [False] * 5), np.random.default_rng(0)) is None


def test_the_mixed_term_is_kd_at_t4_on_the_mixed_images():
    torch.manual_seed(0)
    student, teacher = torch.nn.Conv2d(1, 3, 8), torch.nn.Conv2d(1, 3, 8)
    images = torch.randn(6, 1, 8, 8)
    high = torch.tensor([True, True, False, True, False, False])
    term = mixed_kd_term(lambda x: student(x).flatten(1), lambda x: teacher(x).flatten(1), images, high,
                         np.random.default_rng(3), weight=0.9)
    mixed, _ = mix_high_energy(images, high, np.random.default_rng(3))
    expected = 0.9 * kd_loss(student(mixed).flatten(1), teacher(mixed).flatten(1), 4.0)
    torch.testing.assert_close(term, expected)
