"""CIFAR ResNets with mdistiller's module names (resnet8 ... resnet110, resnet8x4, resnet32x4).

State-dict keys and shapes match mdistiller's ``mdistiller/models/cifar/resnet.py`` so its
published checkpoints load with ``strict=True``. The final pooling is adaptive (no
parameters) so 28x28 inputs work too.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth should be 6n+2"
        blocks = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], blocks)
        self.layer2 = self._make_layer(num_filters[2], blocks, stride=2)
        self.layer3 = self._make_layer(num_filters[3], blocks, stride=2)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _register_resnet(name: str, depth: int, filters: list[int]):
    @register_model(name, f"CIFAR ResNet depth {depth}, widths {filters[1:]} (mdistiller keys)")
    def build(num_classes: int = 100, in_channels: int = 3):
        return CifarResNet(depth, filters, num_classes, in_channels)
    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, [16, 16, 32, 64])
_register_resnet("resnet8x4", 8, [32, 64, 128, 256])
_register_resnet("resnet32x4", 32, [32, 64, 128, 256])
