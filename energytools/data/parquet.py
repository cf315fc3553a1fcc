"""Image datasets stored as Parquet, the layout Hugging Face `datasets` writes and the Hub serves.

``DIR/data/train-*.parquet`` and ``DIR/data/test-*.parquet`` (or the same files directly in
DIR, or in DIR/train/ and DIR/test/; ``validation`` stands in for a missing ``test``). A file
holds an image column of structs ``{bytes, path}`` and an integer label column; the
``huggingface`` key of its schema metadata names them and carries the class names::

    {"info": {"features": {"image": {"_type": "Image"},
                           "label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}}}

Without a label column the images have no labels, and a null or -1 label (the `datasets`
convention) marks a row without one: only `energytools score` reads such rows (NO_LABEL).

Images are decoded once, eagerly, into memory (N x H x W x C bytes): simple and fast for
datasets of the size that fits there.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..energy import NO_LABEL
from ..errors import UserError, option_name
from .base import ArrayImages, DatasetInfo, decode_square, imagenet_stats, to_array
from .decode import image_decoder

#: the schema metadata key under which `datasets` stores its features
HF_METADATA_KEY = b"huggingface"
#: energytools' part -> the split names that supply it, in order of preference
SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation")}
#: where a split's files may be, relative to DIR; the first pattern that matches wins
LAYOUTS = ("data/{split}-*.parquet", "data/{split}.parquet", "{split}-*.parquet", "{split}.parquet",
           "{split}/*.parquet")
#: PIL modes read as one channel; everything else is read as RGB
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class Columns:
    """Which columns hold the images and the labels (None: the images have none), and the
    labels' names when known."""

    image: str
    label: str | None
    names: tuple[str, ...] | None


def split_files(root: Path, part: str) -> list[Path]:
    """The sorted Parquet files of ``part`` ("train" or "test") under ``root``; [] when none."""
    for split in SPLIT_NAMES[part]:
        for layout in LAYOUTS:
            files = sorted(root.glob(layout.format(split=split)))
            if files:
                return files
    return []


def _schema(file: Path) -> pa.Schema:
    try:
        return pq.read_schema(file)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"cannot read Parquet file {file}: {str(exc).splitlines()[0][:200]}") from None


def _features(schema: pa.Schema) -> dict:
    """The `datasets` features in the schema metadata ({} when absent or unreadable)."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def find_columns(file: Path) -> Columns:
    """The image and label columns of ``file``: from its `datasets` features when present
    (``Image``, ``ClassLabel``), else the first ``{bytes, ...}`` struct and a column named
    ``label`` or ``labels``; no such column means images without labels."""
    schema = _schema(file)
    features = _features(schema)
    image = next((name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"), None)
    if image is None:
        image = next((field.name for field in schema if pa.types.is_struct(field.type)
                      and field.type.get_field_index("bytes") >= 0), None)
    label = next((name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"),
                 None)
    if label is None:
        label = next((name for name in ("label", "labels") if name in schema.names), None)
    if image is None or image not in schema.names:
        raise UserError(f"{file} needs an image column (structs with bytes) and, for labels, a label column; it "
                        f"has {', '.join(schema.names)}")
    if label is None or label not in schema.names:
        return Columns(image, None, None)
    _check_labels(file, label, schema)
    return Columns(image, label, _label_names(schema, label))


def _label_names(schema: pa.Schema, label: str) -> tuple[str, ...] | None:
    """The ClassLabel names of column ``label`` in a `datasets` schema, if it records them."""
    feature = _features(schema).get(label)
    names = feature.get("names") if isinstance(feature, dict) else None
    return tuple(str(n) for n in names) if names else None


def _check_labels(file: Path, label: str, schema: pa.Schema, names: tuple[str, ...] | None = None) -> None:
    """Integer labels, and (given the first train file's ``names``) the same class names, in every file."""
    if not pa.types.is_integer(schema.field(label).type):
        raise UserError(f"{file}: label column {label!r} is {schema.field(label).type}, not integer")
    own = _label_names(schema, label)
    if names and own and own != names:
        raise UserError(f"{file}: its label names {list(own)} differ from the first train file's {list(names)}")


def _rows(files: list[Path], columns: Columns) -> Iterator[tuple[Path, int, bytes, Image.Image, int]]:
    """``(file, row, bytes, image opened lazily, label)`` for every row of ``files`` in order."""
    for file in files:
        schema = _schema(file)
        wanted = [c for c in (columns.image, columns.label) if c is not None]
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise UserError(f"{file} lacks column(s) {', '.join(missing)} that {files[0].name} has")
        if columns.label is not None:
            _check_labels(file, columns.label, schema, columns.names)
        try:
            table = pq.read_table(file, columns=wanted)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"cannot read Parquet file {file}: {str(exc).splitlines()[0][:200]}") from None
        images = table.column(columns.image).combine_chunks()
        if not pa.types.is_struct(images.type) or images.type.get_field_index("bytes") < 0:
            raise UserError(f"{file}: column {columns.image!r} is {images.type}, not structs with bytes")
        blobs = images.field("bytes").to_pylist()
        labels = table.column(columns.label).to_pylist() if columns.label is not None else [None] * len(blobs)
        for row, (blob, label) in enumerate(zip(blobs, labels)):
            if label is None or label == NO_LABEL:
                label = NO_LABEL
            elif label < 0:
                raise UserError(f"{file} row {row}: label {label} (a row without a label has -1 or null)")
            if blob is None:
                raise UserError(f"{file} row {row}: the image has no bytes (only a path)")
            try:
                image = Image.open(io.BytesIO(blob))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(f"cannot decode the image in row {row} of {file}: {exc}") from None
            yield file, row, blob, image, label


def _decode(blob: bytes, image: Image.Image, file: Path, row: int, channels: int, size: int | None,
            decoder: str) -> np.ndarray:
    fast = decode_square(blob, channels, size, decoder=decoder)
    if fast is not None:
        return fast
    try:
        return to_array(image, channels, size)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode the image in row {row} of {file}: {exc}") from None


def read_split(root: Path | None, part: str, image_size: int | None = None):
    """Read ``part`` of the Parquet dataset in ``root``; a dataset loader's ``(info, images, labels, None)``.

    The train files fix what both parts share: the class names (ClassLabel, else the labels
    as text; none without labels), the channels (1 when every image is gray, else 3) and the
    size (that of the images, which must all be the same square, unless ``image_size`` resizes
    and centre-crops each). Sample ids are row positions over the sorted file list.
    """
    if root is None:
        raise UserError(f"parquet needs {option_name('data_root')}: a folder with data/train-*.parquet and data/test-*.parquet")
    train_files = split_files(root, "train")
    if not train_files:
        looked = ", ".join(layout.format(split="train") for layout in LAYOUTS)
        raise UserError(f"no train Parquet files in {root} (looked for {looked})")
    columns = find_columns(train_files[0])
    # one pass over the train headers (no decoding) settles channels, size and class count
    modes, sizes, max_label = set(), set(), NO_LABEL
    for _, _, _, image, label in _rows(train_files, columns):
        modes.add(image.mode)
        sizes.add(image.size)
        max_label = max(max_label, label)
    if not sizes:
        raise UserError(f"the train Parquet files in {root} hold no rows")
    channels = 1 if modes <= GRAY_MODES else 3
    names = columns.names or tuple(str(i) for i in range(max_label + 1))
    size = image_size
    if size is None:
        (width, height), *others = sorted(sizes)
        if others or width != height:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
            raise UserError(f"the train images in {root} are {shown}{' ...' if len(sizes) > 4 else ''}: "
                            f"pass {option_name('image_size', metavar='N')} to resize and centre-crop them to N x N")
        size = width
    files = train_files if part == "train" else split_files(root, "test")
    if not files:
        raise UserError(f"no test Parquet files in {root} (looked for data/test-*.parquet and the like, "
                        "and for validation instead of test)")
    arrays, labels, decoder = [], [], image_decoder()
    for file, row, blob, image, label in _rows(files, columns):
        if label != NO_LABEL and label >= len(names):
            raise UserError(f"{file} row {row}: label {label}, but there are {len(names)} classes")
        array = _decode(blob, image, file, row, channels, image_size, decoder)
        if array.shape[:2] != (size, size):
            raise UserError(f"row {row} of {file} is {array.shape[1]}x{array.shape[0]}, the train images "
                            f"{size}x{size}: pass {option_name('image_size', metavar='N')} to resize them all")
        arrays.append(array)
        labels.append(label)
    if not arrays:
        raise UserError(f"the {part} Parquet files in {root} hold no rows")
    mean, std = imagenet_stats(channels)
    info = DatasetInfo("parquet", len(names), channels, size, mean, std, train_flip=True, classes=names)
    return info, ArrayImages(np.stack(arrays)), np.asarray(labels, dtype=np.int64), None
