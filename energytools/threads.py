"""How many threads torch computes with: ``energytools --threads N`` (or ENERGYTOOLS_THREADS),
else an explicit OMP_NUM_THREADS, else the CPUs this process may actually use.

torch sizes its intra-op pool from the CPUs it sees. OpenMP counts the process's affinity mask
(``taskset``, SLURM's ``--cpus-per-task`` binding) but not a container's CPU quota (cgroup v2
``cpu.max``: Kubernetes' CPU limit, ``docker --cpus``), so a process limited to 2 CPUs of a
64-core host starts 64 threads. Idle OpenMP threads spin-wait before they sleep, so processes
whose pools together exceed the CPUs they share slow each other far more than their share
(benchmarks/threads.py measures it). The default here is the smaller of the two.

Standard library only but for :func:`using`, which imports torch when it sets a count.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator

#: the environment variable that sets --threads
ENV = "ENERGYTOOLS_THREADS"
#: where cgroup v2 is mounted; a process's own group is named in /proc/self/cgroup
CGROUP_ROOT = Path("/sys/fs/cgroup")

#: the count the CLI's --threads (or its default) chose for this process's commands; None: leave torch's
chosen: list[int | None] = [None]


def cpu_quota(text: str) -> float | None:
    """The CPUs a cgroup v2 ``cpu.max`` allows ("QUOTA PERIOD": quota / period), or None when it
    sets no limit ("max PERIOD") or cannot be read."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_dirs(root: Path) -> list[Path]:
    """This process's cgroup v2 folder and its parents up to ``root`` (the root alone where
    /proc/self/cgroup names none, as inside most containers)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    folder = root / own.strip("/")
    return [folder, *[p for p in folder.parents if p == root or root in p.parents]]


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity mask, capped by the tightest cgroup v2
    ``cpu.max`` quota of its group and the groups above it, rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    for folder in _cgroup_dirs(cgroup_root):
        try:
            quota = cpu_quota((folder / "cpu.max").read_text())
        except OSError:
            continue
        if quota is not None:
            cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def choose(requested: int | None, environ=None) -> int | None:
    """The thread count for ``requested`` (--threads; None when not given): itself; None
    (leave torch as OpenMP set it) where OMP_NUM_THREADS is set, the user's choice; else
    :func:`available_cpus`."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        return requested
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return available_cpus()


@contextlib.contextmanager
def using(threads: int | None, interop: bool = False, environment: bool = False) -> Iterator[None]:
    """torch computes with ``threads`` intra-op threads inside the block (None: as it is), and
    the count before after it, so an in-process caller (tests, notebooks) keeps its own. With
    ``interop`` the inter-op pool gets the same size too, where torch still allows it (only
    before its first parallel work: the command's own process). With ``environment``,
    OMP_NUM_THREADS says ``threads`` inside the block too (processes started in it read it when
    their torch starts) and is as it was after it."""
    if threads is None:
        yield
        return
    import torch

    before, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    if interop and torch.get_num_interop_threads() != threads:
        with contextlib.suppress(RuntimeError):  # parallel work has started: the pool stays as it is
            torch.set_num_interop_threads(threads)
    if environment:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if environment and variable is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        elif environment:
            os.environ["OMP_NUM_THREADS"] = variable
