"""K-fold teachers for out-of-fold scores: the stratified, seeded split of a training split into
K folds (a pure function of labels, sample ids and a seed), its manifest, ``folds.parquet``,
and what a re-run of `train --folds` keeps of a folds directory.

`energytools train --folds K --out DIR` trains fold k's teacher on the other K - 1 folds into
``DIR/fold-k/`` and records the split and each finished teacher's sha256 in the manifest;
`energytools score --teacher DIR` then scores each training sample with the teacher that did
not train on it (:class:`energytools.teacher.FoldTeachers`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from .errors import UserError
from .io import require_file, sha256_file
from .resume import changed_options
from .table import read_metadata, read_parquet, write_parquet

#: the manifest's file name inside a folds directory
MANIFEST = "folds.parquet"
FOLDS_KIND = "folds"


def fold_dir(out: Path | str, k: int) -> Path:
    """Fold ``k``'s run directory inside a folds directory."""
    return Path(out) / f"fold-{k}"


def fold_checkpoint(out: Path | str, k: int) -> Path:
    return fold_dir(out, k) / "best.pt"


def is_folds_dir(path: Path | str) -> bool:
    """Whether ``path`` is a `train --folds` directory (it holds a manifest)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def assign_folds(labels, sample_ids, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. ``folds`` - 1) of each sample, aligned with ``labels`` and ``sample_ids``.

    Samples are sorted by (label, sample_id); one generator seeded with ``seed`` permutes each
    class in label order; the permuted samples are dealt round-robin, the deal going on from one
    class to the next. So each class is spread over the folds (counts differ by at most one per
    class), the folds' sizes differ by at most one, and the split depends on nothing but the
    labels, the ids and the seed (not on the order the samples come in)."""
    labels, ids = np.asarray(labels, dtype=np.int64), np.asarray(sample_ids, dtype=np.int64)
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if len(ids) < folds:
        raise UserError(f"--folds {folds}: the training split has {len(ids)} samples, fewer than the folds")
    if len(np.unique(ids)) != len(ids):
        raise UserError("sample ids must be unique to split them into folds")
    order = np.lexsort((ids, labels))  # by label, then sample_id
    rng = np.random.default_rng(seed)
    assigned = np.empty(len(ids), dtype=np.int64)
    dealt = 0
    for label in np.unique(labels):
        members = order[labels[order] == label]
        assigned[rng.permutation(members)] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return assigned


def assignment_digest(sample_ids, folds) -> str:
    """sha256 of the (sample_id, fold) pairs, in sample_id order: what identifies a split."""
    ids, folds = np.asarray(sample_ids, dtype=np.int64), np.asarray(folds, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    return hashlib.sha256(ids[order].tobytes() + folds[order].tobytes()).hexdigest()


@dataclass(frozen=True)
class FoldsManifest:
    """The manifest's metadata: K, the seed, the training split it divides (``dataset``: its
    record with the fingerprint; ``data``: the DataConfig that builds it), the assignment's
    sha256, the train options every fold uses, and each fold teacher's sha256 once trained."""

    folds: int
    seed: int
    dataset: dict
    data: dict
    assignment: str
    config: dict
    teachers: tuple[str | None, ...]

    def fold_record(self, k: int) -> dict:
        """What fold ``k``'s checkpoints record of the split, so a teacher from other folds is
        recognised (:meth:`check_teacher`)."""
        return {"fold": k, "folds": self.folds, "seed": self.seed, "assignment": self.assignment,
                "train_fingerprint": self.dataset["fingerprint"]}

    def check_teacher(self, k: int, checkpoint_meta: dict, path) -> None:
        """Refuse fold ``k``'s checkpoint when it records another fold or split, or when its
        sha256 is not the one the manifest recorded for fold ``k``."""
        recorded = checkpoint_meta.get("fold")
        if recorded != self.fold_record(k):
            what = (f"fold {recorded.get('fold')} of a split with {recorded.get('folds')} folds "
                    f"(assignment {str(recorded.get('assignment'))[:12]})" if isinstance(recorded, dict)
                    else "no fold")
            raise UserError(f"{path} is not fold {k} of this folds directory: it records {what}, the manifest fold {k} "
                            f"of {self.folds} (assignment {self.assignment[:12]})")
        if checkpoint_meta.get("sha256") != self.teachers[k]:
            raise UserError(f"{path} is not the teacher {MANIFEST} records for fold {k} (sha256 differs): it was "
                            "replaced after training")

    def with_teacher(self, k: int, sha256: str) -> "FoldsManifest":
        teachers = list(self.teachers)
        teachers[k] = sha256
        return dataclasses.replace(self, teachers=tuple(teachers))

    def to_json(self) -> dict:
        return {"kind": FOLDS_KIND, "folds": self.folds, "seed": self.seed, "dataset": self.dataset, "data": self.data,
                "assignment": self.assignment, "config": self.config, "teachers": list(self.teachers)}

    @classmethod
    def from_json(cls, raw: dict, path) -> "FoldsManifest":
        if raw.get("kind") != FOLDS_KIND:
            raise UserError(f"{path} is not an energytools folds manifest (write one with `energytools train --folds K`)")
        try:
            manifest = cls(int(raw["folds"]), int(raw["seed"]), dict(raw["dataset"]), dict(raw["data"]),
                           str(raw["assignment"]), dict(raw["config"]), tuple(raw["teachers"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: the folds metadata lacks or mistypes {exc}") from None
        if len(manifest.teachers) != manifest.folds or "fingerprint" not in manifest.dataset:
            raise UserError(f"{path}: the folds metadata is inconsistent (teachers for {len(manifest.teachers)} "
                            f"of {manifest.folds} folds)")
        return manifest


def new_manifest(folds: int, seed: int, dataset: dict, data: dict, sample_ids, assigned, config: dict) -> FoldsManifest:
    return FoldsManifest(folds, seed, dataset, data, assignment_digest(sample_ids, assigned), config,
                         (None,) * folds)


def write_manifest(out: Path | str, manifest: FoldsManifest, sample_ids, labels, assigned) -> Path:
    """``out/folds.parquet``: one row per training sample (``sample_id, label, fold``, sorted by
    sample_id) with the manifest as its energytools metadata; written atomically."""
    order = np.argsort(np.asarray(sample_ids), kind="stable")
    table = pa.table({"sample_id": pa.array(np.asarray(sample_ids, dtype=np.int64)[order]),
                      "label": pa.array(np.asarray(labels, dtype=np.int64)[order]),
                      "fold": pa.array(np.asarray(assigned, dtype=np.int64)[order])})
    return write_parquet(table, Path(out) / MANIFEST, manifest.to_json())


def read_manifest(out: Path | str) -> tuple[FoldsManifest, pl.DataFrame]:
    """The manifest of folds directory ``out`` and its rows (``sample_id, label, fold``), checked
    against the digest it records."""
    path = require_file(Path(out) / MANIFEST)
    manifest = FoldsManifest.from_json(read_metadata(path), path)
    frame = read_parquet(path, ["sample_id", "label", "fold"])
    if assignment_digest(frame["sample_id"].to_numpy(), frame["fold"].to_numpy()) != manifest.assignment:
        raise UserError(f"{path}: its rows do not match the assignment its metadata records (edited by hand?)")
    return manifest, frame


#: the train options a re-run of `train --folds` may change without training finished folds again
FOLDS_MAY_CHANGE = {"train.device", "train.sync_every", "train.eval_batch_size"}


def check_same_folds(recorded: FoldsManifest, wanted: FoldsManifest, out: Path) -> None:
    """Refuse to continue fold teachers made of another split or with other options."""
    if recorded.dataset.get("fingerprint") != wanted.dataset["fingerprint"]:
        raise UserError(f"{out} holds fold teachers of another training split than {wanted.dataset['name']}'s as it is "
                        "now (fingerprints differ): pass the data options they were trained with, or --overwrite")
    changed = changed_options(recorded.config, wanted.config, FOLDS_MAY_CHANGE)
    if changed:
        raise UserError(f"{out} holds fold teachers trained with {'; '.join(changed[:3])}"
                        + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                        + "; pass the options they were trained with, or --overwrite to train them again")
    if recorded.assignment != wanted.assignment:
        raise UserError(f"{out}: its {MANIFEST} splits the samples otherwise than this energytools does; pass "
                        "--overwrite to train the folds again")


def fold_status(out: Path, manifest: FoldsManifest, k: int) -> str:
    """``done`` (its teacher is recorded and in place), ``resume`` (a stopped run) or ``start``."""
    best = fold_checkpoint(out, k)
    if manifest.teachers[k] is not None:
        if best.is_file() and sha256_file(best) == manifest.teachers[k]:
            return "done"
        raise UserError(f"{best} is not the teacher {out / MANIFEST} records for fold {k} (missing, or replaced since): "
                        "put it back, or pass --overwrite to train the folds again")
    return "resume" if (fold_dir(out, k) / "last.pt").exists() else "start"


def remove_folds(out: Path) -> None:
    """--overwrite: the manifest and the fold run directories go; anything else in ``out`` stays."""
    (out / MANIFEST).unlink(missing_ok=True)
    for run in out.glob("fold-*"):
        if run.is_dir() and re.fullmatch(r"fold-\d+", run.name):
            shutil.rmtree(run)
