"""What a distill step reads per sample: per-sample columns looked up by sample_id
(temperatures, energy groups, mixing partners, stored logits and views), and the sources of
the teacher's logits for a batch: stored for a flip-only transform, stored per view, or the
teacher run online."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .engine import Batch, float32_exact, to_device
from .errors import UserError
from .view_logits import topk_expand

#: per-sample columns up to this size live on the GPU during distill (ImageNet-1k: top-k views fit, full ones not)
DEVICE_BUDGET = 2 << 30


class SampleLookup:
    """Per-sample values keyed by sample_id (originals and shard rows alike)."""

    def __init__(self, ids: np.ndarray, **columns: np.ndarray):
        ordered = len(ids) < 2 or bool((np.diff(ids) > 0).all())  # a score table alone is sorted: no copies
        order = None if ordered else np.argsort(ids, kind="stable")
        self.ids = ids if ordered else ids[order]
        if len(self.ids) > 1 and (np.diff(self.ids) == 0).any():
            dup = self.ids[1:][np.diff(self.ids) == 0][0]
            raise UserError(f"sample_id {dup} appears twice among the training samples and shards")
        self.columns = {name: torch.as_tensor(np.require(values if ordered else values[order], requirements="W"))
                        for name, values in columns.items()}
        self._copies: dict = {}

    def positions(self, sample_ids: torch.Tensor) -> torch.Tensor:
        ids = sample_ids.numpy()
        pos = self.ids.searchsorted(ids)
        np.minimum(pos, len(self.ids) - 1, out=pos)  # not ndarray.clip: per step it costs more than the search
        missing = self.ids[pos] != ids
        if missing.any():
            raise UserError(f"sample_id {ids[missing][0]} is not in the score table")
        return torch.from_numpy(pos)

    def to(self, device: torch.device, budget: int = DEVICE_BUDGET) -> "SampleLookup":
        """Keep the columns on ``device`` (cuda) when they fit in ``budget`` bytes, so that a
        step gathers its rows there: one small non-blocking copy of the positions per step
        instead of one host-to-device copy per column."""
        size = sum(c.element_size() * c.nelement() for c in self.columns.values())
        if device.type == "cuda" and size <= budget:
            self.columns = {name: column.to(device) for name, column in self.columns.items()}
        return self

    def _on(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``index`` (positions or views, on the CPU) on ``device``, copied once per step."""
        if index.device == device:
            return index
        cached = self._copies.get(id(index))
        if cached is None or cached[0] is not index:
            cached = (index, to_device(index, device))
            self._copies = {id(index): cached, **dict(list(self._copies.items())[:3])}
        return cached[1]

    def get(self, name: str, positions: torch.Tensor, device) -> torch.Tensor:
        column = self.columns[name]
        return to_device(column[self._on(positions, column.device)], torch.device(device))

    def view(self, name: str, positions: torch.Tensor, views: torch.Tensor, device) -> torch.Tensor:
        """Per-view column ``name`` (rows of shape (K, ...)) at each sample's view ``views``."""
        column = self.columns[name]
        return to_device(column[self._on(positions, column.device), self._on(views, column.device)],
                         torch.device(device))


#: (batch, positions in the lookup) -> teacher logits of the batch's views
LogitsSource = Callable[[Batch, torch.Tensor], torch.Tensor]


class CachedLogits:
    """Teacher logits stored by score (and augment) for each view a flip-only transform makes."""

    def __init__(self, lookup: SampleLookup):
        self.lookup = lookup

    def __call__(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        device = batch.images.device
        if self.lookup.columns["logits"].ndim == 3:  # (N, 2, C): the clean and the mirrored image's
            return self.lookup.view("logits", positions, batch.flipped.long(), device)
        return self.lookup.get("logits", positions, device)


class CachedViewLogits:
    """The teacher logits score stored for each sample's view of this epoch (``batch.views``):
    float16 rows, or rebuilt from the top-k form."""

    def __init__(self, lookup: SampleLookup, top_k: int | None, num_classes: int):
        self.lookup, self.top_k, self.num_classes = lookup, top_k, num_classes

    def __call__(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        device = batch.images.device
        if not self.top_k:
            return self.lookup.view("view_logits", positions, batch.views, device).float()
        return topk_expand(self.lookup.view("view_topk_index", positions, batch.views, device),
                           self.lookup.view("view_topk_logit", positions, batch.views, device),
                           self.lookup.view("view_fill", positions, batch.views, device), self.num_classes)


class OnlineTeacher:
    """The teacher run on each batch's augmented views (in eval mode, without gradients). With
    ``exact`` (its device) it runs float32-exact, outside the step's autocast and without TF32:
    logits whose energies decide groups against thresholds fitted on float32 energies."""

    def __init__(self, model: torch.nn.Module, exact: torch.device | None = None):
        self.model, self.exact = model.eval(), exact

    @torch.no_grad()
    def __call__(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        if self.exact is None:
            return self.model(batch.images).float()
        with torch.autocast(self.exact.type, enabled=False), float32_exact(self.exact):
            return self.model(batch.images.float())
