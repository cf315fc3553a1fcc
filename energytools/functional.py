"""The functional API: arrays in, arrays out (cleanlab's style). Logits from any model, any
framework: NumPy arrays or torch tensors of shape (N, C) in, NumPy arrays of shape (N,) out;
options are keyword-only. The stages are built on the same functions, so a notebook and the
CLI agree sample for sample.

    import energytools as et
    energies = et.energy_scores(logits)                       # (N,) float32, lower = more confident
    groups = et.energy_groups(energies, low_frac=0.2, high_frac=0.2)   # (N,) "low" / "mid" / "high"
    temps = et.sample_temperatures(energies, temperatures=(6, 4, 2))   # (N,) float32 KD temperatures
    drop = et.select_indices(energies, ratio=0.25, mode="low")         # the easiest quarter, for pruning
    flagged = et.find_label_issues(logits, labels)                     # (N,) bool, cleanlab's confident learning
"""
from __future__ import annotations

import numpy as np
import polars as pl
import torch

from .energy import SIGN_CONVENTION, TemperatureRule, logit_statistics
from .errors import UserError, import_optional
from .ood import DEFAULT_TPR, OOD_SCORES, auroc, false_positive_rate, ood_statistics, oriented, threshold_at_tpr
from .selection import SELECT_MODES, select_samples

__all__ = ["LABEL_ISSUE_FILTERS", "LABEL_QUALITY_METHODS", "SIGN_CONVENTION", "energy_groups", "energy_scores",
           "find_label_issues", "label_issue_scores", "ood_metrics", "ood_scores", "ood_threshold", "sample_scores",
           "sample_temperatures", "select_indices"]

#: cleanlab.rank.get_label_quality_scores' methods (lower score = more likely mislabeled)
LABEL_QUALITY_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
#: cleanlab.filter.find_label_issues' rules (``filter_by``); prune_by_noise_rate is its default
LABEL_ISSUE_FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
                       "low_normalized_margin", "low_self_confidence")


def as_logits(logits, where: str = "logits", sample_ids: np.ndarray | None = None) -> torch.Tensor:
    """``logits`` (NumPy or torch, (N, C), floating point, finite) as a float32 CPU tensor; a
    bad array is one UserError naming ``where`` and the first bad row (its sample id when given)."""
    if isinstance(logits, torch.Tensor):
        tensor = logits.detach()
    else:
        array = _numeric(logits, where)
        # a reversed view has negative strides; a read-only array (Arrow's) would be shared with torch
        tensor = torch.from_numpy(np.require(array, requirements="CW"))
    if tensor.ndim != 2 or tensor.shape[1] < 2:
        raise UserError(f"{where} must have shape (N, C) with C >= 2 classes, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise UserError(f"{where} must be floating point, got {tensor.dtype}")
    _check_finite(tensor.cpu(), where, sample_ids, "NaN or Inf")
    tensor = tensor.float().cpu()
    _check_finite(tensor, where, sample_ids, "values beyond float32's range")
    return tensor


def _check_finite(tensor: torch.Tensor, where: str, sample_ids, what: str) -> None:
    finite = torch.isfinite(tensor)
    if not finite.all():
        row = int((~finite.reshape(len(tensor), -1).all(dim=1)).nonzero()[0, 0])
        at = f"sample_id {sample_ids[row]}" if sample_ids is not None and row < len(sample_ids) else f"row {row}"
        raise UserError(f"{where} hold {what}, first at {at}")


def _numeric(values, where: str) -> np.ndarray:
    """``values`` as a numeric NumPy array, or one UserError naming ``where``."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):  # ragged nested lists
        raise UserError(f"{where} must be an array of numbers") from None
    if array.dtype.kind not in "biuf":
        raise UserError(f"{where} must be an array of numbers, got {array.dtype} ({type(values).__name__})")
    return array


def _one_dimensional(values, where: str) -> np.ndarray:
    """``values`` (NumPy, torch or a list) as a numeric (N,) NumPy array."""
    array = _numeric(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values, where)
    if array.ndim != 1:
        raise UserError(f"{where} must be one-dimensional, got shape {array.shape}")
    return array


def _vector(values, where: str) -> np.ndarray:
    """A finite (N,) float64 array: energies, scores."""
    array = _one_dimensional(values, where).astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise UserError(f"{where} hold NaN or Inf, first at position {int(np.flatnonzero(~np.isfinite(array))[0])}")
    return array


def as_indices(values, where: str) -> np.ndarray:
    """A (N,) int64 array of whole numbers (labels, sample ids): 2.0 passes, 1.7 and NaN do not."""
    array = _one_dimensional(values, where)
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise UserError(f"{where} must be whole numbers")
    return array.astype(np.int64, copy=False)


def _number(value, where: str) -> float:
    """``value`` as a float, if it is a number (not a bool, a string or None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise UserError(f"{where} must be a number, got {value!r}")
    return float(value)


def check_energy_temperature(value) -> float:
    """The energy temperature T_E as a float, if it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < float("inf"):
        raise UserError(f"energy_temperature must be a positive finite number, got {value!r}")
    return float(value)


def energy_scores(logits, *, energy_temperature: float = 4.0) -> np.ndarray:
    """Per-sample energy ``E = -T_E * logsumexp(z / T_E)`` of ``logits`` (N, C): (N,) float32.

    Lower (more negative) energy means larger logits: a more confident model. ``T_E = 4`` is
    the reference code's; energy-OOD code uses 1. Computed in float32.
    """
    return sample_scores(logits, energy_temperature=energy_temperature)["energy"]


def class_labels(labels, logits: torch.Tensor, where: str = "logits") -> np.ndarray:
    """``labels`` as (N,) int64 class indices, one per row of ``logits`` (N, C)."""
    label_array = as_indices(labels, "labels")
    if len(label_array) != logits.shape[0]:
        raise UserError(f"labels has {len(label_array)} entries for {logits.shape[0]} rows of {where}")
    if len(label_array) and not (0 <= label_array.min() and label_array.max() < logits.shape[1]):
        raise UserError(f"labels must be class indices in [0, {logits.shape[1]})")
    return label_array


def sample_scores(logits, labels=None, *, energy_temperature: float = 4.0) -> dict[str, np.ndarray]:
    """Every per-sample score of the score table, from ``logits`` (N, C) and optional ``labels`` (N,).

    Returns (N,) arrays: ``energy``, ``confidence`` (max softmax), ``margin`` (top-1 minus top-2
    softmax), ``entropy`` (nats) and ``pred``; with labels also ``true_prob`` (softmax of the
    label), ``el2n`` (``||softmax - onehot(label)||``, Paul et al. 2021) and ``correct``.
    """
    energy_temperature = check_energy_temperature(energy_temperature)
    tensor = as_logits(logits)
    label_tensor = None
    if labels is not None:
        label_tensor = torch.from_numpy(class_labels(labels, tensor))
    stats = logit_statistics(tensor, label_tensor if label_tensor is not None else tensor.argmax(1), energy_temperature)
    if label_tensor is None:
        stats = {k: v for k, v in stats.items() if k not in ("true_prob", "el2n", "correct")}
    return {name: value.numpy() for name, value in stats.items()}


def _rule(temperatures, low_frac, high_frac, rule) -> TemperatureRule:
    if not isinstance(temperatures, str):  # "6,4,2" is parsed by the rule, as on the command line
        try:
            temperatures = tuple(temperatures)
        except TypeError:
            raise UserError(f"temperatures must be three numbers (low, mid, high), got {temperatures!r}") from None
    return TemperatureRule(temperatures, _number(low_frac, "low_frac"), _number(high_frac, "high_frac"), rule)


def _fitted(energies, low_frac, high_frac, reference, sample_ids, temperatures=(6.0, 4.0, 2.0), rule="groups"):
    energies = _vector(energies, "energies")
    ids = np.arange(len(energies)) if sample_ids is None else as_indices(sample_ids, "sample_ids")
    if len(ids) != len(energies):
        raise UserError(f"sample_ids has {len(ids)} entries for {len(energies)} energies")
    if len(np.unique(ids)) != len(ids):
        raise UserError("sample_ids must be unique (they break ties between equal energies)")
    fitted_rule = _rule(temperatures, low_frac, high_frac, rule)
    if reference is None:
        groups = fitted_rule.fit(energies, ids)
    else:
        ref = _vector(reference, "reference")
        groups = fitted_rule.fit(ref, np.arange(len(ref)))
    return groups.assign(energies, ids)


def energy_groups(energies, *, low_frac: float = 0.2, high_frac: float = 0.2, reference=None,
                  sample_ids=None) -> np.ndarray:
    """Each sample's energy group, ``"low"``, ``"mid"`` or ``"high"``: (N,) array of str.

    ``low`` is the lowest ``floor(low_frac * M)`` and ``high`` the highest ``floor(high_frac * M)``
    of a reference set of M energies (``reference``; default: ``energies`` themselves), ranked by
    (energy, sample id) so ties split deterministically (the score table's rule). ``sample_ids``
    (N,) break ties among ``energies``; default: their positions.
    """
    return _fitted(energies, low_frac, high_frac, reference, sample_ids)[0].astype(str)


def sample_temperatures(energies, *, temperatures=(6.0, 4.0, 2.0), low_frac: float = 0.2, high_frac: float = 0.2,
                        rule: str = "groups", reference=None, sample_ids=None) -> np.ndarray:
    """Each sample's KD temperature from its energy: (N,) float32.

    ``temperatures`` are the low, mid and high groups' (the paper's text: 6, 4, 2; the
    reference code: 2, 4, 6); ``rule="rank"`` interpolates between the low and high values by
    energy rank instead. Groups as :func:`energy_groups`.
    """
    return _fitted(energies, low_frac, high_frac, reference, sample_ids, temperatures, rule)[1]


def select_indices(scores, *, ratio: float, mode: str = "high", labels=None, per_class: bool = False,
                   seed: int = 0) -> np.ndarray:
    """Positions (sorted, int64) of the selected ``floor(ratio * N)`` samples of ``scores`` (N,).

    ``mode="high"`` takes the highest scores (for energy: the hardest samples, HE-DA's choice),
    ``"low"`` the lowest (for energy: the easiest, what pruning drops), ``"random"`` a seeded
    random subset of the same size (a control). With ``per_class`` (needs ``labels``) the
    fraction is taken within each class. Ties are broken by position.
    """
    values = _vector(scores, "scores")
    ratio = _number(ratio, "ratio")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative whole number, got {seed!r}")
    if mode not in SELECT_MODES:
        raise UserError(f"unknown selection mode {mode!r}; choose from {', '.join(SELECT_MODES)}")
    if per_class and labels is None:
        raise UserError("per_class selection needs labels")
    frame = {"sample_id": np.arange(len(values), dtype=np.int64), "energy": values}
    if labels is not None:
        frame["label"] = as_indices(labels, "labels")
        if len(frame["label"]) != len(values):
            raise UserError(f"labels has {len(frame['label'])} entries for {len(values)} scores")
        if (frame["label"] < 0).any():  # -1, an "unlabelled" marker, would be a class of its own
            at = int(np.flatnonzero(frame["label"] < 0)[0])
            raise UserError(f"labels must be class indices (>= 0), got {frame['label'][at]} at position {at}")
    else:
        frame["label"] = np.zeros(len(values), dtype=np.int64)
    chosen = select_samples(pl.DataFrame(frame), ratio, mode, per_class, seed, by="energy")
    return chosen["sample_id"].to_numpy()


def _pred_probs(values, labels, probabilities: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(pred_probs, labels)`` as cleanlab takes them: (N, C) float32 rows that sum to 1 (the
    softmax of logits at T = 1, or ``values`` themselves when ``probabilities``) and (N,) int64."""
    where = "pred_probs" if probabilities else "logits"
    tensor = as_logits(values, where)
    label_array = class_labels(labels, tensor, where)
    if not probabilities:
        return torch.softmax(tensor, dim=1).numpy(), label_array
    if (tensor < 0).any() or not torch.allclose(tensor.sum(dim=1), torch.ones(len(tensor)), atol=1e-3):
        raise UserError("pred_probs must be probabilities: non-negative rows that sum to 1 (pass logits with "
                        "probabilities=False)")
    return tensor.numpy(), label_array


def _check_choice(value, names: tuple[str, ...], where: str) -> None:
    if value not in names:
        raise UserError(f"unknown {where} {value!r}; choose from {', '.join(names)}")


def find_label_issues(logits, labels, *, filter_by: str = "prune_by_noise_rate",
                      probabilities: bool = False) -> np.ndarray:
    """Which given ``labels`` (N,) look wrong by the predictions ``logits`` (N, C): (N,) bool.

    Thin over ``cleanlab.filter.find_label_issues`` (confident learning; ``filter_by`` picks its
    rule, :data:`LABEL_ISSUE_FILTERS`), fed the softmax of ``logits`` at T = 1 (or ``logits``
    as they are with ``probabilities=True``). The predictions should come from a model that did
    not train on these labels (out-of-fold): a model that fitted a wrong label predicts it.
    Needs cleanlab (``pip install 'energytools[cleanlab]'``).
    """
    return label_issue_scores(logits, labels, filter_by=filter_by, probabilities=probabilities)["is_label_issue"]


def label_issue_scores(logits, labels, *, method: str = "self_confidence", filter_by: str = "prune_by_noise_rate",
                       probabilities: bool = False) -> dict[str, np.ndarray]:
    """Every per-sample column of a label-issues file, from ``logits`` (N, C) and the given ``labels`` (N,).

    Returns (N,) arrays: ``label_quality`` (float32, ``cleanlab.rank.get_label_quality_scores``
    with ``method``, :data:`LABEL_QUALITY_METHODS`; in [0, 1], lower = more likely mislabeled),
    ``suggested_label`` (int64, the argmax of the predictions) and ``is_label_issue`` (bool, as
    :func:`find_label_issues`). Needs cleanlab.
    """
    _check_choice(method, LABEL_QUALITY_METHODS, "label quality method")
    _check_choice(filter_by, LABEL_ISSUE_FILTERS, "filter_by")
    cleanlab_filter = import_optional("cleanlab.filter", "cleanlab")
    cleanlab_rank = import_optional("cleanlab.rank", "cleanlab")
    pred_probs, label_array = _pred_probs(logits, labels, probabilities)
    # n_jobs=1: no worker processes forked from a process that holds torch; the work is a few sorts
    flagged = cleanlab_filter.find_label_issues(label_array, pred_probs, filter_by=filter_by, n_jobs=1)
    quality = cleanlab_rank.get_label_quality_scores(label_array, pred_probs, method=method)
    return {"label_quality": np.asarray(quality, dtype=np.float32),
            "suggested_label": pred_probs.argmax(axis=1).astype(np.int64),
            "is_label_issue": np.asarray(flagged, dtype=bool)}


def ood_scores(logits, *, score: str = "energy") -> np.ndarray:
    """Each sample's out-of-distribution score from ``logits`` (N, C): (N,) float32, oriented
    **higher = more in-distribution**. ``score`` is ``energy`` (``-E(x)`` at T = 1, i.e.
    ``logsumexp(z)``, Liu et al. 2020: note the sign and T differ from :func:`energy_scores`),
    ``msp`` (the max softmax probability, Hendrycks & Gimpel 2017) or ``max-logit``."""
    if score not in OOD_SCORES:
        raise UserError(f"unknown OOD score {score!r}; choose from {', '.join(OOD_SCORES)}")
    return oriented(ood_statistics(as_logits(logits)), score)


def _tpr(value) -> float:
    tpr = _number(value, "tpr")
    if not 0 < tpr < 1:
        raise UserError(f"tpr must be in (0, 1), got {value!r}")
    return tpr


def _scores(values, where: str) -> np.ndarray:
    array = _vector(values, where)
    if not len(array):
        raise UserError(f"{where} is empty")
    return array


def ood_threshold(in_scores, *, tpr: float = DEFAULT_TPR) -> float:
    """The threshold that keeps a fraction ``tpr`` of in-distribution samples: the largest ``t``
    with ``mean(in_scores >= t) >= tpr`` (the ``ceil(tpr * N)``-th largest score). Scores are
    oriented higher = more in-distribution (:func:`ood_scores`); a sample below ``t`` is flagged
    out of distribution. Take ``in_scores`` from data the model did not train on (a validation
    split), never from the OOD data."""
    return threshold_at_tpr(_scores(in_scores, "in_scores"), _tpr(tpr))


def ood_metrics(in_scores, out_scores, *, tpr: float = DEFAULT_TPR) -> dict[str, float]:
    """How well a score separates in-distribution (``in_scores``, the positive class) from
    out-of-distribution samples (``out_scores``), both oriented higher = more in-distribution:

    ``auroc`` (scikit-learn's ``roc_auc_score`` with in-distribution labelled 1), ``fpr`` (the
    share of OOD samples at or above ``threshold``, the :func:`ood_threshold` of ``in_scores``:
    FPR at 95% TPR for the default ``tpr``; scikit-learn's ``roc_curve`` FPR at the first point
    whose TPR reaches ``tpr``), ``threshold`` and ``tpr`` (the share of in-distribution samples
    it keeps)."""
    in_scores, out_scores = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    threshold = threshold_at_tpr(in_scores, _tpr(tpr))
    return {"auroc": auroc(in_scores, out_scores), "fpr": false_positive_rate(out_scores, threshold),
            "threshold": threshold, "tpr": float(np.mean(in_scores >= threshold))}
