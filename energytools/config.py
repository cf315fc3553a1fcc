"""Stage configs: defaults -> pipeline TOML -> CLI flags, and the resolved dict saved with outputs."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

from .data import build_dataset
from .errors import UserError


@dataclass
class DataConfig:
    """Which samples: a dataset by name and the options that subset it."""

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    limit: int | None = None  # class-stratified subset of the training split
    eval_limit: int | None = None  # same for the val and test splits
    imbalance_factor: float | None = None
    image_size: int | None = None  # imagefolder and parquet only

    def build(self, split: str):
        limit = self.limit if split == "train" else self.eval_limit
        return build_dataset(self.dataset, split, self.data_root, limit, self.imbalance_factor, self.image_size)

    @classmethod
    def from_options(cls, options: dict) -> "DataConfig":
        """Rebuild from the ``options`` a dataset records in metadata."""
        return cls(dataset=options["name"], data_root=options.get("data_root"), limit=options.get("limit"),
                   imbalance_factor=options.get("imbalance_factor"), image_size=options.get("image_size"))


def resolve(cls, values: dict, where: str = "config"):
    """Build dataclass ``cls`` from a dict, refusing unknown keys with the nearest valid one."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"{where}: unknown key {key!r}{hint}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from None


def overrides(**flags) -> dict:
    """The CLI flags the user actually set (typer passes None for the rest)."""
    return {k: v for k, v in flags.items() if v is not None}


def as_dict(obj) -> dict:
    out = dataclasses.asdict(obj)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}
