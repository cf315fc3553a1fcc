"""Faults an operator hits (issue 41): a third writer, advice that must work, a signal after
`done:`, a read-only output, API messages that name keywords, --threads. Real processes where
the fault needs them."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import energytools as et
from conftest import energytools_command, invoke
from energytools import preemption
from energytools.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["train", "--model", "cnn_tiny", "--dataset", "digits", "--limit", 300, "--eval-limit", 60, "--device", "cpu"]


@pytest.fixture(autouse=True)
def no_stop_left_over():
    preemption.reset()
    yield
    preemption.reset()


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


def test_a_refused_writer_leaves_the_lock_so_a_third_is_refused_too(tmp_path):
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
        second = subprocess.run(energytools_command(*TRAIN, "--epochs", 1, "--out", out), capture_output=True,
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

