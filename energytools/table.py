"""Parquet files with energytools metadata: write atomically, read back, validate.

Every file energytools writes carries one schema-level metadata key, ``energytools``, a
JSON object with the provenance (versions, dataset, teacher) and the resolved config.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .io import atomic_path

METADATA_KEY = b"energytools"

#: columns every score table has, with their Arrow types
SCORE_COLUMNS = {
    "sample_id": pa.int64(), "label": pa.int64(), "pred": pa.int64(), "correct": pa.bool_(),
    "energy": pa.float32(), "confidence": pa.float32(), "true_prob": pa.float32(), "entropy": pa.float32(),
    "margin": pa.float32(), "energy_group": pa.string(), "temperature": pa.float32(),
}


def versions() -> dict:
    """Library versions recorded in every output, and torch's thread count: it changes the last
    bits of a forward pass, so two outputs can only be expected to match bit for bit when it does."""
    import torch

    from . import __version__

    return {"energytools": __version__, "torch": torch.__version__, "polars": pl.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def write_parquet(table: pa.Table | pl.DataFrame, path: Path | str, metadata: dict,
                  row_group_size: int | None = None, compression="zstd") -> Path:
    """Write ``table`` with ``metadata`` under the energytools key, atomically.

    No timestamps go into the metadata, so the same inputs give the same bytes.
    """
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    existing = dict(table.schema.metadata or {})
    existing[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression=compression)
    return Path(path)


def read_metadata(path: Path | str) -> dict:
    """The energytools metadata of a Parquet file (an empty dict when absent)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - corrupt or not Parquet
        raise UserError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0][:200]}") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_parquet(path: Path | str, columns: list[str] | None = None) -> pl.DataFrame:
    try:
        return pl.from_arrow(pq.read_table(path, columns=columns))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0][:200]}") from None


def load_table(path: Path | str, columns: list[str] | None = None) -> tuple[pl.DataFrame, dict]:
    """Load a score table as a polars DataFrame plus its metadata, checking its contract.

    Raises :class:`UserError` when the file is not a score table, lacks columns, or has
    duplicate, null or unsorted sample ids.
    """
    meta = read_metadata(path)
    if meta.get("kind") != "scores":
        raise UserError(f"{path} is not an energytools score table (no score metadata)")
    frame = read_parquet(path, columns)
    validate_scores(frame, path, required=columns)
    return frame, meta


def validate_scores(frame: pl.DataFrame, path, required: list[str] | None = None) -> None:
    wanted = required if required is not None else list(SCORE_COLUMNS)
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}")
    if "sample_id" in frame.columns:
        ids = frame["sample_id"]
        if ids.null_count():
            raise UserError(f"{path} has null sample_id values")
        if ids.n_unique() != len(ids):
            raise UserError(f"{path} has duplicate sample_id values")
    if "energy" in frame.columns and not frame["energy"].is_finite().all():
        raise UserError(f"{path} has non-finite energies")
