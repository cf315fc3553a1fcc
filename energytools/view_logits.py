"""The teacher's logits per stored view: scoring them, top-k compression, reading them back,
per-view groups.

Top-k (``score --views K --top-k N``): of each view's C logits the N largest are kept (class
index and float16 value) plus one float, the *fill*. Rebuilding sets the other C - N logits
to the fill, chosen so that at the energy temperature T_E the rebuilt logits have exactly the
true logsumexp:

    fill = T_E * (logsumexp(z_rest / T_E) - log(C - N))

So at T = T_E (4, KD's usual temperature) the rebuilt softmax gives every kept class its true
probability and the rest its true total mass, spread evenly, and the rebuilt energy is the
true energy. The error is only how the tail mass is shared out:
KL(p || p_rebuilt) = P_tail * KL(p_tail / P_tail || uniform) <= P_tail * log(C - N), where
P_tail is the true softmax mass outside the top N at T_E (plus float16 rounding).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .errors import UserError, option_name
from .io import unreadable_parquet


def index_dtype(num_classes: int) -> np.dtype:
    """int16 class indices where they fit (ImageNet-21k does), int32 beyond."""
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def topk_compress(logits: torch.Tensor, k: int, energy_temperature: float):
    """``(indices, float16 values, float32 fill)`` of (M, C) float32 logits; see the module doc."""
    logits = logits.float()
    num_classes = logits.shape[1]
    if not 0 < k < num_classes:
        raise UserError(f"{option_name('top_k')} must be between 1 and {num_classes - 1} (the classes less one), got {k}")
    values, indices = logits.topk(k, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    fill = energy_temperature * (torch.logsumexp(rest / energy_temperature, dim=1) - math.log(num_classes - k))
    return (indices.cpu().numpy().astype(index_dtype(num_classes)), values.half().cpu().numpy(),
            fill.cpu().numpy().astype(np.float32))


def topk_expand(indices: torch.Tensor, values: torch.Tensor, fill: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(M, C) float32 logits rebuilt from :func:`topk_compress`'s output (on their device)."""
    out = fill.float().unsqueeze(1).expand(-1, num_classes).clone()
    return out.scatter_(1, indices.long(), values.float())


def _flat(column: pa.ChunkedArray, depth: int, path, name: str, lengths: tuple[int, ...]) -> np.ndarray:
    """A (nested) list column as one numpy array of shape (rows, *lengths), checked row by row."""
    array = column.combine_chunks()
    for _level, length in enumerate(lengths):
        if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
            raise UserError(f"{path}: column {name!r} is {column.type}, not {depth}-deep lists")
        sizes = pc.list_value_length(array)
        if sizes.null_count or (len(sizes) and not pc.all(pc.equal(sizes, length)).as_py()):
            raise UserError(f"{path}: column {name!r} does not hold {' x '.join(map(str, lengths))} values in every "
                            f"row; re-score with {option_name('views', metavar='K')}")
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False).reshape(len(column), *lengths)
    return values if values.flags.writeable else values.copy()


def view_column_shapes(views, num_classes: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The per-view columns a table (or shard) scored with ``views`` holds: name -> (list depth, lengths)."""
    count = views.count
    wanted = {"view_energy": (1, (count,))}
    if views.top_k:
        wanted.update(view_topk_index=(2, (count, views.top_k)), view_topk_logit=(2, (count, views.top_k)),
                      view_fill=(1, (count,)))
    else:
        wanted["view_logits"] = (2, (count, num_classes))
    return wanted


def views_from_arrow(table: pa.Table, views, num_classes: int, where) -> dict[str, np.ndarray]:
    """The per-view columns of an Arrow table (rows in its order) as arrays, checked: shapes,
    finite energies, class indices in range. ``where`` names the table in messages."""
    wanted = view_column_shapes(views, num_classes)
    missing = [name for name in wanted if name not in table.column_names]
    if missing:
        raise UserError(f"{where} records {views.count} views but lacks column {missing[0]!r}; re-score with "
                        f"{option_name('views', metavar='K')}")
    out = {name: _flat(table.column(name), depth, where, name, lengths) for name, (depth, lengths) in wanted.items()}
    if not np.isfinite(out["view_energy"]).all():
        raise UserError(f"{where} has non-finite view energies")
    if views.top_k and (out["view_topk_index"].min(initial=0) < 0
                        or out["view_topk_index"].max(initial=0) >= num_classes):
        raise UserError(f"{where}: view_topk_index holds class indices outside 0..{num_classes - 1}")
    return out


def read_views(path: Path | str, meta, num_classes: int) -> dict[str, np.ndarray]:
    """The per-view columns of a score table, in its row order: ``view_energy`` (N, K) and either
    ``view_logits`` (N, K, C) float16 or the top-k triple (N, K, N_top), (N, K, N_top), (N, K)."""
    wanted = view_column_shapes(meta.views, num_classes)
    missing = [name for name in wanted if name not in meta.columns]
    if missing:
        raise UserError(f"{path} records {meta.views.count} views but lacks column {missing[0]!r}; re-score with "
                        f"{option_name('views', metavar='K')}")
    try:
        table = pq.read_table(path, columns=list(wanted))
    except Exception as exc:  # noqa: BLE001 - corrupt file
        raise unreadable_parquet(path, exc) from None
    return views_from_arrow(table, meta.views, num_classes, path)


def read_logits(path: Path | str, num_classes: int) -> np.ndarray:
    """The ``logits`` column of a score table (`score --save-logits`) as (N, C) float16, in its row order."""
    try:
        column = pq.read_table(path, columns=["logits"])["logits"].combine_chunks()
    except Exception as exc:  # noqa: BLE001 - corrupt file
        raise unreadable_parquet(path, exc) from None
    if column.null_count or pc.any(pc.not_equal(pc.list_value_length(column), num_classes)).as_py():
        raise UserError(f"{path}: every row's logits must hold the {num_classes} classes' values")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), num_classes)


def logits_array(name: str, values: np.ndarray) -> pa.Array:
    """A column of stored teacher logits as Arrow, the same in score tables and shards: one
    float16 list per row (``logits``, ``logits_flipped``), nested lists for the per-view columns."""
    if name in ("logits", "logits_flipped"):
        return pa.array(list(values), type=pa.list_(pa.float16()))
    return nested_list_array(values)


def nested_list_array(values: np.ndarray) -> pa.Array:
    """A (rows, d1, d2, ...) numpy array as nested Arrow lists (one list level per dimension)."""
    array = pa.array(values.reshape(-1))
    for depth in range(values.ndim - 1, 0, -1):
        rows = int(np.prod(values.shape[:depth]))
        array = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * values.shape[depth]), array)
    return array
