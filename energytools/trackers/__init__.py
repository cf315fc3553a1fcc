"""Trackers (``--log tensorboard|wandb|mlflow``): a run watched in the tools a user already has.
Each is an optional extra; :mod:`.watch` feeds them from the engine's callbacks."""
from .base import TRACKERS, Tracker, register, require_trackers
from . import mlflow_run, tensorboard_run, wandb_run  # noqa: F401 - each registers itself
from .watch import STATE_FILE, RunWatcher, StepWindow, fit_callbacks, steps_per_epoch, watch_run

__all__ = ["STATE_FILE", "TRACKERS", "RunWatcher", "StepWindow", "Tracker", "fit_callbacks", "register", "require_trackers",
           "steps_per_epoch", "watch_run"]
