"""DataLoaders that keep a device fed, and the training loader whose shuffles and views are a
function of (seed, epoch) so a resumed run sees what an uninterrupted one would."""
from __future__ import annotations

import os

import torch

from ..data.base import ArrayImages, collate
from ..data.resident import ResidentImages, can_reside
from ..data.transforms import apply_augment, draw_augment, normalize
from ..data.views import EpochKeys, ViewedSet
from ..threads import available_cpus
from ..transfer import to_device


def loader_options(device: torch.device, num_workers: int, prefetch: int = 2, persistent: bool = False) -> dict:
    """DataLoader settings that keep a device fed: pinned memory on cuda (so ``non_blocking``
    copies overlap compute), and with workers, batches loaded ahead and workers kept alive
    across epochs."""
    options = {"num_workers": num_workers, "pin_memory": device.type == "cuda", "collate_fn": collate}
    if num_workers > 0:
        options.update(prefetch_factor=prefetch, persistent_workers=persistent)
    return options


#: the most DataLoader workers a default picks
MAX_DEFAULT_WORKERS = 8


def default_workers(dataset) -> int:
    """DataLoader workers when --num-workers is not given: none for images held in memory (a
    batch is one gather, which a worker would only copy), else one per CPU this process may use,
    shared with the other ranks on this host (torchrun's LOCAL_WORLD_SIZE), at most 8:
    decoding files is what the workers do, in parallel with the forward passes."""
    if isinstance(getattr(dataset, "images", None), ArrayImages):
        return 0
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_DEFAULT_WORKERS, available_cpus() // ranks))


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                shuffle: bool = False, generator: torch.Generator | None = None, prefetch: int = 2,
                persistent: bool = False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       **loader_options(device, num_workers, prefetch, persistent))


class TrainLoader:
    """One DataLoader for the whole run (workers persist across epochs) and what is set per
    epoch (:meth:`start_epoch`). Without ``views`` it is the loader the run always had
    (shuffled by ``generator``); with them it hands out ``(index, epoch)`` keys so the workers
    render each sample's view for the epoch. Without workers, an in-memory split that fits
    ``cfg.in_memory_gib`` is made resident on the device
    (:class:`~energytools.data.resident.ResidentImages`) and its batches are fetched here, with
    the same draws. (With workers it is not: a DataLoader with workers draws from the generator
    as one without does not, and a run keeps the draws it always had.)"""

    def __init__(self, train_set, cfg, device: torch.device, ctx, views=None):
        self.cfg, self.ctx, self.views, self.device = cfg, ctx, views, device
        budget = getattr(cfg, "in_memory_gib", 0.0) if cfg.num_workers == 0 and views is None else 0.0
        self.resident = ResidentImages(train_set, device) if can_reside(train_set, budget) else None
        # a loader that makes one iterator for the run (persistent workers) draws its seed here
        self._fresh_draw = cfg.num_workers > 0
        self.generator = torch.Generator()
        if ctx.distributed:  # each rank takes its share; cfg.batch_size is per rank
            self.sampler = torch.utils.data.DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True,
                                                               seed=cfg.seed)
        else:
            self.sampler = torch.utils.data.RandomSampler(train_set, generator=self.generator)
        self.keys = None
        if views is not None:
            self.keys = EpochKeys(self.sampler)
            dataset, batches = ViewedSet(train_set, views), torch.utils.data.BatchSampler(self.keys, cfg.batch_size,
                                                                                          False)
        else:
            dataset, batches = train_set, torch.utils.data.BatchSampler(self.sampler, cfg.batch_size, False)
        batches = self._batches = SkippingBatches(batches)
        self._on_resumed = None
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                                  generator=None if ctx.distributed else self.generator,
                                                  **loader_options(device, cfg.num_workers, cfg.prefetch,
                                                                   persistent=True))
        self._epochs_started = 0

    def __len__(self) -> int:
        return len(self.loader)

    def start_epoch(self, epoch: int) -> None:
        """Seed the epoch's shuffle, augmentation and views from (seed, epoch, rank)."""
        seed = self.cfg.seed
        self.generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + self.ctx.rank)
        torch.manual_seed(seed * 1_000_003 + epoch)
        if self.ctx.distributed:
            self.sampler.set_epoch(epoch)
        if self.keys is not None:
            self.keys.epoch = epoch
        if self._fresh_draw and self._epochs_started:
            self._as_fresh_iterator()
        self._epochs_started += 1

    def _as_fresh_iterator(self) -> None:
        """What a new DataLoader iterator does before it shuffles: draw its workers' base seed from
        the loader's generator (the global one when it has none). A loader whose workers persist
        makes its iterator once, so from the second epoch on this draw is made here: the shuffles
        stay those of a loader made every epoch, as runs before persistent workers had."""
        torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)

    def resume_at(self, step: int, on_resumed) -> None:
        """Make the next pass skip its first ``step`` batches without loading them (the order is
        drawn as ever: a function of seed and epoch), then call ``on_resumed()`` once the pass
        has made its draws, before the first batch is handed out (it restores the generators
        saved with the position; with no batch left it is called at the end)."""
        self._batches.skip, self._on_resumed = step, on_resumed

    def __iter__(self):
        batches = iter(self.loader) if self._fresh_draw else self._in_process()
        if self._on_resumed is None:
            return batches
        return self._resumed(batches)

    def on_device(self, info):
        """The pass's batches as a step consumes them: ``(images, labels, sample_ids, flipped,
        views)`` with the images on the device, augmented and normalised (``info`` gives the
        augmentation and the normalisation). A rendered view comes augmented from the loader
        (``views`` says which stored view each sample is); otherwise the flips and crops are drawn
        on the loader's generator after each fetch, as ever, and applied on the device: to the
        resident split's batch (its indices) or to the fetched uint8 batch after its copy, so the
        batch the workers pinned goes to the device as it is."""
        layout = torch.channels_last if getattr(self.cfg, "channels_last", False) else None
        for fetched in self:
            if self.views is not None:
                images, labels, ids, flipped, chosen = fetched
                images = normalize(to_device(images, self.device), info)
            else:
                images, labels, ids = fetched
                drawn = draw_augment(len(labels), info, self.generator)
                flipped, chosen = drawn.flipped, None
                images = (self.resident.images(images, drawn) if self.resident is not None
                          else normalize(apply_augment(to_device(images, self.device), info, drawn), info))
            if layout is not None:
                images = images.contiguous(memory_format=layout)
            yield images, to_device(labels, self.device), ids, flipped, chosen

    def _in_process(self):
        """The batches a DataLoader without workers hands out, without its per-batch machinery
        (its iterator and profiler hook cost ~20 µs a step, much of a small model's step on a
        GPU): the same draw of the workers' base seed first, then the same batch sampler, each
        batch fetched (``__getitems__`` when the dataset has it) and collated as the DataLoader
        does. Pinned memory for cuda comes from the copy to the device
        (:func:`energytools.transfer.to_device`)."""
        torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
        dataset = self.loader.dataset
        fetch = getattr(dataset, "__getitems__", None) or (lambda indices: [dataset[i] for i in indices])
        if self.resident is not None:
            fetch = self.resident.fetch
        for indices in self._batches:
            yield collate(fetch(indices))

    def _resumed(self, batches):
        on_resumed, self._on_resumed = self._on_resumed, None
        pending = True
        for batch in batches:
            if pending:
                on_resumed()
                pending = False
            yield batch
        if pending:
            on_resumed()


class SkippingBatches:
    """A batch sampler that drops its first ``skip`` batches once (a resumed epoch): the indices
    are drawn and thrown away, no sample is loaded."""

    def __init__(self, batches):
        self.batches, self.skip = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for index, batch in enumerate(self.batches):
            if index >= skip:
                yield batch
