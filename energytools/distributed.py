"""torch.distributed when launched by torchrun; a one-process stand-in otherwise.

Stages call :func:`context` once; with ``WORLD_SIZE`` > 1 in the environment (torchrun sets
it) it initialises the process group (nccl on cuda, gloo on cpu) and, on cuda, makes
``cuda:LOCAL_RANK`` the process's device before anything else touches a GPU. Collectives run
on the device the group's backend serves (:func:`collective_device`): nccl reduces only cuda
tensors.

A rank that dies must not leave the others waiting in a collective for torch's default 30
minutes: the process group's timeout is ``ENERGYTOOLS_COLLECTIVE_TIMEOUT`` seconds (the CLI's
``--collective-timeout``, default :data:`DEFAULT_TIMEOUT_S`), and a collective that fails
raises :class:`RankLost`, one line naming this rank and what it was doing.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import UserError
from .io import sha256_json

#: seconds a collective waits for the other ranks before it fails (torch's own default: 1800)
DEFAULT_TIMEOUT_S = 600
TIMEOUT_ENV = "ENERGYTOOLS_COLLECTIVE_TIMEOUT"


class RankLost(UserError):
    """A collective failed: another rank died, was killed or stopped answering."""


def collective_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV} (--collective-timeout) must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise UserError(f"{TIMEOUT_ENV} (--collective-timeout) must be positive, got {text!r}")
    return value


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: where collectives put their tensors (cuda:LOCAL_RANK under nccl, cpu under gloo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: a gloo group for the small host-side agreements (stop requests) when the default group is nccl
    host_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.distributed:
            with self.collective(what):
                dist.barrier()

    def collective(self, what: str):
        """A block whose failing collective (a dead peer, the timeout) becomes :class:`RankLost`."""
        return _Collective(self, what)

    def agree_stop(self, signum: int | None) -> int | None:
        """Whether any rank has been asked to stop (the largest signal number any rank got), so
        that every rank stops after the same step. One tiny host-side all-reduce."""
        if not self.distributed:
            return signum
        flag = torch.tensor([signum or 0], dtype=torch.int64)
        with self.collective("agreeing on a stop request"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(flag) or None

    def all_sum(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.SUM, "summing the epoch's losses")

    def all_max(self, values: list[float]) -> list[float]:
        """Each value's largest over the ranks (for a minimum, pass the negated value)."""
        return self._all_reduce(values, dist.ReduceOp.MAX, "taking the epoch's extremes")

    def _all_reduce(self, values: list[float], op, what: str) -> list[float]:
        """A few host floats reduced over the ranks (float64, on the backend's device)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64).to(self.device)
        with self.collective(what):
            dist.all_reduce(tensor, op=op)
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
        with self.collective(f"comparing the {what}"):
            dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise UserError(f"ranks disagree on the {what} (rank {digests.index(digest)} differs from another); "
                            "launch every rank with the same arguments")


class _Collective:
    def __init__(self, ctx: Context, what: str):
        self.ctx, self.what = ctx, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _tb):
        if kind is not None and issubclass(kind, (RuntimeError, dist.DistBackendError)) and not isinstance(exc, UserError):
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else kind.__name__
            raise RankLost(f"rank {self.ctx.rank} of {self.ctx.world}: a collective failed while {self.what}: "
                           f"{_lost_ranks(self.ctx)} ({first}); re-run the same command to resume (train and "
                           "distill: with --resume)") from None
        return False


#: where each rank records (host, pid) in the job's store, so that a survivor can name a dead rank
_WHO = "energytools/rank/{}"


def _record_self(rank: int) -> None:
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_WHO.format(rank), f"{socket.gethostname()} {os.getpid()}")
    except Exception:  # noqa: BLE001 - naming a dead rank is a courtesy, never a reason to fail
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a killed one stays a zombie until torchrun reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _lost_ranks(ctx: Context) -> str:
    """Which ranks are gone, as far as this machine can tell: those on this host whose process
    no longer exists (other hosts' ranks cannot be checked from here)."""
    host, local, elsewhere, dead = socket.gethostname(), {}, [], []
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        for rank in range(ctx.world):
            if rank != ctx.rank:
                their_host, pid = store.get(_WHO.format(rank)).decode().split()
                if their_host == host:
                    local[rank] = int(pid)
                else:
                    elsewhere.append(rank)
    except Exception:  # noqa: BLE001 - the store itself may be gone with rank 0
        pass
    for _ in range(30):  # a killed peer's sockets close while it is still exiting: give it 3 s to be gone
        dead = [rank for rank, pid in local.items() if not _alive(pid)]
        if dead or not local:
            break
        time.sleep(0.1)
    if dead:
        return f"rank {', '.join(map(str, dead))} died or was killed (see torchrun's report for its exit code)"
    timeout = f"{collective_timeout():g}s"
    if elsewhere:
        return (f"a rank on another host (one of {', '.join(map(str, elsewhere))}) died or did not answer within "
                f"{timeout}")
    return f"another rank died, was killed or did not answer within {timeout}"


_CONTEXT: Context | None = None


def collective_device(local_rank: int = 0, group=None) -> torch.device:
    """The device whose tensors ``group``'s (default: the default group's) backend reduces: this
    process's cuda device when a backend serves cuda and cuda is here or cpu is not served
    (``"nccl"`` serves cuda only), else the cpu."""
    served = {pair.split(":")[0] for pair in dist.get_backend_config(group).split(",") if ":" in pair}
    if "cuda" in served and (torch.cuda.is_available() or "cpu" not in served):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def reset() -> None:
    """Forget this process's context: the next :func:`context` reads the environment again (a
    process that runs jobs of different shapes in turn, such as a test suite). The process group,
    if one was made, stays as it is."""
    global _CONTEXT
    _CONTEXT = None


def context() -> Context:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            timeout = datetime.timedelta(seconds=collective_timeout())
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if torch.cuda.is_available():  # before any cuda tensor: this rank's GPU, not GPU 0
                torch.cuda.set_device(local_rank)
            device = collective_device(local_rank)
            # stop requests are agreed on the host, without a device synchronisation per step
            host_group = dist.new_group(backend="gloo", timeout=timeout) if device.type != "cpu" else None
            _CONTEXT = Context(dist.get_rank(), dist.get_world_size(), local_rank, device, host_group)
            _record_self(_CONTEXT.rank)
        else:
            _CONTEXT = Context()
    return _CONTEXT
