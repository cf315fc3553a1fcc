"""Query a score table with polars: the hardest samples per class, and how energy tracks errors.

    python examples/query_scores.py runs/quickstart/scores.parquet
"""
import sys

import polars as pl

import energytools

scores, meta = energytools.load_table(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/scores.parquet")
print(f"{meta.dataset.name} {meta.split}: {scores.height} rows, teacher {meta.teacher.arch}, "
      f"T_E = {meta.energy_temperature}, temperatures {meta.rule.temperatures} (low, mid, high)")

hardest = (scores.sort(["energy", "sample_id"], descending=[True, False])
           .group_by("label", maintain_order=True).head(3)
           .select("label", "sample_id", "energy", "confidence", "pred", "correct").sort("label"))
print("three highest-energy samples per class:\n", hardest)

by_decile = (scores.with_columns((pl.col("energy").rank("ordinal") * 10 // (scores.height + 1)).alias("decile"))
             .group_by("decile").agg(pl.col("energy").mean(), (pl.col("correct").mean() * 100).alias("accuracy"),
                                     pl.col("confidence").mean()).sort("decile"))
print("teacher accuracy by energy decile (0 = lowest energy):\n", by_decile)
