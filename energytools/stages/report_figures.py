"""The report's figures of score tables and HE-DA shards, and what every part of the report
shares: the part and section types, class names, grouped histograms drawn from aggregates.

Every name that comes from data goes through :func:`~energytools.summaries.text` on its way
into a figure (see energytools.stages.report)."""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import plotly.graph_objects as go
import polars as pl

from ..data.shards import read_manifest, read_shards
from ..energy import GROUPS
from ..errors import UserError
from ..summaries import html_table, text
from ..table import TableMeta


GROUP_COLORS = {"low": "#2b8cbe", "mid": "#969696", "high": "#e34a33"}
BINS = 60
#: a part of a section: a figure, or HTML (a table, a note)
Part = go.Figure | str
#: (title, parts by name in page order, HTML shown under the title)
Section = tuple[str, dict[str, Part], str]


def label_names(labels, names) -> list[str]:
    """"3 cat" for label 3 when ``names`` has the class names, else "3" (not escaped)."""
    return [f"{label} {names[label]}" if isinstance(label, int) and 0 <= label < len(names) else str(label)
            for label in labels]


def class_names(labels, meta: TableMeta | None) -> list[str]:
    """:func:`label_names` with the table's class names, escaped for plotly."""
    return [text(name) for name in label_names(labels, meta.dataset.classes if meta is not None else ())]


def temperatures_text(temperatures: dict) -> str:
    """"6 / 4 / 2" for the low, mid and high groups."""
    return " / ".join(f"{round(float(temperatures[g]), 3):g}" for g in GROUPS)


@dataclass
class Inputs:
    scores: list[Path] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    runs: list[Path] = field(default_factory=list)
    teachers: list[Path] = field(default_factory=list)  # `train` run directories: the teacher's test predictions
    label_issues: list[Path] = field(default_factory=list)  # `energytools label-issues` files
    profiles: list[Path] = field(default_factory=list)  # `energytools profile --out X.parquet` files


def histogram_edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)


def grouped_histogram(frame: pl.DataFrame, column: str, by: str, title: str, levels=None,
                      edges: np.ndarray | None = None) -> go.Figure:
    """Overlaid bar histograms of ``column`` per value of ``by``, on shared bin edges."""
    values = frame[column].to_numpy().astype(np.float64)
    edges = histogram_edges(values) if edges is None else edges
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for level in levels if levels is not None else sorted(frame[by].unique().to_list()):
        subset = frame.filter(pl.col(by) == level)[column].to_numpy().astype(np.float64)
        counts, _ = np.histogram(subset, bins=edges)
        fig.add_bar(x=centers, y=counts, name=text(level), width=float(edges[1] - edges[0]),
                    marker_color=GROUP_COLORS.get(str(level)), opacity=0.75)
    fig.update_layout(barmode="overlay", title=text(title), xaxis_title=column, yaxis_title="samples", height=380)
    return fig


def per_class_accuracy(frame: pl.DataFrame, correct: pl.Expr) -> pl.DataFrame:
    """label, samples and accuracy (%) per class, where ``correct`` says which rows are right."""
    return (frame.group_by("label").agg(pl.len().alias("samples"), (correct.mean() * 100).alias("accuracy"))
            .sort("label"))


def score_figures(frame: pl.DataFrame, meta: TableMeta, label: str) -> dict[str, Part]:
    figures: dict[str, Part] = {}
    thresholds = meta.thresholds
    fig = grouped_histogram(frame, "energy", "energy_group", f"{label}: energy by group (T_E = "
                            f"{meta.energy_temperature})", levels=[g for g in GROUPS
                                                                        if g in frame["energy_group"].unique()])
    for name in ("low_max", "high_min"):
        if np.isfinite(thresholds[name]):
            fig.add_vline(x=thresholds[name], line_dash="dash", annotation_text=f"{name} {thresholds[name]:.3f}")
    figures["energy"] = fig
    figures["confidence"] = grouped_histogram(frame, "confidence", "energy_group", f"{label}: max-softmax confidence "
                                              "by energy group", levels=[g for g in GROUPS
                                                                         if g in frame["energy_group"].unique()])
    e, c = frame["energy"].to_numpy(), frame["confidence"].to_numpy()
    counts, e_edges, c_edges = np.histogram2d(e, c, bins=[histogram_edges(e, 50), histogram_edges(c, 50)])
    rho = frame.select(pl.corr("energy", "confidence", method="spearman")).item()
    heat = go.Figure(go.Heatmap(x=(e_edges[:-1] + e_edges[1:]) / 2, y=(c_edges[:-1] + c_edges[1:]) / 2,
                                z=np.log1p(counts.T), colorscale="Viridis", colorbar_title="log(1+n)", name="density"))
    heat.update_layout(title=text(f"{label}: energy vs confidence (Spearman {rho:.3f})"), xaxis_title="energy",
                       yaxis_title="confidence", height=420)
    figures["density"] = heat
    labelled = frame.filter(pl.col("label").is_not_null())  # a sample without a label has no class nor correctness
    if labelled.height < frame.height:
        figures["unlabelled_note"] = (f"<p class='note'>{text(frame.height - labelled.height)} of {text(frame.height)} "
                                      "samples have no label: the parts below are of the labelled ones"
                                      f"{'' if labelled.height else ' (none)'}.</p>")
    if not labelled.height:
        return figures
    frame = labelled
    figures["correct"] = grouped_histogram(frame.with_columns(pl.when(pl.col("correct")).then(pl.lit("correct"))
                                                              .otherwise(pl.lit("incorrect")).alias("prediction")),
                                           "energy", "prediction", f"{label}: energy of correct vs incorrect "
                                           "predictions")
    per_class = (frame.group_by("label").agg(pl.len().alias("samples"), pl.col("energy").mean().alias("mean_energy"),
                                             (pl.col("correct").mean() * 100).alias("accuracy"),
                                             *[(pl.col("energy_group") == g).mean().alias(g) for g in GROUPS])
                 .sort("label"))
    per_class = per_class.with_columns(pl.Series("class", label_names(per_class["label"].to_list(),
                                                                      meta.dataset.classes)))
    bars = go.Figure()
    for g in GROUPS:
        bars.add_bar(x=[text(name) for name in per_class["class"]], y=per_class[g].to_numpy(), name=g,
                     marker_color=GROUP_COLORS[g])
    bars.update_layout(barmode="stack", title=text(f"{label}: energy-group share per class"), xaxis_title="class",
                       yaxis_title="share", height=360)
    figures["class_groups"] = bars
    figures["class_table"] = (f"<h3>{text(label)}: per class</h3>" + html_table(
        per_class, {"class": "class", "samples": "samples", "mean energy": "mean_energy",
                    "teacher accuracy %": "accuracy", "share low": "low", "share mid": "mid", "share high": "high"},
        name="per-class", decimals={"mean_energy": 3, **{g: 3 for g in GROUPS}}))
    return figures


#: what a strip shows instead of images when the dataset cannot be opened here
NO_IMAGES = "<p>(images unavailable: the dataset is not on this machine)</p>"


def image_strip(dataset, rows: pl.DataFrame, caption: Callable[[dict], str]) -> str:
    """The images of ``rows`` (by sample_id) as one strip of 64-pixel PNG thumbnails, each over
    ``caption(row)`` (HTML: escape what comes from data with :func:`text`)."""
    from ..data.shards import encode_png

    position = {int(s): i for i, s in enumerate(dataset.sample_ids)}
    cells = []
    for row in rows.iter_rows(named=True):
        if row["sample_id"] not in position:
            continue
        png = base64.b64encode(encode_png(dataset.image(position[row["sample_id"]]))).decode()
        cells.append(f'<figure><img src="data:image/png;base64,{png}" width="64" height="64">'
                     f'<figcaption>{caption(row)}</figcaption></figure>')
    return f"<div class='strip'>{''.join(cells)}</div>"


def thumbnail_strip(frame: pl.DataFrame, meta: TableMeta, count: int = 12) -> str:
    """PNG strips of the lowest- and highest-energy images (empty when the dataset is unavailable)."""
    try:
        dataset = meta.data.build(meta.split, unlabelled=True)
    except UserError:
        return NO_IMAGES
    ordered = frame.sort(["energy", "sample_id"])
    parts = []
    for title, rows in (("lowest energy", ordered.head(count)), ("highest energy", ordered.tail(count).reverse())):
        strip = image_strip(dataset, rows, lambda row: f'y={text("-" if row["label"] is None else row["label"])} '
                                                       f'p={text(row["pred"])}<br>E={row["energy"]:.2f}')
        parts.append(f"<h4>{title}</h4>{strip}")
    return "".join(parts)


def curation_figures(directory: Path, scores: pl.DataFrame | None, meta: TableMeta | None = None) -> dict[str, Part]:
    manifest = read_manifest(directory)
    rows = read_shards(directory).drop("image")
    figures: dict[str, Part] = {}
    selected = set(rows["source_id"].unique().to_list())
    if scores is not None:
        marked = scores.with_columns(pl.col("sample_id").is_in(list(selected)).alias("selected")) \
            .with_columns(pl.when(pl.col("selected")).then(pl.lit("selected")).otherwise(pl.lit("not selected"))
                          .alias("selection"))
        figures["selection_energy"] = grouped_histogram(marked, "energy", "selection",
                                                        f"{directory.name}: energy of selected vs not selected")
        hist = marked.filter(pl.col("selected")).group_by("label").len().sort("label")
        figures["selection_classes"] = go.Figure(go.Bar(x=class_names(hist["label"].to_list(), meta),
                                                        y=hist["len"].to_numpy(), name="selected"))
        figures["selection_classes"].update_layout(title=text(f"{directory.name}: selected samples per class"),
                                                   xaxis_title="class", height=340)
        joined = rows.join(scores.select("sample_id", pl.col("energy").alias("source_energy")),
                           left_on="source_id", right_on="sample_id", how="left", validate="m:1")
        sample = joined.sample(min(joined.height, 3000), seed=0) if joined.height else joined
        scatter = go.Figure(go.Scattergl(x=sample["source_energy"].to_numpy(), y=sample["energy"].to_numpy(),
                                         mode="markers", marker={"size": 4, "opacity": 0.5}, name="augmented"))
        scatter.update_layout(title=text(f"{directory.name}: energy of augmented samples vs their sources "
                                         f"({manifest['config']['policy']}, {sample.height} of {joined.height} shown)"),
                              xaxis_title="source energy", yaxis_title="augmented energy", height=420)
        figures["augmented_vs_source"] = scatter
    return figures


# --- distillation runs ------------------------------------------------------------------------
