"""Parquet files with energytools metadata: write atomically, read back, validate.

Every file energytools writes carries one schema-level metadata key, ``energytools``, a
JSON object with the provenance (versions, dataset, teacher) and the resolved config. The
score table's is typed: :class:`TableMeta` writes, reads and validates it.
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DataConfig, resolve
from .energy import GROUPS, SIGN_CONVENTION, EnergyGroups, TemperatureRule
from .errors import UserError
from .io import atomic_path, require_file, unreadable_parquet
from .version import __version__

METADATA_KEY = b"energytools"

#: columns every score table has, with their Arrow types
SCORE_COLUMNS = {
    "sample_id": pa.int64(), "label": pa.int64(), "pred": pa.int64(), "correct": pa.bool_(),
    "energy": pa.float32(), "confidence": pa.float32(), "true_prob": pa.float32(), "entropy": pa.float32(),
    "margin": pa.float32(), "energy_group": pa.string(), "temperature": pa.float32(),
}
#: columns of newer score tables; older ones lack them (select --by names what to re-score); ``fold``
#: only tables scored by `train --folds` teachers have (the fold of a train row, null in val and test)
OPTIONAL_SCORE_COLUMNS = {"el2n": pa.float32(), "fold": pa.int64()}
#: the columns `score --reference` adds (see energytools.ood): the energy at T = 1 in the table's
#: sign (E = -logsumexp(z)), the largest logit, the chosen OOD score (higher = more
#: in-distribution) and the flag (score below the threshold)
OOD_COLUMNS = {"energy_t1": pa.float32(), "max_logit": pa.float32(), "ood_score": pa.float32(), "ood": pa.bool_()}


_COLUMN_TYPES = {**SCORE_COLUMNS, **OPTIONAL_SCORE_COLUMNS, **OOD_COLUMNS}


def column_type(name: str) -> pa.DataType | None:
    """The Arrow type of a score-table column (None: not one with a fixed type)."""
    return _COLUMN_TYPES.get(name)


#: the label-issues file (`energytools label-issues`): every sample of a score table with its given
#: label, cleanlab's label quality (lower = more likely mislabeled), the argmax of the predicted
#: probabilities and confident learning's flag
LABEL_ISSUE_COLUMNS = {"sample_id": pa.int64(), "label": pa.int64(), "label_quality": pa.float32(),
                       "suggested_label": pa.int64(), "is_label_issue": pa.bool_()}
LABEL_ISSUES_KIND = "label-issues"
#: the column whose true rows a label-issues file names to `distill --exclude/--keep`
LABEL_ISSUE_FLAG = "is_label_issue"


def versions() -> dict:
    """Library versions recorded in every output, and torch's thread count: it changes the last
    bits of a forward pass, so two outputs can only be expected to match bit for bit when it does."""
    import torch
    import torchvision

    from .data.decode import image_decoder

    return {"energytools": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "polars": pl.__version__, "pyarrow": pa.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "image_decoder": image_decoder()}


def write_parquet(table: pa.Table | pl.DataFrame, path: Path | str, metadata: dict,
                  row_group_size: int | None = None, compression="zstd") -> Path:
    """Write ``table`` with ``metadata`` under the energytools key, atomically.

    No timestamps go into the metadata, so the same inputs give the same bytes.
    """
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    existing = dict(table.schema.metadata or {})
    existing[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression=compression)
    return Path(path)


def read_schema(path: Path | str) -> pa.Schema:
    path = require_file(path)
    try:
        return pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - corrupt or not Parquet
        raise unreadable_parquet(path, exc) from None


def _metadata_of(schema: pa.Schema, path) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: the energytools metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: the energytools metadata is not a JSON object")
    return meta


def read_metadata(path: Path | str) -> dict:
    """The energytools metadata of a Parquet file as a dict (empty when absent)."""
    return _metadata_of(read_schema(path), path)


def read_parquet(path: Path | str, columns: list[str] | None = None) -> pl.DataFrame:
    try:
        return pl.from_arrow(pq.read_table(path, columns=columns))
    except Exception as exc:  # noqa: BLE001
        raise unreadable_parquet(path, exc) from None


#: the score table metadata's layout; a reader refuses versions it does not know
SCHEMA_VERSION = 2
KNOWN_SCHEMA_VERSIONS = (1, 2)  # 1: before the version was recorded (it reads the same fields)


@dataclass(frozen=True)
class DatasetRecord:
    """Which split was scored: enough to rebuild it (with ``TableMeta.data``) and to check it."""

    name: str
    split: str
    size: int
    fingerprint: str
    num_classes: int
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TeacherRecord:
    """The checkpoint that scored the table; ``sha256`` identifies it wherever it is moved."""

    arch: str
    sha256: str
    path: str
    num_classes: int
    in_channels: int
    preprocessing: dict | None = None  # what a timm or Hugging Face teacher was fed (mean, std, size)
    class_names: list | None = None  # the teacher's own (id2label), when it has them
    # the user's --teacher-* options that changed ``preprocessing`` (input_size, mean, std,
    # interpolation as given; "data" for the data's own size); ``preprocessing["sources"]``
    # says where each resolved field came from
    preprocessing_overrides: dict | None = None


#: the per-view columns score --views writes (list per row, one entry per view): ``view_energy``
#: always; ``view_logits`` (K x C float16) or, with --top-k N, ``view_topk_index`` (K x N),
#: ``view_topk_logit`` (K x N float16) and ``view_fill`` (K float32, see energytools.views)
VIEW_COLUMNS = ("view_energy", "view_logits", "view_topk_index", "view_topk_logit", "view_fill")


@dataclass(frozen=True)
class ViewsRecord:
    """What score --views stored: ``count`` views per sample drawn with ``seed`` from the train
    ``transform`` (a TrainTransform as a dict), full logits or the ``top_k`` largest."""

    count: int
    seed: int
    transform: dict
    top_k: int | None = None
    description: str = ""


#: what `score` of K-fold teachers records under the metadata key ``scores``: each sample was scored
#: by teachers that did not train on it (a train sample by its fold's, val and test by all K)
OUT_OF_FOLD = "out-of-fold"


@dataclass(frozen=True)
class FoldsRecord:
    """What a table scored by the K teachers of `train --folds K` records (its metadata's
    ``folds``, beside ``"scores": "out-of-fold"``): K, the split's seed and sha256 (of its
    (sample_id, fold) pairs), each fold teacher's sha256 in fold order, and how rows were scored,
    ``logits``: ``"own fold"`` (train rows: by the teacher that did not train on them) or
    ``"mean"`` (val and test rows: the mean of the K teachers' logits)."""

    folds: int
    seed: int
    assignment: str
    teachers: tuple[str, ...]
    logits: str

    def describe(self) -> str:
        if self.logits == "mean":
            return f"scored by the mean logits of the {self.folds} fold teachers"
        return f"scored out of fold (each by the one of {self.folds} fold teachers that did not train on it)"


@dataclass(frozen=True)
class OodRecord:
    """What `score --reference` flagged out of distribution and how (see energytools.ood).

    ``score`` (energy, msp or max-logit) is oriented higher = more in-distribution; the energy
    score is ``-E`` at ``energy_temperature`` 1, whatever the table's T_E. ``threshold`` keeps
    ``tpr`` of the reference's validation samples (``kept``: the share it does keep, of
    ``reference["validation"]["size"]``); ``flagged`` rows of this table fall below it.
    ``validation`` holds the reference's validation scores by score name (float32,
    little-endian, base64: :func:`energytools.ood.decode_scores`), for the report.
    """

    score: str
    tpr: float
    threshold: float
    kept: float
    flagged: int
    energy_temperature: float
    sign: str
    reference: dict
    validation: dict


@dataclass(frozen=True)
class TableMeta:
    """The score table's ``energytools`` metadata (schema :data:`SCHEMA_VERSION`).

    ``data`` rebuilds the dataset; ``dataset`` identifies the scored split; ``rule`` is the
    temperature rule and ``thresholds`` its boundary energies on the table (for people and
    plots: the rule itself ranks by (energy, sample_id), see :class:`EnergyGroups`).
    ``columns`` is read from the file's schema, not stored in the metadata.
    """

    data: DataConfig
    dataset: DatasetRecord
    teacher: TeacherRecord
    energy_temperature: float
    rule: TemperatureRule
    thresholds: dict
    group_source: str
    config: dict
    summary: dict
    versions: dict
    schema_version: int = SCHEMA_VERSION
    columns: tuple[str, ...] = field(default=(), compare=False)
    views: ViewsRecord | None = None
    ood: OodRecord | None = None
    folds: FoldsRecord | None = None  # scored by `train --folds` teachers: out of fold

    @property
    def split(self) -> str:
        return self.dataset.split

    @property
    def has_logits(self) -> bool:
        return "logits" in self.columns

    @property
    def has_views(self) -> bool:
        return self.views is not None and "view_energy" in self.columns

    def fit_groups(self, frame: pl.DataFrame, rule: TemperatureRule | None = None) -> EnergyGroups:
        """The table's rule (or ``rule``) fitted on the table's own energies."""
        return (rule or self.rule).fit(frame["energy"].to_numpy(), frame["sample_id"].to_numpy())

    def require_train(self, path, stage: str) -> None:
        if self.split != "train":
            raise UserError(f"{path} scores the {self.split} split; {stage} needs a train table")

    def to_json(self) -> dict:
        return {"kind": "scores", "schema_version": SCHEMA_VERSION, "versions": self.versions,
                "data": asdict(self.data), "dataset": {**asdict(self.dataset), "classes": list(self.dataset.classes)},
                "teacher": asdict(self.teacher),
                "energy": {"temperature": self.energy_temperature, "sign": SIGN_CONVENTION},
                "groups": {"low_frac": self.rule.low_frac, "high_frac": self.rule.high_frac,
                           "thresholds": self.thresholds, "source": self.group_source},
                "temperatures": dict(zip(GROUPS, self.rule.temperatures)), "temperature_rule": self.rule.rule,
                "config": self.config, "summary": self.summary,
                **({"views": asdict(self.views)} if self.views is not None else {}),
                **({"ood": asdict(self.ood)} if self.ood is not None else {}),
                **({"scores": OUT_OF_FOLD, "folds": {**asdict(self.folds), "teachers": list(self.folds.teachers)}}
                   if self.folds is not None else {})}

    @classmethod
    def from_json(cls, raw: dict, path, columns: tuple[str, ...] = ()) -> "TableMeta":
        """Validate ``raw``; a missing or mistyped field is one UserError naming the file and field."""
        if raw.get("kind") != "scores":
            if not raw and {"sample_id", "energy", "energy_group"} <= set(columns):
                raise UserError(f"{path} has score columns but lost energytools' metadata, as polars and pandas "
                                "drop it when they write a file: subset a table with `energytools select` and "
                                "`distill --keep/--exclude` instead, or copy the schema metadata over with pyarrow")
            raise UserError(f"{path} is not an energytools score table (no score metadata)")
        version = raw.get("schema_version", 1)
        if version not in KNOWN_SCHEMA_VERSIONS:
            raise UserError(f"{path} has score-table schema version {version!r}; this energytools reads "
                            f"{', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}: upgrade energytools or re-run score")
        reader = _FieldReader(raw, path)
        try:
            data = resolve(DataConfig, reader.get("data", dict), f"{path}: metadata field 'data'")
            dataset = DatasetRecord(reader.get("dataset.name", str), reader.get("dataset.split", str),
                                    reader.get("dataset.size", int), reader.get("dataset.fingerprint", str),
                                    reader.get("dataset.num_classes", int),
                                    tuple(reader.get("dataset.classes", list, [])))
            teacher = TeacherRecord(reader.get("teacher.arch", str), reader.get("teacher.sha256", str),
                                    reader.get("teacher.path", str), reader.get("teacher.num_classes", int),
                                    reader.get("teacher.in_channels", int), reader.get("teacher.preprocessing", dict, None),
                                    reader.get("teacher.class_names", list, None),
                                    reader.get("teacher.preprocessing_overrides", dict, None))
            rule = TemperatureRule(reader.get("temperatures", dict), reader.get("groups.low_frac", float),
                                   reader.get("groups.high_frac", float), reader.get("temperature_rule", str))
            views = None
            if reader.get("views", dict, None) is not None:
                views = ViewsRecord(reader.get("views.count", int), reader.get("views.seed", int),
                                    reader.get("views.transform", dict), reader.get("views.top_k", int, None),
                                    reader.get("views.description", str, ""))
            ood = None
            if reader.get("ood", dict, None) is not None:
                ood = OodRecord(reader.get("ood.score", str), reader.get("ood.tpr", float),
                                reader.get("ood.threshold", float), reader.get("ood.kept", float),
                                reader.get("ood.flagged", int), reader.get("ood.energy_temperature", float),
                                reader.get("ood.sign", str), reader.get("ood.reference", dict),
                                reader.get("ood.validation", dict))
            folds = None
            if reader.get("folds", dict, None) is not None:
                folds = FoldsRecord(reader.get("folds.folds", int), reader.get("folds.seed", int),
                                    reader.get("folds.assignment", str), tuple(reader.get("folds.teachers", list)),
                                    reader.get("folds.logits", str))
        except UserError as exc:
            raise UserError(f"{path}: metadata: {exc}") from None
        return cls(data, dataset, teacher, reader.get("energy.temperature", float), rule,
                   {k: reader.get(f"groups.thresholds.{k}", float) for k in ("low_max", "high_min")},
                   reader.get("groups.source", str, ""), reader.get("config", dict), reader.get("summary", dict),
                   reader.get("versions", dict), version, tuple(columns), views, ood, folds)

    @classmethod
    def read(cls, path: Path | str) -> "TableMeta":
        schema = read_schema(path)
        return cls.from_json(_metadata_of(schema, path), path, tuple(schema.names))


class _FieldReader:
    """Reads dotted fields of a JSON dict with type checks; errors name the field."""

    _REQUIRED = object()

    def __init__(self, raw: dict, path):
        self.raw, self.path = raw, path

    def get(self, dotted: str, kind: type, default=_REQUIRED):
        value = self.raw
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                if default is self._REQUIRED:
                    raise UserError(f"{self.path}: metadata field {dotted!r} is missing")
                return default
            value = value[part]
        if value is None and default is None:  # an optional field recorded as null
            return None
        numeric = kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is not object and not isinstance(value, kind) and not (kind is float and numeric):
            raise UserError(f"{self.path}: metadata field {dotted!r} should be {kind.__name__}, got {value!r}")
        return value


#: arrow type checks of the score columns: a column of another type is refused
_TYPE_CHECKS = {pa.int64(): pa.types.is_integer, pa.float32(): pa.types.is_floating, pa.bool_(): pa.types.is_boolean,
                pa.string(): lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)}


def load_table(path: Path | str, columns: list[str] | None = None) -> tuple[pl.DataFrame, TableMeta]:
    """Load a score table as a polars DataFrame plus its :class:`TableMeta`, checking its contract.

    ``columns`` None reads every column but the per-view ones (:data:`VIEW_COLUMNS`, K values
    or K x C logits per row): energytools.view_logits.read_views reads those into arrays.

    Raises :class:`UserError` when the file is not a score table, its metadata is missing,
    unreadable or of an unknown schema version, a required column is missing or of the wrong
    type, or the sample ids are null or duplicated.
    """
    meta = TableMeta.read(path)
    schema = read_schema(path)
    if columns is None and any(name in VIEW_COLUMNS for name in schema.names):
        columns = list(SCORE_COLUMNS) + [n for n in schema.names if n not in SCORE_COLUMNS and n not in VIEW_COLUMNS]
    present_optional = [n for n in OPTIONAL_SCORE_COLUMNS if n in schema.names]
    for name in columns if columns is not None else list(SCORE_COLUMNS) + present_optional:
        if name not in schema.names:
            newer = " (tables scored before it existed lack it: re-score)" if name in OPTIONAL_SCORE_COLUMNS else ""
            raise UserError(f"{path} lacks column {name!r}{newer}")
        expected = column_type(name)
        if expected is not None and not _TYPE_CHECKS[expected](schema.field(name).type):
            raise UserError(f"{path}: column {name!r} is {schema.field(name).type}, expected {expected}")
    frame = read_parquet(path, columns)
    validate_scores(frame, path)
    return frame, meta


def scores_out_of_fold(path: Path | str) -> bool:
    """Whether a score table records out-of-fold scores (``"scores": "out-of-fold"`` in its metadata)."""
    return read_metadata(path).get("scores") == OUT_OF_FOLD


def load_label_issues(path: Path | str) -> tuple[pl.DataFrame, dict]:
    """A label-issues file (:data:`LABEL_ISSUE_COLUMNS`) and its energytools metadata, checked."""
    schema = read_schema(path)
    meta = _metadata_of(schema, path)
    if meta.get("kind") != LABEL_ISSUES_KIND:
        raise UserError(f"{path} is not an energytools label-issues file (write one with `energytools label-issues`)")
    for name, expected in LABEL_ISSUE_COLUMNS.items():
        if name not in schema.names:
            raise UserError(f"{path} lacks column {name!r}")
        if not _TYPE_CHECKS[expected](schema.field(name).type):
            raise UserError(f"{path}: column {name!r} is {schema.field(name).type}, expected {expected}")
    frame = read_parquet(path, list(LABEL_ISSUE_COLUMNS))
    validate_scores(frame, path)
    return frame, meta


def validate_scores(frame: pl.DataFrame, path) -> None:
    if "sample_id" in frame.columns:
        ids = frame["sample_id"]
        if ids.null_count():
            raise UserError(f"{path} has null sample_id values")
        if ids.n_unique() != len(ids):
            raise UserError(f"{path} has duplicate sample_id values")
    if "energy" in frame.columns and not frame["energy"].is_finite().all():
        raise UserError(f"{path} has non-finite energies")
