"""Study A's temperature rules with both students side by side (issue 39): round 3's cnn_small
(30k parameters) and round 4's resnet8 (78k), read from the rounds' CSVs, running nothing.

    python benchmarks/students.py            # prints the block and writes it into docs/results/round4.md
    python benchmarks/students.py --print    # prints it only

Only the rules both rounds ran are shown. Each student's Δ, interval and verdicts are its own
round's (energytools.summaries, as the studies' tables): Holm is over the comparisons with kd
that its round made (round 3: nine rules; round 4: the rules it ran), so a row reads as it does
in that round's table. The two rounds used two teachers of the same recipe (round 3's
checkpoint is gone), so the students are not compared with each other, only each with its kd.
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import polars as pl

from common import command, machine, replace_block
from evidence3 import ROUND3
from evidence4 import ROUND4, RULE_PAIRS, RULES
from runner import pair_table
from energytools.summaries import aggregate_runs, comparison_count, markdown_table, summary_cells

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
STUDENTS = {  # student: (its round's study, that study's setting, the CSV of its runs)
    "cnn_small (round 3)": (ROUND3, "A: temperature rules, 20k images", RESULTS / "evidence3.csv"),
    "resnet8 (round 4)": (ROUND4, "A: temperature rules, resnet8 student", RESULTS / "evidence4.csv"),
}
BLOCK = "students side by side"
COLUMNS = {"rule": "config", "student": "student", "seeds": "seeds", "best": "best", "Δ kd (best)": "delta_best",
           "95% CI": "interval", "wins": "wins", "verdict": "verdict", "Holm (its round's)": "holm"}
PAIR_COLUMNS = {"rule": "config", "against": "against", "student": "student", "seeds": "paired",
                "Δ (best)": "delta_best", "95% CI": "interval", "wins": "wins", "verdict": "verdict",
                "Holm (its round's)": "holm"}


def student_rows(runs: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Per student (``runs``: student -> its setting's runs): every rule both students ran
    against the setting's baseline (kd), and round 4's rule pairs, in one frame each; and how
    many comparisons with kd each student's round made (its Holm's count)."""
    common = set.intersection(*(set(ran["config"]) for ran in runs.values()))
    rules, pairs, counts = [], [], {}
    for student, ran in runs.items():
        study, name, _ = STUDENTS[student]
        setting = study.settings[name]
        # the whole setting first: Holm counts every comparison its round made, as its own table does
        aggregated = aggregate_runs(ran, setting.baseline)
        counts[student] = comparison_count(aggregated, setting.baseline)
        table = summary_cells(aggregated).filter(pl.col("config").is_in(common))
        rules.append(table.select([c for c in COLUMNS.values() if c != "student"]).with_columns(student=pl.lit(student)))
        paired = pair_table(ran, setting.pairs)
        if paired.height:
            shown = [(config, against) in RULE_PAIRS for config, against in paired.select("config", "against").rows()]
            pairs.append(paired.filter(pl.Series(shown)).with_columns(student=pl.lit(student)))
    order = {rule: k for k, rule in enumerate(RULES)}  # round 4's order (the common rules are among its)
    rules_frame = pl.concat(rules).sort(pl.col("config").replace_strict(order, default=len(order)), maintain_order=True)
    return rules_frame, (pl.concat(pairs) if pairs else pl.DataFrame()), counts


def block(runs: dict[str, pl.DataFrame]) -> str:
    rules, pairs, counts = student_rows(runs)
    seeds = ", ".join(f"{student} {ran['seed'].n_unique()}" for student, ran in runs.items())
    lines = ["## A: both students side by side", "",
             f"Written by `{command()}` on {datetime.date.today()} ({machine()}), from "
             f"{', '.join(str(path.relative_to(RESULTS.parents[1])) for _, _, path in STUDENTS.values())}; "
             f"seeds: {seeds}. Each student against its own kd; its Holm column is its round's "
             f"({'; '.join(f'{student}: over {n} comparisons' for student, n in counts.items())}). "
             "Two teachers of the same recipe: "
             "read each student against its kd, not one student against the other.", "",
             markdown_table(rules, COLUMNS), ""]
    if pairs.height:
        lines += ["The direction of Energy KD, each student on its own seeds:", "", markdown_table(pairs, PAIR_COLUMNS),
                  ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the block only; write nothing")
    parser.add_argument("--doc", type=Path, default=RESULTS / "round4.md", help="the doc whose block to replace")
    args = parser.parse_args(argv)
    runs = {}
    for student, (_, setting, csv) in STUDENTS.items():
        if not csv.exists():
            parser.error(f"{csv}: no such file")
        runs[student] = pl.read_csv(csv).filter(pl.col("setting") == setting)
        if not runs[student].height:
            parser.error(f"{csv} holds no run of setting {setting!r}")
    text = block(runs)
    print(text)
    if not args.print:
        # right after round 4's own tables (the study rewrites its block and keeps this one)
        replace_block(args.doc, BLOCK, text, heading=f"<!-- {ROUND4.name}: end -->")


if __name__ == "__main__":
    main()
