"""`energytools report`: one self-contained HTML file to look at energies, curation and results.

Sections, in order: Distillation (the comparison of runs first, so it is on screen when the
page opens), Scores (one per score table), Tables compared (two or more score tables),
Curation (HE-DA shards). Tables are HTML tables with every row shown and numbers rounded
(:mod:`energytools.summaries`, which benchmarks/study.py writes docs/results.md with).

Every plot is drawn from aggregates (histogram counts computed here with numpy/polars), so a
1.28M-row table makes a report of a few MB in seconds. plotly.js is embedded once.

Every name that comes from data (class names, run and directory names, paths, metadata of
the tables read) goes through :func:`text` on its way into a figure, and through
:func:`~energytools.summaries.html_table` (which escapes) into a table.
"""
from __future__ import annotations

import base64
import html
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.offline import get_plotlyjs

from ..console import console, headline
from ..data.shards import MANIFEST, read_manifest, read_shards
from ..distillers import METHODS
from ..energy import GROUPS
from ..engine import TEST_PREDICTIONS
from ..errors import UserError
from ..io import atomic_path, check_output_free, sha256_file
from ..summaries import VERDICT_RULE, aggregate_runs, html_table, paired_deltas, summary_cells, text
from ..table import TableMeta, load_table, read_metadata, read_parquet

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


def _is_train_run(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("stage") == "train"
    except (OSError, ValueError, AttributeError):
        return False


def discover(paths: list[Path | str]) -> Inputs:
    """Find score tables, shard directories, distill runs and teacher runs in files and run directories."""
    found = Inputs()

    def visit(path: Path, depth: int = 0):
        if path.is_file() and path.suffix == ".parquet":
            if read_metadata(path).get("kind") == "scores":
                found.scores.append(path)
            elif depth == 0:
                raise UserError(f"{path} is not an energytools score table")
        elif path.is_dir():
            if (path / MANIFEST).exists():
                found.shards.append(path)
            elif (path / "summary.json").exists() and (path / "metrics.parquet").exists():
                found.runs.append(path)
            elif (path / "metrics.parquet").exists() and _is_train_run(path):
                found.teachers.append(path)
            elif depth < 3:
                for child in sorted(path.iterdir()):
                    if not child.name.startswith("."):
                        visit(child, depth + 1)
        elif depth == 0:
            raise UserError(f"{path} does not exist")

    for p in paths:
        visit(Path(p))
    if not (found.scores or found.shards or found.runs):
        raise UserError(f"no energytools outputs found in {', '.join(map(str, paths))}")
    return found


def _edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)


def grouped_histogram(frame: pl.DataFrame, column: str, by: str, title: str, levels=None,
                      edges: np.ndarray | None = None) -> go.Figure:
    """Overlaid bar histograms of ``column`` per value of ``by``, on shared bin edges."""
    values = frame[column].to_numpy().astype(np.float64)
    edges = _edges(values) if edges is None else edges
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
    counts, e_edges, c_edges = np.histogram2d(e, c, bins=[_edges(e, 50), _edges(c, 50)])
    rho = frame.select(pl.corr("energy", "confidence", method="spearman")).item()
    heat = go.Figure(go.Heatmap(x=(e_edges[:-1] + e_edges[1:]) / 2, y=(c_edges[:-1] + c_edges[1:]) / 2,
                                z=np.log1p(counts.T), colorscale="Viridis", colorbar_title="log(1+n)", name="density"))
    heat.update_layout(title=text(f"{label}: energy vs confidence (Spearman {rho:.3f})"), xaxis_title="energy",
                       yaxis_title="confidence", height=420)
    figures["density"] = heat
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


def _thumbnails(frame: pl.DataFrame, meta: TableMeta, count: int = 12) -> str:
    """PNG strips of the lowest- and highest-energy images (empty when the dataset is unavailable)."""
    from ..data.shards import encode_png

    try:
        dataset = meta.data.build(meta.split)
    except UserError:
        return "<p>(images unavailable: the dataset is not on this machine)</p>"
    position = {int(s): i for i, s in enumerate(dataset.sample_ids)}
    ordered = frame.sort(["energy", "sample_id"])
    parts = []
    for title, rows in (("lowest energy", ordered.head(count)), ("highest energy", ordered.tail(count).reverse())):
        cells = []
        for row in rows.iter_rows(named=True):
            if row["sample_id"] not in position:
                continue
            png = base64.b64encode(encode_png(dataset.image(position[row["sample_id"]]))).decode()
            cells.append(f'<figure><img src="data:image/png;base64,{png}" width="64" height="64">'
                         f'<figcaption>y={text(row["label"])} p={text(row["pred"])}<br>E={row["energy"]:.2f}'
                         '</figcaption></figure>')
        parts.append(f"<h4>{title}</h4><div class='strip'>{''.join(cells)}</div>")
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

#: a path part that only names a seed ("seed0", "s1") or a name's seed suffix ("kd-seed2")
SEED_PART = re.compile(r"(?:seed|s)[-_]?\d+", re.IGNORECASE)
SEED_SUFFIX = re.compile(r"[-_.]seed[-_]?\d+$", re.IGNORECASE)


def run_names(runs: list[Path]) -> tuple[list[str], list[str]]:
    """Each run's path relative to the runs' common folder, and the same without the seed
    ("kd/seed1" -> "kd"), which names its configuration."""
    root = Path(os.path.commonpath([run.resolve().parent for run in runs]))
    names, stems = [], []
    for run in runs:
        parts = run.resolve().relative_to(root).parts
        names.append("/".join(parts))
        kept = [SEED_SUFFIX.sub("", p) for p in parts if not SEED_PART.fullmatch(p)]
        stems.append("/".join(kept) or run.name)
    return names, stems


def run_temperatures(method: str, config: dict, summary: dict) -> str:
    """What the run's temperatures were: per group for Energy KD, the one T of kd and dkd, or a dash."""
    spec = METHODS.get(method)
    plan = config.get("temperature_plan") or {}
    if spec is not None and spec.per_sample_temperature:
        temps = plan.get("temperatures") or summary.get("temperatures")
        if temps:
            rule = plan.get("rule", "groups")
            return temperatures_text(temps) + ("" if rule == "groups" else f" ({rule} rule)")
    constant = (config.get("method_options") or {}).get("kd_temperature")
    return f"{round(float(constant), 3):g} (one T)" if constant is not None else "—"


def read_runs(runs: list[Path]) -> pl.DataFrame:
    """One row per distill run: run (name), config (name of its configuration: the runs whose
    config.json agree except for train.seed), method, seed, best / last (test accuracy of best.pt
    and of the last epoch), best_val, seconds_per_epoch, temperatures, augmented, teacher_sha256, path."""
    names, stems = run_names(runs)
    rows = []
    for run, name, stem in zip(runs, names, stems):
        summary = json.loads((run / "summary.json").read_text())
        config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
        train = config.get("train") or {}
        key = json.dumps({**config, "train": {k: v for k, v in train.items() if k != "seed"}}, sort_keys=True,
                         default=str) if config else str(run)
        epochs = max(read_parquet(run / "metrics.parquet", ["epoch"]).height, 1)
        rows.append({"run": name, "stem": stem, "key": key, "method": str(summary["method"]),
                     "seed": train.get("seed"), "best": float(summary["best_test_acc"]),
                     "last": float(summary["last_test_acc"]), "best_val": summary.get("best_val_acc"),
                     "seconds_per_epoch": float(summary["seconds"]) / epochs,
                     "temperatures": run_temperatures(str(summary["method"]), config, summary),
                     "augmented": int(summary.get("augmented_samples", 0)),
                     "teacher_sha256": (config.get("teacher") or {}).get("sha256"), "path": str(run)})
    frame = pl.DataFrame(rows, schema_overrides={"seed": pl.Int64, "best_val": pl.Float64,
                                                 "teacher_sha256": pl.String})
    labels = {}
    for key, group in frame.group_by("key", maintain_order=True):
        label = ", ".join(group["stem"].unique(maintain_order=True))
        labels[key[0]] = label if label not in labels.values() else f"{label} ({len(labels) + 1})"
    return frame.with_columns(config=pl.col("key").replace_strict(labels)).drop("stem", "key")


def choose_baseline(runs: pl.DataFrame, name: str | None) -> str:
    """The configuration that Δ is measured against: ``name`` (a configuration, run or method), else
    the first kd configuration (those without HE-DA samples first), else the first configuration."""
    if name is None:
        kd = runs.filter(pl.col("method") == "kd").sort("augmented", maintain_order=True)
        return kd["config"][0] if kd.height else runs["config"][0]
    for column in ("config", "run", "method"):
        match = runs.filter(pl.col(column) == name)
        if match.height:
            return match["config"][0]
    raise UserError(f"--baseline {name!r} names no configuration, run or method of the runs; configurations: "
                    f"{', '.join(runs['config'].unique(maintain_order=True))}")


def comparison_table(runs: pl.DataFrame, baseline: str) -> str:
    """Configurations against the baseline: mean ± std over seeds, paired Δ, wins, verdict."""
    aggregated = summary_cells(aggregate_runs(
        runs.select("config", "method", "seed", "best", "last", "seconds_per_epoch", "temperatures", "augmented"),
        baseline)).with_columns(is_baseline=pl.col("verdict") == "baseline")
    return html_table(aggregated, {
        "configuration": "config", "method": "method", "seeds": "seeds", "test % (best val)": "best",
        f"Δ vs {baseline}": "delta_best", "test % (last epoch)": "last", "Δ last": "delta_last", "wins": "wins",
        "verdict": "verdict", "s/epoch": "seconds_per_epoch", "T low / mid / high": "temperatures",
        "HE-DA samples": "augmented"}, name="comparison", decimals={"seconds_per_epoch": 1, "augmented": 0},
        sort_keys={"best": "best_mean", "delta_best": "delta_best_mean", "last": "last_mean",
                   "delta_last": "delta_last_mean"}, highlight="is_baseline")


def runs_table(runs: pl.DataFrame, baseline: str) -> str:
    """Every run with its difference to the baseline's run of the same seed."""
    return html_table(paired_deltas(runs, baseline), {
        "run": "run", "configuration": "config", "seed": "seed", "val % (best)": "best_val",
        "test % (best val)": "best", f"Δ vs {baseline}": "delta_best", "test % (last epoch)": "last",
        "Δ last": "delta_last", "s/epoch": "seconds_per_epoch"}, name="runs", decimals={"seconds_per_epoch": 1})


def teacher_per_class(inputs: Inputs, tables: dict[Path, pl.DataFrame], metas: dict[Path, TableMeta],
                      teacher_sha: str | None) -> tuple[pl.DataFrame, str] | None:
    """The students' teacher's per-class accuracy and where it comes from, preferring the test
    split: its train run's test predictions, then a test-split score table, then a train table."""
    def same_teacher(sha: str) -> bool:
        return teacher_sha is None or sha == teacher_sha

    for run in inputs.teachers:
        if (run / TEST_PREDICTIONS).exists() and (run / "best.pt").exists() and same_teacher(sha256_file(run / "best.pt")):
            predictions = read_parquet(run / TEST_PREDICTIONS)
            return (per_class_accuracy(predictions, pl.col("pred_best") == pl.col("label")),
                    f"teacher (test split, {run.name}/best.pt)")
    for split, note in (("test", "test split"), ("train", "train split, not the students' test samples")):
        for path, meta in metas.items():
            if meta.split == split and same_teacher(meta.teacher.sha256):
                return per_class_accuracy(tables[path], pl.col("correct")), f"teacher ({note}, {path.name})"
    return None


def per_class_parts(runs: pl.DataFrame, teacher: tuple[pl.DataFrame, str] | None,
                    classes: tuple[str, ...]) -> dict[str, Part]:
    """Per-class test accuracy of each configuration (best.pt, mean over its seeds) beside the teacher's."""
    columns: dict[str, pl.DataFrame] = {}
    if teacher is not None:
        columns[teacher[1]] = teacher[0].select("label", "accuracy")
    missing = []
    for config, group in runs.group_by("config", maintain_order=True):
        paths = [Path(p) / TEST_PREDICTIONS for p in group["path"]]
        if not all(p.exists() for p in paths):
            missing.append(config[0])
            continue
        per_run = [per_class_accuracy(read_parquet(p), pl.col("pred_best") == pl.col("label")) for p in paths]
        columns[config[0]] = pl.concat(per_run).group_by("label").agg(pl.col("accuracy").mean())
    note = (f"<p class='note'>Without {TEST_PREDICTIONS} (runs of an earlier energytools): "
            f"{text(', '.join(missing))}.</p>" if missing else "")
    if len(columns) <= (teacher is not None):
        return {"per_class_note": note} if note else {}
    labels = pl.concat([f.select("label") for f in columns.values()]).unique().sort("label")
    wide = labels.with_columns(pl.Series("class", label_names(labels["label"].to_list(), classes)))
    for i, frame in enumerate(columns.values()):
        wide = wide.join(frame.select("label", pl.col("accuracy").alias(f"c{i}")), on="label", how="left",
                         validate="1:1", maintain_order="left")
    fig = go.Figure()
    for i, name in enumerate(columns):
        fig.add_bar(x=[text(c) for c in wide["class"]], y=wide[f"c{i}"].to_numpy(), name=text(name),
                    marker_color="#333333" if teacher is not None and i == 0 else None)
    fig.update_layout(barmode="group", title="per-class test accuracy of best.pt (mean over seeds) and the teacher",
                      xaxis_title="class", yaxis_title="accuracy %", height=420)
    table = html_table(wide, {"class": "class", **{name: f"c{i}" for i, name in enumerate(columns)}},
                       name="per-class-accuracy")
    return {"per_class_accuracy": fig, "per_class_table": "<h3>per-class test accuracy %</h3>" + table + note}


def run_parts(inputs: Inputs, tables: dict[Path, pl.DataFrame], metas: dict[Path, TableMeta],
              baseline: str | None = None) -> tuple[dict[str, Part], str]:
    """The Distillation section: the comparison table first, then per-class accuracy, curves, every run."""
    runs = read_runs(inputs.runs)
    chosen = choose_baseline(runs, baseline)
    parts: dict[str, Part] = {"comparison": comparison_table(runs, chosen) + (
        "<p class='note'>A configuration is the runs whose config.json agree except for train.seed. "
        f"{text(VERDICT_RULE)}</p>")}
    classes = next((tuple(read_metadata(Path(p) / TEST_PREDICTIONS).get("classes") or ())
                    for p in runs["path"] if (Path(p) / TEST_PREDICTIONS).exists()), ())
    classes = classes or next((m.dataset.classes for m in metas.values()), ())
    teacher_sha = runs["teacher_sha256"].drop_nulls().first()
    parts.update(per_class_parts(runs, teacher_per_class(inputs, tables, metas, teacher_sha), classes))
    curves = go.Figure()
    for run in runs.iter_rows(named=True):
        metrics = read_parquet(Path(run["path"]) / "metrics.parquet")
        for column, dash in (("val_acc", "solid"), ("test_acc", "dot")):
            curves.add_scatter(x=metrics["epoch"].to_numpy(), y=metrics[column].to_numpy(), mode="lines+markers",
                               name=text(f"{run['run']} {column}"), line={"dash": dash})
    curves.update_layout(title="validation (solid) and test (dotted) accuracy per epoch", xaxis_title="epoch",
                         yaxis_title="accuracy %", height=440)
    parts["curves"] = curves
    if runs["config"].n_unique() < runs.height:  # seeds were aggregated: show each run too
        parts["runs_table"] = "<h3>every run</h3>" + runs_table(runs, chosen)
    intro = (f"<p>{runs.height} run(s) in {runs['config'].n_unique()} configuration(s); test accuracy (%) of the "
             f"checkpoint with the best validation accuracy (best.pt) and of the last epoch; baseline "
             f"<b>{text(chosen)}</b> (choose with --baseline).</p>")
    return parts, intro


# --- score tables side by side ----------------------------------------------------------------

def table_labels(paths: list[Path], metas: dict[Path, TableMeta]) -> dict[Path, str]:
    """"scores.parquet (train)", with the parent folder when two tables share a file name."""
    names = [p.name for p in paths]
    return {p: f"{p.parent.name + '/' if names.count(p.name) > 1 else ''}{p.name} ({metas[p].split})" for p in paths}


def tables_compared(tables: dict[Path, pl.DataFrame], labels: dict[Path, str]) -> dict[str, Part]:
    """Energy distributions of every table overlaid (fraction of samples) and per-group numbers."""
    edges = _edges(np.concatenate([f["energy"].to_numpy() for f in tables.values()]))
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


def build_report(inputs: Inputs, thumbnails: bool = True, baseline: str | None = None) -> list[Section]:
    """Sections of the report: (title, parts by name, HTML under the title)."""
    sections: list[Section] = []
    tables, metas = {}, {}
    for path in inputs.scores:
        frame, meta = load_table(path, ["sample_id", "label", "pred", "correct", "energy", "confidence",
                                        "energy_group"])
        tables[path] = frame
        metas[path] = meta
    if inputs.runs:
        parts, intro = run_parts(inputs, tables, metas, baseline)
        sections.append(("Distillation", parts, intro))
    for path, frame in tables.items():
        meta = metas[path]
        label = f"{path.name} ({meta.split})"
        s = meta.summary
        summary = (f"<p>{text(s['samples'])} samples, teacher {text(meta.teacher.arch)} accuracy "
                   f"{s['accuracy']:.2f}%, T_E {text(meta.energy_temperature)}, groups low &le; "
                   f"{meta.thresholds['low_max']:.3f}, high &ge; {meta.thresholds['high_min']:.3f}, temperatures "
                   f"{temperatures_text(dict(zip(GROUPS, meta.rule.temperatures)))} (low / mid / high)</p>")
        extra = _thumbnails(frame, meta) if thumbnails else ""
        sections.append((f"Scores: {label}", score_figures(frame, meta, label), summary + extra))
    if len(tables) > 1:
        sections += comparison_sections(tables, metas)
    train_path = next((p for p in inputs.scores if metas[p].split == "train"), None)
    train_table, train_meta = (tables[train_path], metas[train_path]) if train_path else (None, None)
    for directory in inputs.shards:
        manifest = read_manifest(directory)
        sel = manifest["selection"]
        summary = (f"<p>{text(manifest['rows'])} augmented samples from {text(sel['count'])} selected "
                   f"({text(sel['select'])}, ratio {text(sel['ratio'])}, energy {sel['energy_min']:.3f} .. "
                   f"{sel['energy_max']:.3f}), policy {text(manifest['config']['policy'])}</p>")
        sections.append((f"Curation: {directory.name}", curation_figures(directory, train_table, train_meta),
                         summary))
    return sections


#: sorts a table by the clicked column: numbers by their data-sort value, text alphabetically
SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const up = th.dataset.order !== 'up';
  th.dataset.order = up ? 'up' : 'down';
  const key = row => { const cell = row.cells[i], n = parseFloat(cell.dataset.sort ?? cell.textContent);
                       return isNaN(n) ? cell.textContent : n; };
  [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    const order = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
    return up ? order : -order;
  }).forEach(row => body.appendChild(row));
}));
"""

STYLE = ("body{font-family:sans-serif;margin:1.5em 2em;max-width:1280px} h1{margin:0 0 .3em} h2{margin:1em 0 .3em}"
         " .strip{display:flex;flex-wrap:wrap} figure{margin:4px;text-align:center;font-size:11px}"
         " img{image-rendering:pixelated;border:1px solid #ccc}"
         " table{border-collapse:collapse;font-size:13px;margin:.3em 0 .8em}"
         " th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}"
         " th{background:#f2f2f2;cursor:pointer} td.num{text-align:right;font-variant-numeric:tabular-nums}"
         " tr.highlight td{background:#fff4cc} .note{color:#555;font-size:12px;max-width:1100px}")


def render(sections: list[Section], title: str = "energytools report") -> str:
    body = []
    for heading, parts, extra in sections:
        body.append(f"<section><h2>{text(heading)}</h2>{extra}")
        for name, part in parts.items():
            content = part if isinstance(part, str) else part.to_html(include_plotlyjs=False, full_html=False,
                                                                       config={"displaylogo": False})
            body.append(f"<div class='{'table' if isinstance(part, str) else 'fig'}' "
                        f"data-name='{html.escape(name)}'>{content}</div>")
        body.append("</section>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(body)}<script>{SORT_SCRIPT}</script></body></html>")


def report(paths: list[Path | str], out: Path | str = "report.html", overwrite: bool = True,
           thumbnails: bool = True, baseline: str | None = None) -> Path:
    """Write the HTML report for run directories or files; returns its path. ``baseline`` names the
    configuration, run or method the runs are compared with (default: kd, see :func:`choose_baseline`)."""
    out = Path(out)
    check_output_free(out, overwrite)
    inputs = discover([Path(p) for p in paths])
    html_text = render(build_report(inputs, thumbnails, baseline))
    with atomic_path(out) as tmp:
        tmp.write_text(html_text)
    console.print(headline("done", f": wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(inputs.scores)} "
                                   f"table(s), {len(inputs.shards)} shard set(s), {len(inputs.runs)} run(s)"))
    return out
