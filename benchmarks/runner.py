"""The machinery of the evidence studies (benchmarks/evidence.py, round 2; evidence3.py, round 3):
a study is rows (distill options plus what they train on) run in settings (a training set, a
teacher, seeds) and compared with a baseline and with their controls on the same seeds.

What every study gets from here:
- resume: a run whose summary.json exists is skipped, one with a last.pt continues from it, so
  an interrupted study is finished by re-running the same command;
- provenance: every run directory holds provenance.json, the code that made the run (its commit,
  or the package version and its sources' sha256) and the run's resolved options. A run whose
  options differ from its row's is refused (one line naming the run and the option); a run made
  by other code (other package sources) is stale: the study stops and names it, ``--rerun-stale``
  runs it again, ``--report-only`` lists it and writes the tables from it;
- refusal of stale inputs: a score table, shard directory or selection made from another
  teacher, other data or other options than the ones asked for now stops the study with one line;
- a fail-fast pool: the first run that fails stops the others at once and its error is raised;
- records: every invocation's command, machine, date, wall time, commit and how it ended
  (OUT/wall.jsonl, in the doc; written however it ends: finished, refused, stopped by a signal,
  interrupted or failed) and a CSV of every run beside the doc, with the commit that made it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from common import check_table, code_identity, code_label, record, record_lines, teacher_check
from energytools import threads
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
    student: str | None = None  # the study's student unless named (give such a setting its own directory)


@dataclass(frozen=True)
class Study:
    """A study: its rows, its settings, a CI-sized smoke version, and the block it owns in the doc."""

    name: str  # the doc block's marker
    title: str
    rows: dict[str, Row]
    settings: dict[str, Setting]
    smoke: dict[str, Setting]
    intro: str  # after the records, before the tables
    csv: str  # every run's numbers, beside the doc
    doc: str = "docs/results.md"  # the file whose block the study owns (--doc overrides it)
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
    code: dict = field(default_factory=dict)  # common.code_identity() of the invocation
    rerun_stale: bool = False  # a run made by other code is removed and run again

    @property
    def run_dir(self) -> Path:
        return Path(self.setting_dir) / slug(self.name) / f"seed{self.seed}"


PROVENANCE = "provenance.json"


def run_options(job: Job) -> dict:
    """What a run is, as its provenance.json records it and a later invocation compares: the
    row's method, distill options, shards, drop and teacher-logit source, its draw seed, epochs,
    student, seed and evaluation subset (JSON values: tuples as lists)."""
    row = job.row
    return json.loads(json.dumps({
        "method": row.method, "options": dict(sorted(row.options.items())), "epochs": job.epochs,
        "shards": row.shards, "drop": row.drop, "drop_per_class": row.drop_per_class, "cached": row.cached,
        "draw_seed": draw_seed(row, job.seed), "student": job.student, "seed": job.seed,
        "eval_limit": job.eval_limit}))


def read_provenance(run_dir: Path) -> dict | None:
    path = run_dir / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else None


def write_provenance(job: Job) -> None:
    """The run's provenance.json (written to a temporary name, then renamed), before it starts."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    temporary = job.run_dir / f".{PROVENANCE}.tmp"
    temporary.write_text(json.dumps({"code": job.code, "options": run_options(job)}, indent=2))
    os.replace(temporary, job.run_dir / PROVENANCE)


def option_differences(recorded: dict, wanted: dict) -> list[str]:
    """``["epochs 4 (not 12)", "options.kd_weight 9.0 (not absent)"]``: where a run's recorded
    options differ from its row's now (distill options compared one by one)."""
    found = []
    for key in dict.fromkeys([*wanted, *recorded]):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += [f"{key}.{k} {_shown(old, k)} (not {_shown(new, k)})" for k in dict.fromkeys([*new, *old])
                      if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
        elif old != new:
            found.append(f"{key} {old!r} (not {new!r})")
    return found


_ABSENT = object()


def _shown(options: dict, key: str) -> str:
    return repr(options[key]) if key in options else "absent"


def made_by_other_code(run_dir: Path, code: dict) -> dict | None:
    """The recorded code of a started or finished run when it is not ``code`` (other package
    sources; ``{}`` when the run recorded none), else None."""
    if not ((run_dir / "summary.json").exists() or (run_dir / "last.pt").exists()):
        return None
    recorded = (read_provenance(run_dir) or {}).get("code") or {}
    return None if recorded.get("sources_sha256") == code.get("sources_sha256") else recorded


def check_runs(jobs: list[Job], code: dict, rerun_stale: bool = False) -> list[tuple[Job, dict]]:
    """Refuse (one line, exit) a started or finished run whose recorded options differ from its
    row's (unless it is stale and ``rerun_stale`` will run it again); return the runs made by
    other code than ``code`` (stale), each with the code it records."""
    stale, seen = [], set()
    for job in jobs:
        if job.run_dir in seen:  # a run shared by two settings of the same data
            continue
        seen.add(job.run_dir)
        recorded = made_by_other_code(job.run_dir, code)
        provenance = read_provenance(job.run_dir)
        started = (job.run_dir / "summary.json").exists() or (job.run_dir / "last.pt").exists()
        if started and provenance is not None and not (recorded is not None and rerun_stale):
            found = option_differences(provenance.get("options", {}), run_options(job))
            if found:
                raise SystemExit(f"{job.run_dir} was made with {', '.join(found)}: its row {job.name!r} asks for "
                                 "other options; remove the run or pass another --out")
        if recorded is not None:
            stale.append((job, recorded))
    return stale


def run_one(job: Job) -> dict:
    """Distill one (row, seed) in this process (:func:`run_all` gives it one torch thread); resumes
    a started run. A run made by other code is removed first when the job says so (``rerun_stale``)."""
    from energytools.config import DistillConfig
    from energytools.stages.distill import distill

    row, setting_dir, run_dir = job.row, Path(job.setting_dir), job.run_dir
    if job.rerun_stale and made_by_other_code(run_dir, job.code) is not None:
        shutil.rmtree(run_dir)
    if not (run_dir / "summary.json").exists():
        started = (run_dir / "last.pt").exists()
        if not started:
            write_provenance(job)
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
            "samples": config["subset"]["samples"] + summary["augmented_samples"], "epochs": job.epochs,
            "commit": code_label((read_provenance(run_dir) or {}).get("code"))}


def run_all(jobs: list, workers: int, run=None) -> list:
    """``run(job)`` (default :func:`run_one`) of every job, ``workers`` at a time in spawned
    processes, results in the order of ``jobs``. ``run`` must be a module-level function. The
    first job that fails terminates the pool (running runs stop; they resume next time) and its
    error is raised."""
    run = run or run_one
    # every job computes with one torch thread: here, and in the workers spawned inside the block;
    # the caller's count and environment come back after it (a test or notebook keeps its own)
    with threads.using(1, environment=True):
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
             records: list[dict], stale: list[str] = ()) -> str:
    """The study's block of the doc; ``records`` are the invocations that made it, in order;
    ``stale`` names the runs in its tables that other code made (``--report-only`` keeps them)."""
    lines = [f"<!-- {study.name}: begin -->", f"# {study.title}", "",
             "Every invocation of the study (scoring, shards, selections and runs; each writes its own line):", "",
             *record_lines(records), ""]
    if stale:
        lines += [f"Made by other code than this checkout's ({len(stale)} run{'s' * (len(stale) > 1)}, stale; "
                  "`--rerun-stale` runs them again): " + "; ".join(stale) + ".", ""]
    lines += ["Test accuracy (%) of the validation-selected checkpoint (`best`) and of the last epoch, mean ± std "
              "over seeds. " + VERDICT_RULE + " `rows/epoch` is the training rows per epoch (originals + shard "
              "rows - dropped), so rows/epoch x epochs / 64 is the optimizer steps; `s/run` is the training time "
              "of one run (two runs shared the 2 cores).", "", study.intro, ""]
    for name, setting in settings.items():
        ran = results.filter(pl.col("setting") == name)
        if ran.height:
            lines += [f"## {name}", "", f"Teacher on this training set: {checks[name]}", "",
                      *setting_lines(setting, ran)]
    return "\n".join(lines + [f"<!-- {study.name}: end -->"])


def setting_lines(setting: Setting, ran: pl.DataFrame) -> list[str]:
    """A setting's tables from its runs (``ran``: one row per run, as result_of gives them or as
    the study's CSV holds them): every row against the baseline with Holm over the table, the
    rows that did not run or not on every seed, and the pairs against their own controls."""
    cut = [row for row in setting.rows if row not in set(ran["config"])]
    seeds = ran.group_by("config").agg(pl.col("seed").n_unique()).rows()
    short = [f"{row} ({n} of {len(setting.seeds)})" for row, n in seeds if n < len(setting.seeds)]
    aggregated = aggregate_runs(ran, setting.baseline)
    columns = {k.format(baseline=setting.baseline): v for k, v in COLUMNS.items()}
    lines = [f"This table makes {comparison_count(aggregated, setting.baseline)} comparisons with "
             f"{setting.baseline}; Holm adjusts the verdicts for them.", "",
             markdown_table(summary_cells(aggregated), columns, decimals={"seconds": 0, "samples": 0, "epochs": 0}),
             ""]
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
    return lines


def write_doc(doc: Path, text: str, study: Study) -> None:
    """Replace the study's block of ``doc`` (or put it first); the rest of the file is kept.
    Written to a temporary name, then renamed."""
    begin, end = f"<!-- {study.name}: begin -->", f"<!-- {study.name}: end -->"
    old = doc.read_text() if doc.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = text + "\n\n" + old
    doc.parent.mkdir(parents=True, exist_ok=True)
    temporary = doc.with_name(f".{doc.name}.tmp")
    temporary.write_text(new)
    os.replace(temporary, doc)


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
    parser.add_argument("--doc", type=Path, default=None, help=f"default: {study.doc} (none with --smoke)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the tables from the runs that have finished (the doc says which "
                             "rows and seeds are missing, and which runs other code made)")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="run again the runs that other code made (other energytools sources than this "
                             "checkout's); without it the study stops and names them")
    args = parser.parse_args(argv)
    settings = study.smoke if args.smoke else {s: study.settings[s] for s in (args.settings or study.settings)}
    for name, setting in settings.items():
        if not args.smoke and getattr(args, setting.teacher) is None:
            parser.error(f"setting {name!r} needs --{setting.teacher.replace('_', '-')}")
    from energytools.preemption import Stopped, handling, signal_name

    args.out.mkdir(parents=True, exist_ok=True)
    code = code_identity()
    try:
        with handling(), invocation_record(args.out / "wall.jsonl", code) as finished:
            frame, checks, stale = run_study(study, settings, args, code)
            finished()  # this invocation's line, before the doc that lists the invocations
            write_outputs(study, settings, args, frame, checks, stale)
    except Stopped as exc:
        print(f"stopped by {signal_name(exc.signum)}; {exc.where}; re-run the same command to resume the study",
              file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume the study (finished runs are kept, started ones "
              "continue from their last checkpoint)", file=sys.stderr)
        raise SystemExit(130) from None


@contextlib.contextmanager
def invocation_record(log: Path, code: dict):
    """Append this invocation's record line (common.record: command, machine, date, wall time,
    commit, outcome) to ``log`` however the block ends: finished, refused (a SystemExit),
    stopped by a signal, interrupted (Ctrl-C) or failed (an exception, named). The block may
    write it early by calling what this yields (the doc lists the invocation that writes it)."""
    from energytools.preemption import Stopped, signal_name

    started, written = time.perf_counter(), []

    def write(outcome: str = "finished") -> None:
        if not written:
            with open(log, "a") as out:
                out.write(json.dumps(record(time.perf_counter() - started, code, outcome)) + "\n")
            written.append(outcome)

    try:
        yield write
    except Stopped as exc:
        write(f"stopped by {signal_name(exc.signum)}")
        raise
    except KeyboardInterrupt:
        write("interrupted (Ctrl-C)")
        raise
    except SystemExit as exc:
        write("finished" if exc.code in (0, None) else f"refused: {str(exc.code).splitlines()[0][:300]}")
        raise
    except BaseException as exc:
        write(f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        raise
    write()


def run_study(study: Study, settings: dict[str, Setting], args, code: dict) -> tuple[pl.DataFrame, dict, list[str]]:
    """Prepare the settings' inputs, check the runs there (options, code), run what is missing
    (nothing with ``--report-only``); the results, the teacher check of each setting and the
    stale runs the tables hold."""
    from energytools.preemption import Stopped, stop_requested

    jobs, checks = [], {}
    for name, setting in settings.items():
        setting_dir = args.out / slug(setting.directory or name)
        data = DataConfig(**setting.data)
        teacher = smoke_teacher(args.out / setting.teacher, data) if args.smoke else getattr(args, setting.teacher)
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
                     round(study.rows[row].epochs * scale), setting.student or study.student, code,
                     args.rerun_stale)
                 for seed in setting.seeds for row in rows]
    stale = check_runs(jobs, code, args.rerun_stale)
    named = [f"{job.run_dir} ({code_label(recorded)})" for job, recorded in stale]
    if stale and args.report_only:
        print(f"stale: {len(stale)} run(s) made by other code than this checkout's ({code_label(code)}):",
              *named, sep="\n  ", file=sys.stderr)
    elif stale and not args.rerun_stale:
        more = f" and {len(stale) - 1} more" if len(stale) > 1 else ""
        raise SystemExit(f"{named[0]}{more} made by other code than this checkout's ({code_label(code)}): pass "
                         "--rerun-stale to run them again, or --report-only to write the tables from them")
    if stop_requested():  # a stop signal while the inputs were prepared
        raise Stopped(stop_requested(), "before the runs started")
    # SIGTERM (main's handler): an in-process run stops after a step with a checkpoint; a pool's
    # workers are ended by run_all and resume from their last epoch's checkpoint
    results = [result_of(job) for job in jobs] if args.report_only else run_all(jobs, args.workers)
    frame = pl.DataFrame([r for r in results if r is not None])
    return frame, checks, named if args.report_only else []


def write_outputs(study: Study, settings: dict[str, Setting], args, frame: pl.DataFrame, checks: dict,
                  stale: list[str]) -> None:
    """OUT/results.csv, the study's block of the doc with every recorded invocation, every run's
    numbers beside the doc (study.csv), and the block on stdout."""
    frame.write_csv(args.out / "results.csv")
    records = [{"command": "(not recorded)", "machine": "(not recorded)", **json.loads(line)}
               for line in (args.out / "wall.jsonl").read_text().splitlines()]
    text = markdown(study, settings, frame, checks, records, stale)
    doc = args.doc or (None if args.smoke else Path(study.doc))
    if doc:
        write_doc(doc, text, study)
        frame.write_csv(doc.parent / study.csv)  # every run's numbers beside the doc
    print(text)
