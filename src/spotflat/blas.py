"""Pin OpenBLAS to one thread around numpy linear algebra.

Two reasons, both measured here: a BLAS reduction split over ``n`` threads
adds its terms in an order that depends on ``n`` (so serial, process-pool and
Dask runs would differ in the last bits), and thin matrix products run many
times slower when OpenBLAS spreads them over spinning threads on a busy
machine. ``threadpoolctl`` would do this too; it is not a dependency, and
the few lines below cover the OpenBLAS builds numpy and scipy ship.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Iterator

__all__ = ["single_thread_blas"]


_BLAS: list | None = None


def _openblas_controls() -> list[tuple[Any, Any]]:
    """(get, set) thread-count functions of the OpenBLAS libraries numpy/scipy loaded (Linux)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = []
        try:
            with open("/proc/self/maps") as fh:
                libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ".so" in ln})
        except OSError:
            libs = []
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            names = [(f"{pre}_get_num_threads{suf}", f"{pre}_set_num_threads{suf}")
                     for pre in ("scipy_openblas", "openblas") for suf in ("64_", "")]
            for get, put in ((getattr(lib, g, None), getattr(lib, p, None)) for g, p in names):
                if get is not None and put is not None:
                    get.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    _BLAS.append((get, put))
                    break
    return _BLAS


@contextlib.contextmanager
def single_thread_blas(restore: bool = True) -> Iterator[None]:
    """Run the enclosed numpy linear algebra on one OpenBLAS thread.

    A BLAS reduction (a matrix-vector product) split over ``n`` threads adds
    its terms in an order that depends on ``n``, so its last bits depend on
    the thread count. Every task of a :class:`Runner` -- serial, in a process
    pool or on a Dask worker (which Dask starts with one BLAS thread) -- runs
    inside this context, so all three give the same numbers bit for bit.
    A no-op where OpenBLAS cannot be found.

    Parameters
    ----------
    restore : bool
        Put the previous thread counts back on exit (not needed in a worker
        process, which only runs tasks).

    Examples
    --------
    >>> import numpy as np
    >>> with single_thread_blas():
    ...     float(np.ones(3) @ np.ones(3))
    3.0
    """
    import numpy  # noqa: F401  (loads the BLAS library before looking for it)

    saved = []
    try:
        for get, put in _openblas_controls():
            saved.append((put, get()))
            put(1)
        yield
    finally:
        if restore:
            for put, n in saved:
                put(n)
