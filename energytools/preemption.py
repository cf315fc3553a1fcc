"""Stop requests from a scheduler: SIGTERM (and SIGUSR1 when asked) end a stage cleanly.

SLURM and Kubernetes send SIGTERM before they kill a job (SLURM can send SIGUSR1 ahead of the
deadline with ``--signal=USR1@120``). :func:`install` puts a handler on those signals that only
records which one came; nothing is raised inside a collective or a write. The loops read the
flag at their safe points (:func:`stop_requested`): training after an optimizer step (it writes
a checkpoint holding the position inside the epoch first), score between batches (the part
being scored is dropped), augment between shards; then they raise :class:`Stopped`, which the
CLI turns into one line saying how to resume and exit status 128 + the signal's number (143
for SIGTERM, 138 for SIGUSR1), the status a shell gives a process the signal killed.

Standard library only, so the CLI installs the handlers before torch is imported.
"""
from __future__ import annotations

import contextlib
import signal
import threading

#: the signals --stop-signal accepts, by the names users write
SIGNALS = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1, "usr2": signal.SIGUSR2, "hup": signal.SIGHUP}

_received: int | None = None


#: how a stopped training run continues
RESUME_RUN = "re-run the same command with --resume to continue"
#: what a training run that stopped before its first checkpoint (its folder removed) does
START_AGAIN = "no checkpoint was written yet; re-run the same command to start again"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the user does next (``str(exc)``): a stage that knows says it, e.g. a
    training run with a checkpoint continues with --resume, one without has nothing to continue."""


class Stopped(BaseException):
    """A stage stopped at a safe point because a stop signal came. A BaseException (as
    KeyboardInterrupt is), so ``except Exception`` blocks do not swallow it."""

    def __init__(self, signum: int, where: str, resume: str = "re-run the same command to resume"):
        self.signum, self.where, self.resume = signum, where, resume
        super().__init__(f"stopped by {signal_name(signum)}; {where}; {resume}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def parse_signals(names) -> list[int]:
    """``["usr1"]`` -> ``[SIGUSR1]``; ``SIGUSR1``, ``USR1`` and ``10`` are accepted too."""
    from .errors import UserError

    chosen = []
    for name in names or ():
        key = str(name).strip().lower().removeprefix("sig")
        number = next((s for n, s in SIGNALS.items() if key in (n, str(int(s)))), None)
        if number is None:
            raise UserError(f"--stop-signal must be one of {', '.join(SIGNALS)}, got {name!r}")
        chosen.append(number)
    return chosen


def _record(signum, _frame) -> None:
    global _received
    if _received is None:  # the first one counts; a second SIGTERM does not hurry the checkpoint
        _received = signum


def install(extra=()) -> dict:
    """Handle SIGTERM and the ``extra`` signals (numbers) by recording them; returns the handlers
    they replace. Call from the main thread (signal handlers can only be set there)."""
    return {signum: signal.signal(signum, _record) for signum in {signal.SIGTERM, *extra}}


#: the extra signals the CLI's --stop-signal chose, installed while a command runs
chosen: list[int] = []


#: whether this process is the ``energytools`` command itself (:func:`own_process`)
_owns_process = False


def own_process() -> None:
    """This process is the ``energytools`` command (``main``): the handlers :func:`handling`
    installs stay after the command, so a stop signal that comes while the process exits (after
    the ``done:`` line, while torch and Python shut down) is recorded instead of killing it with
    128 + the signal's number as if the finished run had been cut short."""
    global _owns_process
    _owns_process = True


def owns_process() -> bool:
    """Whether :func:`own_process` was called: this process is the ``energytools`` command."""
    return _owns_process


@contextlib.contextmanager
def handling(extra=()):
    """The stop handlers while the block runs (a command), the previous ones after it, so a
    process that calls the CLI in-process (tests, notebooks) keeps its own SIGTERM afterwards
    (the command's own process keeps them: :func:`own_process`). Outside the main thread
    (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()  # a request left from an earlier command in this process is not this one's
    previous = install(extra)
    try:
        yield
    finally:
        if not _owns_process:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def stop_requested() -> int | None:
    """The stop signal received so far, or None."""
    return _received


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Record a stop request as if ``signum`` had come (a caller that learns of a preemption
    another way, e.g. a notebook)."""
    _record(signum, None)


def reset() -> None:
    """Forget a recorded request (a process that runs several stages, e.g. tests)."""
    global _received
    _received = None
