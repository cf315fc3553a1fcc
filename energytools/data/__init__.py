"""Datasets by name, splits, subsets and the batch transforms."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from ..energy import NO_LABEL
from ..errors import UserError, option_name
from .base import ArrayImages, DatasetInfo, FileImages, ImageSet, to_array
from .loaders import DATASETS, EVAL_CROP_FRACTION, register_dataset
from .subsets import VAL_FRACTION, carve_validation, long_tail, long_tail_counts, stratified_limit

SPLITS = ("train", "val", "test")

__all__ = ["DATASETS", "DatasetInfo", "ImageSet", "SPLITS", "VAL_FRACTION", "build_dataset",
           "long_tail_counts", "read_as", "register_dataset"]


def build_dataset(name: str, split: str = "train", data_root: str | Path | None = None,
                  limit: int | None = None, imbalance_factor: float | None = None,
                  image_size: int | None = None, crop_pad: int | None = None, unlabelled: bool = False) -> ImageSet:
    """Load one split of a dataset by name.

    ``train`` and ``val`` both come from the training file: ``val`` is a fixed, stratified
    ``VAL_FRACTION`` of it and ``train`` is the rest. ``imbalance_factor`` applies the
    long-tail recipe to ``train`` only (val and test stay balanced, as in CIFAR-100-LT).
    ``limit`` then keeps a class-stratified subset of exactly ``limit`` samples.
    ``crop_pad`` sets the train transform's pad-and-crop (0: none), for datasets of same-size
    images (not imagefolder, whose train transform is a RandomResizedCrop).

    Samples without a label (NO_LABEL: an imagefolder root without train/ and val/, Parquet
    without a label column or with null labels) are refused unless ``unlabelled`` (what
    `score` passes): they stay in ``train`` (``val`` is carved from the labelled ones) and
    ``limit`` treats them as one more class.
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
    where = f"{name}{f' in {root}' if root else ''}"
    missing = int((labels == NO_LABEL).sum())
    if info.num_classes == 1:  # softmax over one class is 1 everywhere: no energy, no distillation
        raise UserError(f"{where} has {info.num_classes} class; a classifier needs at least two")
    if missing and imbalance_factor is not None:
        raise UserError(f"--imbalance-factor needs labels; {where} has {missing} images without one")
    if crop_pad is not None:
        if info.train_resized_crop:
            raise UserError(f"{option_name('crop_pad')} does not apply to {name}: it trains with a RandomResizedCrop")
        info = dataclasses.replace(info, train_crop_pad=crop_pad)
    ids = np.arange(len(labels)) if ids is None else ids
    dataset = ImageSet(info, split, images, labels, ids)
    if split != "test":
        train_positions, val_positions = carve_validation(labels, info.num_classes)
        dataset = dataset.subset(train_positions if split == "train" else val_positions)
        if split == "val" and not len(dataset) and missing:
            raise UserError(f"{where} has no validation samples: val is carved from labelled training images, "
                            "and it has none")
        if split == "train" and imbalance_factor and imbalance_factor > 1:
            dataset = dataset.subset(long_tail(dataset.labels, info.num_classes, imbalance_factor))
    if limit is not None:
        labels, classes = dataset.labels, info.num_classes
        if (labels == NO_LABEL).any():  # the images without a label are one more stratum
            labels, classes = np.where(labels == NO_LABEL, classes, labels), classes + 1
        dataset = dataset.subset(stratified_limit(labels, classes, limit))
    missing = int((dataset.labels == NO_LABEL).sum())
    if missing and not unlabelled:
        raise UserError(f"{where}: {missing} of the {len(dataset)} images of its {split} split have no label; "
                        "train, distill and augment need a label for every sample (only `energytools score` "
                        "reads images without labels)")
    return dataset


def read_as(dataset: ImageSet, like: DatasetInfo, keep_labels: bool = True) -> ImageSet:
    """``dataset`` read as the data of ``like`` is: converted to its channels, brought to its image
    size (imagefolder's Resize + CenterCrop for files; shorter side and centre crop for images in
    memory), normalised with its mean and std, with its classes. How `score` feeds new images to a
    teacher trained on ``like``. Sample ids and order stay; labels too, or with ``keep_labels``
    False (labels of other classes than ``like``'s) every label is NO_LABEL."""
    size, channels = like.image_size, like.in_channels
    images = dataset.images
    if isinstance(images, FileImages):
        paths = [images.paths[p] for p in dataset.positions]
        read = FileImages(paths, images.root, size, channels, round(size / EVAL_CROP_FRACTION))
    else:
        arrays = [dataset.image(i) for i in range(len(dataset))]
        read = ArrayImages(np.stack([array if array.shape == (size, size, channels) else
                                     to_array(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array),
                                              channels, size) for array in arrays])
                           if arrays else np.zeros((0, size, size, channels), np.uint8))
    info = dataclasses.replace(like, name=dataset.info.name)
    labels = dataset.labels if keep_labels else np.full(len(dataset), NO_LABEL, dtype=np.int64)
    return ImageSet(info, dataset.split, read, labels, dataset.sample_ids)
