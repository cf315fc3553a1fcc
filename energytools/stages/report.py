"""`energytools report`: one self-contained HTML file to look at energies, curation and results.

Every plot is drawn from aggregates (histogram counts computed here with numpy/polars), so a
1.28M-row table makes a report of a few MB in seconds. plotly.js is embedded once.

Every name that comes from data (class names, run and directory names, paths, metadata of
the tables read) goes through :func:`text` on its way into the HTML or a figure.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.offline import get_plotlyjs

from ..data.shards import MANIFEST, read_manifest, read_shards
from ..energy import GROUPS
from ..console import console, headline
from ..errors import UserError
from ..io import atomic_path, check_output_free
from ..table import TableMeta, load_table, read_metadata, read_parquet

GROUP_COLORS = {"low": "#2b8cbe", "mid": "#969696", "high": "#e34a33"}
BINS = 60


def text(value) -> str:
    """``value`` as literal text for HTML and for plotly.js, which renders tags such as <a>,
    <b> and <span> in titles, legends, tick labels and table cells but decodes &lt; &gt; &amp;."""
    return html.escape(str(value), quote=False)


def class_names(labels, meta: TableMeta | None) -> list[str]:
    """"3 cat" for label 3 when the table records the dataset's class names, else "3"."""
    names = meta.dataset.classes if meta is not None else ()
    return [text(f"{label} {names[label]}" if isinstance(label, int) and 0 <= label < len(names) else label)
            for label in labels]


@dataclass
class Inputs:
    scores: list[Path] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    runs: list[Path] = field(default_factory=list)


def discover(paths: list[Path | str]) -> Inputs:
    """Find score tables, shard directories and distill runs in files and run directories."""
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


def score_figures(frame: pl.DataFrame, meta: TableMeta, label: str) -> dict[str, go.Figure]:
    figures = {}
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
    per_class = (frame.group_by("label").agg(pl.col("energy").mean().alias("mean_energy"),
                                             (pl.col("correct").mean() * 100).alias("accuracy"),
                                             *[(pl.col("energy_group") == g).mean().alias(f"share_{g}") for g in GROUPS])
                 .sort("label"))
    classes = class_names(per_class["label"].to_list(), meta)
    bars = go.Figure()
    for g in GROUPS:
        bars.add_bar(x=classes, y=per_class[f"share_{g}"].to_numpy(), name=g, marker_color=GROUP_COLORS[g])
    bars.update_layout(barmode="stack", title=text(f"{label}: energy-group share per class"), xaxis_title="class",
                       yaxis_title="share", height=360)
    figures["class_groups"] = bars
    figures["class_table"] = go.Figure(go.Table(
        header={"values": ["class", "mean energy", "teacher accuracy %", "low", "mid", "high"]},
        cells={"values": [classes, per_class["mean_energy"].round(3).to_list(), per_class["accuracy"].round(2).to_list(),
                          *[per_class[f"share_{g}"].round(3).to_list() for g in GROUPS]]}))
    figures["class_table"].update_layout(title=text(f"{label}: per class"), height=80 + 28 * len(classes))
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


def curation_figures(directory: Path, scores: pl.DataFrame | None, meta: TableMeta | None = None) -> dict[str, go.Figure]:
    manifest = read_manifest(directory)
    rows = read_shards(directory).drop("image")
    figures = {}
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


def run_figures(runs: list[Path]) -> dict[str, go.Figure]:
    curves = go.Figure()
    rows = []
    for run in runs:
        metrics = read_parquet(run / "metrics.parquet")
        summary = json.loads((run / "summary.json").read_text())
        for column, dash in (("val_acc", "solid"), ("test_acc", "dot")):
            curves.add_scatter(x=metrics["epoch"].to_numpy(), y=metrics[column].to_numpy(), mode="lines+markers",
                               name=text(f"{run.name} {column}"), line={"dash": dash})
        temps = summary.get("temperatures") or {}
        rows.append([run.name, summary["method"], ",".join(str(temps.get(g)) for g in GROUPS) if temps else "",
                     summary.get("augmented_samples", 0), f"{summary['best_test_acc']:.2f}",
                     f"{summary['last_test_acc']:.2f}", f"{summary['seconds']:.0f}"])
    curves.update_layout(title="validation (solid) and test (dotted) accuracy per epoch", xaxis_title="epoch",
                         yaxis_title="accuracy %", height=440)
    table = go.Figure(go.Table(header={"values": ["run", "method", "T low,mid,high", "HE-DA samples",
                                                  "test acc (val-selected)", "test acc (last)", "seconds"]},
                               cells={"values": [[text(v) for v in col] for col in zip(*rows)] if rows else []}))
    table.update_layout(title="distillation runs", height=120 + 30 * len(rows))
    return {"runs_table": table, "curves": curves}


def split_comparison(tables: dict[Path, pl.DataFrame], metas: dict[Path, TableMeta]) -> dict[str, go.Figure]:
    """Train and test (or any two splits) side by side: energy densities and per-group numbers."""
    frames = {f"{p.name} ({metas[p].split})": f for p, f in tables.items()}
    energies = np.concatenate([f["energy"].to_numpy() for f in frames.values()])
    edges = _edges(energies)
    centers = (edges[:-1] + edges[1:]) / 2
    density = go.Figure()
    rows = []
    for label, frame in frames.items():
        counts, _ = np.histogram(frame["energy"].to_numpy(), bins=edges)
        density.add_scatter(x=centers, y=counts / max(frame.height, 1), mode="lines", name=text(label),
                            line_shape="hv")
        for g in frame.group_by("energy_group").agg(pl.len().alias("n"), pl.col("confidence").mean().alias("c"),
                                                    (pl.col("correct").mean() * 100).alias("a")).sort("energy_group").iter_rows():
            rows.append([label, g[0], g[1], f"{g[2]:.3f}", f"{g[3]:.2f}"])
    density.update_layout(title="energy distribution per split (fraction of samples)", xaxis_title="energy",
                          yaxis_title="fraction", height=380)
    table = go.Figure(go.Table(header={"values": ["table", "group", "samples", "mean confidence", "teacher acc %"]},
                               cells={"values": [[text(v) for v in col] for col in zip(*rows)]}))
    table.update_layout(title="per-group confidence and accuracy per split", height=120 + 26 * len(rows))
    return {"split_density": density, "split_groups": table}


def build_report(inputs: Inputs, thumbnails: bool = True) -> list[tuple[str, dict[str, go.Figure], str]]:
    """Sections of the report: (title, figures by name, extra HTML)."""
    sections = []
    tables, metas = {}, {}
    for path in inputs.scores:
        frame, meta = load_table(path, ["sample_id", "label", "pred", "correct", "energy", "confidence",
                                        "energy_group"])
        tables[path] = frame
        metas[path] = meta
        label = f"{path.name} ({meta.split})"
        s = meta.summary
        summary = (f"<p>{text(s['samples'])} samples, teacher {text(meta.teacher.arch)} accuracy "
                   f"{s['accuracy']:.2f}%, T_E {text(meta.energy_temperature)}, groups low &le; "
                   f"{meta.thresholds['low_max']:.4f}, high &ge; {meta.thresholds['high_min']:.4f}, temperatures "
                   f"{text(json.dumps(meta.rule.to_dict()['temperatures']))}</p>")
        extra = _thumbnails(frame, meta) if thumbnails else ""
        sections.append((f"Scores: {label}", score_figures(frame, meta, label), summary + extra))
    if len({m.split for m in metas.values()}) > 1:
        sections.append(("Splits side by side", split_comparison(tables, metas), ""))
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
    if inputs.runs:
        sections.append(("Distillation", run_figures(inputs.runs), ""))
    return sections


def render(sections, title: str = "energytools report") -> str:
    body = []
    for heading, figures, extra in sections:
        body.append(f"<section><h2>{text(heading)}</h2>{extra}")
        for name, fig in figures.items():
            body.append(f"<div class='fig' data-name='{name}'>"
                        + fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})
                        + "</div>")
        body.append("</section>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px} .strip{display:flex;flex-wrap:wrap}"
             "figure{margin:4px;text-align:center;font-size:11px} img{image-rendering:pixelated;border:1px solid #ccc}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")


def report(paths: list[Path | str], out: Path | str = "report.html", overwrite: bool = True,
           thumbnails: bool = True) -> Path:
    """Write the HTML report for run directories or files; returns its path."""
    out = Path(out)
    check_output_free(out, overwrite)
    inputs = discover([Path(p) for p in paths])
    html_text = render(build_report(inputs, thumbnails))
    with atomic_path(out) as tmp:
        tmp.write_text(html_text)
    console.print(headline("done", f": wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(inputs.scores)} "
                                   f"table(s), {len(inputs.shards)} shard set(s), {len(inputs.runs)} run(s)"))
    return out
