"""Distillation methods, one per file, by name (mdistiller's structure).

A distiller wraps the student: ``forward_train(images, info) -> (student logits, {loss name:
value})``. A method registers what it needs (teacher logits, per-sample temperatures) and
declares its options' defaults; the teacher itself lives in the stage and stays in eval mode.
"""
from .base import METHODS, Distiller, MethodSpec, SampleInfo, method_spec, register_method
from . import ce, ctkd, dkd, dtkd, kd, standardized  # noqa: F401,E402  (fill the registry)

__all__ = ["METHODS", "Distiller", "MethodSpec", "SampleInfo", "method_spec", "register_method"]
