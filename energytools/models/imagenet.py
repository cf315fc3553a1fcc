"""torchvision's ImageNet models, by name (weights are loaded from a file, never downloaded)."""
from __future__ import annotations

import torch.nn as nn

from .registry import register_model


def _adapt_first_conv(model: nn.Module, attribute_path: str, in_channels: int) -> nn.Module:
    if in_channels == 3:
        return model
    parent = model
    *parents, last = attribute_path.split(".")
    for name in parents:
        parent = getattr(parent, name) if not name.isdigit() else parent[int(name)]
    conv = parent[int(last)] if last.isdigit() else getattr(parent, last)
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)
    return model


for _name, _first in (("resnet18", "conv1"), ("resnet34", "conv1"), ("resnet50", "conv1"),
                      ("mobilenet_v2", "features.0.0")):
    def _build(num_classes: int = 1000, in_channels: int = 3, name=_name, first=_first):
        import torchvision  # imported on use: it costs over a second at start-up

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        return _adapt_first_conv(model, first, in_channels)
    register_model(_name, f"torchvision {_name} (ImageNet layout; torchvision state-dict keys)")(_build)
