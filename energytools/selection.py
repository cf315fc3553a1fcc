"""Which samples a curation step takes: the highest-energy fraction that HE-DA augments, the
lowest-energy (easiest) fraction that pruning drops, by another difficulty score, or at
random as a control; with polars."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import polars as pl

from .errors import UserError, option_name

#: scores a selection may rank by: score-table columns (all from the same teacher pass) and
#: the label-issues file's label quality (:data:`LABEL_ISSUE_SCORES`)
SELECT_BY = ("energy", "margin", "confidence", "true_prob", "entropy", "el2n", "label_quality")
#: the scores of SELECT_BY that a label-issues file holds rather than the score table
LABEL_ISSUE_SCORES = ("label_quality",)
#: those that need the sample's label (null without one)
LABEL_SCORES = ("true_prob", "el2n")


def _random_key(table: pl.DataFrame, seed: int) -> pl.Series:
    # a seeded permutation over sample_id order, so the key does not depend on row order
    order = np.argsort(table["sample_id"].to_numpy(), kind="stable")
    key = np.empty(table.height, dtype=np.int64)
    key[order] = np.random.default_rng(seed).permutation(table.height)
    return pl.Series(key)


#: mode -> (table, seed, column) -> key to sort by (ascending); ties always broken by sample_id
SELECT_MODES: dict[str, Callable[[pl.DataFrame, int, str], pl.Series | pl.Expr]] = {
    "high": lambda table, seed, by: -pl.col(by),
    "low": lambda table, seed, by: pl.col(by),
    "random": lambda table, seed, by: _random_key(table, seed),
}


def selection_count(ratio: float, total: int) -> int:
    return int(math.floor(round(ratio * total, 9)))


def select_samples(table: pl.DataFrame, ratio: float, mode: str = "high", per_class: bool = False,
                   seed: int = 0, by: str = "energy") -> pl.DataFrame:
    """Rows of ``table`` chosen, sorted by sample_id.

    ``high`` takes the ``floor(ratio * N)`` samples with the highest ``by`` (energy by default:
    the teacher's hardest), ``low`` the lowest, ``random`` a seeded random subset of the same
    size; with ``per_class`` the count is ``floor(ratio * N_c)`` within each class. Ties are
    broken by sample_id, so the selection is exact and reproducible.
    """
    if not 0 < ratio <= 1:
        raise UserError(f"{option_name('ratio')} must be in (0, 1], got {ratio}")
    if mode not in SELECT_MODES:
        raise UserError(f"{option_name('mode')} must be one of {', '.join(SELECT_MODES)}, got {mode!r}")
    if by not in SELECT_BY:
        raise UserError(f"{option_name('by')} must be one of {', '.join(SELECT_BY)}, got {by!r}")
    if by not in table.columns:
        raise UserError(f"the score table has no {by} column (re-score it to add one)")
    unlabelled = table["label"].null_count() if "label" in table.columns else 0
    if unlabelled and (per_class or by in LABEL_SCORES):
        need = "--per-class" if per_class else f"--by {by}"
        raise UserError(f"{need} needs labels, and {unlabelled} of the table's {table.height} samples have none")
    ranked = table.with_columns(SELECT_MODES[mode](table, seed, by).alias("_key")).sort(["_key", "sample_id"])
    if per_class:
        ranked = ranked.with_columns(pl.int_range(pl.len()).over("label").alias("_rank"),
                                     pl.len().over("label").alias("_n"))
        # the same rounding as selection_count: 0.29 * 100 counts 29
        chosen = ranked.filter(pl.col("_rank") < (pl.col("_n") * ratio).round(9).floor()).drop("_rank", "_n")
    else:
        chosen = ranked.head(selection_count(ratio, table.height))
    if chosen.height == 0:
        raise UserError(f"{option_name('ratio', ratio)} selects no samples out of {table.height}")
    return chosen.drop("_key").sort("sample_id")


def describe_selection(chosen: pl.DataFrame, total: int, class_names: tuple[str, ...] = (), by: str = "energy") -> str:
    """One line: how many were selected, the range of the score they were ranked by and the count
    per class (by name)."""
    hist = chosen.group_by("label").len().sort("label")

    def name(label: int | None) -> str:
        if label is None:
            return "no label"
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    classes = ", ".join(f"{name(r['label'])}: {r['len']}" for r in hist.iter_rows(named=True))
    return (f"selected {chosen.height} of {total} samples ({100 * chosen.height / total:.1f}%), {by} "
            f"{chosen[by].min():.4f} .. {chosen[by].max():.4f}; per class {classes}")
