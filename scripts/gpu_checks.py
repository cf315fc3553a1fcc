"""The checks of `make gpu-check` (scripts/gpu_check.py runs each in its own process), in order.

Each check is a small function of a :class:`Context` that returns its key figure (PASS), or
raises :class:`Skip` or :class:`Fail` with a reason. A check that needs CUDA says "no CUDA" on a
machine without it, after running a CPU stand-in where one is cheap (its command lines, so a dry
run finds a wrong flag before device time does). Data: synthetic CIFAR-10 (random pixels,
energytools.data.synthetic); the teacher trains a few steps: the checks are about correctness
and host synchronisations, not accuracy.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "scripts" / "gpu_probes"
WHEELS = ROOT / ".gpu-wheels"
#: |energy(cuda) - energy(cpu)| allowed for a float32 (TF32 off) table
ENERGY_TOLERANCE = 1e-4
#: energies from two JPEG decoders (their IDCT and resize rounding), as tests/test_data.py allows
DECODE_TOLERANCE = 1e-2
#: what the checks import; the environment check fails unless each imports after the install
NEEDED_IMPORTS = ("energytools.cli", "energytools.stages.distill", "energytools.stages.score", "polars", "pyarrow",
                  "numpy", "pytest")


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIPPED
    reason: str = ""
    seconds: float = 0.0
    key: str = ""
    detail: dict = field(default_factory=dict)

    def line(self) -> str:
        status = f"{self.status} ({self.reason})" if self.reason else self.status
        return f"{self.name} | {status} | {self.seconds:.1f} s | {self.key}"


class Skip(Exception):
    """The check did not apply here (the reason says why)."""


class Fail(Exception):
    """The check found something wrong (the reason says what)."""


@dataclass(frozen=True)
class Sizes:
    train: int  # synthetic CIFAR-10 training images written
    test: int
    table: int  # samples the teacher trains on and the table holds: a short and a long run use half and all
    eval: int  # val and test samples
    batch: int
    teacher: str
    student: str
    teacher_epochs: int

    @property
    def short(self) -> int:
        return self.table // 2


GPU_SIZES = Sizes(train=2000, test=200, table=1024, eval=200, batch=64, teacher="resnet8", student="resnet8",
                  teacher_epochs=2)
CPU_SIZES = Sizes(train=500, test=100, table=128, eval=32, batch=32, teacher="resnet8", student="cnn_tiny",
                  teacher_epochs=1)


@dataclass
class Context:
    work: Path
    out: Path
    cuda: bool
    quick: bool = False
    dry: bool = False
    deadline: float | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def sizes(self) -> Sizes:
        return GPU_SIZES if self.cuda else CPU_SIZES

    @property
    def teacher(self) -> Path:
        return self.work / "teacher" / "best.pt"

    @property
    def table(self) -> Path:
        return self.work / "scores.parquet"

    def data_args(self, limit: int | None = None) -> list:
        return ["--dataset", "cifar10", "--data-root", self.work / "data", "--limit", limit or self.sizes.table,
                "--eval-limit", self.sizes.eval]

    def distill_args(self, out: str, *extra, keep: str = "short") -> list[str]:
        """A one-epoch distill on the table's ``keep`` half ("short") or all of it ("long")."""
        return [str(a) for a in ("distill", "--scores", self.table, "--student", self.sizes.student, "--epochs", 1,
                                 "--batch-size", self.sizes.batch, "--sync-every", 0, "--device", self.device,
                                 "--keep", self.work / f"keep-{keep}.parquet", "--out", self.work / out, *extra)]

    def need_teacher(self) -> None:
        if not (self.teacher.exists() and self.table.exists()):
            raise Skip("needs the teacher check's teacher and table, which it did not make")

    def run(self, command: list, what: str, cwd: Path = ROOT) -> int:
        """Run ``command`` (output to the log) until the check's deadline; its exit status."""
        command = [str(part) for part in command]
        print(f"$ {shlex.join(command)}", flush=True)
        process = subprocess.Popen(command, cwd=cwd)
        try:
            return process.wait(timeout=None if self.deadline is None else max(1.0, self.deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()  # torchrun's workers go with the check's process group
            raise Fail(f"{what}: out of time") from None

    def energytools(self, *args, what: str | None = None, wrapper: list | None = None, expect: int = 0,
                    in_process: bool = False) -> None:
        """`python -m energytools ARGS` (or ``wrapper`` ARGS), which must exit with ``expect``;
        ``in_process``: in this process instead, sparing a start (the setup steps of a quick run)."""
        if in_process:
            code = _energytools_here([str(a) for a in args])
        else:
            code = self.run([sys.executable, *(wrapper or ["-m", "energytools"]), *args], what or str(args[0]))
        if code != expect:
            raise Fail(f"{what or args[0]}: exit status {code} (expected {expect}); see the log")

    def torchrun(self, processes: int, *args) -> list:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", processes, *args]


def _energytools_here(args: list[str]) -> int:
    from energytools.cli import main

    print(f"$ energytools {shlex.join(args)}  (in the check's process)", flush=True)
    saved, sys.argv = sys.argv, ["energytools", *args]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


@dataclass(frozen=True)
class Check:
    name: str
    #: the key figure of a PASS, or (key figure, details for the runner); raises Skip or Fail
    run: Callable[[Context], str | tuple[str, dict]]
    timeout_s: int


CHECKS: list[Check] = []


def check(name: str, timeout_s: int):
    def register(fn):
        CHECKS.append(Check(name, fn, timeout_s))
        return fn
    return register


def run_in_child(name: str, ctx: Context) -> int:
    """Run check ``name``; its :class:`Result` goes to WORK/results/NAME.json for the runner."""
    chosen = next(c for c in CHECKS if c.name == name)
    started = time.time()
    detail: dict = {}
    try:
        key = chosen.run(ctx)
        if isinstance(key, tuple):
            key, detail = key
        result = Result(name, "PASS", key=key)
    except Skip as exc:
        result = Result(name, "SKIPPED", str(exc))
    except Fail as exc:
        result = Result(name, "FAIL", str(exc))
    except Exception as exc:  # noqa: BLE001 - a check's own bug is a failure with its traceback in the log
        traceback.print_exc()
        result = Result(name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    result.seconds, result.detail = time.time() - started, detail
    (ctx.work / "results" / f"{name}.json").write_text(json.dumps(asdict(result)))
    return 0


def read_table(path: Path, *columns: str) -> dict:
    """Columns of a Parquet table sorted by sample_id, as NumPy arrays (pyarrow: no polars needed)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["sample_id", *columns]).sort_by("sample_id")
    return {name: table[name].to_numpy() for name in ["sample_id", *columns]}


def load_weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# --- a. the environment --------------------------------------------------------------------

@check("environment", timeout_s=90)
def environment(ctx: Context):
    """Python, torch, CUDA, cuDNN, the GPU and its driver; what the machine lacks comes from the
    wheelhouse, installed into WORK/site (first on every check's PYTHONPATH)."""
    try:
        import packaging  # noqa: F401 - the wheel tags and version rules below
    except ImportError:  # pure Python: importable from its wheel as it is
        sys.path.insert(0, str(next(WHEELS.glob("packaging-*.whl"))))
    from packaging.tags import sys_tags

    import gpu_wheels

    installed = {gpu_wheels.canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                 if d.metadata["Name"]}
    manifest_path = WHEELS / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    import tomllib

    wanted = [*tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"], "pytest"]
    plan, problems = gpu_wheels.plan_install(manifest, installed, wanted, list(sys_tags()))
    if plan:
        install(ctx, [WHEELS / file for file in plan.values()])
    for name, why in problems.items():
        print(f"environment: {name}: {why}", flush=True)
    importlib.invalidate_caches()  # WORK/site, on this process's path from its start, has just been filled
    for module in NEEDED_IMPORTS:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = "; ".join(f"{name}: {why}" for name, why in problems.items())
            raise Fail(f"cannot import {module} ({exc}){'; ' + missing if missing else ''}") from None

    import torch

    cuda = torch.cuda.is_available()
    found = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
             "torchvision": _version("torchvision"), "cuda": torch.version.cuda if cuda else None,
             "cudnn": torch.backends.cudnn.version() if cuda else None,
             "gpu": torch.cuda.get_device_name(0) if cuda else None,
             "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
             "bf16": torch.cuda.is_bf16_supported(including_emulation=False) if cuda else None,
             "nccl": nccl_version() if cuda else None,
             "driver": _driver() if cuda else None, "gpus": torch.cuda.device_count(),
             "from_wheelhouse": {name: manifest["carried"][name]["version"] for name in plan},
             "still_missing": problems, "packages": {name: installed.get(name) for name in sorted(
                 gpu_wheels.dependency_closure(wanted, lambda n: _requires(n, installed)))}}
    (ctx.out / "gpu-check-environment.json").write_text(json.dumps(found, indent=1) + "\n")
    print(json.dumps(found, indent=1), flush=True)
    gpu = f"{found['gpu']} (sm {found['capability']}, driver {found['driver']}), CUDA {found['cuda']}, " \
          f"cuDNN {found['cudnn']}, NCCL {found['nccl']}, bf16 {found['bf16']}" if cuda else "no CUDA"
    carried = ", ".join(f"{n} {v}" for n, v in found["from_wheelhouse"].items()) or "nothing"
    lacking = f"; absent: {', '.join(problems)}" if problems else ""
    key = (f"python {found['python']}, torch {found['torch']}, torchvision {found['torchvision']}, {gpu}; "
           f"installed from the wheelhouse: {carried}{lacking}")
    return key, {"cuda": cuda}


def install(ctx: Context, wheels: list[Path]) -> None:
    """``wheels`` into WORK/site with pip (no index, no dependencies: the plan has them), or
    unpacked as they are where this Python has no pip (what --target does for these wheels)."""
    site = ctx.work / "site"
    if importlib.util.find_spec("pip") is None:
        import zipfile

        for wheel in wheels:
            print(f"no pip here: unpacking {wheel.name} into {site}", flush=True)
            zipfile.ZipFile(wheel).extractall(site)
        return
    code = ctx.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--target", site, *wheels], "pip install")
    if code:
        raise Fail(f"pip could not install {', '.join(w.name for w in wheels)}; see the log")


def nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requires(name: str, installed: dict) -> list[str]:
    return (importlib.metadata.requires(name) or []) if name in installed else []


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


# --- the teacher and its table, for the checks after it -------------------------------------

@check("teacher", timeout_s=120)
def teacher(ctx: Context) -> str:
    """Synthetic CIFAR-10, a small teacher trained a few steps, its table with 2 views a sample,
    and the two halves of the table (keep-short, keep-long) that the runs of two lengths train on."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from energytools.data.synthetic import write_cifar

    sizes = ctx.sizes
    write_cifar(ctx.work / "data", 10, sizes.train, sizes.test, np.random.default_rng(0))
    ctx.energytools("train", "--model", sizes.teacher, *ctx.data_args(), "--epochs", sizes.teacher_epochs,
                    "--batch-size", sizes.batch, "--device", ctx.device, "--out", ctx.work / "teacher",
                    in_process=True)
    ctx.energytools("score", "--teacher", ctx.teacher, *ctx.data_args(), "--views", 2, "--batch-size", sizes.batch,
                    "--device", ctx.device, "--out", ctx.table, in_process=True)
    ids = read_table(ctx.table)["sample_id"]
    for name, chosen in (("short", ids[:sizes.short]), ("long", ids)):
        pq.write_table(pa.table({"sample_id": pa.array(chosen, pa.int64())}), ctx.work / f"keep-{name}.parquet")
    metrics = read_table(ctx.table, "energy")
    return (f"{sizes.teacher} on {sizes.table} synthetic CIFAR-10 images, {sizes.teacher_epochs} epochs on "
            f"{ctx.device}; table {len(ids)} rows x 2 views, energy {metrics['energy'].min():.2f} to "
            f"{metrics['energy'].max():.2f}")


# --- b. float32 energies: cuda against cpu --------------------------------------------------

@check("score-cuda-vs-cpu", timeout_s=90)
def score_cuda_vs_cpu(ctx: Context) -> str:
    """`score --device cuda` (float32, TF32 off) gives the CPU's energies to 1e-4."""
    if not ctx.cuda:
        raise Skip("no CUDA")
    ctx.need_teacher()
    tables = {}
    for device in ("cuda", "cpu"):
        tables[device] = ctx.work / f"score-{device}.parquet"
        ctx.energytools("score", "--teacher", ctx.teacher, *ctx.data_args(), "--device", device, "--out",
                        tables[device], what=f"score --device {device}")
    return compare_energies(tables, ENERGY_TOLERANCE, "energy cuda - cpu")


def compare_energies(tables: dict, tolerance: float, what: str) -> str:
    """The cuda table's energies against the cpu table's, at most ``tolerance`` apart (the key
    line names ``what`` was compared); Fail otherwise."""
    cuda, cpu = (read_table(tables[d], "energy", "pred") for d in ("cuda", "cpu"))
    if not (cuda["sample_id"] == cpu["sample_id"]).all():
        raise Fail("the two tables hold different samples")
    difference = float(abs(cuda["energy"].astype("float64") - cpu["energy"]).max())
    key = (f"max |{what}| {difference:.2e} over {len(cpu['energy'])} samples "
           f"(tolerance {tolerance:g}); predictions differ on {int((cuda['pred'] != cpu['pred']).sum())}")
    if not difference <= tolerance:
        raise Fail(key)
    return key


@check("decode-on-device", timeout_s=120)
def decode_on_device(ctx: Context) -> str:
    """`score --decode-on-device` on a JPEG folder (two sizes, a PNG read the default way): its
    energies on cuda (nvjpeg, the resize on the GPU) against the CPU's default decoder, to the
    tolerance of the decoders' rounding (DECODE_TOLERANCE, as torchvision against PIL)."""
    import numpy as np

    from energytools.data.synthetic import write_image_folder

    if not ctx.cuda:
        raise Skip("no CUDA")
    root = write_image_folder(ctx.work / "jpegs", {"train": 48, "val": 8},
                              lambda i: (40, 52) if i % 3 else (64, 48), np.random.default_rng(0),
                              lambda i: ("png", "PNG") if i == 1 else ("jpg", "JPEG"))
    data = ["--dataset", "imagefolder", "--data-root", root, "--image-size", 32]
    ctx.energytools("train", "--model", "cnn_tiny", *data, "--epochs", 1, "--device", "cpu", "--out",
                    ctx.work / "jpeg-teacher", in_process=True)
    tables = {}
    for name, extra in (("cuda", ["--device", "cuda", "--decode-on-device"]), ("cpu", ["--device", "cpu"])):
        tables[name] = ctx.work / f"decode-{name}.parquet"
        ctx.energytools("score", "--teacher", ctx.work / "jpeg-teacher" / "best.pt", *extra, "--out", tables[name],
                        what=f"score {' '.join(extra)}")
    return compare_energies(tables, DECODE_TOLERANCE, "energy (decoded on cuda) - cpu default")


# --- c. nccl on cuda tensors, DDP with no_sync ---------------------------------------------

@check("nccl", timeout_s=90)
def nccl(ctx: Context) -> str:
    """A one-rank nccl group under torchrun: collectives on cuda tensors and DDP's no_sync."""
    if not ctx.cuda:
        raise Skip("no CUDA")
    result = ctx.work / "nccl.json"
    if ctx.run(ctx.torchrun(1, PROBES / "nccl_ddp.py", result), "torchrun nccl"):
        raise Fail("the nccl probe failed; see the log")
    figures = json.loads(result.read_text())
    key = (f"NCCL {figures['nccl']}, world {figures['world']}: all_reduce {figures['all_reduce_ok']}, all_gather "
           f"{figures['all_gather_ok']}, broadcast {figures['broadcast_ok']}; DDP no_sync then sync: max |grad - "
           f"plain model's| {figures['ddp_no_sync_max_grad_difference']:.1e}")
    if not (figures["all_reduce_ok"] and figures["all_gather_ok"] and figures["broadcast_ok"]
            and figures["ddp_no_sync_max_grad_difference"] < 1e-5):
        raise Fail(key)
    return key


# --- e. fp16 with a GradScaler, forced -------------------------------------------------------

@check("fp16-gradscaler", timeout_s=90)
def fp16_gradscaler(ctx: Context) -> str:
    """As on a GPU without native bf16: distill trains fp16 with a GradScaler (saved in last.pt,
    the loss finite), and `score --amp` scores with fp16 logits (its energy error reported)."""
    if not ctx.cuda:
        raise Skip("no CUDA")
    ctx.need_teacher()
    wrapper = [PROBES / "force_fp16.py"]
    ctx.energytools(*ctx.distill_args("fp16", "--method", "kd", "--amp"), wrapper=wrapper, what="fp16 distill")
    scaler = load_weights(ctx.work / "fp16" / "last.pt").get("scaler") or {}
    if "scale" not in scaler:
        raise Fail(f"last.pt holds no GradScaler state ({scaler!r}): the run did not train fp16")
    loss = read_metrics(ctx.work / "fp16")["loss"][-1]
    if not loss == loss or loss in (float("inf"), float("-inf")):
        raise Fail(f"fp16 loss {loss}")
    ctx.energytools("score", "--teacher", ctx.teacher, *ctx.data_args(), "--amp", "--device", "cuda", "--out",
                    ctx.work / "score-fp16.parquet", wrapper=wrapper, what="fp16 score")
    fp16, f32 = read_table(ctx.work / "score-fp16.parquet", "energy"), read_table(ctx.table, "energy")
    error = abs(fp16["energy"].astype("float64") - f32["energy"])
    return (f"GradScaler scale {float(scaler['scale']):g}, loss {loss:.4f}; score --amp in fp16: energy error max "
            f"{error.max():.2e}, mean {error.mean():.2e}")


def read_metrics(run: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(run / "metrics.parquet").to_pydict()


# --- d. no host synchronisation per step -----------------------------------------------------

#: distill configurations, each run at two lengths under the sync counter: one per method and option family
SYNC_CONFIGS = {
    "dkd": ["--method", "dkd"],
    "energy-dkd-online-heda": ["--method", "energy-dkd", "--he-da", "online"],
    "ctkd-ema": ["--method", "ctkd", "--ema-decay", "0.9"],
    "kd-accumulate": ["--method", "kd", "--accumulate", "2"],
    "adamw-clip-cosine": ["--method", "energy-kd", "--optimizer", "adamw", "--clip-grad", "1.0", "--schedule",
                          "cosine"],
    "cached-views": ["--method", "energy-kd", "--cached-logits", "--temperature-source", "views"],
    "dtkd-standardized": ["--method", "dtkd", "--standardize-logits"],
}
#: reads each batch's energies on the host by design: its count must grow with the steps
SYNC_CONTROL = ("control-online-temperatures", ["--method", "energy-kd", "--temperature-source", "online"])


def sync_runs(ctx: Context, lengths: tuple[str, ...]) -> list[dict]:
    """The runs of the sync check, the long one of each first (a first-use synchronisation then
    shows as growth instead of hiding a per-step one)."""
    runs = [{"name": "warm-up", "length": "short", "args": ctx.distill_args("sync/warm-up", *SYNC_CONFIGS["dkd"])}] \
        if ctx.cuda else []  # CUDA's first-use synchronisations land here
    limits = {"short": ctx.sizes.short, "long": ctx.sizes.table}
    for length in lengths:
        runs.append({"name": "train", "length": length, "args": [str(a) for a in (
            "train", "--model", ctx.sizes.student, *ctx.data_args(limits[length]), "--epochs", 1, "--batch-size",
            ctx.sizes.batch, "--sync-every", 0, "--device", ctx.device, "--out", ctx.work / f"sync/train-{length}")]})
        runs.append({"name": "score-views", "length": length, "args": [str(a) for a in (
            "score", "--teacher", ctx.teacher, *ctx.data_args(limits[length]), "--views", 2, "--batch-size",
            ctx.sizes.batch, "--device", ctx.device, "--out", ctx.work / f"sync/score-{length}.parquet")]})
    for name, options in [*SYNC_CONFIGS.items(), SYNC_CONTROL]:
        for length in lengths:
            runs.append({"name": name, "length": length,
                         "args": ctx.distill_args(f"sync/{name}-{length}", *options, keep=length)})
    return runs


@check("sync-per-step", timeout_s=240)
def sync_per_step(ctx: Context) -> str:
    """Under set_sync_debug_mode("warn"): train and every distill configuration make as many host
    synchronisations at 2N steps as at N (none per step); the online-temperature control makes more."""
    ctx.need_teacher()
    lengths = ("long", "short") if ctx.cuda or not ctx.quick else ("short",)
    (ctx.work / "sync").mkdir(exist_ok=True)
    spec, result = ctx.work / "sync-spec.json", ctx.work / "sync-result.json"
    spec.write_text(json.dumps(sync_runs(ctx, lengths)))
    code = ctx.run([sys.executable, PROBES / "sync_count.py", spec, result, *["--cuda"] * ctx.cuda], "sync counter")
    runs = json.loads(result.read_text()) if result.exists() else []
    failed = [f"{r['name']} ({r['length']}): exit {r['exit']}" for r in runs if r["exit"] != 0]
    if code or failed or len(runs) != len(json.loads(spec.read_text())):
        raise Fail("; ".join(failed) or f"the sync counter stopped (exit {code}) after {len(runs)} runs; see the log")
    if not ctx.cuda:
        raise Skip(f"no CUDA; its {len(runs)} command lines ran on the cpu")
    return judge_syncs(runs, steps_added=(ctx.sizes.table - ctx.sizes.short) // ctx.sizes.batch)


def judge_syncs(runs: list[dict], steps_added: int) -> str:
    """PASS when no configuration's count grows from the short run to the long one (``steps_added``
    more steps) and the control's does; the growing ones named, with where their syncs came from."""
    count = {(r["name"], r["length"]): r for r in runs}
    growth = {name: count[name, "long"]["syncs"] - count[name, "short"]["syncs"]
              for name in ["train", *SYNC_CONFIGS, SYNC_CONTROL[0]]}
    grew = [name for name in ["train", *SYNC_CONFIGS] if growth[name] > 0]
    control = growth[SYNC_CONTROL[0]]
    score = count["score-views", "long"]["syncs"] - count["score-views", "short"]["syncs"]
    key = (f"{len(SYNC_CONFIGS) + 1} runs x 2 lengths (+{steps_added} steps): growth "
           + ", ".join(f"{name} {growth[name]:+d}" for name in ["train", *SYNC_CONFIGS])
           + f"; control {control:+d}; score --views {score:+d} for +{steps_added} batches (logits to the host)")
    for name in grew:
        print(f"sync-per-step: {name} grew by {growth[name]}; where (long run): {count[name, 'long']['origins']}")
    if grew:
        raise Fail(f"host syncs grow with the steps in {', '.join(grew)} (where: the log); " + key)
    if control < steps_added // 2:
        raise Fail(f"the control's count did not grow (so the counter sees nothing); {key}")
    return key


# --- f. two ranks on one GPU over gloo ---------------------------------------------------------

@check("two-ranks-gloo", timeout_s=150)
def two_ranks_gloo(ctx: Context) -> str:
    """`torchrun --nproc-per-node 2 -m energytools --dist-backend gloo distill --device cuda`: DDP,
    CTKD's temperature all-reduce, EMA and checkpoint barriers; both ranks end with equal weights."""
    if not ctx.cuda and ctx.quick:
        raise Skip("no CUDA; the 2-rank cpu stand-in is left out of a quick run")
    ctx.need_teacher()
    has_option = "--dist-backend" in subprocess.run([sys.executable, "-m", "energytools", "--help"],
                                                    capture_output=True, text=True, env={**os.environ,
                                                                                         "COLUMNS": "200"}).stdout
    if ctx.cuda and not has_option:
        raise Fail("this energytools has no --dist-backend: two ranks cannot share the GPU over gloo yet")
    backend = ["--dist-backend", "gloo"] if has_option else []  # the cpu's default anyway
    digests = ctx.work / "digests"
    args = ctx.distill_args("two-ranks", "--method", "ctkd", "--ema-decay", "0.9", "--checkpoint-every-steps", 2)
    code = ctx.run(ctx.torchrun(2, PROBES / "rank_digest.py", digests, *backend, *args), "torchrun 2 ranks")
    if code:
        raise Fail(f"torchrun with 2 ranks: exit status {code}; see the log")
    found = {path.stem: path.read_text().split() for path in sorted(digests.glob("rank*.txt"))}
    if sorted(found) != ["rank0", "rank1"]:
        raise Fail(f"expected a digest from rank0 and rank1, got {sorted(found)}")
    if found["rank0"] != found["rank1"]:
        raise Fail(f"the ranks' weights differ: {found['rank0'][0][:12]} against {found['rank1'][0][:12]}")
    key = f"2 ranks over gloo, ctkd + EMA: equal weights ({found['rank0'][1]} tensors, sha256 {found['rank0'][0][:12]})"
    if not ctx.cuda:
        raise Skip(f"no CUDA; the cpu stand-in agreed: {key}")
    return key


# --- g. a mid-epoch stop and --resume ---------------------------------------------------------------

@check("resume-mid-epoch", timeout_s=150)
def resume_mid_epoch(ctx: Context) -> str:
    """SIGTERM inside the second epoch (after optimizer step K), then --resume: with --deterministic
    the weights equal an uninterrupted run's, model and EMA alike."""
    if ctx.quick:
        raise Skip("quick run: left out; tests/test_preemption.py covers the cpu")
    ctx.need_teacher()
    steps_per_epoch = -(-ctx.sizes.short // ctx.sizes.batch)
    stop_after = steps_per_epoch + 1
    options = ["--method", "energy-dkd", "--he-da", "online", "--ema-decay", "0.9", "--epochs", 2,
               "--deterministic", "--checkpoint-every-steps", 2]
    ctx.energytools(*ctx.distill_args("resume-whole", *options), what="the uninterrupted run")
    stopped = ctx.distill_args("resume-stopped", *options)
    ctx.energytools(*stopped, wrapper=[PROBES / "stop_after_steps.py", stop_after], expect=143,
                    what=f"SIGTERM after step {stop_after}")
    position = load_weights(ctx.work / "resume-stopped" / "last.pt").get("position") or {}
    if (position.get("epoch"), position.get("step")) != (1, 1):
        raise Fail(f"last.pt after the stop holds epoch/step {position.get('epoch')}/{position.get('step')}, "
                   "not 1/1 (0-based epoch)")
    ctx.energytools(*stopped, "--resume", what="--resume")
    whole = load_weights(ctx.work / "resume-whole" / "last.pt")
    resumed = load_weights(ctx.work / "resume-stopped" / "last.pt")
    import torch

    compared, unequal = 0, []
    for part in ("model", "ema"):
        for name, tensor in whole.get(part, {}).items():
            compared += 1
            if not torch.equal(tensor, resumed[part][name]):
                unequal.append(f"{part}.{name} (max |diff| {(tensor.float() - resumed[part][name].float()).abs().max():.1e})")
    if unequal:
        raise Fail(f"{len(unequal)} of {compared} tensors differ after the resume: {', '.join(unequal[:3])}")
    return (f"stopped after step {stop_after} (epoch 2, step 1 of {steps_per_epoch}; exit 143), resumed: all "
            f"{compared} tensors (model and EMA) equal the uninterrupted run's, on {ctx.device}")


# --- h. the GPU tests --------------------------------------------------------------------------------

@check("gpu-tests", timeout_s=240)
def gpu_tests(ctx: Context) -> str:
    """tests/test_gpu_readiness.py and tests/test_gpu_benchmark.py with this machine's CUDA; the
    digits test needs scikit-learn and is left out, saying so, where it is missing."""
    if ctx.quick:
        raise Skip("quick run: left out; the test suite runs these files itself")
    files = ["tests/test_gpu_readiness.py", "tests/test_gpu_benchmark.py"]
    deselect, notes = [], []
    if _version("scikit-learn") is None:
        deselect = ["--deselect", "tests/test_gpu_readiness.py::test_a_deterministic_run_saves_the_grad_scaler_for_resume"]
        notes.append("the digits test left out: no scikit-learn here")
    report = ctx.work / "pytest.xml"
    code = ctx.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}",
                    *deselect, *files], "pytest")
    counts = _junit_counts(report)
    key = f"{counts}{'; ' + '; '.join(notes) if notes else ''}"
    if code:
        raise Fail(f"pytest exit status {code}: {key}")
    return key


def _junit_counts(report: Path) -> str:
    import xml.etree.ElementTree as ElementTree

    if not report.exists():
        return "no report"
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, skipped = (int(suite.get(a, 0)) for a in ("tests", "failures", "skipped"))
    errors = int(suite.get("errors", 0))
    return f"{total - failed - errors - skipped} passed, {failed + errors} failed, {skipped} skipped"


# --- i. the benchmark --------------------------------------------------------------------------------

@check("benchmark", timeout_s=180)
def benchmark(ctx: Context) -> str:
    """benchmarks/gpu.py (score and distill against bare loops, the AMP energy error), its JSON in OUT."""
    if ctx.quick:
        raise Skip("quick run: benchmarks/gpu.py --smoke takes a minute on a small CPU")
    figures_path = ctx.out / "gpu-benchmark.json"
    size = ["--samples", 10000] if ctx.cuda else ["--smoke"]
    code = ctx.run([sys.executable, ROOT / "benchmarks" / "gpu.py", *size, "--device", ctx.device,
                    "--json", figures_path], "benchmarks/gpu.py", cwd=ROOT / "benchmarks")
    if code:
        raise Fail(f"benchmarks/gpu.py: exit status {code}; see the log")
    figures = json.loads(figures_path.read_text())
    return (f"{figures['device']}: score {figures['score']['stage_images_per_s']:.0f} img/s "
            f"({figures['score']['stage_over_bare']:.2f} of bare), distill "
            f"{figures['distill_kd_cached_views']['stage_images_per_s']:.0f} img/s "
            f"({1 / figures['distill_kd_cached_views']['stage_over_bare_time']:.2f} of bare), AMP energy error max "
            f"{figures['amp_energy_error']['max_abs']:.2e}; {figures_path.name}")
