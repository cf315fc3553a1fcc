"""HE-DA augmentation policies, by name: pair mixing (CutMix, MixUp) and per-image presets.

Every random draw comes from a generator seeded by (seed, source_id, copy), so an augmented
sample is the same whatever process or order produced it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError
from .io import require_file


@dataclass
class Augmented:
    image: np.ndarray
    partner_index: int | None  # index into the selected set
    lam: float | None
    params: dict


def _partner(rng: np.random.Generator, own: int, count: int) -> int:
    """A partner drawn uniformly from the selected set, never the sample itself."""
    if count < 2:
        raise UserError("pair policies need at least two selected samples")
    other = int(rng.integers(count - 1))
    return other + (other >= own)


def cutmix_box(rng: np.random.Generator, height: int, width: int, alpha: float = 1.0):
    """CutMix's box (Yun et al. 2019): area ~ 1 - lam, centre uniform, clipped to the image.

    Returns ``(top, left, bottom, right, lam)`` where lam = 1 - box area / image area after
    clipping (the fraction of the source image that remains).
    """
    lam = float(rng.beta(alpha, alpha))
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return int(top), int(left), int(bottom), int(right), float(lam)


class CutMix:
    name = "cutmix"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def __call__(self, rng, own: int, images: Callable[[int], np.ndarray], count: int) -> Augmented:
        partner = _partner(rng, own, count)
        image, other = images(own).copy(), images(partner)
        top, left, bottom, right, lam = cutmix_box(rng, *image.shape[:2], alpha=self.alpha)
        image[top:bottom, left:right] = other[top:bottom, left:right]
        return Augmented(image, partner, lam, {"box": [top, left, bottom, right], "alpha": self.alpha})


class MixUp:
    name = "mixup"

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha

    def __call__(self, rng, own: int, images, count: int) -> Augmented:
        partner = _partner(rng, own, count)
        lam = float(rng.beta(self.alpha, self.alpha))
        mixed = lam * images(own).astype(np.float32) + (1 - lam) * images(partner).astype(np.float32)
        return Augmented(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), partner, lam, {"alpha": self.alpha})


class Albumentations:
    """A per-image albumentations pipeline, re-seeded for every sample."""

    def __init__(self, name: str, transform):
        self.name, self.transform = name, transform

    def __call__(self, rng, own: int, images, count: int) -> Augmented:
        self.transform.set_random_seed(int(rng.integers(2**31 - 1)))
        result = self.transform(image=images(own))
        applied = [[name, {k: v for k, v in params.items() if k != "shape"}]
                   for name, params in result.get("applied_transforms", [])]
        image = result["image"]
        if image.ndim == 2:
            image = image[..., None]
        return Augmented(np.ascontiguousarray(image, dtype=np.uint8), None, None,
                         {"applied": json.loads(json.dumps(applied, default=str))})


def _randaug():
    """A RandAugment-like preset: two of nine geometric/photometric ops at fixed strength."""
    import albumentations as A

    ops = [A.Affine(rotate=(-20, 20), p=1), A.Affine(translate_percent=(-0.12, 0.12), p=1),
           A.Affine(shear=(-12, 12), p=1), A.RandomBrightnessContrast(p=1), A.Sharpen(p=1),
           A.Posterize(p=1), A.Solarize(p=1), A.Equalize(p=1), A.CoarseDropout(p=1)]
    return A.Compose([A.SomeOf(ops, n=2, p=1)], save_applied_params=True, seed=0)


def _light():
    """Mild geometry only: small shifts, rotations and scale changes."""
    import albumentations as A

    return A.Compose([A.Affine(translate_percent=(-0.08, 0.08), rotate=(-10, 10), scale=(0.9, 1.1), p=1)],
                     save_applied_params=True, seed=0)


#: name -> factory() -> policy
POLICIES: dict[str, Callable] = {
    "cutmix": lambda: CutMix(1.0),
    "mixup": lambda: MixUp(0.2),
    "randaug": lambda: Albumentations("randaug", _randaug()),
    "light": lambda: Albumentations("light", _light()),
}


def make_policy(name_or_file: str):
    """A policy by name, or an albumentations pipeline saved with ``albumentations.save``."""
    if name_or_file in POLICIES:
        return POLICIES[name_or_file]()
    path = Path(name_or_file)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        require_file(path, "policy file")
        import albumentations as A
        import yaml

        try:
            with open(path) as handle:  # safe_load: YAML tags cannot build Python objects
                data = json.load(handle) if path.suffix.lower() == ".json" else yaml.safe_load(handle)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read albumentations pipeline {path}: {str(exc).splitlines()[0][:200]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("transform"), dict):
            raise UserError(f"{path} is not an albumentations pipeline (albumentations.save writes one)")
        check_albumentations_only(data["transform"], path)
        try:
            transform = A.from_dict(data)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot load albumentations pipeline {path}: {str(exc).splitlines()[0][:200]}") from None
        if not isinstance(transform, A.Compose):
            transform = A.Compose([transform])
        transform = A.Compose(transform.transforms, save_applied_params=True, seed=0)
        return Albumentations(path.name, transform)
    raise UserError(f"unknown policy {name_or_file!r}; choose from {', '.join(POLICIES)} or an albumentations "
                    ".json/.yaml file")


def check_albumentations_only(node, path: Path) -> None:
    """Refuse a pipeline that names anything but albumentations' own serializable transforms.

    albumentations builds each ``__class_fullname__`` from its registry, which also holds any
    other package's subclasses imported in this process, and Lambda transforms that take
    code. Only classes defined in albumentations pass, at every level of Compose/OneOf/SomeOf.
    """
    from albumentations.core.serialization import SERIALIZABLE_REGISTRY, shorten_class_name

    name = node.get("__class_fullname__") if isinstance(node, dict) else None
    cls = SERIALIZABLE_REGISTRY.get(shorten_class_name(name)) if isinstance(name, str) else None
    if cls is None or not cls.__module__.startswith("albumentations."):
        raise UserError(f"refusing policy file {path}: {str(name)[:100]!r} is not an albumentations transform "
                        "(policy files may name albumentations transforms only)")
    children = node.get("transforms", [])
    if not isinstance(children, list):
        raise UserError(f"refusing policy file {path}: {name}'s transforms must be a list")
    for child in children:
        check_albumentations_only(child, path)
