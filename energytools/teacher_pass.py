"""One pass of the teacher over a batch of images, returning every column score writes to the
score table and augment to HE-DA shards: the per-sample statistics, the stored logits (and the
mirrored image's, for a flip-only train transform) and the per-view columns."""
from __future__ import annotations

import numpy as np
import torch

from .energy import energy, logit_statistics
from .ood import ood_statistics
from .teacher import FoldTeachers, TeacherRun, check_logits
from .view_logits import topk_compress


def _logits(teacher: TeacherRun | FoldTeachers, images: torch.Tensor, info, batch_size: int,
            ids: torch.Tensor) -> torch.Tensor:
    """The teacher's float32 logits of uint8 ``images`` (the samples ``ids``: fold teachers pick
    each one's teacher by it), in forward passes of ``batch_size``."""
    folds = isinstance(teacher, FoldTeachers)
    return torch.cat([(teacher.logits(images[i:i + batch_size], info, ids[i:i + batch_size]) if folds
                       else teacher.logits(images[i:i + batch_size], info)).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def view_columns(teacher: TeacherRun | FoldTeachers, views: torch.Tensor, ids: torch.Tensor, info,
                 energy_temperature: float, top_k: int | None, batch_size: int) -> dict[str, np.ndarray]:
    """Per-view columns for one batch: (B, K) energies and (B, K, C) float16 logits, or the
    top-k triple. ``views`` is uint8 (B, K, C, S, S)."""
    count = views.shape[1]
    view_ids = ids.repeat_interleave(count)
    logits = _logits(teacher, views.flatten(0, 1), info, batch_size, view_ids)
    check_logits(logits, view_ids)
    columns = {"view_energy": energy(logits, energy_temperature).numpy().reshape(-1, count)}
    if top_k:
        index, value, fill = topk_compress(logits, top_k, energy_temperature)
        columns.update(view_topk_index=index.reshape(-1, count, top_k), view_topk_logit=value.reshape(-1, count, top_k),
                       view_fill=fill.reshape(-1, count))
    else:
        columns["view_logits"] = logits.half().numpy().reshape(-1, count, logits.shape[1])
    return columns


@torch.no_grad()
def ood_columns(teacher: TeacherRun, images: torch.Tensor, ids: torch.Tensor, info,
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """The columns OOD scores are read from (energytools.ood.ood_statistics: ``energy_t1``,
    ``max_logit``, ``confidence``) of one batch of uint8 images, as NumPy arrays."""
    logits = _logits(teacher, images, info, batch_size, ids)
    check_logits(logits, ids)
    return {name: value.numpy() for name, value in ood_statistics(logits).items()}


@torch.no_grad()
def teacher_columns(teacher: TeacherRun | FoldTeachers, images: torch.Tensor, labels: torch.Tensor,
                    ids: torch.Tensor, info, energy_temperature: float, *, save_logits: bool = False,
                    views: torch.Tensor | None = None, top_k: int | None = None, batch_size: int = 256,
                    ood: bool = False) -> dict[str, np.ndarray]:
    """The columns of one batch of uint8 images (B, C, H, W), as NumPy arrays of B rows:
    ``pred, correct, energy, confidence, true_prob, entropy, margin, el2n``; with ``ood`` also
    ``energy_t1`` and ``max_logit`` (energytools.ood); with
    ``save_logits`` the float16 ``logits`` (and ``logits_flipped``, the mirrored image's, when
    the dataset trains with flips); with ``views`` (uint8 (B, K, C, S, S)) the per-view columns.
    Forward passes of at most ``batch_size`` images; NaN/Inf logits are refused naming the
    first sample."""
    logits = _logits(teacher, images, info, batch_size, ids)
    check_logits(logits, ids)
    columns = {name: value.numpy() for name, value in logit_statistics(logits, labels, energy_temperature).items()}
    if ood:
        statistics = ood_statistics(logits)
        columns.update({name: statistics[name].numpy() for name in ("energy_t1", "max_logit")})
    if save_logits:
        columns["logits"] = logits.half().numpy()
        if info.train_flip:  # the other view a flip-only train transform can produce
            flipped = _logits(teacher, images.flip(-1), info, batch_size, ids)
            check_logits(flipped, ids)
            columns["logits_flipped"] = flipped.half().numpy()
    if views is not None:
        columns.update(view_columns(teacher, views, ids, info, energy_temperature, top_k, batch_size))
    return columns
