"""The teacher as the stages use it: a checkpoint opened for a dataset, and where a step's
teacher logits come from (the model run online, or logits cached in the score table)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DataConfig, resolve
from .data.transforms import normalize
from .engine import autocast, resolve_device
from .errors import UserError, option_name
from .models import adapt_to_dataset, checkpoint_meta, load_model
from .preprocessing import resolve_preprocessing, reuse_preprocessing


#: open_teacher's default: the model config's preprocessing, not a recorded one
FROM_MODEL = object()


#: the teacher "architecture" of a score table written from logits computed elsewhere
EXTERNAL_TEACHER = "external"


@dataclass
class TeacherRun:
    """A teacher ready to score a dataset: the model, its checkpoint metadata and the device."""

    model: torch.nn.Module
    meta: dict
    device: torch.device
    amp: bool = True

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, info) -> torch.Tensor:
        x = normalize(images_uint8.to(self.device, non_blocking=True), info)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            return self.model(x).float()

    def record(self) -> dict:
        """What a score table records of the teacher (see table.TeacherRecord)."""
        return {k: self.meta.get(k) for k in ("arch", "sha256", "path", "num_classes", "in_channels",
                                              "preprocessing", "class_names", "preprocessing_overrides")}


def open_teacher(path, dataset, arch: str | None = None, device: str = "auto", amp: bool = True,
                 overrides: dict | None = None, recorded=FROM_MODEL) -> TeacherRun:
    """Load a teacher checkpoint for ``dataset`` and check it fits (classes, channels).

    It is fed its model config's preprocessing with each field of ``overrides``
    (``TeacherPreprocessing.given()``) replacing the same field, or ``recorded`` (a score table's
    ``teacher.preprocessing``, None included) as it is (see :func:`open_table_teacher`)."""
    info = dataset.info
    model, meta = load_model(path, arch, info.num_classes, info.in_channels, info.image_size)
    meta["preprocessing"] = (resolve_preprocessing(meta.get("preprocessing"), overrides, info)
                             if recorded is FROM_MODEL else recorded)
    meta["preprocessing_overrides"] = dict(overrides or {}) or None
    if meta["num_classes"] != info.num_classes:
        raise UserError(f"teacher {path} predicts {meta['num_classes']} classes but {info.name} has "
                        f"{info.num_classes}")
    if meta["in_channels"] != info.in_channels:
        raise UserError(f"teacher {path} takes {meta['in_channels']}-channel input but {info.name} has "
                        f"{info.in_channels}")
    model = adapt_to_dataset(model, meta, info)  # a teacher from timm or transformers gets its own preprocessing
    run_device = resolve_device(device)
    model.to(run_device).eval()
    if run_device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return TeacherRun(model, meta, run_device, amp)


def open_table_teacher(meta, dataset, path: str | None = None, arch: str | None = None,
                       device: str = "auto", overrides: dict | None = None) -> TeacherRun:
    """The teacher that scored a table (or the checkpoint at ``path``, which must be the same file),
    fed the preprocessing the table records; ``overrides`` that contradict it are refused. A table
    written from external logits (:func:`energytools.write_score_table`) names no checkpoint:
    the teacher given is taken on trust."""
    external = meta.teacher.arch == EXTERNAL_TEACHER
    if external and not path:
        raise UserError(f"the score table was written from logits computed elsewhere ({meta.teacher.path}): pass "
                        f"{option_name('teacher')} (and {option_name('teacher_arch')}) to run a teacher, or use "
                        f"{option_name('cached_logits', True)}")
    path = path or meta.teacher.path
    recorded = reuse_preprocessing(meta.teacher.preprocessing, overrides, dataset.info)
    teacher = open_teacher(path, dataset, arch or (None if external else meta.teacher.arch), device,
                           overrides=overrides, recorded=recorded)
    if not external and teacher.sha256 != meta.teacher.sha256:
        raise UserError(f"teacher {path} is not the checkpoint that scored the table (sha256 differs)")
    return teacher


def teacher_data_config(teacher_path) -> DataConfig:
    """The dataset the teacher checkpoint records it was trained on."""
    recorded = checkpoint_meta(teacher_path).get("data")
    if not recorded:
        raise UserError(f"{teacher_path} does not record its dataset: pass {option_name('dataset')}")
    return resolve(DataConfig, recorded, f"{teacher_path}: recorded dataset")


def check_logits(logits: torch.Tensor, sample_ids: torch.Tensor) -> None:
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        first = int(sample_ids[bad.nonzero()[0, 0]].item())
        raise UserError(f"teacher produced NaN/Inf logits, first at sample_id {first}")
