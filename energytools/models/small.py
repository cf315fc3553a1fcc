"""Small students for 28x28 and 8x8 inputs: the CPU-sized end of the model zoo."""
from __future__ import annotations

import torch.nn as nn

from .registry import register_model


def _cnn(widths: tuple[int, ...], num_classes: int, in_channels: int, hidden: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
        in_channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


@register_model("cnn_tiny", "2-conv CNN (8, 16 channels), ~3k params: a weak student for 28x28")
def cnn_tiny(num_classes: int = 10, in_channels: int = 1):
    return _cnn((8, 16), num_classes, in_channels, 32)


@register_model("cnn_small", "3-conv CNN (16, 32, 64 channels), ~30k params: a student for 28x28")
def cnn_small(num_classes: int = 10, in_channels: int = 1):
    return _cnn((16, 32, 64), num_classes, in_channels, 64)


@register_model("mlp", "one hidden layer of 128 units over the flattened image")
def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))
