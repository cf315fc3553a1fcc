"""A dataset split as energytools sees it: images by position, labels, stable sample ids."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .decode import decode, image_decoder, resize_crop
from .geometry import Geometry, center_crop_geometry, fitted_geometry, square_geometry
from .draws import TrainTransform, crop_flip, draw_views, resized_crop


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a transform need to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_flip: bool = True
    train_crop_pad: int = 0
    classes: tuple[str, ...] = field(default_factory=tuple)
    train_resized_crop: bool = False  # RandomResizedCrop(image_size) of the original image (imagefolder)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def train_transform(self):
        """The train transform as data (:class:`energytools.data.draws.TrainTransform`)."""
        if self.train_resized_crop:
            return TrainTransform("resized-crop", self.image_size, self.train_flip)
        if self.train_crop_pad:
            return TrainTransform("pad-crop", self.image_size, self.train_flip, self.train_crop_pad)
        return TrainTransform("flip" if self.train_flip else "none", self.image_size, self.train_flip)


class ArrayImages:
    """Images held in memory as one uint8 array of shape (N, H, W, C)."""

    def __init__(self, array: np.ndarray):
        if array.ndim == 3:
            array = array[..., None]
        # one writable copy: torch refuses to wrap read-only buffers (np.frombuffer)
        array = np.ascontiguousarray(array, dtype=np.uint8)
        self.array = array if array.flags.writeable else array.copy()

    def __len__(self) -> int:
        return len(self.array)

    def load(self, position: int) -> np.ndarray:
        return self.array[position]

    def path(self, position: int) -> str | None:
        return None

    def open(self, position: int) -> Image.Image:
        """The image as PIL sees it (what a resized-crop view is cut from)."""
        array = self.array[position]
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def digest(self, positions: np.ndarray, hasher) -> None:
        hasher.update(np.ascontiguousarray(self.array[positions]).tobytes())


def imagenet_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for image files of unknown statistics: ImageNet's for RGB, a generic pair for gray."""
    return ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.5,), (0.25,))


def _resized(image: Image.Image, geometry: Geometry) -> Image.Image:
    new_size, box = geometry
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)  # antialiased: PIL widens the filter to downscale
    return image.crop(box)


def square(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized so its shorter side is ``size`` (bilinear), then centre-cropped to a square."""
    return _resized(image, square_geometry(*image.size, size))


def resize_center_crop(image: Image.Image, size: int, resize: int) -> Image.Image:
    """torchvision's evaluation transform: Resize(``resize``) (the shorter side, bilinear with
    antialiasing as PIL does) then CenterCrop(``size``), with torchvision's rounding."""
    return _resized(image, center_crop_geometry(*image.size, size, resize))


def decode_square(data: bytes, channels: int, size: int | None, resize: int | None = None,
                  decoder: str = "auto") -> np.ndarray | None:
    """Image bytes as HxWxC uint8 by torchvision's decoder (energytools.data.decode): made
    :func:`square` of side ``size``, or with ``resize`` :func:`resize_center_crop`, or left as
    it is without ``size``. None where PIL is to read it: another format, or ``decoder`` "pil"
    (:func:`~energytools.data.decode.image_decoder`, ENERGYTOOLS_IMAGE_DECODER)."""
    if decoder == "pil":
        return None
    image = decode(data, channels)
    if image is None:
        return None
    height, width = image.shape[1:]
    return resize_crop(image, *fitted_geometry(width, height, size, resize))


def as_array(image: Image.Image) -> np.ndarray:
    array = np.array(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as 8-bit gray (``channels`` 1) or RGB. 16-bit gray (PIL's I;16 and I modes) is
    scaled to 8 bits first: PIL's own conversion clips it to 255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip(wide >> 8 if wide.max() > 255 else wide, 0, 255).astype(np.uint8), "L")
    return image.convert("L" if channels == 1 else "RGB")


def to_array(image: Image.Image, channels: int, size: int | None = None) -> np.ndarray:
    """``image`` as an HxWxC uint8 array with ``channels`` 1 (gray) or 3 (RGB), made :func:`square`
    of side ``size`` when given (after the conversion: PIL resizes palette images without filtering)."""
    image = convert_mode(image, channels)
    if size is not None:
        image = square(image, size)
    array = np.array(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


#: what PIL raises for a file that is not a readable image (a decompression bomb included)
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)


class FileImages:
    """Images read from files, made a square of ``size``: by :func:`square` (shorter side to
    ``size``, centre crop), or with ``resize`` by :func:`resize_center_crop` (torchvision's
    Resize(resize) + CenterCrop(size) evaluation transform)."""

    def __init__(self, paths: list[str], root: Path, size: int, channels: int, resize: int | None = None):
        self.paths, self.root, self.size, self.channels, self.resize = paths, root, size, channels, resize
        self.decoder = image_decoder()  # read once: a bad value is refused before any work

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, position: int) -> Image.Image:
        """The whole image, in the dataset's mode (what a resized-crop view is cut from)."""
        path = self.root / self.paths[position]
        try:
            with Image.open(path) as image:
                image = convert_mode(image, self.channels)
                image.load()
                return image
        except UNREADABLE_IMAGE as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None

    def read(self, position: int) -> bytes:
        """The file's bytes."""
        path = self.root / self.paths[position]
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc.strerror}") from None

    def load(self, position: int) -> np.ndarray:
        path = self.root / self.paths[position]
        fast = decode_square(self.read(position), self.channels, self.size, self.resize, self.decoder)
        if fast is not None:
            return fast
        if self.resize is not None:
            return as_array(resize_center_crop(self.open(position), self.size, self.resize))
        try:
            with Image.open(path) as image:
                return to_array(image, self.channels, self.size)
        except UNREADABLE_IMAGE as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None

    def path(self, position: int) -> str | None:
        return self.paths[position]

    def digest(self, positions: np.ndarray, hasher) -> None:
        for position in positions:
            path = self.root / self.paths[position]
            try:
                size = path.stat().st_size
            except OSError as exc:  # a broken symlink, a file removed since the folder was listed
                raise UserError(f"cannot read image {path}: {exc.strerror}") from None
            hasher.update(f"{self.paths[position]}:{size}\n".encode())


class Collated(tuple):
    """A batch ``(images, labels, sample_ids)`` already stacked by ``__getitems__``."""


def collate(batch):
    """DataLoader collate: pass pre-stacked batches through, stack lists of items as usual."""
    if isinstance(batch, Collated):
        return tuple(batch)
    return torch.utils.data.default_collate(batch)


def fetch_batch(dataset, indices) -> Collated:
    """Stack ``dataset[i]`` for ``indices`` (used where no faster path exists)."""
    items = [dataset[int(i)] for i in indices]
    return Collated((torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]),
                     torch.tensor([it[2] for it in items])))


class ImageSet(torch.utils.data.Dataset):
    """One split of a dataset.

    Items are ``(image uint8 CxHxW tensor, label, sample_id)``. ``sample_id`` is the
    sample's index in the dataset's canonical (unsubsampled) order of its split file, so
    ids stay the same under ``limit``, ``imbalance_factor`` and the validation carve.
    """

    def __init__(self, info: DatasetInfo, split: str, images, labels: np.ndarray,
                 sample_ids: np.ndarray, positions: np.ndarray | None = None):
        self.info, self.split, self.images = info, split, images
        self._all_labels = np.asarray(labels, dtype=np.int64)
        self._all_ids = np.asarray(sample_ids, dtype=np.int64)
        self.positions = np.arange(len(images)) if positions is None else np.asarray(positions, dtype=np.int64)
        self._fingerprint: str | None = None

    @property
    def labels(self) -> np.ndarray:
        return self._all_labels[self.positions]

    @property
    def sample_ids(self) -> np.ndarray:
        return self._all_ids[self.positions]

    def subset(self, keep: np.ndarray) -> "ImageSet":
        """A view holding the samples at ``keep`` (positions within this view)."""
        return ImageSet(self.info, self.split, self.images, self._all_labels, self._all_ids,
                        self.positions[np.asarray(keep, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.positions)

    def image(self, index: int) -> np.ndarray:
        """The HxWxC uint8 image at ``index``."""
        return self.images.load(self.positions[index])

    def path(self, index: int) -> str | None:
        return self.images.path(self.positions[index])

    def __getitem__(self, index: int):
        position = self.positions[index]
        image = torch.from_numpy(np.ascontiguousarray(self.images.load(position))).permute(2, 0, 1)
        return image, int(self._all_labels[position]), int(self._all_ids[position])

    def __getitems__(self, indices) -> Collated:
        """A whole batch at once: one fancy-index into the in-memory array, not one per sample."""
        if not isinstance(self.images, ArrayImages):
            return fetch_batch(self, indices)
        positions = self.positions[np.asarray(indices, dtype=np.int64)]
        # contiguous NCHW, exactly what stacking single items gives: the memory format picks the
        # conv kernel, and another kernel changes the last bits of the logits
        batch = self.images.array[positions]
        if batch.shape[-1] == 1:  # one channel: the NHWC bytes are NCHW's, so a view, not a copy per step
            images = torch.from_numpy(batch).view(len(positions), 1, *batch.shape[1:3])
        else:
            images = torch.from_numpy(batch).permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
        return Collated((images, torch.from_numpy(self._all_labels[positions]),
                         torch.from_numpy(self._all_ids[positions])))

    def ids_at(self, indices) -> np.ndarray:
        return self._all_ids[self.positions[np.asarray(indices, dtype=np.int64)]]

    def render_views(self, indices, views: np.ndarray, seed: int):
        """Views ``views[b, k]`` (drawn with ``seed``) of the samples at ``indices``, rendered
        from the train transform: ``(uint8 (B, K, C, S, S), flips (B, K), labels, sample_ids)``.
        The pixels depend on nothing but the images, the keys and the transform."""
        indices = np.asarray(indices, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64).reshape(len(indices), -1)
        count = views.shape[1]
        transform = self.info.train_transform
        positions = self.positions[indices]
        ids, labels = self._all_ids[positions], self._all_labels[positions]
        if transform.kind == "resized-crop":
            out, flips = [], []
            for b, position in enumerate(positions):
                image = self.images.open(position)
                params = draw_views(transform, seed, ids[b], views[b], image.height, image.width)
                out.append(np.stack([resized_crop(image, params, k, transform.size) for k in range(count)]))
                flips.append(params.flip)
            images = torch.from_numpy(np.stack(out)).permute(0, 1, 4, 2, 3).clone(memory_format=torch.contiguous_format)
            flips = np.stack(flips)
        else:
            clean = self.__getitems__(indices)[0]
            params = draw_views(transform, seed, np.repeat(ids, count), views.reshape(-1))
            rendered = crop_flip(clean.repeat_interleave(count, dim=0), params, transform)
            images, flips = rendered.view(len(indices), count, *rendered.shape[1:]), params.flip.reshape(-1, count)
        return images, torch.from_numpy(flips), torch.from_numpy(labels), torch.from_numpy(ids)

    def fingerprint(self) -> str:
        """sha256 over the split's ids, labels and image content (file sizes for files)."""
        if self._fingerprint is None:
            hasher = hashlib.sha256()
            hasher.update(f"{self.info.name}/{self.split}/{len(self)}\n".encode())
            hasher.update(self.sample_ids.tobytes())
            hasher.update(self.labels.tobytes())
            self.images.digest(self.positions, hasher)
            self._fingerprint = hasher.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        """Provenance for metadata: which split this is, checkable by its fingerprint (the
        DataConfig that built it is recorded beside it to rebuild it)."""
        return {"name": self.info.name, "split": self.split, "size": len(self), "fingerprint": self.fingerprint(),
                "num_classes": self.info.num_classes, "classes": list(self.info.classes)}
