"""What a run sends to its trackers, through the engine's callbacks only (``on_step``,
``on_epoch``): nothing in the training loop knows about them.

Per step (averaged over a window of ``every`` steps): the loss and its terms, the lr, the mean
and range of the batch's per-sample temperatures (Energy KD), the method's own temperature
(CTKD). The values are summed on the device and read once per window, never per step. Per epoch:
the metrics row (loss, val and test accuracy, the EMA's, the epoch's seconds, the lr). Step
numbers count batches over the whole run (``epoch * steps_per_epoch + step``), so a resumed
run continues the same axis.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..io import write_json
from .base import TRACKERS, Tracker, require_trackers

#: the run directory's record of each tracker's run id, read by --resume
STATE_FILE = "trackers.json"


class StepWindow:
    """Per-step values summed on the device since the last read."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.sums, self.lr = 0, 0, {}, None
        self.t_sum = self.t_min = self.t_max = None

    def add(self, losses: dict[str, torch.Tensor], temperature: torch.Tensor | None, lr: float | None) -> None:
        for name, value in losses.items():
            value = value.detach().float().reshape(())
            if name in self.sums:
                self.sums[name].add_(value)
            else:
                self.sums[name] = value.clone()
        if temperature is not None and temperature.ndim == 1 and len(temperature):
            t = temperature.detach().float()
            if self.t_sum is None:
                self.t_sum, self.t_min, self.t_max = t.sum(), t.min(), t.max()
            else:
                self.t_sum.add_(t.sum())
                torch.minimum(self.t_min, t.min(), out=self.t_min)
                torch.maximum(self.t_max, t.max(), out=self.t_max)
            self.samples += len(t)
        self.steps += 1
        self.lr = lr

    def read(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """The window's means and the temperatures' range (one read from the device), then an
        empty window. ``extra``: values already on the host (the method's temperature)."""
        tensors = {f"loss_{name}": total / self.steps for name, total in self.sums.items()}
        if self.t_sum is not None:
            tensors.update(temperature_mean=self.t_sum / self.samples, temperature_min=self.t_min,
                           temperature_max=self.t_max)
        values = dict(zip(tensors, torch.stack(list(tensors.values())).tolist())) if tensors else {}
        if self.sums:
            values["loss"] = sum(values[f"loss_{name}"] for name in self.sums)
        values.update({k: float(v) for k, v in (extra or {}).items()})
        if self.lr is not None:
            values["lr"] = self.lr
        self.reset()
        return values


class RunWatcher:
    """The engine's ``on_step`` and ``on_epoch`` for a run's trackers (rank 0 only)."""

    def __init__(self, trackers: list[Tracker], steps_per_epoch: int, every: int,
                 method_values: Callable[[], dict] | None = None, save_state: Callable[[], None] = lambda: None):
        self.trackers, self.steps_per_epoch, self.every = trackers, steps_per_epoch, every
        self.method_values, self.save_state = method_values, save_state
        self.window, self.last_step = StepWindow(), 0

    def _log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def _flush(self) -> None:
        if self.window.steps:
            extra = self.method_values() if self.method_values is not None else None
            self._log({f"train/{k}": v for k, v in self.window.read(extra).items()}, self.last_step)

    def on_step(self, event) -> None:
        info = event.batch.extras.get("sample_info")
        self.window.add(event.losses, getattr(info, "temperature", None), event.lr)
        self.last_step = event.epoch * self.steps_per_epoch + event.step
        if event.step % self.every == 0:
            self._flush()

    def on_epoch(self, row: dict) -> None:
        self._flush()  # the epoch's last steps
        values = {f"epoch/{k}": float(v) for k, v in row.items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self._log({"epoch/epoch": float(row["epoch"]), **values}, row["epoch"] * self.steps_per_epoch)
        self.save_state()


def steps_per_epoch(samples: int, batch_size: int, world: int) -> int:
    """The batches of an epoch on each rank (DistributedSampler pads to ceil(N / world) each)."""
    return max(1, math.ceil(math.ceil(samples / world) / batch_size))


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def watch_run(names, out: Path, config: dict, resumed: bool, steps: int, every: int,
              method_values: Callable[[], dict] | None = None) -> Iterator[RunWatcher | None]:
    """Open the trackers ``names`` (--log) for the run in ``out``; yields None without any. A
    resumed run continues each tracker's run recorded in OUT/trackers.json."""
    if not names:
        yield None
        return
    require_trackers(names)
    state_path = out / STATE_FILE
    state = _read_state(state_path) if resumed else {}
    trackers: list[Tracker] = []

    def save_state() -> None:
        write_json(state_path, state)

    ok = False
    try:
        for name in dict.fromkeys(names):
            continued = resumed and name in state  # a tracker added on resume starts its own run
            trackers.append(TRACKERS[name](out, config, state.setdefault(name, {}), continued))
        save_state()
        yield RunWatcher(trackers, steps, every, method_values, save_state)
        ok = True
    finally:
        for tracker in trackers:
            tracker.close(ok)


def fit_callbacks(watcher: RunWatcher | None, on_step: Callable | None) -> dict:
    """``fit``'s ``on_step`` and ``on_epoch`` keywords: the caller's ``on_step`` and the watcher's."""
    if watcher is None:
        return {"on_step": on_step}

    def both(event) -> None:
        if on_step is not None:
            on_step(event)
        watcher.on_step(event)
    return {"on_step": both, "on_epoch": watcher.on_epoch}
