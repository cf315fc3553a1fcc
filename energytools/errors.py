"""The one exception type that means "the user's input is wrong", and how its messages name options.

The CLI turns it into a single line on stderr and exit status 2; every other
exception is a bug and gets a traceback file instead.

A check names the option it refuses with :func:`option_name`: the Python keyword (``ratio=0.5``)
where the API was called, the flag (``--ratio 0.5``) while a command of the CLI runs
(:func:`options_as_flags`). The message is written once; who called decides how it reads.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator


class UserError(ValueError):
    """Bad input: a missing file, an unknown name, a number out of range. A ValueError, so
    notebook code can catch it as usual."""


def import_optional(module: str, extra: str):
    """Import an optional dependency, or raise :class:`UserError` naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs {module.split('.')[0]}: pip install 'energytools[{extra}]'") from None


#: whether messages name options by their command-line flags (set while a CLI command runs)
_AS_FLAGS: contextvars.ContextVar[bool] = contextvars.ContextVar("energytools_options_as_flags", default=False)
_NO_VALUE = object()


def option_name(name: str, value=_NO_VALUE, *, metavar: str | None = None) -> str:
    """How a message names the option whose Python keyword is ``name`` (``batch_size``), with
    ``value`` or a placeholder for one (``metavar``) when given.

    From Python: ``batch_size``, ``batch_size=32``, ``he_da='online'``, ``overwrite=True``,
    ``views=K``. From the command line (:func:`options_as_flags`): ``--batch-size``,
    ``--batch-size 32``, ``--he-da online``, a switch as it is typed (``--overwrite`` for True,
    ``--no-overwrite`` for False), ``--views K``."""
    as_flags = _AS_FLAGS.get()
    flag = "--" + name.replace("_", "-") if as_flags else name
    if metavar is not None:
        return f"{flag} {metavar}" if as_flags else f"{name}={metavar}"
    if value is _NO_VALUE:
        return flag
    if not as_flags:
        return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"


@contextlib.contextmanager
def options_as_flags(as_flags: bool = True) -> Iterator[None]:
    """Messages raised inside the block name options as flags (``as_flags``), or as keywords."""
    token = _AS_FLAGS.set(as_flags)
    try:
        yield
    finally:
        _AS_FLAGS.reset(token)
