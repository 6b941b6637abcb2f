"""Flat second derivatives and the shape regressors (issue 12 item 5).

The signs and amplitudes documented in docs/science.rst ("Shapes and
centroids") are checked by injection: the simulator's tree rings as a QE
effect (the spot's moments are those of G R) and as a pixel-area effect
(the spot's charge is displaced, the flat sees the area change).
"""

from __future__ import annotations

import numpy as np
import pytest

from spotflat.derivatives import flat_hessian
from spotflat.flats import flat_gradient
from spotflat.response import ResponseParams, synthetic_layout
from spotflat.simulate import simulate_data
from spotflat.stats import correlation_analysis


def test_hessian_of_a_quadratic_and_masking():
    yy, xx = np.mgrid[0:80, 0:90].astype(float)
    flat = 1 + 1e-4 * (3 * (xx - 40) ** 2 - (yy - 30) ** 2 + 2 * (xx - 40) * (yy - 30))
    x, y = np.array([30.3, 50.7, 1.0]), np.array([40.2, 33.9, 1.0])
    h = flat_hessian(flat, x, y, sigma=np.array([1.5, 2.5, 2.0]))
    assert np.allclose(h.dxx[:2], 6e-4) and np.allclose(h.dyy[:2], -2e-4) and np.allclose(h.dxy[:2], 2e-4)
    assert np.allclose(h.laplacian[:2], 4e-4) and np.allclose(h.diff[:2], 8e-4)
    flat[20:48, 40:64] = np.nan  # masked under the second spot
    h = flat_hessian(flat, x, y, sigma=2.0)
    assert np.isfinite(h.dxx[0]) and np.isnan(h.dxx[1])
    # noise: the footprint is the smoothing; without it the second difference is noise-dominated
    rng = np.random.default_rng(1)
    noisy = 1 + rng.normal(0, 1e-3, (200, 200))
    px, py = rng.uniform(20, 180, 500), rng.uniform(20, 180, 500)
    raw, smooth = flat_hessian(noisy, px, py).laplacian, flat_hessian(noisy, px, py, sigma=2.0).laplacian
    assert np.std(smooth) < 0.05 * np.std(raw)


def _centre(v, ok):
    v = np.where(ok, v, np.nan)
    return v - np.nanmean(v, axis=1, keepdims=True)


@pytest.fixture(scope="module", params=["qe", "area"])
def rings(request):
    rp = ResponseParams(treering_kind=request.param, treering_model="imsim", treering_boost=150,
                        treering_detector="R22_S11", prnu=0, ndust=0, gain_sigma=0, midline_amplitude=0,
                        edge_amplitude=0)
    sim = simulate_data("R22_S11", ndither=30, seed=1, noise=0, layout=synthetic_layout((1024, 1024), "E2V"),
                        illumination=0, response=rp, ncols=16, nrows=16, xstep=60.0)
    sp = sim.spots
    ok = ~sp.missing & ~sp.outlier & np.isfinite(sp.x)
    flat = sim.flat / np.mean(sim.flat)
    sig = np.sqrt((sp.xx_true + sp.yy_true) / 2)  # the simulator's moments are of G R: kernel G
    h = flat_hessian(flat, sp.x, sp.y, sigma=sig)
    gx, gy = flat_gradient(flat, sp.x, sp.y, sigma=sig)
    T = sp.xx + sp.yy
    Tm = np.nanmean(np.where(ok, T, np.nan), axis=1, keepdims=True)
    pairs = {"size": (_centre(T, ok) / Tm, h.laplacian), "xx-yy": (_centre(sp.xx - sp.yy, ok), h.diff),
             "xy": (_centre(sp.xy, ok), h.dxy), "dx": (_centre(sp.x - sp.x_true, ok), gx),
             "dy": (_centre(sp.y - sp.y_true, ok), gy)}
    slopes = {}
    for name, (a, b) in pairs.items():
        st = correlation_analysis(a, _centre(b, ok), grid_shape=(16, 16), block="patch", patch_size=4,
                                  nboot=200, nnull=0, seed=2)
        slopes[name] = (st.slope, st.slope_err)
    xx, yy = float(np.mean(sp.xx_true)), float(np.mean(sp.yy_true))
    qe = {"size": (xx + yy) / 4, "xx-yy": ((xx + yy) / 2) ** 2, "xy": xx * yy, "dx": xx, "dy": yy}
    return request.param, slopes, qe


def test_shape_slopes_have_the_documented_signs(rings):
    """QE: the slopes are the spot's moments (Sigma H Sigma, Sigma grad); pixel area: the same sign, larger."""
    kind, slopes, qe = rings
    for name, (slope, err) in slopes.items():
        assert slope > 3 * err > 0, (kind, name, slope, err)  # positive, significant, for both kinds
        if kind == "qe":  # amplitude: the spot's own moments (15 % for the first-order model, plus the noise)
            assert abs(slope - qe[name]) < 0.15 * qe[name] + 4 * err, (name, slope, err, qe[name])
        else:  # displaced charge: (P / 2 pi)**2 times the QE slope (10-13x for these rings)
            assert slope > 4 * qe[name] + 4 * err, (name, slope, err, qe[name])
