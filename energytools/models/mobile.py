"""MobileNetV2 and ShuffleNet V1/V2 for CIFAR, with mdistiller's module names."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


def _conv_bn(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, expand: int = 6, width: float = 0.5, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        settings = [[1, 16, 1, 1], [expand, 24, 2, 1], [expand, 32, 3, 2], [expand, 64, 4, 2],
                    [expand, 96, 3, 1], [expand, 160, 3, 2], [expand, 320, 1, 1]]
        channels = int(32 * width)
        self.conv1 = _conv_bn(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            out = int(c * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn(channels, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    return x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(batch, channels, height, width)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        self.g = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.shortcut(x)
        return F.relu(torch.cat([out, residual], 1) if self.stride == 2 else out + residual)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, out_planes=(240, 480, 960),
                 num_blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, count: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(count):
            concatenated = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Block(self.in_planes, out_planes - concatenated, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ShuffleV2Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(right)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return _shuffle(torch.cat([left, out], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, out_channels=(116, 232, 464, 1024),
                 num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, count: int) -> nn.Sequential:
        layers = [ShuffleV2Down(self.in_channels, out_channels)] + [ShuffleV2Block(out_channels) for _ in range(count)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


register_model("MobileNetV2", "MobileNetV2 (expand 6, width 0.5) for CIFAR, as mdistiller's mobile_half")(
    lambda num_classes=100, in_channels=3: MobileNetV2(6, 0.5, num_classes, in_channels))
register_model("ShuffleV1", "ShuffleNet V1 (g=3) for CIFAR, mdistiller layout")(
    lambda num_classes=100, in_channels=3: ShuffleNetV1(num_classes, in_channels))
register_model("ShuffleV2", "ShuffleNet V2 (1x) for CIFAR, mdistiller layout")(
    lambda num_classes=100, in_channels=3: ShuffleNetV2(num_classes, in_channels))
