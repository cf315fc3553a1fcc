"""Datasets by name, splits, subsets and the batch transforms."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import UserError, option_name
from .base import DatasetInfo, ImageSet
from .loaders import DATASETS, register_dataset
from .subsets import VAL_FRACTION, carve_validation, long_tail, long_tail_counts, stratified_limit

SPLITS = ("train", "val", "test")

__all__ = ["DATASETS", "DatasetInfo", "ImageSet", "SPLITS", "VAL_FRACTION", "build_dataset",
           "long_tail_counts", "register_dataset"]


def build_dataset(name: str, split: str = "train", data_root: str | Path | None = None,
                  limit: int | None = None, imbalance_factor: float | None = None,
                  image_size: int | None = None, crop_pad: int | None = None) -> ImageSet:
    """Load one split of a dataset by name.

    ``train`` and ``val`` both come from the training file: ``val`` is a fixed, stratified
    ``VAL_FRACTION`` of it and ``train`` is the rest. ``imbalance_factor`` applies the
    long-tail recipe to ``train`` only (val and test stay balanced, as in CIFAR-100-LT).
    ``limit`` then keeps a class-stratified subset of exactly ``limit`` samples.
    ``crop_pad`` sets the train transform's pad-and-crop (0: none), for datasets of same-size
    images (not imagefolder, whose train transform is a RandomResizedCrop).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if limit is not None and limit <= 0:
        raise UserError(f"{option_name('limit')} must be positive, got {limit}")
    if imbalance_factor is not None and not imbalance_factor >= 1:
        raise UserError(f"{option_name('imbalance_factor')} must be >= 1, got {imbalance_factor}")
    root = Path(data_root).expanduser() if data_root else None
    if root is not None and not root.exists():
        raise UserError(f"{option_name('data_root', str(root))} does not exist")
    if crop_pad is not None and crop_pad < 0:
        raise UserError(f"{option_name('crop_pad')} must be >= 0, got {crop_pad}")
    info, images, labels, ids = DATASETS[name](root, "test" if split == "test" else "train", image_size=image_size)
    if info.num_classes < 2:  # softmax over one class is 1 everywhere: no energy, no distillation
        raise UserError(f"{name}{f' in {root}' if root else ''} has {info.num_classes} class; a classifier needs "
                        "at least two")
    if crop_pad is not None:
        if info.train_resized_crop:
            raise UserError(f"{option_name('crop_pad')} does not apply to {name}: it trains with a RandomResizedCrop")
        info = dataclasses.replace(info, train_crop_pad=crop_pad)
    ids = np.arange(len(labels)) if ids is None else ids
    dataset = ImageSet(info, split, images, labels, ids)
    if split != "test":
        train_positions, val_positions = carve_validation(labels, info.num_classes)
        dataset = dataset.subset(train_positions if split == "train" else val_positions)
        if split == "train" and imbalance_factor and imbalance_factor > 1:
            dataset = dataset.subset(long_tail(dataset.labels, info.num_classes, imbalance_factor))
    if limit is not None:
        dataset = dataset.subset(stratified_limit(dataset.labels, info.num_classes, limit))
    return dataset
