"""The `energytools` command: a thin layer of options over the stage functions."""
from __future__ import annotations

import errno
import functools
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Energy scores, HE-DA curation and Energy KD for knowledge distillation.\n\n"
                       "Example: `energytools run pipelines/quickstart.toml --out runs/quickstart`")


def _internal_error(exc: BaseException):
    """A bug: the traceback goes to a file, one line naming it to stderr, exit status 1."""
    fd, name = tempfile.mkstemp(prefix="energytools-crash-", suffix=".txt")
    with os.fdopen(fd, "w") as handle:
        traceback.print_exception(exc, file=handle)
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    print(f"energytools: internal error {type(exc).__name__}: {first} (full traceback in {name})", file=sys.stderr)
    raise typer.Exit(1) from None


# a full, read-only or forbidden disk is the user's environment, not a bug
DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


def handle_errors(fn):
    """Bad input -> one line on stderr, exit 2; a bug -> one line naming the traceback file, exit 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UserError as exc:
            print(f"energytools: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                _internal_error(exc)
            where = f" {exc.filename}" if exc.filename else ""
            print(f"energytools: error: cannot write{where}: {exc.strerror}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("energytools: interrupted; re-run the same command to resume", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001
            _internal_error(exc)
    return wrapper


def command(name: str | None = None, **kwargs):
    def decorator(fn):
        return app.command(name, **kwargs)(handle_errors(fn))
    return decorator


# --- shared options -----------------------------------------------------------------------
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="fashion-mnist, cifar10, cifar100, imagefolder, parquet, digits")]
DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="where the dataset files are")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="class-stratified subset of N training samples")]
EvalLimit = Annotated[Optional[int], typer.Option("--eval-limit", help="same, for the val and test splits")]
Imbalance = Annotated[Optional[float], typer.Option("--imbalance-factor", help="long-tail the train split (e.g. 100)")]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", help="imagefolder, parquet: side of the square input")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...")]
Workers = Annotated[int, typer.Option("--num-workers", help="DataLoader worker processes")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]


def _data_config(dataset, data_root, limit, eval_limit, imbalance_factor, image_size, defaults: dict | None = None):
    from .config import DataConfig, overrides, resolve

    values = dict(defaults or {})
    values.update(overrides(dataset=dataset, data_root=str(data_root) if data_root else None, limit=limit,
                            eval_limit=eval_limit, imbalance_factor=imbalance_factor, image_size=image_size))
    return resolve(DataConfig, values, "dataset options")


@command("models")
def models_command():
    """List the registered models, and the names other libraries' models go by (timm:<name>, hf:<dir>).

    Example: `energytools models`
    """
    from .models import DESCRIPTIONS, SOURCES

    rows = {**DESCRIPTIONS, **{source.usage: source.description for source in SOURCES.values()}}
    width = max(map(len, rows))
    for name, text in rows.items():
        typer.echo(f"{name:<{width}}  {text}")


@command("datasets")
def datasets_command():
    """List the registered datasets.

    Example: `energytools datasets`
    """
    from .data import DATASETS

    for name, loader in DATASETS.items():
        typer.echo(f"{name:<12}  {(loader.__doc__ or '').strip().splitlines()[0] if loader.__doc__ else ''}")


@command("train")
def train_command(
    model: Annotated[str, typer.Option("--model", help="architecture, see `energytools models`")],
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    dataset: Dataset = "fashion-mnist", data_root: DataRoot = None, limit: Limit = None,
    eval_limit: EvalLimit = None, imbalance_factor: Imbalance = None, image_size: ImageSize = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 30,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 64,
    lr: Annotated[float, typer.Option(help="initial learning rate")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="step (x0.1 at 62.5/75/87.5% of epochs) or cosine")] = "step",
    seed: Annotated[int, typer.Option(help="seed for every random choice")] = 0,
    device: Device = "auto", num_workers: Workers = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/last.pt")] = False,
    overwrite: Overwrite = False,
):
    """Train a model with cross-entropy: how a teacher is made, and the no-distillation baseline.

    Example: `energytools train --dataset fashion-mnist --model resnet20 --epochs 15 --out runs/teacher`
    """
    from .engine import TrainConfig
    from .stages.train import train

    data = _data_config(dataset, data_root, limit, eval_limit, imbalance_factor, image_size)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                      seed=seed, device=device, num_workers=num_workers)
    train(data, model, cfg, out, resume=resume, overwrite=overwrite)


def _optional_data(dataset, data_root, limit, eval_limit, imbalance_factor, image_size):
    """A DataConfig only when the user named a dataset option; else None (use the recorded one)."""
    if all(v is None for v in (dataset, data_root, limit, eval_limit, imbalance_factor, image_size)):
        return None
    if dataset is None:
        raise UserError("dataset options need --dataset")
    return _data_config(dataset, data_root, limit, eval_limit, imbalance_factor, image_size)


@command("score")
def score_command(
    teacher: Annotated[Path, typer.Option("--teacher", help="teacher checkpoint (.pt, .pth, .safetensors) or save_pretrained folder")],
    out: Annotated[Path, typer.Option("--out", help="the table to write")] = Path("scores.parquet"),
    dataset: Dataset = None, data_root: DataRoot = None, limit: Limit = None, eval_limit: EvalLimit = None,
    imbalance_factor: Imbalance = None, image_size: ImageSize = None,
    teacher_arch: Annotated[Optional[str], typer.Option(help="architecture, for checkpoints that do not record it")] = None,
    split: Annotated[str, typer.Option(help="train, val or test")] = "train",
    energy_temperature: Annotated[float, typer.Option(help="T_E in E = -T_E*logsumexp(z/T_E)")] = 4.0,
    low_frac: Annotated[float, typer.Option(help="fraction of lowest-energy samples in the low group")] = 0.2,
    high_frac: Annotated[float, typer.Option(help="fraction of highest-energy samples in the high group")] = 0.2,
    temperatures: Annotated[str, typer.Option(help="KD temperature of the low,mid,high groups (paper: 6,4,2; reference code: 2,4,6)")] = "6,4,2",
    temperature_rule: Annotated[str, typer.Option(help="groups, or rank (linear in energy rank)")] = "groups",
    reference: Annotated[Optional[Path], typer.Option(help="train table whose thresholds group this split")] = None,
    save_logits: Annotated[bool, typer.Option("--save-logits", help="store float16 logits (and of the flipped image)")] = False,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 256,
    part_size: Annotated[int, typer.Option(help="rows per resumable part written to OUT.parts/")] = 8192,
    device: Device = "auto", num_workers: Workers = 0, overwrite: Overwrite = False,
):
    """Score every sample with the teacher: energy, confidence, groups and temperatures to Parquet.

    Example: `energytools score --teacher runs/teacher/best.pt --out runs/scores.parquet`
    """
    from .stages.score import ScoreConfig, score

    data = _optional_data(dataset, data_root, limit, eval_limit, imbalance_factor, image_size)
    score(ScoreConfig(teacher=str(teacher), out=str(out), data=data, teacher_arch=teacher_arch, split=split,
                      energy_temperature=energy_temperature, low_frac=low_frac, high_frac=high_frac,
                      temperatures=temperatures, temperature_rule=temperature_rule,
                      reference=str(reference) if reference else None, save_logits=save_logits,
                      batch_size=batch_size, part_size=part_size, device=device, num_workers=num_workers,
                      overwrite=overwrite))


@command("distill")
def distill_command(
    student: Annotated[str, typer.Option("--student", help="student architecture")],
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    scores: Annotated[Path, typer.Option("--scores", help="the train score table")] = Path("scores.parquet"),
    method: Annotated[str, typer.Option(help="ce, kd, energy-kd, dkd or energy-dkd")] = "energy-kd",
    shards: Annotated[Optional[list[Path]], typer.Option("--shards", help="HE-DA shard directory (repeatable)")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="teacher checkpoint (default: the one that scored the table)")] = None,
    teacher_arch: Annotated[Optional[str], typer.Option(help="architecture, for checkpoints that do not record it")] = None,
    temperature_source: Annotated[str, typer.Option(help="table (offline, by sample_id) or online (teacher energy per batch)")] = "table",
    temperatures: Annotated[Optional[str], typer.Option(help="re-derive: T of low,mid,high groups, e.g. 2,4,6")] = None,
    low_frac: Annotated[Optional[float], typer.Option(help="re-derive groups with this low fraction")] = None,
    high_frac: Annotated[Optional[float], typer.Option(help="re-derive groups with this high fraction")] = None,
    temperature_rule: Annotated[Optional[str], typer.Option(help="groups or rank")] = None,
    kd_temperature: Annotated[float, typer.Option(help="T of kd and dkd")] = 4.0,
    cached_logits: Annotated[bool, typer.Option("--cached-logits", help="use the table's stored teacher logits")] = False,
    eval_limit: EvalLimit = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 30,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 64,
    lr: Annotated[float, typer.Option(help="initial learning rate")] = 0.05,
    schedule: Annotated[str, typer.Option(help="step or cosine")] = "step",
    seed: Annotated[int, typer.Option(help="seed for every random choice")] = 0,
    device: Device = "auto", num_workers: Workers = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/last.pt")] = False,
    overwrite: Overwrite = False,
):
    """Distill a student from the teacher, with per-sample temperatures read from the score table.

    Example: `energytools distill --scores runs/scores.parquet --student cnn_small --method energy-kd --shards runs/he-da --out runs/energy-kd`
    """
    from .engine import TrainConfig
    from .stages.distill import DistillConfig, distill

    cfg = DistillConfig(scores=str(scores), student=student, out=str(out), method=method,
                        shards=tuple(str(s) for s in shards or ()), teacher=str(teacher) if teacher else None,
                        teacher_arch=teacher_arch, temperature_source=temperature_source, temperatures=temperatures,
                        low_frac=low_frac, high_frac=high_frac, temperature_rule=temperature_rule,
                        kd_temperature=kd_temperature, cached_logits=cached_logits, eval_limit=eval_limit,
                        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed,
                                          device=device, num_workers=num_workers),
                        resume=resume, overwrite=overwrite)
    distill(cfg)


Ratio = Annotated[float, typer.Option(help="fraction of samples to select, in (0, 1]")]
SelectMode = Annotated[str, typer.Option("--select", help="high (HE-DA), low or random (controls)")]
PerClass = Annotated[bool, typer.Option("--per-class", help="take the fraction within each class")]
Seed = Annotated[int, typer.Option(help="seed for every random choice")]
Scores = Annotated[Path, typer.Option("--scores", help="the train score table")]


@command("select")
def select_command(
    scores: Scores = Path("scores.parquet"), ratio: Ratio = 0.3, select: SelectMode = "high",
    per_class: PerClass = False, seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(help="write the selected ids to this Parquet file")] = None,
    overwrite: Overwrite = False,
):
    """Select the highest-energy fraction (curation only): prints count, class histogram, energy range.

    Example: `energytools select --scores runs/scores.parquet --ratio 0.3 --out runs/selected.parquet`
    """
    from .stages.augment import select as select_stage

    select_stage(str(scores), str(out) if out else None, ratio, select, per_class, seed, overwrite)


@command("augment")
def augment_command(
    scores: Scores = Path("scores.parquet"), ratio: Ratio = 0.3,
    out: Annotated[Path, typer.Option(help="shard directory")] = Path("he-da"),
    select: SelectMode = "high", per_class: PerClass = False,
    policy: Annotated[str, typer.Option(help="cutmix, mixup, randaug, light, or an albumentations .json/.yaml file")] = "cutmix",
    copies: Annotated[int, typer.Option(help="augmented samples per selected sample")] = 1,
    seed: Seed = 0,
    workers: Annotated[int, typer.Option(help="processes writing shards")] = 1,
    shard_size: Annotated[int, typer.Option(help="rows per shard")] = 2048,
    teacher: Annotated[Optional[Path], typer.Option(help="teacher checkpoint (default: the table's)")] = None,
    overwrite: Overwrite = False,
):
    """Materialize HE-DA shards: augment the highest-energy samples and score them with the teacher.

    Example: `energytools augment --scores runs/scores.parquet --ratio 0.3 --out runs/he-da`
    """
    from .stages.augment import AugmentConfig, augment

    augment(AugmentConfig(scores=str(scores), out=str(out), ratio=ratio, select=select, per_class=per_class,
                          policy=policy, copies=copies, seed=seed, workers=workers, shard_size=shard_size,
                          teacher=str(teacher) if teacher else None, overwrite=overwrite))


@command("report")
def report_command(
    paths: Annotated[list[Path], typer.Argument(help="run directories or files (score tables, shard dirs, runs)")],
    out: Annotated[Path, typer.Option(help="the HTML file")] = Path("report.html"),
    no_images: Annotated[bool, typer.Option("--no-images", help="skip the image strips")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="replace an existing report")] = True,
):
    """Write one self-contained HTML report: energy/confidence histograms, curation, training curves.

    Example: `energytools report runs/quickstart --out runs/quickstart/report.html`
    """
    from .stages.report import report

    report(paths, out, overwrite=overwrite, thumbnails=not no_images)


@command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="a pipelines/*.toml recipe")],
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/<recipe name>)")] = None,
    start: Annotated[Optional[str], typer.Option("--from", help="re-run from this stage: train, score, augment, distill, report")] = None,
    force: Annotated[bool, typer.Option("--force", help="re-run every stage")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, run nothing")] = False,
):
    """Run a whole pipeline recipe (train? -> score -> augment -> distill -> report), skipping up-to-date stages.

    Example: `energytools run pipelines/quickstart.toml --out runs/quickstart`
    """
    from .pipeline import run_pipeline

    run_pipeline(recipe, out or Path("runs") / recipe.stem, start, force, dry_run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
