"""Blocks of numpy work on two threads (spotflat.blocks) and the calibration steps that use
them: the numbers must not depend on the number of threads."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

import spotflat.blocks as blocks
import spotflat.calibration as cal
from spotflat.blocks import BlockPool

from gridfiles import write_run


def test_pool_results_in_block_order_on_two_threads():
    seen = set()

    def fn(b):
        seen.add(threading.get_ident())
        time.sleep(0.01)  # both threads get to take part
        return b * 10

    with BlockPool(blocks.MIN_SIZE) as pool:
        out = pool.map(fn, range(9))
        expected = 2 if blocks.usable_cores() > 1 else 1
        assert pool.threads == expected
    assert out == [b * 10 for b in range(9)]
    assert len(seen) == expected
    with BlockPool(blocks.MIN_SIZE - 1) as pool:  # too small to pay for a thread
        assert pool.threads == 1 and pool.map(fn, [1, 2]) == [10, 20]


def test_pool_worker_keeps_the_callers_error_state():
    """numpy's error state is per thread: the worker's half runs under the caller's."""
    def fn(b):
        return np.log(np.zeros(3) - b)  # divide (b=0) and invalid (b>0) warnings

    with BlockPool(blocks.MIN_SIZE) as pool, warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(invalid="ignore", divide="ignore"):
            pool.map(fn, range(6))  # no RuntimeWarning from either thread
        with np.errstate(invalid="raise", divide="ignore"):
            with pytest.raises(FloatingPointError):
                pool.map(fn, [0, 0, 0, 1])  # the worker's block raises, like the caller's would


def test_pool_waits_for_the_worker_when_a_block_fails():
    done = []

    def fn(b):
        if b == 0:
            raise ValueError("first block")
        time.sleep(0.05)
        done.append(b)

    with BlockPool(blocks.MIN_SIZE) as pool:
        with pytest.raises(ValueError):
            pool.map(fn, [0, 1, 2, 3])
        if pool.threads == 2:
            assert sorted(done) == [2, 3]  # the worker's half had finished before map returned


def _seam_like(nspot=400, nexp=160, seed=2):
    rng = np.random.default_rng(seed)
    k = np.arange(nspot)
    gx, gy = 300 + (k % 20) * 170.0, 250 + (k // 20) * 170.0
    x = gx[:, None] + rng.uniform(-300, 300, nexp) + rng.normal(0, 0.3, (nspot, nexp))
    y = gy[:, None] + rng.uniform(-300, 300, nexp) + rng.normal(0, 0.3, (nspot, nexp))
    col, row = np.clip(np.floor((x + 0.5) / 512), 0, 7).astype(int), (y + 0.5 >= 2002).astype(int)
    T = (1 + rng.normal(0, 0.02, 16))[row * 8 + col]
    f = rng.uniform(0.8e5, 1.2e5, nspot)[:, None] * rng.uniform(0.9, 1.1, nexp) * T
    f *= 1 + 0.003 * rng.standard_normal(f.shape)
    bad = rng.random(f.shape) < 0.003
    f[bad] *= rng.choice([0.5, 1.5], bad.sum())
    f[rng.random(f.shape) < 0.02] = np.nan
    return np.asfortranarray(f), np.asfortranarray(x), np.asfortranarray(y)


def test_estimator_same_bits_on_one_or_two_threads(monkeypatch):
    """The spot blocks and the rescue model's point chunks shared by two threads give
    exactly the one-thread answer (the blocks' parts of s are added in block order)."""
    f, x, y = _seam_like()
    seg = cal._segment("R22_S11")
    monkeypatch.setattr(cal, "_CHUNK", 4096)  # several chunks of points
    monkeypatch.setattr(blocks, "MIN_SIZE", 1 << 62)
    one = cal.estimate_scales(f, x=x, y=y, segment=seg)
    monkeypatch.setattr(blocks, "MIN_SIZE", 0)
    two = cal.estimate_scales(f, x=x, y=y, segment=seg)
    for a, b in zip(one[:3], two[:3]):
        np.testing.assert_array_equal(a, b)
    assert one[3:] == two[3:] and one[4]
    assert (~one[2] & np.isfinite(f)).any()  # the rejection (and its rescue) had work to do


def test_rescue_points_chunked_equal_whole(monkeypatch):
    """The cell model's points gathered by chunks on two threads, a spot with a non-finite
    log t among them: the same points, values and cells as gathered at once."""
    f, x, y = _seam_like(nspot=100, nexp=50)
    finite = np.isfinite(f) & (f > 0)
    invF = 1.0 / np.nanmean(f, axis=1)
    invF[7] = np.nan  # its points have no log t: left out
    invs = np.ones(f.shape[1])

    def points(chunk, size):
        monkeypatch.setattr(cal, "_CHUNK", chunk)
        monkeypatch.setattr(blocks, "MIN_SIZE", size)
        nb = cal._Neighbourhoods(x, y, finite, cal._segment("R22_S11"))
        with BlockPool(f.size) as pool:
            return nb._points(f, finite, invF, invs, pool)

    whole = points(1 << 30, 1 << 62)
    parts = points(333, 0)
    assert 7 not in whole[0] and whole[0].size == np.count_nonzero(finite) - np.count_nonzero(finite[7])
    for a, b in zip(whole[:2], parts[:2]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(whole[2], parts[2]):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", [False, True])
def test_statistics_computed_ahead_equal_after(tmp_path, damage):
    """The per-point statistics, started from the first fit on a second thread, are those
    of the final fit: with a damaged exposure (refitted without it) as without one. With
    re-registration (nothing computed ahead) the catalogue is the same."""
    from spotflat.grids import read_grids
    from spotflat.qc import QCOptions

    paths, *_ = write_run(tmp_path / "d", nexp=24, ncols=15, nrows=15, seed=6, noise=0.004)
    if damage:  # one exposure's fluxes scrambled: the QC leaves it out and refits
        from astropy.io import fits

        with fits.open(paths[5], mode="update") as h:
            col = [c for c in h[1].columns.names if c.endswith("instFlux")][0]
            h[1].data[col] = np.random.default_rng(0).permutation(h[1].data[col])
    ahead = cal.build_calibration(read_grids(tmp_path / "d"))
    after = cal.build_calibration(read_grids(tmp_path / "d"), qc=QCOptions(register=True))
    assert (not ahead.exposures["used"][5]) == damage
    assert after.meta["NREGIST"] == 0
    for t in ("spots", "exposures"):
        a, b = getattr(ahead, t), getattr(after, t)
        assert a.colnames == b.colnames
        for c in a.colnames:
            if a[c].dtype.kind == "f":
                np.testing.assert_array_equal(a[c], b[c], err_msg=c)
            else:
                assert list(a[c]) == list(b[c]), c
