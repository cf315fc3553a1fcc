"""Load HE-DA shards outside energytools: with polars/pyarrow, as PIL images, or as a torch Dataset.

    python examples/load_shards.py runs/quickstart/he-da
"""
import io
import json
import sys
from pathlib import Path

import polars as pl
from PIL import Image

directory = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/he-da")
manifest = json.loads((directory / "manifest.json").read_text())
rows = pl.concat([pl.read_parquet(directory / name) for name in manifest["shards"]])
print(rows.drop("image").head())
first = rows.row(0, named=True)
image = Image.open(io.BytesIO(first["image"]["bytes"]))  # the Hugging Face datasets image struct
print(f"first augmented sample: {image.size} {image.mode}, source {first['source_id']} + partner "
      f"{first['partner_id']} (lam {first['lam']:.3f}), energy {first['energy']:.3f}")
# `datasets.load_dataset(str(directory))` reads the directory as it is: images as PIL, labels with class names.

from energytools.data import build_dataset  # noqa: E402
from energytools.data.shards import shard_dataset  # noqa: E402

info = build_dataset(manifest["scores"]["dataset"]["name"], "test").info
dataset, table = shard_dataset(directory, info)
image, label, sample_id = dataset[0]
print(f"as a torch Dataset: {len(dataset)} items, first {tuple(image.shape)} label {label} id {sample_id}")
