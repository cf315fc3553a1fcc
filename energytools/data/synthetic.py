"""Small datasets in the on-disk formats the loaders read, with random pixels: for tests,
benchmarks and smoke runs on machines that hold no real data."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR_TRAIN_BATCHES = 5


def _dump(path: Path, payload: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)


def write_cifar(root: Path | str, classes: int, train: int, test: int, rng: np.random.Generator) -> Path:
    """CIFAR-10 (``classes`` 10) or CIFAR-100 (100) under ``root`` in torchvision's python
    layout: uint8 pixels from ``rng``, labels 0, 1, ... cycling through the classes. CIFAR-10's
    ``train`` images are split over its five training batches. Returns ``root``."""
    root = Path(root)
    if classes == 10 and train % CIFAR_TRAIN_BATCHES:
        raise ValueError(f"CIFAR-10's {train} training images do not split over {CIFAR_TRAIN_BATCHES} batches")
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        files = [(f"data_batch_{i}", train // CIFAR_TRAIN_BATCHES) for i in range(1, CIFAR_TRAIN_BATCHES + 1)]
        label_key, meta = b"labels", ("batches.meta", b"label_names")
    elif classes == 100:
        folder = root / "cifar-100-python"
        files = [("train", train)]
        label_key, meta = b"fine_labels", ("meta", b"fine_label_names")
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, not {classes}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in files + [("test_batch" if classes == 10 else "test", test)]:
        _dump(folder / name, {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                              label_key: list(np.arange(n) % classes)})
    _dump(folder / meta[0], {meta[1]: [f"c{i}".encode() for i in range(classes)]})
    return root


def write_image_folder(root: Path | str, counts: dict[str, int], shape, rng: np.random.Generator,
                       formats=lambda i: ("jpg", "JPEG")) -> Path:
    """An image folder (``root/<split>/<class>/<i>.<suffix>``) of noisy RGB images in two classes,
    "dark" and "bright", ``counts[split]`` images per class. ``shape`` is (height, width) or a
    function of the image's index i giving it; image i is saved as ``formats(i)``, a (suffix, PIL
    format) pair. Returns ``root``."""
    from PIL import Image

    root = Path(root)
    shape_of = shape if callable(shape) else (lambda i: shape)
    for split, count in counts.items():
        for label, cls in enumerate(("dark", "bright")):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(70 + 110 * label, 40, (*shape_of(i), 3)), 0, 255).astype(np.uint8)
                suffix, image_format = formats(i)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{suffix}", format=image_format)
    return root
