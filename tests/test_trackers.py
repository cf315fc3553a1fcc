"""--log tensorboard|wandb|mlflow: each tracker's output read back by the tool's own reader, a
resumed run continuing the same tracker run, the one line for a missing package, and step
values summed on the device (no host read between sends)."""
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

import energytools
from energytools.engine import Batch, StepEvent
from energytools.io import sha256_file
from energytools.trackers import RunWatcher


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory):
    """A score table of the digits from a logistic regression's logits (no teacher to train)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from energytools.data import build_dataset

    ids = build_dataset("digits", "train").sample_ids
    digits = load_digits()
    logits = LogisticRegression(C=0.05, max_iter=2000).fit(digits.data[ids], digits.target[ids]).decision_function(
        digits.data[ids])
    path = tmp_path_factory.mktemp("tables") / "scores.parquet"
    return energytools.write_score_table(path, logits, digits.target[ids], sample_ids=ids, dataset={"dataset": "digits"})


def _distill(table, out, method, log, epochs, **kwargs):
    return energytools.distill(table, "cnn_tiny", out, method=method, cached_logits=True, epochs=epochs, log=[log],
                               log_every=4, eval_limit=100, device="cpu", **kwargs)


def test_tensorboard_events_read_back_and_a_resumed_run_continues_the_curves(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run = {"dataset": "digits", "limit": 400, "eval_limit": 100, "log": ["tensorboard"], "log_every": 4, "device": "cpu"}
    energytools.train("cnn_tiny", out, epochs=1, **run)
    energytools.train("cnn_tiny", out, epochs=2, resume=True, **run)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics = pl.read_parquet(out / "metrics.parquet")
    val = events.Scalars("epoch/val_acc")
    assert [e.value for e in val] == pytest.approx(metrics["val_acc"].to_list())
    per_epoch = val[0].step
    assert [e.step for e in val] == [per_epoch, 2 * per_epoch]  # the resumed run's steps follow on
    assert [e.value for e in events.Scalars("epoch/seconds")] == pytest.approx(metrics["seconds"].to_list())
    losses = events.Scalars("train/loss")
    steps = [e.step for e in losses]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * per_epoch and 4 in steps
    assert all(np.isfinite(e.value) for e in losses)
    assert events.Scalars("train/lr")[0].value == pytest.approx(0.05)
    assert "config" in json.dumps(events.Tags()["tensors"])  # the resolved config as text


def test_mlflow_file_store_read_back_and_a_resumed_run_is_the_same_run(digits_table, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    _distill(digits_table, out, "energy-kd", "mlflow", 1)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    _distill(digits_table, out, "energy-kd", "mlflow", 2, resume=True)
    assert json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # continued, not a second run
    assert run.data.params["scores_sha256"] == sha256_file(digits_table)
    assert run.data.params["method"] == "energy-kd"
    metrics = pl.read_parquet(out / "metrics.parquet")
    val = sorted(client.get_metric_history(run_id, "epoch/val_acc"), key=lambda m: m.step)
    assert [m.value for m in val] == pytest.approx(metrics["val_acc"].to_list())
    table = pl.read_parquet(digits_table)
    low, high = table["temperature"].min(), table["temperature"].max()
    means = [m.value for m in client.get_metric_history(run_id, "train/temperature_mean")]
    assert means and all(low <= m <= high for m in means)
    assert min(m.value for m in client.get_metric_history(run_id, "train/temperature_min")) == pytest.approx(low)
    assert max(m.value for m in client.get_metric_history(run_id, "train/temperature_max")) == pytest.approx(high)
    assert client.get_metric_history(run_id, "train/loss_kd") and client.get_metric_history(run_id, "train/loss_ce")


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB's log format: 32 KiB blocks of chunks
    with a 7-byte header, after the file's 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending, pos = path.read_bytes(), 32768, [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the block's zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first; middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_read_back_and_resumed_under_the_same_id(digits_table, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no network, no account
    out = tmp_path / "run"
    _distill(digits_table, out, "ctkd", "wandb", 1)
    _distill(digits_table, out, "ctkd", "wandb", 2, resume=True)
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["run_id"]
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    history, config = [], {}
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            elif kind == "run":
                assert record.run.run_id == run_id
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert config["scores_sha256"] == sha256_file(digits_table)
    metrics = pl.read_parquet(out / "metrics.parquet")
    assert [h["epoch/val_acc"] for h in history if "epoch/val_acc" in h] == pytest.approx(metrics["val_acc"].to_list())
    assert [h["epoch/method_temperature"] for h in history if "epoch/val_acc" in h] == pytest.approx(
        metrics["method_temperature"].to_list())
    taus = [h["train/method_temperature"] for h in history if "train/method_temperature" in h]
    assert taus and all(1 <= t <= 21 for t in taus)  # CTKD's t_start + t_end * sigmoid(theta)
    steps = [h["_step"] for h in history]
    assert steps == sorted(steps)


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path):
    wrapper = tmp_path / "no_mlflow.py"
    wrapper.write_text("import sys\nsys.modules['mlflow'] = None\nfrom energytools.cli import main\nmain()\n")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(wrapper), "train", "--dataset", "digits", "--model", "cnn_tiny",
                             "--log", "mlflow", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("energytools: error: --log mlflow needs the mlflow package: "
                                     "pip install 'energytools[mlflow]'")
    assert not out.exists()  # refused before anything ran


def test_an_unknown_tracker_is_refused_before_the_run_starts(tmp_path):
    with pytest.raises(energytools.UserError, match="--log neptune: unknown tracker; choose from .*tensorboard"):
        energytools.train("cnn_tiny", tmp_path / "run", dataset="digits", log=["neptune"])
    assert not (tmp_path / "run").exists()


class Recorder:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


def _event(step, device, loss, temperatures):
    ids = torch.arange(len(temperatures))
    batch = Batch(torch.zeros(len(ids), 1, device=device), ids.to(device), ids, ids.bool(), 0)
    batch.extras["sample_info"] = SimpleNamespace(temperature=torch.tensor(temperatures, device=device))
    return StepEvent(0, step, batch, torch.zeros(len(ids), 3, device=device),
                     {"ce": torch.tensor(loss, device=device), "kd": torch.tensor(2 * loss, device=device)}, 0.1)


def test_step_values_stay_on_the_device_between_sends():
    """Meta tensors cannot be read: a host read between sends would raise."""
    recorder = Recorder()
    watcher = RunWatcher([recorder], steps_per_epoch=100, every=50)
    for step in range(1, 50):
        watcher.on_step(_event(step, "meta", 1.0, [2.0, 4.0]))
    assert recorder.logged == []


def test_step_values_are_the_window_means_and_the_temperature_range():
    recorder = Recorder()
    watcher = RunWatcher([recorder], steps_per_epoch=10, every=2, method_values=lambda: {"method_temperature": 3.5})
    watcher.on_step(_event(1, "cpu", 1.0, [2.0, 6.0]))
    watcher.on_step(_event(2, "cpu", 3.0, [4.0, 4.0]))
    watcher.on_step(_event(3, "cpu", 5.0, [6.0]))
    watcher.on_epoch({"epoch": 1, "val_acc": 50.0, "loss": 1.5})
    (step, first), (last, rest), (epoch_step, epoch) = recorder.logged
    assert step == 2 and first == pytest.approx({
        "train/loss_ce": 2.0, "train/loss_kd": 4.0, "train/loss": 6.0, "train/temperature_mean": 4.0,
        "train/temperature_min": 2.0, "train/temperature_max": 6.0, "train/method_temperature": 3.5, "train/lr": 0.1})
    assert last == 3 and rest["train/loss_ce"] == pytest.approx(5.0)  # the epoch's last steps, sent at its end
    assert epoch_step == 10 and epoch == {"epoch/epoch": 1.0, "epoch/val_acc": 50.0, "epoch/loss": 1.5}
