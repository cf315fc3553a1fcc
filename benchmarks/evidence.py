"""The evidence study, round 2 (issue 19): equal-compute controls, the reference's online HE-DA,
a real student, and energy-based pruning. Writes its tables into docs/results.md.

    python benchmarks/evidence.py --teacher runs/teacher-r20/best.pt --out runs/evidence --workers 2
    python benchmarks/evidence.py --smoke --out /tmp/evidence-smoke        # digits, CI-sized

Resumable: a run whose summary.json exists is skipped and a run with a last.pt continues from
it, so an interrupted study is re-run with the same command. Runs go to --workers processes
(one torch thread each: results are bit-reproducible for a fixed thread count). The wall time
of every invocation is appended to OUT/wall.jsonl and the doc reports their sum.

Design (see docs/results.md for the reasons and what was cut):
- student cnn_small (about 30k parameters) for 12 epochs; teacher resnet20;
- Fashion-MNIST with the crop transform (--crop-pad 2: pad-2 crop + flip), cached per-view
  teacher logits (score --views 4), so distill does not run the teacher unless a row needs it;
- equal compute = equal optimizer steps: a ratio-r shard run has (1 + r)x the rows, so its
  baseline is kd for (1 + r)x the epochs ("kd 15 ep" for r = 0.25);
- shard rows run the teacher online on their crops, and so does their random control: when
  this round ran, HE-DA shards stored no views (they do now; a later round can cache them);
- pruning: drop the easiest X% by energy (lowest), by EL2N (lowest) or at random, X = 25, 50,
  at equal epochs (so fewer steps: the point of pruning).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from common import check_table, record, record_lines, teacher_check
from energytools.config import AugmentConfig, DataConfig, ScoreConfig, SelectConfig, TrainConfig, TrainStageConfig
from energytools.summaries import (VERDICT_RULE, aggregate_runs, comparison_count, holm_verdicts, markdown_table,
                                   summary_cells)

BEGIN, END = "<!-- evidence round 2: begin -->", "<!-- evidence round 2: end -->"


@dataclass(frozen=True)
class Row:
    """One configuration of the study: distill options plus what it trains on."""

    method: str = "kd"
    epochs: int = 12
    options: dict = field(default_factory=dict)  # DistillConfig fields
    shards: tuple[float, str] | None = None  # (ratio, select mode) of materialized HE-DA
    drop: tuple[float, str, str] | None = None  # (ratio, mode, by) of the ids excluded
    drop_per_class: bool = False  # the ratio within each class (select --per-class)
    cached: bool = True  # replay the stored views (False: run the teacher on every batch)
    fixed: bool = False  # its random draws (shards, random selection) fixed on purpose at seed 0, not per run


def draw_seed(row: Row, seed: int) -> int | None:
    """The seed of a row's random configuration choices (its shards' selection and CutMix draws,
    a random selection) for the run with ``seed``: the run's own seed, 0 when the row says it is
    fixed on purpose, None when the row draws nothing (no shards, a selection by score)."""
    if not row.shards and not (row.drop and row.drop[1] == "random"):
        return None
    return 0 if row.fixed else seed


DKD_WARMUP = 3  # epochs, of 12 (the reference: 20 of 240)
ROWS = {
    "ce": Row("ce"),
    "kd": Row(),
    "kd 15 ep": Row(epochs=15),
    "energy-kd 6,4,2": Row("energy-kd", options={"temperatures": "6,4,2"}),
    "energy-kd 2,4,6": Row("energy-kd", options={"temperatures": "2,4,6"}),
    "energy-kd 6,4,2 views-T": Row("energy-kd", options={"temperatures": "6,4,2", "temperature_source": "views"}),
    "dkd": Row("dkd", options={"dkd_warmup": DKD_WARMUP}),
    "kd + online HE-DA": Row(options={"he_da": "online"}),
    "kd + online HE-DA 15 ep": Row(epochs=15, options={"he_da": "online"}),
    "kd + HE-DA shards 0.25": Row(shards=(0.25, "high"), cached=False),
    "kd + random shards 0.25": Row(shards=(0.25, "random"), cached=False),
    # the shard rows' equal-step baseline with their teacher source (online, fresh crops)
    "kd 15 ep, online teacher": Row(epochs=15, cached=False),
    **{f"kd, drop {name} {int(r * 100)}%": Row(drop=(r, mode, by))
       for r in (0.25, 0.5) for name, mode, by in (("low-energy", "low", "energy"), ("low-EL2N", "low", "el2n"),
                                                   ("random", "random", "energy"))},
    # added after the first pass showed whole easy classes dropped at 50%
    **{f"kd, drop {name} 50% per class": Row(drop=(0.5, "low", by), drop_per_class=True)
       for name, by in (("low-energy", "energy"), ("low-EL2N", "el2n"))},
}
BALANCED_ROWS = list(ROWS)
LT_ROWS = ["ce", "kd", "energy-kd 6,4,2", "energy-kd 2,4,6", "kd + online HE-DA"]
# name -> (dataset options, seeds, rows)
SETTINGS = {
    "fashion-mnist crops": ({"dataset": "fashion-mnist", "limit": 8000}, [0, 1, 2], BALANCED_ROWS),
    "fashion-mnist-lt crops": ({"dataset": "fashion-mnist", "imbalance_factor": 100.0}, [0, 1, 2, 3, 4], LT_ROWS),
}
COMMON_DATA = {"crop_pad": 2, "eval_limit": 2000}
VIEWS = 4
SMOKE_EPOCH_SCALE = 1 / 3  # 12 -> 4 and 15 -> 5 epochs: the same step ratios, CI-sized
SMOKE = ({"dataset": "digits"}, [0, 1], ["ce", "kd", "kd + online HE-DA", "kd + HE-DA shards 0.25",
                                         "kd, drop low-energy 25%"])


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def prepare(setting_dir: Path, data: DataConfig, teacher: Path, rows: list[str], seeds: list[int]) -> None:
    """The score table with views, the shard directories and the selections the rows need, the
    random ones (:func:`draw_seed`) once per run seed."""
    from energytools.stages.augment import augment
    from energytools.stages.select import select
    from energytools.stages.score import score

    table = setting_dir / "scores.parquet"
    if not table.exists():
        score(ScoreConfig(teacher=str(teacher), out=str(table), data=data, views=VIEWS, save_logits=True))
    check_table(table, teacher, data, VIEWS)
    for name in rows:
        row = ROWS[name]
        for seed in dict.fromkeys(draw_seed(ROWS[name], s) or 0 for s in seeds):
            if row.shards and not (shard_dir(setting_dir, row, seed) / "manifest.json").exists():
                ratio, mode = row.shards
                augment(AugmentConfig(scores=str(table), out=str(shard_dir(setting_dir, row, seed)), ratio=ratio,
                                      select=mode, seed=draw_seed(row, seed), overwrite=True))
            if row.drop and not drop_file(setting_dir, row, seed).exists():
                ratio, mode, by = row.drop
                select(SelectConfig(scores=str(table), out=str(drop_file(setting_dir, row, seed)), ratio=ratio,
                                    mode=mode, by=by, per_class=row.drop_per_class, seed=draw_seed(row, seed) or 0,
                                    overwrite=True))


def _seeded(row: Row, seed: int) -> str:
    drawn = draw_seed(row, seed)
    return "" if drawn is None else f"-s{drawn}"


def shard_dir(setting_dir: Path, row: Row, seed: int) -> Path:
    return setting_dir / f"he-da-{row.shards[1]}-{row.shards[0]}{_seeded(row, seed)}"


def drop_file(setting_dir: Path, row: Row, seed: int) -> Path:
    ratio, mode, by = row.drop
    per_class = "-per-class" if row.drop_per_class else ""
    return setting_dir / f"drop-{mode}-{by}-{ratio}{per_class}{_seeded(row, seed)}.parquet"


def run_one(job: tuple) -> dict:
    """Distill one (row, seed) in this process with one torch thread; resumes a started run."""
    import torch

    from energytools.config import DistillConfig
    from energytools.stages.distill import distill

    torch.set_num_threads(1)
    setting, name, seed, setting_dir, eval_limit, epoch_scale = job
    row, run_dir = ROWS[name], Path(setting_dir) / slug(name) / f"seed{seed}"
    epochs = round(row.epochs * epoch_scale)
    if not (run_dir / "summary.json").exists():
        started = (run_dir / "last.pt").exists()
        distill(DistillConfig(
            scores=str(Path(setting_dir) / "scores.parquet"), student=STUDENT, out=str(run_dir), method=row.method,
            shards=(str(shard_dir(Path(setting_dir), row, seed)),) if row.shards else (),
            exclude=str(drop_file(Path(setting_dir), row, seed)) if row.drop else None, cached_logits=row.cached,
            eval_limit=eval_limit, train=TrainConfig(epochs=epochs, seed=seed), resume=started,
            overwrite=not started, **row.options))
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    return {"setting": setting, "config": name, "seed": seed, "best": summary["best_test_acc"],
            "last": summary["last_test_acc"], "seconds": summary["seconds"],
            "samples": config["subset"]["samples"] + summary["augmented_samples"], "epochs": epochs}


STUDENT = "cnn_small"
COLUMNS = {"config": "config", "seeds": "seeds", "best": "best", "last": "last", "Δ kd (best)": "delta_best",
           "95% CI": "interval", "wins": "wins", "verdict": "verdict", "Holm": "holm", "rows/epoch": "samples",
           "epochs": "epochs", "s/run": "seconds"}


def markdown(results: pl.DataFrame, checks: dict, records: list[dict]) -> str:
    """The doc's block; ``records`` are the invocations that made it (common.record), in order."""
    aggregated = aggregate_runs(results, "kd", by=["setting"])
    summary = summary_cells(aggregated)
    lines = [BEGIN, "# Results, round 2: equal compute, online HE-DA, a real student, pruning", "",
             "Every invocation of the study (scoring, shards, selections and runs; each writes its own line):", "",
             *record_lines(records), "",
             "Test accuracy (%) of the validation-selected checkpoint (`best`) and of the last epoch, mean ± std "
             "over seeds; the baseline is kd. " + VERDICT_RULE + " `rows/epoch` is the training rows "
             "per epoch (originals + shard rows - dropped), so rows/epoch x epochs / 64 is the optimizer steps; "
             "`s/run` is the training time of one run (two runs shared the 2 cores).", ""]
    for setting, frame in summary.group_by("setting", maintain_order=True):
        tests = comparison_count(aggregated.filter(pl.col("setting") == setting[0]), "kd")
        lines += [f"## {setting[0]}", "", f"Teacher on this training set: {checks[setting[0]]}", "",
                  f"This table makes {tests} comparisons with kd; Holm adjusts the verdicts for them.", "",
                  markdown_table(frame, COLUMNS, decimals={"seconds": 0, "samples": 0, "epochs": 0}), ""]
        pairs = pair_table(results.filter(pl.col("setting") == setting[0]))
        if pairs.height:
            lines += ["The comparisons the controls are for, each against its own baseline on the same seeds "
                      f"({pairs.height} comparisons; Holm adjusts over them):", "",
                      markdown_table(pairs, PAIR_COLUMNS), ""]
    return "\n".join(lines + [END])


#: (row, its control): equal optimizer steps for HE-DA, equal size for pruning
PAIRS = [("kd + HE-DA shards 0.25", "kd 15 ep"), ("kd + HE-DA shards 0.25", "kd 15 ep, online teacher"),
         ("kd + random shards 0.25", "kd 15 ep, online teacher"), ("kd 15 ep, online teacher", "kd 15 ep"), ("kd + HE-DA shards 0.25", "kd + random shards 0.25"),
         ("kd + online HE-DA", "kd"), ("kd + online HE-DA 15 ep", "kd 15 ep"),
         ("kd + online HE-DA 15 ep", "kd + HE-DA shards 0.25"), ("energy-kd 6,4,2 views-T", "energy-kd 6,4,2"),
         *[(f"kd, drop {name} {x}%", f"kd, drop random {x}%") for x in (25, 50) for name in ("low-energy", "low-EL2N")],
         *[(f"kd, drop {name} 50% per class", f"kd, drop {name} 50%") for name in ("low-energy", "low-EL2N")],
         *[(f"kd, drop {name} 50% per class", "kd, drop random 50%") for name in ("low-energy", "low-EL2N")],
         *[(f"kd, drop {name} {x}%", "kd") for x in (25, 50) for name in ("low-energy", "low-EL2N", "random")]]
PAIR_COLUMNS = {"config": "config", "against": "against", "seeds": "paired", "Δ (best)": "delta_best",
                "95% CI": "interval", "wins": "wins", "verdict": "verdict", "Holm": "holm"}


def pair_table(results: pl.DataFrame) -> pl.DataFrame:
    """One row per pair of :data:`PAIRS` whose two configs both ran: the paired Δ, its interval and
    verdict, and the verdict Holm-adjusted over the pairs of the table."""
    frames = []
    for config, against in PAIRS:
        both = results.filter(pl.col("config").is_in([config, against]))
        if set(both["config"]) == {config, against}:
            row = summary_cells(aggregate_runs(both, against)).filter(pl.col("config") == config)
            frames.append(row.select("config", "paired", "delta_best", "interval", "wins", "verdict",
                                     "delta_best_mean", "delta_best_std").with_columns(against=pl.lit(against)))
    if not frames:
        return pl.DataFrame()
    pairs = pl.concat(frames)
    tests = [(r["delta_best_mean"], r["delta_best_std"] / r["paired"] ** 0.5, r["paired"])
             if r["paired"] >= 2 and r["delta_best_std"] is not None else None for r in pairs.iter_rows(named=True)]
    return pairs.with_columns(holm=pl.Series(holm_verdicts(tests), dtype=pl.String))


def write_doc(doc: Path, text: str) -> None:
    """Replace the round-2 block of ``doc`` (or put it first); the rest of the file is kept."""
    old = doc.read_text() if doc.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = text + "\n\n" + old
    doc.write_text(new)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="digits, two seeds, five rows, the teacher trained here")
    parser.add_argument("--doc", type=Path, default=None, help="default: docs/results.md (none with --smoke)")
    args = parser.parse_args()
    started = time.perf_counter()
    settings = {"digits": SMOKE} if args.smoke else {s: SETTINGS[s] for s in args.settings}
    teacher = args.teacher
    if args.smoke:
        from energytools.stages.train import train

        teacher = args.out / "teacher" / "best.pt"
        if not teacher.exists():
            train(TrainStageConfig(model="cnn_small", out=str(args.out / "teacher"), data=DataConfig(dataset="digits"),
                                   train=TrainConfig(epochs=2), overwrite=True))
    jobs, checks = [], {}
    for setting, (options, seeds, rows) in settings.items():
        setting_dir = args.out / slug(setting)
        data = DataConfig(**options, **({} if args.smoke else COMMON_DATA))
        prepare(setting_dir, data, teacher, rows, seeds)
        checks[setting] = teacher_check(setting_dir / "scores.parquet")
        # seed-major: an interrupted study has whole seeds first
        scale = SMOKE_EPOCH_SCALE if args.smoke else 1.0
        jobs += [(setting, name, seed, str(setting_dir), data.eval_limit, scale) for seed in seeds for name in rows]
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.workers > 1:
        # spawned, not forked: a fork of a process whose torch threads are running can hang
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_one, jobs))
    else:
        results = [run_one(job) for job in jobs]
    frame = pl.DataFrame(results)
    frame.write_csv(args.out / "results.csv")
    with open(args.out / "wall.jsonl", "a") as log:
        log.write(json.dumps(record(time.perf_counter() - started)) + "\n")
    records = [{"command": "(not recorded)", "machine": "(not recorded)", **json.loads(line)}
               for line in (args.out / "wall.jsonl").read_text().splitlines()]
    text = markdown(frame, checks, records)
    doc = args.doc or (None if args.smoke else Path("docs/results.md"))
    if doc:
        write_doc(doc, text)
        csv = doc.parent / "results" / "evidence.csv"  # every run's numbers beside the doc
        csv.parent.mkdir(parents=True, exist_ok=True)
        frame.write_csv(csv)
    print(text)


if __name__ == "__main__":
    main()
