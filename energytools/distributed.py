"""torch.distributed when launched by torchrun; a one-process stand-in otherwise.

Stages call :func:`context` once; with ``WORLD_SIZE`` > 1 in the environment (torchrun sets
it) it initialises the process group (nccl on cuda, gloo on cpu) and, on cuda, makes
``cuda:LOCAL_RANK`` the process's device before anything else touches a GPU. Collectives run
on the device the group's backend serves (:func:`collective_device`): nccl reduces only cuda
tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import UserError
from .io import sha256_json


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: where collectives put their tensors (cuda:LOCAL_RANK under nccl, cpu under gloo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

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
        tensor = torch.tensor(values, dtype=torch.float64).to(self.device)
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
        digest = sha256_json(obj)
        digests = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise UserError(f"ranks disagree on the {what} (rank {digests.index(digest)} differs from another); "
                            "launch every rank with the same arguments")


_CONTEXT: Context | None = None


def collective_device(local_rank: int = 0, group=None) -> torch.device:
    """The device whose tensors ``group``'s (default: the default group's) backend reduces: this
    process's cuda device when a backend serves cuda and cuda is here or cpu is not served
    (``"nccl"`` serves cuda only), else the cpu."""
    served = {pair.split(":")[0] for pair in dist.get_backend_config(group).split(",") if ":" in pair}
    if "cuda" in served and (torch.cuda.is_available() or "cpu" not in served):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def context() -> Context:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if torch.cuda.is_available():  # before any cuda tensor: this rank's GPU, not GPU 0
                torch.cuda.set_device(local_rank)
            _CONTEXT = Context(dist.get_rank(), dist.get_world_size(), local_rank, collective_device(local_rank))
        else:
            _CONTEXT = Context()
    return _CONTEXT
