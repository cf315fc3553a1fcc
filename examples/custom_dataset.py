"""Bring your own dataset and teacher through the Python API.

Registers a dataset (here: scikit-learn's digits, upscaled to 16x16 to stand in for "yours"),
trains a small teacher on it, scores it, selects the hardest 20% and distills a student.

    python examples/custom_dataset.py runs/example
"""
import sys
from pathlib import Path

import numpy as np

from energytools.config import DataConfig, DistillConfig, ScoreConfig, TrainConfig, TrainStageConfig
from energytools.data import DatasetInfo, register_dataset
from energytools.data.base import ArrayImages
from energytools.stages.distill import distill
from energytools.stages.score import score
from energytools.stages.train import train


@register_dataset("my-digits")
def load_my_digits(root, part, **_):
    """Digits at 16x16: any (images uint8 NxHxWxC, labels) pair works the same way."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.kron(np.clip(bunch.images * 16, 0, 255), np.ones((2, 2))).astype(np.uint8)
    ids = np.arange(len(images))
    keep = ids % 5 == 0 if part == "test" else ids % 5 != 0
    info = DatasetInfo("my-digits", 10, 1, 16, (0.3,), (0.38,), train_flip=False)
    return info, ArrayImages(images[keep]), bunch.target[keep], ids[keep]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
    data = DataConfig(dataset="my-digits")
    train(TrainStageConfig(model="resnet8", out=str(out / "teacher"), data=data, train=TrainConfig(epochs=3),
                           overwrite=True))
    table = score(ScoreConfig(teacher=str(out / "teacher" / "best.pt"), data=data, out=str(out / "scores.parquet"),
                              overwrite=True))
    distill(DistillConfig(scores=str(table), student="cnn_tiny", method="energy-kd", out=str(out / "student"),
                          train=TrainConfig(epochs=3), overwrite=True))
