"""Which samples HE-DA augments: the highest-energy fraction (or controls), with polars."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import polars as pl

from .errors import UserError

def _random_key(table: pl.DataFrame, seed: int) -> pl.Series:
    # a seeded permutation over sample_id order, so the key does not depend on row order
    order = np.argsort(table["sample_id"].to_numpy(), kind="stable")
    key = np.empty(table.height, dtype=np.int64)
    key[order] = np.random.default_rng(seed).permutation(table.height)
    return pl.Series(key)


#: mode -> (table, seed) -> key to sort by (ascending); ties always broken by sample_id
SELECT_MODES: dict[str, Callable[[pl.DataFrame, int], pl.Series | pl.Expr]] = {
    "high": lambda table, seed: -pl.col("energy"),
    "low": lambda table, seed: pl.col("energy"),
    "random": _random_key,
}


def selection_count(ratio: float, total: int) -> int:
    return int(math.floor(round(ratio * total, 9)))


def select_samples(table: pl.DataFrame, ratio: float, mode: str = "high", per_class: bool = False,
                   seed: int = 0) -> pl.DataFrame:
    """Rows of ``table`` chosen for augmentation, sorted by sample_id.

    ``high`` takes the ``floor(ratio * N)`` highest-energy samples, ``low`` the lowest,
    ``random`` a seeded random subset of the same size; with ``per_class`` the count is
    ``floor(ratio * N_c)`` within each class. Ties are broken by sample_id, so the selection
    is exact and reproducible.
    """
    if not 0 < ratio <= 1:
        raise UserError(f"--ratio must be in (0, 1], got {ratio}")
    if mode not in SELECT_MODES:
        raise UserError(f"unknown selection {mode!r}; choose from {', '.join(SELECT_MODES)}")
    if "energy" not in table.columns:
        raise UserError("the score table has no energy column")
    ranked = table.with_columns(SELECT_MODES[mode](table, seed).alias("_key")).sort(["_key", "sample_id"])
    if per_class:
        ranked = ranked.with_columns(pl.int_range(pl.len()).over("label").alias("_rank"),
                                     pl.len().over("label").alias("_n"))
        chosen = ranked.filter(pl.col("_rank") < (pl.col("_n") * ratio + 1e-9).floor()).drop("_rank", "_n")
    else:
        chosen = ranked.head(selection_count(ratio, table.height))
    if chosen.height == 0:
        raise UserError(f"--ratio {ratio} selects no samples out of {table.height}")
    return chosen.drop("_key").sort("sample_id")


def describe_selection(chosen: pl.DataFrame, total: int, class_names: tuple[str, ...] = ()) -> str:
    """One line: how many were selected, their energy range and the count per class (by name)."""
    hist = chosen.group_by("label").len().sort("label")

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    classes = ", ".join(f"{name(r['label'])}: {r['len']}" for r in hist.iter_rows(named=True))
    return (f"selected {chosen.height} of {total} samples ({100 * chosen.height / total:.1f}%), energy "
            f"{chosen['energy'].min():.4f} .. {chosen['energy'].max():.4f}; per class {classes}")
