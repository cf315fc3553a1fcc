"""A model outside energytools: export to a file format (a registry; ONNX for now), run the
exported file, count multiply-accumulates and time a callable by a fixed protocol.

Modules and arrays in, files and numbers out: the stages (``stages/export.py``,
``stages/profile.py``) find the checkpoint, the dataset and the preprocessing; nothing here
knows about runs.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError

#: the pip extra that brings onnx and onnxruntime
EXPORT_EXTRA = "export"

#: ONNX opset written by default: 17 is read by every onnxruntime since 1.14
DEFAULT_OPSET = 17

#: the graph's input and output names (the metadata names them too)
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def require(module: str, extra: str = EXPORT_EXTRA, what: str = "export and profile"):
    """``import module``, or one line naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} need {module}: pip install 'energytools[{extra}]'") from None


@dataclass(frozen=True)
class ExportFormat:
    """One file format a model exports to: how to write it and how to run what was written."""

    name: str
    suffix: str
    modules: tuple[str, ...]  # what it needs installed (from the ``export`` extra)
    write: Callable  # write(model, example, path, metadata: dict[str, str], opset) -> None
    runner: Callable  # runner(path, threads) -> (float32 NCHW array -> logits array)
    describe: str

    def require(self) -> None:
        for module in self.modules:
            require(module)


FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def export_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise UserError(f"unknown export format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


#: the operator named in torch.onnx's errors ("Exporting the operator 'aten::foo' to ONNX opset ...")
OPERATOR = re.compile(r"operator '?([\w.]+::[\w.]+)'?")


def unsupported_operator(exc: BaseException) -> str | None:
    """The operator a failed export names, e.g. ``aten::special_bessel_j0``; None if it names none."""
    match = OPERATOR.search(str(exc))
    return match.group(1) if match else None


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
               opset: int = DEFAULT_OPSET) -> None:
    """``model`` (eval mode, on the CPU) to ONNX at ``path`` with a dynamic batch dimension and
    ``metadata`` in the model's metadata_props.

    torch's TorchScript-based exporter (``dynamo=False``): it needs only the ``onnx`` package
    (the torch.export-based default of torch >= 2.9 also needs onnxscript), exports the CNNs of
    the zoo, timm and transformers in about a second and names the operator it cannot map.
    """
    onnx = require("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as exc:  # noqa: BLE001 - what the exporter cannot do is a property of the model
            op = unsupported_operator(exc)
            if op is not None:
                raise UserError(f"cannot export to ONNX: operator {op} is not supported at opset {opset} "
                                "(try another --opset, or replace that layer)") from None
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise UserError(f"cannot export to ONNX: {type(exc).__name__}: {first[:300]}") from None
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def onnx_runner(path: Path | str, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function that runs the ONNX file on a float32 NCHW batch with onnxruntime's CPU provider,
    on ``threads`` intra-op threads (default: onnxruntime's choice)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: np.ascontiguousarray(images, dtype=np.float32)})[0]


def onnx_metadata(path: Path | str) -> dict[str, str]:
    """The metadata_props of an ONNX file (what :func:`write_onnx` recorded)."""
    onnx = require("onnx")
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


register_format(ExportFormat("onnx", ".onnx", ("onnx", "onnxruntime"), write_onnx, onnx_runner,
                             "ONNX with a dynamic batch dimension (torch.onnx, TorchScript exporter)"))


def compare_logits(expected: np.ndarray, got: np.ndarray) -> dict:
    """How far ``got`` is from ``expected`` (N, classes): the largest absolute difference and
    the number of rows whose arg-max differs."""
    expected, got = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
    return {"samples": int(expected.shape[0]), "max_abs_diff": float(np.abs(expected - got).max(initial=0.0)),
            "argmax_disagree": int((expected.argmax(1) != got.argmax(1)).sum())}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example``: torch's FlopCounterMode counts
    FLOPs (a multiply-add is two), so MACs are FLOPs / 2; ops it has no formula for (pooling,
    activations, normalisation) count as zero, as in fvcore and ptflops."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(example)
    return counter.get_total_flops() // 2


def timings(fn: Callable[[], object], warmup: int, runs: int) -> dict:
    """The fixed protocol: ``warmup`` untimed calls, then ``runs`` timed ones; milliseconds
    per call as the median, the quartiles and the interquartile range."""
    if warmup < 0 or runs < 1:
        raise UserError(f"timing needs warm-up >= 0 and runs >= 1, got {warmup} and {runs}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    q1, median, q3 = (np.percentile(samples, [25, 50, 75]) if runs > 1 else (samples[0],) * 3)
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "mean_ms": statistics.fmean(samples)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(threads: int) -> dict:
    """Where timings were taken: CPU model, cores, torch threads, load average and versions."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads, "load_average": load,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort_version}


def metadata_text(value) -> str:
    """A metadata_props value: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)
