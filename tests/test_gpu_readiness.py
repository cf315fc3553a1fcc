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
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert chosen == [1] and context().local_rank == 1  # the context this call made
    assert resolve_device("cuda") == resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu") and chosen == [1]  # joined once
    with pytest.raises(UserError, match="under torchrun"):
        resolve_device("cuda:0")


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

def test_deterministic_sets_and_restores_the_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with engine.deterministic(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is False
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()


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
