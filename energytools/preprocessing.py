"""A model's preprocessing, resolved: the model config's, the user's overrides, the dataset's.

A preprocessing is a plain dict, as :class:`energytools.models.preprocessed.Preprocessed` reads it
and the score table records it (``teacher.preprocessing``)::

    {"input_size": [H, W], "mean": [...], "std": [...], "interpolation": "bicubic",
     "source": "timm pretrained_cfg of resnet18",          # where the model config was read
     "sources": {"input_size": "user option", "mean": "model config", ...}}   # per field

None means the dataset's own size and normalisation (energytools' own checkpoints). Tables
written before the per-field ``sources`` existed lack that key; their fields count as the
model config's. The functions here take and return plain values (no tensors). The options that
override a teacher's preprocessing (:class:`TeacherPreprocessing`) live here too, beside what
resolves them; the stage configs hold them as a group.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError, option_name
from .models.preprocessed import INTERPOLATION
from .options import option, registry

__all__ = ["DATASET", "DATA_SIZE", "FIELDS", "option_of", "MODEL_CONFIG", "STUDENT_NORMALIZATIONS", "USER_OPTION",
           "TeacherPreprocessing", "describe_preprocessing", "input_size_value", "resize_factor",
           "resolve_preprocessing", "reuse_preprocessing", "student_preprocessing"]


#: how --teacher-input-size spells "the data's own size"
DATA_SIZE = "data"


def input_size_value(value, where: str) -> str:
    """``--teacher-input-size``: a positive whole number (``32`` or ``"32"``) or ``data``, as text."""
    text = str(value).strip().lower() if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if text in (DATA_SIZE, "dataset", "data-size", "data_size"):
        return DATA_SIZE
    if text is not None and text.isdigit() and int(text) > 0:
        return str(int(text))
    raise UserError(f"{where} must be a positive whole number or 'data' (the dataset's own size), got {value!r}")


@dataclass
class TeacherPreprocessing:
    """What the teacher was trained to see, where it differs from what its model config says.

    Each field given overrides the same field of the model's own preprocessing (timm's
    pretrained_cfg, a Hugging Face folder's preprocessor_config.json; for energytools' own
    checkpoints the dataset's size and normalisation); the others keep it. Resolved by
    :func:`energytools.preprocessing.resolve_preprocessing`; score records the result and these
    overrides in the table, and augment and distill reuse the table's.
    """

    teacher_input_size: str | None = option(None, "side of the square input the teacher sees: N, or `data` for the "
                                            "dataset's own size (default: the model config's, e.g. 224 for timm "
                                            "resnet18; use `data` for a teacher fine-tuned on the data as it is)",
                                            parse=input_size_value)
    teacher_mean: tuple[float, ...] | None = option(None, "per-channel mean the teacher normalises with, on [0, 1] "
                                                    "pixels, e.g. 0.5,0.5,0.5 (default: the model config's)")
    teacher_std: tuple[float, ...] | None = option(None, "per-channel std the teacher normalises with "
                                                   "(default: the model config's)")
    teacher_interpolation: str | None = option(None, "filter that resizes to the teacher's input size: bilinear, "
                                               "bicubic, nearest ... (default: the model config's)",
                                               choices=registry(INTERPOLATION))

    def given(self) -> dict:
        """The fields the user set, by the names a preprocessing dict uses (input_size, mean, std,
        interpolation): ``{"input_size": "data", "mean": [0.5, 0.5, 0.5]}``."""
        size = self.teacher_input_size
        values = {"input_size": int(size) if size is not None and size.isdigit() else size,
                  "mean": self.teacher_mean, "std": self.teacher_std,
                  "interpolation": self.teacher_interpolation}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None}

    def check(self) -> None:
        if self.teacher_input_size is not None:
            input_size_value(self.teacher_input_size, option_of("input_size"))
        for name in ("mean", "std"):
            values = getattr(self, f"teacher_{name}")
            if values is not None and not values:
                raise UserError(f"{option_of(name)} needs one value per channel (or one for all), got none")
        if self.teacher_std is not None and not all(v > 0 for v in self.teacher_std):
            raise UserError(f"{option_of('std')} must be positive, got {list(self.teacher_std)}")
        if self.teacher_interpolation is not None and self.teacher_interpolation not in INTERPOLATION:
            raise UserError(f"{option_of('interpolation')} must be one of {', '.join(INTERPOLATION)}, "
                            f"got {self.teacher_interpolation!r}")


#: distill --student-normalization: a timm or Hugging Face student that starts from pretrained
#: weights sees batches normalised with the dataset's mean and std, or with the weights' own
STUDENT_NORMALIZATIONS = ("dataset", "weights")


FIELDS = ("input_size", "mean", "std", "interpolation")
#: where a field's value came from
MODEL_CONFIG, USER_OPTION, DATASET = "model config", "user option", "dataset"


def option_of(name: str) -> str:
    """How a message names the option that sets field ``name``: ``--teacher-std`` from the
    command line, ``teacher_std`` (the recipe's and the API's keyword) from Python."""
    return option_name(f"teacher_{name}")


#: a resize by this factor per side (or its inverse) or more is named as such in score's summary
LARGE_RESIZE = 2.0


def _channels(values, channels: int, what: str) -> list[float]:
    """``values`` for ``channels`` channels, as Preprocessed applies them: one value repeated, an
    RGB triple averaged for gray images."""
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    elif channels == 1 and len(values) == 3:
        values = [sum(values) / 3]
    if len(values) != channels:
        raise UserError(f"{what} has {len(values)} values for {channels}-channel images (give {channels} or one)")
    return values


def _size(value, info) -> list[int]:
    """An input size as [H, W]: None and ``data`` are the data's own."""
    if value is None or value == DATA_SIZE:
        return [info.image_size, info.image_size]
    if isinstance(value, (int, str)):
        return [int(value), int(value)]
    return [int(v) for v in value]


def resolve_preprocessing(model: dict | None, overrides: dict | None, info) -> dict | None:
    """The preprocessing a model is fed on dataset ``info``: ``model``'s (from
    :func:`energytools.models.model_preprocessing`, or None for the dataset's own) with each
    field of ``overrides`` (``TeacherPreprocessing.given()``) replacing the same field.

    ``input_size`` ``"data"`` is the dataset's image size; a model config without a size (some
    Hugging Face processors) keeps the data's size too. Returns None when the result is the
    dataset's own size and normalisation and the model had no preprocessing of its own, so an
    energytools checkpoint is called exactly as before.
    """
    overrides = dict(overrides or {})
    if model is None and not overrides:
        return None
    channels = info.in_channels
    base_source = MODEL_CONFIG if model is not None else DATASET
    base = model if model is not None else {"input_size": None, "mean": list(info.mean), "std": list(info.std),
                                            "interpolation": "bilinear", "source": DATASET}
    out, sources = {}, {}
    for name in FIELDS:
        given = name in overrides
        value, sources[name] = (overrides[name], USER_OPTION) if given else (base.get(name), base_source)
        if name == "input_size":
            if value is None and not given:
                sources[name] = DATASET
            value = _size(value, info)
        elif name in ("mean", "std"):
            value = [float(v) for v in value]
            _channels(value, channels, option_of(name) if given else f"the model config's {name}")
        out[name] = value
    out["source"] = base.get("source", base_source)
    out["sources"] = sources
    if model is None and out["input_size"] == _size(None, info) and out["mean"] == _channels(
            info.mean, channels, "mean") and out["std"] == _channels(info.std, channels, "std"):
        return None  # the overrides restate the dataset's own
    return out


def _effective(preprocessing: dict | None, info) -> dict:
    """What a model is fed under ``preprocessing`` (None: the dataset's own), per channel."""
    if preprocessing is None:
        return {"input_size": _size(None, info), "mean": list(map(float, info.mean)),
                "std": list(map(float, info.std)), "interpolation": None}
    channels = info.in_channels
    return {"input_size": _size(preprocessing.get("input_size"), info),
            "mean": _channels(preprocessing["mean"], channels, "the recorded mean"),
            "std": _channels(preprocessing["std"], channels, "the recorded std"),
            "interpolation": preprocessing.get("interpolation")}


def _sources(preprocessing: dict | None) -> dict:
    if preprocessing is None:
        return dict.fromkeys(FIELDS, DATASET)
    recorded = preprocessing.get("sources") or {}
    return {name: recorded.get(name, MODEL_CONFIG) for name in FIELDS}


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-6 * max(1.0, abs(float(y)))
                                        for x, y in zip(a, b))
    return a == b


def _text(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def reuse_preprocessing(recorded: dict | None, overrides: dict | None, info,
                        where: str = "the score table") -> dict | None:
    """The preprocessing a score table's teacher was run with (``recorded``, its
    ``teacher.preprocessing``), for a stage that runs the teacher again (augment, distill).

    ``overrides`` may only repeat it: the table's energies, groups and stored logits come from
    that preprocessing, and a teacher fed otherwise would not reproduce them. A field that
    contradicts it is one UserError naming the option, both values and how to change it.
    The interpolation is not compared when the recorded preprocessing does not resize.
    """
    if not overrides:
        return recorded
    current, sources = _effective(recorded, info), _sources(recorded)
    channels = info.in_channels
    for name, value in overrides.items():
        if name == "input_size":
            wanted = _size(value, info)
        elif name in ("mean", "std"):
            wanted = _channels(value, channels, option_of(name))
        elif current["input_size"] == _size(None, info):
            continue  # no resize: the filter never runs
        else:
            wanted = value
        if not _same(wanted, current[name]):
            raise UserError(f"{option_of(name)} {_text(value)} contradicts {where}, whose teacher saw "
                            f"{name.replace('_', ' ')} {_text(current[name])} ({sources[name]}): re-run score "
                            f"with {option_of(name)} {_text(value)}, or drop the option to use the table's")
    return recorded


def resize_factor(preprocessing: dict | None, info) -> float:
    """How many times larger (per side) the model's input is than the data's images."""
    height, width = _effective(preprocessing, info)["input_size"]
    return max(height, width) / info.image_size


def describe_preprocessing(preprocessing: dict | None, info, who: str = "teacher") -> str:
    """What a model is fed and where each part came from, for a person; a resize by a large
    factor gets a second line saying what it costs and the option that changes it."""
    s = info.image_size
    current, sources = _effective(preprocessing, info), _sources(preprocessing)
    where = preprocessing.get("source") if preprocessing else None

    def origin(name: str) -> str:
        source = sources[name]
        return f"{source}: {where}" if source == MODEL_CONFIG and where else source

    height, width = current["input_size"]
    if [height, width] == [s, s]:
        size = f"{who} input {height}x{width}, the data's own size ({origin('input_size')})"
    else:
        size = (f"{who} input {height}x{width} ({origin('input_size')}), resized from {s}x{s} "
                f"({current['interpolation'] or 'bilinear'}, {origin('interpolation')})")
    if sources["mean"] == sources["std"]:
        norm = f"normalisation mean {_text(current['mean'])} std {_text(current['std'])} ({origin('mean')})"
    else:
        norm = (f"normalisation mean {_text(current['mean'])} ({origin('mean')}), "
                f"std {_text(current['std'])} ({origin('std')})")
    text = f"{size}; {norm}"
    factor = resize_factor(preprocessing, info)
    if factor >= LARGE_RESIZE or factor <= 1 / LARGE_RESIZE:
        text += (f"\nnote: every {s}x{s} image is resized {factor:.3g}x per side to {height}x{width} "
                 f"({factor * factor:.3g}x the pixels to compute). That is right for a {who} trained at "
                 f"{height}x{width}; for one fine-tuned on the data as it is, pass "
                 f"{option_name('teacher_input_size', 'data')} (recipe: teacher_input_size = \"data\"), or "
                 f"{option_name('teacher_input_size', metavar='N')} for its size")
    return text


def student_preprocessing(arch: str, normalization: str | None, info) -> dict | None:
    """What a student that starts from pretrained weights is fed (distill
    ``--student-normalization``): None for ``dataset`` or None (the dataset's mean and std, as every
    student); for ``weights`` the mean and std its weights were trained with (timm's
    pretrained_cfg, preprocessor_config.json) at the data's own size. energytools' own
    architectures have no such statistics (their checkpoints were trained on the dataset's):
    None for them too."""
    if normalization is not None and normalization not in STUDENT_NORMALIZATIONS:
        raise UserError(f"{option_name('student_normalization')} must be one of {', '.join(STUDENT_NORMALIZATIONS)}, "
                        f"got {normalization!r}")
    if normalization in (None, "dataset"):
        return None
    from .models import model_preprocessing

    weights = model_preprocessing(arch)
    if weights is None:
        return None
    channels = info.in_channels
    return {"input_size": None, "mean": _channels(weights["mean"], channels, "the weights' mean"),
            "std": _channels(weights["std"], channels, "the weights' std"),
            "interpolation": weights.get("interpolation"), "source": weights.get("source"),
            "sources": {"input_size": DATASET, "mean": MODEL_CONFIG, "std": MODEL_CONFIG,
                        "interpolation": MODEL_CONFIG}}
