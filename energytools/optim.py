"""Optimizer and learning-rate schedule factories (timm's create_optimizer_v2 /
create_scheduler_v2, reduced to what energytools offers): the engine asks these for the
optimizer and for each step's learning rate, so a new optimizer or schedule is one entry here.

Defaults keep the CIFAR recipe's bytes: SGD over one group that decays every parameter, the
step schedule, no warm-up. AdamW (and SGD with ``decay_norm_and_bias=False``) exempts 1-d
parameters (biases, norm weights) from weight decay, as timm's ``param_groups_weight_decay``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _step_schedule(epoch: float, cfg) -> float:
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    return cfg.lr_decay ** passed


def _cosine_schedule(epoch: float, cfg) -> float:
    return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


#: name -> (epoch, train config) -> lr multiplier at that (fractional) epoch; cosine goes from
#: ``lr`` to ``min_lr``, a step schedule ignores ``min_lr``
SCHEDULES: dict[str, Callable] = {"step": _step_schedule, "cosine": _cosine_schedule}


def create_schedule(cfg) -> Callable[[float], float]:
    """``t -> learning rate`` for the train config ``cfg``, ``t`` the fractional epoch
    (``epoch + step / steps_per_epoch``; the engine updates the lr every step).

    After ``warmup_epochs`` W the schedule is ``SCHEDULES[cfg.schedule]`` at ``t`` (cosine:
    ``min_lr + (lr - min_lr) * m(t)``); before W the lr rises linearly from ``warmup_lr`` to the
    schedule's value at W. The step schedule is constant within an epoch, so with no warm-up it
    gives each step the lr the epoch had when the lr was set per epoch."""
    multiplier = SCHEDULES[cfg.schedule]
    floor = getattr(cfg, "min_lr", 0.0) if cfg.schedule == "cosine" else 0.0
    warmup, start = getattr(cfg, "warmup_epochs", 0.0), getattr(cfg, "warmup_lr", 0.0)

    def main(t: float) -> float:
        return cfg.lr * multiplier(t, cfg) if floor == 0.0 else floor + (cfg.lr - floor) * multiplier(t, cfg)

    def lr_at(t: float) -> float:
        if t < warmup:
            return start + (main(warmup) - start) * t / warmup
        return main(t)

    return lr_at


def decays_norm_and_bias(cfg) -> bool:
    """Whether weight decay reaches 1-d parameters: ``decay_norm_and_bias`` when set, else the
    optimizer's default (SGD: yes, as energytools always did; AdamW: no, as timm)."""
    chosen = getattr(cfg, "decay_norm_and_bias", None)
    return (getattr(cfg, "optimizer", "sgd") == "sgd") if chosen is None else chosen


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's ``param_groups_weight_decay``: 1-d parameters (biases, norm weights) and scalars
    without decay, the rest with ``weight_decay``; empty groups left out."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [group for group in groups if group["params"]]


def _sgd(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=getattr(cfg, "nesterov", False))


def _adamw(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


#: name -> (parameter groups, train config) -> optimizer
OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd, "adamw": _adamw}


def create_optimizer(cfg, model: torch.nn.Module, extra_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s parameters, plus ``extra_groups`` (parameter groups a
    distillation method adds, such as a learnable temperature; they keep their own settings).

    The model's parameters are one group when weight decay reaches every parameter
    (:func:`decays_norm_and_bias`), else two (:func:`weight_decay_groups`)."""
    if decays_norm_and_bias(cfg):
        groups = [{"params": list(model.parameters())}]
    else:
        groups = weight_decay_groups(model, cfg.weight_decay)
    return OPTIMIZERS[getattr(cfg, "optimizer", "sgd")]([*groups, *(extra_groups or [])], cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr`` (times the group's own ``lr_scale`` when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
