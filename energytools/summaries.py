"""Tables a person reads: runs aggregated over seeds with paired differences to a baseline,
written as HTML (the report) or Markdown (benchmarks/study.py's docs/results.md) from the
same frames with the same rounding, so the two agree.

Polars in, polars or text out; nothing here reads files.
"""
from __future__ import annotations

import html
import math
from typing import Sequence

import polars as pl

#: how a configuration is judged against the baseline; the report and docs/results.md print it
VERDICT_RULE = (
    "Δ is the paired difference to the baseline on the same seed (mean ± std over the seeds both have); wins "
    "counts those seeds where the configuration beat the baseline. The verdict (on the validation-selected "
    "accuracy) is better or worse when |mean Δ| exceeds two standard errors of the paired differences "
    "(2·std/√n), inside noise otherwise, and one seed when n < 2. It is a screen, not a 95% test: for "
    "configurations that do not differ it still says better or worse about 1 time in 3 with 2 seeds, 1 in 5 "
    "with 3 and 1 in 9 with 5 (Student's t), so read it with the wins column.")


def text(value) -> str:
    """``value`` as literal text for HTML and for plotly.js, which renders tags such as <a>,
    <b> and <span> in titles, legends, tick labels and table cells but decodes &lt; &gt; &amp;."""
    return html.escape(str(value), quote=False)


def paired_deltas(runs: pl.DataFrame, baseline: str, by: Sequence[str] = ()) -> pl.DataFrame:
    """``runs`` with ``delta_best`` and ``delta_last``: each run's accuracy minus the baseline's
    on the same seed (and ``by`` values); null where the baseline has no run with that seed.

    ``runs`` has one row per run with ``config`` (the configuration's name), ``seed``, ``best``
    (test accuracy of the validation-selected checkpoint) and ``last`` (of the last epoch).
    """
    keys = [*by, "seed"]
    base = (runs.filter(pl.col("config") == baseline).group_by(keys)
            .agg(pl.col("best").mean().alias("_base_best"), pl.col("last").mean().alias("_base_last")))
    return (runs.join(base, on=keys, how="left", validate="m:1", maintain_order="left")
            .with_columns(delta_best=pl.col("best") - pl.col("_base_best"),
                          delta_last=pl.col("last") - pl.col("_base_last"))
            .drop("_base_best", "_base_last"))


def aggregate_runs(runs: pl.DataFrame, baseline: str, by: Sequence[str] = ()) -> pl.DataFrame:
    """One row per configuration (within each ``by`` group), in first-seen order.

    Columns: ``by``, config, seeds (runs), best_mean, best_std, last_mean, last_std, paired
    (seeds shared with the baseline), delta_best_mean, delta_best_std, delta_last_mean,
    delta_last_std, wins (paired seeds with delta_best > 0), verdict (see :data:`VERDICT_RULE`;
    "baseline" on the baseline's row, "no common seed" when nothing pairs), then the other
    columns of ``runs``: numeric ones averaged, the others taken from the first run.
    """
    by = list(by)
    others = [c for c in runs.columns if c not in {*by, "config", "seed", "best", "last"}]
    with_deltas = paired_deltas(runs, baseline, by)
    mean_std = [expr for col in ("best", "last", "delta_best", "delta_last")
                for expr in (pl.col(col).mean().alias(f"{col}_mean"), pl.col(col).std().alias(f"{col}_std"))]
    aggregated = with_deltas.group_by([*by, "config"], maintain_order=True).agg(
        pl.len().alias("seeds"), *mean_std[:4], pl.col("delta_best").count().alias("paired"), *mean_std[4:],
        (pl.col("delta_best") > 0).sum().alias("wins"),
        *[pl.col(c).mean() if runs.schema[c].is_numeric() else pl.col(c).first() for c in others])
    return aggregated.with_columns(verdict=_verdict(baseline))


def _verdict(baseline: str) -> pl.Expr:
    margin = 2 * pl.col("delta_best_std") / pl.col("paired").sqrt()
    return (pl.when(pl.col("config") == baseline).then(pl.lit("baseline"))
            .when(pl.col("paired") == 0).then(pl.lit("no common seed"))
            .when(pl.col("paired") < 2).then(pl.lit("one seed"))
            .when(pl.col("delta_best_mean") > margin).then(pl.lit("better"))
            .when(pl.col("delta_best_mean") < -margin).then(pl.lit("worse"))
            .otherwise(pl.lit("inside noise")))


def format_value(value, decimals: int = 2) -> str:
    """A cell as people read it: floats rounded to ``decimals``, missing values as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        shown = f"{value:.{decimals}f}"
        return shown.lstrip("-") if float(shown) == 0 else shown  # "0.00", not "-0.00"
    return str(value)


def mean_std(mean, std, decimals: int = 2) -> str:
    """"80.58 ± 0.48", or "80.58" when there is no spread to show (one run)."""
    if std is None or math.isnan(std):
        return format_value(mean, decimals)
    return f"{format_value(mean, decimals)} ± {format_value(std, decimals)}"


def summary_cells(aggregated: pl.DataFrame, decimals: int = 2) -> pl.DataFrame:
    """:func:`aggregate_runs`' frame with the text columns people read: ``best``, ``last``
    ("mean ± std"), ``delta_best``, ``delta_last`` and ``wins`` ("2/3"), a dash on the baseline's row."""
    rows = aggregated.to_dicts()

    def column(make) -> list[str]:
        return [make(r) if r["verdict"] != "baseline" else "—" for r in rows]

    return aggregated.with_columns(
        best=pl.Series([mean_std(r["best_mean"], r["best_std"], decimals) for r in rows], dtype=pl.String),
        last=pl.Series([mean_std(r["last_mean"], r["last_std"], decimals) for r in rows], dtype=pl.String),
        delta_best=pl.Series(column(lambda r: mean_std(r["delta_best_mean"], r["delta_best_std"], decimals)),
                             dtype=pl.String),
        delta_last=pl.Series(column(lambda r: mean_std(r["delta_last_mean"], r["delta_last_std"], decimals)),
                             dtype=pl.String),
        wins=pl.Series(column(lambda r: f"{r['wins']}/{r['paired']}"), dtype=pl.String))


def _cells(frame: pl.DataFrame, columns: dict[str, str], decimals: dict[str, int] | None) -> list[list[str]]:
    decimals = decimals or {}
    return [[format_value(row[c], decimals.get(c, 2)) for c in columns.values()]
            for row in frame.select(list(dict.fromkeys(columns.values()))).iter_rows(named=True)]


def markdown_table(frame: pl.DataFrame, columns: dict[str, str], decimals: dict[str, int] | None = None) -> str:
    """``frame`` as a Markdown table; ``columns`` maps each header to its column."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cells in _cells(frame, columns, decimals):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def html_table(frame: pl.DataFrame, columns: dict[str, str], *, name: str, decimals: dict[str, int] | None = None,
               sort_keys: dict[str, str] | None = None, highlight: str | None = None) -> str:
    """``frame`` as a sortable HTML table (every row shown; the report's script sorts on a header click).

    ``columns`` maps each header to its column; floats are rounded to ``decimals`` (default 2);
    every header and cell is escaped. ``sort_keys`` maps a column to the numeric column its
    cells sort by (a "mean ± std" text sorts by its mean). Rows where the boolean column
    ``highlight`` is true are marked (the baseline).
    """
    sort_keys = sort_keys or {}
    numeric = {c for c in columns.values() if frame.schema[c].is_numeric() or c in sort_keys}
    keys = frame.select([pl.col(sort_keys.get(c, c)).alias(f"_sort{i}") for i, c in enumerate(columns.values())])
    marked = frame[highlight].to_list() if highlight else [False] * frame.height
    head = "".join(f"<th>{text(h)}</th>" for h in columns)
    body = []
    for cells, sort_row, mark in zip(_cells(frame, columns, decimals), keys.iter_rows(), marked):
        tds = []
        for column, cell, key in zip(columns.values(), cells, sort_row):
            attrs = ""
            if column in numeric:
                attrs = " class='num'" + (f" data-sort='{key!r}'" if isinstance(key, (int, float)) else "")
            tds.append(f"<td{attrs}>{text(cell)}</td>")
        body.append(f"<tr{' class=highlight' if mark else ''}>{''.join(tds)}</tr>")
    return (f"<table class='sortable' data-table='{html.escape(name)}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")
