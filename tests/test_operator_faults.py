"""Faults an operator hits (issue 41): a third writer, advice that must work, a signal after
`done:`, a read-only output, API messages that name keywords, --threads. Real processes where
the fault needs them."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import energytools as et
from conftest import energytools_command, invoke
from energytools import preemption
from energytools.config import DataConfig, TrainConfig, TrainStageConfig
from energytools.errors import UserError
from energytools.models import load_checkpoint
from energytools.stages.train import train
from energytools.table import read_metadata
from energytools.threads import available_cpus, cpu_quota

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def no_stop_left_over():
    preemption.reset()
    yield
    preemption.reset()


@pytest.fixture
def train_args(fashion_root) -> list:
    """A tiny `energytools train` (the synthetic Fashion-MNIST files: no scikit-learn to import
    in a subprocess), without --epochs and --out."""
    return ["train", "--model", "cnn_tiny", "--dataset", "fashion-mnist", "--data-root", fashion_root, "--limit", 200,
            "--eval-limit", 40, "--device", "cpu"]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("energytools:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


# --- 1. a third writer ------------------------------------------------------------------------------

LOCKER = """
import sys, time
from pathlib import Path
from energytools.errors import UserError
from energytools.io import run_lock

out, release = Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None
try:
    with run_lock(out):
        print("locked", flush=True)
        deadline = time.time() + 60
        while release is not None and not release.exists() and time.time() < deadline:
            time.sleep(0.02)
except UserError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


def test_a_refused_writer_leaves_the_lock_so_a_third_is_refused_too(train_args, tmp_path):
    """The refused process used to delete the lock file on its way out; the next one then locked
    a fresh file and wrote beside the first."""
    locker = tmp_path / "locker.py"
    locker.write_text(LOCKER)
    out, release = tmp_path / "runs" / "kd", tmp_path / "release"
    first = subprocess.Popen([sys.executable, str(locker), str(out), str(release)], stdout=subprocess.PIPE,
                             text=True, env=ENV)
    try:
        assert first.stdout.readline().strip() == "locked"
        # the second: a real command, refused once it reaches its run directory
        second = subprocess.run(energytools_command(*train_args, "--epochs", 1, "--out", out), capture_output=True,
                                text=True, env=ENV, timeout=300)
        assert second.returncode == 2 and "is being written by another energytools process" in one_line(second.stderr)
        third = subprocess.run([sys.executable, str(locker), str(out)], capture_output=True, text=True, env=ENV,
                               timeout=120)
        assert third.returncode == 2 and "is being written by another" in third.stderr, third.stdout + third.stderr
        assert not (out / "last.pt").exists()
    finally:
        release.touch()
        first.wait(timeout=60)
    assert first.returncode == 0
    assert not (out.parent / ".kd.lock").exists()  # the holder removed it, while it held it
    again = subprocess.run([sys.executable, str(locker), str(out)], capture_output=True, text=True, env=ENV,
                           timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == "locked", again.stderr


# --- 4. advice that works -----------------------------------------------------------------------------

def test_a_full_disk_in_a_training_run_names_a_command_that_works(train_args, runner, tmp_path, monkeypatch):
    """The line said "re-run the same command, which resumes", which a run with a last.pt refuses."""
    real_save = torch.save

    def full_disk_at(nth: int):
        """torch.save that fails with ENOSPC when writing last.pt for the nth time."""
        writes = []

        def save(obj, where, *args, **kwargs):
            writes.extend([where] if ".tmp-last.pt" in str(where) else [])
            if len(writes) == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, where, *args, **kwargs)
        return save

    out = tmp_path / "t"
    args = [*train_args, "--epochs", 2, "--out", out]
    monkeypatch.setattr(torch, "save", full_disk_at(2))  # epoch 2's checkpoint
    failed = invoke(runner, *args)
    line = one_line(failed.stderr)
    assert failed.exit_code == 2 and "No space left on device" in line, failed.stderr
    assert "re-run the same command with --resume to continue" in line and line.count("re-run") == 1, line
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    monkeypatch.setattr(torch, "save", real_save)
    assert invoke(runner, *args).exit_code == 2  # the same command alone is refused, as the line implies
    resumed = invoke(runner, *args, "--resume")
    assert resumed.exit_code == 0 and load_checkpoint(out / "last.pt")["epoch"] == 2, resumed.output

    # before the first checkpoint: nothing to resume, the folder is gone, the same command works
    monkeypatch.setattr(torch, "save", full_disk_at(1))
    early = invoke(runner, *[*train_args, "--epochs", 1, "--out", tmp_path / "e"])
    line = one_line(early.stderr)
    assert early.exit_code == 2 and line.endswith("re-run the same command to start again"), line
    assert not (tmp_path / "e").exists()

    # a recipe's training step: `run` continues a stopped step by itself, so the line says so
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "full"\n[data]\ndataset = "digits"\nlimit = 300\neval_limit = 60\n[teacher]\n'
                      'model = "cnn_tiny"\nepochs = 2\ndevice = "cpu"\n[distill]\nstudent = "cnn_tiny"\n'
                      'runs = [{ method = "kd" }]\n')
    monkeypatch.setattr(torch, "save", full_disk_at(2))
    stopped = invoke(runner, "run", recipe, "--out", tmp_path / "p")
    line = one_line(stopped.stderr)
    assert stopped.exit_code == 2 and line.endswith("re-run the same command to continue"), line
    assert "--resume" not in line and (tmp_path / "p" / "teacher" / "last.pt").exists()


SLOW_EXIT = """
import atexit, sys, time
from energytools.cli import main

atexit.register(time.sleep, 3)  # a slow exit (torch's threads, a file system flushing): the signal lands here
sys.argv[0] = "energytools"
main()
"""


def test_sigterm_after_done_leaves_a_complete_run_and_resume_says_so(train_args, runner, tmp_path):
    """A SIGTERM while the process exits after `done:` killed it with 143 and no line, and the
    requeued command was refused."""
    wrapper = tmp_path / "slow_exit.py"
    wrapper.write_text(SLOW_EXIT)
    out = tmp_path / "t"
    process = subprocess.Popen([sys.executable, str(wrapper), *map(str, [*train_args, "--epochs", 1, "--out", out])],
                               stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("done"):
            break
    assert seen and seen[-1].startswith("done"), "".join(seen)[-2000:]
    time.sleep(0.3)  # inside the slow exit
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 0, "".join(seen)[-1000:] + rest
    assert "Traceback" not in rest
    # a requeue script adds --resume once last.pt exists: the finished run says so and exits 0
    again = invoke(runner, *train_args, "--epochs", 1, "--out", out, "--resume")
    assert again.exit_code == 0, again.output
    assert f"{out} is complete: 1 of 1 epochs trained; nothing to resume" in " ".join(again.stderr.split())
    assert "resuming" not in again.stderr


def test_a_signal_during_the_last_steps_is_reported_not_fatal(train_args, runner, tmp_path, monkeypatch):
    """A stop that comes after the last safe point (here: while the test predictions are written)
    ends the command normally, with a line saying the output is complete."""
    real_save, saves = torch.save, []

    def signal_on_the_last_save(obj, where, *args, **kwargs):
        saves.append(where)
        if len(saves) == 2:  # the last epoch's last.pt
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, where, *args, **kwargs)

    monkeypatch.setattr(torch, "save", signal_on_the_last_save)
    result = invoke(runner, *train_args, "--epochs", 1, "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert "SIGTERM came as the command finished; its output is complete" in one_line(result.stderr)


def test_resume_names_the_epoch_the_stop_named(tmp_path, capsys):
    """"stopped ... epoch 2 step 7" was followed by "resuming ... from epoch 1, step 7"."""
    def cfg(resume=False):
        return TrainStageConfig(model="cnn_tiny", out=str(tmp_path / "t"), resume=resume,
                                data=DataConfig(dataset="digits", limit=300, eval_limit=60),
                                train=TrainConfig(epochs=2, batch_size=32, seed=0, device="cpu"))

    def stop_at(event):
        if (event.epoch, event.step) == (1, 7):
            preemption.request_stop()

    with pytest.raises(preemption.Stopped, match=r"epoch 2 step 7/"):
        train(cfg(), on_step=stop_at)
    preemption.reset()
    capsys.readouterr()
    train(cfg(resume=True))
    assert "resuming " + str(tmp_path / "t") + " at epoch 2, after step 7" in " ".join(capsys.readouterr().err.split())


# --- 6. the functional API ------------------------------------------------------------------------------

def test_select_indices_refuses_negative_labels():
    scores = np.arange(6, dtype=float)
    with pytest.raises(UserError, match="labels must be class indices .* got -1 at position 2"):
        et.select_indices(scores, ratio=0.5, labels=[0, 1, -1, 0, 1, 1], per_class=True)
    assert et.select_indices(scores, ratio=0.5, labels=[0, 1, 0, 0, 1, 1], per_class=True).tolist() == [3, 5]


def test_write_score_table_refuses_an_existing_file_unless_overwrite(tmp_path):
    logits, labels = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 3
    notes = tmp_path / "notes.parquet"
    notes.write_text("my notes\n")
    with pytest.raises(UserError, match=r"already exists \(pass overwrite=True to replace it\)"):
        et.write_score_table(notes, logits, labels)
    assert notes.read_text() == "my notes\n"
    et.write_score_table(notes, logits, labels, overwrite=True)
    assert et.load_table(notes)[0].height == 20
    with pytest.raises(UserError, match="overwrite must be True or False"):
        et.write_score_table(notes, logits, labels, overwrite="yes")


def test_api_errors_name_keywords_and_the_cli_names_flags(runner, tmp_path):
    scores = np.arange(10, dtype=float)
    with pytest.raises(UserError, match=r"^ratio=0\.05 selects no samples out of 10$"):
        et.select_indices(scores, ratio=0.05)
    table = et.write_score_table(tmp_path / "s.parquet", np.random.default_rng(0).normal(size=(10, 3)),
                                 np.arange(10) % 3)
    with pytest.raises(UserError, match=r"^ratio=0\.05 selects no samples"):
        et.select(table, ratio=0.05)
    with pytest.raises(UserError, match=r"^batch_size must be >= 1, got 0$"):
        et.train("cnn_tiny", tmp_path / "t", dataset="digits", batch_size=0)
    result = invoke(runner, "select", "--scores", table, "--ratio", "0.05")
    assert result.exit_code == 2 and one_line(result.stderr) == (
        "energytools: error: --ratio 0.05 selects no samples out of 10")
    result = invoke(runner, "select", "--scores", table, "--ratio", "0.5", "--out", table)
    assert result.exit_code == 2 and "(pass --overwrite to replace it)" in one_line(result.stderr)
    with pytest.raises(UserError, match=r"\(pass overwrite=True to replace it\)"):
        et.select(table, ratio=0.5, out=table)


# --- 7. messages ------------------------------------------------------------------------------------------

READ_ONLY = """
import builtins, errno, os, sys

read_only = os.path.abspath(sys.argv.pop(1))  # a folder that behaves as on a read-only file system


def refuse(path):
    target = os.path.abspath(os.fsdecode(os.fspath(path)))
    if target == read_only or target.startswith(read_only + os.sep):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))


real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir


def open_(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        refuse(file)
    return real_open(file, mode, *args, **kwargs)


def os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        refuse(path)
    return real_os_open(path, flags, *args, **kwargs)


def mkdir(path, *args, **kwargs):
    refuse(path)
    return real_mkdir(path, *args, **kwargs)


builtins.open, os.open, os.mkdir = open_, os_open, mkdir
from energytools.cli import main

sys.argv[0] = "energytools"
main()
"""


def test_a_read_only_out_is_named_not_its_lock_file(train_args, tmp_path):
    wrapper = tmp_path / "read_only.py"
    wrapper.write_text(READ_ONLY)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    result = subprocess.run([sys.executable, str(wrapper), str(shelf), *map(str, train_args), "--epochs", "1", "--out",
                             str(shelf / "run")], capture_output=True, text=True, env=ENV, timeout=300)
    line = one_line(result.stderr)
    assert result.returncode == 2 and f"cannot write {shelf / 'run'}: Read-only file system" in line, line
    assert ".lock" not in line and "--out" in line
    assert list(shelf.iterdir()) == []


def test_a_model_folder_without_config_is_not_told_it_lacks_the_processor_file(tmp_path):
    """The model's save_pretrained writes config.json and the weights; preprocessor_config.json
    is its image processor's, and optional."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=3)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")  # no processor saved
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(UserError) as refused:
        load_checkpoint(tmp_path / "hf")
    message = str(refused.value)
    assert "missing config.json" in message and "preprocessor_config" not in message, message


# --- 8. threads -----------------------------------------------------------------------------------------------

def test_cpu_quota_and_available_cpus(tmp_path):
    assert cpu_quota("max 100000") is None and cpu_quota("150000 100000") == 1.5 and cpu_quota("") is None
    assert cpu_quota("50000 100000") == 0.5 and cpu_quota("bogus") is None
    allowed = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == allowed  # no cpu.max: the affinity mask
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == allowed


def recorded_threads(run: Path) -> int:
    return read_metadata(run / "metrics.parquet")["versions"]["torch_threads"]


def test_threads_from_the_environment_win_over_omp_num_threads(train_args, tmp_path):
    """ENERGYTOOLS_THREADS (the --threads option's variable) sets torch's count in the command's
    own process, over an explicit OMP_NUM_THREADS. Every output records the count
    (versions.torch_threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENERGYTOOLS_THREADS": "3"}
    result = subprocess.run(energytools_command(*train_args, "--epochs", 1, "--out", tmp_path / "a"), capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert recorded_threads(tmp_path / "a") == 3


def test_threads_option_and_omp_num_threads(train_args, runner, tmp_path, monkeypatch):
    """--threads sets torch's count for the command; without it an explicit OMP_NUM_THREADS is
    respected. In-process (a notebook, these tests) the caller's own count is back afterwards."""
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    result = invoke(runner, "--threads", other, *train_args, "--epochs", 1, "--out", tmp_path / "a")
    assert result.exit_code == 0 and recorded_threads(tmp_path / "a") == other, result.output
    assert torch.get_num_threads() == before
    result = invoke(runner, *train_args, "--epochs", 1, "--out", tmp_path / "b")
    assert result.exit_code == 0 and recorded_threads(tmp_path / "b") == before, result.output
    result = invoke(runner, "--threads", 0, "models")
    assert result.exit_code == 2 and one_line(result.stderr) == "energytools: error: --threads must be >= 1, got 0"


def test_threads_benchmark_smoke(tmp_path):
    out, doc = tmp_path / "threads.json", tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Notes\n")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--smoke", "--json", str(out),
                             "--write", str(doc)], capture_output=True, text=True, cwd=ROOT / "benchmarks", env=ENV,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    (row,) = figures["rows"]
    assert row["threads"] == 1 and row["alone_s"] > 0 and row["beside_s"] > 0
    assert figures["default_threads"] == available_cpus()
    text = doc.read_text()
    assert "<!-- threads: begin -->" in text and "| 1 |" in text and "beside a neighbour" in text
    assert "ended" not in result.stderr  # the neighbour answered until it was told to stop


def test_a_thread_block_gives_back_the_count_and_the_environment(monkeypatch):
    """threads.using(N, environment=True) (what a study's runner wraps its jobs in): torch and
    OMP_NUM_THREADS say N inside, the caller's values after, whether the variable was set or not."""
    import os

    import torch

    from energytools import threads

    before = torch.get_num_threads()
    for variable in (None, "7"):
        if variable is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", variable)
        with threads.using(1, environment=True):
            assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert torch.get_num_threads() == before and os.environ.get("OMP_NUM_THREADS") == variable
        with threads.using(1):  # without environment the variable is left alone
            assert os.environ.get("OMP_NUM_THREADS") == variable
