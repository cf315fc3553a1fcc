"""The accuracy study: every method in one engine, same seeds, validation-selected results.

    python benchmarks/study.py --teacher runs/teacher-r20/best.pt --out runs/study          # full (hours)
    python benchmarks/study.py --teacher runs/teacher-r20/best.pt --out runs/study --seeds 0 # one seed
    python benchmarks/study.py --smoke --out /tmp/study-smoke                               # CI-sized
    python benchmarks/study.py ... --out runs/study-repeat --compare runs/study/results.csv  # reproduced?

Resumable: a run whose summary.json exists is skipped, so it can run in parts. At the end it
writes the tables to --doc (default docs/results/round1.md when not --smoke). Each process uses
--threads torch threads (default 1), so on 2 cores the two settings can run side by side:

    python benchmarks/study.py --teacher T --out runs/study --settings fashion-mnist &
    python benchmarks/study.py --teacher T --out runs/study --settings fashion-mnist-lt; wait
    python benchmarks/study.py --teacher T --out runs/study   # every run is done: writes the doc

Choices (see docs/results/round1.md): teacher resnet20 trained on all of Fashion-MNIST's train
split; student cnn_tiny (about 3k parameters, far below the teacher, so distillation
matters); 20,000-sample class-stratified training subset for the balanced setting and the
full long-tailed train split (imbalance factor 100, about 13,500 samples) for the LT setting;
full validation and test splits; cached teacher logits (Fashion-MNIST's train transform is a
flip, whose logits are stored), so a run costs well under a minute on one CPU core.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl
import torch

from common import check_table, record, record_lines, teacher_check
from runner import ensure_shards
from energytools.config import AugmentConfig, DataConfig, DistillConfig, ScoreConfig, TrainConfig, TrainStageConfig
from energytools.stages.distill import distill
from energytools.stages.score import score
from energytools.summaries import VERDICT_RULE, aggregate_runs, comparison_count, markdown_table, summary_cells

# name -> (method, temperatures or None, HE-DA (ratio, select) or None)
CONFIGS = {
    "ce": ("ce", None, None),
    "kd": ("kd", None, None),
    "energy-kd 6,4,2": ("energy-kd", "6,4,2", None),
    "energy-kd 2,4,6": ("energy-kd", "2,4,6", None),
    "dkd": ("dkd", None, None),
    "energy-dkd 6,4,2": ("energy-dkd", "6,4,2", None),
    **{f"kd + HE-DA {r}": ("kd", None, (r, "high")) for r in (0.1, 0.2, 0.3, 0.5)},
    "kd + random 0.3": ("kd", None, (0.3, "random")),
    **{f"energy-kd + HE-DA {r}": ("energy-kd", "6,4,2", (r, "high")) for r in (0.1, 0.2, 0.3, 0.5)},
    "energy-kd + random 0.3": ("energy-kd", "6,4,2", (0.3, "random")),
}
# name -> (dataset options, default seeds): 5 on the long tail, where seed-to-seed spread is
# as large as the differences between methods (../shared/METHOD.md)
SETTINGS = {
    "fashion-mnist": ({"dataset": "fashion-mnist", "limit": 20000}, [0, 1, 2]),
    "fashion-mnist-lt": ({"dataset": "fashion-mnist", "imbalance_factor": 100.0}, [0, 1, 2, 3, 4]),
}
DISCUSSION = "<!-- discussion: kept when the study re-writes this file -->"
TITLE = "# Results: the accuracy study"
SMOKE_CONFIGS = ["ce", "kd", "energy-kd 6,4,2", "energy-kd + HE-DA 0.3"]


def slug(name: str) -> str:
    return name.replace(" + ", "+").replace(" ", "_").replace(",", "-")


def run_setting(setting: str, data: DataConfig, teacher: Path, out: Path, seeds, configs, epochs: int,
                student: str) -> pl.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    table = out / "scores.parquet"
    if not table.exists():
        score(ScoreConfig(teacher=str(teacher), out=str(table), data=data, save_logits=True))
    check_table(table, teacher, data)
    rows = []
    for name in configs:
        method, temps, heda = CONFIGS[name]
        shards = ()
        if heda:
            ratio, mode = heda
            shard_dir = out / f"he-da-{mode}-{ratio}"
            ensure_shards(AugmentConfig(scores=str(table), out=str(shard_dir), ratio=ratio, select=mode, overwrite=True))
            shards = (str(shard_dir),)
        for seed in seeds:
            run_dir = out / slug(name) / f"seed{seed}"
            if not (run_dir / "summary.json").exists():
                distill(DistillConfig(scores=str(table), student=student, out=str(run_dir), method=method,
                                      temperatures=temps, shards=shards, cached_logits=True,
                                      train=TrainConfig(epochs=epochs, seed=seed),
                                      overwrite=True))
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"setting": setting, "config": name, "seed": seed, "best": summary["best_test_acc"],
                         "last": summary["last_test_acc"], "seconds": summary["seconds"]})
    return pl.DataFrame(rows)


#: the doc's columns: header -> column of summaries.summary_cells' frame
COLUMNS = {"config": "config", "seeds": "seeds", "best": "best", "last": "last", "Δ kd (best)": "delta_best",
           "95% CI": "interval", "wins": "wins", "verdict": "verdict", "Holm": "holm", "s/run": "seconds"}


def summary_table(results: pl.DataFrame) -> pl.DataFrame:
    """Mean ± std per config and the paired difference to kd on the same seeds, as the report shows them."""
    return summary_cells(aggregate_runs(results, "kd", by=["setting"]))


def markdown(summary: pl.DataFrame, checks: dict, records: list[dict]) -> str:
    """The study's part of the doc; ``records`` are the invocations that made it (common.record)."""
    lines = [TITLE, "", *record_lines(records), "",
             "Test accuracy (%) of the validation-selected checkpoint (`best`) and of the last epoch, mean ± std over "
             "seeds; the baseline is kd. " + VERDICT_RULE, ""]
    for setting, frame in summary.group_by("setting", maintain_order=True):
        name = setting[0]
        lines += [f"## {name}", "", f"Energy/confidence check of the teacher on this training set: {checks[name]}", "",
                  f"This table makes {comparison_count(frame, 'kd')} comparisons with kd; Holm adjusts the verdicts "
                  "for them.", "", markdown_table(frame, COLUMNS, decimals={"seconds": 0}), ""]
    return "\n".join(lines)


def compare_runs(results: pl.DataFrame, previous: pl.DataFrame) -> pl.DataFrame:
    """Each run beside the same (setting, config, seed) of an earlier study; ``same`` when both
    accuracies agree (to 1e-9, the CSV round trip; one test image is 0.01 points)."""
    keys = ["setting", "config", "seed"]
    earlier = previous.select(*keys, pl.col("best").alias("earlier_best"), pl.col("last").alias("earlier_last"))
    return (results.join(earlier, on=keys, how="left", validate="1:1", maintain_order="left")
            .with_columns(same=((pl.col("best") - pl.col("earlier_best")).abs() < 1e-9)
                          & ((pl.col("last") - pl.col("earlier_last")).abs() < 1e-9)))


def comparison_markdown(compared: pl.DataFrame) -> str:
    lines = ["| setting | config | seed | best: earlier / now | last: earlier / now | same |", "|---|---|---|---|---|---|"]
    for r in compared.iter_rows(named=True):
        lines.append(f"| {r['setting']} | {r['config']} | {r['seed']} | {r['earlier_best']} / {r['best']} | "
                     f"{r['earlier_last']} / {r['last']} | {'yes' if r['same'] else '**no**'} |")
    same = int(compared["same"].sum())
    return "\n".join(lines + ["", f"{same} of {compared.height} runs reproduced exactly."])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: each setting's own (3 balanced, 5 long-tailed)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--student", default="cnn_tiny")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--configs", nargs="+", default=None, help="subset of config names")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; results are bit-reproducible for a fixed thread count, so it is "
                             "pinned rather than taken from the machine (1 also lets settings run side by side)")
    parser.add_argument("--smoke", action="store_true", help="digits, one seed, four configs, one epoch")
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--compare", type=Path, default=None,
                        help="an earlier results.csv: print each run beside it instead of writing the doc")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    configs = args.configs or (SMOKE_CONFIGS if args.smoke else list(CONFIGS))
    frames, checks = [], {}
    if args.smoke:
        from energytools.stages.train import train

        teacher = args.out / "teacher" / "best.pt"
        data = DataConfig(dataset="digits")
        if not teacher.exists():
            train(TrainStageConfig(model="cnn_small", out=str(args.out / "teacher"), data=data,
                                   train=TrainConfig(epochs=2), overwrite=True))
        frames.append(run_setting("digits", data, teacher, args.out / "digits", [0], configs, 1, args.student))
        checks["digits"] = teacher_check(args.out / "digits" / "scores.parquet")
    else:
        for setting in args.settings:
            options, seeds = SETTINGS[setting]
            frames.append(run_setting(setting, DataConfig(**options), args.teacher, args.out / setting,
                                      args.seeds or seeds, configs, args.epochs, args.student))
            checks[setting] = teacher_check(args.out / setting / "scores.parquet")
    results = pl.concat(frames)
    summary = summary_table(results)
    results.write_csv(args.out / "results.csv")
    if args.compare:
        print(comparison_markdown(compare_runs(results, pl.read_csv(args.compare))))
        return
    with open(args.out / "wall.jsonl", "a") as log:  # every invocation that made the table
        log.write(json.dumps(record(time.perf_counter() - started)) + "\n")
    records = [json.loads(line) for line in (args.out / "wall.jsonl").read_text().splitlines()]
    text = markdown(summary, checks, records)
    doc = args.doc or (None if args.smoke else Path("docs/results/round1.md"))
    if doc:
        # the hand-written discussion below the marker survives a re-run
        # the study's own part runs from its title to the marker: what stands before the title (the
        # round-2 study's block, benchmarks/evidence.py) and the hand-written discussion after the marker are kept
        old = doc.read_text() if doc.exists() else ""
        before = old[:old.index(TITLE)] if TITLE in old and DISCUSSION in old else ""
        kept = old.split(DISCUSSION, 1)[1] if DISCUSSION in old else "\n"
        doc.write_text(before + text + "\n" + DISCUSSION + kept)
        results.write_csv(doc.parent / "study.csv")  # every run's numbers beside the doc
    print(text)


if __name__ == "__main__":
    main()
