"""The HE-DA shard format: a directory laid out as a Hugging Face dataset.

``train-00000-of-0000N.parquet`` files (the Hub's names, so ``datasets.load_dataset(DIR)``
takes them as the train split) beside ``manifest.json``; no other Parquet file, so a polars
or duckdb glob ``DIR/*.parquet`` reads the shards alone. Columns: ``image`` struct{bytes:
PNG (or JPEG or WebP: ``augment --image-format``), path} (decoded as ``Image``), ``sample_id`` (disjoint from the dataset's), ``source_id``,
``partner_id``, ``lam``, ``label`` and ``partner_label`` (``ClassLabel`` with the dataset's
class names), ``aug``, ``aug_params`` (JSON), ``energy``, ``confidence``, ``energy_group``,
``temperature`` and optional ``logits``; when the score table holds K views, the same per-view
columns as the table (``view_energy`` and ``view_logits`` or the top-k triple), for the K views
of each new image drawn from its own sample_id.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..errors import UserError, option_name
from .base import ArrayImages, DatasetInfo, ImageSet

MANIFEST = "manifest.json"
SHARD_GLOB = "train-*.parquet"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SHARD_SCHEMA = pa.schema([
    ("image", IMAGE_TYPE), ("sample_id", pa.int64()), ("source_id", pa.int64()), ("partner_id", pa.int64()),
    ("lam", pa.float32()), ("label", pa.int64()), ("partner_label", pa.int64()), ("aug", pa.string()),
    ("aug_params", pa.string()), ("energy", pa.float32()), ("confidence", pa.float32()),
    ("energy_group", pa.string()), ("temperature", pa.float32()),
])


def shard_name(index: int, count: int) -> str:
    return f"train-{index:05d}-of-{count:05d}.parquet"


def huggingface_metadata(class_names: tuple[str, ...]) -> dict[bytes, bytes]:
    """The schema metadata key ``datasets`` reads column types from: images decode as ``Image``
    and labels carry the class names; the other columns' types come from Arrow."""
    features = {"image": {"_type": "Image"}}
    if class_names:
        label = {"_type": "ClassLabel", "names": list(class_names)}
        features.update(label=label, partner_label=label)
    return {b"huggingface": json.dumps({"info": {"features": features}}, sort_keys=True).encode()}


@dataclass(frozen=True)
class ImageFormat:
    """How shard images are encoded: PIL's format name, the file extension of the ``path`` field,
    whether decoding gives the pixels back, and the quality a lossy format uses by default."""

    pil: str
    extension: str
    lossless: bool
    default_quality: int | None = None

    def save_options(self, quality: int | None) -> dict:
        if self.lossless:
            return {"compress_level": 6}  # fixed, so the bytes are deterministic
        return {"quality": quality or self.default_quality}


#: augment --image-format: PNG (lossless, the default) or the lossy JPEG and WebP (smaller)
IMAGE_FORMATS = {"png": ImageFormat("PNG", "png", True), "jpeg": ImageFormat("JPEG", "jpg", False, 90),
                 "webp": ImageFormat("WEBP", "webp", False, 90)}
DEFAULT_IMAGE_FORMAT = "png"
#: other spellings of the formats' names (case does not matter either)
IMAGE_FORMAT_ALIASES = {"jpg": "jpeg"}


def canonical_image_format(name: str | None) -> str | None:
    """``name`` as IMAGE_FORMATS spells it ("JPG" -> "jpeg"); None stays None (PNG)."""
    if name is None:
        return None
    lowered = name.strip().lower()
    return IMAGE_FORMAT_ALIASES.get(lowered, lowered)


def check_image_format(name: str | None, quality: int | None) -> ImageFormat:
    """The format ``name`` (None: PNG), refused in one line when unknown, when this Pillow cannot
    write it, or when ``quality`` is given to a lossless format or outside 1..100."""
    from PIL import features

    name = canonical_image_format(name) or DEFAULT_IMAGE_FORMAT
    if name not in IMAGE_FORMATS:
        raise UserError(f"{option_name('image_format')}: unknown format {name!r}; choose from "
                        f"{', '.join(IMAGE_FORMATS)}")
    chosen = IMAGE_FORMATS[name]
    if quality is not None and chosen.lossless:
        raise UserError(f"{option_name('quality')} applies to the lossy formats (jpeg, webp), not {name}")
    if quality is not None and not 1 <= quality <= 100:
        raise UserError(f"{option_name('quality')} must be in 1..100, got {quality}")
    if name == "webp" and not features.check("webp"):
        raise UserError(f"{option_name('image_format')} webp: this Pillow was built without WebP; use jpeg or png")
    return chosen


def encode_image(image: np.ndarray, image_format: str | None = None, quality: int | None = None) -> bytes:
    """HxWxC uint8 -> encoded bytes (deterministic: fixed settings, no metadata); PNG by default."""
    chosen = IMAGE_FORMATS[image_format or DEFAULT_IMAGE_FORMAT]
    array = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=chosen.pil, **chosen.save_options(quality))
    return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """HxWxC uint8 -> PNG bytes."""
    return encode_image(image, "png")


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Encoded bytes (any format PIL reads) -> HxWxC uint8 with ``channels`` channels."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def read_manifest(directory: Path | str) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} is not an HE-DA shard directory (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def shard_files(directory: Path | str) -> list[Path]:
    manifest = read_manifest(directory)
    files = [Path(directory) / name for name in manifest["shards"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{directory} is incomplete: missing {missing[0]} (re-run augment to finish it)")
    return files


def read_shards(directory: Path | str) -> pl.DataFrame:
    """All rows of a shard directory as one polars frame (images still encoded)."""
    files = shard_files(directory)
    if not files:
        return pl.from_arrow(SHARD_SCHEMA.empty_table())
    try:
        return pl.from_arrow(pa.concat_tables([pq.read_table(f) for f in files]))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read shards in {directory}: {str(exc).splitlines()[0][:200]}") from None


def shard_dataset(directory: Path | str, info: DatasetInfo) -> tuple[ImageSet, pl.DataFrame]:
    """A map-style dataset over a shard directory, plus its rows without the image bytes."""
    frame = read_shards(directory)
    images = np.stack([decode_image(row["bytes"], info.in_channels) for row in frame["image"].to_list()]) \
        if frame.height else np.zeros((0, info.image_size, info.image_size, info.in_channels), np.uint8)
    dataset = ImageSet(info, "he-da", ArrayImages(images), frame["label"].to_numpy(), frame["sample_id"].to_numpy())
    return dataset, frame.drop("image")


def leaf_columns(field: pa.Field, prefix: str = "") -> list[str]:
    """The Parquet leaf paths of a column ("image.bytes", "view_logits.list.element.list.element"):
    pyarrow matches per-column compression by these, and writes a column it does not match plain."""
    name, kind = prefix + field.name, field.type
    if pa.types.is_struct(kind):
        return [leaf for child in kind for leaf in leaf_columns(child, name + ".")]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return leaf_columns(pa.field("element", kind.value_type), name + ".list.")
    return [name]


def shard_compression(schema: pa.Schema) -> dict[str, str]:
    """zstd for every column but the image bytes, which are compressed already."""
    return {leaf: "none" if leaf == "image.bytes" else "zstd" for field in schema for leaf in leaf_columns(field)}
