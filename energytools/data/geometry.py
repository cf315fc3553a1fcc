"""Where an image of any size lands in a square input: the resize (new width, height) and the
crop box, as pure functions of the image's size, shared by PIL's path, torchvision's decoder on
the CPU and decoding on the device (energytools.data.device_decode)."""
from __future__ import annotations

#: a resize: the new (width, height), then the crop box (left, top, right, bottom)
Geometry = tuple[tuple[int, int], tuple[int, int, int, int]]


def square_geometry(width: int, height: int, size: int) -> Geometry:
    """The shorter side to ``size``, then a centre crop to a square."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return (new_w, new_h), (left, top, left + size, top + size)


def center_crop_geometry(width: int, height: int, size: int, resize: int) -> Geometry:
    """torchvision's evaluation transform: Resize(``resize``) of the shorter side, then
    CenterCrop(``size``), with torchvision's rounding."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return (new_w, new_h), (left, top, left + size, top + size)


def fitted_geometry(width: int, height: int, size: int | None, resize: int | None = None) -> Geometry:
    """:func:`square_geometry` of side ``size``, or with ``resize`` :func:`center_crop_geometry`;
    the image as it is without ``size``."""
    if size is None:
        return (width, height), (0, 0, width, height)
    if resize is None:
        return square_geometry(width, height, size)
    return center_crop_geometry(width, height, size, resize)
