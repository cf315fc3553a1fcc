"""Where a distill run's per-sample temperatures, and the high-energy mask online HE-DA mixes
within, come from (``--temperature-source``): a registry of small classes, one per source.

- ``table``: each sample's row of the score table (the clean image's energy), by sample_id;
- ``views``: the energy of the stored view the sample trains on this epoch, against thresholds
  fitted over all stored views (as the reference code's thresholds are percentiles over
  augmented views); needs a table scored with ``--views K``;
- ``online``: the teacher's energy on the batch's augmented view, as the reference code does;
  needs the teacher's logits on every batch.

Each applies the run's :class:`TemperaturePlan` (the table's rule, or one re-derived from the
table's energies). A new source is one class here with :func:`register_source`. Sources work on
duck-typed lookups and batches (energytools.lookup.SampleLookup, energytools.engine.Batch), so
this module sits below both.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl
import torch

from .energy import EnergyGroups, TemperatureRule, energy
from .errors import UserError
from .transfer import to_device

__all__ = ["TEMPERATURE_SOURCES", "TemperaturePlan", "TemperatureSource", "assign_view_groups",
           "fit_view_groups", "plan_temperatures", "register_source", "temperature_source", "view_keys"]


@dataclass(frozen=True)
class TemperaturePlan:
    """The run's temperature rule: the table's, or re-derived from the table's energies."""

    groups: EnergyGroups
    rederived: bool
    energy_temperature: float

    def temperatures(self, rows: pl.DataFrame) -> np.ndarray:
        """Per-sample T of table or shard rows: their own column, or by the re-derived rule."""
        if not self.rederived:
            return rows["temperature"].to_numpy()
        return self.groups.assign(rows["energy"].to_numpy(), rows["sample_id"].to_numpy())[1]

    def high(self, rows: pl.DataFrame) -> np.ndarray:
        """Whether each table or shard row is in the high-energy group (by the same rule)."""
        if not self.rederived:
            return (rows["energy_group"] == "high").to_numpy()
        return self.groups.assign(rows["energy"].to_numpy(), rows["sample_id"].to_numpy())[0] == "high"

    def to_dict(self) -> dict:
        return {**self.groups.rule.to_dict(), "thresholds": self.groups.thresholds,
                "rederived_from_table_energies": self.rederived, "energy_temperature": self.energy_temperature}


def plan_temperatures(table: pl.DataFrame, meta, *, temperatures=None, low_frac=None, high_frac=None,
                      rule=None) -> TemperaturePlan:
    """The table's rule (``meta.rule``) with the options given replaced, fitted on the table."""
    given = {"temperatures": temperatures, "low_frac": low_frac, "high_frac": high_frac, "rule": rule}
    new_rule = dataclasses.replace(meta.rule, **{k: v for k, v in given.items() if v is not None})
    return TemperaturePlan(meta.fit_groups(table, new_rule), new_rule != meta.rule, meta.energy_temperature)


# --- per-view groups -------------------------------------------------------------------------

def view_keys(sample_ids: np.ndarray, count: int) -> np.ndarray:
    """One int64 key per (sample, view), ordered by sample_id then view: the tie-break of view groups."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    if len(sample_ids) and (sample_ids.min() < 0 or sample_ids.max() >= np.iinfo(np.int64).max // max(count, 1)):
        raise UserError("sample ids too large to key their views")
    return (sample_ids[:, None] * count + np.arange(count)).reshape(-1)


def fit_view_groups(rule: TemperatureRule, energies: np.ndarray, sample_ids: np.ndarray):
    """The rule fitted over every view's energy (keys: energy, then sample_id, then view), as the
    reference code's thresholds are percentiles over augmented views; each view's temperature,
    (N, K) float32; and whether each view is in the high-energy group, (N, K) bool."""
    count = energies.shape[1]
    fitted: EnergyGroups = rule.fit(energies.reshape(-1).astype(np.float64), view_keys(sample_ids, count))
    return (fitted, *assign_view_groups(fitted, energies, view_keys(sample_ids, count)))


def assign_view_groups(fitted: EnergyGroups, energies: np.ndarray, keys: np.ndarray):
    """``(temperature, high)`` per view, (N, K) each, by groups fitted elsewhere. ``keys`` (one
    per view, flat) only break ties with the fitted reference: a shard's views pass their
    sample_id repeated, which lies above every dataset view's key."""
    groups, temperatures = fitted.assign(energies.reshape(-1).astype(np.float64), keys)
    return temperatures.reshape(energies.shape).astype(np.float32), (groups == "high").reshape(energies.shape)


# --- the sources -----------------------------------------------------------------------------

class TemperatureSource:
    """Per-sample temperatures and high-energy flags for each batch. ``columns`` and
    ``shard_columns`` add per-sample columns to the run's lookup; ``values`` reads a batch's."""

    name = ""
    #: the step must supply the teacher's logits on the batch (cached or online)
    needs_teacher_logits = False
    #: the run must replay the views score stored (a table scored with --views K)
    needs_views = False

    def __init__(self, plan: TemperaturePlan):
        self.plan = plan

    def columns(self, table: pl.DataFrame, view_energy: np.ndarray | None) -> dict[str, np.ndarray]:
        """Per-sample columns of the table's rows for the lookup."""
        return {"temperature": self.plan.temperatures(table), "high": self.plan.high(table)}

    def shard_columns(self, rows: pl.DataFrame, view_energy: np.ndarray | None, count: int) -> dict[str, np.ndarray]:
        """The same for HE-DA shard rows (``count`` stored views each)."""
        return {"temperature": self.plan.temperatures(rows), "high": self.plan.high(rows)}

    def values(self, batch, positions: torch.Tensor, teacher_logits: torch.Tensor | None,
               lookup) -> tuple[torch.Tensor, torch.Tensor]:
        """``(temperature, high)`` of the batch's samples, on the batch's device."""
        device = batch.images.device
        return lookup.get("temperature", positions, device), lookup.get("high", positions, device)

    def to_dict(self) -> dict:
        return {"source": self.name}


#: --temperature-source name -> its class
TEMPERATURE_SOURCES: dict[str, type[TemperatureSource]] = {}


def register_source(name: str) -> Callable:
    def decorator(cls):
        cls.name = name
        TEMPERATURE_SOURCES[name] = cls
        return cls
    return decorator


def temperature_source(name: str, plan: TemperaturePlan) -> TemperatureSource:
    if name not in TEMPERATURE_SOURCES:
        raise UserError(f"temperature_source must be one of {', '.join(TEMPERATURE_SOURCES)}, got {name!r}")
    return TEMPERATURE_SOURCES[name](plan)


@register_source("table")
class TableSource(TemperatureSource):
    """Each sample's score-table row (the clean image's energy), by sample_id."""


@register_source("views")
class ViewsSource(TemperatureSource):
    """The stored view's own energy, against thresholds fitted over every stored view."""

    needs_views = True

    def __init__(self, plan: TemperaturePlan):
        super().__init__(plan)
        self.view_groups: EnergyGroups | None = None

    def columns(self, table, view_energy):
        if view_energy is None:  # the run reads no groups per step (kd without --he-da): no views replayed
            return super().columns(table, view_energy)
        self.view_groups, temperature, high = fit_view_groups(self.plan.groups.rule, view_energy,
                                                              table["sample_id"].to_numpy())
        return {**super().columns(table, view_energy), "view_temperature": temperature, "view_high": high}

    def shard_columns(self, rows, view_energy, count):
        if view_energy is None or self.view_groups is None:
            return super().shard_columns(rows, view_energy, count)
        keys = np.repeat(rows["sample_id"].to_numpy(), count)
        temperature, high = assign_view_groups(self.view_groups, view_energy, keys)
        return {**super().shard_columns(rows, view_energy, count), "view_temperature": temperature,
                "view_high": high}

    def values(self, batch, positions, teacher_logits, lookup):
        device = batch.images.device
        return (lookup.view("view_temperature", positions, batch.views, device),
                lookup.view("view_high", positions, batch.views, device))

    def to_dict(self):
        return {**super().to_dict(), "view_thresholds": self.view_groups.thresholds if self.view_groups else None}


@register_source("online")
class OnlineSource(TemperatureSource):
    """The teacher's energy on the batch's augmented view, against the table's thresholds (the
    reference code's rule). Grouping is on the host, once per batch."""

    needs_teacher_logits = True

    def values(self, batch, positions, teacher_logits, lookup):
        energies = energy(teacher_logits.float(), self.plan.energy_temperature).cpu().numpy()
        groups, temperatures = self.plan.groups.assign(energies, batch.sample_ids.numpy())
        device = teacher_logits.device
        return to_device(torch.from_numpy(temperatures), device), to_device(torch.from_numpy(groups == "high"), device)
