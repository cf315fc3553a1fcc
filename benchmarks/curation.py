"""The curation study (issue 38): which score finds mislabeled samples and out-of-distribution
inputs, in-sample against out-of-fold, and whether Energy KD helps when labels are noisy.
Writes its block into docs/results.md and every measurement into docs/results/curation.csv.

    python benchmarks/curation.py --out runs/curation                 # about an hour on 2 cores
    python benchmarks/curation.py --smoke --out /tmp/curation-smoke   # digits, CI-sized

Every step goes through energytools' own commands (the Python API): `train` and `train --folds
4`, `score --save-logits` (`score --teacher FOLDS_DIR` for out-of-fold rows), `label-issues`,
`select`, `distill` and `score --reference`. Resumable: a finished step is kept, an interrupted
training continues from its last.pt; re-run the same command. Design (full scale):

- **Label noise.** A class-stratified 2,400-image subset of Fashion-MNIST's training split (a
  10% validation split is carved from it, with the same noise: a user's validation labels are
  as noisy as the training labels) written as a Parquet dataset whose labels are corrupted:
  20% and 40% symmetric (a flipped label is uniform over the other nine classes) and 40%
  asymmetric between confusable pairs (T-shirt/top <-> shirt, pullover <-> coat; the other
  classes are clean). The test split is 1,000 clean test images. 3 seeds: seed s draws the noise
  and seeds the teachers. Teacher cnn_small with the default recipe (SGD 0.05, step schedule)
  at 15 epochs (test accuracy has levelled off) and at 60 (it fits most of its noisy labels: the
  table's "fit" column); in-sample scores are its own training samples, out-of-fold ones come
  from 4 fold teachers with the same recipe. Scores: energy (higher = suspect; label-blind),
  self-confidence (the probability of the given label; lower = suspect) and the label-aware
  margin (that probability minus the largest other; cleanlab's normalized margin up to a
  monotone map), each as the AUROC of detecting the corrupted labels, and cleanlab's flags
  (`find_label_issues`, prune_by_noise_rate) as precision and recall.
- **Downstream.** cnn_small trained with cross-entropy on the given labels for 15 epochs (CE
  alone: the labels' effect is what is measured; KD's 0.9 weight would mostly hide it), on the
  full noisy set, without the out-of-fold flags (15-epoch folds), and without as many samples
  drawn at random (`select --mode random`). Equal epochs, so the pruned runs take fewer steps.
- **Out of distribution.** cnn_small on the training images of classes 0-7 (4,800 of them), 15
  epochs, 5 seeds. In-distribution: 1,000 test images of classes 0-7 (the teacher's test split).
  Near OOD: 1,000 test
  images of classes 8-9 (bag, ankle boot). Far OOD: scikit-learn's
  1,797 digits upscaled to 28x28, and 1,000 uniform-noise images. Each set is scored as new,
  unlabelled data with `score --reference` (the reference's validation split sets the
  threshold). Energy (-E at T = 1) against the max softmax probability and the max logit:
  AUROC and FPR at 95% TPR, each checked against scikit-learn's roc_auc_score and roc_curve.
- **Energy KD under noisy labels.** The 20%-symmetric, 15-epoch in-sample teacher of seed 0
  (`--method kd` and `energy-kd` in both directions, with ce as a floor) into cnn_tiny, 15
  epochs, 5 seeds, the same data and steps for every row.
"""
from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common import code_identity, delta_stats, record_lines, replace_block
from runner import invocation_record, run_all
import energytools
from energytools.config import DataConfig
from energytools.ood import OOD_SCORES, oriented
from energytools.summaries import (VERDICT_RULE, aggregate_runs, half_width, holm_verdicts, interval_text,
                                   markdown_table, mean_std, summary_cells, verdict)
from energytools.functional import ood_metrics

FASHION_PAIRS = ((0, 6), (2, 4))  # T-shirt/top <-> shirt, pullover <-> coat
DIGITS_PAIRS = ((1, 7), (3, 8))


@dataclass(frozen=True)
class Noise:
    kind: str  # "symmetric" or "pairs"
    rate: float


NOISES = {"symmetric 20%": Noise("symmetric", 0.2), "symmetric 40%": Noise("symmetric", 0.4),
          "asymmetric 40%": Noise("pairs", 0.4)}
KD_ROWS = {"ce": {"method": "ce"}, "kd": {"method": "kd"},
           "energy-kd 6,4,2": {"method": "energy-kd", "temperatures": "6,4,2"},
           "energy-kd 2,4,6": {"method": "energy-kd", "temperatures": "2,4,6"}}
DOWNSTREAM = ("noisy full set", "without the flagged", "without as many at random")


@dataclass(frozen=True)
class Scale:
    dataset: str
    pairs: tuple
    train_images: int
    test_images: int
    lengths: tuple[int, int]  # the recipe's epochs, and long enough to fit the noise
    folds: int
    seeds: tuple[int, ...]
    student_epochs: int
    kd_seeds: tuple[int, ...]
    ood_train_images: int
    ood_seeds: tuple[int, ...]
    far: tuple[str, ...]
    teacher: str = "cnn_small"
    student: str = "cnn_small"
    kd_student: str = "cnn_tiny"


FULL = Scale("fashion-mnist", FASHION_PAIRS, 2400, 1000, (15, 60), 4, (0, 1, 2), 15, (0, 1, 2, 3, 4), 6000,
             (0, 1, 2, 3, 4), ("digits", "noise"))
SMOKE = Scale("digits", DIGITS_PAIRS, 700, 200, (2, 4), 2, (0, 1), 2, (0, 1), 1400, (0, 1), ("noise",),
              teacher="cnn_tiny", student="cnn_tiny")


# ---------------------------------------------------------------- data

def corrupt(labels: np.ndarray, noise: Noise, classes: int, pairs, rng: np.random.Generator) -> np.ndarray:
    """``labels`` with a fraction ``noise.rate`` corrupted: symmetric (to a uniformly drawn other
    class) or between the ``pairs`` (each member to its partner; other classes stay clean)."""
    noisy = labels.copy()
    if noise.kind == "symmetric":
        flip = rng.random(len(labels)) < noise.rate
        noisy[flip] = (labels[flip] + rng.integers(1, classes, flip.sum())) % classes
    else:
        partner = {a: b for pair in pairs for a, b in (pair, pair[::-1])}
        for label, other in partner.items():
            flip = (labels == label) & (rng.random(len(labels)) < noise.rate)
            noisy[flip] = other
    return noisy


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(path: Path, images: np.ndarray, labels: np.ndarray | None, names) -> None:
    """A Parquet split as Hugging Face `datasets` writes it (no label column: unlabelled data)."""
    features = {"image": {"_type": "Image"}}
    columns = {"image": pa.array([{"bytes": _png(image), "path": None} for image in images])}
    if labels is not None:
        features["label"] = {"_type": "ClassLabel", "names": list(names)}
        columns["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    table = pa.table(columns).replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)


def images_of(dataset) -> np.ndarray:
    """(N, H, W) uint8 gray images of an energytools split."""
    stacked = np.stack([dataset.image(i) for i in range(len(dataset))])
    return stacked[..., 0] if stacked.ndim == 4 else stacked


def split_images(scale: Scale, split: str, limit: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    data = DataConfig(dataset=scale.dataset, **({"limit": limit} if split == "train" else {"eval_limit": limit}))
    dataset = data.build(split)
    return images_of(dataset), dataset.labels, tuple(dataset.info.classes)


def noisy_dataset(root: Path, scale: Scale, noise: Noise, seed: int) -> Path:
    """A Parquet dataset with corrupted training labels and a clean test split; the clean
    labels in ``root/clean.parquet`` (by row position, which is the sample id)."""
    if (root / "clean.parquet").exists():
        return root
    images, labels, names = split_images(scale, "train", scale.train_images)
    noisy = corrupt(labels, noise, len(names), scale.pairs, np.random.default_rng(seed))
    write_split(root / "data" / "train-00000-of-00001.parquet", images, noisy, names)
    test_images, test_labels, _ = split_images(scale, "test", scale.test_images)
    write_split(root / "data" / "test-00000-of-00001.parquet", test_images, test_labels, names)
    pl.DataFrame({"sample_id": np.arange(len(labels)), "clean_label": labels}).write_parquet(root / "clean.parquet")
    return root


def upscaled_digits(size: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    digits = (load_digits().images * (255 / 16)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(d).resize((size, size), Image.BILINEAR)) for d in digits])


def ood_datasets(root: Path, scale: Scale) -> dict[str, Path]:
    """The OOD setting's data: the teacher's (classes 0-7, labelled) and the new, unlabelled sets."""
    sets = {name: root / name for name in ("teacher", "in-distribution", "near", *scale.far)}
    if all((path / "ready").exists() for path in sets.values()):
        return sets
    images, labels, names = split_images(scale, "train", scale.ood_train_images)
    known = labels < 8
    write_split(sets["teacher"] / "data" / "train-00000-of-00001.parquet", images[known], labels[known], names[:8])
    # a stratified test subset with test_images of classes 8-9: 5 x test_images in all
    test_images, test_labels, _ = split_images(scale, "test", 5 * scale.test_images)
    inside = test_labels < 8
    known_test = np.flatnonzero(inside)[: scale.test_images]
    write_split(sets["teacher"] / "data" / "test-00000-of-00001.parquet", test_images[known_test],
                test_labels[known_test], names[:8])
    size = images.shape[1]
    rng = np.random.default_rng(0)
    new_data = {"in-distribution": test_images[known_test],
                "near": test_images[~inside][: scale.test_images],
                "digits": upscaled_digits(size) if "digits" in scale.far else None,
                "noise": rng.integers(0, 256, (scale.test_images, size, size), dtype=np.uint8)}
    for name, path in sets.items():
        if name != "teacher":
            write_split(path / "data" / "train-00000-of-00001.parquet", new_data[name], None, None)
        (path / "ready").touch()
    return sets


# ---------------------------------------------------------------- runs (worker processes)

def train_job(job: dict) -> str:
    """One teacher (or `train --folds K` directory) with one torch thread; kept once done."""
    import torch

    torch.set_num_threads(1)
    out = Path(job["out"])
    if not (out / "done").exists():
        data = {"dataset": "parquet", "data_root": job["data"]}
        if job["folds"]:  # the same command run again continues the folds
            energytools.train(job["model"], out, folds=job["folds"], epochs=job["epochs"], seed=job["seed"], **data)
        else:
            started = (out / "last.pt").exists()
            energytools.train(job["model"], out, epochs=job["epochs"], seed=job["seed"], resume=started,
                              overwrite=not started, **data)
        (out / "done").touch()
    return str(out)


def distill_job(job: dict) -> dict:
    """One student; kept once its summary.json exists."""
    import torch

    torch.set_num_threads(1)
    out = Path(job["out"])
    if not (out / "summary.json").exists():
        started = (out / "last.pt").exists()
        energytools.distill(job["scores"], job["student"], out, epochs=job["epochs"], seed=job["seed"],
                            resume=started, overwrite=not started, **job["options"])
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return {**job["key"], "seed": job["seed"], "best": summary["best_test_acc"], "last": summary["last_test_acc"],
            "seconds": summary["seconds"], "samples": config["subset"]["samples"], "epochs": job["epochs"]}


# ---------------------------------------------------------------- measurements (pure)

def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


def label_aware_margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p(given label) - max over the other classes of p: negative where another class wins."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    given = probs[np.arange(len(labels)), labels]
    probs[np.arange(len(labels)), labels] = -1
    return given - probs.max(axis=1)


def detection(table: pl.DataFrame, issues: pl.DataFrame, clean: pl.DataFrame) -> dict:
    """How well each score finds the corrupted labels of ``table`` (a train score table with
    logits) and how cleanlab's flags (``issues``) do; ``fit``: the share of corrupted samples the
    teacher predicts as their given (wrong) label."""
    frame = table.join(clean, on="sample_id").join(issues.select("sample_id", "is_label_issue"), on="sample_id")
    labels = frame["label"].to_numpy()
    corrupted = labels != frame["clean_label"].to_numpy()
    logits = np.stack(frame["logits"].to_list()).astype(np.float64)
    flagged = frame["is_label_issue"].to_numpy()
    hits = int((flagged & corrupted).sum())
    return {"corrupted": int(corrupted.sum()), "fit": float((frame["pred"].to_numpy() == labels)[corrupted].mean()),
            "auroc_energy": auroc(corrupted, frame["energy"].to_numpy()),
            "auroc_self_confidence": auroc(corrupted, -frame["true_prob"].to_numpy()),
            "auroc_margin": auroc(corrupted, -label_aware_margin(logits, labels)),
            "flagged": int(flagged.sum()), "precision": hits / max(int(flagged.sum()), 1),
            "recall": hits / max(int(corrupted.sum()), 1)}


def ood_rows(in_columns: dict, out_columns: dict) -> list[dict]:
    """Each OOD score's AUROC and FPR at 95% TPR (energytools' functions), with the largest
    difference from scikit-learn's roc_auc_score and roc_curve on the same scores."""
    from sklearn.metrics import roc_auc_score, roc_curve

    rows = []
    for score in OOD_SCORES:
        inside, outside = oriented(in_columns, score), oriented(out_columns, score)
        ours = ood_metrics(inside, outside)
        truth = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
        values = np.r_[inside, outside]
        fpr, tpr, _ = roc_curve(truth, values)
        sklearn_fpr = float(fpr[np.argmax(tpr >= 0.95)])
        rows.append({"score": score, "auroc": ours["auroc"], "fpr95": ours["fpr"],
                     "check": max(abs(ours["auroc"] - roc_auc_score(truth, values)), abs(ours["fpr"] - sklearn_fpr))})
    return rows


def paired(frame: pl.DataFrame, value: str, a: pl.Expr, b: pl.Expr, keys: list[str]) -> dict | None:
    """:func:`delta_stats` of ``value`` where ``a`` minus where ``b``, paired on ``keys``."""
    left = frame.filter(a).select(*keys, pl.col(value).alias("a"))
    right = frame.filter(b).select(*keys, pl.col(value).alias("b"))
    deltas = left.join(right, on=keys)
    return delta_stats((deltas["a"] - deltas["b"]).to_numpy())


def comparison_table(comparisons: list[tuple[str, str, dict | None]], scale: float = 1.0, decimals: int = 3) -> str:
    """Markdown for paired comparisons (name, what, paired stats): Δ, 95% t-interval, wins, the
    per-comparison verdict and Holm's over the table."""
    tests = [(c["mean"], c["std"] / c["n"] ** 0.5, c["n"]) if c else None for _, _, c in comparisons]
    holm = holm_verdicts(tests)
    rows = []
    for (name, what, c), adjusted in zip(comparisons, holm):
        if c is None:
            continue
        mean, std = c["mean"] * scale, c["std"] * scale
        width = half_width(std, c["n"])
        rows.append({"comparison": name, "measure": what, "seeds": c["n"], "delta": mean_std(mean, std, decimals),
                     "interval": interval_text(mean - width, mean + width, decimals),
                     "wins": f"{c['wins']}/{c['n']}", "verdict": verdict(mean, std, c["n"]), "holm": adjusted})
    return markdown_table(pl.DataFrame(rows), {"comparison": "comparison", "measure": "measure", "seeds": "seeds",
                                               "Δ": "delta", "95% CI": "interval", "wins": "wins",
                                               "verdict": "verdict", "Holm": "holm"})


def mean_cells(frame: pl.DataFrame, by: list[str], values: dict[str, int]) -> pl.DataFrame:
    """``by`` columns and "mean ± std" over seeds of each of ``values`` (name -> decimals)."""
    stats = frame.group_by(by, maintain_order=True).agg(
        pl.len().alias("seeds"), *[pl.col(v).mean().alias(f"{v}_mean") for v in values],
        *[pl.col(v).std().alias(f"{v}_std") for v in values])
    return stats.select(*by, "seeds", *[pl.struct(f"{v}_mean", f"{v}_std").map_elements(
        lambda s, d=d, v=v: mean_std(s[f"{v}_mean"], s[f"{v}_std"], d), return_dtype=pl.String).alias(v)
        for v, d in values.items()])


# ---------------------------------------------------------------- the study

class Study:
    def __init__(self, out: Path, scale: Scale, workers: int):
        self.out, self.scale, self.workers = out, scale, workers

    def noise_dir(self, noise: str, seed: int) -> Path:
        return self.out / "noise" / noise.replace(" ", "-").replace("%", "") / f"seed{seed}"

    def teacher_jobs(self) -> list[dict]:
        s, jobs = self.scale, []
        for noise, spec in NOISES.items():
            for seed in s.seeds:
                root = noisy_dataset(self.noise_dir(noise, seed), s, spec, seed)
                for epochs in s.lengths:
                    for folds in (None, s.folds):
                        name = f"{'folds' if folds else 'in'}-{epochs}"
                        jobs.append({"out": str(root / name), "data": str(root.resolve()), "model": s.teacher,
                                     "epochs": epochs, "seed": seed, "folds": folds, "cost": epochs * (folds or 1)})
        for seed in s.ood_seeds:
            sets = ood_datasets(self.out / "ood", s)
            jobs.append({"out": str(self.out / "ood" / f"teacher-seed{seed}"), "data": str(sets["teacher"].resolve()),
                         "model": s.teacher, "epochs": s.lengths[0], "seed": seed, "folds": None,
                         "cost": s.lengths[0] * 2})
        return sorted(jobs, key=lambda job: -job["cost"])  # the longest first: the pool ends together

    def scored(self, root: Path, name: str) -> tuple[Path, Path]:
        """The run's train score table (with logits) and its label-issues file."""
        table, issues = root / f"{name}.parquet", root / f"issues-{name}.parquet"
        if not table.exists():
            teacher = root / name if name.startswith("folds") else root / name / "best.pt"
            energytools.score(teacher, table, save_logits=True, overwrite=True)
        if not issues.exists():
            energytools.label_issues(table, issues, overwrite=True)
        return table, issues

    def noise_measurements(self) -> pl.DataFrame:
        rows = []
        for noise in NOISES:
            for seed in self.scale.seeds:
                root = self.noise_dir(noise, seed)
                clean = pl.read_parquet(root / "clean.parquet")
                for epochs in self.scale.lengths:
                    for scores, name in (("in-sample", f"in-{epochs}"), ("out-of-fold", f"folds-{epochs}")):
                        table, issues = self.scored(root, name)
                        test = pl.read_parquet(root / f"in-{epochs}" / "test_predictions.parquet")
                        rows.append({"noise": noise, "seed": seed, "epochs": epochs, "scores": scores,
                                     "teacher_test": 100 * float((test["pred_best"] == test["label"]).mean()),
                                     **detection(pl.read_parquet(table), pl.read_parquet(issues), clean)})
        return pl.DataFrame(rows)

    def student_jobs(self) -> list[dict]:
        s, jobs = self.scale, []
        usual = s.lengths[0]
        for noise in NOISES:
            for seed in s.seeds:
                root = self.noise_dir(noise, seed)
                table = root / f"in-{usual}.parquet"
                _, issues = self.scored(root, f"folds-{usual}")
                flagged = pl.read_parquet(issues)["is_label_issue"].sum()
                drops = {"noisy full set": {}, "without the flagged": {"exclude": str(issues)}}
                if flagged:
                    random_drop = root / f"random-{usual}.parquet"
                    if not random_drop.exists():
                        energytools.select(table, ratio=flagged / pl.read_parquet(issues).height, mode="random",
                                           seed=seed, out=random_drop, overwrite=True)
                    drops["without as many at random"] = {"exclude": str(random_drop)}
                for row, options in drops.items():
                    jobs.append({"out": str(root / "students" / row.replace(" ", "-")), "scores": str(table),
                                 "student": s.student, "epochs": s.student_epochs, "seed": seed,
                                 "options": {"method": "ce", **options}, "key": {"noise": noise, "config": row}})
        root = self.noise_dir("symmetric 20%", s.seeds[0])
        for row, options in KD_ROWS.items():
            for seed in s.kd_seeds:
                jobs.append({"out": str(root / "kd" / row.replace(" ", "-").replace(",", "") / f"seed{seed}"),
                             "scores": str(root / f"in-{usual}.parquet"), "student": s.kd_student,
                             "epochs": s.student_epochs, "seed": seed, "options": options,
                             "key": {"noise": "kd", "config": row}})
        return jobs

    def ood_measurements(self) -> pl.DataFrame:
        sets, rows = ood_datasets(self.out / "ood", self.scale), []
        for seed in self.scale.ood_seeds:
            run = self.out / "ood" / f"teacher-seed{seed}"
            reference = run / "reference.parquet"
            if not reference.exists():
                energytools.score(run / "best.pt", reference, overwrite=True)
            columns = {}
            for name in ("in-distribution", "near", *self.scale.far):
                table = run / f"{name}.parquet"
                if not table.exists():
                    energytools.score(run / "best.pt", table, dataset="parquet", data_root=str(sets[name].resolve()),
                                      reference=str(reference), overwrite=True)
                frame = pl.read_parquet(table)
                columns[name] = {c: frame[c].to_numpy() for c in ("energy_t1", "confidence", "max_logit", "ood")}
            inside = columns["in-distribution"]
            for name in ("near", *self.scale.far):
                for row in ood_rows(inside, columns[name]):
                    rows.append({"seed": seed, "set": name, **row, "flagged_in": float(inside["ood"].mean()),
                                 "flagged_out": float(columns[name]["ood"].mean())})
        return pl.DataFrame(rows)


# ---------------------------------------------------------------- the doc

HEADING = "## Curation: label noise, out-of-distribution data, a noisy teacher (issue 38)"
DETECTION_VALUES = {"fit": 3, "teacher_test": 2, "auroc_energy": 3, "auroc_self_confidence": 3, "auroc_margin": 3,
                    "flagged": 0, "precision": 3, "recall": 3}
DETECTION_COLUMNS = {"noise": "noise", "teacher epochs": "epochs", "scores": "scores", "seeds": "seeds",
                     "fit": "fit", "teacher test %": "teacher_test", "AUROC energy": "auroc_energy",
                     "AUROC self-confidence": "auroc_self_confidence", "AUROC margin": "auroc_margin",
                     "flagged": "flagged", "precision": "precision", "recall": "recall"}


def detection_comparisons(noise: pl.DataFrame, lengths: tuple[int, int]) -> list:
    usual, long = lengths
    comparisons = []
    keys = ["noise", "seed"]
    for name in NOISES:
        of = pl.col("noise") == name
        at = {e: of & (pl.col("epochs") == e) for e in lengths}
        oof, ins = pl.col("scores") == "out-of-fold", pl.col("scores") == "in-sample"
        comparisons += [
            (f"{name}: out-of-fold − in-sample, {long} epochs", "AUROC self-confidence",
             paired(noise, "auroc_self_confidence", at[long] & oof, at[long] & ins, keys)),
            (f"{name}: out-of-fold − in-sample, {usual} epochs", "AUROC self-confidence",
             paired(noise, "auroc_self_confidence", at[usual] & oof, at[usual] & ins, keys)),
            (f"{name}: in-sample, {long} − {usual} epochs", "AUROC self-confidence",
             paired(noise, "auroc_self_confidence", at[long] & ins, at[usual] & ins, keys)),
            (f"{name}: out-of-fold − in-sample, {long} epochs", "cleanlab recall",
             paired(noise, "recall", at[long] & oof, at[long] & ins, keys)),
        ]
        rows = noise.filter(at[usual] & oof)
        comparisons.append((f"{name}: self-confidence − energy, out-of-fold, {usual} epochs", "AUROC",
                            delta_stats((rows["auroc_self_confidence"] - rows["auroc_energy"]).to_numpy())))
    return comparisons


def ood_comparisons(ood: pl.DataFrame, sets: list[str]) -> list:
    comparisons = []
    for name in sets:
        of = pl.col("set") == name
        for other in ("msp", "max-logit"):
            comparisons.append((f"{name}: energy − {other}", "AUROC",
                                paired(ood, "auroc", of & (pl.col("score") == "energy"),
                                       of & (pl.col("score") == other), ["seed"])))
            comparisons.append((f"{name}: {other} − energy", "FPR95 (lower is better: positive favours energy)",
                                paired(ood, "fpr95", of & (pl.col("score") == other),
                                       of & (pl.col("score") == "energy"), ["seed"])))
    return comparisons


def ood_table(ood: pl.DataFrame) -> str:
    checks = ood.group_by("set", "score", maintain_order=True).agg(pl.col("check").max())
    table = mean_cells(ood, ["set", "score"], {"auroc": 3, "fpr95": 3, "flagged_out": 3}).join(
        checks, on=["set", "score"]).with_columns(
        check=pl.col("check").map_elements(lambda v: f"{v:.1e}", return_dtype=pl.String),
        flagged_out=pl.when(pl.col("score") == "energy").then(pl.col("flagged_out")).otherwise(pl.lit("—")))
    return markdown_table(table, {"OOD set": "set", "score": "score", "seeds": "seeds", "AUROC": "auroc",
                                  "FPR at 95% TPR": "fpr95", "flagged": "flagged_out", "check": "check"})


RUN_COLUMNS = {"config": "config", "seeds": "seeds", "best": "best", "last": "last",
               "Δ {baseline} (best)": "delta_best", "95% CI": "interval", "wins": "wins", "verdict": "verdict",
               "Holm": "holm", "rows/epoch": "samples", "epochs": "epochs"}


def run_table(runs: pl.DataFrame, baseline: str) -> str:
    columns = {k.format(baseline=baseline): v for k, v in RUN_COLUMNS.items()}
    return markdown_table(summary_cells(aggregate_runs(runs, baseline)), columns, decimals={"samples": 0, "epochs": 0})


def markdown(scale: Scale, noise: pl.DataFrame, students: pl.DataFrame, ood: pl.DataFrame, records: list[dict]) -> str:
    usual, long = scale.lengths
    lines = ["Written by `benchmarks/curation.py` (its docstring has the design); every measurement is in "
             "[results/curation.csv](results/curation.csv). Each invocation:", "", *record_lines(records), "",
             "Every comparison is paired over seeds (the same noise draw, data and teacher seed on both sides). "
             + VERDICT_RULE + " In the comparison tables, Δ is the named measure's paired difference and Holm "
             "adjusts over the rows of the table.", "",
             "### Label noise: which score finds the corrupted labels", "",
             f"{scale.train_images} {scale.dataset} training images (a tenth carved for validation), "
             f"teacher {scale.teacher}. AUROC of detecting a corrupted label (0.5: chance); `fit` is the share of "
             "corrupted training samples the in-sample teacher predicts as their wrong label (for out-of-fold rows, "
             "the same share among samples its fold teachers never saw); `flagged`, precision and recall are "
             "cleanlab's `find_label_issues` (prune_by_noise_rate) through `energytools label-issues`. Teacher test "
             "accuracy (clean test labels) is the in-sample teacher's.", "",
             markdown_table(mean_cells(noise.sort("noise", "epochs", "scores"), ["noise", "epochs", "scores"],
                                       DETECTION_VALUES), DETECTION_COLUMNS), "",
             f"Paired comparisons ({scale.dataset}, {len(scale.seeds)} seeds; Holm over the table):", "",
             comparison_table(detection_comparisons(noise, scale.lengths)), "",
             "### Downstream: training without the flagged samples", "",
             f"{scale.student} trained with cross-entropy on the given (noisy) labels for {scale.student_epochs} "
             f"epochs; flags from the out-of-fold {usual}-epoch teachers; the random control drops as many samples "
             "(`select --mode random`, seeded per seed). Test accuracy (%) on clean labels.", ""]
    for name in NOISES:
        runs = students.filter(pl.col("noise") == name)
        if runs.height:
            lines += [f"**{name}**", "", run_table(runs, "noisy full set"), "",
                      comparison_table([("without the flagged − without as many at random", "test accuracy (best)",
                                         paired(runs, "best", pl.col("config") == "without the flagged",
                                                pl.col("config") == "without as many at random",
                                                ["seed"]))], decimals=2), ""]
    sets = ["near", *scale.far]
    lines += ["### Out of distribution: energy against the max softmax probability and the max logit", "",
              f"{scale.teacher} trained on classes 0-7 of {scale.dataset} ({len(scale.ood_seeds)} seeds); "
              "in-distribution: test images of classes 0-7; near: test images of classes 8-9; far: "
              + ", ".join({"digits": "scikit-learn's digits upscaled", "noise": "uniform noise"}[f] for f in scale.far)
              + ". Each set scored as new, unlabelled data with `energytools score --reference`. `check` is the "
              "largest difference, over seeds, between energytools' AUROC and FPR95 and scikit-learn's "
              "`roc_auc_score` / `roc_curve` on the same scores. `flagged` is the share of the set that the "
              "table's `ood` column flags (the default score, energy, below the threshold that keeps 95% of the "
              "reference's validation split; the in-distribution set's share should be near 5%).", "",
              ood_table(ood), "",
              f"In-distribution test images flagged OOD: {100 * ood['flagged_in'].mean():.1f}% (mean over seeds).", "",
              comparison_table(ood_comparisons(ood, sets)), "",
              "### Does Energy KD help when the teacher learned from noisy labels?", "",
              f"The in-sample {usual}-epoch teacher of the 20%-symmetric setting (seed {scale.seeds[0]}) distilled "
              f"into {scale.kd_student} on the same noisy data, {scale.student_epochs} epochs, "
              f"{len(scale.kd_seeds)} seeds, equal steps. Test accuracy (%) on clean labels.", "",
              run_table(students.filter(pl.col("noise") == "kd"), "kd"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the curation study (issue 38)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="digits, CI-sized")
    parser.add_argument("--doc", type=Path, default=None, help="default: docs/results.md (none with --smoke)")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    study = Study(args.out, scale, args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    with invocation_record(args.out / "wall.jsonl", code_identity()):  # an interrupted invocation too
        run_all(study.teacher_jobs(), args.workers, train_job)
        noise = study.noise_measurements()
        ood = study.ood_measurements()
        students = pl.DataFrame(run_all(study.student_jobs(), args.workers, distill_job))
    records = [json.loads(line) for line in (args.out / "wall.jsonl").read_text().splitlines()]
    text = markdown(scale, noise, students, ood, records)
    measurements = pl.concat([noise.with_columns(part=pl.lit("label noise")),
                              ood.with_columns(part=pl.lit("ood")),
                              students.with_columns(part=pl.lit("students"))], how="diagonal_relaxed")
    measurements.write_csv(args.out / "curation.csv")
    doc = args.doc or (None if args.smoke else Path("docs/results.md"))
    if doc:
        replace_block(doc, "curation", text, heading=HEADING)  # a first block goes at the end, under HEADING
        csv = doc.parent / "results" / "curation.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        measurements.write_csv(csv)
    print(text)


if __name__ == "__main__":
    main()
