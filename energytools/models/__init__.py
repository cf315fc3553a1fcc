"""Models by name and the checkpoint format that lets later stages need no --arch."""
from __future__ import annotations

import inspect
import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.torch_version import TorchVersion

from .preprocessed import with_preprocessing
from ..errors import UserError, option_name
from ..io import atomic_path, sha256_file
from . import cifar_resnet, hf_source, imagenet, mobile, small, timm_source, vgg, wrn  # noqa: F401  (fill the registries)
from .registry import DESCRIPTIONS, MODELS, SOURCES, register_model

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as np_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as np_scalar

__all__ = ["MODELS", "DESCRIPTIONS", "SOURCES", "register_model", "create_model", "model_preprocessing",
           "save_checkpoint", "load_checkpoint", "load_model", "checkpoint_meta", "adapt_to_dataset"]


def _source(name: str):
    """``(source, name within it)`` for ``<prefix>:<name>`` names; ``(None, name)`` for the zoo's own."""
    prefix, colon, rest = name.partition(":")
    if colon and prefix in SOURCES:
        return SOURCES[prefix], rest
    return None, name


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """Build a registered model (or ``timm:<name>``, ``hf:<dir>``) for the dataset's class count and channels."""
    source, rest = _source(name)
    if source is not None:
        return source.build(rest, num_classes, in_channels, image_size)
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; run `energytools models` to list them")
    builder = MODELS[name]
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if image_size is not None and "image_size" in inspect.signature(builder).parameters:
        kwargs["image_size"] = image_size
    return builder(**kwargs)


#: what a checkpoint may hold besides tensors and plain values, none of which runs code:
#: numpy scalars (third-party files save a ``best_acc`` as ``np.float64``: a number rebuilt
#: from bytes; numpy 1.x names them ``numpy.core``, numpy 2 ``numpy._core``; numeric dtype
#: classes only, never the object dtype), and torch's version string (a str subclass that
#: checkpoints written before energytools stored plain values carry in their metadata).
CHECKPOINT_SAFE_GLOBALS = [np.dtype, (np_scalar, "numpy.core.multiarray.scalar"),
                           (np_scalar, "numpy._core.multiarray.scalar"),
                           *sorted({type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"]
                                    + np.typecodes["AllFloat"]}, key=str),
                           TorchVersion]


def plain(value):
    """``value`` with numpy scalars as Python numbers and paths as text, so that
    ``torch.load(weights_only=True)`` reads it with no allow-listed globals."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (bool, int, float, str, bytes) or isinstance(value, torch.Tensor):
        return value
    for base in (bool, int, float, str):  # subclasses (torch.__version__, an IntEnum) would need their class
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a checkpoint cannot carry a {type(value).__name__} and still load with weights_only=True")


def model_preprocessing(name: str) -> dict | None:
    """The preprocessing weights of model ``name`` published elsewhere expect.

    ``{"mean": [...], "std": [...], "input_size": [H, W] or None, "interpolation": str,
    "source": where it was read}`` from timm's pretrained_cfg for ``timm:<name>`` and from
    preprocessor_config.json for ``hf:<dir>``; None for the zoo's own models, which
    energytools trains on the dataset's normalisation.
    """
    source, rest = _source(name)
    return None if source is None else source.preprocessing(rest)


def save_checkpoint(path: Path | str, model: nn.Module, meta: dict, **state) -> None:
    """Write ``{"model": state_dict, "energytools": meta, **state}`` atomically.

    ``meta`` carries arch, num_classes, in_channels, image_size and the dataset, so
    :func:`load_model` can rebuild the model from the file alone. The "model" key is the
    layout mdistiller uses, so its tools read these files too. Everything is stored as
    tensors and plain values, so ``torch.load(weights_only=True)`` reads it.

    A path ending in ``.safetensors`` gets the weights in that format, with ``meta`` and
    ``state`` as JSON in its metadata (state must then hold no tensors: no optimizer).
    """
    payload = {"model": model.state_dict(), **plain({"energytools": meta, **state})}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            _save_safetensors(tmp, payload)
        else:
            torch.save(payload, tmp)


def _save_safetensors(path: Path, payload: dict) -> None:
    from safetensors.torch import save_file

    extra = {k: v for k, v in payload.items() if k != "model"}
    try:
        text = json.dumps(extra, sort_keys=True)
    except TypeError:
        raise TypeError(".safetensors checkpoints hold the weights and JSON values only") from None
    weights = {k: v.detach().contiguous() for k, v in payload["model"].items()}
    save_file(weights, str(path), metadata={"energytools_checkpoint": text})


def _load_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    weights = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        extra = json.loads((handle.metadata() or {}).get("energytools_checkpoint") or "{}")
        for key in handle.keys():
            weights[key] = handle.get_tensor(key)
    return {**extra, "model": weights}


def load_checkpoint(path: Path | str) -> dict:
    """Read a checkpoint without running code from it: ``.safetensors``, or a torch file
    through ``torch.load(weights_only=True)``. A file that needs code to load is refused."""
    path = Path(path)
    if path.is_dir():  # a model folder lacking config.json lands here
        raise UserError(f"checkpoint {hf_source.describe_folder(path)}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            payload = _load_safetensors(path)
        else:
            with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
                payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # the weights-only unpickler names the first global it refused (posix.system, a class ...)
        needed = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if needed:
            raise UserError(f"refusing checkpoint {path}: loading it would run code ({needed.group(1)}); "
                            "energytools loads only tensors and plain values (see docs/security.md)") from None
        raise UserError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    except EOFError:
        raise UserError(f"cannot read checkpoint {path}: the file ends early (truncated, or still being "
                        "written)") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        what = _first_line(exc)
        named = what if what.startswith(type(exc).__name__) else f"{type(exc).__name__}: {what}"
        if any(sign in what for sign in NOT_A_TORCH_FILE) or not _looks_like_torch_file(path):
            named = "not a complete torch checkpoint (truncated, or another kind of file)"
        raise UserError(f"cannot read checkpoint {path}: {named}") from None
    if isinstance(payload, dict) and "model" in payload and isinstance(payload["model"], dict):
        return payload
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"model": payload}  # a bare state dict (torchvision weights files)
    raise UserError(f"{path} is not a model checkpoint (expected a state dict or a dict with a 'model' entry)")


#: what torch.load says of a file that is not (all of) a torch checkpoint
NOT_A_TORCH_FILE = ("failed finding central directory", "Unsupported operand", "invalid load key")


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle (the legacy format) by its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _first_line(exc: Exception) -> str:
    """What is wrong, from a library's message: torch wraps it in paragraphs of advice."""
    message = str(exc).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def load_model(path: Path | str, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, image_size: int | None = None):
    """Rebuild a model from a checkpoint; returns ``(model in eval mode, meta)``.

    energytools checkpoints carry their architecture; for others (mdistiller's, torchvision
    weights) pass ``arch`` and the dataset's ``num_classes``/``in_channels``. Loading is
    strict: a checkpoint for another class count is refused with a clear message.
    """
    if hf_source.is_hf_folder(path):
        if arch is not None and _source(arch)[0] is not SOURCES["hf"]:
            raise UserError(f"{path} is a Hugging Face model folder; it is not a {arch}")
        model, meta = hf_source.load_folder(path)
        meta["preprocessing"] = model_preprocessing(meta["arch"])
        return model, meta
    payload = load_checkpoint(path)
    meta = dict(payload.get("energytools") or {})
    arch = arch or meta.get("arch")
    if arch is None:
        raise UserError(f"{path} does not record its architecture: pass {option_name('teacher_arch')}")
    num_classes = meta.get("num_classes", num_classes)
    in_channels = meta.get("in_channels", in_channels or 3)
    image_size = meta.get("image_size", image_size)
    if num_classes is None:
        raise UserError(f"{path} does not record its class count")
    model = create_model(arch, num_classes, in_channels, image_size)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
        detail = first or str(exc).splitlines()[0]
        raise UserError(f"{path} does not fit {arch} with {num_classes} classes and {in_channels} input "
                        f"channel(s): {detail[:300]}") from None
    # energytools trained its own checkpoints on the dataset's normalisation; other files
    # were trained with the preprocessing their architecture publishes
    # (a student trained on its weights' normalisation records it: --student-normalization weights)
    preprocessing = meta.get("preprocessing") if payload.get("energytools") else model_preprocessing(arch)
    meta.update(arch=arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                sha256=sha256_file(path), path=str(path), preprocessing=preprocessing,
                class_names=getattr(model, "class_names", None))
    return model.eval(), meta


def checkpoint_meta(path: Path | str) -> dict:
    """What a checkpoint records about itself (energytools' own); {} for weights from elsewhere."""
    if hf_source.is_hf_folder(path):
        return {}
    return dict(load_checkpoint(path).get("energytools") or {})


def adapt_to_dataset(model: nn.Module, meta: dict, info) -> nn.Module:
    """A loaded model as the stages call it: on batches normalised for dataset ``info``.

    A model with its own preprocessing (``meta["preprocessing"]``) is wrapped to receive it.
    A model that names its classes must name the dataset's in the same order: the same names
    in another order would silently mislabel every prediction.
    """
    names, classes = meta.get("class_names"), list(info.classes)
    if names and sorted(names) == sorted(classes) and list(names) != classes:
        raise UserError(f"the teacher orders its classes {names} but {info.name} orders them {classes}")
    return with_preprocessing(model, info, meta.get("preprocessing"))
