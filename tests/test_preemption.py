"""Preemption: a stop signal ends a stage at a safe point, says how to resume, and the resumed
run equals an uninterrupted one (training mid-epoch included)."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import signal_when
from energytools import preemption
from energytools.config import DataConfig, DistillConfig, TrainConfig, TrainStageConfig
from energytools.models import load_checkpoint
from energytools.stages.distill import distill
from energytools.stages.train import train


@pytest.fixture(autouse=True)
def no_stop_left_over():
    preemption.reset()
    yield
    preemption.reset()


def same_weights(a, b) -> bool:
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_at(epoch: int, step: int):
    """An on_step callback that asks for a stop (as the SIGTERM handler does) after that step."""
    def on_step(event):
        if (event.epoch, event.step) == (epoch, step):
            preemption.request_stop()
    return on_step


def train_cfg(out, resume=False, every=0, workers=0):
    return TrainStageConfig(model="cnn_tiny", out=str(out), data=DataConfig(dataset="digits", crop_pad=2), resume=resume,
                            train=TrainConfig(epochs=2, batch_size=32, seed=0, device="cpu",
                                              checkpoint_every_steps=every, num_workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, workers):
    train(train_cfg(tmp_path / "a", workers=workers))
    with pytest.raises(preemption.Stopped) as stopped:
        train(train_cfg(tmp_path / "b", every=5, workers=workers), on_step=stop_at(1, 7))
    assert stopped.value.exit_code == 143 and "--resume" in str(stopped.value)
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 1 and state["position"]["step"] == 7  # the position inside epoch 2
    preemption.reset()
    result = train(train_cfg(tmp_path / "b", resume=True, workers=workers))
    assert same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    first = load_checkpoint(tmp_path / "a" / "last.pt")["metrics"]
    assert [r["loss"] for r in result.metrics.to_dicts()] == [r["loss"] for r in first]  # the sums were kept


def test_checkpoint_every_steps_counts_optimizer_steps_under_accumulation(tmp_path):
    """--checkpoint-every-steps 2 with --accumulate 2 writes last.pt every 2 optimizer steps (4
    batches), not at every batch that steps (which was every lcm(N, A) batches)."""
    written = []

    def watch(event):  # last.pt as the previous optimizer step left it
        last = tmp_path / "t" / "last.pt"
        if last.exists():
            position = load_checkpoint(last).get("position")
            if position is not None and (not written or written[-1] != position["step"]):
                written.append(position["step"])

    cfg = TrainStageConfig(model="cnn_tiny", out=str(tmp_path / "t"), data=DataConfig(dataset="digits", limit=400),
                           train=TrainConfig(epochs=1, batch_size=16, seed=0, device="cpu", accumulate=2,
                                             checkpoint_every_steps=2))
    train(cfg, on_step=watch)
    assert written[:4] == [4, 8, 12, 16]


@pytest.mark.parametrize("options", [dict(method="kd"), dict(method="kd", he_da="online", cached_logits=True)],
                         ids=["kd", "online-he-da"])
def test_distill_stopped_mid_epoch_resumes_to_the_same_weights(digits_run, tmp_path, options):
    def cfg(out, resume=False):
        return DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(out), resume=resume,
                             train=TrainConfig(epochs=2, batch_size=32, seed=0, device="cpu"), **options)

    distill(cfg(tmp_path / "a"))
    with pytest.raises(preemption.Stopped):
        distill(cfg(tmp_path / "b"), on_step=stop_at(1, 5))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["position"]["step"] == 5
    preemption.reset()
    distill(cfg(tmp_path / "b", resume=True))
    assert same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "energytools", *map(str, args)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def views_table(digits_run, tmp_path_factory):
    from energytools.config import ScoreConfig
    from energytools.stages.score import score

    out = tmp_path_factory.mktemp("views") / "views.parquet"
    return score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(out), views=2))


@pytest.mark.parametrize("cached_views", [False, True], ids=["online-teacher", "cached-views"])
def test_sigterm_mid_epoch_then_resume_gives_the_weights_of_an_uninterrupted_run(digits_run, views_table, tmp_path,
                                                                                cached_views):
    scores = views_table if cached_views else digits_run["scores"]
    common = ["distill", "--scores", scores, "--student", "cnn_tiny", "--method", "kd", "--epochs", 2,
              "--batch-size", 8, "--device", "cpu"] + (["--cached-logits"] if cached_views else [])
    whole = subprocess.run(cli(*common, "--out", tmp_path / "a"), capture_output=True, text=True, env=ENV)
    assert whole.returncode == 0, whole.stderr[-2000:]
    last = tmp_path / "b" / "last.pt"
    # a checkpoint every 2 steps tells the test that training has started; the signal comes right after
    stopped = signal_when([*common, "--out", tmp_path / "b", "--checkpoint-every-steps", 2], last.exists)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("energytools:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    position = load_checkpoint(last)["position"]
    assert position is not None and position["step"] > 0  # stopped inside an epoch, not at its end
    resumed = subprocess.run(cli(*common, "--out", tmp_path / "b", "--resume"), capture_output=True, text=True,
                             env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout + resumed.stderr and "step" in resumed.stdout + resumed.stderr
    assert same_weights(tmp_path / "a" / "last.pt", last)


def test_usr1_stops_only_when_asked(digits_run, tmp_path):
    common = ["distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "kd", "--epochs", 2,
              "--batch-size", 8, "--device", "cpu", "--checkpoint-every-steps", 2]
    stopped = signal_when(["--stop-signal", "usr1", *common, "--out", tmp_path / "b"],
                          (tmp_path / "b" / "last.pt").exists, signal.SIGUSR1)
    assert stopped.returncode == 138 and "stopped by SIGUSR1" in stopped.stderr, stopped.stderr[-2000:]
    # without the option SIGUSR1 keeps its default action (the process ends at once, nothing printed)
    killed = signal_when([*common, "--out", tmp_path / "c"], (tmp_path / "c" / "last.pt").exists, signal.SIGUSR1)
    assert killed.returncode == -signal.SIGUSR1 and "stopped by" not in killed.stderr


def test_checkpoint_every_steps_survives_sigkill(digits_run, tmp_path):
    """The periodic checkpoint is atomic: a SIGKILL at any moment leaves a last.pt to resume from."""
    common = ["distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "kd", "--epochs", 2,
              "--batch-size", 8, "--device", "cpu"]
    whole = subprocess.run(cli(*common, "--out", tmp_path / "a"), capture_output=True, text=True, env=ENV)
    assert whole.returncode == 0, whole.stderr[-2000:]
    last = tmp_path / "b" / "last.pt"

    def second_checkpoint():
        return last.exists() and load_step(last) >= 6

    killed = signal_when([*common, "--out", tmp_path / "b", "--checkpoint-every-steps", 3], second_checkpoint,
                         signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(cli(*common, "--out", tmp_path / "b", "--resume"), capture_output=True, text=True,
                             env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(tmp_path / "a" / "last.pt", last)


def load_step(path) -> int:
    try:
        state = load_checkpoint(path)
    except Exception:  # noqa: BLE001 - being replaced at this moment
        return 0
    position = state.get("position")
    return 10**6 if position is None else position["step"]


def test_bad_stop_signal_and_collective_timeout_are_one_line(runner, tmp_path):
    from conftest import invoke

    for args, needle in ((["--stop-signal", "kill", "models"], "--stop-signal must be one of"),
                         (["--collective-timeout", "-5", "models"], "must be positive")):
        result = invoke(runner, *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    # a command run in-process (tests, notebooks) leaves the process's own handlers as they were
    before = signal.getsignal(signal.SIGTERM)
    assert invoke(runner, "models").exit_code == 0 and signal.getsignal(signal.SIGTERM) is before
    assert preemption.parse_signals(["USR1", "sigusr2", "term"]) == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM]


RECIPE = """name = "stopped"
[data]
dataset = "digits"
limit = 400
eval_limit = 100
[teacher]
model = "cnn_tiny"
epochs = 2
batch_size = 8
device = "cpu"
checkpoint_every_steps = 2
[distill]
student = "cnn_tiny"
epochs = 1
device = "cpu"
runs = [{ method = "kd" }]
"""


def test_a_stopped_recipe_continues_its_training_step_when_run_again(tmp_path):
    """`energytools run` after a SIGTERM inside the teacher's training continues that run from
    its last.pt (not from scratch) and ends with the weights of an uninterrupted pipeline."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    whole = subprocess.run(cli("run", recipe, "--out", tmp_path / "a"), capture_output=True, text=True, env=ENV)
    assert whole.returncode == 0, whole.stderr[-2000:]
    last = tmp_path / "b" / "teacher" / "last.pt"
    stopped = signal_when(["run", recipe, "--out", tmp_path / "b"], last.exists)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("energytools:")]
    assert len(lines) == 1 and "re-run the same command" in lines[0] and "--resume" not in lines[0], lines
    assert load_step(last) > 0  # stopped inside the teacher's training, which was kept
    again = subprocess.run(cli("run", recipe, "--out", tmp_path / "b"), capture_output=True, text=True, env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the stopped run" in again.stdout + again.stderr
    assert same_weights(tmp_path / "a" / "teacher" / "last.pt", last)
    assert same_weights(tmp_path / "a" / "runs" / "kd" / "last.pt", tmp_path / "b" / "runs" / "kd" / "last.pt")


def test_resume_with_other_options_is_refused_but_more_epochs_continue(tmp_path):
    common = ["train", "--model", "cnn_tiny", "--dataset", "digits", "--limit", 300, "--eval-limit", 100,
              "--device", "cpu", "--out", tmp_path / "t"]
    first = subprocess.run(cli(*common, "--epochs", 1), capture_output=True, text=True, env=ENV)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "t" / "last.pt").read_bytes()
    refused = subprocess.run(cli(*common, "--epochs", 1, "--lr", 0.1, "--resume"), capture_output=True, text=True,
                             env=ENV)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "train.lr 0.05 (now 0.1)" in refused.stderr and "--overwrite" in refused.stderr, refused.stderr
    assert (tmp_path / "t" / "last.pt").read_bytes() == before  # nothing touched
    import json  # a run another version started, which had no --nesterov: resumes
    recorded = tmp_path / "t" / "config.json"
    config = json.loads(recorded.read_text())
    del config["train"]["nesterov"]
    recorded.write_text(json.dumps(config))
    # what is marked resume_may_change (more epochs, reporting and eval batch size) may change
    longer = subprocess.run(cli(*common, "--epochs", 2, "--sync-every", 7, "--eval-batch-size", 64, "--resume"),
                            capture_output=True, text=True, env=ENV)
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert load_checkpoint(tmp_path / "t" / "last.pt")["epoch"] == 2


def test_ctrl_c_says_what_to_do_next(tmp_path):
    """Ctrl-C (SIGINT, a KeyboardInterrupt) is not a scheduler's stop: the run ends at once, and
    the line says what the user does next, which depends on whether a checkpoint was written."""
    out = tmp_path / "t"
    args = ["train", "--model", "cnn_tiny", "--dataset", "digits", "--epochs", 500, "--device", "cpu", "--out", out]
    after = signal_when(args, lambda: (out / "last.pt").exists(), signal.SIGINT)
    lines = [line for line in after.stderr.splitlines() if line.strip()]
    assert after.returncode == 130 and lines[-1] == ("energytools: interrupted; re-run the same command with "
                                                     "--resume to continue"), after.stderr[-800:]
    # before the first checkpoint nothing is kept (the run directory goes), so there is nothing to resume

    def ctrl_c(event):
        raise KeyboardInterrupt

    with pytest.raises(preemption.Interrupted, match="no checkpoint was written yet"):
        train(train_cfg(tmp_path / "early"), on_step=ctrl_c)
    assert not (tmp_path / "early").exists()
