"""An exponential moving average of a model's weights (timm's ModelEmaV3, reduced): after each
optimizer step ``ema = decay * ema + (1 - decay) * weights`` for the floating-point parameters
and buffers, while other buffers (BatchNorm's ``num_batches_tracked``) are copied. A small
object with its own state dict, saved in last.pt beside the model so a resumed run is exact."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def create_ema(model: nn.Module, cfg) -> "ModelEma | None":
    """The EMA a train config asks for (``ema_decay``, ``ema_warmup``), or None."""
    decay = getattr(cfg, "ema_decay", None)
    return ModelEma(model, decay, warmup=bool(getattr(cfg, "ema_warmup", None))) if decay else None


class ModelEma(nn.Module):
    """The averaged copy of ``model`` (``.module``, in eval mode, no gradients).

    Float parameters are averaged; buffers are copied from the model (the BatchNorm running
    statistics are already averages), as ModelEmaV3 does by default. With ``warmup`` the decay
    of update n (0-based) is ``min(decay, 1 - (1 + n)^(-2/3))``, ModelEmaV3's warm-up (gamma 1,
    power 2/3): the first update copies the weights, and ``updates`` travels in last.pt."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.updates) ** (-2.0 / 3.0))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = [p for p in self.module.parameters() if p.is_floating_point()]
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
        self.updates += 1
        ema_buffers = list(self.module.buffers())
        if ema_buffers:  # one foreach copy, not a kernel a buffer (a ResNet has three per BatchNorm)
            torch._foreach_copy_(ema_buffers, list(model.buffers()))

    def checkpoint_state(self) -> dict:
        """What last.pt holds of the average: its weights (keyed as the model's) and update count."""
        return {"ema": self.state_dict(), "ema_updates": self.updates}

    def restore(self, checkpoint: dict) -> None:
        """Continue the average :meth:`checkpoint_state` saved in ``checkpoint`` (when it holds one)."""
        if checkpoint.get("ema"):
            self.load_state_dict(checkpoint["ema"])
            self.updates = checkpoint.get("ema_updates", 0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):  # the averaged weights, keyed as the model's
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)
