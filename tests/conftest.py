import gzip
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

# Several test processes share the CPUs (pytest-xdist): their share of torch threads each, set before torch
# starts its pool. Idle OpenMP threads spin-wait, so workers whose pools together exceed the
# cores slow each other far more than their share (energytools.threads). Commands the tests
# start inherit it; an explicit OMP_NUM_THREADS, or a test's own, wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    if "torch" in sys.modules:  # a plugin imported it first: its pool is sized already
        sys.modules["torch"].set_num_threads(_THREADS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from energytools.data.synthetic import write_cifar  # noqa: E402

os.environ.setdefault("COLUMNS", "200")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_root(tmp_path):
    """A tiny Fashion-MNIST in the real idx.gz format: class c images are brighter bands."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 300), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 4, :] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def cifar_root(tmp_path):
    """CIFAR-10 (100 training images) and CIFAR-100 (400) side by side, random pixels."""
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar"
    write_cifar(root, 10, 100, 20, rng)
    return write_cifar(root, 100, 400, 100, rng)


class StepRecorder:
    """An ``on_step`` callback (energytools.engine.StepEvent) that keeps every step's batch;
    ``die_in_epoch=E`` raises KeyboardInterrupt at the first step of 0-based epoch E, as a
    Ctrl-C there would (last.pt then holds E epochs)."""

    def __init__(self, die_in_epoch: int | None = None):
        self.batches, self.die_in_epoch = [], die_in_epoch

    def __call__(self, event) -> None:
        if event.epoch == self.die_in_epoch:
            raise KeyboardInterrupt
        self.batches.append(event.batch)

    @property
    def steps(self) -> list:
        """``(images, SampleInfo)`` of each distill step, as the distiller received them."""
        return [(batch.images, batch.extras["sample_info"]) for batch in self.batches]


def interrupted(run, epoch: int = 2):
    """``run(on_step=...)`` killed by a KeyboardInterrupt in 0-based ``epoch`` (default: the third)."""
    with pytest.raises(KeyboardInterrupt):
        run(on_step=StepRecorder(die_in_epoch=epoch))


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    from energytools.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def session_threads():
    import torch

    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def torch_threads_restored(session_threads):
    """Every test starts and ends with the thread count (and OMP_NUM_THREADS) the session began
    with, whatever a test or a module's fixture changed (a study's in-process run sets 1): later
    tests compare tables' recorded thread counts with it."""
    import torch

    threads, omp = session_threads

    def restore():
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if os.environ.get("OMP_NUM_THREADS") != omp:
            os.environ.pop("OMP_NUM_THREADS", None) if omp is None else os.environ.update(OMP_NUM_THREADS=omp)

    restore()
    yield
    restore()


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A teacher trained on digits, its train table (with logits) and HE-DA shards: shared by tests."""
    from energytools.config import AugmentConfig, DataConfig, ScoreConfig, TrainConfig, TrainStageConfig
    from energytools.stages.augment import augment
    from energytools.stages.score import score
    from energytools.stages.train import train

    root = tmp_path_factory.mktemp("digits")
    data = DataConfig(dataset="digits")
    train(TrainStageConfig(model="cnn_small", out=str(root / "teacher"), data=data,
                           train=TrainConfig(epochs=3, lr=0.05, seed=0)))
    scores = score(ScoreConfig(teacher=str(root / "teacher" / "best.pt"), out=str(root / "scores.parquet"),
                               save_logits=True))
    shards = augment(AugmentConfig(scores=str(scores), out=str(root / "he-da"), ratio=0.3, shard_size=200))
    return {"root": root, "teacher": root / "teacher" / "best.pt", "scores": scores, "shards": shards}


def energytools_command(*args) -> list[str]:
    """``python -m energytools ARGS`` as a subprocess argument list."""
    return [sys.executable, "-m", "energytools", *map(str, args)]


def signal_when(args, ready, signum=signal.SIGTERM, timeout=180, program=None) -> subprocess.CompletedProcess:
    """Run ``energytools ARGS`` (or ``program + ARGS``; one torch thread), send ``signum`` once
    ``ready()`` holds (it must not finish first), and wait for it to end; a scheduler's stop or,
    with SIGKILL, a crash."""
    command = [*program, *map(str, args)] if program else energytools_command(*args)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a suite started in the background: its children
        signal.signal(signal.SIGINT, signal.default_int_handler)  # would ignore SIGINT too (inherited across exec)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"finished before the signal: {process.stderr.read()[-800:]}")
        assert time.time() < deadline, "never reached the signal point"
        time.sleep(0.005)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
