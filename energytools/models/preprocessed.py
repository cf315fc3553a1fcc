"""A model fed the preprocessing its weights were trained with (timm's pretrained_cfg, a Hugging
Face preprocessor_config.json, or the user's overrides), from batches the dataset normalised."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

#: a preprocessing's interpolation (PIL's filter names, as timm and transformers give them) -> torch's
#: mode; torch has no Lanczos, box or Hamming filter, so the nearest of its own stands in
INTERPOLATION = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic",
                 "box": "bilinear", "hamming": "bilinear"}


def _per_channel(values, channels: int, what: str) -> torch.Tensor:
    """``values`` for ``channels`` channels: one value is repeated, an RGB triple averaged for gray."""
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    elif channels == 1 and len(values) == 3:  # a gray-input model built from an RGB model's cfg
        values = [sum(values) / 3]
    if len(values) != channels:
        raise UserError(f"the model's preprocessing has {len(values)} {what} values for {channels}-channel images")
    return torch.tensor(values).view(1, -1, 1, 1)


class Preprocessed(nn.Module):
    """``model`` fed the way its own preprocessing says, from batches the dataset normalised.

    The stages normalise every batch with the dataset's mean and std (:func:`normalize`), and
    distill calls the teacher on that normalised training view. A model whose weights were
    trained elsewhere expects its own statistics and input size; this module undoes the
    dataset's normalisation, resizes to the model's ``input_size`` and normalises with the
    model's ``mean`` and ``std``, so every stage feeds the model the same thing. The crop of
    timm's and transformers' eval transforms is not repeated: the dataset is already square.
    """

    def __init__(self, model: nn.Module, info, preprocessing: dict):
        super().__init__()
        self.model = model
        channels = info.in_channels
        for name, values in (("source_mean", info.mean), ("source_std", info.std),
                             ("mean", preprocessing["mean"]), ("std", preprocessing["std"])):
            self.register_buffer(name, _per_channel(values, channels, name.rsplit("_")[-1]), persistent=False)
        size = preprocessing.get("input_size")
        self.size = None if size is None or tuple(size) == (info.image_size, info.image_size) else tuple(size)
        self.mode = INTERPOLATION.get(preprocessing.get("interpolation"), "bilinear")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * self.source_std + self.source_mean  # back to [0, 1]
        if self.size is not None:
            # antialias as PIL resizes; clamp the overshoot of bicubic as PIL's uint8 output does
            pixels = F.interpolate(pixels, size=self.size, mode=self.mode,
                                   antialias=self.mode != "nearest").clamp_(0.0, 1.0)
        return self.model((pixels - self.mean) / self.std)


class StudentPreprocessed(Preprocessed):
    """A trained model (a student started from pretrained weights, ``--student-normalization
    weights``) fed its weights' own normalisation. Its state dict is the wrapped model's, with no
    ``model.`` prefix: checkpoints, the EMA and ``--student-init`` files keep the architecture's
    own names, and the normalisation (no weights) is recorded in the checkpoint's metadata."""

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


def with_preprocessing(model: nn.Module, info, preprocessing: dict | None) -> nn.Module:
    """``model`` wrapped in :class:`Preprocessed`, or as it is when it has no preprocessing of its own."""
    return model if preprocessing is None else Preprocessed(model, info, preprocessing)
