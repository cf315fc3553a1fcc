"""torch.distributed when launched by torchrun; a one-process stand-in otherwise.

Stages call :func:`context` once; with ``WORLD_SIZE`` > 1 in the environment (torchrun sets
it) it initialises the process group (nccl on cuda, gloo on cpu).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_mean_grads(self, params) -> None:
        """Average the gradients of ``params`` over the ranks (parameters DDP does not hold)."""
        if not self.distributed:
            return
        for param in params:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.world

    def check_same(self, obj, what: str) -> None:
        """Every rank must agree on ``obj`` (a config); otherwise every rank stops with one line."""
        if not self.distributed:
            return
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
        digests = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise UserError(f"ranks disagree on the {what} (rank {digests.index(digest)} differs from another); "
                            "launch every rank with the same arguments")


_CONTEXT: Context | None = None


def context() -> Context:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            _CONTEXT = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
            if torch.cuda.is_available():
                torch.cuda.set_device(_CONTEXT.local_rank)
        else:
            _CONTEXT = Context()
    return _CONTEXT
