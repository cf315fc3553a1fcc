"""energytools: energy scores, HE-DA curation and Energy KD for knowledge distillation.

Two ways in: the stages (``score``, ``augment``, ``select``, ``distill``, ``train``,
``report``, ``label_issues``: files in, files out, the same keywords as the CLI's flags) and
the functional API on arrays (``energy_scores``, ``sample_scores``, ``energy_groups``,
``sample_temperatures``, ``select_indices``, ``find_label_issues``, ``label_issue_scores``,
``ood_scores``, ``ood_threshold``, ``ood_metrics``, the losses, and ``write_score_table`` to turn
logits computed anywhere into a score table the stages accept), and ``TableTemperatures`` for
Energy KD in a trainer of one's own. Both load lazily, so ``import energytools`` stays cheap.
"""
from . import cuda_env  # noqa: F401 - before any CUDA work: cuBLAS reads it once per process
from .version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    **{name: "api" for name in ("score", "augment", "select", "distill", "train", "report", "label_issues")},
    **{name: "functional" for name in ("energy_scores", "sample_scores", "energy_groups", "sample_temperatures",
                                       "select_indices", "find_label_issues", "label_issue_scores",
                                       "SIGN_CONVENTION", "ood_scores", "ood_threshold", "ood_metrics")},
    **{name: "losses" for name in ("kd_loss", "dkd_loss", "mixed_cross_entropy", "standardize_logits",
                                   "dtkd_loss")},
    "write_score_table": "score_table",
    "load_table": "table",
    "TableTemperatures": "lookup",
    "UserError": "errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'energytools' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return __all__
