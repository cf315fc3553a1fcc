"""Optimizer and learning-rate schedule factories (timm's create_optimizer_v2 /
create_scheduler_v2, reduced to what energytools offers): the engine asks these for the
optimizer and for each epoch's learning rate, so a new optimizer or schedule is one entry here.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _step_schedule(epoch: int, cfg) -> float:
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    return cfg.lr_decay ** passed


def _cosine_schedule(epoch: int, cfg) -> float:
    return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


#: name -> (epoch, train config) -> lr multiplier for that epoch
SCHEDULES: dict[str, Callable] = {"step": _step_schedule, "cosine": _cosine_schedule}


def create_schedule(cfg) -> Callable[[int], float]:
    """``epoch -> learning rate`` for the train config ``cfg`` (its ``schedule``, ``lr`` ...)."""
    multiplier = SCHEDULES[cfg.schedule]
    return lambda epoch: cfg.lr * multiplier(epoch, cfg)


def _sgd(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


#: name -> (parameter groups, train config) -> optimizer
OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd}


def create_optimizer(cfg, model: torch.nn.Module, extra_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s parameters (one group), plus ``extra_groups`` (parameter
    groups a distillation method adds, such as a learnable temperature)."""
    groups = [{"params": list(model.parameters())}, *(extra_groups or [])]
    return OPTIMIZERS[getattr(cfg, "optimizer", "sgd")](groups, cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr`` (times the group's own ``lr_scale`` when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
