"""Where an epoch's time goes: metrics.parquet gives each epoch's training pass, the part of it
spent waiting for batches, and the evaluation passes (as timm logs data and batch time)."""
import time

import polars as pl
import torch
import torch.nn.functional as F

from energytools.config import DataConfig, TrainConfig, TrainStageConfig
from energytools.distributed import context
from energytools.engine import TrainLoader, train_one_epoch
from energytools.models import create_model
from energytools.stages.train import train


def test_metrics_split_each_epoch_into_data_training_and_evaluation(tmp_path):
    train(TrainStageConfig(model="cnn_tiny", out=str(tmp_path / "run"), data=DataConfig(dataset="digits", limit=400),
                           train=TrainConfig(epochs=2, batch_size=32)))
    metrics = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    for row in metrics.iter_rows(named=True):
        assert 0 < row["data_seconds"] < row["train_seconds"] < row["seconds"]
        assert row["eval_seconds"] > 0
        assert row["train_seconds"] + row["eval_seconds"] <= row["seconds"] + 1e-6


class SlowBatches:
    """A training set whose every batch takes ``delay`` seconds to load."""

    def __init__(self, dataset, delay: float):
        self.dataset, self.delay, self.info = dataset, delay, dataset.info

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, indices):
        time.sleep(self.delay)
        return self.dataset.__getitems__(indices)


def test_the_data_time_is_the_time_spent_waiting_for_batches():
    dataset = DataConfig(dataset="digits", limit=256).build("train")
    cfg = TrainConfig(batch_size=32, in_memory_gib=0)
    model = create_model("cnn_tiny", dataset.info.num_classes, dataset.info.in_channels, dataset.info.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def step(batch, forward):
        logits = forward(batch.images)
        return logits, {"ce": F.cross_entropy(logits, batch.labels)}

    found = {}
    for delay in (0.0, 0.05):
        loader = TrainLoader(SlowBatches(dataset, delay), cfg, torch.device("cpu"), context())
        loader.start_epoch(0)
        timings = {}
        train_one_epoch(0, model, model, step, loader, optimizer, scaler, cfg, torch.device("cpu"), dataset.info,
                        timings=timings)
        found[delay] = timings["data_seconds"]
    steps = len(loader)
    assert found[0.05] >= steps * 0.05 and found[0.05] - found[0.0] >= steps * 0.05 * 0.9
