"""The report's distillation section: runs read from their directories, named by
configuration (seeds folded), compared with a baseline, and per-class accuracy against the
teacher's."""
from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
import polars as pl

from ..engine import TEST_PREDICTIONS
from ..errors import UserError, option_name
from ..io import sha256_file
from ..summaries import VERDICT_RULE, aggregate_runs, html_table, paired_deltas, summary_cells, text
from ..table import TableMeta, read_metadata, read_parquet
from .report_figures import Inputs, Part, label_names, per_class_accuracy
from .report_labels import run_names, run_temperatures
from .report_profile import DEPLOYMENT, accuracy_latency, comparison_columns, deployment_cell, read_profiles, with_profile

#: what the comparison's profile columns are (energytools profile; docs/guide.md "Deploying the student")
PROFILE_NOTE = (" Size and speed from `energytools profile` (means over seeds): MMACs, millions of "
                "multiply-accumulates per image (FLOPs / 2); ms b1, median PyTorch eager latency at batch 1. "
                "Batch 64, parameters, checkpoint size, onnxruntime and the spread: the profile table below.")


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
        metrics = read_parquet(run / "metrics.parquet", None)
        epochs = max(metrics.height, 1)
        rows.append({"run": name, "stem": stem, "key": key, "method": str(summary["method"]),
                     "seed": train.get("seed"), "best": float(summary["best_test_acc"]),
                     "last": float(summary["last_test_acc"]), "best_val": summary.get("best_val_acc"),
                     "seconds_per_epoch": float(summary["seconds"]) / epochs,
                     "temperatures": run_temperatures(str(summary["method"]), config, summary, metrics),
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
    raise UserError(f"{option_name('baseline', name)} names no configuration, run or method of the runs; configurations: "
                    f"{', '.join(runs['config'].unique(maintain_order=True))}")


def comparison_table(runs: pl.DataFrame, baseline: str) -> str:
    """Configurations against the baseline: mean ± std over seeds, paired Δ, wins, verdict, and the
    size and latency columns of profiled runs (report_profile; means over seeds)."""
    profiled = comparison_columns(runs)
    aggregated = summary_cells(aggregate_runs(
        runs.select("config", "method", "seed", "best", "last", "seconds_per_epoch", "temperatures", "augmented",
                    *profiled.values()),
        baseline)).with_columns(is_baseline=pl.col("verdict") == "baseline")
    aggregated, shown = deployment_cell(aggregated, profiled)
    return html_table(aggregated, {
        "configuration": "config", "method": "method", "seeds": "seeds", "test % (best val)": "best",
        f"Δ vs {baseline}": "delta_best", "test % (last epoch)": "last", "Δ last": "delta_last", "wins": "wins",
        "verdict": "verdict", "s/epoch": "seconds_per_epoch", "T low / mid / high": "temperatures",
        "HE-DA samples": "augmented", **shown}, name="comparison", decimals={"seconds_per_epoch": 1, "augmented": 0},
        sort_keys={"best": "best_mean", "delta_best": "delta_best_mean", "last": "last_mean",
                   "delta_last": "delta_last_mean", DEPLOYMENT: "eager_b1_ms"}, highlight="is_baseline")


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
    profiles = read_profiles(inputs.profiles)
    runs = with_profile(read_runs(inputs.runs), profiles)
    chosen = choose_baseline(runs, baseline)
    profiled = comparison_columns(runs)
    parts: dict[str, Part] = {"comparison": comparison_table(runs, chosen) + (
        "<p class='note'>A configuration is the runs whose config.json agree except for train.seed. "
        f"{text(VERDICT_RULE)}{PROFILE_NOTE if profiled else ''}</p>")}
    parts.update(accuracy_latency(aggregate_runs(runs.select("config", "seed", "best", "last", *profiled.values()),
                                                 chosen), profiles))
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


