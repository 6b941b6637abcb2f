"""One execution layer for spotflat: serial, a local process pool, or a Dask cluster.

``spotflat calibrate`` and ``spotflat correlate`` hand their independent
pieces of work (a chunk of processed-grid files, one detector) to a
:class:`Runner`, which runs them

* **serially** in this process (``workers=1``),
* on a **local process pool** (:class:`concurrent.futures.ProcessPoolExecutor`,
  ``workers=N``; the default is the number of cores this process may use), or
* on a **running Dask scheduler** (``scheduler="tcp://host:8786"``, through
  :class:`distributed.Client`).

:meth:`Runner.map` always returns the results in the order of its inputs, so
whatever combines them does so in the same order as a serial run: the
numbers are the same bit for bit. It returns only when every task has
succeeded; the first failure cancels the rest and is raised. A worker that
dies (killed, out of memory, ``os._exit``) is reported as one
:class:`WorkerError`; Dask first retries the task on another worker (up to
its ``distributed.scheduler.allowed-failures``), a process pool cannot.
Callers write their outputs only after :meth:`Runner.map` returned, so a
failed run never leaves a partial set of outputs.

Tasks must be module-level functions of an importable module and their
arguments picklable; with ``scheduler=...`` the workers must have spotflat
installed and see the input and output files at the same paths (a shared
file system).

Examples
--------
>>> from spotflat.parallel import Runner
>>> with Runner(workers=1) as runner:
...     runner.map(abs, [-1, 2, -3])
[1, 2, 3]
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import Any, Callable, Sequence

from .blas import single_thread_blas
from .errors import SpotflatError
from .progress import progress_bar as _progress_bar

__all__ = [
    "WorkerError",
    "Runner",
    "default_workers",
    "chunked",
    "nchunks_for",
    "one_at_a_time",
    "single_thread_blas",
]

#: Seconds to wait for a Dask scheduler (and its first worker) before giving up.
CONNECT_TIMEOUT = 5.0

# modules the process-pool workers import once, in the fork server, not per task
_PRELOAD = ["numpy", "astropy.io.fits", "astropy.table", "spotflat.grids", "spotflat.calibration"]

# one lock per process: work that loads a whole CCD image (a flat) holds it, so a
# multi-threaded Dask worker never has two flats in memory at once
_ONE_AT_A_TIME = threading.Lock()


class WorkerError(SpotflatError):
    """A worker process died, or the Dask scheduler could not be reached."""


def default_workers() -> int:
    """Number of cores this process may run on (at least 1).

    Examples
    --------
    >>> default_workers() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def chunked(items: Sequence, nchunks: int) -> list[list]:
    """Split ``items`` into at most ``nchunks`` contiguous, nearly equal chunks.

    Contiguous chunks keep the input order: concatenating the chunks gives
    ``items`` back, which is what makes a parallel result combine like a
    serial one.

    Examples
    --------
    >>> chunked(list(range(7)), 3)
    [[0, 1, 2], [3, 4], [5, 6]]
    >>> chunked([1, 2], 5)
    [[1], [2]]
    """
    items = list(items)
    n = max(1, min(int(nchunks), len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        out.append(items[start:stop])
        start = stop
    return [c for c in out if c]


def one_at_a_time() -> threading.Lock:
    """The per-process lock that work holding a whole CCD image must take.

    Examples
    --------
    >>> with one_at_a_time():
    ...     pass
    """
    return _ONE_AT_A_TIME



def _pinned(fn: Callable, item: Any) -> Any:
    """Run one task on one BLAS thread (in a worker process: left at one)."""
    with single_thread_blas(restore=False):
        return fn(item)


def _gerund(label: str) -> str:
    """``"Reading R22_S11"`` -> ``"reading R22_S11"`` (for 'while ...' messages)."""
    return label[:1].lower() + label[1:] if label else "running tasks"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Runner:
    """Run independent tasks serially, on a local process pool or on Dask.

    Parameters
    ----------
    workers : int, optional
        Local worker processes; ``1`` runs everything in this process. The
        default is :func:`default_workers`. Ignored with ``scheduler``.
    scheduler : str or distributed.Client, optional
        Address of a running Dask scheduler (``tcp://host:8786``), or an
        existing client (left open on :meth:`close`).
    timeout : float
        Seconds to wait for the scheduler and for at least one of its
        workers; an unreachable address fails after this long.

    Attributes
    ----------
    kind : str
        ``"serial"``, ``"processes"`` or ``"dask"``.
    nworkers : int
        Workers available (for a Dask cluster: at the time of connecting).

    Raises
    ------
    WorkerError
        When the scheduler cannot be reached or has no workers.

    Examples
    --------
    >>> with Runner(workers=1) as r:
    ...     r.kind, r.nworkers, r.map(len, ["ab", "c"])
    ('serial', 1, [2, 1])
    """

    def __init__(self, workers: int | None = None, scheduler: Any = None,
                 timeout: float = CONNECT_TIMEOUT) -> None:
        self._pool = None
        self._client = None
        self._own_client = False
        self.address = None
        if scheduler is not None:
            self.kind = "dask"
            self._connect(scheduler, timeout)
        else:
            n = default_workers() if workers is None else int(workers)
            if n < 1:
                raise SpotflatError(f"workers must be >= 1, not {n}")
            self.kind = "serial" if n == 1 else "processes"
            self.nworkers = n

    # -- set-up ------------------------------------------------------------------
    def _connect(self, scheduler: Any, timeout: float) -> None:
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover - dask is a dependency
            raise SpotflatError("--scheduler needs dask.distributed, which is not installed") from None
        if isinstance(scheduler, Client):
            self._client = scheduler
            self.address = scheduler.scheduler.address if scheduler.scheduler else None
        else:
            self.address = str(scheduler)
            try:
                self._client = Client(self.address, timeout=timeout, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                raise WorkerError(f"cannot reach the Dask scheduler at {self.address} within {timeout:g} s "
                                  f"({_describe(exc)})") from None
            self._own_client = True
        try:
            self._client.wait_for_workers(1, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise WorkerError(f"the Dask scheduler at {self.address} has no workers "
                              f"(waited {timeout:g} s; {_describe(exc)})") from None
        self.nworkers = max(1, len(self._client.scheduler_info().get("workers", {})))

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # a fork server, not fork: safe when this process already runs threads
            # (a Dask client, a GUI), and cheap after its first start
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            self._pool = ProcessPoolExecutor(max_workers=self.nworkers, mp_context=ctx)
        return self._pool

    def close(self) -> None:
        """Shut the process pool down / disconnect from the scheduler."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._client is not None and self._own_client:
            self._client.close()
        self._client = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", scheduler={self.address!r}" if self.kind == "dask" else ""
        return f"Runner(kind={self.kind!r}, nworkers={self.nworkers}{where})"

    def describe(self) -> str:
        """One line for a summary: ``serial``, ``2 local processes``, ``Dask at tcp://...``."""
        if self.kind == "serial":
            return "serial"
        if self.kind == "processes":
            return f"{self.nworkers} local processes"
        return f"Dask at {self.address} ({self.nworkers} workers)"

    # -- running -----------------------------------------------------------------
    def map(self, fn: Callable, items: Sequence, label: str = "Running tasks", progress: bool = False) -> list:
        """``[fn(item) for item in items]``, run by the workers; results in input order.

        Parameters
        ----------
        fn : callable
            A module-level function (picklable by reference).
        items : sequence
            One argument per task.
        label : str
            Names the work in progress bars and error messages, as a
            capitalised gerund: ``"Reading R22_S11"``.
        progress : bool
            Progress bar over finished tasks (on standard error).

        Returns
        -------
        list
            ``fn(item)`` for each item, in the order of ``items``.

        Raises
        ------
        WorkerError
            When a worker process died; nothing of the run is returned.
        Exception
            The first exception a task raised (a :class:`SpotflatError` from
            a task keeps its one-line message).
        """
        items = list(items)
        if not items:
            return []
        # a process pool is not worth starting for a single task
        if self.kind == "serial" or (self.kind == "processes" and len(items) == 1):
            with _progress_bar(len(items), label, progress) as bar, single_thread_blas():
                out = []
                for item in items:
                    out.append(fn(item))
                    bar(1)
                return out
        if self.kind == "processes":
            return self._map_pool(fn, items, label, progress)
        return self._map_dask(fn, items, label, progress)

    def _map_pool(self, fn, items, label, progress) -> list:
        from concurrent.futures import FIRST_EXCEPTION, as_completed, wait
        from concurrent.futures.process import BrokenProcessPool

        pool = self._executor()
        futures = [pool.submit(_pinned, fn, item) for item in items]
        index = {f: i for i, f in enumerate(futures)}
        out: list = [None] * len(items)
        try:
            with _progress_bar(len(items), label, progress) as bar:
                for fut in as_completed(futures):
                    out[index[fut]] = fut.result()
                    bar(1)
        except BrokenProcessPool as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None  # unusable now; a later map starts a fresh pool
            done = sum(1 for f in futures if f.done() and not f.cancelled() and f.exception() is None)
            raise WorkerError(f"a worker process died while {_gerund(label)} ({done} of {len(items)} "
                              f"finished; {_describe(exc)}); nothing was written") from None
        except BaseException:
            for f in futures:
                f.cancel()
            wait(futures, return_when=FIRST_EXCEPTION, timeout=0)
            raise
        return out

    def _map_dask(self, fn, items, label, progress) -> list:
        from distributed import as_completed

        try:
            from distributed import KilledWorker
        except ImportError:  # older distributed
            from distributed.scheduler import KilledWorker

        client = self._client
        if client is None:
            raise SpotflatError("the Dask client is closed")
        # pure=False: every call is a new task, never a cached result of an earlier run
        futures = client.map(functools.partial(_pinned, fn), items, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        out: list = [None] * len(items)
        try:
            with _progress_bar(len(items), label, progress) as bar:
                for fut in as_completed(futures, loop=client.loop):
                    out[index[fut.key]] = fut.result()
                    bar(1)
        except KilledWorker as exc:
            raise WorkerError(f"a Dask worker died while {_gerund(label)} and the task was given up "
                              f"after retries ({_describe(exc)}); nothing was written") from None
        except (OSError, TimeoutError) as exc:
            if "comm" in type(exc).__module__ or isinstance(exc, TimeoutError):
                raise WorkerError(f"lost the Dask scheduler at {self.address} while {_gerund(label)} "
                                  f"({_describe(exc)}); nothing was written") from None
            raise
        finally:
            client.cancel(futures)
        return out


def nchunks_for(nitems: int, nworkers: int, min_chunk: int = 32, max_chunk: int = 256,
                per_worker: int = 2) -> int:
    """How many chunks to cut ``nitems`` files into for ``nworkers`` workers.

    About ``per_worker`` chunks per worker (so a slow one does not hold the
    run up), none smaller than ``min_chunk`` files (tasks must be worth
    shipping) nor larger than ``max_chunk`` (bounds a worker's memory).

    Examples
    --------
    >>> nchunks_for(1400, 2), nchunks_for(10, 2), nchunks_for(5000, 2)
    (6, 1, 20)
    """
    if nitems <= 0:
        return 0
    n = max(1, min(nworkers * per_worker, nitems // max(1, min_chunk)))
    return max(n, math.ceil(nitems / max_chunk))
