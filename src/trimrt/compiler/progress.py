"""A progress bar for long compile steps (calibration, the fidelity guard's layer scan).

Drawn by rich on its own stderr console (so it coexists with the CLI's status line and
never mixes into stdout), transient, and off when stderr is not a terminal.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def steps(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield `advance()`, to call once per finished step of `total`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
