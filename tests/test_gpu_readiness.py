"""The CUDA and multi-GPU paths, checked without a GPU (issue 30): collectives on the device
their backend serves, the device chosen after the distributed context, no data-dependent
shapes or host reads in the step's losses, float32 losses and energies under autocast, and
the precision and reproducibility settings."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

import energytools.distributed as distributed
from energytools.config import DataConfig, TrainConfig, TrainStageConfig
from energytools.distributed import context
from energytools.energy import energy
from energytools import engine
from energytools.engine import autocast, float32_exact, resolve_device
from energytools.errors import UserError
from energytools.losses import dkd_loss, kd_loss, mixed_cross_entropy
from energytools.lookup import OnlineTeacher
from energytools.distillers.online_heda import mix_high_energy, mixed_kd_term


@pytest.fixture
def torchrun_env(monkeypatch):
    """As torchrun leaves rank 0 of 2 on LOCAL_RANK 1, before the context exists; ``join(backend)``
    makes the group the context then finds: one process that says the job has two (its
    collectives reduce over itself alone)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.reset()

    def join(backend):
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()
    distributed.reset()


def test_collectives_put_their_tensors_on_the_device_the_backend_serves(torchrun_env):
    torchrun_env("cuda:gloo")  # as nccl: a backend for cuda tensors only
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(1, dtype=torch.float64))  # the failure a cpu tensor meets
    ctx = context()
    assert ctx.distributed and distributed.collective_device(ctx.local_rank) == ctx.device == torch.device("cuda", 1)
    if torch.cuda.device_count() > 1:
        assert ctx.all_sum([1.0, 2.0]) == [1.0, 2.0]
    else:  # it reaches for cuda (absent here) rather than handing the group a cpu tensor
        with pytest.raises(Exception) as raised:
            ctx.all_sum([1.0, 2.0])
        assert "No backend type associated" not in str(raised.value)


def test_a_gloo_group_reduces_on_the_cpu(torchrun_env):
    torchrun_env("gloo")
    ctx = context()
    if not torch.cuda.is_available():
        assert ctx.distributed and ctx.device == torch.device("cpu")
        assert ctx.all_sum([1.5, 2.0, 3.0]) == [1.5, 2.0, 3.0]


def test_the_device_is_chosen_after_the_distributed_context(torchrun_env, monkeypatch):
    """resolve_device joins the job first (set_device(LOCAL_RANK)), so every stage and helper that
    resolves a device gets this rank's GPU; an explicit other GPU is refused."""
    torchrun_env("cpu:gloo")
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert chosen == [1] and context().local_rank == 1  # the context this call made
    assert resolve_device("cuda") == resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu") and chosen == [1]  # joined once
    with pytest.raises(UserError, match="under torchrun"):
        resolve_device("cuda:0")


def _fake_cuda_host(monkeypatch, gpus: int) -> list:
    """This process as rank 1 of 2 on a host with ``gpus`` GPUs (torch's cuda queries answer so);
    returns the devices set_device was given."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    return chosen


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_more_ranks_than_gpus_under_nccl_is_refused_in_one_line(torchrun_env, monkeypatch, device):
    chosen = _fake_cuda_host(monkeypatch, gpus=1)
    with pytest.raises(UserError, match="2 ranks on this host but 1 GPU.*--nproc-per-node 1.*--dist-backend gloo"):
        context(device)
    assert chosen == [] and not dist.is_initialized()  # refused before the group or a GPU is touched


def test_the_backend_follows_the_device_not_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    assert distributed.chosen_backend(distributed.requested_device_type("cpu")) == "gloo"
    assert distributed.chosen_backend(distributed.requested_device_type("cuda:0")) == "nccl"
    assert distributed.chosen_backend(distributed.requested_device_type("auto")) == "nccl"
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")
    assert distributed.chosen_backend("cuda") == "gloo"
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    with pytest.raises(UserError, match="--dist-backend nccl reduces cuda tensors only"):
        distributed.chosen_backend("cpu")


def test_ranks_may_share_a_gpu_over_gloo(torchrun_env, monkeypatch):
    chosen = _fake_cuda_host(monkeypatch, gpus=1)
    torchrun_env("gloo")
    assert resolve_device("cuda") == torch.device("cuda", 0) and chosen == [0]  # LOCAL_RANK 1 % 1 GPU


FAKE_CUDA_HOST = """
import sys
import torch
# a machine with one GPU as torch sees it; the run itself asks for the cpu
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
def no_gpu(*args, **kwargs):
    raise AssertionError("a --device cpu run touched a GPU")
torch.cuda.set_device = no_gpu
from energytools.cli import main
sys.argv = ["energytools"] + sys.argv[1:]
main()
"""


def test_a_cpu_run_under_torchrun_on_a_cuda_machine_uses_gloo_and_no_gpu(digits_run, tmp_path):
    """On a machine with CUDA, `torchrun ... --device cpu` used to make an nccl group (and claim
    cuda:LOCAL_RANK, invalid for more ranks than GPUs), then fail to put cpu parameters in DDP."""
    from test_distributed import torchrun

    script = tmp_path / "fake_cuda_host.py"
    script.write_text(FAKE_CUDA_HOST)
    out = tmp_path / "ddp"
    result = torchrun("distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", "kd",
                      "--epochs", 1, "--out", out, "--device", "cpu", script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "best.pt").exists()


# --- the step path: no host read, no data-dependent shape -----------------------------------

def _fake_step_inputs(mode):
    batch, classes = 16, 10
    return (mode.from_tensor(torch.randn(batch, classes)), mode.from_tensor(torch.randn(batch, classes)),
            mode.from_tensor(torch.randint(0, classes, (batch,))), mode.from_tensor(torch.rand(batch) * 4 + 1),
            mode.from_tensor(torch.rand(batch)))


def test_the_losses_make_no_data_dependent_shape_or_host_read():
    """Under FakeTensorMode an op whose output shape depends on the values (boolean indexing,
    nonzero) or a host read (item, bool) raises: each is a wait for the device on cuda."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        student, teacher, labels, temperatures, lam = _fake_step_inputs(mode)
        for t in (4.0, temperatures):  # kd, energy-kd; dkd, energy-dkd
            assert kd_loss(student, teacher, t).shape == ()
            assert dkd_loss(student, teacher, labels, temperature=t).shape == ()
        assert mixed_cross_entropy(student, labels, labels.flip(0), lam).shape == ()


def test_online_he_da_mixes_without_host_reads():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        images = mode.from_tensor(torch.rand(16, 3, 8, 8))
        high = mode.from_tensor(torch.rand(16) > 0.7)
        mixed = mix_high_energy(images, high, np.random.default_rng(0))
        assert mixed.images.shape == images.shape and mixed.weights.shape == (16,)
        student, teacher, *_ = _fake_step_inputs(mode)
        assert mixed_kd_term(student, teacher, 0.9, mixed.weights).shape == ()


def test_mixing_keeps_partners_among_the_high_energy_samples():
    images = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 1, 16, 16).clone()
    for seed in range(20):
        high = torch.from_numpy(np.random.default_rng(seed).random(12) < 0.4)
        mixed = mix_high_energy(images, high, np.random.default_rng(seed))
        sources = set(torch.nonzero(high).flatten().tolist())
        for row in torch.nonzero(high).flatten().tolist():
            values = set(mixed.images[row].unique().tolist())
            assert values <= {float(s) for s in sources}
            if mixed.lam < 1 and len(sources) >= 2:
                assert len(values) == 2  # a partner other than itself
        assert mixed.weights.tolist() == (high & (high.sum() >= 2)).float().tolist()


# --- precision -----------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["kd", "dkd"])
def test_losses_compute_in_float32_under_bf16_autocast(loss):
    torch.manual_seed(0)
    student, teacher = (torch.randn(32, 10) * 3).bfloat16(), (torch.randn(32, 10) * 3).bfloat16()
    labels = torch.randint(0, 10, (32,))
    temperatures = torch.tensor([2.0, 4.3, 6.1, 3.7] * 8)  # not exact in bf16

    def run(s, t):
        if loss == "kd":
            return kd_loss(s, t, temperatures, reduction="none")
        return dkd_loss(s, t, labels, temperature=temperatures, reduction="none")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_precision = run(student, teacher)
    reference = run(student.float(), teacher.float())  # float32 throughout, no autocast
    assert mixed_precision.dtype == torch.float32
    torch.testing.assert_close(mixed_precision, reference, rtol=1e-6, atol=1e-6)


def test_teacher_passes_that_decide_groups_run_float32_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    images = torch.randn(8, 1, 8, 8)

    class Batch:
        pass

    batch = Batch()
    batch.images = images
    with torch.no_grad():
        reference = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = OnlineTeacher(model, exact=torch.device("cpu"))(batch, None)
        plain = OnlineTeacher(model)(batch, None)
    assert exact.dtype == torch.float32 and torch.equal(exact, reference)
    assert energy(exact).dtype == torch.float32
    assert not torch.equal(plain, reference)  # the step's autocast would have reached the teacher


def test_fp16_is_the_fallback_where_bf16_is_only_emulated(monkeypatch):
    """V100/T4: bf16 emulated, not supported; autocast must pick fp16 (and GradScaler)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        assert autocast(torch.device("cuda")).fast_dtype == torch.float16


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_float32_exact_sets_cudnn_as_a_whole():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision
    with float32_exact(torch.device("cuda")):  # flags only: no CUDA device needed
        assert torch.backends.cudnn.allow_tf32 is False  # conv and rnn agree: the legacy read works
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("ieee", "ieee")
    assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision) == before
    assert torch.backends.cudnn.allow_tf32 is True  # and readable after


# --- reproducibility -----------------------------------------------------------------------

def test_deterministic_sets_and_restores_the_flags():
    assert not torch.are_deterministic_algorithms_enabled()
    with engine.deterministic(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is False
    assert not torch.are_deterministic_algorithms_enabled()


def test_importing_energytools_sets_the_cublas_workspace_before_any_matmul(tmp_path):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG at a process's first GPU matmul: a recipe's earlier stage,
    a notebook or a test suite may run one before --deterministic's training starts, so the variable
    is set at import (a value in the environment wins)."""
    import os
    import subprocess
    import sys

    code = "import os, energytools; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert plain.stdout.strip() == ":4096:8"
    mine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "CUBLAS_WORKSPACE_CONFIG": ":16:8"})
    assert mine.stdout.strip() == ":16:8"


def test_deterministic_on_cuda_with_a_nondeterministic_cublas_setting_is_refused(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(UserError, match="--deterministic on cuda: CUBLAS_WORKSPACE_CONFIG=':0:0'"):
        with engine.deterministic(True, torch.device("cuda", 0)):
            pass
    with engine.deterministic(True, torch.device("cpu")):  # the cpu does not use cuBLAS
        assert torch.are_deterministic_algorithms_enabled()


def test_a_deterministic_run_saves_the_grad_scaler_for_resume(tmp_path, runner):
    from conftest import invoke

    from energytools.models import load_checkpoint
    from energytools.stages.train import train

    help_text = invoke(runner, "distill", "--help").output
    assert "--deterministic" in help_text
    train(TrainStageConfig(model="cnn_tiny", out=str(tmp_path / "t"), data=DataConfig(dataset="digits", limit=128,
                                                                                      eval_limit=32),
                           train=TrainConfig(epochs=1, batch_size=64, deterministic=True)))
    assert "scaler" in load_checkpoint(tmp_path / "t" / "last.pt")
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
