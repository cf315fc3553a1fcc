"""Which rank of a torchrun job is gone: each rank's (host, pid) in the job's store, and a watch.

Every rank records where it runs (:func:`record_self`) and, when its process ends normally,
that it exited (:func:`record_exit`). A survivor whose collective failed names the ranks on its
host whose process is gone (:func:`lost_ranks`); under nccl, where a survivor sits in an
asynchronous collective and cannot raise, :class:`PeerWatch` ends it with the same line as soon
as a peer on its host is gone. Ranks on other hosts cannot be checked from here.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

#: what every lost-rank line ends with
RERUN = "re-run the same command to resume (train and distill: with --resume)"
#: where each rank records (host, pid) in the job's store, so that a survivor can name a dead rank
_WHO = "energytools/rank/{}"
#: set by a rank whose process ends normally: its going away is no failure
_EXITED = "energytools/exited/{}"


def _store():
    return dist.distributed_c10d._get_default_store()


def record_self(rank: int) -> None:
    """Record this process's host and pid as ``rank``'s."""
    try:
        _store().set(_WHO.format(rank), f"{socket.gethostname()} {os.getpid()}")
    except Exception:  # noqa: BLE001 - naming a dead rank is a courtesy, never a reason to fail
        pass


def record_exit(rank: int, watch: PeerWatch | None) -> None:
    """Stop ``watch`` and record that ``rank`` exits normally (run at exit)."""
    if watch is not None:
        watch.stopping.set()
    try:
        _store().set(_EXITED.format(rank), "1")
    except Exception:  # noqa: BLE001 - the store may be gone with the job
        pass


def _exited_normally(store, rank: int) -> bool:
    try:
        return store.check([_EXITED.format(rank)])
    except Exception:  # noqa: BLE001 - the store went with the rank that hosted it: not a normal exit
        return False


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


def rank_alive(rank: int) -> bool:
    """Whether ``rank``'s process still runs, as far as this host can tell (another host's: assumed)."""
    try:
        host, pid = _store().get(_WHO.format(rank)).decode().split()
    except Exception:  # noqa: BLE001 - no record: nothing to tell
        return True
    return host != socket.gethostname() or _alive(int(pid))


def _peers(rank: int, world: int, store) -> tuple[dict[int, int], list[int]]:
    """The other ranks as their records in ``store`` say: ``{rank: pid}`` of those on this host,
    and the ranks on other hosts."""
    host, local, elsewhere = socket.gethostname(), {}, []
    for other in range(world):
        if other != rank:
            their_host, pid = store.get(_WHO.format(other)).decode().split()
            if their_host == host:
                local[other] = int(pid)
            else:
                elsewhere.append(other)
    return local, elsewhere


def lost_ranks(rank: int, world: int, timeout_s: float) -> str:
    """Which ranks are gone, as far as this machine can tell: those on this host whose process
    no longer exists (other hosts' ranks cannot be checked from here); ``timeout_s`` is the
    collective timeout the line names when none is found."""
    local, elsewhere, dead = {}, [], []
    try:
        store = _store()
        store.set_timeout(datetime.timedelta(seconds=5))
        local, elsewhere = _peers(rank, world, store)
    except Exception:  # noqa: BLE001 - the store itself may be gone with rank 0
        pass
    for _ in range(30):  # a killed peer's sockets close while it is still exiting: give it 3 s to be gone
        dead = [other for other, pid in local.items() if not _alive(pid)]
        if dead or not local:
            break
        time.sleep(0.1)
    if dead:
        return f"rank {', '.join(map(str, dead))} died or was killed (see torchrun's report for its exit code)"
    timeout = f"{timeout_s:g}s"
    if elsewhere:
        return (f"a rank on another host (one of {', '.join(map(str, elsewhere))}) died or did not answer within "
                f"{timeout}")
    return f"another rank died, was killed or did not answer within {timeout}"


class PeerWatch(threading.Thread):
    """A daemon thread that ends this rank with the lost-rank line (exit 2) when a peer on this
    host is gone without having exited normally. Under nccl the main thread of a survivor is
    stuck in an asynchronous collective and cannot raise; without the watch it would wait for
    nccl's own watchdog to abort it at the collective timeout, with a C++ trace."""

    def __init__(self, rank: int, world: int, every: float = 0.5):
        super().__init__(name="energytools-peer-watch", daemon=True)
        self.rank, self.world, self.every, self.stopping = rank, world, every, threading.Event()

    def run(self) -> None:
        try:
            store = _store()
            peers, _ = _peers(self.rank, self.world, store)
        except Exception:  # noqa: BLE001 - without the records there is nothing to watch
            return
        while not self.stopping.wait(self.every):
            gone = [rank for rank, pid in peers.items() if not _alive(pid)]
            gone = [rank for rank in gone if not _exited_normally(store, rank)]
            if gone and not self.stopping.is_set():
                print(f"energytools: error: rank {self.rank} of {self.world}: rank "
                      f"{', '.join(map(str, gone))} died or was killed (see torchrun's report for its exit code); "
                      f"{RERUN}", file=sys.stderr, flush=True)
                os._exit(2)
