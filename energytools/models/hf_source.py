"""``hf:<DIR>``: a Hugging Face image classifier saved with ``save_pretrained``, loaded offline.

DIR holds config.json and the weights (model.safetensors), what the model's ``save_pretrained``
writes, and optionally preprocessor_config.json, what its image processor's writes (the
normalisation and input size). As a teacher the folder itself is the checkpoint (``--teacher
DIR``); as an architecture (``--student hf:DIR``) only its config is used and the weights start
random.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError, import_optional
from .registry import ModelSource, register_source

#: PIL's resample codes, as image processors store them -> the filter's name
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: the files that define the model; their hashes identify it (a README edit does not)
MODEL_SUFFIXES = {".json", ".safetensors", ".bin"}


class HFClassifier(nn.Module):
    """A ``transformers`` image classifier as a plain module: images in, ``.logits`` out.

    ``class_names`` holds the config's id2label in class order, or None where those are
    the placeholder names ``LABEL_0``, ``LABEL_1`` ... that transformers makes up.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.class_names = None if names == [f"LABEL_{i}" for i in range(len(names))] else names

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Also takes the transformers model's own state dict (a model.safetensors), whose keys
        lack this wrapper's ``model.`` prefix."""
        if state_dict and not any(key.startswith("model.") for key in state_dict):
            state_dict = {f"model.{key}": value for key, value in state_dict.items()}
        return super().load_state_dict(state_dict, *args, **kwargs)


def is_run_directory(path: Path | str) -> bool:
    """Whether ``path`` is an energytools training run's directory (its config.json is the run's)."""
    return Path(path).is_dir() and any((Path(path) / name).is_file() for name in ("best.pt", "last.pt"))


def is_hf_folder(path: Path | str) -> bool:
    """Whether ``path`` is a folder ``save_pretrained`` wrote (it has a config.json)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file() and not is_run_directory(path)


@contextlib.contextmanager
def _transformers():
    """transformers, its progress bars silenced (the stages draw their own) while in use."""
    transformers = import_optional("transformers", "hf")
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        if was_enabled:
            logging.enable_progress_bar()


#: the weight files save_pretrained writes (one file, or shards named by an index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def missing_files(directory: str | Path) -> list[str]:
    """Which of the files a model's ``save_pretrained`` writes (config.json and the weights)
    ``directory`` lacks. preprocessor_config.json is the image processor's, saved apart, and
    optional: without it the dataset's normalisation applies."""
    directory = Path(directory)
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        missing.append("the weights (model.safetensors or pytorch_model.bin)")
    return missing


def describe_folder(directory: str | Path) -> str:
    """One line on a folder given as a model: which of save_pretrained's files it lacks."""
    if is_run_directory(directory):
        return (f"{directory} is a training run's directory, not a model: pass {Path(directory) / 'best.pt'} "
                "(the validation-selected weights) or last.pt")
    missing = missing_files(directory)
    if len(missing) == 2:
        return (f"{directory} is a folder, not a model: it holds neither config.json nor the weights (what a "
                "model's save_pretrained writes), nor is it a checkpoint file")
    return (f"{directory} is a Hugging Face model folder missing {' and '.join(missing)}"
            " (a model's save_pretrained writes config.json and model.safetensors)")


def _folder(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"hf:{directory}: no such folder")
    if not is_hf_folder(directory):
        raise UserError(f"hf:{describe_folder(directory)}")
    return directory


def build(directory: str, num_classes: int, in_channels: int, image_size: int | None = None) -> nn.Module:
    """The architecture in ``directory``/config.json with ``num_classes`` outputs, random weights.

    ``image_size`` is not passed on: the model keeps the input size of its config.
    """
    path = _folder(directory)
    with _transformers() as transformers:
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            if config.num_labels != num_classes:  # new labels: id2label resets to placeholders
                config.num_labels = num_classes
            if getattr(config, "num_channels", 3) != in_channels:
                if not hasattr(config, "num_channels"):
                    raise UserError(f"hf:{path}: a {config.model_type} model takes 3 channels; the data has "
                                    f"{in_channels}")
                config.num_channels = in_channels
            model = transformers.AutoModelForImageClassification.from_config(config)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"hf:{path}: {str(exc).splitlines()[0][:300]}") from None
    return HFClassifier(model)


def load_folder(directory: str | Path) -> tuple[HFClassifier, dict]:
    """The model saved in ``directory`` with its weights; returns ``(model in eval mode, meta)``.

    Offline only (``local_files_only=True``). ``meta`` has arch ``hf:<directory>``, the class
    count and channels of its config, ``class_names`` and a sha256 over the model's files.
    """
    path = _folder(directory)
    if any(name.startswith("the weights") for name in missing_files(path)):  # a teacher needs them
        raise UserError(describe_folder(path))
    with _transformers() as transformers:
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot load the Hugging Face model in {path}: {str(exc).splitlines()[0][:300]}") from None
    # float32 whatever the saved dtype: the stages run autocast themselves where it pays
    wrapped = HFClassifier(model.float()).eval()
    meta = {"arch": f"hf:{path}", "num_classes": model.config.num_labels,
            "in_channels": getattr(model.config, "num_channels", 3), "image_size": None,
            "class_names": wrapped.class_names, "sha256": sha256_folder(path), "path": str(path)}
    return wrapped, meta


def sha256_folder(directory: Path) -> str:
    """sha256 over the names and contents of the folder's model files (config, weights)."""
    hasher = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES):
        hasher.update(f"{file.name}\n".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()


def _input_size(config: dict) -> list[int] | None:
    """[H, W] the processor resizes (and crops) to; images here are square, so a shortest edge is both."""
    size = config.get("crop_size") if config.get("do_center_crop") else config.get("size")
    if isinstance(size, int):
        return [size, size]
    if isinstance(size, dict) and "height" in size and "width" in size:
        return [size["height"], size["width"]]
    if isinstance(size, dict) and "shortest_edge" in size:
        return [size["shortest_edge"]] * 2
    return None  # no size, or a rule such as longest_edge: keep the data's size


def _channels(value) -> list[float]:
    """A per-channel statistic as a list (processors may store one number for all channels)."""
    return [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]


def preprocessing(directory: str) -> dict | None:
    """Mean, std, input size and interpolation from ``directory``/preprocessor_config.json.

    None when the folder has no such file. ``do_normalize: false`` gives mean 0 and std 1.
    """
    path = _folder(directory) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if config.get("do_normalize", True):
        if "image_mean" not in config or "image_std" not in config:
            raise UserError(f"{path} has no image_mean/image_std")
        mean, std = _channels(config["image_mean"]), _channels(config["image_std"])
    else:
        mean, std = [0.0], [1.0]
    return {"mean": mean, "std": std, "input_size": _input_size(config),
            "interpolation": RESAMPLE.get(config.get("resample", 2), "bilinear"), "source": str(path)}


register_source("hf", ModelSource(build, preprocessing, "hf:<dir>",
                                  "a Hugging Face image classifier saved with save_pretrained in <dir>, "
                                  "loaded offline (pip install 'energytools[hf]')"))
