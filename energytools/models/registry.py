"""Models by name: ``MODELS[name](num_classes=..., in_channels=...) -> nn.Module``."""
from __future__ import annotations

from typing import Callable

MODELS: dict[str, Callable] = {}
#: name -> short description shown by `energytools models`
DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str = ""):
    def decorator(fn):
        MODELS[name] = fn
        DESCRIPTIONS[name] = description
        return fn
    return decorator
