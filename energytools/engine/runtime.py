"""Where and how a process computes: the device, mixed precision, float32-exact passes and
seeding. Every stage and helper gets its device from :func:`resolve_device`."""
from __future__ import annotations

import contextlib

import torch

from ..errors import UserError


def seed_everything(seed: int) -> None:
    """Seed the global generators; call before building a model so its init is reproducible."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """cuda if present, else mps, else cpu (or exactly what the user asked for)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on cuda (where supported, else fp16); a no-op elsewhere."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to cuda through pinned memory with a
    non-blocking copy, so the host does not wait for the device's queue."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)


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
        saved = cudnn_conv.fp32_precision, matmul.fp32_precision
        cudnn_conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved
