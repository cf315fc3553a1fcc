"""`energytools run RECIPE.toml`: train? -> score -> augment -> distill (several) -> report.

A recipe's sections are the stage configs (:mod:`energytools.config`): ``[data]`` is a
DataConfig, ``[teacher]`` a TrainStageConfig (or ``checkpoint`` and ``arch`` of an existing
teacher), ``[score]``, ``[augment]`` and ``[distill]`` the stage configs without the paths the
runner fills in; each of ``[distill]``'s ``runs`` may change any distill option.

Each step records a stamp in ``<run>/.stamps/``: a hash of its config and of the content of
its input files (the teacher checkpoint, the score table, the shard manifest). A step whose
stamp matches and whose outputs exist is skipped. So a finished pipeline re-runs nothing, a
changed ratio re-runs augment and the runs that use its shards, and a teacher checkpoint
replaced at the same path re-runs score and everything after it.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import (AugmentConfig, DataConfig, DistillConfig, ScoreConfig, TrainStageConfig, as_dict, content_of,
                     convert, resolve)
from .console import console, headline
from .errors import UserError
from .io import WriteError, check_output_path, require_file, sha256_file, sha256_json, write_json
from .preemption import Interrupted, Stopped

STAGES = ("train", "score", "augment", "distill", "report")
SECTIONS = {"name", "data", "teacher", "score", "augment", "distill", "report"}
#: keys of each section that the runner sets itself
RUNNER_KEYS = {"teacher": {"out", "data", "resume", "overwrite"}, "score": {"teacher", "out", "data", "overwrite"},
               "augment": {"scores", "out", "overwrite"},
               "distill": {"scores", "out", "shards", "resume", "overwrite"}}


#: keys of ``[teacher]`` that set score's teacher_<key> (TeacherPreprocessing)
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation")


@dataclass
class TeacherSection:
    """``[teacher]``: an existing ``checkpoint`` (``arch`` when it does not record it), or the
    ``train`` config of one to train; either may say what it was trained to see (``input_size``,
    ``mean``, ``std``, ``interpolation``: score's ``teacher_*`` options)."""

    checkpoint: str | None = None
    arch: str | None = None
    train: TrainStageConfig | None = None


@dataclass
class DistillRun:
    name: str
    shards: bool  # train on the augment stage's shards too
    config: DistillConfig


@dataclass
class Recipe:
    name: str
    data: DataConfig
    teacher: TeacherSection
    score: ScoreConfig
    augment: AugmentConfig | None
    runs: list[DistillRun]
    report: bool = True
    path: str = ""

    def resolved(self) -> dict:
        """The recipe with every default filled in, as recipe.json records it."""
        return {"recipe": self.path, "name": self.name, "data": as_dict(self.data),
                "teacher": {"checkpoint": self.teacher.checkpoint, "arch": self.teacher.arch,
                            "train": _content(self.teacher.train) if self.teacher.train else None},
                "score": _content(self.score), "augment": self.augment and self.augment.content(),
                "runs": [{"name": r.name, "shards": r.shards, **_content(r.config)} for r in self.runs],
                "report": self.report}


def _section(raw: dict, key: str, path: Path) -> dict | None:
    if key not in raw:
        return None
    if not isinstance(raw[key], dict):
        raise UserError(f"{path}: [{key}] must be a table")
    section = dict(raw[key])
    for name in RUNNER_KEYS.get(key, ()):
        if name in section:
            raise UserError(f"{path} [{key}]: {name!r} is set by the pipeline, not the recipe")
    return section


def load_recipe(path: Path | str) -> Recipe:
    """Parse and check a recipe; unknown keys are refused with the nearest valid key, and every
    value is type-checked, each with one line naming the file, section and key."""
    path = require_file(path, "recipe")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    for key in raw:
        if key not in SECTIONS:
            near = difflib.get_close_matches(key, sorted(SECTIONS), n=1)
            raise UserError(f"{path}: unknown section {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    name = convert(raw.get("name", path.stem), str, f"{path}: name")
    data = resolve(DataConfig, _section(raw, "data", path) or {}, f"{path} [data]")
    teacher_raw = _section(raw, "teacher", path) or {}
    checkpoint = convert(teacher_raw.pop("checkpoint", None), str | None, f"{path} [teacher]: checkpoint")
    arch = convert(teacher_raw.pop("arch", None), str | None, f"{path} [teacher]: arch")
    # input_size, mean, std, interpolation: the teacher's preprocessing, for score (augment and distill
    # reuse the table's)
    preprocessing = {f"teacher_{key}": teacher_raw.pop(key) for key in PREPROCESSING_KEYS if key in teacher_raw}
    placeholder = {"out": "", "data": data}
    teacher = TeacherSection(checkpoint, arch, None if checkpoint else
                             resolve(TrainStageConfig, {**placeholder, **teacher_raw}, f"{path} [teacher]"))
    if teacher.train is not None and teacher.train.folds is not None:
        raise UserError(f"{path} [teacher]: folds trains K fold teachers, which a recipe does not run: use "
                        "`energytools train --folds K` and `energytools score --teacher DIR` for out-of-fold scores")
    if checkpoint and teacher_raw:
        raise UserError(f"{path} [teacher]: {sorted(teacher_raw)[0]!r} trains a teacher, but checkpoint is given")
    score = resolve(ScoreConfig, {"teacher": "", "out": "", "data": data, "teacher_arch": arch, **preprocessing,
                                  **(_section(raw, "score", path) or {})}, f"{path} [score]")
    augment_raw = _section(raw, "augment", path)
    augment = None if augment_raw is None else resolve(AugmentConfig, augment_raw, f"{path} [augment]")
    runs = _distill_runs(_section(raw, "distill", path), augment is not None, path)
    report_raw = _section(raw, "report", path) or {}
    unknown = set(report_raw) - {"enabled"}
    if unknown:
        raise UserError(f"{path} [report]: unknown key {sorted(unknown)[0]!r} (the only key is 'enabled')")
    report = convert(report_raw.get("enabled", True), bool, f"{path} [report]: enabled")
    recipe = Recipe(name, data, teacher, score, augment, runs, report, str(path))
    for config in [score, augment, *(r.config for r in runs), teacher.train]:
        if config is not None and hasattr(config, "check"):
            _checked(config, path)
    return recipe


def _checked(config, path: Path) -> None:
    try:
        config.check()
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _distill_runs(section: dict | None, has_augment: bool, path: Path) -> list[DistillRun]:
    if section is None:
        return []
    runs = section.pop("runs", [{"method": "kd"}, {"method": "energy-kd"}])
    if not isinstance(runs, list) or not runs:
        raise UserError(f"{path} [distill]: runs must be a list of tables such as [{{ method = \"kd\" }}]")
    shared = {"scores": "", "out": "", **section}
    resolve(DistillConfig, {**shared}, f"{path} [distill]")  # the shared options alone are checked too
    out, names = [], set()
    for i, run in enumerate(runs):
        where = f"{path} [distill] runs[{i}]"
        if not isinstance(run, dict):
            raise UserError(f"{where} must be a table")
        run = dict(run)
        shards = convert(run.pop("shards", False), bool, f"{where}: shards")
        name = convert(run.pop("name", None), str | None, f"{where}: name")
        for key in RUNNER_KEYS["distill"] - {"shards"}:
            if key in run:
                raise UserError(f"{where}: {key!r} is set by the pipeline, not the recipe")
        config = resolve(DistillConfig, {**shared, **run}, where)
        name = name or config.method + ("+he-da" if shards else "")
        if shards and not has_augment:
            raise UserError(f"{where}: {name} uses shards but there is no [augment]")
        if name in names:
            raise UserError(f"{where}: two runs are named {name!r}; give one a `name`")
        names.add(name)
        out.append(DistillRun(name, shards, config))
    return out


def _digest(obj) -> str:
    return sha256_json(obj, 16)


def content_digest(path: Path) -> str | None:
    """sha256 of a file, or over a save_pretrained folder's model files (None when absent): what a
    step's freshness depends on."""
    if path.is_dir():
        from .models.init import init_sha256

        return init_sha256(path)
    return sha256_file(path) if path.is_file() else None


@dataclass
class Step:
    stage: str
    name: str
    config: dict  # what the output depends on besides the input files
    inputs: list[Path]  # files whose content the output depends on
    outputs: list[Path]
    action: Callable[[bool], object]  # action(resume): resume continues a stopped run of this same step
    run_dir: Path | None = None  # a training step's run directory (last.pt), None for the other stages

    def key(self) -> str:
        return _digest([self.stage, self.config, {str(p): content_digest(p) for p in self.inputs}])

    def output_digests(self) -> dict:
        """What the step wrote, recorded in its stamp: an output changed or damaged since (a
        truncated table, a file copied over it) makes the step run again."""
        return {str(p): content_digest(p) for p in self.outputs}


def plan(recipe: Recipe, out: Path) -> list[Step]:
    """The ordered steps, each with the config and input files its stamp covers."""
    from .stages.augment import augment
    from .stages.distill import distill
    from .stages.report import report
    from .stages.score import score
    from .stages.train import train

    steps: list[Step] = []
    t = recipe.teacher
    if t.checkpoint:
        teacher_path = Path(t.checkpoint)
    else:
        train_cfg = dataclasses.replace(t.train, out=str(out / "teacher"), overwrite=True)
        teacher_path = out / "teacher" / "best.pt"
        inputs = [Path(train_cfg.init)] if train_cfg.init else []  # its pretrained weights
        steps.append(Step("train", "teacher", _content(train_cfg), inputs, [teacher_path],
                          lambda resume: train(_resuming(train_cfg, resume)), teacher_path.parent))
    scores = out / "scores.parquet"
    score_cfg = dataclasses.replace(recipe.score, teacher=str(teacher_path), out=str(scores), overwrite=True)
    steps.append(Step("score", "scores", _content(score_cfg), [teacher_path], [scores],
                      lambda resume: score(score_cfg)))  # score and augment resume their parts themselves
    manifest = out / "he-da" / "manifest.json"
    if recipe.augment:
        aug_cfg = dataclasses.replace(recipe.augment, scores=str(scores), out=str(manifest.parent), overwrite=True)
        steps.append(Step("augment", "he-da", aug_cfg.content(), [scores], [manifest],
                          lambda resume: augment(aug_cfg)))
    summaries = []
    for run in recipe.runs:
        run_dir = out / "runs" / run.name
        cfg = dataclasses.replace(run.config, scores=str(scores), out=str(run_dir), overwrite=True,
                                  shards=(str(manifest.parent),) if run.shards else ())
        summaries.append(run_dir / "summary.json")
        inputs = [scores, teacher_path] + ([manifest] if run.shards else [])
        inputs += [Path(cfg.student_init)] if cfg.student_init else []
        steps.append(Step("distill", run.name, _content(cfg), inputs, [summaries[-1]],
                          lambda resume, cfg=cfg: distill(_resuming(cfg, resume)), run_dir))
    if recipe.report:
        inputs = [scores] + ([manifest] if recipe.augment else []) + summaries
        steps.append(Step("report", "report", {}, inputs, [out / "report.html"],
                          lambda resume: report([out], out / "report.html", overwrite=True)))
    return steps


def _resuming(cfg, resume: bool):
    """A training step's config: continue the stopped run (``resume``) or replace what is there."""
    return dataclasses.replace(cfg, resume=resume, overwrite=not resume)


def _content(config) -> dict:
    """A config without the options that do not change what a step writes. Unset (None)
    options stay out too, so that a version adding an option leaves finished steps fresh, and
    so does a group of options none of which is set (the teacher's preprocessing)."""
    return {k: v for k, v in content_of(config).items()
            if v is not None and not (isinstance(v, dict) and v and all(x is None for x in v.values()))}


def run_pipeline(recipe_path: Path | str, out: Path | str, start: str | None = None, force: bool = False,
                 dry_run: bool = False) -> list[tuple[str, str]]:
    """Run a recipe into ``out``; returns (step name, "ran" | "up to date" | "planned") per step.

    A run refused before its first step finishes leaves no directory behind."""
    recipe = load_recipe(recipe_path)
    out = Path(out)
    if start is not None and start not in STAGES:
        raise UserError(f"--from must be one of {', '.join(STAGES)}, got {start!r}")
    check_output_path(out, directory=True)
    if recipe.teacher.checkpoint and not dry_run and not Path(recipe.teacher.checkpoint).is_file():
        raise UserError(f"{recipe_path} [teacher]: checkpoint {recipe.teacher.checkpoint} does not exist")
    steps = plan(recipe, out)
    created = None if out.exists() or dry_run else out
    try:
        results = _run_steps(steps, out, recipe, start, force, dry_run)
    except Stopped:  # a scheduler's stop: what was written is what the re-run continues from
        raise
    except BaseException:
        if created is not None and not _worth_keeping(created):
            shutil.rmtree(created, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    if not dry_run:
        ran = sum(r[1] == "ran" for r in results)
        console.print(headline(f"pipeline {recipe.name}", f": {ran} step(s) ran, {len(results) - ran} up to date; "
                                                          f"outputs in {out}"))
    return results


def _worth_keeping(out: Path) -> bool:
    """Whether a run that failed or stopped leaves something behind: a finished step, or a
    training step's last.pt that the next run continues from."""
    stamps = out / ".stamps"
    finished = stamps.is_dir() and any(not p.name.endswith(".started.json") for p in stamps.glob("*.json"))
    return finished or any(out.rglob("last.pt"))


def _run_steps(steps: list[Step], out: Path, recipe: Recipe, start: str | None, force: bool,
               dry_run: bool) -> list[tuple[str, str]]:
    stamps = out / ".stamps"
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "recipe.json", recipe.resolved())
    results, forced, pending = [], force, set()  # pending: outputs a dry run would rewrite
    for step in steps:
        forced = forced or step.stage == start
        stamp = stamps / f"{step.stage}-{step.name}.json"
        recorded = json.loads(stamp.read_text()) if stamp.exists() else {}
        fresh = (not forced and not pending & set(step.inputs) and recorded.get("key") == step.key()
                 and all(p.exists() for p in step.outputs))
        if fresh and "outputs" in recorded and recorded["outputs"] != step.output_digests():
            fresh = False  # (stamps written before outputs were recorded hold none)
            console.print(f"{step.stage} {step.name}: its output changed since it was written; running it again")
        if dry_run:
            status = "up to date" if fresh else "planned"
            pending |= set() if fresh else set(step.outputs)
            console.print(f"  {step.stage:<8} {step.name:<24} {status}")
        elif fresh:
            status = "up to date"
            console.print(f"{step.stage} {step.name}: up to date", style="dim")
        else:
            status = "ran"
            console.rule(f"{step.stage}: {step.name}")
            stamp.unlink(missing_ok=True)
            started = stamps / f"{step.stage}-{step.name}.started.json"
            # a training step stopped (a scheduler's SIGTERM, a crash) with these same inputs and
            # config continues from its last.pt; --force and --from start it again
            resume = (not forced and step.run_dir is not None and (step.run_dir / "last.pt").exists()
                      and started.exists() and json.loads(started.read_text()).get("key") == step.key())
            if resume:
                console.print(f"{step.stage} {step.name}: resuming the stopped run in {step.run_dir}")
            elif step.run_dir is not None and step.run_dir.is_dir():  # another run's: never resumed under this key
                shutil.rmtree(step.run_dir)
            write_json(started, {"key": step.key()})
            try:
                step.action(resume)
            except Stopped as stopped:  # the stage's hint says --resume; a recipe continues by itself
                raise Stopped(stopped.signum, f"{step.stage} {step.name}: {stopped.where}",
                              "re-run the same command to continue") from None
            except KeyboardInterrupt:  # Ctrl-C: the same, whatever the stage would advise
                raise Interrupted(f"{step.stage} {step.name} stopped; re-run the same command to continue") from None
            except WriteError as exc:  # a full disk: the same again (a training step's advice is --resume)
                raise exc.advise("re-run the same command to continue") from None
            write_json(stamp, {"key": step.key(), "outputs": step.output_digests()})
            started.unlink(missing_ok=True)
        results.append((step.name, status))
    return results
