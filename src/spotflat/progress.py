"""Progress bars for long library steps, on standard error.

The library reports progress itself (reading files, resampling, simulating)
so that a notebook call and the command line show the same bar. A bar is
drawn only when standard error is a terminal: in a log file or a pipe a bar
would only leave stray label lines between the results.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, Iterator

__all__ = ["progress_bar", "progress_iter", "is_interactive"]


def is_interactive(stream=None) -> bool:
    """Whether ``stream`` (default: standard error) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


@contextlib.contextmanager
def progress_bar(total: int, label: str, show: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` that moves a bar of ``total`` steps, or a no-op.

    Parameters
    ----------
    total : int
        Number of steps.
    label : str
        What is being done ("Reading grid files").
    show : bool
        Draw the bar (also requires standard error to be a terminal and
        more than one step).

    Examples
    --------
    >>> with progress_bar(3, "Counting", show=False) as advance:
    ...     for _ in range(3):
    ...         advance(1)
    """
    if not (show and total > 1 and is_interactive()):
        yield lambda n=1: None
        return
    import click

    with click.progressbar(length=total, label=label, show_pos=True, show_eta=True,
                           file=sys.stderr) as bar:
        yield bar.update


@contextlib.contextmanager
def progress_iter(items: Iterable, label: str, quiet: bool = False) -> Iterator[Iterable]:
    """Yield ``items`` wrapped in a progress bar (or bare when quiet / not a terminal).

    Examples
    --------
    >>> with progress_iter([1, 2], "Adding", quiet=True) as it:
    ...     sum(it)
    3
    """
    items = list(items) if not hasattr(items, "__len__") else items
    if quiet or len(items) <= 1 or not is_interactive():
        yield items
        return
    import click

    with click.progressbar(items, label=label, show_pos=True, file=sys.stderr) as bar:
        yield bar
