"""CIFAR VGGs with mdistiller's module names (vgg8, vgg11, vgg13, vgg16, vgg19), batch norm."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model

CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _stage(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied in forward, as mdistiller does


class VGG(nn.Module):
    def __init__(self, config: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.block0 = _stage(config[0], in_channels)
        self.block1 = _stage(config[1], config[0][-1])
        self.block2 = _stage(config[2], config[1][-1])
        self.block3 = _stage(config[3], config[2][-1])
        self.block4 = _stage(config[4], config[3][-1])
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if x.shape[-1] >= 8:  # 64x64 inputs get a fourth pooling, as in mdistiller
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


for _name, _config in CONFIGS.items():
    def _build(num_classes: int = 100, in_channels: int = 3, config=_config):
        return VGG(config, num_classes, in_channels)
    register_model(_name, f"CIFAR VGG with batch norm ({_name[3:]} layers, mdistiller keys)")(_build)
