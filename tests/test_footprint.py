"""Sampling a flat over spot footprints: exactness against a brute-force
evaluation of the documented weighting, masking, edges and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

import spotflat
from spotflat import InputError
from spotflat.footprint import (bin_flat, correlate_separable, flat_gradient, footprint_sigma,
                                sample_flat, sample_flat_checkerboard)

NY, NX = 64, 72


def analytic_flat(dtype=np.float64):
    """Linear gradient plus a sinusoid of wavelength 7.3 px (along a tilted direction)."""
    y, x = np.mgrid[0:NY, 0:NX].astype(float)
    flat = 1.0 + 0.002 * x - 0.0015 * y + 0.03 * np.sin(2 * np.pi * (0.8 * x + 0.6 * y) / 7.3 + 0.4)
    return flat.astype(dtype)


# ---------------------------------------------------------------- independent reference

def gauss_weights(sigma):
    """Documented Gaussian kernel: exp(-d^2/2s^2), |d| <= ceil(4 s), 1-D sums normalised."""
    r = math.ceil(4.0 * sigma)
    g = {d: math.exp(-d * d / (2.0 * sigma * sigma)) for d in range(-r, r + 1)}
    total = sum(g.values())
    return {(dx, dy): g[dx] * g[dy] / total ** 2 for dx in g for dy in g}


def tophat_weights(radius, sub=10):
    """Documented top-hat: area of each pixel inside the circle on a sub x sub grid."""
    r = math.ceil(radius + 0.5)
    w = {}
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            n = 0
            for i in range(sub):
                for j in range(sub):
                    u = dx - 0.5 + (j + 0.5) / sub
                    v = dy - 0.5 + (i + 0.5) / sub
                    n += u * u + v * v <= radius * radius
            if n:
                w[(dx, dy)] = n
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def brute_force(flat, x, y, kernel, min_weight=0.5):
    """q at one position: sum_p w_p m_p f_p / sum_p w_p m_p, w_p = sum_c t_c K(p - c)."""
    ny, nx = flat.shape
    if not (-0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5):
        return math.nan
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    corners = [(x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
               (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)]
    num = den = 0.0
    for cx, cy, t in corners:
        for (dx, dy), k in kernel.items():
            px, py = cx + dx, cy + dy
            if 0 <= px < nx and 0 <= py < ny and math.isfinite(flat[py, px]):
                num += t * k * float(flat[py, px])
                den += t * k
    return num / den if den >= min_weight else math.nan


def random_positions(rng, n, margin=-0.5):
    x = rng.uniform(margin, NX - 1 - margin, n)
    y = rng.uniform(margin, NY - 1 - margin, n)
    return x, y


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("sigma", [0.8, 2.2, 3.35])
def test_gaussian_matches_brute_force(sigma):
    rng = np.random.default_rng(1)
    flat = analytic_flat()
    x, y = random_positions(rng, 30)
    q = sample_flat(flat, x, y, sigma=sigma)
    kernel = gauss_weights(sigma)
    ref = np.array([brute_force(flat, a, b, kernel) for a, b in zip(x, y)])
    assert np.array_equal(np.isnan(q), np.isnan(ref))
    ok = np.isfinite(ref)
    assert ok.sum() >= 25
    np.testing.assert_allclose(q[ok], ref[ok], rtol=1e-6, atol=0)
    # the footprint really smooths: the sinusoid is damped relative to point sampling
    point = np.array([brute_force(flat, a, b, {(0, 0): 1.0}) for a, b in zip(x, y)])
    assert np.max(np.abs(q[ok] - point[ok])) > 1e-3


@pytest.mark.parametrize("radius", [1.7, 4.0])
def test_tophat_matches_brute_force(radius):
    rng = np.random.default_rng(2)
    flat = analytic_flat()
    x, y = random_positions(rng, 25)
    q = sample_flat(flat, x, y, radius=radius)
    kernel = tophat_weights(radius)
    ref = np.array([brute_force(flat, a, b, kernel) for a, b in zip(x, y)])
    ok = np.isfinite(ref)
    assert np.array_equal(np.isnan(q), ~ok)
    np.testing.assert_allclose(q[ok], ref[ok], rtol=1e-6, atol=0)


def test_masked_pixels_excluded_exactly():
    rng = np.random.default_rng(3)
    flat = analytic_flat()
    flat[rng.integers(0, NY, 150), rng.integers(0, NX, 150)] = np.nan
    flat[:, 30] = np.nan  # a bad column
    x, y = random_positions(rng, 30)
    x[:5] = 30.0 + rng.uniform(-1, 1, 5)  # on and around the bad column
    for kw, kernel in (({"sigma": 1.9}, gauss_weights(1.9)), ({"radius": 3.0}, tophat_weights(3.0)),
                       ({}, {(0, 0): 1.0})):
        q = sample_flat(flat, x, y, **kw)
        ref = np.array([brute_force(flat, a, b, kernel) for a, b in zip(x, y)])
        assert np.array_equal(np.isnan(q), np.isnan(ref)), kw
        ok = np.isfinite(ref)
        np.testing.assert_allclose(q[ok], ref[ok], rtol=1e-6, atol=0)


def test_float32_flat_is_exact_too():
    rng = np.random.default_rng(4)
    flat32 = analytic_flat(np.float32)
    x, y = random_positions(rng, 20)
    q = sample_flat(flat32, x, y, sigma=2.2)
    kernel = gauss_weights(2.2)
    ref = np.array([brute_force(flat32.astype(np.float64), a, b, kernel) for a, b in zip(x, y)])
    ok = np.isfinite(ref)
    np.testing.assert_allclose(q[ok], ref[ok], rtol=1e-6, atol=0)


def test_per_spot_sigma_is_quantised_and_grouped():
    rng = np.random.default_rng(5)
    flat = analytic_flat()
    x, y = random_positions(rng, 40, margin=8)
    sigma = rng.uniform(1.0, 3.0, 40)
    q = sample_flat(flat, x, y, sigma=sigma, step=0.05)
    sq = 0.05 * np.round(sigma / 0.05)
    for i in range(0, 40, 7):
        ref = brute_force(flat, x[i], y[i], gauss_weights(sq[i]))
        assert q[i] == pytest.approx(ref, rel=1e-6)
    # NaN sigma (no moments) gives NaN q, others unaffected
    sigma[3] = np.nan
    q2 = sample_flat(flat, x, y, sigma=sigma)
    assert np.isnan(q2[3]) and np.allclose(np.delete(q2, 3), np.delete(q, 3), rtol=1e-13)


def test_linear_flat_reproduced_and_gradient_exact():
    y, x = np.mgrid[0:NY, 0:NX].astype(float)
    flat = 2.0 + 0.01 * x - 0.004 * y
    rng = np.random.default_rng(6)
    px, py = random_positions(rng, 50, margin=10)
    for kw in ({"sigma": 2.2}, {"radius": 3.5}, {}):
        q = sample_flat(flat, px, py, **kw)
        np.testing.assert_allclose(q, 2.0 + 0.01 * px - 0.004 * py, rtol=1e-12)
        gx, gy = flat_gradient(flat, px, py, **kw)
        np.testing.assert_allclose(gx, 0.01, rtol=1e-9)
        np.testing.assert_allclose(gy, -0.004, rtol=1e-9)


def test_gradient_is_derivative_of_q():
    rng = np.random.default_rng(7)
    flat = analytic_flat()
    flat[20:23, 40:43] = np.nan
    # keep away from cell borders: q is piecewise smooth between pixel centres
    x = rng.integers(3, NX - 4, 30) + rng.uniform(0.1, 0.9, 30)
    y = rng.integers(3, NY - 4, 30) + rng.uniform(0.1, 0.9, 30)
    h = 1e-5
    for kw in ({"sigma": 2.0}, {"radius": 2.5}):
        gx, gy = flat_gradient(flat, x, y, **kw)
        nx_ = (sample_flat(flat, x + h, y, **kw) - sample_flat(flat, x - h, y, **kw)) / (2 * h)
        ny_ = (sample_flat(flat, x, y + h, **kw) - sample_flat(flat, x, y - h, **kw)) / (2 * h)
        np.testing.assert_allclose(gx, nx_, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(gy, ny_, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- edges, NaN and errors

def test_off_ccd_and_low_weight_positions():
    flat = analytic_flat()
    x = np.array([-0.6, -0.5, NX - 0.5, NX - 0.4, np.nan, 10.0, 0.0])
    y = np.array([10.0, 10.0, 10.0, 10.0, 10.0, np.nan, 0.0])
    q = sample_flat(flat, x, y, sigma=1.0)
    assert np.isnan(q[[0, 3, 4, 5]]).all()
    # on the CCD edge about half the footprint is on the CCD: below min_weight = 0.5 or not
    assert np.isnan(q[6])  # corner: about a quarter of the weight
    q_low = sample_flat(flat, x, y, sigma=1.0, min_weight=0.2)
    assert np.isfinite(q_low[[1, 2, 6]]).all()
    ref = brute_force(flat, 0.0, 0.0, gauss_weights(1.0), min_weight=0.2)
    assert q_low[6] == pytest.approx(ref, rel=1e-9)


def test_shape_and_scalar_io():
    flat = analytic_flat()
    x = np.full((3, 4), 20.3)
    y = np.linspace(5, 50, 12).reshape(3, 4)
    q = sample_flat(flat, x, y, sigma=2.0)
    assert q.shape == (3, 4)
    assert q[1, 2] == pytest.approx(sample_flat(flat, 20.3, y[1, 2], sigma=2.0), rel=1e-14)
    s = sample_flat(flat, 20.3, 10.2)
    assert np.ndim(s) == 0 and np.isfinite(s)
    gx, gy = flat_gradient(flat, 20.3, 10.2, sigma=1.5)
    assert np.ndim(gx) == 0 and np.ndim(gy) == 0


def test_bad_input_errors():
    flat = analytic_flat()
    with pytest.raises(InputError, match="off the CCD"):
        sample_flat(flat, [-5.0, NX + 3.0], [3.0, 3.0], sigma=2.0)
    with pytest.raises(InputError, match="off the CCD"):
        sample_flat(flat, [np.nan], [np.nan])
    with pytest.raises(InputError, match="no finite pixel"):
        sample_flat(np.full((10, 10), np.nan), [3.0], [3.0], sigma=1.0)
    with pytest.raises(InputError, match="does not match detector"):
        sample_flat(flat, [3.0], [3.0], sigma=1.0, detector="E2V")
    with pytest.raises(InputError, match="does not match detector"):
        sample_flat(flat, [3.0], [3.0], detector=(NY + 1, NX))
    with pytest.raises(InputError, match="not both"):
        sample_flat(flat, [3.0], [3.0], sigma=1.0, radius=2.0)
    with pytest.raises(InputError, match="sigma must be >= 0"):
        sample_flat(flat, [3.0], [3.0], sigma=-1.0)
    with pytest.raises(InputError, match="does not match the positions"):
        sample_flat(flat, [3.0, 4.0], [3.0, 4.0], sigma=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="2-D image"):
        sample_flat(np.ones(10), [3.0], [3.0])
    with pytest.raises(InputError, match="off the CCD"):
        flat_gradient(flat, [-5.0], [3.0], sigma=1.0)


def test_detector_shape_accepted():
    flat = np.ones((4004, 4096), dtype=np.float32)
    q = sample_flat(flat, [100.0, 2000.5], [50.0, 3000.25], sigma=2.2, detector="R22_S11")
    np.testing.assert_allclose(q, 1.0, rtol=1e-12)
    with pytest.raises(InputError, match="R02_S02"):
        sample_flat(flat, [100.0], [50.0], detector="R02_S02")


def test_top_level_exports():
    assert spotflat.sample_flat is sample_flat
    assert spotflat.flat_gradient is flat_gradient
    from spotflat import flats
    assert flats.sample_flat is sample_flat and flats.bin_flat is bin_flat


# ---------------------------------------------------------------- helpers

def test_correlate_separable_matches_ndimage():
    rng = np.random.default_rng(8)
    for shape, kx, ky, pad in [((70, 130), rng.random(19), rng.random(7), 1),
                               ((5, 3), rng.random(9), rng.random(11), 0),
                               ((129, 65), np.array([1.0]), rng.random(3), 2)]:
        a = rng.random(shape)
        ref = ndimage.correlate1d(np.pad(a, pad), kx, axis=1, mode="constant")
        ref = ndimage.correlate1d(ref, ky, axis=0, mode="constant")
        np.testing.assert_allclose(correlate_separable(a, kx, ky, pad=pad), ref, rtol=0, atol=1e-12)
        both = correlate_separable([a, a.astype(np.float32) * 2], kx, ky, pad=pad)
        np.testing.assert_allclose(both[..., 1], 2 * ref, rtol=1e-6)


def test_bin_flat_nan_aware_with_partial_blocks():
    rng = np.random.default_rng(9)
    flat = rng.random((11, 14))
    flat[0:3, 0:4] = np.nan  # one whole block masked
    flat[5, 6] = np.nan
    out = bin_flat(flat, (3, 4))
    assert out.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            block = flat[3 * i:3 * i + 3, 4 * j:4 * j + 4]
            if np.isfinite(block).any():
                assert out[i, j] == pytest.approx(np.nanmean(block), rel=1e-12)
            else:
                assert np.isnan(out[i, j])
    with pytest.raises(InputError):
        bin_flat(flat, 0)


def test_footprint_sigma_from_moments():
    assert footprint_sigma(4.0, 4.0) == pytest.approx(2.0)
    s = footprint_sigma([4.0, -1.0, np.nan], [6.25, -1.0, 1.0])
    assert s[0] == pytest.approx(math.sqrt((4 + 6.25) / 2)) and np.isnan(s[1:]).all()
    assert footprint_sigma(4.0, 9.0, 0.0, method="det") == pytest.approx(math.sqrt(6.0))
    with pytest.raises(InputError):
        footprint_sigma(1.0, 1.0, method="det")


def test_bad_pixel_term_scatter_and_convolution_agree(monkeypatch):
    from spotflat import footprint

    rng = np.random.default_rng(10)
    flat = analytic_flat()
    flat[rng.integers(0, NY, 60), rng.integers(0, NX, 60)] = np.nan
    flat[:5, :7] = np.nan  # a masked corner
    x, y = random_positions(rng, 200)
    scattered = sample_flat(flat, x, y, sigma=2.2)
    monkeypatch.setattr(footprint, "_SCATTER_LIMIT", 0)  # large masks: a full convolution
    convolved = sample_flat(flat, x, y, sigma=2.2)
    assert np.array_equal(np.isnan(scattered), np.isnan(convolved))
    np.testing.assert_allclose(scattered, convolved, rtol=1e-12, equal_nan=True)


# ---------------------------------------------------------------- checkerboard halves in one pass

def test_checkerboard_halves_equal_masked_sampling():
    """The one-pass halves equal sample_flat on each checkerboard-masked flat (and on the whole flat),
    with a bad column, scattered bad pixels, per-position widths and positions at the CCD edges."""
    rng = np.random.default_rng(11)
    flat = analytic_flat() + 0.02 * rng.standard_normal((NY, NX))  # pixel noise: the halves differ
    flat[:, 30] = np.nan  # a bad column: all of it in one half on even rows, the other on odd rows
    flat[rng.integers(0, NY, 60), rng.integers(0, NX, 60)] = np.nan
    x, y = random_positions(rng, 400)
    x[:40] = 30.0 + rng.uniform(-2, 2, 40)  # on and around the bad column
    x[40:44], y[40:44] = [-0.5, NX - 0.5, 5.0, 20.0], [3.0, 10.0, -0.5, NY - 0.5]
    sigma = rng.uniform(0.7, 3.2, x.size)
    sigma[44:48] = 0.0  # no footprint: bilinear interpolation
    odd = (np.add.outer(np.arange(NY), np.arange(NX)) % 2).astype(bool)
    q, qa, qb = sample_flat_checkerboard(flat, x, y, sigma, half_min_weight=0.2)
    refs = (sample_flat(flat, x, y, sigma=sigma),
            sample_flat(np.where(odd, flat, np.nan), x, y, sigma=sigma, min_weight=0.2),
            sample_flat(np.where(~odd, flat, np.nan), x, y, sigma=sigma, min_weight=0.2))
    for got, ref in zip((q, qa, qb), refs):
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        ok = np.isfinite(ref)
        assert ok.sum() > 300
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-12, atol=0)
    # the halves really are different pixels: their difference is the pixel noise, not zero
    d = (qa - qb)[np.isfinite(qa - qb)]
    assert np.std(d) > 1e-3
    # near the bad column one half loses much more weight than the other: the masking matters
    near = np.abs(x - 30.0) < 0.5
    assert np.nanmax(np.abs(qa[near] - q[near])) > 1e-3


def test_checkerboard_matches_brute_force_on_a_half():
    """Against the documented weighting itself (not only against sample_flat)."""
    rng = np.random.default_rng(12)
    flat = analytic_flat() + 0.02 * rng.standard_normal((NY, NX))
    flat[:, 30] = np.nan
    odd = (np.add.outer(np.arange(NY), np.arange(NX)) % 2).astype(bool)
    x, y = random_positions(rng, 25)
    x[:5] = 30.0 + rng.uniform(-1, 1, 5)
    _, qa, qb = sample_flat_checkerboard(flat, x, y, 1.9, half_min_weight=0.2)
    kernel = gauss_weights(1.9)
    for got, half in ((qa, odd), (qb, ~odd)):
        ref = np.array([brute_force(np.where(half, flat, np.nan), a, b, kernel, min_weight=0.2)
                        for a, b in zip(x, y)])
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-10, atol=0)


def test_checkerboard_bad_input():
    with pytest.raises(InputError):
        sample_flat_checkerboard(analytic_flat(), [1e6], [1e6], 2.0)
    with pytest.raises(InputError):
        sample_flat_checkerboard(analytic_flat(), [5.0], [5.0], 2.0, half_min_weight=1.5)
