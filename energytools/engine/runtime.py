"""Where and how a process computes: the device, mixed precision, float32-exact passes and
seeding. Every stage and helper gets its device from :func:`resolve_device`."""
from __future__ import annotations

import contextlib

import torch

from ..cuda_env import CUBLAS_ENV, DETERMINISTIC_CUBLAS, cublas_deterministic_problem
from ..distributed import context
from ..errors import UserError, option_name


def seed_everything(seed: int) -> None:
    """Seed the global generators; call before building a model so its init is reproducible."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """cuda if present, else mps, else cpu (or exactly what the user asked for). Joins the torchrun
    job first (:func:`context`, whose process group follows this device), so a bare cuda is this
    rank's GPU."""
    ctx = context(name)  # the process group and this rank's GPU come before any device is chosen
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option_name('device', 'cuda')} asked for, but no CUDA device is available")
    if not ctx.distributed:
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device
    if device.type != "cuda":
        if ctx.backend == "nccl":  # a job that joined for cuda (an earlier stage) cannot run DDP on the cpu
            raise UserError(f"{option_name('device', name)} under torchrun: this job's process group is nccl (made "
                            f"for cuda); pass {option_name('device', 'cuda')}, or --dist-backend gloo")
        return device
    index = ctx.cuda_index()
    if device.index is not None and device.index != index:
        raise UserError(f"{option_name('device', name)} under torchrun: each rank trains on its own GPU (this one: "
                        f"cuda:{index}, from LOCAL_RANK); pass {option_name('device', 'cuda')}")
    return torch.device("cuda", index)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """What ``--amp`` computes in on ``device``: bf16 on cuda where the GPU has it natively, else fp16
    (which needs a GradScaler); None (float32) elsewhere. autocast and the GradScaler both ask here."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on cuda (where supported, else fp16); a no-op elsewhere."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def float32_exact(device: torch.device, enabled: bool = True):
    """On cuda, float32 convolutions and matmuls in full precision inside the block: PyTorch lets
    cuDNN use TF32 (10-bit mantissa) for float32 convolutions by default, which is not what a
    float32 energy table promises. Restores the previous settings; a no-op elsewhere."""
    if device.type != "cuda" or not enabled:
        yield
        return
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):  # torch >= 2.9
        # cuDNN as a whole: conv, rnn and the legacy flag, which reading the legacy
        # torch.backends.cudnn.allow_tf32 checks against the two (it raises when they differ)
        cudnn, flags = torch.backends.cudnn, (cudnn_conv, torch.backends.cudnn.rnn, matmul)
        saved = [flag.fp32_precision for flag in flags]
        try:
            legacy = cudnn.allow_tf32
        except RuntimeError:  # already mixed by the caller
            legacy = saved[0] == "tf32"
        cudnn.allow_tf32 = False
        for flag in flags:
            flag.fp32_precision = "ieee"
        try:
            yield
        finally:
            cudnn.allow_tf32 = legacy
            for flag, value in zip(flags, saved):
                flag.fp32_precision = value
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


@contextlib.contextmanager
def deterministic(enabled: bool = True, device: torch.device | None = None):
    """Deterministic algorithms inside the block (``--deterministic``): on CUDA a resumed run then
    ends with the same weights as an uninterrupted one, at some cost in speed (no atomics in
    cuDNN weight gradients and in some backward kernels, no cuDNN autotuning). cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` from the process's first GPU matrix multiply on, which importing
    energytools sets (:mod:`energytools.cuda_env`); a cuda run where that came too late is refused
    in one line."""
    if not enabled:
        yield
        return
    problem = cublas_deterministic_problem()
    if problem is not None and device is not None and device.type == "cuda":
        raise UserError(f"--deterministic on cuda: {problem}; start the process with "
                        f"{CUBLAS_ENV}={DETERMINISTIC_CUBLAS[0]} in the environment")
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
