"""Training views that replay exactly: the train transform as data, drawn by pure functions.

A *view* of a sample is one output of the dataset's train transform (a crop and a flip, or
a RandomResizedCrop box and a flip). View ``v`` of sample ``i`` is drawn from the key
``(seed, i, v)`` by a counter-based hash (no generator state), so score can store the
teacher's logits for views 0..K-1 and distill can render exactly the same pixels later, in
any process, worker or order. Rendering is a pure function of the image and the view.

The train transforms (:class:`TrainTransform`):

- ``none``: the image as it is;
- ``flip``: a horizontal flip with probability 1/2;
- ``pad-crop``: zero-pad by ``pad`` pixels, crop back to ``size`` at a uniform offset, then
  flip (CIFAR's RandomCrop(32, padding=4) + RandomHorizontalFlip);
- ``resized-crop``: torchvision's RandomResizedCrop(``size``, scale, ratio) on the original
  image (the box drawn with torchvision's algorithm: ten tries, then the centre fallback),
  bilinear resize, then flip: ImageNet training.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError

TRANSFORM_KINDS = ("none", "flip", "pad-crop", "resized-crop")


@dataclass(frozen=True)
class TrainTransform:
    """A dataset's train-time augmentation, as data: what a view is drawn from."""

    kind: str
    size: int
    flip: bool = True
    pad: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.kind not in TRANSFORM_KINDS:
            raise UserError(f"unknown train transform {self.kind!r}; one of {', '.join(TRANSFORM_KINDS)}")
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        object.__setattr__(self, "ratio", tuple(float(r) for r in self.ratio))

    @property
    def crops(self) -> bool:
        return self.kind in ("pad-crop", "resized-crop")

    def describe(self) -> str:
        flip = " + flip" if self.flip else ""
        if self.kind == "pad-crop":
            return f"pad-{self.pad} crop to {self.size}{flip}"
        if self.kind == "resized-crop":
            return (f"RandomResizedCrop({self.size}, scale={self.scale[0]:g}-{self.scale[1]:g}, "
                    f"ratio={self.ratio[0]:.4g}-{self.ratio[1]:.4g}){flip}")
        return "flip" if self.flip else "none"

    def to_dict(self) -> dict:
        """Only what decides a view: the fields that do not apply to ``kind`` are left out."""
        out = {"kind": self.kind, "size": self.size, "flip": self.flip}
        if self.kind == "pad-crop":
            out["pad"] = self.pad
        if self.kind == "resized-crop":
            out.update(scale=list(self.scale), ratio=list(self.ratio))
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainTransform":
        known = {k: v for k, v in raw.items() if k in ("kind", "size", "flip", "pad", "scale", "ratio")}
        return cls(**known)


# --- counter-based randomness: uniform numbers from keys, no generator state ---------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

#: domains, so that view draws and per-epoch choices never share a key
DRAW, CHOOSE = 0x5649455753, 0x43484F4F5345


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters every input bit."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_keys(*keys) -> np.ndarray:
    """One uint64 per element of the broadcast ``keys`` (integers or integer arrays), folded left
    to right: ``h = mix(h ^ key)`` from ``h = 0``."""
    h = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            h = _mix(h ^ np.array(key, dtype=np.int64, copy=True).view(np.uint64))
    return h


def _to_unit(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def uniform(*keys) -> np.ndarray:
    """Floats in [0, 1) with 53 random bits, one per element of the broadcast ``keys``."""
    return _to_unit(hash_keys(*keys))


def _below(u: np.ndarray, n) -> np.ndarray:
    """An integer uniform in [0, n) from ``u`` in [0, 1)."""
    return np.minimum(np.floor(u * n), np.asarray(n) - 1).astype(np.int64)


def choose_views(seed: int, epoch: int, sample_ids: np.ndarray, count: int) -> np.ndarray:
    """Which of its ``count`` stored views each sample trains on in ``epoch``."""
    return _below(uniform(CHOOSE, seed, epoch, sample_ids), count)


# --- drawing views ---------------------------------------------------------------------------

@dataclass
class ViewParams:
    """Views as arrays, one entry per view: the crop box (in the padded image for ``pad-crop``,
    in the original image for ``resized-crop``) and whether it is mirrored. The box is resized
    to the transform's ``size``."""

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.top)

    def row(self, i: int) -> dict:
        return {name: (bool if name == "flip" else int)(value[i]) for name, value in asdict(self).items()}


def draw_views(transform: TrainTransform, seed: int, sample_ids, views, heights=None, widths=None) -> ViewParams:
    """View ``views[j]`` of sample ``sample_ids[j]`` (arrays broadcast together), a pure function
    of ``(seed, sample_id, view)`` and, for ``resized-crop``, of the original image's
    ``heights`` and ``widths``."""
    ids, views = np.broadcast_arrays(np.asarray(sample_ids, dtype=np.int64), np.asarray(views, dtype=np.int64))
    base = hash_keys(DRAW, seed, ids, views)

    def u(stream: int) -> np.ndarray:  # = uniform(DRAW, seed, id, view, stream)
        with np.errstate(over="ignore"):
            return _to_unit(_mix(base ^ np.uint64(stream)))

    n, size = ids.shape, transform.size
    flip = (u(0) < 0.5) if transform.flip else np.zeros(n, dtype=bool)
    if transform.kind == "pad-crop":
        span = 2 * transform.pad + 1
        return ViewParams(_below(u(1), span), _below(u(2), span), np.full(n, size), np.full(n, size), flip)
    if transform.kind != "resized-crop":
        return ViewParams(np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, size), np.full(n, size), flip)
    if heights is None or widths is None:
        raise ValueError("resized-crop views need the original image sizes")
    H = np.broadcast_to(np.asarray(heights, dtype=np.int64), n)
    W = np.broadcast_to(np.asarray(widths, dtype=np.int64), n)
    area = (H * W).astype(np.float64)
    log_ratio = (math.log(transform.ratio[0]), math.log(transform.ratio[1]))
    top, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
    height, width = H.copy(), W.copy()
    found = np.zeros(n, dtype=bool)
    for attempt in range(10):  # torchvision's RandomResizedCrop.get_params, key by key
        target = area * (transform.scale[0] + u(10 + 4 * attempt) * (transform.scale[1] - transform.scale[0]))
        aspect = np.exp(log_ratio[0] + u(11 + 4 * attempt) * (log_ratio[1] - log_ratio[0]))
        w = np.round(np.sqrt(target * aspect)).astype(np.int64)
        h = np.round(np.sqrt(target / aspect)).astype(np.int64)
        ok = ~found & (w > 0) & (w <= W) & (h > 0) & (h <= H)
        i = _below(u(12 + 4 * attempt), np.maximum(H - h + 1, 1))
        j = _below(u(13 + 4 * attempt), np.maximum(W - w + 1, 1))
        top[ok], left[ok], height[ok], width[ok] = i[ok], j[ok], h[ok], w[ok]
        found |= ok
    if not found.all():  # the fallback: the centre crop at the nearest allowed aspect ratio
        rest = ~found
        in_ratio = W / H
        w, h = W.copy(), H.copy()
        narrow, wide = in_ratio < transform.ratio[0], in_ratio > transform.ratio[1]
        h = np.where(narrow, np.round(W / transform.ratio[0]).astype(np.int64), h)
        w = np.where(wide, np.round(H * transform.ratio[1]).astype(np.int64), w)
        top[rest], left[rest] = ((H - h) // 2)[rest], ((W - w) // 2)[rest]
        height[rest], width[rest] = h[rest], w[rest]
    return ViewParams(top, left, height, width, flip)


# --- rendering views -------------------------------------------------------------------------

def crop_flip(images: torch.Tensor, params: ViewParams, transform: TrainTransform) -> torch.Tensor:
    """Views of a uint8 (B, C, H, W) batch of same-size images (``none``, ``flip``, ``pad-crop``):
    one gather on whatever device the batch is on; contiguous NCHW out."""
    pad = transform.pad if transform.kind == "pad-crop" else 0
    if pad:
        images = F.pad(images, (pad, pad, pad, pad))
    batch, channels, height, width = images.shape
    size = height - 2 * pad
    device = images.device
    steps = torch.arange(size, device=device)
    rows = torch.as_tensor(params.top, device=device)[:, None] + steps
    cols = torch.as_tensor(params.left, device=device)[:, None] + steps
    cols = torch.where(torch.as_tensor(params.flip, device=device)[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, size * size).expand(batch, channels, -1)
    # one gather over each flattened image; the output has NCHW strides, as stacking gives
    return images.reshape(batch, channels, height * width).gather(2, index).view(batch, channels, size, size)


def resized_crop(image: Image.Image, params: ViewParams, i: int, size: int) -> np.ndarray:
    """View ``i`` of ``params`` of a PIL image: torchvision's resized_crop (crop, then bilinear
    resize with antialiasing, as PIL does) and the flip; an HxWxC uint8 array."""
    top, left, height, width = (int(params.top[i]), int(params.left[i]), int(params.height[i]),
                                int(params.width[i]))
    out = image.crop((left, top, left + width, top + height)).resize((size, size), Image.BILINEAR)
    if params.flip[i]:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(out, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


