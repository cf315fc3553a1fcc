"""Starting a model from weights trained elsewhere (``train --init``, ``distill --student-init``).

The file is read by the same safe loaders as teachers (:func:`energytools.models.load_checkpoint`:
``.safetensors`` or ``torch.load(weights_only=True)``; a ``save_pretrained`` folder offline), so
no code runs from it. Tensors are matched by name and shape:

- equal shapes are loaded;
- the classifier head (a Linear or Conv layer with ``num_classes`` outputs) of another class
  count, or missing from the file, keeps the model's fresh initialisation (re-initialised);
- an input convolution saved for RGB loaded into a gray model has its weights summed over the
  colour channels (timm's ``adapt_input_conv``), for other channel counts repeated and rescaled;
- file tensors the model does not have are ignored (and reported);
- anything else (a body tensor of another shape, a body tensor the file lacks) is refused in
  one line naming the tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..io import sha256_file
from . import hf_source, load_checkpoint

#: prefixes wrappers add to the keys they save (DDP's ``module.``, mdistiller's distiller ``student.``)
WRAPPER_PREFIXES = ("module.", "student.")


@dataclass
class InitReport:
    """What :func:`init_from` did, by tensor name; ``to_dict`` goes into the run's config."""

    path: str
    sha256: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # input channels summed or repeated

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "loaded": self.loaded,
                "reinitialised": self.reinitialised, "ignored": self.ignored, "adapted_input_channels": self.adapted}

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.adapted:
            parts.append(f"input channels adapted: {', '.join(self.adapted)}")
        if self.reinitialised:
            parts.append(f"re-initialised: {', '.join(self.reinitialised)}")
        if self.ignored:
            shown = ", ".join(self.ignored[:6]) + (f" (+{len(self.ignored) - 6})" if len(self.ignored) > 6 else "")
            parts.append(f"ignored: {shown}")
        return "; ".join(parts)


def init_sha256(path: Path | str) -> str:
    """sha256 of an init file, or over a save_pretrained folder's model files."""
    return hf_source.sha256_folder(Path(path)) if hf_source.is_hf_folder(path) else sha256_file(path)


def _file_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The file's tensors: a checkpoint's ``model`` entry or bare state dict, or a folder's weights."""
    if hf_source.is_hf_folder(path):
        model, _ = hf_source.load_folder(path)
        return model.state_dict()
    if Path(path).is_dir():
        raise UserError(f"init weights: {hf_source.describe_folder(path)}")
    state = load_checkpoint(path)["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _align(state: dict, wanted: set[str]) -> dict:
    """``state`` with wrapper prefixes stripped where that makes its names the model's."""
    for prefix in WRAPPER_PREFIXES:
        if not wanted & state.keys() and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not wanted & state.keys() and any(k.startswith("model.") for k in wanted):
        state = {f"model.{k}": v for k, v in state.items()}  # a transformers state dict for HFClassifier
    return state


def head_names(model: nn.Module, num_classes: int) -> set[str]:
    """Names of the tensors of the layers that output ``num_classes`` values (the classifier)."""
    names = set()
    for module_name, module in model.named_modules():
        outputs = (module.out_features if isinstance(module, nn.Linear)
                   else module.out_channels if isinstance(module, nn.Conv2d) else None)
        if outputs == num_classes:
            prefix = f"{module_name}." if module_name else ""
            names |= {prefix + name for name, _ in module.named_parameters(recurse=False)}
    return names


def _adapt_input(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An input convolution's weight for ``channels`` input channels (timm's adapt_input_conv)."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(channels / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :channels] * (weight.shape[1] / channels)


def init_from(model: nn.Module, path: Path | str, num_classes: int) -> InitReport:
    """Load the weights in ``path`` into ``model`` (in place) by the rules of this module."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"init weights {path} do not exist")
    own = model.state_dict()
    state = _align(_file_state(path), set(own))
    heads = head_names(model, num_classes)
    report = InitReport(str(path), init_sha256(path))
    first_conv = next((name for name, t in own.items() if t.ndim == 4), None)  # the input convolution
    chosen = {}
    for name, target in own.items():
        if name not in state:
            if name in heads:
                report.reinitialised.append(name)
                continue
            if name.endswith("num_batches_tracked"):  # older BatchNorm checkpoints lack the counter
                continue
            raise UserError(f"{path} has no tensor {name} of the model (shape {list(target.shape)}); "
                            "is it a checkpoint of this architecture?")
        value = state[name]
        if value.shape == target.shape:
            chosen[name] = value
            report.loaded.append(name)
        elif name in heads and value.shape[1:] == target.shape[1:]:
            report.reinitialised.append(name)  # another class count: the model's own fresh head
        elif (name == first_conv and value.ndim == 4 and value.shape[0] == target.shape[0]
              and value.shape[2:] == target.shape[2:]):
            chosen[name] = _adapt_input(value, target.shape[1])
            report.loaded.append(name)
            report.adapted.append(f"{name} {value.shape[1]}->{target.shape[1]}")
        else:
            raise UserError(f"{path}: tensor {name} has shape {list(value.shape)}, the model's is "
                            f"{list(target.shape)}; is it a checkpoint of this architecture?")
    report.ignored = sorted(set(state) - set(own))
    with torch.no_grad():
        for name, value in chosen.items():
            own[name].copy_(value.to(own[name].dtype))
    return report
