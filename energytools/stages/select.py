"""`energytools select`: a selection of the score table by energy or another score (for pruning
as well as augmenting; by a label-issues file's label quality for relabelling), printed and
optionally written as a Parquet file of ids."""
from __future__ import annotations

import polars as pl

from ..config import SelectConfig, content_of
from ..console import console
from ..errors import UserError
from ..io import check_output_free, sha256_file
from ..selection import LABEL_ISSUE_SCORES, describe_selection, select_samples
from ..table import load_label_issues, load_table, write_parquet


def select(cfg: SelectConfig) -> pl.DataFrame:
    """`energytools select`: the selection alone, optionally written as a Parquet file of ids."""
    cfg.check()
    if cfg.out:
        check_output_free(cfg.out, cfg.overwrite)
    from_table = [c for c in ("sample_id", "label", "energy", cfg.by) if c not in LABEL_ISSUE_SCORES]
    table, meta = load_table(cfg.scores, list(dict.fromkeys(from_table)))
    if cfg.label_issues:
        table = join_label_quality(table, cfg.scores, cfg.label_issues)
    chosen = select_samples(table, cfg.ratio, cfg.mode, cfg.per_class, cfg.seed, cfg.by)
    console.print(describe_selection(chosen, table.height, meta.dataset.classes, cfg.by))
    if cfg.out:
        config = content_of(cfg)
        inputs = {"scores": {"sha256": sha256_file(cfg.scores)}}
        if cfg.label_issues:
            inputs["label_issues"] = {"sha256": sha256_file(cfg.label_issues)}
        write_parquet(chosen, cfg.out, {"kind": "selection", "config": config, "count": chosen.height, **inputs})
    return chosen


def join_label_quality(table: pl.DataFrame, scores, path) -> pl.DataFrame:
    """``table`` with the label-issues file's scores of the same samples (the same ids and labels)."""
    issues, _ = load_label_issues(path)
    joined = table.join(issues.select("sample_id", pl.col("label").alias("_given"), *LABEL_ISSUE_SCORES),
                        on="sample_id", how="left", validate="1:1", maintain_order="left")
    missing = joined.filter(pl.col("_given").is_null())
    if missing.height:
        raise UserError(f"{path} lacks sample_id {missing['sample_id'][0]} of {scores}: not the same samples")
    other = joined.filter(pl.col("_given") != pl.col("label"))
    if other.height:
        raise UserError(f"{path} gives sample_id {other['sample_id'][0]} another label than {scores}: not the same "
                        "samples")
    return joined.drop("_given")
