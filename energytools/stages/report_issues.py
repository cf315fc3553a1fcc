"""The report's "Label issues" section, one per label-issues file (`energytools label-issues`):
how many samples cleanlab flags per class, the most suspicious images with their given and
suggested labels, and which class the flagged samples' labels go from and to."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import polars as pl

from ..config import DataConfig, resolve
from ..errors import UserError
from ..summaries import html_table, text
from ..table import load_label_issues
from .report_figures import NO_IMAGES, Part, Section, image_strip, label_names


def label_issue_section(path: Path, thumbnails: bool = True, count: int = 24) -> Section:
    frame, meta = load_label_issues(path)
    classes = tuple((meta.get("dataset") or {}).get("classes") or ())
    found = meta.get("cleanlab") or {}
    flagged = frame.filter(pl.col("is_label_issue"))
    intro = (f"<p>{flagged.height} of {frame.height} samples ({100 * flagged.height / max(frame.height, 1):.1f}%) "
             f"flagged by cleanlab {text(found.get('version', '?'))} (filter_by {text(found.get('filter_by', '?'))}; "
             f"label quality by {text(found.get('method', '?'))}, lower = more likely mislabeled)</p>")
    if not (meta.get("scores") or {}).get("out_of_sample", False):
        intro += ("<p class='note'>In-sample scores: the teacher trained on these labels, so a wrong label it "
                  "fitted is not flagged. Scores of a teacher that did not train on the sample (out of fold) "
                  "find those too.</p>")
    parts: dict[str, Part] = {"issues_per_class": per_class_table(frame, classes)}
    if thumbnails:
        parts["issues_images"] = suspicious_strip(frame, meta, classes, count)
    if flagged.height:
        parts["issues_matrix"] = confusion_figure(flagged, classes, path.name)
        parts["issues_pairs"] = pair_table(flagged, classes)
    return (f"Label issues: {path.name}", parts, intro)


def per_class_table(frame: pl.DataFrame, classes: tuple[str, ...]) -> str:
    per_class = (frame.group_by("label").agg(pl.len().alias("samples"), pl.col("is_label_issue").sum().alias("flagged"),
                                             (pl.col("is_label_issue").mean() * 100).alias("share"),
                                             pl.col("label_quality").mean().alias("quality"))
                 .sort("label"))
    per_class = per_class.with_columns(pl.Series("class", label_names(per_class["label"].to_list(), classes)))
    return "<h3>per class (given label)</h3>" + html_table(
        per_class, {"class": "class", "samples": "samples", "flagged": "flagged", "flagged %": "share",
                    "mean label quality": "quality"}, name="issues-per-class", decimals={"share": 1, "quality": 3})


def suspicious_strip(frame: pl.DataFrame, meta: dict, classes: tuple[str, ...], count: int) -> str:
    """The ``count`` most suspicious images: flagged first, then by label quality (lowest first)."""
    title = "<h3>most suspicious: flagged first, lowest label quality first (given → suggested)</h3>"
    try:
        data = resolve(DataConfig, dict(meta.get("data") or {}), "the label-issues file's data")
        dataset = data.build((meta.get("dataset") or {}).get("split", "train"))
    except UserError:
        return title + NO_IMAGES
    rows = frame.sort(["is_label_issue", "label_quality", "sample_id"], descending=[True, False, False]).head(count)

    def caption(row: dict) -> str:
        given, suggested = label_names([row["label"], row["suggested_label"]], classes)
        mark = " ⚑" if row["is_label_issue"] else ""
        return f"{text(given)} → {text(suggested)}{mark}<br>q={row['label_quality']:.3g} id={text(row['sample_id'])}"

    return title + image_strip(dataset, rows, caption)


def confusion_figure(flagged: pl.DataFrame, classes: tuple[str, ...], name: str) -> go.Figure:
    """Counts of the flagged samples by given (rows) and suggested (columns) class."""
    labels = sorted(set(flagged["label"].to_list()) | set(flagged["suggested_label"].to_list()))
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for given, suggested in zip(flagged["label"].to_list(), flagged["suggested_label"].to_list()):
        counts[index[given], index[suggested]] += 1
    names = [text(n) for n in label_names(labels, classes)]
    fig = go.Figure(go.Heatmap(x=names, y=names, z=counts, colorscale="Reds", colorbar_title="samples",
                               text=counts, texttemplate="%{text}", name="flagged"))
    fig.update_layout(title=text(f"{name}: flagged samples, given → suggested label"), xaxis_title="suggested",
                      yaxis_title="given", yaxis_autorange="reversed", height=420)
    return fig


def pair_table(flagged: pl.DataFrame, classes: tuple[str, ...], top: int = 20) -> str:
    pairs = (flagged.group_by("label", "suggested_label").agg(pl.len().alias("samples"),
                                                               pl.col("label_quality").mean().alias("quality"))
             .sort(["samples", "label", "suggested_label"], descending=[True, False, False]).head(top))
    pairs = pairs.with_columns(pl.Series("given", label_names(pairs["label"].to_list(), classes)),
                               pl.Series("suggested", label_names(pairs["suggested_label"].to_list(), classes)),
                               (pl.col("samples") / flagged.height * 100).alias("share"))
    return "<h3>flagged samples by class pair (given → suggested)</h3>" + html_table(
        pairs, {"given": "given", "suggested": "suggested", "samples": "samples", "% of flagged": "share",
                "mean label quality": "quality"}, name="issues-pairs", decimals={"share": 1, "quality": 3})
