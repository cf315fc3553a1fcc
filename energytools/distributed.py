"""torch.distributed when launched by torchrun; a one-process stand-in otherwise.

Stages call :func:`context` with their ``--device`` once; with ``WORLD_SIZE`` > 1 in the
environment (torchrun sets it) it initialises the process group with the backend that device
needs (:func:`chosen_backend`: nccl for a cuda run, gloo for a cpu one; ``--dist-backend``
overrides it) and, for a cuda run only, makes this rank's GPU the process's device before
anything else touches one. nccl wants one GPU per rank, so more ranks on a host than GPUs is
refused there; over gloo ranks may share GPUs. Small host-side collectives (sums, stop
agreements) run on the device the group's backend serves (:func:`collective_device`): the cpu
whenever the backend reduces cpu tensors, cuda under nccl.

A rank that dies must not leave the others waiting in a collective for torch's default 30
minutes: the process group's timeout is ``ENERGYTOOLS_COLLECTIVE_TIMEOUT`` seconds (the CLI's
``--collective-timeout``, default :data:`DEFAULT_TIMEOUT_S`), and a collective that fails
raises :class:`RankLost`, one line naming this rank and what it was doing. A failure inside a
collective that energytools does not call itself (DDP's gradient all-reduce in backward) is
turned into the same line by :func:`as_rank_lost`. nccl collectives are asynchronous: a
survivor would sit in one until nccl's watchdog aborts the process, so under nccl a watchdog
thread (:class:`~energytools.peers.PeerWatch`) ends a rank with that line as soon as a peer on its host is gone.
"""
from __future__ import annotations

import atexit
import datetime
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import UserError
from .io import sha256_json
from .peers import RERUN, PeerWatch, lost_ranks, rank_alive, record_exit, record_self

#: seconds a collective waits for the other ranks before it fails (torch's own default: 1800)
DEFAULT_TIMEOUT_S = 600
TIMEOUT_ENV = "ENERGYTOOLS_COLLECTIVE_TIMEOUT"
#: the process group's backend (the CLI's ``--dist-backend``): auto, gloo or nccl
BACKEND_ENV = "ENERGYTOOLS_DIST_BACKEND"
#: --dist-backend auto: the backend a run on each kind of device needs
BACKEND_FOR_DEVICE = {"cuda": "nccl", "cpu": "gloo", "mps": "gloo"}
BACKENDS = ("auto", "gloo", "nccl")


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


def chosen_backend(device_type: str) -> str:
    """The process group's backend for a run on ``device_type``: ``--dist-backend`` when given,
    else :data:`BACKEND_FOR_DEVICE` (a cpu run never gets nccl, which reduces cuda tensors only)."""
    asked = os.environ.get(BACKEND_ENV, "") or "auto"
    if asked not in BACKENDS:
        raise UserError(f"{BACKEND_ENV} (--dist-backend) must be one of {', '.join(BACKENDS)}, got {asked!r}")
    if asked == "auto":
        return BACKEND_FOR_DEVICE.get(device_type, "gloo")
    if asked == "nccl" and device_type != "cuda":
        raise UserError(f"--dist-backend nccl reduces cuda tensors only; this run is on {device_type} "
                        "(pass --device cuda, or --dist-backend gloo)")
    return asked


def requested_device_type(name: str) -> str:
    """The kind of device ``--device NAME`` asks for ("auto": cuda when there is one)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:  # resolve_device names the bad value
        return "cpu"


def rank_gpu(local_rank: int, backend: str) -> int:
    """This rank's GPU: ``LOCAL_RANK`` under nccl (one GPU per rank, refused in one line when the
    host has fewer GPUs than ranks), ``LOCAL_RANK`` modulo the GPUs over gloo (ranks may share)."""
    count = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if count < 1:
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if backend == "nccl" and local_world > count:
        raise UserError(f"{local_world} ranks on this host but {count} GPU(s): nccl needs a GPU per rank; launch "
                        f"--nproc-per-node {count}, or pass --dist-backend gloo to let ranks share GPUs")
    return local_rank % count


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: where collectives put their tensors (cuda:LOCAL_RANK under nccl, cpu under gloo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: a gloo group for the small host-side agreements (stop requests) when the default group is nccl
    host_group: object = None
    #: the default group's backend ("gloo", "nccl"; "" in one process)
    backend: str = ""
    #: this rank's cuda device index once a cuda run asked for one (:meth:`cuda_index`)
    gpu: int | None = None

    def cuda_index(self) -> int:
        """This rank's GPU, chosen (and made the current device) on first use."""
        if self.gpu is None:
            self.gpu = rank_gpu(self.local_rank, self.backend)
            torch.cuda.set_device(self.gpu)
        return self.gpu

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

    def gather(self, obj, what: str) -> list | None:
        """Every rank's ``obj`` (picklable, host-side) as a list on rank 0, in rank order; None on
        the others. ``[obj]`` in one process."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world if self.is_main else None
        with self.collective(what):
            dist.gather_object(obj, gathered, dst=0, group=self.host_group)
        return gathered

    def wait_for_main(self, what: str, seconds: float) -> None:
        """Rank 0 finishes work alone (merging a table) while the others wait up to ``seconds``, a
        budget sized to that work, not the collective timeout; a rank 0 gone from this host ends the
        wait at once. Rank 0 calls it when done. Through the job's store, not a collective."""
        if not self.distributed:
            return
        store = dist.distributed_c10d._get_default_store()
        key = f"energytools/finished/{_next_wait_id()}"
        if self.is_main:
            store.set(key, "1")
            return
        deadline = time.monotonic() + seconds
        while not store.check([key]):
            if time.monotonic() > deadline or not rank_alive(0):
                raise RankLost(f"rank {self.rank} of {self.world}: rank 0 did not finish {what} within "
                               f"{seconds:.0f}s ({self.describe_lost()}); re-run the same command to resume")
            time.sleep(0.2)

    def describe_lost(self) -> str:
        """Which ranks are gone, as far as this host can tell (:func:`energytools.peers.lost_ranks`)."""
        return lost_ranks(self.rank, self.world, collective_timeout())

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
            raise _rank_lost(self.ctx, self.what, exc) from None
        return False


def _rank_lost(ctx: Context, what: str, exc: BaseException) -> RankLost:
    """The one line for a collective that failed while ``what``: this rank, the lost one, why."""
    text = str(exc).strip()
    first = text.splitlines()[0][:160] if text else type(exc).__name__
    return RankLost(f"rank {ctx.rank} of {ctx.world}: a collective failed while {what}: "
                    f"{ctx.describe_lost()} ({first}); {RERUN}")


_WAITS = [0]


def _next_wait_id() -> int:
    """Each rank calls :meth:`Context.wait_for_main` in the same order, so a counter names it."""
    _WAITS[0] += 1
    return _WAITS[0]


def as_rank_lost(exc: BaseException) -> RankLost | None:
    """The one line for a collective failure raised outside :meth:`Context.collective` (DDP's
    gradient all-reduce inside backward, a peer reset while a rank computes), or None when
    ``exc`` is not one or there is no process group."""
    if _CONTEXT is None or not _CONTEXT.distributed or isinstance(exc, UserError):
        return None
    text = str(exc)
    backend_error = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(mark in text for mark in ("[gloo", "gloo/", "NCCL", "Connection reset",
                                                                          "Connection closed", "Timed out")))
    return _rank_lost(_CONTEXT, "training", exc) if backend_error else None


_CONTEXT: Context | None = None


def collective_device(gpu: int = 0, group=None) -> torch.device:
    """The device whose tensors ``group``'s (default: the default group's) backend reduces for the
    small host-side collectives: the cpu whenever the backend serves it (gloo, even in a cuda run:
    a few floats need no GPU), else GPU ``gpu`` (``"nccl"`` serves cuda only)."""
    served = {pair.split(":")[0] for pair in dist.get_backend_config(group).split(",") if ":" in pair}
    return torch.device("cpu") if "cpu" in served else torch.device("cuda", gpu)


def reset() -> None:
    """Forget this process's context: the next :func:`context` reads the environment again (a
    process that runs jobs of different shapes in turn, such as a test suite). The process group,
    if one was made, stays as it is."""
    global _CONTEXT
    _CONTEXT = None


def context(device: str = "auto") -> Context:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun). The
    first call under torchrun joins the job with the backend a run on ``device`` (the stage's
    ``--device``) needs; later calls return the same context."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            timeout = datetime.timedelta(seconds=collective_timeout())
            device_type = requested_device_type(device)
            # a group made before energytools joined (a user's script) keeps its backend
            backend = dist.get_backend() if dist.is_initialized() else chosen_backend(device_type)
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            gpu = rank_gpu(local_rank, backend) if device_type == "cuda" else None
            if gpu is not None:  # before any cuda tensor: this rank's GPU, not GPU 0
                torch.cuda.set_device(gpu)
            if not dist.is_initialized():
                dist.init_process_group(backend, timeout=timeout)
            backend = dist.get_backend()
            collectives = collective_device(local_rank if gpu is None else gpu)
            # stop requests are agreed on the host, without a device synchronisation per step
            host_group = dist.new_group(backend="gloo", timeout=timeout) if collectives.type != "cpu" else None
            _CONTEXT = Context(dist.get_rank(), dist.get_world_size(), local_rank, collectives, host_group, backend,
                               gpu)
            record_self(_CONTEXT.rank)
            watch = None
            if backend == "nccl" or os.environ.get("ENERGYTOOLS_PEER_WATCH") == "1":
                watch = PeerWatch(_CONTEXT.rank, _CONTEXT.world)
                watch.start()
            atexit.register(record_exit, _CONTEXT.rank, watch)
        else:
            _CONTEXT = Context()
    return _CONTEXT
