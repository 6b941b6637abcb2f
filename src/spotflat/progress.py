"""Progress bars for long library steps, on standard error.

The library reports progress itself (reading files, resampling, simulating)
so that a notebook call and the command line show the same bar. A bar is
drawn only when standard error is a terminal: in a log file or a pipe a bar
would only leave stray label lines between the results.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterable, Iterator

__all__ = ["progress_bar", "progress_iter", "is_interactive"]


def is_interactive(stream=None) -> bool:
    """Whether ``stream`` (default: standard error) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class _Bar:
    """A one-line text bar on a terminal stream, redrawn in place.

    The time to the first step is not used for the ETA: many jobs spend it
    setting up (``spotflat simulate`` computes the whole response before it
    writes the first file), and a rate taken from it would predict minutes
    for a job of seconds. The ETA is the rate since the first step times
    the steps left, shown once a few steps have been timed.
    """

    width = 28
    min_steps = 3  # steps timed before an ETA is shown

    def __init__(self, total: int, label: str, stream, clock: Callable[[], float] = time.monotonic):
        self.total, self.label, self.stream, self.clock = int(total), label, stream, clock
        self.pos = 0
        self.start = clock()
        self.first: tuple[float, int] | None = None  # (time, position) at the first step
        self.last_draw = -1.0

    def eta(self) -> float | None:
        """Seconds left, from the rate since the first step; None while unknown."""
        if self.first is None:
            return None
        t0, p0 = self.first
        done = self.pos - p0
        if done < self.min_steps or self.pos >= self.total:
            return None
        return (self.clock() - t0) / done * (self.total - self.pos)

    def update(self, n: int = 1) -> None:
        self.pos = min(self.pos + n, self.total)
        now = self.clock()
        if self.first is None:
            self.first = (now, self.pos)
        if now - self.last_draw >= 0.1 or self.pos >= self.total:
            self.draw()

    def line(self) -> str:
        frac = self.pos / self.total if self.total else 1.0
        full = int(round(frac * self.width))
        bar = "#" * full + "-" * (self.width - full)
        eta = self.eta()
        if self.pos >= self.total:
            tail = f"done in {_clock(self.clock() - self.start)}"
        elif eta is None:
            tail = "ETA --:--"
        else:
            tail = f"ETA {_clock(eta)}"
        return f"{self.label}  [{bar}]  {self.pos}/{self.total}  {tail}"

    def draw(self) -> None:
        self.last_draw = self.clock()
        self.stream.write("\r" + self.line() + "\033[K")
        self.stream.flush()

    def close(self) -> None:
        self.draw()
        self.stream.write("\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@contextlib.contextmanager
def progress_bar(total: int, label: str, show: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` that moves a bar of ``total`` steps, or a no-op.

    The bar is drawn on standard error, only when it is a terminal. Its ETA
    leaves out the time to the first step (often setup) and appears once a
    few steps have been timed.

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
    bar = _Bar(total, label, sys.stderr)
    bar.draw()
    try:
        yield bar.update
    finally:
        bar.close()


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
    with progress_bar(len(items), label) as advance:
        def gen():
            for item in items:
                yield item
                advance(1)
        yield gen()
