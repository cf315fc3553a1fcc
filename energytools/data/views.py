"""Datasets that hand out training views, and which view a sample trains on each epoch. The
views themselves (the train transform as data, its seeded draws and rendering) are in
:mod:`energytools.data.draws`; they are re-exported here."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import Collated
from .draws import (TRANSFORM_KINDS, TrainTransform, ViewParams, choose_views, crop_flip, draw_views, hash_keys,
                    resized_crop, uniform)
from .training_set import gather_parts, parts_of

__all__ = ["TRANSFORM_KINDS", "EpochKeys", "FreshViews", "ReplayViews", "ScoredViews", "TrainTransform", "ViewParams",
           "ViewedSet", "choose_views", "crop_flip", "draw_views", "hash_keys", "render", "resized_crop",
           "sample_ids_at", "uniform"]

# --- which view a sample trains on, epoch by epoch -------------------------------------------


@dataclass(frozen=True)
class ReplayViews:
    """Train on stored views: in each epoch, one of the ``count`` views score drew with
    ``draw_seed``, chosen from ``(choice_seed, epoch, sample_id)``."""

    transform: TrainTransform
    draw_seed: int
    count: int
    choice_seed: int

    def views(self, sample_ids: np.ndarray, epoch: int) -> tuple[int, np.ndarray]:
        """``(draw seed, view index per sample)`` for ``epoch``."""
        return self.draw_seed, choose_views(self.choice_seed, epoch, sample_ids, self.count)


@dataclass(frozen=True)
class FreshViews:
    """A new view every epoch (view index = epoch): the random train transform itself, drawn
    by key, so that it does not depend on the order, process or worker that renders it."""

    transform: TrainTransform
    seed: int

    def views(self, sample_ids: np.ndarray, epoch: int) -> tuple[int, np.ndarray]:
        return self.seed, np.full(len(sample_ids), epoch, dtype=np.int64)


# --- datasets that hand out views -------------------------------------------------------------

def sample_ids_at(dataset, indices) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    ids = np.empty(len(indices), dtype=np.int64)
    for part, local, mask in parts_of(dataset, indices):
        ids[mask] = part.ids_at(local)
    return ids


def render(dataset, indices, views: np.ndarray, seed: int):
    """:meth:`ImageSet.render_views` over an ImageSet or a ConcatDataset of them."""
    indices = np.asarray(indices, dtype=np.int64)
    views = np.asarray(views, dtype=np.int64).reshape(len(indices), -1)
    return gather_parts(dataset, indices, lambda part, local, mask: part.render_views(local, views[mask], seed))


class ViewedSet(torch.utils.data.Dataset):
    """A training set whose items are views: fetched with keys ``(index, epoch)`` (see
    :class:`EpochKeys`), each sample rendered as the view ``schedule`` picks for that epoch.
    A batch is ``(uint8 images, labels, sample_ids, flipped, view index)``."""

    def __init__(self, dataset, schedule):
        self.dataset, self.schedule = dataset, schedule
        self.info = dataset.info

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys):
        indices = np.array([k[0] for k in keys], dtype=np.int64)
        epoch = int(keys[0][1])
        seed, views = self.schedule.views(sample_ids_at(self.dataset, indices), epoch)
        images, flips, labels, ids = render(self.dataset, indices, views[:, None], seed)
        return Collated((images[:, 0], labels, ids, flips[:, 0], torch.from_numpy(views)))

    def __getitem__(self, key):
        return tuple(t[0] for t in self.__getitems__([key]))


class EpochKeys(torch.utils.data.Sampler):
    """The indices of ``sampler`` as ``(index, epoch)`` keys; set ``epoch`` before each pass.
    The epoch travels with the index, so workers that live across epochs (persistent
    workers) render the right views."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def __iter__(self):
        return ((int(i), self.epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ScoredViews(torch.utils.data.Dataset):
    """Score's view of a split: each sample's clean (evaluation) image and its ``count`` views
    drawn with ``seed``: ``(clean uint8, labels, sample_ids, views uint8 (B, K, C, S, S))``."""

    def __init__(self, dataset, count: int, seed: int):
        self.dataset, self.count, self.seed = dataset, count, seed
        self.info = dataset.info

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        clean, labels, ids = self.dataset.__getitems__(indices)
        views = np.broadcast_to(np.arange(self.count), (len(indices), self.count))
        images = render(self.dataset, indices, views, self.seed)[0]
        return Collated((clean, labels, ids, images))
