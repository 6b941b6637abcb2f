"""Whole-array numpy work over blocks of rows, shared by two threads.

numpy releases the GIL inside its array loops, so a loop over blocks of a
large array (each block's temporaries small enough to stay in cache) runs on
two cores when a second thread takes half of the blocks. The results come
back in block order and every block is computed exactly as in a plain loop,
so the numbers do not depend on the number of threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import numpy as np

__all__ = ["BlockPool", "usable_cores"]

T = TypeVar("T")

#: Fewest array elements worth a second thread (below, thread hand-offs cost more than they save).
MIN_SIZE = 1 << 20


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class BlockPool:
    """Map a function over blocks, the second half of them on a worker thread.

    Parameters
    ----------
    size : int
        Elements of the array the blocks cover: a second thread only for at
        least :data:`MIN_SIZE` of them, on a machine with two usable cores.

    Examples
    --------
    >>> a = np.arange(12.0).reshape(6, 2)
    >>> with BlockPool(a.size) as pool:
    ...     pool.map(lambda b: float(a[b].sum()), [slice(0, 3), slice(3, 6)])
    [15.0, 51.0]
    """

    def __init__(self, size: int) -> None:
        self._pool = ThreadPoolExecutor(1) if size >= MIN_SIZE and usable_cores() > 1 else None

    @property
    def threads(self) -> int:
        """Threads the blocks are shared by (1 or 2)."""
        return 1 if self._pool is None else 2

    def map(self, fn: Callable[[T], object], blocks: Sequence[T]) -> list:
        """``[fn(b) for b in blocks]``, the second half computed on the worker thread
        (under this thread's numpy error state: :class:`numpy.errstate` is per thread)."""
        blocks = list(blocks)
        if self._pool is None or len(blocks) < 2:
            return [fn(b) for b in blocks]
        mid = (len(blocks) + 1) // 2
        err = np.geterr()

        def rest():
            with np.errstate(**err):
                return [fn(b) for b in blocks[mid:]]

        job = self._pool.submit(rest)
        try:
            first = [fn(b) for b in blocks[:mid]]
        finally:
            second = job.result()  # waited for even when this half failed: no writes after return
        return first + second

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "BlockPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
