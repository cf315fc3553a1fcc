"""SIGKILL a stage at several points; the re-run completes and equals an uninterrupted run.

These use the real Fashion-MNIST (installed by `make test`) and a resnet8 teacher with random
weights, so each stage runs long enough to be killed midway.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import signal_when

from energytools.config import DataConfig
from energytools.data.loaders import SYSTEM_FASHION_MNIST
from energytools.models import create_model, save_checkpoint
from energytools.resume import KEY_FILE
from energytools.engine import model_meta

pytestmark = pytest.mark.skipif(not SYSTEM_FASHION_MNIST.exists(),
                                reason="Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")
LIMIT = 3000
#: 12 score parts and 12 HE-DA shards of LIMIT samples: kills land early, midway and at the last one
PART_SIZE, SHARD_SIZE = 256, 125


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "energytools", *map(str, args)]


def run_and_kill(args, ready, timeout=120) -> None:
    """Start the command, SIGKILL it as soon as ``ready()`` is true (it must not finish first)."""
    signal_when(args, ready, signal.SIGKILL, timeout)


def run(*args) -> subprocess.CompletedProcess:
    result = subprocess.run(cli(*args), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    data = DataConfig(dataset="fashion-mnist", limit=LIMIT, eval_limit=500)
    torch.manual_seed(0)
    save_checkpoint(path, create_model("resnet8", 10, 1, 28), model_meta("resnet8", data.build("train"), data))
    return path


@pytest.fixture(scope="module")
def clean_scores(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "scores.parquet"
    run("score", "--teacher", teacher, "--out", out, "--part-size", PART_SIZE, "--save-logits")
    return out


def augment_args(scores, out, workers) -> tuple:
    return ("augment", "--scores", scores, "--ratio", 0.5, "--shard-size", SHARD_SIZE, "--out", out,
            "--workers", workers)


@pytest.fixture(scope="module")
def clean_shards(clean_scores, tmp_path_factory):
    """Uninterrupted shards, by one worker: every interrupted run, with any number of workers, must end equal to them."""
    out = tmp_path_factory.mktemp("clean-shards") / "shards"
    run(*augment_args(clean_scores, out, 1))
    return out


def assert_same_files(out: Path, clean: Path) -> None:
    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def parts(out: Path) -> list[Path]:
    return sorted((out.parent / f"{out.name}.parts").glob("part-*.parquet"))


@pytest.mark.parametrize("kill_after_parts", [0, 5, 11])  # early, midway, at the last part
def test_score_survives_sigkill(teacher, clean_scores, tmp_path, kill_after_parts):
    out = tmp_path / "scores.parquet"
    args = ("score", "--teacher", teacher, "--out", out, "--part-size", PART_SIZE, "--save-logits")
    if kill_after_parts == 0:
        run_and_kill(args, lambda: (out.parent / f"{out.name}.parts" / KEY_FILE).exists())
    else:
        run_and_kill(args, lambda: len(parts(out)) >= kill_after_parts)
    assert not out.exists()  # never a partial file under the final name
    run(*args)
    assert out.read_bytes() == clean_scores.read_bytes()
    assert not (out.parent / f"{out.name}.parts").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_augment_survives_sigkill(clean_scores, clean_shards, tmp_path, workers):
    """With 2 workers the killed process leaves a worker behind, which must go too: the re-run
    needs the output's lock."""
    def args(out):
        return augment_args(clean_scores, out, workers)

    out = tmp_path / "killed"
    run_and_kill(args(out), lambda: len(list(out.glob("train-*.parquet"))) >= 3)
    assert not (out / "manifest.json").exists()
    for shard in out.glob("train-*.parquet"):
        pq.read_table(shard)  # every file under a final name is whole
    # what a kill in the middle of writing a shard leaves (this run's kill may or may not have)
    (out / ".tmp-train-00000-of-00012.parquet.x1y2z3").write_bytes(b"half a shard")
    run(*args(out))
    assert_same_files(out, clean_shards)


def test_distill_resumes_to_the_same_weights(clean_scores, tmp_path):
    def args(out, *extra):
        return ("distill", "--scores", clean_scores, "--student", "cnn_tiny", "--method", "energy-kd",
                "--cached-logits", "--epochs", 3, "--eval-limit", 500, "--out", out, "--device", "cpu", *extra)

    run(*args(tmp_path / "clean"))
    out = tmp_path / "killed"
    run_and_kill(args(out), lambda: (out / "metrics.parquet").exists())
    run(*args(out, "--resume"))
    a = torch.load(tmp_path / "clean" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stuck_lock(teacher, tmp_path):
    out = tmp_path / "scores.parquet"
    # four times the teacher's images: the first writer is still at work when the second has started
    args = ("score", "--teacher", teacher, "--out", out, "--part-size", PART_SIZE, "--limit", 4 * LIMIT)
    process = subprocess.Popen(cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not parts(out):
            assert process.poll() is None
            time.sleep(0.01)
        second = subprocess.run(cli(*args), capture_output=True, text=True)
        assert second.returncode == 2 and "being written by another energytools process" in second.stderr
        assert process.poll() is None, "the first writer finished before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    run(*args)  # the kernel released the dead process's lock
    assert out.exists()


def one_stop_line(result) -> str:
    assert result.returncode == 143, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("energytools:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_score_stops_on_sigterm_and_resumes(teacher, clean_scores, tmp_path):
    out = tmp_path / "scores.parquet"
    args = ("score", "--teacher", teacher, "--out", out, "--part-size", PART_SIZE, "--save-logits")
    line = one_stop_line(signal_when(args, lambda: len(parts(out)) >= 3))
    assert "parts scored" in line and "re-run the same command" in line
    assert not out.exists() and 3 <= len(parts(out)) < 12
    for part in parts(out):
        pq.read_table(part)  # the part being scored was dropped, not half-written
    run(*args)
    assert out.read_bytes() == clean_scores.read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_augment_stops_on_sigterm_and_resumes(clean_scores, clean_shards, tmp_path, workers):
    def args(out):
        return augment_args(clean_scores, out, workers)

    out = tmp_path / "stopped"
    line = one_stop_line(signal_when(args(out), lambda: len(list(out.glob("train-*.parquet"))) >= 2))
    assert "shards written" in line and not (out / "manifest.json").exists()
    assert not list(out.glob(".tmp-*"))  # a clean stop leaves no half-written shard
    run(*args(out))
    assert_same_files(out, clean_shards)
