"""Distillation methods, one per file, by name (mdistiller's structure).

A distiller wraps the student (and teacher): ``forward_train(batch, info) -> (student logits,
{loss name: value})``. The teacher always stays in eval mode.
"""
from .base import METHODS, Distiller, SampleInfo, register_method
from . import ce, dkd, kd  # noqa: F401,E402  (fill the registry)

__all__ = ["METHODS", "Distiller", "SampleInfo", "register_method"]
