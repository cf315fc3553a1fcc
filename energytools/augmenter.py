"""Augmented, scored rows of HE-DA shards: the selection, the policy applied to each (source_id,
copy) job seeded from (seed, source_id, copy), and the teacher's columns of the new images.

An augmented sample's id packs a flag bit, a namespace drawn from the shard directory's content
key and (source_id * copies + copy), so two shard directories made from one table with other
options have disjoint ids.
"""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from .config import AugmentConfig
from .data.base import ArrayImages, ImageSet
from .data.shards import DEFAULT_IMAGE_FORMAT, IMAGE_FORMATS, SHARD_SCHEMA, decode_image, encode_image, huggingface_metadata
from .errors import UserError
from .policies import make_policy
from .selection import select_samples
from .table import TableMeta, load_table
from .teacher import open_table_teacher
from .teacher_pass import teacher_columns
from .view_logits import logits_array

#: an augmented sample's id: this bit set (far above any dataset's own ids), a namespace drawn
#: from the shard directory's content key, and (source_id * copies + copy) in the low bits, so
#: two shard directories made from one table with other options have disjoint ids
AUG_ID_FLAG = 1 << 62
NAMESPACE_BITS, INDEX_BITS = 21, 41


def augmented_ids(namespace: int, source_ids: np.ndarray, copies: int, copy: np.ndarray) -> np.ndarray:
    index = np.asarray(source_ids, dtype=np.int64) * copies + np.asarray(copy, dtype=np.int64)
    if len(index) and index.max() >= 1 << INDEX_BITS:
        raise UserError(f"sample ids up to {int(np.max(source_ids))} with {copies} copies do not fit HE-DA's ids")
    return AUG_ID_FLAG | (namespace << INDEX_BITS) | index


#: the shard layout's version: a partial directory of another layout is not resumed (2: per-view columns)
SHARD_FORMAT = 2
#: the score table's columns this stage reads
TABLE_COLUMNS = ["sample_id", "label", "energy"]
#: the teacher's stored logits a shard holds when the table does, in column order
STORED_LOGITS = ("logits", "logits_flipped", "view_energy", "view_logits", "view_topk_index", "view_topk_logit",
                 "view_fill")


class Augmenter:
    """Builds augmented, scored rows; one per process (dataset, teacher and policy load once)."""

    def __init__(self, cfg: AugmentConfig, dataset: ImageSet, table: pl.DataFrame, meta: TableMeta, namespace: int):
        try:
            import cv2

            cv2.setNumThreads(0)  # one process per core: OpenCV's own threads would only compete
        except ImportError:
            pass
        self.cfg, self.dataset, self.meta, self.namespace = cfg, dataset, meta, namespace
        self.selection = select_samples(table, cfg.ratio, cfg.select, cfg.per_class, cfg.seed)
        self.selected_ids = self.selection["sample_id"].to_numpy()
        self.groups = meta.fit_groups(table)
        position_of = {int(s): i for i, s in enumerate(dataset.sample_ids)}
        self.positions = np.array([position_of[int(s)] for s in self.selected_ids], dtype=np.int64)
        self.labels = dataset.labels[self.positions]
        self.policy = make_policy(cfg.policy)
        self.image_format = IMAGE_FORMATS[cfg.image_format or DEFAULT_IMAGE_FORMAT]
        self.teacher = open_table_teacher(meta, dataset, cfg.teacher, cfg.teacher_arch, "cpu",
                                          cfg.preprocessing.given())

    @classmethod
    def open(cls, cfg: AugmentConfig, namespace: int) -> "Augmenter":
        """What a spawned worker does: load ``cfg.scores`` and its dataset itself (the selection
        is a pure function of the table, so recomputing it keeps the start-up arguments small)."""
        table, meta = load_table(cfg.scores, TABLE_COLUMNS)
        return cls(cfg, meta.data.build("train"), table, meta, namespace)

    def image(self, index: int) -> np.ndarray:
        return self.dataset.image(self.positions[index])

    def build(self, jobs: list[tuple[int, int]]) -> pa.Table:
        rows = {name: [] for name in SHARD_SCHEMA.names}
        pixels = []
        for index, copy in jobs:
            source_id = int(self.selected_ids[index])
            rng = np.random.default_rng([self.cfg.seed, source_id, copy])
            result = self.policy(rng, index, self.image, len(self.selected_ids))
            encoded = encode_image(result.image, self.cfg.image_format, self.cfg.quality)
            # a lossy format's teacher columns are of the decoded image: what distill will read
            pixels.append(result.image if self.image_format.lossless
                          else decode_image(encoded, self.dataset.info.in_channels))
            partner = result.partner_index
            rows["image"].append({"bytes": encoded, "path": f"{source_id}-{copy}.{self.image_format.extension}"})
            rows["sample_id"].append(int(augmented_ids(self.namespace, [source_id], self.cfg.copies, [copy])[0]))
            rows["source_id"].append(source_id)
            rows["partner_id"].append(None if partner is None else int(self.selected_ids[partner]))
            rows["lam"].append(result.lam)
            rows["label"].append(int(self.labels[index]))
            rows["partner_label"].append(int(self.labels[partner if partner is not None else index]))
            rows["aug"].append(self.policy.name)
            rows["aug_params"].append(json.dumps(result.params, sort_keys=True))
        scored = self._score(np.stack(pixels), np.array(rows["label"]), np.array(rows["sample_id"]))
        groups, temps = self.groups.assign(scored["energy"], np.array(rows["sample_id"]))
        rows.update(energy=scored["energy"], confidence=scored["confidence"], energy_group=list(groups),
                    temperature=temps)
        table = pa.table({field.name: pa.array(rows[field.name], type=field.type) for field in SHARD_SCHEMA})
        for name in STORED_LOGITS:
            if name in scored:
                table = table.append_column(name, logits_array(name, scored[name]))
        return table.replace_schema_metadata(huggingface_metadata(self.dataset.info.classes))

    def _score(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> dict:
        """The teacher's columns of augmented images: statistics, stored logits when the table has
        them, and the table's K views of each new image (drawn as score draws the dataset's, from
        (seed, sample_id, view)) so distill can replay them too."""
        views = None
        if self.meta.has_views:
            record = self.meta.views
            augmented = ImageSet(self.dataset.info, "he-da", ArrayImages(images), labels, ids)
            views = augmented.render_views(np.arange(len(ids)), np.broadcast_to(np.arange(record.count),
                                                                                (len(ids), record.count)),
                                           record.seed)[0]
        return teacher_columns(self.teacher, torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels),
                               torch.from_numpy(ids), self.dataset.info, self.meta.energy_temperature,
                               save_logits=self.meta.has_logits, views=views,
                               top_k=self.meta.views.top_k if views is not None else None,
                               batch_size=self.cfg.batch_size)
