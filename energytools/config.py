"""Stage configs: one dataclass per stage is the single source of its options and defaults.

The Python API, the CLI and the recipe sections all build a stage's config through
:func:`~energytools.options.resolve` (re-exported here), so the same options give the same run
whichever way they are written: defaults (the dataclass) -> recipe or config values -> CLI
flags. Every value is type-checked there, with one line naming the key. A field's ``help`` (its
metadata) is its CLI help text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .data import DATASETS, build_dataset
from .data.shards import IMAGE_FORMATS, canonical_image_format, check_image_format
from .distillers import METHODS, method_spec
from .energy import TEMPERATURE_RULES, TemperatureRule
from .errors import UserError, option_name
from .functional import LABEL_ISSUE_FILTERS, LABEL_QUALITY_METHODS
from .models import MODELS
from .ood import OOD_SCORES
from .optim import OPTIMIZERS, SCHEDULES
from .options import (as_dict, canonical_name, content_of, convert, flat_fields, flat_names, option, overrides,
                      registry, require, resolve, resume_may_change_keys)
from .policies import POLICIES, make_policy
from .preprocessing import STUDENT_NORMALIZATIONS, TeacherPreprocessing
from .selection import LABEL_ISSUE_SCORES, SELECT_BY, SELECT_MODES
from .temperatures import TEMPERATURE_SOURCES
from .trackers import TRACKERS, require_trackers

__all__ = ["AugmentConfig", "DataConfig", "DistillConfig", "HE_DA_MODES", "LabelIssuesConfig", "STUDENT_NORMALIZATIONS",
           "ScoreConfig", "SelectConfig", "TEMPERATURE_SOURCES", "TeacherPreprocessing", "TrainConfig", "TrainStageConfig",
           "as_dict", "canonical_name", "content_of", "convert",
           "flat_fields", "flat_names", "option", "overrides", "registry", "resolve", "resume_may_change_keys"]

MODEL_NAMES = registry(MODELS)
RULE_NAMES = registry(TEMPERATURE_RULES)
SELECT_MODE_NAMES = registry(SELECT_MODES)


# the help panels a command's options are grouped in (`energytools distill --help`), as timm groups its flags
INPUTS = "Inputs"
OUTPUT = "Output"
DATA = "Data"
OPTIMISATION = "Optimisation"
HARDWARE = "Hardware"
TEMPERATURES = "Temperatures"
METHOD = "Method"
TEACHER_INPUT = "Teacher input"
VIEWS = "Views"
SELECTION = "Selection"
AUGMENTATION = "Selection and augmentation"
LABEL_ISSUES = "Label issues (cleanlab)"
HE_DA = "HE-DA"
OOD = "Reference and out-of-distribution"


@dataclass
class DataConfig:
    """Which samples: a dataset by name and the options that subset it."""

    dataset: str | None = option(None, "dataset name, see `energytools datasets`",
                                 choices=registry(DATASETS))
    data_root: str | None = option(None, "where the dataset files are")
    limit: int | None = option(None, "class-stratified subset of N training samples")
    eval_limit: int | None = option(None, "same, for the val and test splits")
    imbalance_factor: float | None = option(None, "long-tail the train split (e.g. 100)")
    image_size: int | None = option(None, "imagefolder and parquet: side of the square input")
    crop_pad: int | None = option(None, "train transform: zero-pad by N pixels, crop back, then flip (cifar: 4; "
                                  "fashion-mnist: none unless set)")

    def build(self, split: str, unlabelled: bool = False):
        """The split's samples; images without a label are refused unless ``unlabelled`` (score)."""
        if self.dataset is None:
            raise UserError(f"no dataset given: pass {option_name('dataset')} (or `dataset` in the recipe's [data])")
        limit = self.limit if split == "train" else self.eval_limit
        if limit is not None and limit <= 0:
            raise UserError(f"{option_name('limit' if split == 'train' else 'eval_limit')} must be positive, got {limit}")
        return build_dataset(self.dataset, split, self.data_root, limit, self.imbalance_factor, self.image_size,
                             self.crop_pad, unlabelled)


@dataclass
class TrainConfig:
    """Optimisation settings: mdistiller's CIFAR recipe (SGD 0.9, lr 0.05, wd 5e-4, batch 64,
    lr x0.1 at 150/180/210 of 240 epochs) with the milestones as fractions of ``epochs``."""

    epochs: int = option(30, "training epochs (the reference recipe: 240)", resume_may_change=True)
    batch_size: int = option(64, "batch size (per process under torchrun)")
    lr: float = option(0.05, "initial learning rate")
    optimizer: str = option("sgd", "sgd (momentum, --nesterov) or adamw (--betas, --eps)",
                            choices=registry(OPTIMIZERS))
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "SGD: Nesterov momentum")
    betas: tuple[float, ...] = option((0.9, 0.999), "AdamW: beta1,beta2")
    eps: float = option(1e-8, "AdamW: epsilon")
    weight_decay: float = option(5e-4, "weight decay (AdamW: decoupled)")
    decay_norm_and_bias: bool | None = option(None, "weight decay on 1-d parameters (biases, norm weights) too "
                                              "(default: yes for sgd, as ever; no for adamw, as timm)")
    schedule: str = option("step", "step (x lr_decay at the milestones) or cosine (to --min-lr); the lr is set "
                           "every step at the fractional epoch", choices=registry(SCHEDULES))
    milestones: tuple[float, ...] = option((0.625, 0.75, 0.875), "step schedule: fractions of the epochs")
    lr_decay: float = option(0.1, "step schedule: lr factor at each milestone")
    min_lr: float = option(0.0, "cosine schedule: the lr it ends at")
    warmup_epochs: float = option(0.0, "linear warm-up over the first N epochs (fractions allowed), from "
                                  "--warmup-lr to the schedule's lr at N")
    warmup_lr: float = option(0.0, "the lr the warm-up starts from")
    label_smoothing: float = option(0.0, "label smoothing of the CE term, in [0, 1)")
    clip_grad: float | None = option(None, "clip the gradients' global norm to this value")
    accumulate: int = option(1, "accumulate gradients over N batches per optimizer step (an N-times larger "
                             "batch; N x batch_size samples per step)")
    ema_decay: float | None = option(None, "keep an exponential moving average of the weights with this decay "
                                     "(e.g. 0.999), evaluated each epoch; best.pt takes the better of the two")
    # None, not False: an option a version adds unset leaves the stamps of finished pipeline steps fresh
    ema_warmup: bool | None = option(None, "EMA: the decay rises as 1 - (1 + updates)^(-2/3) up to --ema-decay "
                                     "(timm's warm-up), so a short run's average does not hold on to the first weights")
    seed: int = option(0, "seed for every random choice")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...", panel=HARDWARE,
                         resume_may_change=True)
    num_workers: int = option(0, "DataLoader worker processes", panel=HARDWARE)
    in_memory_gib: float = option(2.0, "an in-memory training split (Fashion-MNIST, CIFAR, digits, not image "
                                  "folders or shards) whose normalised float copy fits in this many GiB is held "
                                  "so on the device when there are no --num-workers: each batch is a gather, its "
                                  "crop and flips, and no conversion (the same weights); 0: convert every batch",
                                  panel=HARDWARE, content=False, resume_may_change=True)
    prefetch: int = option(2, "batches each DataLoader worker loads ahead (with --num-workers; the random "
                           "augmentation's draws depend on it, so keep it to reproduce a run)", panel=HARDWARE)
    amp: bool = option(True, "mixed precision on cuda (no effect elsewhere)", panel=HARDWARE)
    channels_last: bool = option(False, "channels-last memory format for the model and batches (faster "
                                 "convolutions on cuda with AMP)", panel=HARDWARE)
    sync_every: int = option(100, "read the loss from the device every N steps (progress and divergence "
                             "check); 0: once per epoch", panel=OUTPUT, resume_may_change=True)
    eval_batch_size: int = option(512, "batch size of validation and test passes", panel=HARDWARE,
                                  resume_may_change=True)
    deterministic: bool = option(False, "deterministic algorithms (and CUBLAS_WORKSPACE_CONFIG=:4096:8): on cuda "
                                 "a resumed run ends with the same weights; slower", panel=HARDWARE)
    checkpoint_every_steps: int = option(0, "also write last.pt every N optimizer steps, holding the position "
                                         "inside the epoch (long epochs; --resume continues from it); 0: at the "
                                         "end of each epoch only", content=False, panel=OUTPUT)
    log: tuple[str, ...] = option((), f"also log the run to {', '.join(TRACKERS)} (repeatable; each an extra: "
                                  "pip install 'energytools[NAME]'): TensorBoard event files in OUT/tensorboard, "
                                  "an offline W&B run in OUT/wandb (WANDB_MODE=online streams it), MLflow's file "
                                  "store OUT/mlruns (or MLFLOW_TRACKING_URI); --resume continues the same run",
                                  content=False, panel=OUTPUT)
    log_every: int = option(50, "--log: send the step values (means over the last N steps) every N steps; each "
                            "send reads them from the device once", content=False, panel=OUTPUT)

    def check(self) -> None:
        require_trackers(self.log)
        for name in ("epochs", "batch_size", "eval_batch_size", "prefetch", "accumulate", "log_every"):
            require(self, name, getattr(self, name) >= 1, ">= 1")
        for name in ("momentum", "weight_decay", "num_workers", "sync_every", "checkpoint_every_steps",
                     "warmup_epochs", "warmup_lr", "min_lr"):
            require(self, name, getattr(self, name) >= 0, ">= 0")
        require(self, "lr", self.lr > 0 and math.isfinite(self.lr), "a positive finite number")
        require(self, "lr_decay", self.lr_decay > 0, "positive")
        require(self, "milestones", all(0 < m < 1 for m in self.milestones), "fractions of the epochs in (0, 1)")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        require(self, "betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)")
        require(self, "eps", self.eps > 0, "positive")
        require(self, "label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)")
        require(self, "clip_grad", self.clip_grad is None or self.clip_grad > 0, "positive")
        require(self, "ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "in (0, 1)")
        if self.ema_warmup and self.ema_decay is None:
            raise UserError(f"{option_name('ema_warmup')} needs {option_name('ema_decay')} (the decay the warm-up "
                            "rises to)")


@dataclass(kw_only=True)
class TrainStageConfig:
    model: str = option(help="architecture, see `energytools models`", choices=MODEL_NAMES, panel=INPUTS)
    out: str = option(help="run directory", content=False, panel=OUTPUT)
    data: DataConfig = option(help="the dataset", factory=DataConfig, panel=DATA)
    train: TrainConfig = option(help="optimisation", factory=TrainConfig, panel=OPTIMISATION)
    init: str | None = option(None, "start from these weights: an energytools, mdistiller, torchvision or timm "
                              "checkpoint (.pt, .pth, .safetensors) or, for hf: models, a save_pretrained folder; "
                              "a head for another class count is re-initialised", panel=INPUTS,
                              resume_may_change=True)  # its content is compared (init_weights' sha256)
    folds: int | None = option(None, "train K teachers instead, fold k's on the other K-1 folds of a stratified "
                               "K-fold split of the training split (seeded by --seed), into OUT/fold-k/, with the "
                               "split in OUT/folds.parquet; `score --teacher OUT` then scores out of fold; the same "
                               "command run again continues", panel=INPUTS)
    resume: bool = option(False, "continue from OUT/last.pt", content=False, panel=OUTPUT)
    overwrite: bool = option(False, "replace an existing run", content=False, panel=OUTPUT)

    def check(self) -> None:
        require(self, "folds", self.folds is None or self.folds >= 2, "at least 2")


@dataclass
class ScoreConfig:
    teacher: str = option(help="teacher checkpoint (.pt, .pth, .safetensors) or save_pretrained folder, or a `train "
                          "--folds K` directory: out-of-fold scores (each train sample by the fold teacher that did "
                          "not train on it; val and test by the K teachers' mean logits)", panel=INPUTS)
    out: str = option("scores.parquet", "the table to write", content=False, panel=OUTPUT)
    data: DataConfig = option(help="the dataset; unless `dataset` is given, the teacher checkpoint's, with the "
                              "fields that are given changed", factory=DataConfig, panel=DATA)
    teacher_arch: str | None = option(None, "architecture, for checkpoints that do not record it",
                                      choices=MODEL_NAMES, panel=INPUTS)
    preprocessing: TeacherPreprocessing = option(help="the teacher's input size and normalisation",
                                                 factory=TeacherPreprocessing, panel=TEACHER_INPUT)
    split: str = option("train", "train, val or test", choices=lambda: ("train", "val", "test"), panel=INPUTS)
    energy_temperature: float = option(4.0, "T_E in E = -T_E * logsumexp(z / T_E)", panel=TEMPERATURES)
    low_frac: float = option(0.2, "fraction of lowest-energy samples in the low group", panel=TEMPERATURES)
    high_frac: float = option(0.2, "fraction of highest-energy samples in the high group", panel=TEMPERATURES)
    temperatures: tuple[float, ...] = option((6.0, 4.0, 2.0), "KD temperature of the low,mid,high groups "
                                             "(paper: 6,4,2; reference code: 2,4,6)", panel=TEMPERATURES)
    temperature_rule: str = option("groups", "groups, or rank (linear in energy rank)", choices=RULE_NAMES,
                                   panel=TEMPERATURES)
    reference: str | None = option(None, "a train table the same teacher scored: its groups (fractions, "
                                   "boundaries) group this split, and each sample is flagged `ood` below the score "
                                   "that keeps --ood-tpr of its validation split (scored here, as the reference's "
                                   "data is on this machine); images without labels are read as its data",
                                   panel=OOD)
    ood_score: str | None = option(None, "with --reference: the OOD score, higher = more in-distribution: energy "
                                   "(-E at T = 1, Liu et al. 2020), msp (max softmax) or max-logit [default: energy]",
                                   choices=registry(OOD_SCORES), panel=OOD)
    ood_tpr: float | None = option(None, "with --reference: the share of the reference's validation samples the "
                                   "OOD threshold keeps in distribution, in (0, 1) [default: 0.95]", panel=OOD)
    save_logits: bool = option(False, "store float16 logits (and of the flipped image)", panel=OUTPUT)
    views: int = option(0, "also score K training views per sample, drawn from the dataset's train transform "
                        "(crop, flip): their float16 logits and energies, for distill --cached-logits", panel=VIEWS)
    top_k: int | None = option(None, "with --views: store the N largest logits of each view and one value "
                               "that rebuilds the rest of the softmax (many-class datasets)", panel=VIEWS)
    seed: int = option(0, "seed of the views: view v of sample i is drawn from (seed, i, v)", panel=VIEWS)
    batch_size: int = option(256, "images per forward pass", panel=HARDWARE)
    part_size: int | None = option(None, "rows per resumable part written to OUT.parts/, rounded to a multiple of "
                                   "batch_size (default: from the sample count and the number of processes, at most "
                                   "8192; the table's bytes do not depend on it)", content=False, panel=OUTPUT)
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...", panel=HARDWARE)
    num_workers: int | None = option(None, "DataLoader worker processes that read and decode the images (default: "
                                     "none for data held in memory; for image folders and Parquet images one per "
                                     "CPU available, shared by the ranks of a host, at most 8; the table's bytes "
                                     "do not depend on it)", content=False, panel=HARDWARE)
    amp: bool = option(False, "bf16/fp16 autocast on cuda: faster, but energies from low-precision logits "
                       "(docs/benchmarks.md); default float32 (no TF32)", panel=HARDWARE)
    decode_on_device: bool = option(False, "image folders: the workers only read the files and each batch's JPEGs "
                                    "are decoded, resized and cropped on --device (torchvision's batched "
                                    "decode_jpeg, nvjpeg on cuda); other formats as before. On the CPU the table "
                                    "is the default's; on cuda pixels differ by a level or two (docs/gpu.md)",
                                    panel=HARDWARE)
    overwrite: bool = option(False, "replace an existing output", content=False, panel=OUTPUT)

    def rule(self):
        return TemperatureRule(self.temperatures, self.low_frac, self.high_frac, self.temperature_rule)

    def check(self) -> None:
        self.rule()  # fractions, temperatures and the rule's name
        self.preprocessing.check()
        require(self, "energy_temperature", self.energy_temperature > 0, "positive")
        require(self, "batch_size", self.batch_size >= 1, ">= 1")
        require(self, "part_size", self.part_size is None or self.part_size >= 1, ">= 1")
        require(self, "num_workers", self.num_workers is None or self.num_workers >= 0, ">= 0")
        require(self, "views", self.views >= 0, ">= 0")
        require(self, "ood_score", self.ood_score in (None, *OOD_SCORES), f"one of {', '.join(OOD_SCORES)}")
        require(self, "ood_tpr", self.ood_tpr is None or 0 < self.ood_tpr < 1, "in (0, 1)")
        if (self.ood_score is not None or self.ood_tpr is not None) and not self.reference:
            raise UserError("--ood-score and --ood-tpr need --reference TRAIN_TABLE (its validation split sets the "
                            "threshold)")
        if self.top_k is not None and (self.top_k < 1 or not self.views):
            raise UserError(f"{option_name('top_k')} takes a positive N and needs {option_name('views', metavar='K')}")
        if self.part_size is not None:
            self.part_size = max(self.batch_size, self.part_size // self.batch_size * self.batch_size)


@dataclass
class SelectConfig:
    scores: str = option("scores.parquet", "the train score table", panel=INPUTS)
    out: str | None = option(None, "write the selected ids to this Parquet file (for distill --exclude/--keep)",
                             content=False, panel=OUTPUT)
    ratio: float = option(0.3, "fraction of samples to select, in (0, 1]", panel=SELECTION)
    mode: str = option("high", "high (the hardest: HE-DA), low (the easiest: pruning) or random (a control)",
                       choices=SELECT_MODE_NAMES, panel=SELECTION)
    by: str = option("energy", "the score to rank by: energy, margin, confidence, true_prob, entropy, el2n "
                     "(||softmax - onehot||, Paul et al. 2021) or label_quality (cleanlab's, from --label-issues; "
                     "lowest = most likely mislabeled)", choices=registry(SELECT_BY), panel=SELECTION)
    per_class: bool = option(False, "take the fraction within each class", panel=SELECTION)
    seed: int = option(0, "seed for every random choice", panel=SELECTION)
    label_issues: str | None = option(None, "a label-issues file (`energytools label-issues`) of the same samples: "
                                      "its label_quality joins the table, for --by label_quality --mode low",
                                      panel=INPUTS)
    overwrite: bool = option(False, "replace an existing output", content=False, panel=OUTPUT)

    def check(self) -> None:
        require(self, "ratio", 0 < self.ratio <= 1, "in (0, 1]")
        require(self, "by", self.by in SELECT_BY, f"one of {', '.join(SELECT_BY)}")
        if self.by in LABEL_ISSUE_SCORES and not self.label_issues:
            raise UserError(f"--by {self.by} needs --label-issues FILE (written by `energytools label-issues`)")


@dataclass
class LabelIssuesConfig:
    scores: str = option("scores.parquet", "a score table with logits (score --save-logits); out-of-fold scores "
                         "(a teacher that did not train on the sample) find what in-sample ones hide", panel=INPUTS)
    out: str = option("label-issues.parquet", "the file to write (for distill --exclude, select --label-issues, "
                      "report --label-issues)", content=False, panel=OUTPUT)
    method: str = option("self_confidence", "label_quality: cleanlab.rank.get_label_quality_scores' method, "
                         "self_confidence, normalized_margin or confidence_weighted_entropy",
                         choices=registry(LABEL_QUALITY_METHODS), panel=LABEL_ISSUES)
    filter_by: str = option("prune_by_noise_rate", "is_label_issue: cleanlab.filter.find_label_issues' rule, "
                            f"{', '.join(LABEL_ISSUE_FILTERS)}", choices=registry(LABEL_ISSUE_FILTERS),
                            panel=LABEL_ISSUES)
    overwrite: bool = option(False, "replace an existing output", content=False, panel=OUTPUT)

    def check(self) -> None:
        require(self, "method", self.method in LABEL_QUALITY_METHODS, f"one of {', '.join(LABEL_QUALITY_METHODS)}")
        require(self, "filter_by", self.filter_by in LABEL_ISSUE_FILTERS, f"one of {', '.join(LABEL_ISSUE_FILTERS)}")


@dataclass
class AugmentConfig:
    scores: str = option("scores.parquet", "the train score table", panel=INPUTS)
    out: str = option("he-da", "shard directory", content=False, panel=OUTPUT)
    ratio: float = option(0.3, "fraction of samples to select, in (0, 1]", panel=AUGMENTATION)
    select: str = option("high", "high (HE-DA), low or random (controls)", choices=SELECT_MODE_NAMES,
                         panel=AUGMENTATION)
    per_class: bool = option(False, "take the fraction within each class", panel=AUGMENTATION)
    policy: str = option("cutmix", "cutmix, mixup, randaug, light, or an albumentations .json/.yaml file",
                         choices=registry(POLICIES), panel=AUGMENTATION)
    copies: int = option(1, "augmented samples per selected sample", panel=AUGMENTATION)
    seed: int = option(0, "seed for every random choice", panel=AUGMENTATION)
    workers: int = option(1, "processes writing shards", content=False, panel=OUTPUT)
    shard_size: int = option(2048, "rows per shard", panel=OUTPUT)
    # None, not "png": an option a version adds unset leaves the stamps of finished pipeline steps fresh
    image_format: str | None = option(None, "how shard images are encoded: png (lossless, the default), jpeg or "
                                      "webp (lossy and smaller; the teacher scores the decoded images)",
                                      choices=registry(IMAGE_FORMATS), panel=OUTPUT)
    quality: int | None = option(None, "jpeg and webp: encoder quality, 1-100 (default 90)", panel=OUTPUT)
    teacher: str | None = option(None, "teacher checkpoint (default: the one that scored the table; a table of "
                                 "out-of-fold scores needs one)", panel=INPUTS)
    teacher_arch: str | None = option(None, "architecture, for checkpoints that do not record it",
                                      choices=MODEL_NAMES, panel=INPUTS)
    preprocessing: TeacherPreprocessing = option(help="the teacher's input size and normalisation (default: the "
                                                 "table's; one that contradicts it is refused)",
                                                 factory=TeacherPreprocessing, panel=TEACHER_INPUT)
    batch_size: int = option(256, "images per teacher forward pass", panel=HARDWARE)
    overwrite: bool = option(False, "replace an existing output", content=False, panel=OUTPUT)

    def content(self) -> dict:
        """The options that decide the shards' bytes: not where the input and output live (the
        table is identified by its sha256) nor how many processes write them."""
        # nor the teacher's preprocessing: the table's is used (an override may only repeat it);
        # options added later count only when set, so the ids and bytes of PNG shards stay as they were
        return {k: v for k, v in content_of(self).items()
                if k not in ("scores", "preprocessing") and not (k in ("image_format", "quality") and v is None)}

    def check(self) -> None:
        require(self, "ratio", 0 < self.ratio <= 1, "in (0, 1]")
        for name in ("copies", "workers", "shard_size", "batch_size"):
            require(self, name, getattr(self, name) >= 1, ">= 1")
        self.preprocessing.check()
        self.image_format = canonical_image_format(self.image_format)
        check_image_format(self.image_format, self.quality)
        make_policy(self.policy)  # fail on an unknown policy before any work


#: --he-da modes of distill (the materialized form is --shards)
HE_DA_MODES = ("online",)


@dataclass(kw_only=True)
class DistillConfig:
    # the paths of inputs whose content the run's config compares by sha256 may change on resume
    scores: str = option("scores.parquet", "the train score table", panel=INPUTS, resume_may_change=True)
    student: str = option(help="student architecture, see `energytools models`", choices=MODEL_NAMES, panel=INPUTS)
    out: str = option(help="run directory", content=False, panel=OUTPUT)
    method: str = option("energy-kd", "ce; kd, energy-kd (Kim et al. 2024); dkd, energy-dkd (Zhao et al. 2022); "
                         "ctkd (learnable T, Li et al. 2023); dtkd (per-sample T from max logits, Wei et al. 2024); "
                         "ls-kd, ls-energy-kd, ls-dkd, ls-energy-dkd, ls-ctkd (logit standardization, Sun et al. 2024, "
                         "with its defaults); see docs/methods.md",
                         choices=registry(METHODS), panel=METHOD)
    shards: tuple[str, ...] = option((), "HE-DA shard directory (repeatable)", panel=INPUTS)
    teacher: str | None = option(None, "teacher checkpoint (default: the one that scored the table; a table of "
                                 "out-of-fold scores needs one)", panel=INPUTS)
    teacher_arch: str | None = option(None, "architecture, for checkpoints that do not record it",
                                      choices=MODEL_NAMES, panel=INPUTS)
    preprocessing: TeacherPreprocessing = option(help="the online teacher's input size and normalisation "
                                                 "(default: the table's; one that contradicts it is refused)",
                                                 factory=TeacherPreprocessing, panel=TEACHER_INPUT)
    student_normalization: str | None = option(None, "a timm or Hugging Face student that starts from pretrained "
                                               "weights: `dataset` (the dataset's mean and std, as every student; "
                                               "the default) or `weights` (the mean and std the weights were "
                                               "trained with, e.g. ImageNet's, for a --student-init checkpoint)",
                                               choices=lambda: STUDENT_NORMALIZATIONS, panel=INPUTS)
    student_init: str | None = option(None, "start the student from these weights: an energytools, mdistiller, "
                                      "torchvision or timm checkpoint (.pt, .pth, .safetensors) or, for hf: "
                                      "students, a save_pretrained folder; a head for another class count is "
                                      "re-initialised", panel=INPUTS, resume_may_change=True)
    temperature_source: str = option("table", "table (the clean image's energy, by sample_id), views (each "
                                     "stored view's energy against thresholds over all views; needs score "
                                     "--views) or online (the teacher's energy on each augmented view)",
                                     choices=registry(TEMPERATURE_SOURCES), panel=TEMPERATURES)
    temperatures: tuple[float, ...] | None = option(None, "re-derive: T of the low,mid,high groups, e.g. 2,4,6",
                                                    panel=TEMPERATURES)
    low_frac: float | None = option(None, "re-derive the groups with this low fraction", panel=TEMPERATURES)
    high_frac: float | None = option(None, "re-derive the groups with this high fraction", panel=TEMPERATURES)
    temperature_rule: str | None = option(None, "re-derive with this rule: groups or rank", choices=RULE_NAMES,
                                          panel=TEMPERATURES)
    kd_temperature: float | None = option(None, "T of kd and dkd, DTKD's reference T (method default: 4; ls-*: 2)",
                                          panel=METHOD)
    ce_weight: float | None = option(None, "weight of the CE term (method default: 0.1 kd and ctkd, 1.0 dkd and dtkd)",
                                     panel=METHOD)
    kd_weight: float | None = option(None, "weight of the KD term (method default: 0.9; ls-kd and ls-ctkd: 9)", panel=METHOD)
    dkd_alpha: float | None = option(None, "DKD's TCKD weight (method default: 1)", panel=METHOD)
    dkd_beta: float | None = option(None, "DKD's NCKD weight (method default: 8; the reference's vgg13->vgg8: 6)",
                                    panel=METHOD)
    dkd_warmup: int | None = option(None, "DKD's and DTKD's linear warm-up in epochs (method default: 20)",
                                    panel=METHOD)
    standardize_logits: bool | None = option(None, "logit standardization (Sun et al. 2024): z-score each sample's "
                                             "teacher and student logits before the KD terms (method default: off; "
                                             "on for the ls-* methods)", panel=METHOD)
    ctkd_t_start: float | None = option(None, "CTKD: tau = t_start + t_end * sigmoid(theta) (method default: 1)",
                                        panel=METHOD)
    ctkd_t_end: float | None = option(None, "CTKD: see ctkd_t_start (method default: 20)", panel=METHOD)
    ctkd_grl_epochs: int | None = option(None, "CTKD: epochs of the cosine ramp of the gradient reversal (method "
                                         "default: 10)", panel=METHOD)
    ctkd_grl_weight: float | None = option(None, "CTKD: the reversal weight reached after the ramp, as a magnitude "
                                           "(method default: 1, i.e. the gradient times -1)", panel=METHOD)
    dtkd_alpha: float | None = option(None, "DTKD: weight of the dynamic-temperature KL (method default: 3; the reference's "
                                      "configs use 1-3 per teacher-student pair, docs/methods.md)",
                                      panel=METHOD)
    dtkd_beta: float | None = option(None, "DTKD: weight of the KD term at kd_temperature (method default: 1; the "
                                     "reference's configs use 0.5-2 per pair)",
                                     panel=METHOD)
    he_da: str | None = option(None, "online: the reference's HE-DA, CutMix drawn in every batch among its "
                               "high-energy samples (by --temperature-source) plus a KD term at T=4 on the mixed "
                               "images; runs the teacher on them", choices=lambda: HE_DA_MODES, panel=HE_DA)
    he_da_weight: float | None = option(None, "weight of --he-da online's KD term (default: the method's KD weight, "
                                        "0.9)", panel=HE_DA)
    cached_logits: bool = option(False, "use the table's stored teacher logits (per view with score --views): "
                                 "the teacher is never run", panel=INPUTS)
    eval_limit: int | None = option(None, "class-stratified subset of the val and test splits "
                                    "(default: the table's)", panel=DATA)
    exclude: str | None = option(None, "train without the sample ids in this Parquet file (`energytools select --out`; "
                                 "of a label-issues file, the flagged ones)", panel=INPUTS, resume_may_change=True)
    keep: str | None = option(None, "train only on the sample ids in this Parquet file (of a label-issues file, the "
                              "flagged ones)", panel=INPUTS, resume_may_change=True)
    train: TrainConfig = option(help="optimisation", factory=TrainConfig, panel=OPTIMISATION)
    resume: bool = option(False, "continue from OUT/last.pt", content=False, panel=OUTPUT)
    overwrite: bool = option(False, "replace an existing run", content=False, panel=OUTPUT)

    def check(self) -> None:
        spec = method_spec(self.method)
        require(self, "temperature_source", self.temperature_source in TEMPERATURE_SOURCES,
                f"one of {', '.join(TEMPERATURE_SOURCES)}")
        require(self, "student_normalization", self.student_normalization in (None, *STUDENT_NORMALIZATIONS),
                f"one of {', '.join(STUDENT_NORMALIZATIONS)}")
        self.preprocessing.check()
        require(self, "he_da", self.he_da in (None, *HE_DA_MODES),
                f"one of {', '.join(HE_DA_MODES)} (materialized shards: {option_name('shards')})")
        if self.he_da and self.shards:
            raise UserError(f"{option_name('he_da', 'online')} and {option_name('shards')} are two forms of HE-DA; "
                            "use one")
        require(self, "he_da_weight", self.he_da_weight is None or self.he_da_weight >= 0, "a non-negative number")
        options = spec.options(as_dict(self))
        for name, value in options.items():
            if name not in ("dkd_warmup", "standardize_logits", "kd_temperature"):
                require(self, name, isinstance(value, (int, float)) and value >= 0, "a non-negative number", value)
        require(self, "kd_temperature", options.get("kd_temperature", 1) > 0, "positive",
                options.get("kd_temperature"))
        self.train.check()
