"""Models by name: ``MODELS[name](num_classes=..., in_channels=...) -> nn.Module``.

Names of the form ``<prefix>:<name>`` come from another library (``SOURCES[prefix]``):
``timm:resnet18`` is timm's resnet18, ``hf:DIR`` the Hugging Face model saved in DIR.
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelSource:
    """How to build ``<prefix>:<name>`` models and read the preprocessing their weights expect."""

    #: (name, num_classes, in_channels, image_size) -> nn.Module with random weights
    build: Callable
    #: name -> {"mean", "std", "input_size": [H, W], "interpolation"}, or None when unknown
    preprocessing: Callable
    #: how the name is spelled, shown by `energytools models`
    usage: str
    description: str


#: prefix (the text before ":") -> source
SOURCES: dict[str, ModelSource] = {}


def register_source(prefix: str, source: ModelSource) -> None:
    SOURCES[prefix] = source
