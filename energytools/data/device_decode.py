"""Image-folder batches decoded on the scoring device (``score --decode-on-device``).

The DataLoader's workers only read each file's bytes (:class:`EncodedFiles`); the main process
decodes the batch's JPEGs with torchvision's batched ``decode_jpeg`` on the device (nvjpeg on
cuda), then makes each image gray with PIL's luma where the dataset is gray, and resizes and
crops it there with the geometry the CPU path computes (:func:`decode_batch`). Files that are
not JPEG, or that the device's decoder refuses, are read by the CPU path
(``FileImages.load``) in the main process and copied over.

On the CPU the decoder is the same libjpeg-turbo as the default path and the resize the same
function, so a batch is byte-identical to it (tests/test_data.py); on cuda, nvjpeg's IDCT and
chroma upsampling and the GPU's resize differ from libjpeg-turbo's by a level or two of a
pixel, the same order as the default path against PIL's (``make gpu-check`` compares the
energies with the CPU's).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import UserError
from .base import Collated, FileImages, ImageSet
from .decode import DECODER_VARIABLE, image_decoder, luma, sniff
from .geometry import fitted_geometry


def check_decodable(dataset: ImageSet, flag: str) -> None:
    """Refuse, naming ``flag``, a dataset whose batches cannot be decoded on the device."""
    if not isinstance(dataset.images, FileImages):
        raise UserError(f"{flag} decodes image files (an image folder); {dataset.info.name} is held in memory")
    if image_decoder() == "pil":
        raise UserError(f"{flag} decodes with torchvision, and {DECODER_VARIABLE}=pil asks for PIL; leave one out")


class EncodedBatch:
    """A batch's files as bytes (uint8 tensors) and their positions in the dataset's files."""

    def __init__(self, data: list[torch.Tensor], positions: np.ndarray):
        self.data, self.positions = data, positions


class EncodedFiles(torch.utils.data.Dataset):
    """An image-folder split (``ImageSet`` over ``FileImages``) whose batches are the files' bytes:
    ``(EncodedBatch, labels, sample_ids)``, decoded later by :func:`decode_batch`."""

    def __init__(self, dataset: ImageSet):
        if not isinstance(dataset.images, FileImages):
            raise TypeError("EncodedFiles reads image files (an image folder)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices) -> Collated:
        dataset, rows = self.dataset, np.asarray(indices, dtype=np.int64)
        positions = dataset.positions[rows]
        data = [torch.frombuffer(bytearray(dataset.images.read(p)), dtype=torch.uint8) for p in positions]
        return Collated((EncodedBatch(data, positions), torch.from_numpy(dataset.labels[rows]),
                         torch.from_numpy(dataset.sample_ids[rows])))


def _decoded_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB (3, H, W) uint8 tensors on ``device``, one call for the batch; None for an image the
    decoder refuses (the batch is then decoded one image at a time, to find it)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; this decoder still works
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            found = []
            for one in data:
                try:
                    found.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError):
                    found.append(None)
            return found


def decode_batch(batch: EncodedBatch, files: FileImages, device: torch.device) -> torch.Tensor:
    """The batch as the CPU path gives it, (N, C, size, size) uint8, on ``device``."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    jpegs = [i for i, one in enumerate(batch.data) if sniff(bytes(one[:12].tolist())) == "jpeg"]
    decoded = dict(zip(jpegs, _decoded_jpegs([batch.data[i] for i in jpegs], device))) if jpegs else {}
    images = []
    for i, position in enumerate(batch.positions):
        image = decoded.get(i)
        if image is None or image.dtype != torch.uint8 or image.shape[0] != 3:  # not JPEG, or refused
            images.append(torch.from_numpy(files.load(int(position))).permute(2, 0, 1).to(device))
            continue
        if files.channels == 1:
            image = luma(image)
        (width, height), (left, top, right, bottom) = fitted_geometry(image.shape[2], image.shape[1], files.size, files.resize)
        if (height, width) != tuple(image.shape[1:]):
            image = resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
        images.append(image[:, top:bottom, left:right])
    return torch.stack(images).contiguous()
