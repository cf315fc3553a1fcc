"""The one exception type that means "the user's input is wrong".

The CLI turns it into a single line on stderr and exit status 2; every other
exception is a bug and gets a traceback file instead.
"""


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
