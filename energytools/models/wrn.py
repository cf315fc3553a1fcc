"""Wide ResNets with mdistiller's module names (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, count: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1) for i in range(count)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        assert (depth - 4) % 6 == 0
        count = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(count, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(count, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(count, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    def _build(num_classes: int = 100, in_channels: int = 3, depth=_depth, widen=_widen):
        return WideResNet(depth, widen, num_classes, in_channels)
    register_model(f"wrn_{_depth}_{_widen}", f"Wide ResNet {_depth}-{_widen} (mdistiller keys)")(_build)
