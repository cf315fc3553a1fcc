"""Image bytes -> a square uint8 array, by torchvision's decoders where they read the format.

torchvision's `decode_image` (libjpeg-turbo, libpng, libwebp) and an antialiased bilinear
resize of the uint8 tensor do what PIL's open, convert and resize do, faster (issue 42: 1.6x
for decode plus resize of 256 px JPEGs to 64 px on one core). The geometry (new size,
crop box) is the one :mod:`energytools.data.base` computes for PIL, so the two paths differ
only in rounding inside the decoder and the filter: a pixel by one or two levels, a teacher's
energy by well under 1% (tests/test_data.py states and tests the tolerance).

PIL stays the reader of everything else: formats torchvision does not decode (BMP, TIFF,
GIF...), 16-bit images (PIL's path scales them to 8 bits), and any file torchvision refuses.
torchvision 0.29 deprecates its image codecs in favour of TorchCodec (a warning this module
silences); when they go, PIL reads everything again and nothing else changes.

``ENERGYTOOLS_IMAGE_DECODER=pil`` reads every image with PIL (the decoder energytools used
before this one, for a byte-identical re-run of an older table); the choice is recorded in
every output's versions.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

#: the decoder's environment variable and its choices: auto (torchvision where it applies) or pil
DECODER_VARIABLE = "ENERGYTOOLS_IMAGE_DECODER"
DECODERS = ("auto", "pil")
#: leading bytes of the formats handed to torchvision (WebP: RIFF....WEBP)
MAGIC = {"jpeg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",), "webp": (b"RIFF",)}


def image_decoder() -> str:
    """``auto`` or ``pil``, from ENERGYTOOLS_IMAGE_DECODER (unset: auto); another value is refused."""
    from ..errors import UserError

    chosen = os.environ.get(DECODER_VARIABLE, "auto").strip().lower() or "auto"
    if chosen not in DECODERS:
        raise UserError(f"{DECODER_VARIABLE}={chosen!r}: choose from {', '.join(DECODERS)}")
    return chosen


def sniff(data: bytes) -> str | None:
    """The format torchvision will read, by the leading bytes; None for the others."""
    for name, prefixes in MAGIC.items():
        if data.startswith(prefixes) and (name != "webp" or data[8:12] == b"WEBP"):
            return name
    return None


def decode(data: bytes, channels: int) -> torch.Tensor | None:
    """``data`` as a (C, H, W) uint8 tensor with ``channels`` 1 (gray) or 3 (RGB), or None when
    torchvision should not read it (another format, 16 bits, a file it refuses): PIL will.

    Always decoded to RGB (alpha dropped, a palette expanded, gray repeated, as PIL's convert
    does), then made gray with PIL's own integer luma, not libpng's or libjpeg's weights."""
    if sniff(data) is None:
        return None
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # a torchvision without its codecs
        return None
    try:
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; these decoders still work
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None
    if image.dtype != torch.uint8 or image.shape[0] != 3:
        return None
    return luma(image) if channels == 1 else image


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (1, H, W) uint8 as PIL's convert("L"): (299 R + 587 G + 114 B) / 1000
    in its 16-bit fixed point, rounded."""
    wide = rgb.to(torch.int32)
    gray = (wide[0] * 19595 + wide[1] * 38470 + wide[2] * 7471 + 0x8000) >> 16
    return gray.to(torch.uint8)[None]


def resize_crop(image: torch.Tensor, new_size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(C, H, W) uint8 resized to ``new_size`` (width, height; bilinear with antialiasing, as
    PIL's resize), then cropped to ``box`` (left, top, right, bottom); HxWxC uint8."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    width, height = new_size
    if (height, width) != tuple(image.shape[1:]):
        image = resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    left, top, right, bottom = box
    return np.ascontiguousarray(image[:, top:bottom, left:right].permute(1, 2, 0).numpy())
