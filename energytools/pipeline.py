"""`energytools run RECIPE.toml`: train? -> score -> augment -> distill (several) -> report.

Each stage records a stamp (a hash of its config and of its inputs' stamps) in
``<run>/.stamps/``. A stage whose stamp matches and whose outputs exist is skipped, so
re-running a finished pipeline does nothing and changing the ratio re-runs augment and the
runs that use its shards, not score.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import DataConfig, as_dict, resolve
from .engine import TrainConfig, console, headline
from .errors import UserError
from .stages.augment import AugmentConfig
from .io import write_json

STAGES = ("train", "score", "augment", "distill", "report")
SECTIONS = {"name", "data", "teacher", "score", "augment", "distill", "report"}


@dataclass
class TrainingSection:
    """The optimiser settings a recipe section may set; the rest are TrainConfig's defaults."""

    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 64
    schedule: str = "step"
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, schedule=self.schedule,
                           seed=self.seed)


@dataclass
class TeacherSection(TrainingSection):
    checkpoint: str | None = None  # an existing teacher; otherwise one is trained
    arch: str | None = None  # for checkpoints that do not record it
    model: str = "resnet20"
    epochs: int = 15


@dataclass
class ScoreSection:
    energy_temperature: float = 4.0
    low_frac: float = 0.2
    high_frac: float = 0.2
    temperatures: list = field(default_factory=lambda: [6.0, 4.0, 2.0])
    temperature_rule: str = "groups"
    save_logits: bool = True
    batch_size: int = 256


@dataclass
class DistillRun:
    name: str = ""
    method: str = "energy-kd"
    shards: bool = False  # train on the augment stage's shards too
    temperatures: list | None = None
    temperature_source: str = "table"
    kd_temperature: float = 4.0


@dataclass
class DistillSection(TrainingSection):
    student: str = "cnn_small"
    cached_logits: bool = False
    runs: list = field(default_factory=lambda: [{"method": "kd"}, {"method": "energy-kd"}])


@dataclass
class ReportSection:
    enabled: bool = True


@dataclass
class Recipe:
    name: str
    data: DataConfig
    teacher: TeacherSection
    score: ScoreSection
    augment: "AugmentConfig | None"  # its scores/out are filled in by the runner
    distill: DistillSection | None
    runs: list[DistillRun]
    report: ReportSection
    path: str = ""


def load_recipe(path: Path | str) -> Recipe:
    """Parse and check a recipe; unknown keys are refused with the nearest valid key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    for key in raw:
        if key not in SECTIONS:
            near = difflib.get_close_matches(key, sorted(SECTIONS), n=1)
            raise UserError(f"{path}: unknown section {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))

    def section(cls, key, default_none=False):
        if key not in raw:
            return None if default_none else cls()
        if not isinstance(raw[key], dict):
            raise UserError(f"{path}: [{key}] must be a table")
        return resolve(cls, raw[key], f"{path} [{key}]")

    distill = section(DistillSection, "distill", default_none=True)
    runs = []
    if distill is not None:
        for i, run in enumerate(distill.runs):
            if not isinstance(run, dict):
                raise UserError(f"{path} [distill] runs[{i}] must be a table")
            item = resolve(DistillRun, run, f"{path} [distill.runs][{i}]")
            item.name = item.name or item.method + ("+he-da" if item.shards else "")
            runs.append(item)
    recipe = Recipe(raw.get("name", path.stem), section(DataConfig, "data"), section(TeacherSection, "teacher"),
                    section(ScoreSection, "score"), section(AugmentConfig, "augment", default_none=True), distill,
                    runs, section(ReportSection, "report"), str(path))
    _check_types(recipe, path)
    return recipe


def _check_types(recipe: Recipe, path: Path) -> None:
    from .distillers import METHODS
    from .models import MODELS
    from .data import DATASETS

    checks = [(recipe.data.dataset in DATASETS, f"[data] dataset {recipe.data.dataset!r} is not a known dataset"),
              (recipe.teacher.checkpoint or recipe.teacher.model in MODELS,
               f"[teacher] model {recipe.teacher.model!r} is not a known model")]
    if recipe.distill:
        checks.append((recipe.distill.student in MODELS, f"[distill] student {recipe.distill.student!r} is not a known model"))
        checks += [(r.method in METHODS, f"[distill.runs] method {r.method!r} is not one of {', '.join(METHODS)}")
                   for r in recipe.runs]
        checks += [(not r.shards or recipe.augment is not None, f"[distill.runs] {r.name} uses shards but there is no [augment]")
                   for r in recipe.runs]
    for section_name, obj in (("teacher", recipe.teacher), ("score", recipe.score), ("distill", recipe.distill),
                              ("augment", recipe.augment)):
        if obj is None:
            continue
        for name, spec in obj.__dataclass_fields__.items():
            value, default = getattr(obj, name), spec.default
            if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
                checks.append((isinstance(value, (int, float)) and not isinstance(value, bool),
                               f"[{section_name}] {name} must be a number, got {value!r}"))
    for ok, message in checks:
        if not ok:
            raise UserError(f"{path}: {message}")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Step:
    stage: str
    name: str
    key: str
    outputs: list[Path]
    action: Callable[[], object]


def plan(recipe: Recipe, out: Path) -> list[Step]:
    """The ordered steps, each with its stamp key (config + upstream keys)."""
    from .stages.augment import augment
    from .stages.distill import DistillConfig, distill
    from .stages.report import report
    from .stages.score import ScoreConfig, score
    from .stages.train import train

    steps: list[Step] = []
    data = recipe.data
    t = recipe.teacher
    if t.checkpoint:
        teacher_path = Path(t.checkpoint)
        teacher_key = _digest(["checkpoint", str(teacher_path)])
    else:
        teacher_path = out / "teacher" / "best.pt"
        train_cfg = t.train_config()
        teacher_key = _digest(["train", t.model, as_dict(data), as_dict(train_cfg)])
        steps.append(Step("train", "teacher", teacher_key, [teacher_path],
                          lambda: train(data, t.model, train_cfg, out / "teacher", overwrite=True)))
    s = recipe.score
    scores = out / "scores.parquet"
    score_cfg = ScoreConfig(teacher=str(teacher_path), out=str(scores), data=data, teacher_arch=t.arch,
                            energy_temperature=s.energy_temperature, low_frac=s.low_frac, high_frac=s.high_frac,
                            temperatures=tuple(s.temperatures), temperature_rule=s.temperature_rule,
                            save_logits=s.save_logits, batch_size=s.batch_size, overwrite=True)
    score_key = _digest(["score", teacher_key, as_dict(score_cfg)])
    steps.append(Step("score", "scores", score_key, [scores], lambda: score(score_cfg)))
    shards = out / "he-da"
    augment_key = None
    if recipe.augment:
        aug_cfg = dataclasses.replace(recipe.augment, scores=str(scores), out=str(shards), overwrite=True)
        augment_key = _digest(["augment", score_key, aug_cfg.content()])
        steps.append(Step("augment", "he-da", augment_key, [shards / "manifest.json"], lambda: augment(aug_cfg)))
    run_dirs = []
    if recipe.distill:
        d = recipe.distill
        for run in recipe.runs:
            run_dir = out / "runs" / run.name
            run_dirs.append(run_dir)
            cfg = DistillConfig(scores=str(scores), student=d.student, out=str(run_dir), method=run.method,
                                shards=(str(shards),) if run.shards else (), cached_logits=d.cached_logits,
                                temperatures=tuple(run.temperatures) if run.temperatures else None,
                                temperature_source=run.temperature_source, kd_temperature=run.kd_temperature,
                                eval_limit=data.eval_limit,
                                train=d.train_config(), overwrite=True)
            key = _digest(["distill", score_key, augment_key if run.shards else None, as_dict(run),
                           {k: v for k, v in as_dict(d).items() if k != "runs"}])
            steps.append(Step("distill", run.name, key, [run_dir / "summary.json"],
                              lambda cfg=cfg: distill(cfg)))
    if recipe.report.enabled:
        report_key = _digest(["report"] + [s.key for s in steps])
        steps.append(Step("report", "report", report_key, [out / "report.html"],
                          lambda: report([out], out / "report.html", overwrite=True)))
    return steps


def run_pipeline(recipe_path: Path | str, out: Path | str, start: str | None = None, force: bool = False,
                 dry_run: bool = False) -> list[tuple[str, str]]:
    """Run a recipe into ``out``; returns (step name, "ran" | "up to date" | "planned") per step."""
    recipe = load_recipe(recipe_path)
    out = Path(out)
    if start is not None and start not in STAGES:
        raise UserError(f"--from must be one of {', '.join(STAGES)}, got {start!r}")
    steps = plan(recipe, out)
    stamps = out / ".stamps"
    results = []
    forced = force
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "recipe.json", {"recipe": recipe_path and str(recipe_path),
                                         **{k: (as_dict(v) if hasattr(v, "__dataclass_fields__") else v)
                                            for k, v in recipe.__dict__.items() if k != "runs"},
                                         "runs": [as_dict(r) for r in recipe.runs]})
    for step in steps:
        if start is not None and step.stage == start:
            forced = True
        stamp = stamps / f"{step.stage}-{step.name}.json"
        fresh = (stamp.exists() and json.loads(stamp.read_text()).get("key") == step.key
                 and all(p.exists() for p in step.outputs))
        if dry_run:
            status = "up to date" if fresh and not forced else "planned"
            console.print(f"  {step.stage:<8} {step.name:<24} {status}")
            results.append((step.name, status))
            continue
        if fresh and not forced:
            console.print(f"{step.stage} {step.name}: up to date", style="dim")
            results.append((step.name, "up to date"))
            continue
        console.rule(f"{step.stage}: {step.name}")
        stamp.unlink(missing_ok=True)
        step.action()
        write_json(stamp, {"key": step.key})
        results.append((step.name, "ran"))
    if not dry_run:
        ran = sum(r[1] == "ran" for r in results)
        console.print(headline(f"pipeline {recipe.name}", f": {ran} step(s) ran, {len(results) - ran} up to date; "
                                                          f"outputs in {out}"))
    return results
