"""Evaluation passes (issue 37 item 7): one loader per evaluation set for a run, whose workers
persist across epochs and serve the raw and the EMA weights; the ranks' shares of a set are
the one-process batches, dealt out without repeats (the 2-rank runs are in test_distributed.py)."""
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from energytools.config import DataConfig, TrainConfig
from energytools.engine import Evaluator, evaluate, fit
from energytools.engine.evaluation import shard_batches

DATA = DataConfig(dataset="digits", limit=200, eval_limit=60)


def test_shards_are_the_one_process_batches_dealt_out_without_repeats():
    one = shard_batches(10, 3)
    assert one == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    for world in (2, 3, 5):
        shares = [shard_batches(10, 3, rank, world) for rank in range(world)]
        batches = [batch for share in shares for batch in share]
        assert sorted(batches) == one  # every one-process batch once: no padding, no sample twice
    assert shard_batches(10, 3, 4, 5) == []  # more ranks than batches: this rank evaluates nothing


class ReadLog(torch.utils.data.Dataset):
    """An evaluation set that notes the process reading each sample (a DataLoader worker's pid)."""

    def __init__(self, dataset, log: Path):
        self.dataset, self.info, self.log = dataset, dataset.info, log

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return self.dataset[index]


def test_a_run_keeps_one_evaluation_loader_per_set_for_raw_and_ema_weights(tmp_path):
    """With --num-workers the val and test passes of every epoch, of the raw and of the EMA
    weights, go through the same worker (before: a new loader, and new workers, per pass)."""
    logs = {name: tmp_path / f"{name}.pids" for name in ("val", "test")}
    val_set, test_set = (ReadLog(DATA.build(name), logs[name]) for name in ("val", "test"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def step(batch, forward):
        logits = forward(batch.images)
        return logits, {"ce": F.cross_entropy(logits, batch.labels)}

    cfg = TrainConfig(epochs=2, batch_size=50, lr=0.1, seed=0, device="cpu", num_workers=1, ema_decay=0.9,
                      eval_batch_size=16)
    result = fit(model, step, DATA.build("train"), val_set, test_set, cfg, tmp_path / "run", {}, resume=False)
    for name, log in logs.items():
        pids = log.read_text().split()
        assert len(pids) == 2 * 2 * len(val_set if name == "val" else test_set)  # 2 epochs, raw and EMA
        assert len(set(pids)) == 1 and pids[0] != str(os.getpid()), (name, sorted(set(pids)))
    # the run's accuracies are those of a loader made for one pass (the public evaluate)
    last = result.metrics.row(-1, named=True)
    assert evaluate(model, val_set, torch.device("cpu"), 16, num_workers=1) == last["val_acc"]
    assert Evaluator(test_set, torch.device("cpu"), 7).accuracy(model) == last["test_acc"]
