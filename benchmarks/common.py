"""Helpers shared by the benchmark scripts (not part of the package)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import energytools.optim as optim
from energytools.config import DataConfig
from energytools.models import create_model, save_checkpoint
from energytools.engine import model_meta


def benchmark_teacher(path: Path, arch: str = "resnet20", limit: int | None = None) -> Path:
    """A Fashion-MNIST teacher checkpoint with random weights: speed does not depend on them."""
    data = DataConfig(dataset="fashion-mnist", limit=limit)
    dataset = data.build("train")
    info = dataset.info
    torch.manual_seed(0)
    model = create_model(arch, info.num_classes, info.in_channels, info.image_size)
    save_checkpoint(path, model, model_meta(arch, dataset, data))
    return path


def machine() -> str:
    cores = os.cpu_count()
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {cores} cores{memory}, {gpu}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {date.today()}")


def command() -> str:
    """This invocation exactly as it was typed: ``python`` and ``sys.argv``, quoted for a shell."""
    return "python " + shlex.join(sys.argv)


#: the code whose identity a run records: the package's sources (what trains, scores and selects)
PACKAGE = Path(optim.__file__).resolve().parent
#: the folders whose uncommitted changes make a checkout "dirty" for a study (its docs are not code)
CODE_PATHS = ("energytools", "benchmarks")


def sources_sha256(package: Path = PACKAGE) -> str:
    """sha256 over the package's Python sources: every ``*.py`` under ``package``, by relative
    path and content, in path order (two trees with the same sources give the same digest)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_identity(package: Path = PACKAGE) -> dict:
    """Which code this process runs: ``commit`` (the HEAD of the git checkout holding
    ``package``; "<sha>-dirty" when the package or the benchmarks beside it have uncommitted
    changes; None outside a git checkout), the package ``version`` and ``sources_sha256``
    (:func:`sources_sha256`), which decides whether two runs were made by the same code (a
    commit that changes only docs keeps it)."""
    from energytools.version import __version__

    root = package.parent
    head = _git(root, "rev-parse", "--verify", "HEAD") if _git(root, "rev-parse", "--show-toplevel") else None
    if head is not None and _git(root, "status", "--porcelain", "--", *CODE_PATHS):
        head += "-dirty"
    return {"commit": head, "version": __version__, "sources_sha256": sources_sha256(package)}


def code_label(code: dict | None) -> str:
    """How records name the code: its commit, else the package version and its sources' digest."""
    if not code:
        return "not recorded"
    if code.get("commit"):
        return code["commit"]
    return f"energytools {code.get('version')} (sources sha256 {str(code.get('sources_sha256'))[:16]})"


def record(wall_seconds: float, code: dict | None = None, outcome: str | None = None) -> dict:
    """What a study writes beside each table: the command, the machine, the date, the wall time,
    the code that ran (:func:`code_label`) and, when given, how the invocation ended."""
    line = {"command": command(), "machine": machine(), "date": str(date.today()), "seconds": round(wall_seconds, 1),
            "commit": code_label(code or code_identity())}
    return {**line, "outcome": outcome} if outcome else line


def record_lines(records: list[dict]) -> list[str]:
    """Markdown lines for the invocations that made a table (one per invocation, in order); the
    commit and the outcome where the record has them (records older than issue 39 do not)."""
    lines = []
    for r in records:
        lines.append(f"Command: `{r['command']}`  ")
        ran = f"; commit `{r['commit']}`" if r.get("commit") else ""
        ended = f"; {r['outcome']}" if r.get("outcome") and r["outcome"] != "finished" else ""
        lines.append(f"Machine: {r['machine']}; date {r['date']}; wall time {r['seconds'] / 60:.1f} min{ran}{ended}.  ")
    if len(records) > 1:
        lines.append(f"Wall time of the {len(records)} invocations: {sum(r['seconds'] for r in records) / 60:.1f} min.")
    return lines


def delta_stats(deltas: np.ndarray) -> dict | None:
    """Mean, std, n and wins (positive) of paired differences; None below two pairs."""
    if len(deltas) < 2:
        return None
    return {"mean": float(deltas.mean()), "std": float(deltas.std(ddof=1)), "n": len(deltas),
            "wins": int((deltas > 0).sum())}


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def emit(name: str, figures: dict, out: Path | None) -> None:
    """Print the figures and write them as JSON for run_all.py."""
    print(json.dumps({"benchmark": name, **figures}, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": name, "machine": machine(), **figures}, indent=2))


def teacher_check(table: Path) -> str:
    """One sentence on the teacher over a score table: accuracy, Spearman(energy, confidence),
    and each energy group's confidence and accuracy (from the table's summary)."""
    from energytools.table import TableMeta

    s = TableMeta.read(table).summary
    groups = "; ".join(f"{g['energy_group']}: confidence {g['mean_confidence']:.3f}, accuracy {g['accuracy']:.1f}%"
                       for g in s["groups"])
    return (f"{s['samples']} samples, teacher accuracy {s['accuracy']:.2f}%, Spearman(energy, confidence) "
            f"{s['spearman_energy_confidence']:.3f}; {groups}.")


def check_table(table: Path, teacher: Path | None, data: DataConfig, views: int = 0) -> None:
    """Refuse (one line, exit) to reuse a score table made from another teacher, other data or
    another number of views than the ones passed now; its metadata is the provenance."""
    import dataclasses

    from energytools.io import sha256_file
    from energytools.table import TableMeta

    meta = TableMeta.read(table)
    found = []
    if teacher is not None and meta.teacher.sha256 != sha256_file(teacher):
        found.append(f"teacher {meta.teacher.path} (not {teacher})")
    ours, theirs = dataclasses.asdict(data), dataclasses.asdict(meta.data)
    found += [f"{k} {theirs.get(k)!r} (not {v!r})" for k, v in ours.items() if k != "data_root" and theirs.get(k) != v]
    if (meta.views.count if meta.views else 0) != views:
        found.append(f"{meta.views.count if meta.views else 0} views (not {views})")
    if found:
        raise SystemExit(f"{table} was made with {', '.join(found)}: remove it or pass another --out")


def replace_block(doc: Path, name: str, body: str, heading: str = "## Notes") -> None:
    """Write ``body`` between ``<!-- name: begin -->`` and ``<!-- name: end -->`` in the Markdown
    file ``doc``, replacing what was there; a first block goes right under ``heading``."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    elif heading in text:
        at = text.index(heading) + len(heading)
        text = text[:at] + "\n\n" + block + "\n" + text[at:]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    temporary = doc.with_name(f".{doc.name}.tmp")  # a reader never sees half a doc
    temporary.write_text(text)
    os.replace(temporary, doc)


#: epoch start times noted by the "timed" schedule (a constant learning rate): a benchmark
#: calls :func:`start_clock`, runs energytools with ``schedule="timed"`` and reads its epochs off it
EPOCH_STARTS: list[float] = []
#: when each engine epoch ended (the next one's first ask, before a paired bare epoch runs)
EPOCH_ENDS: list[float] = []
#: seconds of the bare epochs run between the engine's epochs (:func:`start_clock`'s ``between``)
BETWEEN_SECONDS: list[float] = []
_BETWEEN: list = []  # the callable that runs one bare epoch, if any


_NOTED: list = []  # the epoch of the last stamp


def start_clock(between=None) -> None:
    """Clear the stamps. With ``between`` (a callable running one epoch of a bare loop), the
    "timed" schedule runs it at the start of every engine epoch, first one included, and
    :data:`BETWEEN_SECONDS` gets its times: each engine epoch is paired with a bare epoch run
    right before it, so a slow spell of a shared machine hits both members of a pair."""
    for stamps in (EPOCH_STARTS, EPOCH_ENDS, BETWEEN_SECONDS, _NOTED):
        stamps.clear()
    _BETWEEN[:] = [between] if between is not None else []


def stop_clock() -> None:
    """Stamp the end of the last engine epoch (call it when the run returns)."""
    EPOCH_ENDS.append(time.perf_counter())


def _timed_schedule(epoch, cfg) -> float:
    """The schedule is asked for the lr at every step's fractional epoch: note the first ask of
    each whole epoch only."""
    if float(epoch).is_integer() and (not _NOTED or _NOTED[-1] != epoch or not EPOCH_STARTS):
        if EPOCH_STARTS and torch.cuda.is_available():
            torch.cuda.synchronize()  # the epoch before has finished on the device too
        if EPOCH_STARTS:
            EPOCH_ENDS.append(time.perf_counter())
        for run_bare_epoch in _BETWEEN:
            started = time.perf_counter()
            run_bare_epoch()
            BETWEEN_SECONDS.append(time.perf_counter() - started)
        EPOCH_STARTS.append(time.perf_counter())
        _NOTED[:] = [epoch]
    return 1.0


def engine_epoch_seconds() -> list[float]:
    """Seconds of each engine epoch with an end stamp (a paired bare epoch's time left out)."""
    return [end - start for start, end in zip(EPOCH_STARTS, EPOCH_ENDS)]


def fastest_epoch(stamps: list[float]) -> float:
    """Seconds of the fastest epoch from epoch-start stamps, leaving out the first epoch
    (warm-up) and the last (whose end has no stamp): the least disturbed by other load."""
    return min(b - a for a, b in zip(stamps[1:-1], stamps[2:]))


def paired_ratios(engine: list[float], bare: list[float]) -> list[float]:
    """Engine epoch k over the bare epoch run just before it, the warm-up pair (k = 0) left out."""
    return [e / b for e, b in list(zip(engine, bare))[1:]]


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    q25, q50, q75 = np.quantile(np.asarray(values, dtype=float), [0.25, 0.5, 0.75])
    return float(q25), float(q50), float(q75)


optim.SCHEDULES["timed"] = _timed_schedule
