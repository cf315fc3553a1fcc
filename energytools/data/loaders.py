"""Readers for each dataset's real on-disk format, by name (a registry).

A loader takes ``(root, part, **options)`` with part "train" or "test" and returns
``(info, images, labels, sample_ids)``; ``sample_ids`` None means positions in the file.
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from ..energy import NO_LABEL
from ..errors import UserError, option_name
from .base import ArrayImages, DatasetInfo, FileImages, imagenet_stats
from .parquet import read_split as read_parquet_split

#: name -> loader(root, part) with part in {"train", "test"}
DATASETS: dict[str, Callable] = {}

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path(os.environ.get("ENERGYTOOLS_DATA", Path.home() / ".cache" / "energytools"))


def register_dataset(name: str):
    def decorator(fn):
        DATASETS[name] = fn
        return fn
    return decorator


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped), the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} bytes of data, found {body.size}")
    return body.reshape(shape)


def _find_idx(directories: list[Path], stem: str) -> Path | None:
    for directory in directories:
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.exists():
                return candidate
    return None


@register_dataset("fashion-mnist")
def load_fashion_mnist(root: Path | None, part: str, **_):
    info = DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), train_flip=True,
                       classes=FASHION_CLASSES)
    prefix = "train" if part == "train" else "t10k"
    roots = [root] if root else []
    roots.append(DEFAULT_DATA_ROOT)
    directories = []
    for base in roots:
        directories += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    directories.append(SYSTEM_FASHION_MNIST)
    images_path = _find_idx(directories, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directories, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        target = root or DEFAULT_DATA_ROOT
        try:  # what users with a network get: torchvision's own download
            import torchvision

            torchvision.datasets.FashionMNIST(str(target), train=part == "train", download=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not available"
            searched = ", ".join(str(d) for d in directories)
            raise UserError(f"Fashion-MNIST not found (looked in {searched}) and download failed: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return load_fashion_mnist(target, part)
    images, labels = read_idx(images_path), read_idx(labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"{images_path} and {labels_path} disagree on the number of samples")
    return info, ArrayImages(images), labels, None


class Refused(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR file never holds."""


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python-format files: dicts, lists, bytes, numbers and numpy arrays.

    A pickle names the functions it calls to rebuild objects; any name outside the few
    numpy builds below (a payload's ``os.system``, a class) is refused before it runs.
    """

    #: numpy's array and scalar builders: numpy 1.x wrote ``numpy.core``, numpy 2 writes
    #: ``numpy._core``; pickle protocol 5 stores arrays as buffers (``_frombuffer``); scalars
    #: are labels saved as numpy integers.
    ALLOWED = {(f"numpy{core}.{module}", name) for core in (".core", "._core")
               for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                    ("numeric", "_frombuffer"))} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise Refused(f"it names {module}.{name}")
        if name == "dtype":
            return _plain_dtype
        return super().find_class(module, name)


def _plain_dtype(*args):
    """np.dtype, but not for Python objects: an object array would rebuild pointers from bytes."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise Refused("it holds an array of Python objects")
    return dtype


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = CifarUnpickler(handle, encoding="bytes").load()
    except OSError as exc:
        raise UserError(f"cannot read CIFAR file {path}: {exc}") from None
    except Refused as exc:
        raise UserError(f"refusing CIFAR file {path}: {exc}; a CIFAR file holds only dicts, lists, bytes, "
                        "numbers and numpy arrays (see docs/security.md)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:  # garbled
        raise UserError(f"cannot read CIFAR file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a CIFAR file: it holds a {type(data).__name__}, not a dict")
    return data


def _load_cifar(root: Path | None, part: str, num_classes: int):
    folder_name, files, label_key = {
        10: ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
             b"labels"),
        100: ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels"),
    }[num_classes]
    base = root or DEFAULT_DATA_ROOT
    folder = base / folder_name
    if not folder.exists():
        try:
            import torchvision

            cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
            cls(str(base), train=part == "train", download=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"CIFAR-{num_classes} not found in {folder} and download failed: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    meta = _unpickle(folder / ("batches.meta" if num_classes == 10 else "meta"))
    names = meta.get(b"label_names") or meta.get(b"fine_label_names") or []
    arrays, labels = [], []
    for name in files[part]:
        batch = _unpickle(folder / name)
        arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch[label_key])
    info = DatasetInfo(f"cifar{num_classes}", num_classes, 3, 32,
                       (0.5071, 0.4865, 0.4409) if num_classes == 100 else (0.4914, 0.4822, 0.4465),
                       (0.2673, 0.2564, 0.2762) if num_classes == 100 else (0.2470, 0.2435, 0.2616),
                       train_flip=True, train_crop_pad=4, classes=tuple(n.decode() for n in names))
    return info, ArrayImages(np.concatenate(arrays)), np.asarray(labels, dtype=np.int64), None


@register_dataset("cifar10")
def load_cifar10(root: Path | None, part: str, **_):
    return _load_cifar(root, part, 10)


@register_dataset("cifar100")
def load_cifar100(root: Path | None, part: str, **_):
    return _load_cifar(root, part, 100)


#: imagefolder's evaluation crop: the centre ``size`` of the image resized to ``size / 0.875``
EVAL_CROP_FRACTION = 0.875
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _visible(name: str) -> bool:
    """Not a hidden file or folder, nor what macOS and notebooks leave beside images (.DS_Store,
    ._x.jpg, __MACOSX, .ipynb_checkpoints)."""
    return not name.startswith(".") and name != "__MACOSX"


def _image_files(directory: Path) -> list[Path]:
    """The image files below ``directory``, subfolders included, in torchvision's ImageFolder order
    (folders by path, then file names); hidden ones left out."""
    found = []
    for folder, _, names in sorted(os.walk(directory, followlinks=True)):
        if any(not _visible(part) for part in Path(folder).relative_to(directory).parts):
            continue
        found += [Path(folder) / name for name in sorted(names)
                  if _visible(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return found


@register_dataset("imagefolder")
def load_imagefolder(root: Path | None, part: str, image_size: int | None = None, channels: int = 3, **_):
    """``root/train/<class>/*`` and ``root/val/<class>/*``, as ImageNet is laid out; or images without labels.

    Trains with RandomResizedCrop + flip and evaluates with Resize + CenterCrop, as
    torchvision's reference scripts do. Canonical order is (class name, file name), as
    torchvision's ImageFolder sorts. The ``val/`` folder is energytools' ``test`` split; ``val`` is carved from ``train/``.
    A root with neither ``train/`` nor ``val/`` holds images without labels: every image below
    it, subfolders included (their names are not read as classes), in path order, for both parts.
    """
    image_size = image_size or 224
    if root is None:
        raise UserError(f"imagefolder needs {option_name('data_root')} pointing at a folder with train/ and val/")
    if root.is_dir() and not (root / "train").exists() and not (root / "val").exists():
        return _unlabelled_images(root, image_size, channels)
    folder = root / ("train" if part == "train" else "val")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder (imagefolder expects {root}/train and {root}/val)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and _visible(d.name))
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        files = _image_files(class_dir)
        if not files and part == "train":  # it would still take a label, shifting every class after it
            raise UserError(f"class folder {class_dir} holds no images (torchvision's ImageFolder refuses an "
                            "empty class too); remove it or add its images")
        paths += [str(file.relative_to(root)) for file in files]
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"{folder} holds no images")
    mean, std = imagenet_stats(channels)
    # torchvision's reference recipe: RandomResizedCrop + flip to train, Resize(size / 0.875) +
    # CenterCrop(size) to evaluate (256 -> 224)
    info = DatasetInfo("imagefolder", len(classes), channels, image_size, mean, std, train_flip=True,
                       classes=tuple(classes), train_resized_crop=True)
    images = FileImages(paths, root, image_size, channels, resize=round(image_size / EVAL_CROP_FRACTION))
    return info, images, np.asarray(labels, dtype=np.int64), None


def _unlabelled_images(root: Path, image_size: int, channels: int):
    """Every image below ``root``, without labels (see :func:`load_imagefolder`)."""
    paths = [str(file.relative_to(root)) for file in _image_files(root)]
    if not paths:
        raise UserError(f"{root} holds no images (and no train/ and val/ folders of labelled ones)")
    mean, std = imagenet_stats(channels)
    info = DatasetInfo("imagefolder", 0, channels, image_size, mean, std, train_flip=True, train_resized_crop=True)
    images = FileImages(paths, root, image_size, channels, resize=round(image_size / EVAL_CROP_FRACTION))
    return info, images, np.full(len(paths), NO_LABEL, dtype=np.int64), None


@register_dataset("parquet")
def load_parquet(root: Path | None, part: str, image_size: int | None = None, **_):
    """Parquet as Hugging Face `datasets` writes it: root/data/{train,test}-*.parquet, image + label columns.

    See :mod:`energytools.data.parquet`: ClassLabel names become the classes; --image-size
    resizes images of mixed sizes.
    """
    return read_parquet_split(root, part, image_size)


@register_dataset("digits")
def load_digits(root: Path | None, part: str, **_):
    """scikit-learn's 8x8 digits (1,797 images); every fifth sample is the test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)
    ids = np.arange(len(images))
    chosen = ids[ids % 5 == 0] if part == "test" else ids[ids % 5 != 0]
    info = DatasetInfo("digits", 10, 1, 8, (0.3,), (0.38,), train_flip=False,
                       classes=tuple(str(d) for d in range(10)))
    # ids are positions in the full 1,797-image set, so they stay stable across splits
    return info, ArrayImages(images[chosen]), bunch.target[chosen].astype(np.int64), chosen
