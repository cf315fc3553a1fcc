"""The report's "Tables compared" section: two or more score tables of the same samples side
by side (energy histograms, and how samples move between energy groups)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import polars as pl

from ..energy import GROUPS
from ..summaries import html_table, text
from ..table import TableMeta
from .report_figures import Part, Section, histogram_edges, label_names


def table_labels(paths: list[Path], metas: dict[Path, TableMeta]) -> dict[Path, str]:
    """"scores.parquet (train)", with the parent folder when two tables share a file name."""
    names = [p.name for p in paths]
    return {p: f"{p.parent.name + '/' if names.count(p.name) > 1 else ''}{p.name} ({metas[p].split})" for p in paths}


def tables_compared(tables: dict[Path, pl.DataFrame], labels: dict[Path, str]) -> dict[str, Part]:
    """Energy distributions of every table overlaid (fraction of samples) and per-group numbers."""
    edges = histogram_edges(np.concatenate([f["energy"].to_numpy() for f in tables.values()]))
    centers = (edges[:-1] + edges[1:]) / 2
    density = go.Figure()
    groups = []
    for path, frame in tables.items():
        counts, _ = np.histogram(frame["energy"].to_numpy(), bins=edges)
        density.add_scatter(x=centers, y=counts / max(frame.height, 1), mode="lines", name=text(labels[path]),
                            line_shape="hv")
        groups.append(frame.group_by("energy_group").agg(
            pl.len().alias("samples"), (pl.len() / frame.height * 100).alias("share"),
            pl.col("energy").mean().alias("energy"), pl.col("confidence").mean().alias("confidence"),
            (pl.col("correct").mean() * 100).alias("accuracy"))
            .sort(pl.col("energy_group").replace_strict(GROUPS, list(range(len(GROUPS))), default=len(GROUPS)))
            .with_columns(table=pl.lit(labels[path])))
    density.update_layout(title="energy distribution per table (fraction of samples)", xaxis_title="energy",
                          yaxis_title="fraction", height=380)
    table = html_table(pl.concat(groups), {"table": "table", "group": "energy_group", "samples": "samples",
                                           "share %": "share", "mean energy": "energy",
                                           "mean confidence": "confidence", "teacher accuracy %": "accuracy"},
                       name="groups", decimals={"share": 1, "energy": 3, "confidence": 3})
    return {"split_density": density, "split_groups": "<h3>per group</h3>" + table}


def transitions(a: pl.DataFrame, b: pl.DataFrame, label_a: str, label_b: str, classes: tuple[str, ...],
                top: int = 15) -> dict[str, Part]:
    """How the samples two tables share move between energy groups: the 3x3 matrix of counts and
    the samples whose energy rank moved most (ranks as percentiles among the shared samples)."""
    columns = ["sample_id", "label", "pred", "energy", "energy_group"]
    joined = a.select(columns).join(b.select(columns), on="sample_id", how="inner", validate="1:1", suffix="_b")
    if joined.height == 0:
        return {}
    if (joined["label"] != joined["label_b"]).any():
        return {"transition_note": f"<p class='note'>{text(label_a)} and {text(label_b)} hold the same sample ids "
                                   "with other labels: not the same samples, so no transitions are shown.</p>"}
    n = joined.height
    joined = joined.with_columns(rank_a=pl.col("energy").rank() / n * 100, rank_b=pl.col("energy_b").rank() / n * 100)
    rho = joined.select(pl.corr("energy", "energy_b", method="spearman")).item()
    counts = joined.group_by("energy_group", "energy_group_b").len()
    matrix = pl.DataFrame({"from": list(GROUPS)})
    for g in GROUPS:
        col = counts.filter(pl.col("energy_group_b") == g).select(pl.col("energy_group").alias("from"),
                                                                  pl.col("len").alias(g))
        matrix = matrix.join(col, on="from", how="left", maintain_order="left")
    matrix = matrix.fill_null(0).with_columns(total=pl.sum_horizontal(*GROUPS))
    moved = int(joined.filter(pl.col("energy_group") != pl.col("energy_group_b")).height)
    intro = (f"<h3>A = {text(label_a)} → B = {text(label_b)}: energy groups of the {n} samples both hold</h3>"
             f"<p>{moved} samples ({moved / n * 100:.1f}%) change group; Spearman of the two energies "
             f"{rho:.3f}. Rows: group in A; columns: group in B.</p>")
    biggest = (joined.with_columns(shift=pl.col("rank_b") - pl.col("rank_a"))
               .sort([pl.col("shift").abs(), pl.col("sample_id")], descending=[True, False]).head(top))
    biggest = biggest.with_columns(pl.Series("class", label_names(biggest["label"].to_list(), classes)),
                                   pl.Series("pred_a", label_names(biggest["pred"].to_list(), classes)),
                                   pl.Series("pred_b", label_names(biggest["pred_b"].to_list(), classes)),
                                   move=pl.col("energy_group") + " → " + pl.col("energy_group_b"))
    return {"transitions": intro + html_table(matrix, {"A \\ B": "from", **{g: g for g in GROUPS}, "total": "total"},
                                              name="transitions"),
            "moved_most": "<h3>samples whose energy rank moved most (A → B)</h3>" + html_table(
                biggest, {"sample_id": "sample_id", "class": "class", "group": "move", "energy A": "energy",
                          "energy B": "energy_b", "percentile A": "rank_a", "percentile B": "rank_b",
                          "prediction A": "pred_a", "prediction B": "pred_b"},
                name="moved", decimals={"energy": 3, "energy_b": 3, "rank_a": 1, "rank_b": 1})}


def comparison_sections(tables: dict[Path, pl.DataFrame], metas: dict[Path, TableMeta]) -> list[Section]:
    labels = table_labels(list(tables), metas)
    parts = tables_compared(tables, labels)
    for pa, pb in itertools.combinations(tables, 2):
        ma, mb = metas[pa], metas[pb]
        if (ma.dataset.name, ma.split) == (mb.dataset.name, mb.split):
            moved = transitions(tables[pa], tables[pb], labels[pa], labels[pb], ma.dataset.classes)
            parts.update({f"{name} {labels[pa]} {labels[pb]}": part for name, part in moved.items()})
    return [("Tables compared", parts, "")]

