"""`energytools label-issues`: which given labels of a score table look wrong, by cleanlab.

Energy does not see the given label: it ranks hard and unusual images, but cannot tell a
mislabeled image from a hard one. cleanlab's label-aware scores can, from the predicted
probabilities (the softmax of the table's stored logits at T = 1) and the given labels:
``label_quality`` (``cleanlab.rank.get_label_quality_scores``) and ``is_label_issue``
(``cleanlab.filter.find_label_issues``, confident learning). The output names the flagged ids
to ``distill --exclude``, its label quality to ``select --label-issues`` and its section to
``report --label-issues``.

The predictions should be out-of-sample: a teacher that trained on a sample has fitted its
label, wrong or right, so in-sample scores hide label errors (a warning says so).
"""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from ..config import LabelIssuesConfig, content_of
from ..console import console, headline
from ..errors import UserError, import_optional
from ..functional import label_issue_scores
from ..io import check_output_free, sha256_file
from ..table import (LABEL_ISSUE_COLUMNS, LABEL_ISSUES_KIND, TableMeta, load_table, scores_out_of_fold, versions,
                     write_parquet)
from ..view_logits import read_logits


def label_issues(cfg: LabelIssuesConfig) -> Path:
    """Write the label-issues file of ``cfg.scores`` to ``cfg.out``; returns its path."""
    cfg.check()
    check_output_free(cfg.out, cfg.overwrite)
    cleanlab = import_optional("cleanlab", "cleanlab")  # before any work: one line naming the extra
    table, meta = load_table(cfg.scores, ["sample_id", "label"])
    if not meta.has_logits:
        raise UserError(f"{cfg.scores} has no logits column: re-score with --save-logits (label issues need the "
                        "predicted probabilities)")
    if table["label"].null_count():
        raise UserError(f"{cfg.scores} holds samples without a label: label issues need the given labels")
    out_of_sample = scores_out_of_sample(cfg.scores, meta)
    if not out_of_sample:
        console.print(f"warning: {cfg.scores} holds in-sample scores (the teacher trained on these labels), so they "
                      "are optimistic: a wrong label the teacher fitted looks clean; score out of fold (train --folds "
                      "K) to find those too", style="yellow")
    logits = read_logits(cfg.scores, meta.dataset.num_classes)
    columns = label_issue_scores(logits, table["label"].to_numpy(), method=cfg.method, filter_by=cfg.filter_by)
    rows = pa.table({name: pa.array(values, type=LABEL_ISSUE_COLUMNS[name])
                     for name, values in {**table.to_dict(as_series=False), **columns}.items()})
    frame = pl.from_arrow(rows).sort("sample_id")
    counts = issue_counts(frame, meta.dataset.classes)
    record = meta.to_json()
    metadata = {"kind": LABEL_ISSUES_KIND, "config": content_of(cfg), "versions": {**versions(),
                                                                                   "cleanlab": cleanlab.__version__},
                "cleanlab": {"version": cleanlab.__version__, "method": cfg.method, "filter_by": cfg.filter_by,
                             "pred_probs": "softmax of the table's logits at T = 1"},
                "scores": {"sha256": sha256_file(cfg.scores), "out_of_sample": out_of_sample,
                           "teacher": record["teacher"]},
                "data": record["data"], "dataset": record["dataset"], "counts": counts}
    write_parquet(frame, cfg.out, metadata)
    console.print(describe_issues(counts))
    console.print(headline("done", f": wrote {cfg.out} ({frame.height} rows)"))
    return Path(cfg.out)


def scores_out_of_sample(path, meta: TableMeta) -> bool:
    """Whether no sample of the table was scored by a teacher that trained on it: the val or test
    split (held out of training), or out-of-fold scores of the train split."""
    return meta.split != "train" or scores_out_of_fold(path)


def issue_counts(frame: pl.DataFrame, classes: tuple[str, ...]) -> dict:
    """Samples and flagged samples, in all and per class (by label; with its name when known)."""
    per_class = (frame.group_by("label").agg(pl.len().alias("samples"), pl.col("is_label_issue").sum()
                                             .alias("label_issues")).sort("label"))
    return {"samples": frame.height, "label_issues": int(frame["is_label_issue"].sum()),
            "per_class": [{**row, "class": classes[row["label"]] if 0 <= row["label"] < len(classes) else None}
                          for row in per_class.iter_rows(named=True)]}


def describe_issues(counts: dict) -> str:
    """One line: how many samples are flagged, and how many per class (by name)."""
    flagged, total = counts["label_issues"], counts["samples"]
    classes = ", ".join(f"{row['class'] or row['label']}: {row['label_issues']}" for row in counts["per_class"])
    return (f"{flagged} of {total} samples ({100 * flagged / max(total, 1):.1f}%) flagged as label issues; "
            f"per class {classes}")

