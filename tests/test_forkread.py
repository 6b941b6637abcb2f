"""Forked readers into a shared stack (spotflat.forkread): the same SpotGrids as serial reading."""

from __future__ import annotations

import shutil
import threading
import warnings

import numpy as np
import pytest
from astropy.io import fits

from spotflat.errors import InputError
from spotflat.forkread import _can_fork, read_stack
from spotflat.grids import QUANTITIES, read_grid_files, stack_grid_files

from gridfiles import write_run

pytestmark = pytest.mark.skipif(not _can_fork() and threading.active_count() == 1,
                                reason="no fork on this platform")


@pytest.fixture(autouse=True)
def _no_threads():
    """Forked readers need a process without other threads (read_stack reads serially
    otherwise): a thread left by an earlier test (a Dask cluster's) would hide the forks."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        pytest.skip(f"threads left running by earlier tests: {[t.name for t in others][:3]}")


def _serial(paths, **kw):
    return stack_grid_files(read_grid_files(paths), count=len(paths), **kw)


def _same(a, b):
    for q in QUANTITIES:
        np.testing.assert_array_equal(getattr(a, q), getattr(b, q))
    np.testing.assert_array_equal(a.flags, b.flags)
    assert a.exposures.colnames == b.exposures.colnames
    for c in a.exposures.colnames:
        assert list(a.exposures[c]) == list(b.exposures[c]) or np.array_equal(
            np.asarray(a.exposures[c], float), np.asarray(b.exposures[c], float), equal_nan=True), c
    assert a.detector == b.detector and a.flux_column == b.flux_column


@pytest.mark.parametrize("nproc", [2, 3])
def test_forked_equals_serial(tmp_path, nproc):
    paths, *_ = write_run(tmp_path / "d", nexp=23, ncols=9, nrows=9, seed=3)
    paths = paths[::-1]  # reading order is not date order: the stack is reordered the same way
    ser = _serial(paths)
    par = read_stack(paths, nproc=nproc, min_files=0)
    _same(par, ser)
    assert par.nexp == 23 and par.meta["readers"] == nproc  # forked, not the serial fallback


def test_forked_without_page_populating_equals_serial(tmp_path, monkeypatch):
    """A kernel that does not know the populate advice (before Linux 5.14): the pages fault
    in as they are written, same stack."""
    import spotflat.forkread as fr

    calls = []
    real = fr._populate
    monkeypatch.setattr(fr, "_MADV_POPULATE_WRITE", -1)  # refused by madvise (EINVAL)
    monkeypatch.setattr(fr, "_populate", lambda *a: calls.append(a[2:]) or real(*a))
    paths, *_ = write_run(tmp_path / "d", nexp=21, ncols=9, nrows=9, seed=5)
    par = read_stack(paths, nproc=2, min_files=0)
    _same(par, _serial(paths))
    assert calls and all(lo < hi for lo, hi in calls)  # this process's batches went through it


def test_populate_covers_the_batch_slots():
    """Every page of a batch's slots (each quantity) is populated, none past the mapping."""
    import mmap

    import spotflat.forkread as fr

    shape = (3, 10, 1000)  # slot rows of 8000 bytes: batches start mid-page
    buf = mmap.mmap(-1, int(np.prod(shape)) * 8)
    seen = []

    class Spy:
        def madvise(self, advice, start, length):
            seen.append((start, length))
            buf.madvise(advice, start, length)

    fr._populate(Spy(), shape, 3, 7)
    assert len(seen) == 3
    for q, (start, length) in enumerate(seen):
        lo, hi = (q * 10 + 3) * 8000, (q * 10 + 7) * 8000
        assert start % mmap.PAGESIZE == 0 and start <= lo < start + mmap.PAGESIZE and start + length == hi


def test_forked_skips_non_grid_files_like_serial(tmp_path):
    paths, *_ = write_run(tmp_path / "d", nexp=12, ncols=6, nrows=6)
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(tmp_path / "d" / "image.fits")
    paths = sorted(paths[:1]) + [tmp_path / "d" / "image.fits"] + paths[1:]  # one in a reader's share
    with pytest.warns(UserWarning, match="image.fits.*skipped"):
        par = read_stack(paths, nproc=2, min_files=0)
    assert par.meta["readers"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ser = _serial(paths)
    _same(par, ser)
    assert par.nexp == 12


def test_forked_first_file_not_a_grid(tmp_path):
    paths, *_ = write_run(tmp_path / "d", nexp=6, ncols=6, nrows=6)
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(tmp_path / "d" / "a_image.fits")
    with pytest.warns(UserWarning, match="a_image.fits"):
        par = read_stack([tmp_path / "d" / "a_image.fits"] + paths, nproc=2, min_files=0)
    _same(par, _serial(paths))


@pytest.mark.parametrize("where", [1, 2, 5])  # this process's share, a reader's, the last file
def test_forked_bad_file_named(tmp_path, where):
    paths, *_ = write_run(tmp_path / "d", nexp=6, ncols=6, nrows=6)
    bad = paths[where]
    with fits.open(bad) as h:  # a grid catalogue without its flux column: an error, not a skip
        cols = [c for c in h[1].columns if c.name != "base_SdssShape_instFlux"]
        hdus = fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)] + [x.copy() for x in h[2:]])
        hdus.writeto(bad, overwrite=True)
    with pytest.raises(InputError, match=bad.name) as par:
        read_stack(paths, nproc=2, min_files=0)
    with pytest.raises(InputError) as ser:
        _serial(paths)
    assert str(par.value) == str(ser.value)  # the same message as serial reading


def test_forked_grid_size_mismatch_named(tmp_path):
    paths, *_ = write_run(tmp_path / "d", nexp=5, ncols=6, nrows=6)
    other, *_ = write_run(tmp_path / "e", nexp=1, ncols=7, nrows=7, seed=9)
    odd = tmp_path / "d" / ("z" + other[0].name)
    shutil.copy(other[0], odd)
    with pytest.raises(InputError, match=r"grid size 7 x 7 differs") as exc:
        read_stack(paths + [odd], nproc=2, min_files=0)
    assert odd.name in str(exc.value)


def test_forked_real_run_equals_serial(real_dir):
    run = real_dir / "mixcoatl" / "R22_S20_run12784"
    if not run.is_dir():
        pytest.skip(f"{run} is absent")
    paths = sorted(p for p in run.iterdir() if p.suffix in (".cat", ".fits"))
    par = read_stack(paths, nproc=2, min_files=0, detector="R22_S20")
    _same(par, _serial(paths, detector="R22_S20"))


def test_cli_reads_forked_same_catalogue(tmp_path, run_cli):
    """The default command (local workers) and --workers 1 write the same catalogue."""
    import spotflat.forkread as fr

    paths, *_ = write_run(tmp_path / "d", nexp=14, ncols=8, nrows=8, seed=5)
    old = fr.MIN_FILES
    try:
        fr.MIN_FILES = 0  # fork for this small run too (the default only pays off from ~200 files)
        r2 = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "c2.fits", "-q", "--no-qc-figure", "-j", "2")
    finally:
        fr.MIN_FILES = old
    r1 = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "c1.fits", "-q", "--no-qc-figure", "-j", "1")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    with fits.open(tmp_path / "c1.fits") as a, fits.open(tmp_path / "c2.fits") as b:
        for ha, hb in zip(a, b):
            if isinstance(ha, fits.BinTableHDU):
                for c in ha.columns.names:
                    x, y = ha.data[c], hb.data[c]
                    assert np.array_equal(x, y) if x.dtype.kind in "SUb" else np.array_equal(x, y, equal_nan=True)
