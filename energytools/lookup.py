"""What a distill step reads per sample: per-sample columns looked up by sample_id
(temperatures, energy groups, mixing partners, stored logits and views), and the sources of
the teacher's logits for a batch: stored for a flip-only transform, stored per view, or the
teacher run online. :class:`TableTemperatures` is the public form for a user's own trainer."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .energy import GROUPS
from .engine import Batch, float32_exact, to_device
from .errors import UserError
from .table import load_table
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

    def dense_positions(self) -> torch.Tensor:
        """Each sample id's row (int64, indexed by sample id, 0 .. max id), ``len(self.ids)`` for
        an id the lookup lacks: a gather on any device, where :meth:`positions` searches on the host."""
        size = int(self.ids[-1]) + 1 if len(self.ids) else 0
        if len(self.ids) and self.ids[0] < 0:
            raise UserError(f"sample_id {int(self.ids[0])} is negative")
        dense = torch.full((size,), len(self.ids), dtype=torch.int64)
        dense[torch.tensor(self.ids)] = torch.arange(len(self.ids))
        return dense

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


class TableTemperatures:
    """Energy KD in your own trainer: each sample's KD temperature and energy group from a score
    table, looked up by sample id on the batch's device.

        temperatures = energytools.TableTemperatures("scores.parquet")
        t = temperatures(batch_ids)          # (B,) float32 on batch_ids.device
        loss = energytools.kd_loss(student_logits, teacher_logits, t)

    The table's columns and a dense id -> row index are copied to a device once, on first use;
    a lookup is two gathers there, with no read back to the host, so a training step does not
    wait on the GPU for it. An id the table lacks gives NaN (group -1) instead of an error, which
    would need that read: :meth:`check` (or ``check=True``) raises one on request.
    """

    #: energy group codes: ``groups(ids)`` gives indices into this
    GROUPS = GROUPS

    def __init__(self, scores_path: str | Path):
        table, _ = load_table(scores_path, ["sample_id", "energy_group", "temperature"])
        codes = table["energy_group"].cast(str).replace_strict(list(GROUPS), list(range(len(GROUPS))),
                                                                 return_dtype=int).to_numpy()
        lookup = SampleLookup(table["sample_id"].to_numpy(), temperature=table["temperature"].to_numpy().astype(np.float32),
                              group=codes.astype(np.int64))
        self.path, self.lookup = Path(scores_path), lookup
        self._index = lookup.dense_positions()
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.lookup.ids)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tables = self._on.get(device)
        if tables is None:  # once per device
            columns = self.lookup.columns  # and a last row for an id not in the table
            temperature = torch.cat([columns["temperature"], torch.tensor([float("nan")])])
            group = torch.cat([columns["group"], torch.tensor([-1])])
            tables = self._on[device] = (self._index.to(device), temperature.to(device), group.to(device))
        return tables

    def _rows(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        tables = self._tables(sample_ids.device)
        index = tables[0]
        ids = sample_ids.long()
        inside = (ids >= 0) & (ids < len(index))
        # an id outside 0 .. max id reads row 0 of the index and is then sent to the missing row
        rows = torch.where(inside, index[ids.clamp(0, max(len(index) - 1, 0))], len(self))
        return rows, tables

    def __call__(self, sample_ids: torch.Tensor, check: bool = False) -> torch.Tensor:
        """The per-sample temperatures (float32) of ``sample_ids``, on their device."""
        if check:
            self.check(sample_ids)
        rows, tables = self._rows(sample_ids)
        return tables[1][rows]

    def groups(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """The energy group of each sample (int64 index into :attr:`GROUPS`; -1: not in the table)."""
        rows, tables = self._rows(sample_ids)
        return tables[2][rows]

    def check(self, sample_ids: torch.Tensor) -> None:
        """Raise :class:`~energytools.UserError` naming the first id the table lacks (reads the
        result back to the host: call it once on a dataset's ids, not every step)."""
        rows, _ = self._rows(sample_ids)
        missing = (rows == len(self)).nonzero().flatten()
        if len(missing):
            raise UserError(f"sample_id {int(sample_ids.flatten()[missing[0]])} is not in the score table {self.path}")
