"""The `energytools` command: a thin layer of options over the stage functions."""
from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import os
import sys
import tempfile
import traceback
import typing
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from .errors import UserError, options_as_flags
from .preemption import Interrupted, Stopped

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
DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM, errno.EFBIG}


def handle_errors(fn):
    """Bad input -> one line on stderr, exit 2; a bug -> one line naming the traceback file, exit 1.
    While the command runs, messages name options as flags, torch computes with the threads
    --threads chose, and the stop signals are handled (energytools.preemption)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import preemption, threads

        try:
            with preemption.handling(preemption.chosen), options_as_flags(), \
                    threads.using(threads.chosen[0], interop=preemption.owns_process()):
                result = fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Stopped as exc:  # a scheduler's stop signal, handled at a safe point
            print(f"energytools: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except UserError as exc:
            print(f"energytools: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except BrokenPipeError:  # the reader went away (`energytools models | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                _internal_error(exc)
            where = f" {exc.filename}" if exc.filename else ""
            also = f" (to {exc.filename2})" if exc.filename2 else ""
            print(f"energytools: error: cannot write{where}{also}: {exc.strerror}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            advice = str(exc) if isinstance(exc, Interrupted) else "re-run the same command to resume"
            print(f"energytools: interrupted; {advice}", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001
            from .distributed import as_rank_lost

            lost = as_rank_lost(exc)  # a peer gone inside a collective no energytools code wraps (DDP's backward)
            if lost is not None:
                print(f"energytools: error: {lost}", file=sys.stderr)
                raise typer.Exit(2) from None
            _internal_error(exc)
        late = preemption.stop_requested()
        if late is not None:  # it came after the last safe point: the command finished all the same
            print(f"energytools: {preemption.signal_name(late)} came as the command finished; its output is "
                  "complete (a training run re-run with --resume says so)", file=sys.stderr)
        return result
    return wrapper


@app.callback()
def main_options(
    stop_signal: Annotated[Optional[list[str]], typer.Option(
        "--stop-signal", metavar="SIGNAL", envvar="ENERGYTOOLS_STOP_SIGNAL",
        help="also stop cleanly on this signal (usr1, usr2, hup; repeatable), as on SIGTERM: SLURM's "
             "`--signal=USR1@120` warns ahead of the deadline. A stopped stage saves where it is, prints how to "
             "resume and exits with 128 + the signal's number (SIGTERM: 143, SIGUSR1: 138)")] = None,
    collective_timeout: Annotated[Optional[float], typer.Option(
        "--collective-timeout", metavar="SECONDS", envvar="ENERGYTOOLS_COLLECTIVE_TIMEOUT",
        help="under torchrun: how long a rank waits in a collective for the others before it stops with one "
             "line (a rank died) [default: 600]")] = None,
    dist_backend: Annotated[Optional[str], typer.Option(
        "--dist-backend", metavar="BACKEND", envvar="ENERGYTOOLS_DIST_BACKEND",
        help="under torchrun: the process group's backend: auto (nccl for --device cuda, gloo otherwise), gloo "
             "(ranks may share a GPU) or nccl [default: auto]")] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", metavar="N", envvar="ENERGYTOOLS_THREADS",
        help="torch's CPU threads (intra-op; inter-op too). Default: an explicit OMP_NUM_THREADS, else the CPUs "
             "this process may use (its affinity mask, capped by a cgroup CPU quota). Two processes that share "
             "the CPUs run faster with their counts adding up to at most the CPUs")] = None,
):
    """Energy scores, HE-DA curation and Energy KD for knowledge distillation."""
    from . import preemption
    from . import threads as thread_count
    from .distributed import BACKEND_ENV, BACKENDS, TIMEOUT_ENV, collective_timeout as read_timeout

    try:
        preemption.chosen[:] = preemption.parse_signals(stop_signal)
        if threads is not None and threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        thread_count.chosen[0] = thread_count.choose(threads)
        if collective_timeout is not None:
            if not collective_timeout > 0:
                raise UserError(f"--collective-timeout must be positive, got {collective_timeout:g}")
            os.environ[TIMEOUT_ENV] = str(collective_timeout)  # read when the process group starts
        read_timeout()  # a bad ENERGYTOOLS_COLLECTIVE_TIMEOUT is one line here too
        if dist_backend is not None:
            if dist_backend not in BACKENDS:
                raise UserError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got {dist_backend!r}")
            os.environ[BACKEND_ENV] = dist_backend  # read when the process group starts
    except UserError as exc:
        print(f"energytools: error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


def command(name: str | None = None, **kwargs):
    def decorator(fn):
        return app.command(name, **kwargs)(handle_errors(fn))
    return decorator


# --- stage commands: one option per config field ---------------------------------------------

def _cli_option(spec, hint, panel: str | None) -> tuple[object, object]:
    """(annotation, default) of the typer parameter for one config field."""
    from .options import _optional, flag as option_flag

    base, _ = _optional(hint)
    flag = option_flag(spec.name)
    required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
    shown = None if required or spec.default is dataclasses.MISSING else spec.default
    if isinstance(shown, tuple):
        shown = ",".join(map(str, shown)) if shown else None
    help_text = spec.metadata.get("help", "")
    show = str(shown) if shown is not None else False
    metavar = METAVARS.get(base)
    if base is bool:
        kind, names = Optional[bool], [f"{flag}/--no-{flag[2:]}"]
        show = show and flag[2:] if shown else show and f"no-{flag[2:]}"
    elif typing.get_origin(base) is tuple and typing.get_args(base)[0] is str:
        kind, names, metavar = Optional[list[str]], [flag], "TEXT"
        help_text += "" if "repeatable" in help_text else " (repeatable)"
    elif typing.get_origin(base) is tuple:
        kind, names, metavar = Optional[str], [flag], "LIST"
        help_text += " (comma-separated)"
    else:
        kind, names = Optional[base], [flag]
    if required:  # checked by resolve(), so that --config may give it too
        help_text += " [required]"
    elif show:  # typer would print a string default in parentheses: "(scores.parquet)"
        help_text += f" [default: {show}]"
    return Annotated[kind, typer.Option(*names, help=help_text, show_default=False, metavar=metavar,
                                        rich_help_panel=panel or "Options")], None


#: how --help names a value of each type (the generated signatures would otherwise show <str>)
METAVARS = {str: "TEXT", int: "INTEGER", float: "NUMBER", bool: " "}


CONFIG_PANEL = "Config file"
ConfigFile = Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help="a TOML file of this command's options; "
                                                    "flags override it", rich_help_panel=CONFIG_PANEL)]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="print the resolved options as TOML (what --config "
                                           "reads) and exit without running", rich_help_panel=CONFIG_PANEL)]


def stage_command(name: str, config_class, run: Callable, doc: str) -> None:
    """Register ``energytools NAME``: every field of ``config_class`` (nested configs flattened)
    is an option with the dataclass's default, and ``--config FILE`` sets any of them from TOML;
    the resolved config goes to ``run``, as the Python API and recipes do."""
    from .config import as_dict, flat_fields, overrides, resolve
    from .options import check_all, flat_panels, to_toml

    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigFile),
              inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=PrintConfig)]
    panels = flat_panels(config_class)
    for spec, hint in flat_fields(config_class):
        annotation, default = _cli_option(spec, hint, panels[spec.name])
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))

    def command(config: Path | None = None, print_config: bool = False, **flags):
        values = _read_config_file(config) if config else {}
        if values:  # what is wrong in the file is named with the file
            resolve(config_class, values, f"--config {config}", partial=True)
        values.update(overrides(**flags))
        resolved = resolve(config_class, values, f"energytools {name}")
        if print_config:
            check_all(resolved)
            typer.echo(to_toml(as_dict(resolved)))
            return
        run(resolved)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = f"{name}_command"
    app.command(name)(handle_errors(command))


def _read_config_file(path: Path) -> dict:
    import tomllib

    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"--config {path} is a directory; pass a TOML file") from None
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: not valid TOML: {exc}") from None


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


def _register_stages() -> None:
    from .config import AugmentConfig, DistillConfig, LabelIssuesConfig, ScoreConfig, SelectConfig, TrainStageConfig
    from .stages import augment, distill, label_issues, score, select, train

    def call_stage(module, name: str) -> Callable:
        """The stage function, looked up when the command runs (so a replaced one is the one run)."""
        return lambda cfg: getattr(module, name)(cfg)

    stage_command("train", TrainStageConfig, call_stage(train, "train"),
                  "Train a model with cross-entropy: how a teacher is made, and the no-distillation baseline.\n\n"
                  "Example: `energytools train --dataset fashion-mnist --model resnet20 --epochs 15 --out runs/teacher`")
    stage_command("score", ScoreConfig, call_stage(score, "score"),
                  "Score every sample with the teacher: energy, confidence, groups and temperatures to Parquet.\n\n"
                  "Example: `energytools score --teacher runs/teacher/best.pt --out runs/scores.parquet`")
    stage_command("distill", DistillConfig, call_stage(distill, "distill"),
                  "Distill a student from the teacher, with per-sample temperatures read from the score table.\n\n"
                  "Example: `energytools distill --scores runs/scores.parquet --student cnn_small --method energy-kd "
                  "--shards runs/he-da --out runs/energy-kd`")
    stage_command("select", SelectConfig, call_stage(select, "select"),
                  "Select the highest-energy fraction (curation only): prints count, class histogram, energy "
                  "range.\n\nExample: `energytools select --scores runs/scores.parquet --ratio 0.3 --out "
                  "runs/selected.parquet`")
    stage_command("augment", AugmentConfig, call_stage(augment, "augment"),
                  "Materialize HE-DA shards: augment the highest-energy samples and score them with the teacher."
                  "\n\nExample: `energytools augment --scores runs/scores.parquet --ratio 0.3 --out runs/he-da`")
    stage_command("label-issues", LabelIssuesConfig, call_stage(label_issues, "label_issues"),
                  "Find likely label errors with cleanlab from the table's stored logits: label quality, suggested "
                  "label and confident learning's flag per sample (needs `pip install 'energytools[cleanlab]'`)."
                  "\n\nExample: `energytools label-issues --scores runs/scores.parquet --out runs/label-issues.parquet`")


_register_stages()


@command("report")
def report_command(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="run directories or files (score tables, shard dirs, runs)", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="the HTML file")] = Path("report.html"),
    no_images: Annotated[bool, typer.Option("--no-images", help="skip the image strips")] = False,
    overwrite: Annotated[Optional[bool], typer.Option(
        "--overwrite/--no-overwrite", help="replace an existing OUT whatever it is / never (default: replace "
        "only a report energytools wrote)")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="configuration, run or method the runs are compared "
                                                         "with (default: kd)")] = None,
    label_issues: Annotated[Optional[list[Path]], typer.Option(
        "--label-issues", metavar="FILE", help="a label-issues file (`energytools label-issues`): a section with "
        "the flagged samples per class, the most suspicious images and the given -> suggested class pairs "
        "(repeatable)")] = None,
    ood: Annotated[Optional[list[Path]], typer.Option(
        "--ood", metavar="TABLE", help="a table scored with `score --reference` (new data): its OOD scores over its "
        "reference's validation scores, with the thresholds (repeatable)")] = None,
    known_ood: Annotated[Optional[list[Path]], typer.Option(
        "--known-ood", metavar="TABLE", help="as --ood, for a table of inputs known to be out of distribution: also "
        "AUROC and FPR at the threshold's TPR of the energy, msp and max-logit scores (repeatable)")] = None,
):
    """Write one self-contained HTML report: runs compared (mean ± std over seeds, paired Δ), energy/confidence
    histograms, score tables compared, curation, label issues, training curves.

    Example: `energytools report runs/quickstart --out runs/quickstart/report.html`;
    `energytools report teacher-a.parquet teacher-b.parquet` compares two score tables;
    `energytools report --ood new.parquet --known-ood svhn.parquet` shows out-of-distribution scores.
    """
    from .stages.report import report

    if not paths and not ood and not known_ood:
        raise UserError("report needs paths (run directories or files), or --ood/--known-ood tables")
    report(paths or [], out, overwrite=overwrite, thumbnails=not no_images, baseline=baseline,
           label_issues=label_issues or [], ood=ood or (), known_ood=known_ood or ())


@command("export")
def export_command(
    source: Annotated[Path, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="a run directory (its best.pt) or a "
                                           "checkpoint")],
    fmt: Annotated[str, typer.Option("--format", help="file format: onnx")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(help="the file to write (default: student.onnx beside the "
                                                     "checkpoint)")] = None,
    check_samples: Annotated[int, typer.Option("--check-samples", metavar="N", help="validation images of the "
                                               "run's dataset the export is checked on")] = 256,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT")] = False,
):
    """Export a trained model for deployment (ONNX, dynamic batch), checked with onnxruntime on the run's
    validation images (needs `pip install 'energytools[export]'`).

    Example: `energytools export runs/quickstart/energy-kd --format onnx --out student.onnx`
    """
    from .stages.export import export

    export(source, out, fmt, check_samples, opset, overwrite)


@command("profile")
def profile_command(
    paths: Annotated[list[Path], typer.Argument(metavar="RUN...", help="run directories or checkpoints")],
    out: Annotated[Optional[Path], typer.Option(help="write the rows to this .parquet or .json file (the report "
                                                     "reads the .parquet)")] = None,
    onnx: Annotated[Optional[list[Path]], typer.Option("--onnx", metavar="FILE", help="an exported file to time "
                                                       "too (repeatable; a .onnx beside a checkpoint, exported "
                                                       "from it, is found without this)")] = None,
    teacher: Annotated[bool, typer.Option("--teacher/--no-teacher", help="profile the runs' teacher too")] = True,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", metavar="LIST", help="batch sizes timed "
                                             "(comma-separated)")] = "1,64",
    warmup: Annotated[int, typer.Option(help="untimed calls before the timed ones")] = 5,
    runs: Annotated[int, typer.Option(help="timed calls per measurement (median and IQR reported)")] = 20,
    threads: Annotated[Optional[int], typer.Option(help="torch and onnxruntime intra-op threads "
                                                        "[default: torch's]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT")] = False,
):
    """Size and speed of trained models: parameters, MACs, checkpoint size, latency at each batch size in
    PyTorch eager and onnxruntime, for the runs and their teacher.

    Example: `energytools profile runs/quickstart/kd runs/quickstart/energy-kd --out runs/profile.parquet`
    """
    from .stages.profile import ProfileProtocol, parse_batch_sizes, profile

    protocol = ProfileProtocol(parse_batch_sizes(batch_sizes), warmup, runs, threads)
    profile(paths, out, onnx=onnx or [], teacher=teacher, protocol=protocol, overwrite=overwrite)


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
    """The ``energytools`` command. A usage error (an unknown command or option, a value of the
    wrong type, a missing argument) is one line naming it and exit 2, as every other bad input."""
    if len(sys.argv) <= 1:
        app()  # no command: the help
        return
    from . import preemption

    preemption.own_process()  # a stop signal while this process exits after its command does not kill it
    try:
        code = app(standalone_mode=False)  # click's errors are raised here instead of printed as a box
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C before a command started
        print("energytools: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):  # not click's: a bug
            raise
        context = getattr(exc, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None and exc.exit_code == 2 else ""
        print(f"energytools: error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
