"""``timm:<name>``: any timm model, with random weights (never a download) and its preprocessing."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError, import_optional
from .registry import ModelSource, register_source


def _timm():
    return import_optional("timm", "timm")


def build(name: str, num_classes: int, in_channels: int, image_size: int | None = None) -> nn.Module:
    """timm's ``name`` with a ``num_classes`` head and ``in_channels`` inputs, randomly initialised.

    ``image_size`` is not passed on: a model keeps the input size of its pretrained_cfg, which
    convolutional models ignore and ViT-style models need (their inputs are resized to it).
    """
    timm = _timm()
    try:
        # pretrained=False always: weights come from the user's file through load_model
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except RuntimeError as exc:  # timm's "Unknown model (x)" and "Invalid pretrained tag (y)"
        raise UserError(f"timm:{name}: {exc}; see timm.list_models()") from None


def preprocessing(name: str) -> dict | None:
    """The mean, std, input size and interpolation of timm's pretrained_cfg for ``name``.

    The same values ``timm.data.resolve_model_data_config(timm.create_model(name))`` gives,
    read from the registry without building the model. None for a model timm has no cfg for.
    """
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:
        raise UserError(f"timm:{name}: {exc}") from None
    if cfg is None:
        return None
    data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    return {"mean": list(data["mean"]), "std": list(data["std"]), "input_size": list(data["input_size"][1:]),
            "interpolation": data["interpolation"], "source": f"timm pretrained_cfg of {name}"}


register_source("timm", ModelSource(build, preprocessing, "timm:<name>",
                                    "any timm model, e.g. timm:resnet18 (pip install 'energytools[timm]')"))
