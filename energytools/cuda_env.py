"""Settings CUDA libraries read once per process, set when energytools is imported.

cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when a process first runs a matrix multiply on a GPU;
``--deterministic`` needs ``:4096:8`` (or ``:16:8``) from that moment on. Set inside a stage it
came too late for a recipe whose earlier stage used the GPU, a notebook or a test suite, so it
is set here, before any energytools code can touch CUDA (a value in the environment wins; the
setting sizes cuBLAS's workspace at 8 x 4 MiB and costs nothing measurable otherwise).
"""
from __future__ import annotations

import os
import sys

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
#: the values under which cuBLAS is deterministic (PyTorch's reproducibility notes)
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")  # never import torch (and CUDA) just to ask
    return bool(torch is not None and torch.cuda.is_initialized())


#: whether CUDA had already started in this process when energytools set the variable: cuBLAS
#: may then have read another value (or none)
SET_AFTER_CUDA_STARTED = CUBLAS_ENV not in os.environ and _cuda_in_use()
os.environ.setdefault(CUBLAS_ENV, DETERMINISTIC_CUBLAS[0])


def cublas_deterministic_problem() -> str | None:
    """Why cuBLAS may not run deterministically in this process, or None."""
    value = os.environ.get(CUBLAS_ENV)
    if value not in DETERMINISTIC_CUBLAS:
        return f"{CUBLAS_ENV}={value!r} (deterministic: {' or '.join(DETERMINISTIC_CUBLAS)})"
    if SET_AFTER_CUDA_STARTED:
        return f"CUDA was in use before energytools was imported and set {CUBLAS_ENV}"
    return None
