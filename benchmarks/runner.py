"""The machinery of the evidence studies (benchmarks/evidence.py, round 2; evidence3.py, round 3):
a study is rows (distill options plus what they train on) run in settings (a training set, a
teacher, seeds) and compared with a baseline and with their controls on the same seeds.

What every study gets from here:
- resume: a run whose summary.json exists is skipped, one with a last.pt continues from it, so
  an interrupted study is finished by re-running the same command;
- refusal of stale inputs: a score table, shard directory or selection made from another
  teacher, other data or other options than the ones asked for now stops the study with one line;
- a fail-fast pool: the first run that fails stops the others at once and its error is raised;
- records: every invocation's command, machine, date and wall time (OUT/wall.jsonl, in the doc)
  and a CSV of every run beside the doc.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from common import check_table, record, record_lines, teacher_check
from energytools.config import AugmentConfig, DataConfig, ScoreConfig, SelectConfig, TrainConfig, TrainStageConfig
from energytools.summaries import VERDICT_RULE, aggregate_runs, comparison_count, holm_verdicts, markdown_table, \
    summary_cells


@dataclass(frozen=True)
class Row:
    """One configuration of a study: distill options plus what it trains on."""

    method: str = "kd"
    epochs: int = 12
    options: dict = field(default_factory=dict)  # DistillConfig fields
    shards: tuple[float, str] | None = None  # (ratio, select mode) of materialized HE-DA
    drop: tuple[float, str, str] | None = None  # (ratio, mode, by) of the ids excluded
    drop_per_class: bool = False  # the ratio within each class (select --per-class)
    cached: bool = True  # the table's stored teacher logits (False: run the teacher on every batch)
    fixed: bool = False  # its random draws (shards, random selection) fixed on purpose at seed 0, not per run


@dataclass(frozen=True)
class Setting:
    """Where rows run: a training set, a teacher, seeds, and the comparisons of its table."""

    data: dict  # DataConfig fields
    seeds: list[int]
    rows: list[str]
    teacher: str = "teacher"  # which teacher option of the command (--teacher, --lt-teacher)
    views: int = 0  # score --views: stored per-view teacher logits
    directory: str | None = None  # shared with another setting of the same data (its runs are reused)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (row, its control)
    baseline: str = "kd"


@dataclass(frozen=True)
class Study:
    """A study: its rows, its settings, a CI-sized smoke version, and the block it owns in the doc."""

    name: str  # the doc block's marker
    title: str
    rows: dict[str, Row]
    settings: dict[str, Setting]
    smoke: dict[str, Setting]
    intro: str  # after the records, before the tables
    csv: str  # docs/results/<csv>
    student: str = "cnn_small"
    smoke_epoch_scale: float = 1 / 3
    teachers: dict[str, str] = field(default_factory=lambda: {"teacher": "the teacher checkpoint"})


def draw_seed(row: Row, seed: int) -> int | None:
    """The seed of a row's random configuration choices (its shards' selection and CutMix draws,
    a random selection) for the run with ``seed``: the run's own seed, 0 when the row says it is
    fixed on purpose, None when the row draws nothing (no shards, a selection by score)."""
    if not row.shards and not (row.drop and row.drop[1] == "random"):
        return None
    return 0 if row.fixed else seed


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def _seeded(row: Row, seed: int) -> str:
    drawn = draw_seed(row, seed)
    return "" if drawn is None else f"-s{drawn}"


def shard_dir(setting_dir: Path, row: Row, seed: int) -> Path:
    return setting_dir / f"he-da-{row.shards[1]}-{row.shards[0]}{_seeded(row, seed)}"


def drop_file(setting_dir: Path, row: Row, seed: int) -> Path:
    ratio, mode, by = row.drop
    per_class = "-per-class" if row.drop_per_class else ""
    return setting_dir / f"drop-{mode}-{by}-{ratio}{per_class}{_seeded(row, seed)}.parquet"


def check_made_with(path: Path, recorded: dict, wanted: dict) -> None:
    """Refuse (one line, exit) an input whose recorded provenance (its config and its score
    table's hash) differs from what the study would make now. ``wanted["config"]`` holds only the
    options that change the output (``content_of``: no out, overwrite, workers); the score
    table counts by its hash, not its path."""
    found = [f"{k} {recorded['config'].get(k)!r} (not {v!r})" for k, v in wanted["config"].items()
             if k != "scores" and recorded["config"].get(k) != v]
    if recorded.get("scores", {}).get("sha256") != wanted["scores_sha256"]:
        found.append("another score table")
    if found:
        raise SystemExit(f"{path} was made with {', '.join(found)}: remove it or pass another --out")


def ensure_shards(cfg: AugmentConfig) -> Path:
    """The shard directory ``cfg`` asks for: made unless it exists, refused if it was made from
    another score table or with other options."""
    from energytools.data.shards import read_manifest
    from energytools.stages.augment import augment

    path = Path(cfg.out)
    if not (path / "manifest.json").exists():
        augment(cfg)
    check_made_with(path, read_manifest(path), _wanted(cfg, cfg.content()))  # what augment records
    return path


def ensure_selection(cfg: SelectConfig) -> Path:
    """The selection file ``cfg`` asks for: made unless it exists, refused if it was made from
    another score table or with other options."""
    from energytools.stages.select import select
    from energytools.table import read_metadata

    path = Path(cfg.out)
    if not path.exists():
        select(cfg)
    from energytools.config import content_of

    check_made_with(path, read_metadata(path), _wanted(cfg, content_of(cfg)))  # what select records
    return path


def _wanted(cfg, content: dict) -> dict:
    from energytools.io import sha256_file

    return {"config": content, "scores_sha256": sha256_file(cfg.scores)}


def prepare(setting_dir: Path, setting: Setting, data: DataConfig, teacher: Path, rows: dict[str, Row]) -> None:
    """The score table, the shard directories and the selections the setting's rows need, the
    random ones (:func:`draw_seed`) once per run seed; existing ones are checked, not trusted."""
    from energytools.stages.score import score

    table = setting_dir / "scores.parquet"
    if not table.exists():
        score(ScoreConfig(teacher=str(teacher), out=str(table), data=data, views=setting.views, save_logits=True))
    check_table(table, teacher, data, setting.views)
    for name in setting.rows:
        row = rows[name]
        for seed in dict.fromkeys(draw_seed(row, s) or 0 for s in setting.seeds):
            if row.shards:
                ratio, mode = row.shards
                ensure_shards(AugmentConfig(scores=str(table), out=str(shard_dir(setting_dir, row, seed)), ratio=ratio,
                                            select=mode, seed=draw_seed(row, seed), overwrite=True))
            if row.drop:
                ratio, mode, by = row.drop
                ensure_selection(SelectConfig(scores=str(table), out=str(drop_file(setting_dir, row, seed)),
                                              ratio=ratio, mode=mode, by=by, per_class=row.drop_per_class,
                                              seed=draw_seed(row, seed) or 0, overwrite=True))


@dataclass(frozen=True)
class Job:
    """One (row, seed) run: everything a worker process needs."""

    setting: str
    name: str
    row: Row
    seed: int
    setting_dir: str
    eval_limit: int | None
    epochs: int
    student: str

    @property
    def run_dir(self) -> Path:
        return Path(self.setting_dir) / slug(self.name) / f"seed{self.seed}"


def run_one(job: Job) -> dict:
    """Distill one (row, seed) in this process with one torch thread; resumes a started run."""
    import torch

    from energytools.config import DistillConfig
    from energytools.stages.distill import distill

    torch.set_num_threads(1)
    row, setting_dir, run_dir = job.row, Path(job.setting_dir), job.run_dir
    if not (run_dir / "summary.json").exists():
        started = (run_dir / "last.pt").exists()
        distill(DistillConfig(
            scores=str(setting_dir / "scores.parquet"), student=job.student, out=str(run_dir), method=row.method,
            shards=(str(shard_dir(setting_dir, row, job.seed)),) if row.shards else (),
            exclude=str(drop_file(setting_dir, row, job.seed)) if row.drop else None, cached_logits=row.cached,
            eval_limit=job.eval_limit, train=TrainConfig(epochs=job.epochs, seed=job.seed), resume=started,
            overwrite=not started, **row.options))
    return result_of(job)


def result_of(job: Job) -> dict | None:
    """The numbers of a finished run (None while it has no summary.json)."""
    run_dir = job.run_dir
    if not (run_dir / "summary.json").exists():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    return {"setting": job.setting, "config": job.name, "seed": job.seed, "best": summary["best_test_acc"],
            "last": summary["last_test_acc"], "seconds": summary["seconds"],
            "samples": config["subset"]["samples"] + summary["augmented_samples"], "epochs": job.epochs}


def run_all(jobs: list, workers: int, run=None) -> list:
    """``run(job)`` (default :func:`run_one`) of every job, ``workers`` at a time in spawned
    processes, results in the order of ``jobs``. ``run`` must be a module-level function. The
    first job that fails terminates the pool (running runs stop; they resume next time) and its
    error is raised."""
    run = run or run_one
    os.environ["OMP_NUM_THREADS"] = "1"
    if workers <= 1:
        return [run(job) for job in jobs]
    # spawned, not forked: a fork of a process whose torch threads are running can hang
    with multiprocessing.get_context("spawn").Pool(workers) as pool, _stop_raises():  # __exit__ terminates it
        results = dict(pool.imap_unordered(_indexed, [(i, job, run) for i, job in enumerate(jobs)]))
    return [results[i] for i in range(len(jobs))]


@contextlib.contextmanager
def _stop_raises():
    """SIGTERM to the study while its pool runs raises Stopped in the main thread, so the pool
    is terminated on the way out (its workers end; their runs resume from their last epoch's
    checkpoint) rather than left running as orphans."""
    from energytools.preemption import Stopped

    def stop(signum, _frame):
        raise Stopped(signum, "the pool's runs resume from their last epoch's checkpoint")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _indexed(item: tuple) -> tuple[int, dict]:
    from energytools.preemption import Stopped

    index, job, run = item
    try:
        return index, run(job)
    except Stopped as exc:  # a BaseException would kill the pool's worker and hang the pool
        raise RuntimeError(str(exc)) from None


COLUMNS = {"config": "config", "seeds": "seeds", "best": "best", "last": "last", "Δ {baseline} (best)": "delta_best",
           "95% CI": "interval", "wins": "wins", "verdict": "verdict", "Holm": "holm", "rows/epoch": "samples",
           "epochs": "epochs", "s/run": "seconds"}
PAIR_COLUMNS = {"config": "config", "against": "against", "seeds": "paired", "Δ (best)": "delta_best",
                "95% CI": "interval", "wins": "wins", "verdict": "verdict", "Holm": "holm"}


def pair_table(results: pl.DataFrame, pairs: list[tuple[str, str]]) -> pl.DataFrame:
    """One row per pair whose two configs both ran: the paired Δ, its interval and verdict, and
    the verdict Holm-adjusted over the pairs of the table."""
    frames = []
    for config, against in pairs:
        both = results.filter(pl.col("config").is_in([config, against]))
        if set(both["config"]) == {config, against}:
            row = summary_cells(aggregate_runs(both, against)).filter(pl.col("config") == config)
            frames.append(row.select("config", "paired", "delta_best", "interval", "wins", "verdict",
                                     "delta_best_mean", "delta_best_std").with_columns(against=pl.lit(against)))
    if not frames:
        return pl.DataFrame()
    table = pl.concat(frames)
    tests = [(r["delta_best_mean"], r["delta_best_std"] / r["paired"] ** 0.5, r["paired"])
             if r["paired"] >= 2 and r["delta_best_std"] is not None else None for r in table.iter_rows(named=True)]
    return table.with_columns(holm=pl.Series(holm_verdicts(tests), dtype=pl.String))


def markdown(study: Study, settings: dict[str, Setting], results: pl.DataFrame, checks: dict,
             records: list[dict]) -> str:
    """The study's block of the doc; ``records`` are the invocations that made it, in order."""
    lines = [f"<!-- {study.name}: begin -->", f"# {study.title}", "",
             "Every invocation of the study (scoring, shards, selections and runs; each writes its own line):", "",
             *record_lines(records), "",
             "Test accuracy (%) of the validation-selected checkpoint (`best`) and of the last epoch, mean ± std "
             "over seeds. " + VERDICT_RULE + " `rows/epoch` is the training rows per epoch (originals + shard "
             "rows - dropped), so rows/epoch x epochs / 64 is the optimizer steps; `s/run` is the training time "
             "of one run (two runs shared the 2 cores).", "", study.intro, ""]
    for name, setting in settings.items():
        ran = results.filter(pl.col("setting") == name)
        if not ran.height:
            continue
        cut = [row for row in setting.rows if row not in set(ran["config"])]
        seeds = ran.group_by("config").agg(pl.col("seed").n_unique()).rows()
        short = [f"{row} ({n} of {len(setting.seeds)})" for row, n in seeds if n < len(setting.seeds)]
        aggregated = aggregate_runs(ran, setting.baseline)
        columns = {k.format(baseline=setting.baseline): v for k, v in COLUMNS.items()}
        lines += [f"## {name}", "", f"Teacher on this training set: {checks[name]}", "",
                  f"This table makes {comparison_count(aggregated, setting.baseline)} comparisons with "
                  f"{setting.baseline}; Holm adjusts the verdicts for them.", "",
                  markdown_table(summary_cells(aggregated), columns,
                                 decimals={"seconds": 0, "samples": 0, "epochs": 0}), ""]
        if cut:
            lines += [f"Not run (cut for time with `--configs`): {', '.join(cut)}.", ""]
        if short:
            lines += [f"Stopped for time before every seed ran (`--report-only` wrote this table): "
                      f"{', '.join(sorted(short))}.", ""]
        pairs = pair_table(ran, setting.pairs)
        if pairs.height:
            lines += ["The comparisons the controls are for, each against its own baseline on the same seeds "
                      f"({pairs.height} comparison{'s' if pairs.height > 1 else ''}; Holm adjusts over them):", "",
                      markdown_table(pairs, PAIR_COLUMNS), ""]
    return "\n".join(lines + [f"<!-- {study.name}: end -->"])


def write_doc(doc: Path, text: str, study: Study) -> None:
    """Replace the study's block of ``doc`` (or put it first); the rest of the file is kept."""
    begin, end = f"<!-- {study.name}: begin -->", f"<!-- {study.name}: end -->"
    old = doc.read_text() if doc.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = text + "\n\n" + old
    doc.write_text(new)


def smoke_teacher(out: Path, data: DataConfig) -> Path:
    """A digits teacher trained here (two epochs of cnn_small): the smoke runs need one."""
    from energytools.stages.train import train

    teacher = out / "best.pt"
    if not teacher.exists():
        train(TrainStageConfig(model="cnn_small", out=str(out), data=data, train=TrainConfig(epochs=2),
                               overwrite=True))
    return teacher


def main(study: Study, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=study.title)
    for key, help_text in study.teachers.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=Path, help=help_text)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", nargs="+", default=None, help=f"default: all of {', '.join(study.settings)}")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="only these rows (cut for time; the doc says which ran)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="digits, CI-sized, teachers trained here")
    parser.add_argument("--doc", type=Path, default=None, help="default: docs/results.md (none with --smoke)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the tables from the runs that have finished (the doc says which "
                             "rows and seeds are missing)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    settings = study.smoke if args.smoke else {s: study.settings[s] for s in (args.settings or study.settings)}
    jobs, checks = [], {}
    for name, setting in settings.items():
        setting_dir = args.out / slug(setting.directory or name)
        data = DataConfig(**setting.data)
        if args.smoke:
            teacher = smoke_teacher(args.out / setting.teacher, data)
        else:
            teacher = getattr(args, setting.teacher)
            if teacher is None:
                parser.error(f"setting {name!r} needs --{setting.teacher.replace('_', '-')}")
        rows = [r for r in setting.rows if args.configs is None or r in args.configs or r == setting.baseline]
        if args.report_only:
            if not (setting_dir / "scores.parquet").exists():
                continue
            check_table(setting_dir / "scores.parquet", teacher, data, setting.views)
        else:
            prepare(setting_dir, dataclasses.replace(setting, rows=rows), data, teacher, study.rows)
        checks[name] = teacher_check(setting_dir / "scores.parquet")
        scale = study.smoke_epoch_scale if args.smoke else 1.0
        # seed-major: an interrupted study has whole seeds first
        jobs += [Job(name, row, study.rows[row], seed, str(setting_dir), data.eval_limit,
                     round(study.rows[row].epochs * scale), study.student)
                 for seed in setting.seeds for row in rows]
    from energytools.preemption import Stopped, install, signal_name

    if args.workers <= 1:  # SIGTERM: the in-process run stops after a step, with a checkpoint (workers
        install()          # are killed by it and resume from their last epoch's checkpoint)
    try:
        results = [result_of(job) for job in jobs] if args.report_only else run_all(jobs, args.workers)
        frame = pl.DataFrame([r for r in results if r is not None])
    except Stopped as exc:
        print(f"stopped by {signal_name(exc.signum)}; {exc.where}; re-run the same command to resume the study",
              file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    frame.write_csv(args.out / "results.csv")
    with open(args.out / "wall.jsonl", "a") as log:
        log.write(json.dumps(record(time.perf_counter() - started)) + "\n")
    records = [{"command": "(not recorded)", "machine": "(not recorded)", **json.loads(line)}
               for line in (args.out / "wall.jsonl").read_text().splitlines()]
    text = markdown(study, settings, frame, checks, records)
    doc = args.doc or (None if args.smoke else Path("docs/results.md"))
    if doc:
        write_doc(doc, text, study)
        csv = doc.parent / "results" / study.csv  # every run's numbers beside the doc
        csv.parent.mkdir(parents=True, exist_ok=True)
        frame.write_csv(csv)
    print(text)
