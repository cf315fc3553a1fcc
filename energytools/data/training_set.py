"""The training set a run trains on: the dataset's samples plus any number of extra parts (HE-DA
shard rows), fetched a batch at a time with each part's share read in one call."""
from __future__ import annotations

import numpy as np
import torch

from .base import Collated


def parts_of(dataset, indices: np.ndarray):
    """``(part, local indices, mask)`` for each part of a ConcatDataset that ``indices`` reach
    (the dataset itself when it has no parts): the one batch-routing function."""
    if isinstance(dataset, torch.utils.data.ConcatDataset) and len(dataset.datasets) == 1:
        dataset = dataset.datasets[0]  # no shards: no routing to do
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        which = np.searchsorted(dataset.cumulative_sizes, indices, side="right")
        starts = np.concatenate([[0], dataset.cumulative_sizes[:-1]])
        for part in np.unique(which):
            mask = which == part
            yield dataset.datasets[part], indices[mask] - starts[part], mask
    else:
        yield dataset, indices, np.ones(len(indices), dtype=bool)


def gather_parts(dataset, indices: np.ndarray, fetch) -> list[torch.Tensor]:
    """``fetch(part, local indices, mask) -> tensors`` for each part's share of ``indices``, put
    back together in the order of ``indices``."""
    parts = list(parts_of(dataset, indices))
    if len(parts) == 1:  # one part holds the whole batch, in its order: nothing to put back
        part, local, mask = parts[0]
        return list(fetch(part, local, mask))
    out = None
    for part, local, mask in parts:
        got = fetch(part, local, mask)
        if out is None:
            out = [t.new_empty((len(indices), *t.shape[1:])) for t in got]
        selector = torch.from_numpy(mask)
        for target, value in zip(out, got):
            target[selector] = value
    return out


class TrainingSet(torch.utils.data.ConcatDataset):
    """Originals plus shard rows; ``info`` (the train augmentation) is the dataset's."""

    def __init__(self, parts, info):
        super().__init__(parts)
        self.info = info

    def __getitems__(self, indices) -> Collated:
        """Fetch each part's share of the batch in one call, then restore the sampler's order."""
        if len(self.datasets) == 1:
            return self.datasets[0].__getitems__(indices)
        indices = np.asarray(indices, dtype=np.int64)
        return Collated(gather_parts(self, indices, lambda part, local, mask: part.__getitems__(local)))
