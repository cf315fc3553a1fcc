"""A training split held once in the form the model consumes: normalised float32 NCHW on the
training device, padded for the crop. A batch is then one gather by index, the crop and the
flips on the batch tensor, and no conversion; what a user's bare loop on an in-memory dataset does.

The pixels are the ones the per-batch path gives, bit for bit: normalising is elementwise (the
same float operations on each value, whenever they run), the padding holds the normalised value
of the zero the per-batch path pads with, and crops and flips only select values. So a run with
the split resident ends with the weights of one without (tests/test_resident.py).
"""
from __future__ import annotations

import torch

from ..transfer import to_device
from .base import ArrayImages, Collated, ImageSet
from .transforms import AugmentDraw, crop_and_flip, normalize

GIB = 2 ** 30
#: images normalised at a time while the split is made resident (bounds the uint8->float temporaries)
CHUNK = 4096


def resident_bytes(dataset: ImageSet) -> int:
    """The bytes the resident copy of ``dataset`` takes (float32, padded for the crop)."""
    height, width, channels = dataset.images.array.shape[1:]
    pad = dataset.info.train_crop_pad
    return len(dataset) * channels * (height + 2 * pad) * (width + 2 * pad) * 4


def can_reside(dataset, budget_gib: float) -> bool:
    """Whether ``dataset`` is an in-memory split (not image files, not shards) whose resident
    copy fits in ``budget_gib``."""
    return (isinstance(dataset, ImageSet) and isinstance(dataset.images, ArrayImages) and budget_gib > 0
            and resident_bytes(dataset) <= budget_gib * GIB)


class ResidentImages:
    """``dataset`` (see :func:`can_reside`) normalised once on ``device``.

    :meth:`fetch` stands in for the dataset's ``__getitems__``: its first element is the batch's
    indices, which :meth:`images` turns into the augmented, normalised batch."""

    def __init__(self, dataset: ImageSet, device: torch.device):
        info, array = dataset.info, dataset.images.array
        pad, (height, width, channels) = info.train_crop_pad, array.shape[1:]
        self.info, self.pad = info, pad
        self.store = torch.empty((len(dataset), channels, height + 2 * pad, width + 2 * pad), device=device)
        if pad:
            self.store.copy_(normalize(torch.zeros((1, channels, 1, 1), dtype=torch.uint8, device=device),
                                       info).expand_as(self.store))
        positions = dataset.positions
        for start in range(0, len(positions), CHUNK):
            chunk = torch.from_numpy(array[positions[start:start + CHUNK]]).permute(0, 3, 1, 2)
            self.store[start:start + len(chunk), :, pad:pad + height, pad:pad + width] = normalize(
                to_device(chunk, device), info)
        self.labels = torch.from_numpy(dataset.labels)
        self.sample_ids = torch.from_numpy(dataset.sample_ids)

    def fetch(self, indices) -> Collated:
        """``(indices, labels, sample_ids)`` of a batch, on the CPU."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return Collated((index, self.labels.index_select(0, index), self.sample_ids.index_select(0, index)))

    def images(self, index: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        """The batch at ``index``, cropped and flipped as ``draw`` says, normalised."""
        padded = self.store.index_select(0, to_device(index, self.store.device))
        return crop_and_flip(padded, self.pad, draw)
