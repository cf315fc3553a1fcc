"""`energytools select`: a selection of the score table by energy or another score (for pruning
as well as augmenting), printed and optionally written as a Parquet file of ids."""
from __future__ import annotations

import polars as pl

from ..config import SelectConfig, content_of
from ..console import console
from ..io import check_output_free, sha256_file
from ..selection import describe_selection, select_samples
from ..table import load_table, write_parquet


def select(cfg: SelectConfig) -> pl.DataFrame:
    """`energytools select`: the selection alone, optionally written as a Parquet file of ids."""
    cfg.check()
    if cfg.out:
        check_output_free(cfg.out, cfg.overwrite)
    table, meta = load_table(cfg.scores, list(dict.fromkeys(["sample_id", "label", "energy", cfg.by])))
    chosen = select_samples(table, cfg.ratio, cfg.mode, cfg.per_class, cfg.seed, cfg.by)
    console.print(describe_selection(chosen, table.height, meta.dataset.classes, cfg.by))
    if cfg.out:
        config = content_of(cfg)
        write_parquet(chosen, cfg.out, {"kind": "selection", "config": config, "count": chosen.height,
                                        "scores": {"sha256": sha256_file(cfg.scores)}})
    return chosen
