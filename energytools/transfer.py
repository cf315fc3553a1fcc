"""Host-to-device copies that do not make the host wait (a module of its own so that the
lowest layers, such as energytools.temperatures, can use it)."""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to cuda through pinned memory with a
    non-blocking copy, so the host does not wait for the device's queue."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)
