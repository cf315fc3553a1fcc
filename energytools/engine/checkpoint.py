"""The position inside an epoch, saved in last.pt so a stopped run resumes mid-epoch.

A run stopped by a scheduler (:mod:`energytools.preemption`) or checkpointed every
``--checkpoint-every-steps`` steps writes last.pt with the usual state (weights, optimizer,
GradScaler, the distiller's extra state, the finished epochs' metrics) plus ``position``:
the epoch and the number of optimizer steps done in it, the loss sums and sample count so
far, and every random generator's state (the training loader's, torch's global ones, and
those of ``stateful`` objects such as online HE-DA). The epoch's sample order is a function
of (seed, epoch, rank), so a resumed run re-draws it, skips the batches already trained on
without loading them (:meth:`energytools.engine.loaders.TrainLoader.resume_at`), restores the
generators and goes on: on the CPU it ends with the weights of an uninterrupted run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..console import console
from ..distributed import context
from ..errors import UserError
from ..preemption import RESUME_RUN, Stopped, stop_requested


@dataclass
class Position:
    """Where a run stands inside ``epoch`` (0-based): ``step`` optimizer steps done."""

    epoch: int
    step: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0
    rngs: dict = field(default_factory=dict)

    def to_state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
                "seen": self.seen, "rngs": self.rngs}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Position:
        return cls(int(state["epoch"]), int(state["step"]), {k: v.to(device) for k, v in state["sums"].items()},
                   int(state["seen"]), state.get("rngs", {}))


def capture_rngs(loader_generator: torch.Generator, stateful: dict, device: torch.device | None = None) -> dict:
    """Every generator a training step of this process may draw from, as tensors and plain values
    (the training device's cuda generator, not every GPU's: under torchrun each rank has its own)."""
    rngs = {"loader": loader_generator.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        rngs["cuda_device"] = torch.cuda.get_rng_state(device)
    rngs["objects"] = {name: obj.state_dict() for name, obj in stateful.items()}
    return rngs


def every_rank_rngs(rngs: dict) -> dict:
    """Each rank's :func:`capture_rngs`, gathered to rank 0 in rank order (what last.pt keeps):
    every rank draws its own flips, crops and mixing partners, so a resumed rank must get its own
    generators back, not rank 0's."""
    ctx = context()
    return {"ranks": ctx.gather(rngs, "saving every rank's random state")}


def own_rngs(rngs: dict) -> dict:
    """This rank's generator states out of a position's ``rngs``; a checkpoint written by another
    number of ranks cannot resume mid-epoch (each rank's share of the epoch differs)."""
    if "ranks" not in rngs:  # written before per-rank states: one process
        return rngs
    world = context().world
    if len(rngs["ranks"]) != world:
        raise UserError(f"--resume: last.pt stopped inside an epoch with {len(rngs['ranks'])} process(es); resume "
                        f"it with as many (torchrun --nproc-per-node {len(rngs['ranks'])}), not {world}")
    return rngs["ranks"][context().rank]


def restore_rngs(rngs: dict, loader_generator: torch.Generator, stateful: dict,
                 device: torch.device | None = None) -> None:
    rngs = own_rngs(rngs)
    loader_generator.set_state(rngs["loader"])
    torch.set_rng_state(rngs["torch"])
    if "cuda_device" in rngs and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rngs["cuda_device"], device)
    elif "cuda" in rngs and torch.cuda.is_available():  # a checkpoint from before: every GPU's
        torch.cuda.set_rng_state_all(rngs["cuda"])
    for name, obj in stateful.items():
        if name in rngs.get("objects", {}):
            obj.load_state_dict(rngs["objects"][name])


#: under torchrun the ranks agree on a stop request (a host-side all-reduce, a rendezvous of
#: every rank) after every Nth optimizer step and the epoch's last, not after each: a step's
#: host work then never waits for the slowest rank, and a stop comes at most N steps later
STOP_AGREEMENT_EVERY = 10


class StepBoundary:
    """What happens after each optimizer step: a periodic mid-epoch checkpoint every
    ``every`` optimizer steps (0: never; with ``accumulate`` N an optimizer step is N batches)
    and, when a stop signal came to any rank, a last one, then
    :class:`~energytools.preemption.Stopped` (under torchrun at the next agreement step,
    :data:`STOP_AGREEMENT_EVERY`). ``save(position)`` writes last.pt (rank 0)."""

    def __init__(self, every: int, total_steps: int, save, loader_generator: torch.Generator, stateful: dict,
                 out_dir, accumulate: int = 1, device: torch.device | None = None):
        self.every, self.total, self.save, self.accumulate = every, total_steps, save, accumulate
        self.generator, self.stateful, self.out_dir, self.device = loader_generator, stateful, out_dir, device

    def __call__(self, epoch: int, step: int, sums: dict, seen: int) -> None:
        """After the optimizer step that ``step`` (1-based batch of the epoch) ended."""
        ctx = context()
        optimizer_step, last = -(-step // self.accumulate), step >= self.total
        if ctx.distributed and optimizer_step % STOP_AGREEMENT_EVERY and not last:
            signum = None  # a stop request waits for the next agreement step (the flag stays set)
        else:
            signum = ctx.agree_stop(stop_requested())
        if signum is None and not (self.every and optimizer_step % self.every == 0 and not last):
            return
        rngs = capture_rngs(self.generator, self.stateful, self.device)
        position = Position(epoch, step, sums, seen, every_rank_rngs(rngs) if ctx.distributed else rngs)
        self.save(position)
        ctx.barrier("writing the mid-epoch checkpoint")
        if signum is not None:
            if ctx.is_main:
                console.print(f"stopping at epoch {epoch + 1}, step {step}/{self.total}: {self.out_dir}/last.pt "
                              "holds the position")
            raise Stopped(signum, f"epoch {epoch + 1} step {step}/{self.total} saved in {self.out_dir / 'last.pt'}",
                          RESUME_RUN)
