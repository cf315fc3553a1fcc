"""`energytools profile`: how big and how fast trained models are, students and their teacher.

Per model: parameters, MACs (FLOPs / 2 from torch's FlopCounterMode, one image), the
checkpoint's size on disk, the test accuracy the run recorded, and latency at each batch size in
PyTorch eager (CPU, float32, inference mode) and in onnxruntime when an exported file is found.
Every latency follows one protocol (:class:`ProfileProtocol`): warm-up calls, then the median and
interquartile range of timed calls, on a stated number of threads; the machine is recorded.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import torch

from ..console import console, headline
from ..data import DatasetInfo
from ..deploy import count_macs, count_parameters, machine_record, onnx_metadata, onnx_runner, require, timings
from ..engine import TEST_PREDICTIONS
from ..errors import UserError
from ..io import atomic_path, check_output_free
from ..models import adapt_to_dataset, load_model
from ..table import read_parquet, write_parquet
from .export import recorded_data, resolve_checkpoint

#: the ``kind`` of a profile file's metadata (the report finds profile files by it)
PROFILE_KIND = "profile"

#: the file suffixes --out takes
OUT_SUFFIXES = (".parquet", ".json")


@dataclass(frozen=True)
class ProfileProtocol:
    """How every latency is measured: ``warmup`` untimed calls, then ``runs`` timed calls per batch
    size; ``threads`` intra-op threads for torch and onnxruntime (None: torch's current number)."""

    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 5
    runs: int = 20
    threads: int | None = None

    def check(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UserError(f"--batch-sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.runs < 1:
            raise UserError(f"--runs must be at least 1, got {self.runs}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None


@dataclass
class Candidate:
    """A model to profile and what its run says about it."""

    role: str  # "student" or "teacher"
    name: str
    checkpoint: Path
    run_dir: Path | None
    test_acc: float | None = None
    method: str | None = None


def run_record(path: Path) -> Candidate:
    """A run directory or a checkpoint given on the command line, with the run's test accuracy."""
    checkpoint = resolve_checkpoint(path)
    run_dir = checkpoint.parent if path.is_dir() or checkpoint.name == "best.pt" else None
    name = run_dir.name if run_dir is not None else checkpoint.stem
    candidate = Candidate("student", name, checkpoint, run_dir)
    summary = run_dir / "summary.json" if run_dir is not None else None
    if summary is not None and summary.exists():
        recorded = json.loads(summary.read_text())
        candidate.test_acc, candidate.method = recorded.get("best_test_acc"), recorded.get("method")
    elif run_dir is not None:
        candidate.test_acc = predictions_accuracy(run_dir)
    return candidate


def predictions_accuracy(run_dir: Path) -> float | None:
    """Test accuracy (%) of best.pt from a run's test predictions (a `train` run has no summary.json)."""
    path = run_dir / TEST_PREDICTIONS
    if not path.exists():
        return None
    frame = read_parquet(path, ["label", "pred_best"])
    return float((frame["label"] == frame["pred_best"]).mean() * 100) if frame.height else None


def teacher_of(candidate: Candidate) -> Candidate | None:
    """The teacher a distill run records in its config.json (None for a run without one, or when
    the file is gone)."""
    if candidate.run_dir is None or not (candidate.run_dir / "config.json").exists():
        return None
    recorded = (json.loads((candidate.run_dir / "config.json").read_text()).get("teacher") or {}).get("path")
    if not recorded or not Path(recorded).is_file():
        return None
    path = Path(recorded)
    teacher = Candidate("teacher", f"teacher ({path.parent.name})", path, path.parent,
                        predictions_accuracy(path.parent))
    teacher.method = "teacher"
    return teacher


def dataset_info(checkpoint: Path, meta: dict) -> DatasetInfo:
    """The dataset the model is fed as the stages feed it: recorded in the checkpoint, else built."""
    recorded = meta.get("dataset_info")
    if recorded:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
        return DatasetInfo(**{k: v for k, v in fields.items() if k in DatasetInfo.__dataclass_fields__})
    return recorded_data(checkpoint).build("val").info


def exported_files(candidates: list[Candidate], given: list[Path]) -> dict[str, Path]:
    """Exported files by the sha256 of the checkpoint they came from: those given, and any .onnx
    beside a checkpoint (read only when onnx is installed)."""
    found: dict[str, Path] = {}
    for path in given:
        if not path.is_file():
            raise UserError(f"--onnx {path} does not exist")
        source = onnx_metadata(path).get("source_sha256")
        if not source:
            raise UserError(f"--onnx {path} does not record the checkpoint it came from (export it with "
                            "`energytools export`)")
        found[json.loads(source) if source.startswith('"') else source] = path
    beside = [p for c in candidates for p in sorted(c.checkpoint.parent.glob("*.onnx"))]
    if beside:
        try:
            require("onnx")
        except UserError:
            return found
        for path in beside:
            source = onnx_metadata(path).get("source_sha256")
            if source:
                found.setdefault(json.loads(source) if source.startswith('"') else source, path)
    return found


@torch.inference_mode()
def measure(candidate: Candidate, exported: dict[str, Path], protocol: ProfileProtocol) -> dict:
    """One row: size, MACs and latencies of ``candidate``."""
    model, meta = load_model(candidate.checkpoint)
    info = dataset_info(candidate.checkpoint, meta)
    model = adapt_to_dataset(model, meta, info).float().eval()
    shape = (info.in_channels, info.image_size, info.image_size)
    threads = torch.get_num_threads()
    sha = meta["sha256"]
    onnx_file = exported.get(sha)
    row = {"role": candidate.role, "run": candidate.name, "arch": meta.get("arch"), "method": candidate.method,
           "test_acc": candidate.test_acc, "params": count_parameters(model),
           "macs": count_macs(model, torch.zeros(1, *shape)),
           "checkpoint_mb": candidate.checkpoint.stat().st_size / 1e6, "input": "x".join(map(str, shape)),
           "threads": threads, "checkpoint": str(candidate.checkpoint), "sha256": sha,
           "onnx": str(onnx_file) if onnx_file else None}
    generator = torch.Generator().manual_seed(0)
    run_onnx = onnx_runner(onnx_file, threads) if onnx_file else None
    for batch in protocol.batch_sizes:
        images = torch.randn(batch, *shape, generator=generator)
        eager = timings(lambda x=images: model(x), protocol.warmup, protocol.runs)
        row[f"eager_b{batch}_ms"], row[f"eager_b{batch}_iqr_ms"] = eager["median_ms"], eager["iqr_ms"]
        if run_onnx is not None:
            array = images.numpy()
            onnx_times = timings(lambda x=array: run_onnx(x), protocol.warmup, protocol.runs)
            row[f"onnx_b{batch}_ms"], row[f"onnx_b{batch}_iqr_ms"] = onnx_times["median_ms"], onnx_times["iqr_ms"]
        else:
            row[f"onnx_b{batch}_ms"] = row[f"onnx_b{batch}_iqr_ms"] = None
    return row


def candidates_of(paths: list[Path], teacher: bool) -> list[Candidate]:
    """The models to profile: each path's, then the teachers they record (each checkpoint once)."""
    chosen = [run_record(Path(p)) for p in paths]
    if teacher:
        chosen += [t for t in (teacher_of(c) for c in chosen) if t is not None]
    unique: dict[Path, Candidate] = {}
    for c in chosen:
        unique.setdefault(c.checkpoint.resolve(), c)
    return list(unique.values())


def print_rows(frame: pl.DataFrame, protocol: ProfileProtocol) -> None:
    from rich.table import Table

    table = Table(title=f"latency ms: median (IQR) of {protocol.runs} runs after {protocol.warmup} warm-up, "
                        f"{frame['threads'][0]} thread(s)")
    columns = ["role", "run", "arch", "test %", "params", "MMACs", "ckpt MB"]
    for b in protocol.batch_sizes:
        columns += [f"eager b{b}", f"onnx b{b}"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("role", "run", "arch") else "right")
    for r in frame.iter_rows(named=True):
        cells = [r["role"], r["run"], str(r["arch"]), "—" if r["test_acc"] is None else f"{r['test_acc']:.2f}",
                 f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}", f"{r['checkpoint_mb']:.2f}"]
        for b in protocol.batch_sizes:
            for kind in ("eager", "onnx"):
                ms = r[f"{kind}_b{b}_ms"]
                cells.append("—" if ms is None else f"{ms:.2f} ({r[f'{kind}_b{b}_iqr_ms']:.2f})")
        table.add_row(*cells)
    console.print(table)


def profile(paths: list[Path | str], out: Path | str | None = None, onnx: list[Path | str] = (),
            teacher: bool = True, protocol: ProfileProtocol = ProfileProtocol(), overwrite: bool = False
            ) -> pl.DataFrame:
    """Profile the models of ``paths`` (run directories or checkpoints) and, with ``teacher``, the
    teacher each distill run records; prints the table and writes it to ``out`` (.parquet, whose
    metadata holds the machine and the protocol, or .json) when given. Returns the rows."""
    protocol.check()
    if out is not None:
        out = Path(out)
        if out.suffix not in OUT_SUFFIXES:
            raise UserError(f"--out {out} must end in {' or '.join(OUT_SUFFIXES)}")
        check_output_free(out, overwrite)
    if not paths:
        raise UserError("profile needs at least one run directory or checkpoint")
    candidates = candidates_of([Path(p) for p in paths], teacher)
    exported = exported_files(candidates, [Path(p) for p in onnx])
    previous = torch.get_num_threads()
    if protocol.threads is not None:
        torch.set_num_threads(protocol.threads)
    try:
        rows = []
        for candidate in candidates:
            console.print(f"profiling {candidate.role} {candidate.name} ({candidate.checkpoint})")
            rows.append(measure(candidate, exported, protocol))
    finally:
        torch.set_num_threads(previous)
    frame = pl.DataFrame(rows, infer_schema_length=None)
    machine = machine_record(int(frame["threads"][0]))
    print_rows(frame, protocol)
    load = machine["load_average"]
    console.print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average {load}; MACs = FLOPs / 2 "
                  "(torch.utils.flop_counter)")
    if out is not None:
        record = {"kind": PROFILE_KIND, "machine": machine, "protocol": asdict(protocol),
                  "macs": "FLOPs / 2 from torch.utils.flop_counter.FlopCounterMode, one image"}
        if out.suffix == ".json":
            with atomic_path(out) as tmp:
                tmp.write_text(json.dumps({**record, "rows": frame.to_dicts()}, indent=2) + "\n")
        else:
            write_parquet(frame, out, record)
        console.print(headline("done", f": wrote {out} ({frame.height} model(s))"))
    return frame


def read_profile(path: Path | str) -> pl.DataFrame:
    """The rows of a profile file (.parquet or .json)."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text()).get("rows") or []
        return pl.DataFrame(rows, infer_schema_length=None)
    return read_parquet(path)
