"""Outputs that survive a kill: run directories (train, distill) and outputs written as parts
across torchrun ranks (score's parts, augment's shards), resumed where they stopped."""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator

from .distributed import Context, collective_timeout, context
from .errors import UserError, option_name
from .preemption import RESUME_RUN, START_AGAIN, Interrupted
from .io import WriteError, check_output_path, disk_error, remove_partial_files, run_lock, write_error, write_json

#: the file that says which configuration a directory's parts belong to, while they are written
KEY_FILE = ".key"


@dataclass
class PartsWork:
    """This rank's share of a resumable output: the part files it owns and those still missing."""

    directory: Path
    mine: list[str]
    todo: list[str]
    ctx: Context

    def gather(self) -> bool:
        """Wait until every rank has written its parts; True on the rank that finishes the output."""
        self.ctx.barrier()
        return self.ctx.is_main


@contextlib.contextmanager
def resumable_parts(output: Path, directory: Path, key: str, names: list[str],
                    restart: bool = False, finish_seconds: float | None = None) -> Iterator[PartsWork]:
    """Lock ``output`` and yield what this rank still has to write of the part files ``names``.

    ``directory`` holds the parts; ``key`` names what their content depends on, so parts left
    by a run with another key (or all of them, with ``restart``) are deleted first, and so are
    half-written files. A non-empty directory without a key file is not energytools' and is
    refused unless ``restart`` (the caller has checked it is its own finished output). Rank r
    writes names r, r + world, ... Leaving the block removes the key file (the output is
    complete); the other ranks wait for rank 0 to finish the output (merge the parts) up to
    ``finish_seconds`` (default: the collective timeout), a budget the caller sizes to that work.
    """
    ctx = context()
    with run_lock(output) if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:
            key_file = directory / KEY_FILE
            if directory.exists():
                ours = key_file.is_file()
                if not ours and not restart and any(directory.iterdir()):
                    raise UserError(f"{directory} exists and was not written by energytools; move it away or "
                                    f"choose another {option_name('out')}")
                if restart or not ours or key_file.read_text() != key:
                    shutil.rmtree(directory)
            directory.mkdir(parents=True, exist_ok=True)
            remove_partial_files(directory)
            key_file.write_text(key)
        ctx.barrier()
        mine = names[ctx.rank::ctx.world]
        yield PartsWork(directory, mine, [n for n in mine if not (directory / n).exists()], ctx)
        if ctx.is_main and directory.exists():
            (directory / KEY_FILE).unlink(missing_ok=True)
        ctx.wait_for_main("writing the output", finish_seconds or collective_timeout())


def check_resumed_config(out: Path, config: dict, may_change: Collection[str] = ()) -> None:
    """Refuse to resume the run in ``out`` with a config other than the one it was started with
    (its config.json): one line naming what differs. Options that do not change a run's output
    are not in either config; the dotted keys in ``may_change`` may differ (the options marked
    ``resume_may_change``, :func:`energytools.options.resume_may_change_keys`, and what the
    stage derives from them)."""
    recorded_path = out / "config.json"
    if not recorded_path.is_file():
        return
    try:
        recorded = json.loads(recorded_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{option_name('resume')}: {recorded_path} is not readable JSON; pass "
                        f"{option_name('overwrite', True)} to start again") from None
    changed = changed_options(recorded, config, may_change)
    if changed:
        raise UserError(f"{option_name('resume')}: {out} was started with {'; '.join(changed[:3])}"
                        + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                        + f"; pass the options it was started with, or {option_name('overwrite', True)} to start "
                          "again")


def changed_options(recorded: dict, config: dict, may_change: Collection[str] = ()) -> list[str]:
    """``"key old (now new)"`` for each option of ``config`` that differs from the ``recorded``
    one (JSON, as config.json holds it), but the dotted keys in ``may_change``."""
    wanted = json.loads(json.dumps(config, default=str))  # as config.json holds it
    return [f"{key} {old!r} (now {new!r})" for key, old, new in _differences(recorded, wanted) if key not in may_change]


def _differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for each leaf that differs between two JSON dicts. A
    key one side lacks does not count: an option another version of energytools added or removed."""
    found = []
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found


def first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


@contextlib.contextmanager
def run_directory(out: Path, resume: bool, overwrite: bool, config: dict,
                  may_change: Collection[str] = ()) -> Iterator[bool]:
    """Lock and prepare a training run directory; yields whether this rank writes files.

    Refuses an ``out`` that is a file or lies under one, ``resume`` with no run to resume, a
    finished run without ``overwrite``, and ``resume`` with a config that differs from the
    run's in more than the keys ``may_change`` (:func:`check_resumed_config`). A run that fails
    before its first checkpoint leaves nothing behind: the folders it created are removed.
    """
    ctx = context()
    ctx.check_same(config, "run config")
    check_output_path(out, directory=True)
    checkpoint = out / "last.pt"
    if resume and not checkpoint.exists():
        raise UserError(f"{option_name('resume')}: {out} holds no run to resume (no last.pt)")
    if checkpoint.exists() and not resume and not overwrite:
        raise UserError(f"{out} already holds a run: pass {option_name('resume', True)} to continue it (a finished run "
                        f"then says it is complete) or {option_name('overwrite', True)} to replace it")
    if resume:
        check_resumed_config(out, config, may_change)
    created = first_missing(out) if ctx.is_main else None
    try:
        with run_lock(out) if ctx.is_main else contextlib.nullcontext():
            try:
                if ctx.is_main:
                    if checkpoint.exists() and not resume:
                        shutil.rmtree(out)
                    out.mkdir(parents=True, exist_ok=True)
                    write_json(out / "config.json", config)
                ctx.barrier()
                yield ctx.is_main
            except BaseException:
                # under the lock: a process refused it must not remove the folder another one is writing
                if created is not None and not checkpoint.exists():
                    shutil.rmtree(created, ignore_errors=True)
                raise
    except BaseException as exc:
        # what the user runs next: the same command alone is refused once last.pt exists
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):  # Ctrl-C: what now
            raise Interrupted(RESUME_RUN if checkpoint.exists() else START_AGAIN) from None
        if isinstance(exc, OSError) and disk_error(exc):  # one not raised by an atomic write (a folder)
            exc = write_error(exc, exc.filename or out, "")
        if isinstance(exc, WriteError):  # a full or read-only disk
            raise exc.advise(RESUME_RUN if checkpoint.exists() else "re-run the same command to start again") from None
        raise
