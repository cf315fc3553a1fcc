"""The report's deployment columns: size and speed from `energytools profile` files, joined to
the distill runs by checkpoint, and accuracy against latency (one point per configuration)."""
from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import polars as pl

from ..summaries import format_value, html_table, text
from .profile import read_profile
from .report_figures import Part

#: profile columns the comparison table shows (header -> column), when the runs were profiled; few, so
#: that the table still fits the first screen (the profile table below holds every column)
COMPARISON_COLUMNS = {"MMACs": "mmacs", "ms b1": "eager_b1_ms"}

#: the latency on the scatter's x axis, preferred first
LATENCY_AXES = (("eager_b1_ms", "PyTorch eager, batch 1"), ("onnx_b1_ms", "onnxruntime, batch 1"))


def read_profiles(paths: list[Path]) -> pl.DataFrame | None:
    """Every profile file's rows, with ``run_path`` (the checkpoint's directory) to join runs on;
    a model profiled twice keeps its last row."""
    if not paths:
        return None
    frames = [read_profile(p) for p in paths]
    frame = pl.concat(frames, how="diagonal_relaxed")
    directory = [str(Path(c).resolve().parent) for c in frame["checkpoint"]]
    return (frame.with_columns(run_path=pl.Series(directory, dtype=pl.String),
                               params_m=pl.col("params") / 1e6, mmacs=pl.col("macs") / 1e6)
            .unique("run_path", keep="last", maintain_order=True))


def with_profile(runs: pl.DataFrame, profiles: pl.DataFrame | None) -> pl.DataFrame:
    """``runs`` (report_runs.read_runs) with the comparison's profile columns (null where a run
    was not profiled); unchanged without profile files."""
    if profiles is None:
        return runs
    profiles = profiles.with_columns([pl.lit(None, dtype=pl.Float64).alias(c) for c in COMPARISON_COLUMNS.values()
                                      if c not in profiles.columns])
    present = list(COMPARISON_COLUMNS.values())
    keyed = runs.with_columns(run_path=pl.Series([str(Path(p).resolve()) for p in runs["path"]], dtype=pl.String))
    joined = keyed.join(profiles.select("run_path", *present), on="run_path", how="left", validate="m:1",
                        maintain_order="left")
    return joined.drop("run_path")


#: the comparison's one profile cell: "MMACs / ms b1" (one column, so the table fits the first screen)
DEPLOYMENT = "deployment"


def deployment_cell(aggregated: pl.DataFrame, profiled: dict[str, str]) -> tuple[pl.DataFrame, dict[str, str]]:
    """``aggregated`` with the text column :data:`DEPLOYMENT` and its header, or as it is when no run
    was profiled."""
    if not profiled:
        return aggregated, {}
    columns = list(COMPARISON_COLUMNS.values())
    cells = [" / ".join(format_value(row.get(c)) for c in columns) for row in aggregated.to_dicts()]
    return (aggregated.with_columns(pl.Series(DEPLOYMENT, cells, dtype=pl.String)),
            {" / ".join(COMPARISON_COLUMNS): DEPLOYMENT})


def comparison_columns(runs: pl.DataFrame) -> dict[str, str]:
    """The profile columns of ``runs`` (all of them, or none when no run was profiled)."""
    profiled = any(c in runs.columns and runs[c].drop_nulls().len() for c in COMPARISON_COLUMNS.values())
    return {h: c for h, c in COMPARISON_COLUMNS.items() if c in runs.columns} if profiled else {}


def accuracy_latency(aggregated: pl.DataFrame, profiles: pl.DataFrame | None) -> dict[str, Part]:
    """Test accuracy (best.pt, mean over seeds) against latency, one point per configuration, the
    teacher marked; and every profiled model in a table with its interquartile ranges."""
    if profiles is None:
        return {}
    axis = next(((c, label) for c, label in LATENCY_AXES if c in aggregated.columns
                 and aggregated[c].drop_nulls().len()), None)
    parts: dict[str, Part] = {}
    if axis is not None:
        column, label = axis
        points = aggregated.filter(pl.col(column).is_not_null())
        fig = go.Figure()
        fig.add_scatter(x=points[column].to_numpy(), y=points["best_mean"].to_numpy(), mode="markers+text",
                        text=[text(c) for c in points["config"]], textposition="top center", name="students",
                        marker={"size": 10})
        teachers = profiles.filter((pl.col("role") == "teacher") & pl.col(column).is_not_null()
                                   & pl.col("test_acc").is_not_null())
        if teachers.height:
            fig.add_scatter(x=teachers[column].to_numpy(), y=teachers["test_acc"].to_numpy(), mode="markers+text",
                            text=[text(r) for r in teachers["run"]], textposition="bottom center", name="teacher",
                            marker={"size": 14, "symbol": "star", "color": "#333333"})
        fig.update_layout(title=f"test accuracy (best.pt, mean over seeds) against latency ({label}, median)",
                          xaxis_title=f"latency ms ({label})", yaxis_title="test accuracy %", height=440)
        parts["accuracy_latency"] = fig
    columns = {"role": "role", "model": "run", "arch": "arch", "test %": "test_acc", "params (M)": "params_m",
               "MMACs": "mmacs", "ckpt MB": "checkpoint_mb"}
    for latency in sorted(c for c in profiles.columns if c.endswith("_ms") and not c.endswith("_iqr_ms")):
        if profiles[latency].drop_nulls().len():
            kind, batch = latency.split("_")[:2]
            columns[f"{kind} ms {batch}"] = latency
            columns[f"{kind} IQR {batch}"] = latency.replace("_ms", "_iqr_ms")
    parts["profile_table"] = ("<h3>size and latency of every profiled model (ms: median; IQR: interquartile "
                              "range)</h3>" + html_table(profiles, columns, name="profile",
                                                         decimals={"params_m": 3, "mmacs": 2}))
    return parts
