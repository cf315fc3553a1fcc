import json

import numpy as np
import pytest
import torch

from conftest import StepRecorder
from energytools.losses import kd_loss
from energytools.distillers import METHODS
from energytools.distillers.online_heda import OnlineHEDA, mix_high_energy, mixed_kd_term


def test_cutmix_stays_inside_the_high_energy_samples():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 8, 8).clone()
    high = torch.tensor([False, True, False, True, True, False])
    mixed, weights, lam = mix_high_energy(images, high, np.random.default_rng(0))
    assert mixed.shape == (6, 1, 8, 8) and 0 <= lam <= 1
    assert weights.tolist() == high.float().tolist()  # the term counts the high rows only
    assert torch.equal(mixed[~high], images[~high])  # the others stay as they were
    for row, source in zip(mixed[high], (1.0, 3.0, 4.0)):
        values = set(row.unique().tolist())
        assert source in values or lam == 0  # its own pixels outside the box
        assert values <= {1.0, 3.0, 4.0} and len(values) <= 2  # a partner from the high set only
        if len(values) == 2:
            partner = (values - {source}).pop()
            assert (row == partner).float().mean().item() == pytest.approx(1 - lam)  # the box covers 1 - lam
    alone = mix_high_energy(images, torch.tensor([True] + [False] * 5), np.random.default_rng(0))
    assert alone.weights.sum() == 0 and torch.equal(alone.images, images)  # one high sample: nothing mixed


def test_the_mixed_term_is_kd_at_t4_on_the_mixed_images():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    torch.testing.assert_close(mixed_kd_term(student, teacher, weight=0.9), 0.9 * kd_loss(student, teacher, 4.0))
    # the golden value of one row: T^2 KL(softmax(t/4) || softmax(s/4)) at T = 4
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    p, q = torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)
    assert mixed_kd_term(s, t, 1.0).item() == pytest.approx(16 * (p * (p / q).log()).sum().item(), rel=1e-6)


def test_the_student_sees_the_batch_and_the_mixed_images_in_one_forward():
    calls = []

    def forward(images):
        calls.append(len(images))
        return images.flatten(1)[:, :3] * 2

    inner = METHODS["kd"].build(torch.nn.Identity(), {})
    heda = OnlineHEDA(inner, teacher=lambda x: x.flatten(1)[:, :3], weight=0.5, seed=0)
    images = torch.randn(3, 1, 4, 4)
    mixed, kept = heda.mix(images, 0, torch.tensor([True, True, False])), {}
    logits = heda.joint_forward(forward, mixed, kept)(images)
    assert calls == [6] and torch.equal(logits, images.flatten(1)[:, :3] * 2)  # the batch's shape: no host read
    rows = mixed.images[:2].flatten(1)[:, :3]  # the term: KD over the two high rows only
    expected = 0.5 * kd_loss(rows * 2, rows, 4.0)
    torch.testing.assert_close(heda.loss(mixed, kept, logits), expected)
    nothing = OnlineHEDA(inner, teacher=lambda x: x.flatten(1)[:, :3], weight=0.5, seed=0)
    alone, kept = nothing.mix(images, 0, torch.tensor([True, False, False])), {}
    logits = nothing.joint_forward(forward, alone, kept)(images)
    assert nothing.loss(alone, kept, logits).item() == 0 and nothing.loss(None, {}, logits).item() == 0


# --- --he-da online in distill -----------------------------------------------------------------

def _distill(scores, out, **options):
    from energytools.config import DistillConfig, TrainConfig
    from energytools.stages.distill import distill

    train = TrainConfig(epochs=options.pop("epochs", 1), batch_size=64, seed=options.pop("seed", 0))
    on_step = options.pop("on_step", None)
    return distill(DistillConfig(scores=str(scores), student="cnn_tiny", out=str(out), method="kd",
                                 cached_logits=True, train=train, **options), on_step=on_step)


def test_online_he_da_mixes_the_batchs_high_energy_samples(digits_run, tmp_path, monkeypatch):
    import polars as pl

    from energytools.table import load_table

    table, _ = load_table(digits_run["scores"])
    high_ids = set(table.filter(pl.col("energy_group") == "high")["sample_id"].to_list())
    recorder = StepRecorder()
    _distill(digits_run["scores"], tmp_path / "run", he_da="online", on_step=recorder)
    assert len(recorder.batches) > 0
    for (_, info), batch in zip(recorder.steps, recorder.batches):  # the mask HE-DA mixes within
        assert [i in high_ids for i in batch.sample_ids.tolist()] == info.high.cpu().tolist()
    assert sum(int(info.high.sum()) >= 2 for _, info in recorder.steps) > len(recorder.steps) / 2
    metrics = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert metrics["loss_he_da"][0] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["he_da"] == "online" and config["he_da_online"]["temperature"] == 4.0
    assert config["he_da_online"]["weight"] == 0.9  # the reference's: kd's weight


def test_online_he_da_changes_training_and_replays_from_its_seed(digits_run, tmp_path):
    from energytools.models import load_checkpoint

    def weights(name):
        return load_checkpoint(tmp_path / name / "last.pt")["model"]

    _distill(digits_run["scores"], tmp_path / "kd", epochs=2)
    _distill(digits_run["scores"], tmp_path / "a", he_da="online", epochs=2)
    _distill(digits_run["scores"], tmp_path / "b", he_da="online", epochs=1)
    _distill(digits_run["scores"], tmp_path / "b", he_da="online", epochs=2, resume=True)
    a, b, kd = weights("a"), weights("b"), weights("kd")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed at an epoch boundary: the same draws
    assert not all(torch.equal(a[k], kd[k]) for k in a)
    _distill(digits_run["scores"], tmp_path / "zero", he_da="online", he_da_weight=0.0, epochs=1)
    import polars as pl

    assert pl.read_parquet(tmp_path / "zero" / "metrics.parquet")["loss_he_da"].to_list() == [0.0]
    assert pl.read_parquet(tmp_path / "a" / "metrics.parquet")["loss_he_da"].min() > 0


@pytest.mark.parametrize("args,message", [
    (["--he-da", "offline"], "--he-da must be one of online"),
    (["--he-da", "online", "--shards", "SHARDS"], "two forms of HE-DA"),
    (["--he-da", "online", "--he-da-weight", "-1"], "--he-da-weight must be a non-negative number"),
])
def test_online_he_da_refuses_bad_options(runner, digits_run, tmp_path, args, message):
    from conftest import invoke

    args = [str(digits_run["shards"]) if a == "SHARDS" else a for a in args]
    result = invoke(runner, "distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "kd",
                    "--epochs", "1", "--out", tmp_path / "x", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
