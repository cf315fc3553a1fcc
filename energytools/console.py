"""Where energytools talks to a person: one stderr console and the progress bar style.

Names from data (class folders, run names, paths) reach this console: with markup and emoji
codes off, "[red]" or ":warning:" in a name prints as it is. Styles go through ``style=`` or
:func:`headline`, never through markup in a string.
"""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

# piped or logged (not a terminal), a line stays one line: rich would wrap it at 80 columns,
# splitting the summaries that scripts and log searches read
console = Console(stderr=True, markup=False, emoji=False, soft_wrap=not sys.stderr.isatty())


def headline(head: str, rest: str) -> Text:
    """``head`` in bold followed by ``rest``, both printed literally."""
    return Text.assemble((head, "bold"), rest)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}", markup=False), TimeRemainingColumn(), console=console,
                    transient=True)
