"""Reading one detector's grid files with forked readers, into one shared stack.

Reading 1400 catalogues is most of what ``spotflat calibrate`` does for one
detector, and each file is read independently. Shipping the read arrays back
from worker processes through pipes costs more than the parallel reading
saves (they are ~250 MB for 1400 files); here the ``(quantity, exposure,
spot)`` stack is allocated once in memory shared with forked readers, each
reader writes its files' values straight into their slots and sends back only
the small per-file metadata. This process reads its own share meanwhile.

The result is the same :class:`spotflat.grids.SpotGrids`, bit for bit, as
:func:`spotflat.grids.stack_grid_files` over :func:`spotflat.grids.read_grid_files`
(the values are copied, not recomputed; exposures are ordered the same way).
Where forking is not safe or not available (not Linux; other threads
running, as in a notebook's kernel) or too few files pay for the processes,
the files are read serially.
"""

from __future__ import annotations

import importlib
import mmap
import multiprocessing
import os
import pickle
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .grids import (DEFAULT_MAX_OFFSET, QUANTITIES, NotAGridFile, SpotGrids, _exposure_row, _size_mismatch,
                    _stacked, read_grid_file, read_grid_files, stack_grid_files)
from .progress import progress_bar

__all__ = ["read_stack", "MIN_FILES"]

#: Fewest files worth forking readers for (a fork costs a few milliseconds).
MIN_FILES = 200


def _can_fork() -> bool:
    """Forking is safe: Linux (fork is not macOS's default for a reason), and no other thread
    running (a notebook's kernel threads could hold a lock the child then waits for forever)."""
    import sys
    import threading

    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1)


def read_stack(paths: Sequence[str | os.PathLike], flux_column: str | None = None,
               detector: str | None = None, max_offset: float | None = DEFAULT_MAX_OFFSET,
               nproc: int = 2, progress: bool = False, label: str = "Reading grid files",
               min_files: int | None = None, preload: Sequence[str] = ()) -> SpotGrids:
    """Read and stack one detector's processed-grid files with ``nproc`` processes.

    Parameters
    ----------
    paths : sequence of path-like
        The files, in reading order.
    flux_column, detector, max_offset
        As for :func:`spotflat.grids.stack_grid_files` and
        :func:`spotflat.grids.read_grid_files` (files that are not grids are
        skipped with a warning naming them).
    nproc : int
        Processes reading (this one included); 1, or fewer than
        ``min_files`` files, reads serially here.
    progress : bool
        A progress bar over the files.
    label : str
        The bar's label.
    min_files : int
        Fewest files worth forking for (default :data:`MIN_FILES`).
    preload : sequence of str
        Modules to import in this process while the forked readers read
        (what the caller needs next); this process reads fewer files
        meanwhile. Imported before reading when the reading is serial.

    Returns
    -------
    SpotGrids
        ``meta["readers"]``: the number of processes that read.

    Raises
    ------
    InputError
        As the serial reader: the first bad file (in reading order among
        those read) is named.
    """
    paths = [Path(p) for p in paths]
    if min_files is None:
        min_files = MIN_FILES
    if nproc < 2 or len(paths) < max(min_files, 2) or not _can_fork():
        from .progress import progress_iter

        for name in preload:
            importlib.import_module(name)
        with progress_iter(paths, label, quiet=not progress) as bar:
            grids = stack_grid_files(read_grid_files(bar, flux_column), detector=detector,
                                     count=len(paths), max_offset=max_offset)
        grids.meta["readers"] = 1
        return grids
    with progress_bar(len(paths), label, show=progress) as advance:
        return _read_forked(paths, flux_column, detector, max_offset, nproc, advance, preload)


def _read_forked(paths, flux_column, detector, max_offset, nproc, advance, preload) -> SpotGrids:
    skipped: dict[int, str] = {}
    first = 0
    ref = None
    while ref is None:  # the first grid file, here: the stack's shape
        if first == len(paths):
            raise InputError("no processed-grid files to stack")
        try:
            ref = read_grid_file(paths[first], flux_column)
        except NotAGridFile as exc:
            skipped[first] = str(exc)
            first += 1
        advance(1)
    count = len(paths) - first
    shape = (len(QUANTITIES), count, ref.nspot)
    buf = mmap.mmap(-1, max(int(np.prod(shape)) * 8, 1))  # anonymous and shared with the forks
    big = np.frombuffer(buf, dtype=np.float64).reshape(shape)
    rows: list = [None] * count
    amb: list = [None] * count
    errors: dict[int, BaseException] = {}
    _place(big, 0, ref, ref, rows, amb, {})
    ctx = multiprocessing.get_context("fork")
    # the next slot to read: every process claims a few at a time, so a slower one
    # (this one, importing ``preload`` first) reads fewer; ``stop`` set on an error
    claim = _Claims(ctx, count, prepare=lambda lo, hi: _populate(buf, shape, lo, hi))
    readers = []
    for _ in range(nproc - 1):
        here, there = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_reader, args=(there, claim, paths, first, big, ref, flux_column), daemon=True)
        proc.start()
        there.close()
        readers.append((proc, here))

    def receive(conn, block: bool) -> bool:
        """Handle the messages waiting on ``conn``; False once it is closed."""
        while block or conn.poll():
            try:
                kind, slot, *payload = conn.recv()
            except EOFError:
                return False
            if kind == "ok":
                rows[slot], amb[slot] = payload
            elif kind == "skip":
                skipped[first + slot] = payload[0]
            else:
                errors[slot] = pickle.loads(payload[0])
                claim.stop()
            advance(1)
        return True

    done = False
    try:
        # what the stacking (astropy.table) and the caller need next, while the readers work
        for name in ("astropy.table", *preload):
            importlib.import_module(name)
        folders: dict = {}
        for slot in claim:
            kind, what = _read_slot(slot, paths, first, big, ref, flux_column, rows, amb, folders)
            if kind == "skip":
                skipped[first + slot] = what
            elif kind == "error":  # raised below, in reading order
                errors[slot] = what
            if errors:
                claim.stop()
            advance(1)
            for _, conn in readers:
                receive(conn, block=False)
        for _, conn in readers:
            receive(conn, block=True)
        done = True
    finally:
        for proc, conn in readers:
            if not done and proc.is_alive():
                proc.terminate()
            proc.join()
            conn.close()
    if not errors and any(proc.exitcode != 0 for proc, _ in readers):
        raise InputError("a reader process died while reading the grid files",
                         expected="readable processed-grid files (or --workers 1)")
    if errors:
        raise errors[min(errors)]
    for i in sorted(skipped):
        warnings.warn(f"{skipped[i]}; skipped", UserWarning, stacklevel=3)
    kept = [j for j in range(count) if rows[j] is not None]
    if len(kept) < count:
        big = big[:, kept]
    grids = _stacked(big, [rows[j] for j in kept], [amb[j] for j in kept], ref.flux_column, detector,
                     max_offset)
    grids.meta["readers"] = nproc
    return grids


def _read_slot(slot, paths, first, big, ref, flux_column, rows, amb, folders) -> tuple[str, object]:
    """Read file ``first + slot`` into its slot of the stack (this process or a reader's):
    ``("ok", None)``, ``("skip", message)`` for a file that is not a grid, or
    ``("error", exception)``."""
    try:
        gf = read_grid_file(paths[first + slot], flux_column, out=big[:, slot])
    except NotAGridFile as exc:
        return "skip", str(exc)
    except Exception as exc:  # noqa: BLE001 -- reported by the caller, in reading order
        return "error", exc
    err = _place(big, slot, gf, ref, rows, amb, folders)
    return ("ok", None) if err is None else ("error", err)


def _place(big, slot, gf, ref, rows, amb, folders) -> InputError | None:
    """Copy one file's values into its slot of the stack; its row and ambiguous spots."""
    err = _size_mismatch(gf, ref)
    if err is not None:
        return err
    for iq, q in enumerate(QUANTITIES):
        if not np.may_share_memory(gf.values[q], big[iq, slot]):  # not read into its slot already
            big[iq, slot] = gf.values[q]
    rows[slot] = _exposure_row(gf, folders)
    amb[slot] = gf.ambiguous
    return None


def _reader(conn, claim, paths, first, big, ref, flux_column) -> None:  # pragma: no cover (a fork)
    """A forked reader: its slots' values into the shared stack, their metadata down the pipe."""
    folders: dict = {}
    rows: list = [None] * big.shape[1]
    amb: list = [None] * big.shape[1]
    try:
        for slot in claim:
            kind, what = _read_slot(slot, paths, first, big, ref, flux_column, rows, amb, folders)
            if kind == "error":  # sent to the parent, which raises it
                claim.stop()
                conn.send(("error", slot, _pickled(what)))
                return
            if kind == "skip":
                conn.send(("skip", slot, what))
                continue
            conn.send(("ok", slot, rows[slot], amb[slot]))
            rows[slot] = amb[slot] = None
    finally:
        conn.close()


#: ``madvise`` advice faulting a range in for writing at once (Linux 5.14; not in :mod:`mmap` before 3.13).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _populate(buf: mmap.mmap, shape: tuple, lo: int, hi: int) -> None:
    """Fault in the stack's pages of slots ``lo .. hi - 1`` (every quantity) in one call each.

    Shared memory has no huge pages here: written to one 4 kB page fault at a
    time, the 240 MB stack of 1400 files cost ~0.3 s of CPU in page faults, a
    third of the reading; populated a batch at a time, about half that. Where
    the kernel does not know the advice, the pages fault in as they are written.
    """
    nq, count, nspot = shape
    row = nspot * 8
    for q in range(nq):
        start, end = (q * count + lo) * row, (q * count + hi) * row
        start -= start % mmap.PAGESIZE
        try:
            buf.madvise(_MADV_POPULATE_WRITE, start, end - start)
        except (OSError, ValueError):
            return


class _Claims:
    """Slots ``1 .. count - 1`` handed out a few at a time to the processes sharing them
    (iterate to claim); :meth:`stop` ends every process's iteration after its current batch.

    ``prepare(lo, hi)`` is called in the claiming process for each batch it claims."""

    BATCH = 8

    def __init__(self, ctx, count: int, prepare=None) -> None:
        self._next = ctx.Value("q", 1)  # with its lock
        self._stop = ctx.Value("b", 0, lock=False)
        self.count = count
        self._prepare = prepare

    def stop(self) -> None:
        self._stop.value = 1

    def __iter__(self):
        while not self._stop.value:
            with self._next.get_lock():
                lo = self._next.value
                self._next.value = lo + self.BATCH
            if lo >= self.count:
                return
            hi = min(lo + self.BATCH, self.count)
            if self._prepare is not None:
                self._prepare(lo, hi)
            yield from range(lo, hi)


def _pickled(exc: BaseException) -> bytes:
    """The exception as bytes (an :class:`InputError` rebuilt with its parts; others by type and text)."""
    if isinstance(exc, InputError):
        exc = _Rebuilt(exc.problem, exc.path, exc.expected, type(exc))
    try:
        return pickle.dumps(exc)
    except Exception:  # noqa: BLE001 -- an unpicklable exception: its text
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


class _Rebuilt:
    """An :class:`InputError` (or subclass) in transit: rebuilt by unpickling."""

    def __init__(self, problem, path, expected, cls) -> None:
        self.args = (problem, path, expected, cls)

    def __reduce__(self):
        problem, path, expected, cls = self.args
        return (_rebuild, (cls, problem, path, expected))


def _rebuild(cls, problem, path, expected) -> InputError:
    try:
        return cls(problem, path=path, expected=expected)
    except TypeError:
        return InputError(problem, path=path, expected=expected)
