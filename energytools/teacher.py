"""The teacher as the stages use it: a checkpoint opened for a dataset, or the K fold teachers
of `train --folds K` acting as one (:class:`FoldTeachers`, for out-of-fold scores)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig, resolve
from .data.transforms import normalize
from .engine import autocast, resolve_device
from .errors import UserError, option_name
from .folds import MANIFEST, fold_checkpoint, is_folds_dir, read_manifest
from .io import sha256_json
from .table import FoldsRecord
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
    if is_folds_dir(path):  # K teachers, not one: only score reads them as a teacher
        raise UserError(f"{path} holds the fold teachers of `train --folds`, which `score --teacher` reads; this "
                        "stage runs one teacher: pass a checkpoint")
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


class FoldTeachers:
    """The K teachers of a `train --folds K` directory scoring one split as a teacher would: a
    sample of the training split the folds divide by its fold's teacher, the one that did not
    train on it (each batch is shared out among them); any other split by the mean of the K
    teachers' logits, as none of them trained on it. Opened by :func:`open_fold_teachers`."""

    def __init__(self, directory: Path, runs: list[TeacherRun], manifest, fold_ids: np.ndarray | None,
                 fold_of: np.ndarray | None):
        self.directory, self.runs, self.manifest = directory, runs, manifest
        self.fold_ids, self.fold_of = fold_ids, fold_of  # sorted ids and their folds; None: the mean of all K
        first = runs[0].meta
        self.meta = {**{k: first.get(k) for k in ("arch", "num_classes", "in_channels", "class_names",
                                                  "preprocessing", "preprocessing_overrides")},
                     "data": manifest.data, "path": str(directory),
                     # what identifies them: the split and every teacher (a score's parts are kept under it)
                     "sha256": sha256_json(["folds", manifest.assignment, [r.sha256 for r in runs]])}

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    @property
    def device(self) -> torch.device:
        return self.runs[0].device

    @property
    def out_of_fold(self) -> bool:
        return self.fold_of is not None

    def folds_of(self, sample_ids) -> np.ndarray:
        """Each sample's fold (int64), or None for every sample of another split (object array)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        if not self.out_of_fold:
            return np.full(len(ids), None, dtype=object)
        pos = np.minimum(self.fold_ids.searchsorted(ids), len(self.fold_ids) - 1)
        missing = self.fold_ids[pos] != ids
        if missing.any():
            raise UserError(f"sample_id {ids[missing][0]} is in none of the folds of {self.directory}")
        return self.fold_of[pos]

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, info, sample_ids: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of the samples ``sample_ids`` (on the CPU)."""
        if not self.out_of_fold:
            return torch.stack([run.logits(images_uint8, info) for run in self.runs]).mean(dim=0)
        folds = self.folds_of(sample_ids.numpy())
        out = None
        for k in np.unique(folds):
            rows = np.flatnonzero(folds == k)
            logits = self.runs[k].logits(images_uint8[torch.from_numpy(rows).to(images_uint8.device)], info)
            if out is None:
                out = logits.new_empty((len(folds), logits.shape[1]))
            out[torch.from_numpy(rows).to(out.device)] = logits
        return out

    def record(self) -> dict:
        """What a score table records of the teacher (see table.TeacherRecord): the fold
        teachers' architecture and preprocessing, the directory, the combined sha256."""
        return {k: self.meta.get(k) for k in ("arch", "sha256", "path", "num_classes", "in_channels",
                                              "preprocessing", "class_names", "preprocessing_overrides")}

    def folds_record(self) -> FoldsRecord:
        """The table's ``folds`` metadata."""
        return FoldsRecord(self.manifest.folds, self.manifest.seed, self.manifest.assignment,
                           tuple(r.sha256 for r in self.runs), "own fold" if self.out_of_fold else "mean")


def open_fold_teachers(directory, dataset, arch: str | None = None, device: str = "auto", amp: bool = True,
                       overrides: dict | None = None) -> FoldTeachers:
    """The K fold teachers of a `train --folds K` directory for ``dataset``: each must be there,
    finished, and the one the manifest records (its split and sha256); the training split must
    be the one the folds divide (same fingerprint)."""
    directory = Path(directory)
    manifest, frame = read_manifest(directory)
    runs = []
    for k, recorded in enumerate(manifest.teachers):
        path = fold_checkpoint(directory, k)
        if not path.is_file():
            raise UserError(f"{directory}: fold {k}'s teacher {path} is missing; run the same `energytools train "
                            f"--folds {manifest.folds}` command again to finish it")
        if recorded is None:
            raise UserError(f"{directory}: fold {k} has not finished training ({MANIFEST} records no teacher for it); "
                            f"run the same `energytools train --folds {manifest.folds}` command again to finish it")
        run = open_teacher(path, dataset, arch, device, amp, overrides)
        manifest.check_teacher(k, run.meta, path)
        runs.append(run)
    if dataset.split != "train":
        return FoldTeachers(directory, runs, manifest, None, None)
    if dataset.fingerprint() != manifest.dataset["fingerprint"]:
        raise UserError(f"{directory} holds folds of another training split than the one being scored "
                        f"({dataset.info.name} as given here; fingerprints differ): score with the data options "
                        "the folds were trained with")
    return FoldTeachers(directory, runs, manifest, frame["sample_id"].to_numpy(), frame["fold"].to_numpy())


def open_score_teacher(path, dataset, arch: str | None = None, device: str = "auto", amp: bool = True,
                       overrides: dict | None = None, recorded=FROM_MODEL) -> TeacherRun | FoldTeachers:
    """What `score --teacher PATH` scores with: a checkpoint (:func:`open_teacher`, fed ``recorded``
    preprocessing when a reference table gives it), or the fold teachers of a `train --folds`
    directory (:func:`open_fold_teachers`), which score their own training split only."""
    if is_folds_dir(path):
        if recorded is not FROM_MODEL:
            raise UserError(f"--reference scores new data with one teacher; {path} holds fold teachers: pass "
                            "the checkpoint that scored the reference table")
        return open_fold_teachers(path, dataset, arch, device, amp, overrides)
    return open_teacher(path, dataset, arch, device, amp, overrides, recorded)


def open_table_teacher(meta, dataset, path: str | None = None, arch: str | None = None,
                       device: str = "auto", overrides: dict | None = None) -> TeacherRun:
    """The teacher that scored a table (or the checkpoint at ``path``, which must be the same file),
    fed the preprocessing the table records; ``overrides`` that contradict it are refused. A table
    written from external logits (:func:`energytools.write_score_table`) names no checkpoint:
    the teacher given is taken on trust. A table of out-of-fold scores was scored by K fold
    teachers, not one: a stage that runs a teacher needs ``path``, taken on trust and fed its
    own preprocessing; never one of the folds by default."""
    if meta.folds is not None:
        if not path:
            raise UserError(f"the score table holds out-of-fold scores of {meta.folds.folds} fold teachers "
                            f"({meta.teacher.path}), and this stage runs one teacher: pass --teacher CHECKPOINT "
                            "(e.g. a teacher trained on the whole training split)")
        return open_teacher(path, dataset, arch, device, overrides=overrides)
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
    """The dataset the teacher checkpoint (or a folds directory's manifest) records it was trained on."""
    if is_folds_dir(teacher_path):
        return resolve(DataConfig, read_manifest(teacher_path)[0].data, f"{Path(teacher_path) / MANIFEST}: data")
    recorded = checkpoint_meta(teacher_path).get("data")
    if not recorded:
        raise UserError(f"{teacher_path} does not record its dataset: pass {option_name('dataset')}")
    return resolve(DataConfig, recorded, f"{teacher_path}: recorded dataset")


def check_logits(logits: torch.Tensor, sample_ids: torch.Tensor) -> None:
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        first = int(sample_ids[bad.nonzero()[0, 0]].item())
        raise UserError(f"teacher produced NaN/Inf logits, first at sample_id {first}")
