"""The tracker interface and its registry: one small class per tool (TensorBoard, W&B, MLflow),
each an optional extra. A tracker only receives numbers and a config; what to log and when is
decided by :mod:`energytools.trackers.watch`."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import UserError

#: --log name -> the tracker class
TRACKERS: dict[str, type["Tracker"]] = {}


def register(name: str):
    def decorator(cls: type[Tracker]) -> type[Tracker]:
        cls.name = name
        TRACKERS[name] = cls
        return cls
    return decorator


class Tracker:
    """One tool's run. ``state`` is this tracker's entry in OUT/trackers.json (a run id), filled
    by a new run and read back by a resumed one so that it continues the same run."""

    name: str = ""
    #: the module the tracker imports, and the energytools extra that installs it
    module: str = ""
    extra: str = ""

    def __init__(self, out: Path, config: dict, state: dict, resumed: bool):
        self.out, self.state, self.resumed = out, state, resumed

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, ok: bool) -> None:
        """End the run (``ok`` False: the training failed or was stopped)."""


def require_trackers(names) -> None:
    """Refuse an unknown --log name or one whose package is not installed: one line naming the
    extra to install, before anything is trained."""
    for name in names:
        cls = TRACKERS.get(name)
        if cls is None:
            raise UserError(f"--log {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
        try:
            importlib.import_module(cls.module)
        except ImportError:
            raise UserError(f"--log {name} needs the {cls.module} package: pip install 'energytools[{cls.extra}]'") \
                from None


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"train.lr": "0.05", ...}``: the form MLflow's params take."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
