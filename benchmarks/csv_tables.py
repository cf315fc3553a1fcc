"""A study's tables rebuilt from its CSV (docs/results/<study>.csv), running nothing: for a round
whose run directories are gone (round 3's), or to check the doc against the numbers.

    python benchmarks/csv_tables.py evidence3 docs/results/evidence3.csv
    python benchmarks/csv_tables.py evidence3 docs/results/evidence3.csv --settings 'C: long tail, long-tailed teacher'

STUDY is the module of the study (evidence3: round 3, evidence: round 2); its settings give the
rows, baselines and pairs, so the tables are the ones the study's block would hold with the
settings as they are now (a pair added to a setting since the round ran appears too). The same
functions write them (runner.setting_lines: energytools.summaries' paired intervals, verdicts
and Holm), so the numbers, rounding and verdicts are the study's own. Printed as Markdown.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import polars as pl

from runner import Study, setting_lines


def csv_tables(study: Study, runs: pl.DataFrame, settings: list[str] | None = None) -> str:
    """The tables of ``study``'s settings (all, or ``settings``) from ``runs`` (its CSV: one row
    per run with setting, config, seed, best, last, ...), each under its setting's heading."""
    lines = []
    for name, setting in study.settings.items():
        ran = runs.filter(pl.col("setting") == name)
        if ran.height and (settings is None or name in settings):
            lines += [f"## {name}", "", *setting_lines(setting, ran)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study's module in benchmarks/: evidence3 (round 3) or evidence (round 2)")
    parser.add_argument("csv", type=Path, help="its runs, e.g. docs/results/evidence3.csv")
    parser.add_argument("--settings", nargs="+", default=None, help="only these settings (default: every one)")
    args = parser.parse_args(argv)
    module = importlib.import_module(args.study)
    (study,) = [value for value in vars(module).values() if isinstance(value, Study)]
    if not args.csv.exists():
        parser.error(f"{args.csv}: no such file")
    unknown = sorted(set(args.settings or ()) - set(study.settings))
    if unknown:
        parser.error(f"--settings {unknown[0]!r}: not a setting of {args.study} ({', '.join(study.settings)})")
    print(csv_tables(study, pl.read_csv(args.csv), args.settings))


if __name__ == "__main__":
    main()
