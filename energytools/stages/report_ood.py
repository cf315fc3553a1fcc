"""The report's "Out-of-distribution" sections: a table scored with `score --reference` against
its reference's validation scores (kept in the table's metadata), one histogram per OOD score
with the threshold that keeps the target share of them; for a table of inputs known to be out of
distribution, AUROC and FPR at that TPR for each score (energytools.ood)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import polars as pl

from ..errors import UserError
from ..ood import OOD_SCORES, auroc, decode_scores, false_positive_rate, oriented, threshold_at_tpr
from ..summaries import html_table, text
from ..table import TableMeta, load_table
from .report_figures import BINS, Part, Section, histogram_edges

#: the score-table columns the OOD scores are read from
OOD_INPUT_COLUMNS = ["sample_id", "energy_t1", "confidence", "max_logit", "ood_score", "ood"]
#: how the report names each score
SCORE_TITLES = {"energy": "energy score -E at T = 1 (logsumexp of the logits)", "msp": "max softmax probability",
                "max-logit": "max logit"}
AXIS_TITLES = {"energy": "-E at T = 1", "msp": "max softmax", "max-logit": "max logit"}


def read_ood_table(path: Path) -> tuple[pl.DataFrame, TableMeta, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(frame, meta, this table's scores, the reference's validation scores)``, scores by name
    and oriented higher = more in-distribution."""
    meta = TableMeta.read(path)
    if meta.ood is None:
        raise UserError(f"{path} holds no OOD scores: score the data with --reference TRAIN_TABLE first")
    frame, meta = load_table(path, OOD_INPUT_COLUMNS)
    scores = {name: oriented({c: frame[c].to_numpy() for c in frame.columns}, name) for name in OOD_SCORES}
    try:
        validation = {name: decode_scores(meta.ood.validation[name]) for name in OOD_SCORES}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: metadata field 'ood.validation' does not hold the validation scores of "
                        f"{', '.join(OOD_SCORES)}") from None
    return frame, meta, scores, validation


def overlay(name: str, new: np.ndarray, reference: np.ndarray, threshold: float, tpr: float, label: str) -> go.Figure:
    """The two distributions of one score as fractions on shared bins, and the threshold."""
    edges = histogram_edges(np.concatenate([new, reference]).astype(np.float64), BINS)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for values, series in ((reference, "reference validation (in distribution)"), (new, label)):
        counts, _ = np.histogram(values.astype(np.float64), bins=edges)
        fig.add_bar(x=centers, y=counts / max(len(values), 1), name=text(series), width=float(edges[1] - edges[0]),
                    opacity=0.6)
    fig.add_vline(x=threshold, line_dash="dash", annotation_text=f"keeps {100 * tpr:g}%: {threshold:.3f}")
    fig.update_layout(barmode="overlay", title=text(f"{label}: {SCORE_TITLES[name]} (higher = more in-distribution)"),
                      xaxis_title=AXIS_TITLES[name], yaxis_title="fraction of samples", height=380)
    return fig


def ood_section(path: Path, known_ood: bool) -> Section:
    """One table's section; ``known_ood``: its inputs are all out of distribution (metrics shown)."""
    frame, meta, scores, validation = read_ood_table(path)
    ood = meta.ood
    label = f"{path.name} ({frame.height} samples)"
    parts: dict[str, Part] = {}
    rows = []
    for name in OOD_SCORES:
        threshold = ood.threshold if name == ood.score else threshold_at_tpr(validation[name], ood.tpr)
        parts[f"ood_{name}"] = overlay(name, scores[name], validation[name], threshold, ood.tpr, label)
        row = {"score": name + (" (flagged)" if name == ood.score else ""), "threshold": threshold,
               "kept": 100 * float(np.mean(validation[name] >= threshold)),
               "below": 100 * float(np.mean(scores[name] < threshold))}
        if known_ood:
            row.update(auroc=100 * auroc(validation[name], scores[name]),
                       fpr=100 * false_positive_rate(scores[name], threshold))
        rows.append(row)
    columns = {"score": "score", "threshold": "threshold", "reference validation kept %": "kept",
               "this table below it %": "below"}
    if known_ood:
        columns.update({"AUROC %": "auroc", f"FPR at {100 * ood.tpr:g}% TPR %": "fpr"})
    parts["ood_table"] = html_table(pl.DataFrame(rows), columns, name="ood", decimals={"threshold": 4, "kept": 1,
                                                                                         "below": 1, "auroc": 2,
                                                                                         "fpr": 2})
    reference = ood.reference
    intro = (f"<p>{text(frame.height)} samples scored by teacher {text(meta.teacher.arch)} against "
             f"{text(reference.get('path'))} ({text(reference.get('dataset'))}): {text(ood.flagged)} "
             f"({100 * ood.flagged / max(frame.height, 1):.1f}%) flagged out of distribution by the "
             f"{text(ood.score)} score below {ood.threshold:.4f}, the threshold that keeps {100 * ood.tpr:g}% of "
             f"the reference's {text(reference.get('validation', {}).get('size'))} validation samples "
             f"({100 * ood.kept:.1f}% kept). Every score is oriented higher = more in-distribution; the energy score "
             f"is -E at T = {ood.energy_temperature:g} (the table's energy column uses T_E = "
             f"{meta.energy_temperature:g}).</p>")
    if known_ood:
        intro += ("<p class='note'>All of this table's inputs are known to be out of distribution (--known-ood): "
                  "AUROC takes the reference's validation samples as the in-distribution (positive) class, and "
                  "FPR is the share of these inputs at or above each score's threshold.</p>")
    else:
        intro += ("<p class='note'>Which of these inputs are out of distribution is not known here: pass a table "
                  "of known out-of-distribution inputs with --known-ood for AUROC and FPR.</p>")
    return (f"Out-of-distribution: {path.name}", parts, intro)


def ood_sections(tables: list[Path], known_ood: list[Path]) -> list[Section]:
    return [ood_section(Path(p), False) for p in tables] + [ood_section(Path(p), True) for p in known_ood]
