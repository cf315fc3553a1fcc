"""torchrun with 2 CPU processes (gloo) gives the same score table as 1 process; DDP distill runs."""
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from energytools.table import load_table


def torchrun(*args, nproc=2, script=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += [script] if script else ["-m", "energytools"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)


def test_two_process_score_equals_one_process(digits_run, tmp_path):
    single = tmp_path / "single.parquet"
    double = tmp_path / "double.parquet"
    for out, nproc in ((single, 1), (double, 2)):
        result = torchrun("score", "--teacher", digits_run["teacher"], "--out", out, "--part-size", 256, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    a, meta_a = load_table(single)
    b, meta_b = load_table(double)
    assert a["sample_id"].to_list() == b["sample_id"].to_list()
    assert a["energy_group"].to_list() == b["energy_group"].to_list()
    assert a["temperature"].to_list() == b["temperature"].to_list()
    assert (a["energy"] - b["energy"]).abs().max() < 1e-5
    assert meta_a.rule == meta_b.rule and meta_a.thresholds == meta_b.thresholds
    assert not (tmp_path / "double.parquet.parts").exists()


def test_two_process_distill(digits_run, tmp_path):
    """The ranks share val and test (batches of 8, dealt out in turn) with rank 0's BatchNorm
    buffers, so metrics.parquet holds what one process measures on the saved best.pt and last.pt;
    rank 0 alone prints the summary (before: two `done:` lines, rank 1's from its own buffers).
    The test below isolates the buffers: here rank 1's differ by little and may flip no prediction."""
    import torch

    from energytools.config import DataConfig, resolve
    from energytools.engine import evaluate
    from energytools.models import load_checkpoint, load_model

    out = tmp_path / "ddp"
    result = torchrun("distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "energy-kd",
                      "--epochs", 2, "--out", out, "--device", "cpu", "--eval-batch-size", 8)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pl.read_parquet(out / "metrics.parquet")
    assert metrics.height == 2 and metrics["val_acc"].is_not_null().all()
    assert (out / "best.pt").exists() and (out / "summary.json").exists()
    output = (result.stdout + result.stderr).splitlines()
    assert sum(line.startswith("done:") for line in output) == 1, result.stderr[-3000:]
    assert sum(line.startswith("epoch 2/2") for line in output) == 1
    for name in ("best.pt", "last.pt"):
        model, meta = load_model(out / name)
        data = resolve(DataConfig, meta["data"], name)
        epoch = load_checkpoint(out / name)["epoch"]
        row = metrics.filter(pl.col("epoch") == epoch).row(0, named=True)
        for split in ("val", "test"):
            assert evaluate(model, data.build(split), torch.device("cpu"), 8) == row[f"{split}_acc"], (name, split)


SHARDED_EVALUATION = """
import json, os, sys

import torch
import torch.nn.functional as F

from energytools.config import DataConfig
from energytools.data.transforms import normalize
from energytools.distributed import context
from energytools.engine import evaluate
from energytools.models import create_model

ctx = context()
data = DataConfig(dataset="digits")
train_set, test_set = data.build("train"), data.build("test")
torch.manual_seed(0)
model = create_model("cnn_tiny", 10, 1, 8)
images, labels, _ = train_set.__getitems__(list(range(512)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
for _ in range(20):  # the same steps on every rank: equal weights, predictions worth counting
    optimizer.zero_grad()
    F.cross_entropy(model(normalize(images, train_set.info)), labels).backward()
    optimizer.step()
for module in model.modules():  # BatchNorm statistics of each rank's own, as after a DDP step
    if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.add_(ctx.rank)
one_process = evaluate(model, test_set, torch.device("cpu"), 32) if ctx.is_main else None  # rank 0 alone, whole set
evaluated = []
model.register_forward_hook(lambda module, args, output: evaluated.append(len(output)))
sharded = evaluate(model, test_set, torch.device("cpu"), 32, ctx=ctx)
with open(os.path.join(sys.argv[1], f"rank{ctx.rank}.json"), "w") as handle:
    json.dump({"one_process": one_process, "sharded": sharded, "evaluated": sum(evaluated), "size": len(test_set)},
              handle)
"""


def test_sharded_evaluation_over_two_ranks_gives_the_one_process_accuracy(tmp_path):
    """evaluate(..., ctx=context()): each rank evaluates a disjoint share of the set, with rank
    0's buffers, and every rank gets the accuracy rank 0 alone gets on the whole set."""
    import json

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_EVALUATION)
    result = torchrun(tmp_path, script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["sharded"] == ranks[1]["sharded"] == ranks[0]["one_process"], ranks
    assert ranks[0]["evaluated"] + ranks[1]["evaluated"] == ranks[0]["size"], ranks  # no sample twice
    assert 0 < ranks[1]["evaluated"] < ranks[0]["size"], ranks


def test_a_rank_without_samples_is_refused_by_every_rank(digits_run, tmp_path):
    out = tmp_path / "s.parquet"
    result = torchrun("score", "--teacher", digits_run["teacher"], "--out", out, "--part-size", 100000)
    assert result.returncode != 0
    assert result.stderr.count("fewer than the 2 ranks") == 2  # one line from each rank
    # torchrun prints its own report of failed workers; no energytools frame may appear in it
    assert "energytools/stages" not in result.stderr and not out.exists()


def test_ranks_that_disagree_are_refused(digits_run, tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(
        "import os, sys\nfrom energytools.cli import main\n"
        "sys.argv = ['energytools'] + sys.argv[1:] + ['--energy-temperature', str(1 + int(os.environ['RANK']))]\n"
        "main()\n")
    out = tmp_path / "s.parquet"
    result = torchrun("score", "--teacher", digits_run["teacher"], "--out", out, "--part-size", 256, script=str(script))
    assert result.returncode != 0 and result.stderr.count("ranks disagree on the score config") == 2
    assert not out.exists()


def test_two_process_augment_writes_the_same_shards(digits_run, tmp_path):
    out = tmp_path / "he-da"
    result = torchrun("augment", "--scores", digits_run["scores"], "--ratio", 0.3, "--shard-size", 200, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in digits_run["shards"].iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (digits_run["shards"] / name).read_bytes(), name


def test_two_process_distill_with_online_he_da(digits_run, tmp_path):
    # one student forward per step (batch and mixed images together), as DDP requires
    out = tmp_path / "ddp"
    result = torchrun("distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "kd",
                      "--he-da", "online", "--cached-logits", "--epochs", 1, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert pl.read_parquet(out / "metrics.parquet")["loss_he_da"][0] > 0


def test_two_process_distill_replays_stored_views(digits_run, tmp_path):
    import json

    table = tmp_path / "views.parquet"
    result = torchrun("score", "--teacher", digits_run["teacher"], "--views", 2, "--out", table, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ddp"
    result = torchrun("distill", "--scores", table, "--student", "cnn_tiny", "--method", "energy-kd", "--cached-logits",
                      "--temperature-source", "views", "--epochs", 1, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["replayed_views"]["count"] == 2
    assert pl.read_parquet(out / "metrics.parquet")["val_acc"].is_not_null().all()


DIE = """import os, signal, sys, time
import importlib
from energytools.cli import main

module, name, at = os.environ["DIE_IN"].split(":")
if os.environ["RANK"] == "1":  # rank 1 is SIGKILLed at its at-th call of module.name
    owner = importlib.import_module(module)
    path = name.split(".")
    holder = owner if len(path) == 1 else getattr(owner, path[0])
    original, calls = getattr(holder, path[-1]), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(at):
            time.sleep(float(os.environ.get("DIE_AFTER", "0")))
            if os.environ.get("DIE_HOW") == "hang":  # alive but silent, until torchrun ends it
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(holder, path[-1], dying)
sys.argv = ["energytools"] + sys.argv[1:]
main()
"""


def torchrun_dying(tmp_path, die_in, *args, die_after=0, how="kill", timeout=30):
    import time

    script = tmp_path / "die.py"
    script.write_text(DIE)
    os.environ["DIE_IN"], os.environ["DIE_AFTER"], os.environ["DIE_HOW"] = die_in, str(die_after), how
    try:
        started = time.perf_counter()
        result = torchrun("--collective-timeout", timeout, *args, script=str(script))
        return result, time.perf_counter() - started
    finally:
        del os.environ["DIE_IN"], os.environ["DIE_AFTER"], os.environ["DIE_HOW"]


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_lost_inside_backward_ends_the_other_with_one_line(digits_run, tmp_path, how):
    """Rank 1 is SIGKILLed (or stops answering) right before its 5th backward: rank 0 fails inside
    DDP's gradient all-reduce, which no energytools collective wraps. It used to end with
    "internal error RuntimeError: [gloo/...] Connection reset by peer", a traceback and a crash file."""
    args = ("distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "kd", "--epochs", 1,
            "--out", tmp_path / "ddp", "--device", "cpu")
    result, seconds = torchrun_dying(tmp_path, "torch:Tensor.backward:5", *args, how=how, timeout=5)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("energytools:")]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "internal error" not in lines[0], result.stderr[-3000:]
    assert ("rank 1 died" if how == "kill" else "did not answer within 5s") in lines[0], lines[0]
    # torchrun prints its own report of failed workers; no energytools frame may appear in it
    assert "re-run the same command" in lines[0] and "energytools/engine" not in result.stderr
    assert seconds < 90


def test_a_killed_rank_ends_distill_on_the_other_with_one_line_and_a_rerun_resumes(digits_run, tmp_path):
    out = tmp_path / "ddp"
    args = ("distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "kd", "--epochs", 2,
            "--out", out, "--device", "cpu")
    # rank 1 dies in epoch 2 (an epoch is ~11 steps a rank; the ranks agree on stops after
    # step 10, the epoch's last and its end: the 4th agreement is in epoch 2)
    result, seconds = torchrun_dying(tmp_path, "energytools.distributed:Context.agree_stop:4", *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("energytools:")]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "rank 1 died" in lines[0], result.stderr[-3000:]
    assert seconds < 120  # not the collective timeout of torch (30 min), nor a hang
    resumed = torchrun(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert pl.read_parquet(out / "metrics.parquet").height == 2


def test_a_killed_rank_ends_score_on_the_other_with_one_line_and_a_rerun_resumes(digits_run, tmp_path):
    out = tmp_path / "s.parquet"
    args = ("score", "--teacher", digits_run["teacher"], "--out", out, "--part-size", 256)
    # rank 1 dies scoring its second part, after rank 0 has reached the final barrier
    result, seconds = torchrun_dying(tmp_path, "energytools.stages.score:teacher_columns:2", *args, die_after=3)
    assert result.returncode != 0 and not out.exists()
    lines = [line for line in result.stderr.splitlines() if line.startswith("energytools:")]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "rank 1 died" in lines[0], result.stderr[-3000:]
    assert seconds < 120
    parts = sorted(p.name for p in (tmp_path / "s.parquet.parts").glob("part-*.parquet"))
    assert "part-00001.parquet" in parts and "part-00003.parquet" not in parts  # what rank 1 finished stays
    resumed = torchrun(*args)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert out.exists()


def test_two_ranks_size_their_parts_and_write_the_one_process_table(tmp_path):
    """2,000 samples with default options: before, "1 part(s) of part_size 8192, fewer than the 2 ranks"."""
    import pytest
    import torch

    from energytools.config import DataConfig
    from energytools.data.loaders import SYSTEM_FASHION_MNIST
    from energytools.engine import model_meta
    from energytools.models import create_model, save_checkpoint

    if not SYSTEM_FASHION_MNIST.exists():
        pytest.skip("Fashion-MNIST is not installed")
    data = DataConfig(dataset="fashion-mnist", limit=2000, eval_limit=100)
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    save_checkpoint(teacher, create_model("cnn_tiny", 10, 1, 28), model_meta("cnn_tiny", data.build("train"), data))
    tables = {}
    for nproc in (1, 2):
        tables[nproc] = tmp_path / f"scores-{nproc}.parquet"
        result = torchrun("score", "--teacher", teacher, "--out", tables[nproc], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    assert tables[1].read_bytes() == tables[2].read_bytes()


def test_more_ranks_than_samples_is_refused_in_one_line(tmp_path):
    from energytools.errors import UserError
    from energytools.stages.score import choose_part_size

    import pytest

    with pytest.raises(UserError, match="3 samples cannot be shared by 4 ranks"):
        choose_part_size(3, 4, 256, None)
    assert choose_part_size(2000, 2, 256, None) == 1024  # whole batches: 4 a part
    assert choose_part_size(2000, 1, 256, None) == 2048
    assert choose_part_size(100_000, 2, 256, None) == 8192  # large splits: parts independent of the ranks
    assert choose_part_size(2000, 2, 256, 512) == 512


def worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (from /proc: its children and their RANK)."""
    children = open(f"/proc/{launcher}/task/{launcher}/children").read().split()
    for pid in children:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.fixture(scope="module")
def cifar_table(tmp_path_factory):
    """A CIFAR-shaped train table (random pixels; crop + flip augmentation) and its teacher."""
    from energytools.data.synthetic import write_cifar

    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "data", 10, 400, 50, np.random.default_rng(0))
    teacher, table = root / "teacher", root / "scores.parquet"
    for args in (["train", "--dataset", "cifar10", "--data-root", root / "data", "--model", "cnn_tiny", "--epochs", 1,
                  "--out", teacher], ["score", "--teacher", teacher / "best.pt", "--out", table]):
        made = subprocess.run([sys.executable, "-m", "energytools", *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert made.returncode == 0, made.stderr[-2000:]
    return table


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_resume_is_exact(cifar_table, tmp_path):
    """SIGTERM to one rank only (a launcher passes it on to its workers one by one, so one may
    get it a step later): the ranks agree on the step to stop after, every rank stops there.
    Each rank draws its own crops, flips (CIFAR-shaped data) and online HE-DA partners: the
    resumed ranks get their own generators back (last.pt used to keep rank 0's for every rank)."""
    import re
    import signal
    import time

    import torch

    args = ["distill", "--scores", cifar_table, "--student", "cnn_tiny", "--method", "energy-kd", "--he-da", "online",
            "--epochs", 2, "--batch-size", 8, "--device", "cpu"]
    whole = torchrun(*args, "--out", tmp_path / "a")
    assert whole.returncode == 0, whole.stderr[-3000:]
    last = tmp_path / "b" / "last.pt"
    # a short collective timeout: without the agreement the ranks would wait in different collectives
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "energytools", "--collective-timeout", 60, *map(str, args), "--out", str(tmp_path / "b"),
               "--checkpoint-every-steps", 2]
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not last.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(worker_of_rank(process.pid, 1), signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:  # torchrun ends its workers when it is killed this way
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    assert process.returncode != 0
    # one line from each rank (the two may interleave on torchrun's stderr), at the same step
    stopped = re.findall(r"energytools: stopped by SIGTERM; (epoch \d+ step \d+/\d+)", stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]
    position = torch.load(last, weights_only=True)["position"]
    assert position is not None and len(position["rngs"]["ranks"]) == 2
    resumed = torchrun(*args, "--out", tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(last, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


ACCUMULATE_SCRIPT = '''
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from energytools.config import DataConfig, TrainConfig
from energytools.distributed import context
from energytools.engine import fit

skipped = []  # the backward passes that kept their gradients local (DDP's no_sync)
no_sync = torch.nn.parallel.DistributedDataParallel.no_sync
torch.nn.parallel.DistributedDataParallel.no_sync = lambda self: skipped.append(1) or no_sync(self)

data = DataConfig(dataset="digits", limit=200, eval_limit=60)
train_set, val_set = data.build("train"), data.build("val")


def run(out, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # no BatchNorm: one batch and its parts agree
    step = lambda batch, forward: (lambda logits: (logits, {"ce": F.cross_entropy(logits, batch.labels)}))(
        forward(batch.images))
    cfg = TrainConfig(epochs=2, lr=0.1, seed=0, device="cpu", **options)
    fit(model, step, train_set, val_set, None, cfg, Path(sys.argv[1]) / out, {}, resume=False)
    return model[1].weight.detach()


big = run("big", batch_size=20)
local_in_big = len(skipped)
accumulated = run("acc", batch_size=5, accumulate=4)
plain = run("plain", batch_size=5)
if context().is_main:
    print("accumulated", torch.allclose(big, accumulated, atol=1e-6), "plain", torch.allclose(big, plain, atol=1e-4))
    print("local backward passes", local_in_big, len(skipped))
'''


def test_accumulation_under_torchrun_matches_the_larger_batch(tmp_path):
    """Two ranks: --accumulate 4 of batch 5 gives the weights of batch 20 (the batches before the
    stepping one keep their gradients local, the last one's all-reduce averages the sums)."""
    script = tmp_path / "accumulate.py"
    script.write_text(ACCUMULATE_SCRIPT)
    result = torchrun(tmp_path, script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accumulated True plain False" in result.stdout, result.stdout[-2000:]
    # 100 samples a rank: 20 batches of 5 an epoch, 5 optimizer steps, so 15 batches local; 2 epochs
    assert "local backward passes 0 30" in result.stdout, result.stdout[-2000:]


DTKD_SCRIPT = '''
import json
import os
import sys

import energytools
from energytools.losses import dtkd_temperatures

seen = []


def track(event):
    info = event.batch.extras["sample_info"]
    t_t, t_s = dtkd_temperatures(event.logits.float(), info.teacher_logits.float(), 4.0)
    seen.append([event.epoch, t_t.min().item(), t_t.max().item(), t_s.min().item(), t_s.max().item()])


energytools.distill(sys.argv[1], "cnn_tiny", sys.argv[2], method="dtkd", epochs=2, batch_size=16, device="cpu",
                    on_step=track)
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(seen, handle)
'''


def test_dtkd_temperature_range_covers_every_rank(digits_run, tmp_path):
    """metrics.parquet's DTKD temperature range is over the samples of both ranks, not rank 0's."""
    script = tmp_path / "dtkd.py"
    script.write_text(DTKD_SCRIPT)
    out = tmp_path / "run"
    result = torchrun(digits_run["scores"], out, script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    steps = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    metrics = pl.read_parquet(out / "metrics.parquet")
    rank1_holds_an_extreme = False
    for epoch, row in enumerate(metrics.iter_rows(named=True)):
        mine = {rank: [s for s in rows if s[0] == epoch] for rank, rows in steps.items()}
        expected = {}
        for name, column, pick in (("teacher_t_min", 1, min), ("teacher_t_max", 2, max),
                                   ("student_t_min", 3, min), ("student_t_max", 4, max)):
            per_rank = {rank: pick(s[column] for s in rows) for rank, rows in mine.items()}
            expected[name] = pick(per_rank.values())
            rank1_holds_an_extreme |= per_rank[1] != per_rank[0] and expected[name] == per_rank[1]
            assert abs(row[f"method_{name}"] - expected[name]) < 1e-5, (epoch, name, row, per_rank)
    assert rank1_holds_an_extreme  # the test can fail: rank 0's range alone differs


SLOW_MERGE = """import os, sys, time
from energytools.cli import main
import energytools.stages.score as stage

if os.environ["RANK"] == "0":  # rank 0 merges the table slower than the collective timeout
    original = stage.finish_table

    def slow(*args, **kwargs):
        time.sleep(6)
        return original(*args, **kwargs)
    stage.finish_table = slow
sys.argv = ["energytools"] + sys.argv[1:]
main()
"""


def test_the_other_ranks_wait_for_a_merge_longer_than_the_collective_timeout(digits_run, tmp_path):
    """score's other ranks used to wait for rank 0's merge in a barrier bounded by the collective
    timeout: at ImageNet size with --views the merge can outlast it, and they were killed."""
    script = tmp_path / "slow_merge.py"
    script.write_text(SLOW_MERGE)
    out = tmp_path / "s.parquet"
    result = torchrun("--collective-timeout", 2, "score", "--teacher", digits_run["teacher"], "--out", out,
                      "--part-size", 256, script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.exists() and not (tmp_path / "s.parquet.parts").exists()


PEER_GONE = """import os, signal, time
from energytools.distributed import context

ctx = context("cpu")
if ctx.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)  # rank 0 is busy, in no collective: only the watch can tell it rank 1 is gone
print("rank 0 was not told")
"""


def test_the_peer_watch_ends_a_rank_whose_peer_died_with_one_line(tmp_path):
    """Under nccl a survivor sits in an asynchronous collective until nccl's watchdog aborts it
    with a C++ trace; the peer watch (on by default under nccl, here forced on gloo) ends it with
    the one line as soon as the dead peer is seen. The ranks are started as a scheduler's launcher
    (srun) starts them, with no torchrun agent that would tear the job down itself."""
    import socket
    import time

    script = tmp_path / "peer_gone.py"
    script.write_text(PEER_GONE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    started = time.perf_counter()
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ENERGYTOOLS_PEER_WATCH": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2"}
        ranks.append(subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    try:
        out, err = ranks[0].communicate(timeout=90)
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    lines = [line for line in err.splitlines() if line.startswith("energytools:")]
    assert ranks[0].returncode == 2 and "rank 0 was not told" not in out
    assert len(lines) == 1 and "rank 0 of 2: rank 1 died or was killed" in lines[0], err[-3000:]
    assert time.perf_counter() - started < 60


#: `energytools train --folds 2` then `energytools score --teacher DIR`, in one torchrun launch
FOLDS_THEN_SCORE = """
import sys
from energytools.cli import app

folds, table = sys.argv[1:]
for args in (["train", "--model", "cnn_tiny", "--dataset", "digits", "--limit", "200", "--eval-limit", "60",
              "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--folds", "2", "--out", folds],
             ["score", "--teacher", folds, "--out", table, "--batch-size", "32", "--save-logits"]):
    code = app(args, standalone_mode=False)
    if code:
        sys.exit(code)
"""


def test_fold_teachers_train_and_score_out_of_fold_under_torchrun(tmp_path):
    """`train --folds` runs each fold as a DDP run in turn; `score --teacher DIR` on 2 ranks gives
    the 1-process table (parts of whole batches: each batch is shared out among the same teachers)."""
    from energytools.api import score
    from energytools.folds import read_manifest
    from energytools.io import sha256_file

    folds, double, script = tmp_path / "folds", tmp_path / "double.parquet", tmp_path / "folds_then_score.py"
    script.write_text(FOLDS_THEN_SCORE)
    result = torchrun(folds, double, script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest, _ = read_manifest(folds)
    assert manifest.teachers == tuple(sha256_file(folds / f"fold-{k}" / "best.pt") for k in range(2))
    a, meta_a = load_table(score(folds, tmp_path / "single.parquet", batch_size=32, save_logits=True, device="cpu"))
    b, meta_b = load_table(double)
    assert a.drop("logits").equals(b.drop("logits")) and a["logits"].to_list() == b["logits"].to_list()
    assert b["fold"].null_count() == 0 and meta_a.folds == meta_b.folds and meta_a.teacher == meta_b.teacher
