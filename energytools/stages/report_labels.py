"""How the report names runs and their temperatures: a run by its path with the seed folded
away (so seeds of one configuration aggregate), and what temperatures each method used."""
from __future__ import annotations

import os
import re
from pathlib import Path

import polars as pl

from ..distillers import METHODS
from .report_figures import temperatures_text

#: a path part that only names a seed ("seed0", "s1") or a name's seed suffix ("kd-seed2")
SEED_PART = re.compile(r"(?:seed|s)[-_]?\d+", re.IGNORECASE)
SEED_SUFFIX = re.compile(r"[-_.]seed[-_]?\d+$", re.IGNORECASE)


def run_names(runs: list[Path]) -> tuple[list[str], list[str]]:
    """Each run's path relative to the runs' common folder, and the same without the seed
    ("kd/seed1" -> "kd"), which names its configuration."""
    root = Path(os.path.commonpath([run.resolve().parent for run in runs]))
    names, stems = [], []
    for run in runs:
        parts = run.resolve().relative_to(root).parts
        names.append("/".join(parts))
        kept = [SEED_SUFFIX.sub("", p) for p in parts if not SEED_PART.fullmatch(p)]
        stems.append("/".join(kept) or run.name)
    return names, stems


def run_temperatures(method: str, config: dict, summary: dict, metrics: pl.DataFrame | None = None) -> str:
    """What the run's temperatures were: per group for Energy KD, CTKD's learned T (first -> last
    epoch), DTKD's per-sample range of T_t and T_s over the epochs, the one T of kd and dkd, or a
    dash; ", standardized" when the KD terms saw z-scored logits."""
    options = config.get("method_options") or {}
    return _temperatures(method, config, summary, options, metrics) + (", standardized" if
                                                                       options.get("standardize_logits") else "")


def _temperatures(method: str, config: dict, summary: dict, options: dict, metrics: pl.DataFrame | None) -> str:
    spec = METHODS.get(method)
    plan = config.get("temperature_plan") or {}
    columns = metrics.columns if metrics is not None and metrics.height else []
    if "method_temperature" in columns:
        curve = metrics["method_temperature"]
        return f"learned {curve[0]:.3g} → {curve[-1]:.3g}"
    if "method_teacher_t_min" in columns:
        return (f"T_t {metrics['method_teacher_t_min'].min():.3g}–{metrics['method_teacher_t_max'].max():.3g}, "
                f"T_s {metrics['method_student_t_min'].min():.3g}–{metrics['method_student_t_max'].max():.3g}")
    if spec is not None and spec.per_sample_temperature:
        temps = plan.get("temperatures") or summary.get("temperatures")
        if temps:
            rule = plan.get("rule", "groups")
            return temperatures_text(temps) + ("" if rule == "groups" else f" ({rule} rule)")
    constant = options.get("kd_temperature")
    return f"{round(float(constant), 3):g} (one T)" if constant is not None else "—"
