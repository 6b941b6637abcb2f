"""Tests of spotflat.stats and spotflat.resampling on synthetic [spot, exposure] arrays."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from astropy.table import Table
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from spotflat import InputError, correlation_analysis, pearson_r
from spotflat.resampling import (SYMMETRIES, bca_interval, bootstrap_counts, jackknife_se,
                                 null_correlations, null_permutation, patch_labels)
from spotflat.stats import (CorrelationResult, _centred, grid_layout, spot_sums,
                            variance_decomposition)


# ---------------------------------------------------------------- helpers

def smooth_field(nside, length, rng):
    """Unit-variance random field on an nside x nside grid, correlated over ~length spots."""
    x = np.arange(nside)
    kern = np.exp(-0.5 * (np.subtract.outer(x, x) / length) ** 2)
    f = kern @ rng.normal(size=(nside, nside)) @ kern.T
    return ((f - f.mean()) / f.std()).ravel()  # spot k = col * nside + row


def injected(rng, nside=15, nexp=40, slope=0.8, sig_b=0.01, sig_n=0.01):
    """b = dithered sinusoidal structure, a = 1 + slope (b - 1) + noise."""
    x = rng.uniform(0, 2000, size=(nside * nside, nexp))
    phase = rng.uniform(0, 2 * np.pi)
    b = 1 + sig_b * np.sqrt(2) * np.sin(2 * np.pi * x / 37.0 + phase)  # variance sig_b**2
    a = 1 + slope * (b - 1) + sig_n * rng.normal(size=b.shape)
    r_true = slope * sig_b / np.hypot(slope * sig_b, sig_n)
    return a, b, r_true


def brute_null_r(A, B, V, partner):
    """Null r of one explicit pairing with the documented missing-data convention."""
    ok = partner >= 0
    Bp, Vp = np.zeros_like(B), np.zeros_like(V)
    Bp[ok], Vp[ok] = B[partner[ok]], V[partner[ok]]
    Am, Vm = A * ok[:, None], V * ok[:, None]
    return (Am * Bp).sum() / np.sqrt((Am * Am * Vp).sum() * (Vm * Bp * Bp).sum())


# ---------------------------------------------------------------- pearson_r

def test_pearson_matches_corrcoef_on_complete_data():
    rng = np.random.default_rng(0)
    b = 1 + 0.01 * rng.normal(size=(30, 12))
    a = 1 + 0.5 * (b - 1) + 0.01 * rng.normal(size=b.shape)
    assert pearson_r(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-13)
    assert isinstance(pearson_r(a, b), float)


def test_pearson_nan_handling():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 500))
    a[::7] = np.nan
    b[::5] = np.inf
    ok = np.isfinite(a) & np.isfinite(b)
    assert pearson_r(a, b) == pytest.approx(np.corrcoef(a[ok], b[ok])[0, 1], abs=1e-13)
    assert np.isnan(pearson_r([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # zero variance
    with pytest.raises(InputError, match="different shapes"):
        pearson_r(np.ones(3), np.ones(4))
    with pytest.raises(InputError, match="at least 2"):
        pearson_r([1.0, np.nan], [np.nan, 2.0])


def test_seed_formula_without_sqrt_differs_and_is_documented():
    rng = np.random.default_rng(2)
    q = 1 + 0.01 * rng.normal(size=1000)
    t = q + 0.005 * rng.normal(size=1000)
    df, dq = t - t.mean(), q - q.mean()
    r_seed = np.mean(df * dq) / (np.mean(df ** 2) * np.mean(dq ** 2))
    r = pearson_r(t, q)
    assert 0 < r <= 1 < r_seed  # the seed's number is not a correlation coefficient
    assert r_seed == pytest.approx(r / np.sqrt(np.mean(df ** 2) * np.mean(dq ** 2)))
    assert "square root" in pearson_r.__doc__


# ---------------------------------------------------------------- per-spot sums

def test_spot_sums_reweighting_equals_duplicated_data():
    rng = np.random.default_rng(3)
    b = rng.normal(size=(40, 9))
    a = 0.3 * b + rng.normal(size=b.shape)
    a[rng.random(a.shape) < 0.15] = np.nan
    sums = spot_sums(a, b)
    assert sums.r() == pytest.approx(pearson_r(a, b), abs=1e-13)
    w = bootstrap_counts(40, 5, rng)
    rw = sums.r(w)
    for i in range(5):
        rep = np.repeat(np.arange(40), w[i])
        assert rw[i] == pytest.approx(pearson_r(a[rep], b[rep]), abs=1e-12)
        ok = np.isfinite(a[rep])
        assert sums.slope(w[i:i + 1])[0] == pytest.approx(
            np.polyfit(b[rep][ok], a[rep][ok], 1)[0], abs=1e-10)


def test_bootstrap_counts_are_multinomial():
    w = bootstrap_counts(50, 400, np.random.default_rng(4))
    assert w.shape == (400, 50) and (w.sum(axis=1) == 50).all()
    assert w.mean() == pytest.approx(1.0) and w.var() == pytest.approx(1 - 1 / 50, rel=0.1)


def test_jackknife_se_of_mean_is_standard_error():
    x = np.random.default_rng(5).normal(size=200)
    jack = (x.sum() - x) / (x.size - 1)
    assert jackknife_se(jack) == pytest.approx(x.std(ddof=1) / np.sqrt(x.size), rel=1e-10)


def test_bca_interval_matches_scipy_for_skewed_mean():
    rng = np.random.default_rng(6)
    x = rng.exponential(size=40)
    boot = bootstrap_counts(x.size, 20000, rng) @ x / x.size
    jack = (x.sum() - x) / (x.size - 1)
    lo, hi = bca_interval(x.mean(), boot, jack, 0.9)
    ref = scipy.stats.bootstrap((x,), np.mean, confidence_level=0.9, method="BCa",
                                n_resamples=20000, random_state=7).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.05 * width and abs(hi - ref.high) < 0.05 * width
    # the skew moves the interval up relative to the percentile one
    plo, phi = np.quantile(boot, [0.05, 0.95])
    assert lo > plo and hi > phi


# ---------------------------------------------------------------- grids, blocks

def test_grid_layout_and_patches():
    cols, rows, shape = grid_layout(2401)
    assert shape == (49, 49) and cols[50] == 1 and rows[50] == 1
    cols, rows, shape = grid_layout(6, (3, 2))  # 3 rows, 2 columns
    assert shape == (2, 3) and cols.tolist() == [0, 0, 0, 1, 1, 1]
    lab = patch_labels(*grid_layout(49 * 49)[:2], 7)
    assert lab.max() + 1 == 49 and np.bincount(lab).tolist() == [49] * 49
    with pytest.raises(InputError, match="square grid"):
        grid_layout(10)
    with pytest.raises(InputError, match="holds 12 spots"):
        grid_layout(10, (3, 4))
    with pytest.raises(InputError, match="share one grid position"):
        grid_layout(2, spot_rows=[1, 1], spot_cols=[0, 0])


@pytest.mark.parametrize("nrows, ncols, missing, subset, min_shift", [
    (6, 6, 0.0, False, 2),   # square: 8 symmetries
    (4, 6, 0.0, False, 2),   # rectangular (even sizes): 4 symmetries
    (6, 6, 0.2, False, 3),   # missing points
    (5, 7, 0.1, True, 2),    # a subset of the grid, odd sizes
    (7, 7, 0.0, False, 0),   # includes the identity
])
def test_fft_null_equals_explicit_pairings(nrows, ncols, missing, subset, min_shift):
    rng = np.random.default_rng(8)
    nspot, nexp = nrows * ncols, 4
    b = rng.normal(size=(nspot, nexp))
    a = 0.5 * b + rng.normal(size=(nspot, nexp))
    a[rng.random(a.shape) < missing] = np.nan
    cols, rows, shape = grid_layout(nspot, (nrows, ncols))
    if subset:
        keep = rng.random(nspot) < 0.8
        a, b, cols, rows = a[keep], b[keep], cols[keep], rows[keep]
    valid = np.isfinite(a) & np.isfinite(b)
    A, B, _, _ = _centred(a, b, valid)
    out = null_correlations(A, B, valid, cols, rows, shape, 10 ** 6,
                            np.random.default_rng(0), min_shift=min_shift)
    nelem = 8 if nrows == ncols else 4
    assert set(out["element"]) == set(range(nelem))
    assert out["r"].size == out["navailable"]  # all pairings when nnull exceeds them
    seen_identity = False
    for r, e, s in zip(out["r"], out["element"], out["shift"]):
        partner = null_permutation(cols, rows, shape, e, tuple(s), min_shift=min_shift)
        assert r == pytest.approx(brute_null_r(A, B, valid.astype(float), partner), abs=1e-12)
        if not missing and not subset and (partner >= 0).all():
            assert r == pytest.approx(np.corrcoef(a.ravel(), b[partner].ravel())[0, 1], abs=1e-12)
        if e == 0 and tuple(s) == (0, 0):
            seen_identity = True
            assert r == pytest.approx(pearson_r(a, b), abs=1e-12)
    assert seen_identity == (min_shift == 0)


def test_null_excludes_tiny_shifts_and_self_pairs():
    """A strong pointwise correlation must not leak into the null via fixed points."""
    rng = np.random.default_rng(9)
    b = rng.normal(size=(400, 30))
    a = b + 0.5 * rng.normal(size=b.shape)  # r ~ 0.9
    res = correlation_analysis(a, b, patch_size=5, nboot=0, nnull=5000, seed=1)
    npt = a.size
    assert res.r > 0.85
    assert res.r_null_std == pytest.approx(1 / np.sqrt(npt), rel=0.1)
    assert abs(res.r_null_mean) < 0.2 / np.sqrt(npt)
    assert res.nnull == 8 * (400 - 9)  # all allowed pairings when nnull exceeds them
    assert np.abs(res.r_null).max() < 6 / np.sqrt(npt)
    assert res.p_value == pytest.approx(1 / (1 + res.nnull))
    assert res.p_value_one_sided == pytest.approx(1 / (1 + res.nnull))
    out = null_correlations(*_centred(a, b, np.ones_like(a, bool))[:2], np.ones_like(a, bool),
                            *grid_layout(400), 10 ** 6, rng)
    cyc = np.minimum(out["shift"], 20 - out["shift"])
    assert not ((cyc[:, 0] < 2) & (cyc[:, 1] < 2)).any()
    assert out["navailable"] == 8 * (400 - 9)


# ---------------------------------------------------------------- injection

def test_injected_correlation_recovered_with_unit_pulls():
    pulls_r, pulls_s, cover_pct, cover_bca = [], [], 0, 0
    for seed in range(50):
        rng = np.random.default_rng(100 + seed)
        a, b, r_true = injected(rng)
        res = correlation_analysis(a, b, patch_size=3, nboot=300, nnull=0, seed=seed)
        pulls_r.append((res.r - r_true) / res.r_err_bootstrap)
        pulls_s.append((res.slope - 0.8) / res.slope_err)
        cover_pct += res.ci_low <= r_true <= res.ci_high
        cover_bca += res.bca_low <= r_true <= res.bca_high
    pulls_r, pulls_s = np.array(pulls_r), np.array(pulls_s)
    for p in (pulls_r, pulls_s):
        assert 0.7 < p.std() < 1.3
        assert abs(p.mean()) < 0.45
    assert cover_pct >= 43 and cover_bca >= 43  # 95 % intervals: expect ~47.5 of 50


def test_injected_correlation_single_run():
    a, b, r_true = injected(np.random.default_rng(11))
    res = correlation_analysis(a, b, patch_size=5, nboot=500, nnull=500, seed=0)
    assert abs(res.slope - 0.8) < 3 * res.slope_err
    assert abs(res.r - r_true) < 3 * res.r_err_bootstrap
    assert res.ci_low < res.r < res.ci_high and res.bca_low < res.r < res.bca_high
    assert res.p_value < 0.01 and res.p_value_one_sided < 0.01
    assert res.nspot == 225 and res.npoint == 225 * 40 and res.nblocks == 9
    assert abs(res.intercept - (1 - 0.8)) < 5 * res.slope_err
    assert res.slope_err_jackknife == pytest.approx(res.slope_err, rel=0.3)


def test_independent_pvalue_uniform_over_200_seeds():
    p2, p1, z = [], [], []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        a = 1 + 0.01 * rng.normal(size=(100, 10))
        b = 1 + 0.01 * rng.normal(size=(100, 10))
        a[rng.random(a.shape) < 0.05] = np.nan
        res = correlation_analysis(a, b, patch_size=5, nboot=0, nnull=199, seed=seed)
        p2.append(res.p_value)
        p1.append(res.p_value_one_sided)
        z.append(res.r / res.r_null_std)
    assert scipy.stats.kstest(p2, "uniform").pvalue > 0.01
    assert scipy.stats.kstest(p1, "uniform").pvalue > 0.01
    assert 0.8 < np.std(z) < 1.2 and abs(np.mean(z)) < 0.25  # r consistent with 0


# ---------------------------------------------------------------- error methods

def test_error_methods_agree_on_spatially_independent_data():
    rng = np.random.default_rng(12)
    b = rng.normal(size=(900, 20))
    a = 0.6 * b + rng.normal(size=b.shape)
    res = correlation_analysis(a, b, patch_size=3, nboot=1000, nnull=0, seed=3)
    assert res.nblocks == 100
    errs = [res.r_err_bootstrap, res.r_err_jackknife, res.r_err_block]
    assert max(errs) / min(errs) < 1.3
    serrs = [res.slope_err, res.slope_err_jackknife, res.slope_err_block]
    assert max(serrs) / min(serrs) < 1.3


def test_block_jackknife_exceeds_naive_for_spatially_correlated_residuals():
    rng = np.random.default_rng(13)
    nside, nexp = 30, 20
    fa = smooth_field(nside, 3.0, rng)[:, None]  # per-spot patterns shared by neighbours
    fb = smooth_field(nside, 3.0, rng)[:, None]
    b = fb + 0.5 * rng.normal(size=(nside ** 2, nexp))
    a = fa + 0.5 * rng.normal(size=(nside ** 2, nexp))
    res = correlation_analysis(a, b, patch_size=6, nboot=200, nnull=0, seed=0)
    assert res.r_err_block > 1.5 * res.r_err_jackknife
    assert res.slope_err_block > 1.5 * res.slope_err_jackknife


def test_amp_blocks():
    rng = np.random.default_rng(14)
    a, b = rng.normal(size=(2, 256, 10))
    amp = np.repeat(["C0%d" % i for i in range(8)], 32)
    res = correlation_analysis(a, b, block="amp", block_labels=amp, nboot=100, nnull=100)
    assert res.block == "amp" and res.nblocks == 8 and np.isfinite(res.r_err_block)


def test_rectangular_grid_and_subset():
    rng = np.random.default_rng(15)
    a, b = rng.normal(size=(2, 8 * 12, 6))
    res = correlation_analysis(a, b, grid_shape=(8, 12), patch_size=4, nboot=50, nnull=300)
    assert res.nnull == 300 and np.isfinite(res.p_value)
    k = np.arange(96)
    keep = k % 3 != 0
    res2 = correlation_analysis(a[keep], b[keep], spot_rows=(k % 8)[keep],
                                spot_cols=(k // 8)[keep], patch_size=4, nboot=50, nnull=50)
    assert res2.nspot == keep.sum() and np.isfinite(res2.r_null_std)


# ---------------------------------------------------------------- spearman

def test_spearman_matches_scipy_and_is_rank_invariant():
    rng = np.random.default_rng(16)
    b = rng.normal(size=(64, 8))
    a = b + rng.normal(size=b.shape)
    res = correlation_analysis(a, b, method="spearman", patch_size=4, nboot=100, nnull=100)
    assert res.r == pytest.approx(scipy.stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    res_exp = correlation_analysis(np.exp(3 * a), b, method="spearman", patch_size=4,
                                   nboot=100, nnull=100)
    assert res_exp.r == pytest.approx(res.r, abs=1e-12)
    assert res_exp.p_value == res.p_value and res_exp.r_err_bootstrap == res.r_err_bootstrap
    pear = correlation_analysis(a, b, patch_size=4, nboot=100, nnull=0)
    assert res.slope == pytest.approx(pear.slope)  # the slope is always on the raw values


# ---------------------------------------------------------------- API, reproducibility

def test_result_row_and_reproducibility():
    rng = np.random.default_rng(17)
    a, b = rng.normal(size=(2, 144, 10))
    r1 = correlation_analysis(a, b, patch_size=4, nboot=200, nnull=200, seed=5)
    r2 = correlation_analysis(a, b, patch_size=4, nboot=200, nnull=200,
                              seed=np.random.default_rng(5))
    r3 = correlation_analysis(a, b, patch_size=4, nboot=200, nnull=200, seed=6)
    assert r1.as_row() == r2.as_row()
    np.testing.assert_array_equal(r1.r_null, r2.r_null)
    assert r3.r == r1.r and r3.r_err_bootstrap != r1.r_err_bootstrap
    row = r1.as_row()
    for col in ("r", "r_err_bootstrap", "r_err_jackknife", "r_err_block", "r_null_std",
                "p_value", "slope", "slope_err", "nspot", "npoint", "bca_low", "ci_high"):
        assert col in row
    assert "r_boot" not in row and "r_null" not in row
    tab = Table(rows=[{"quantity": "flux", **row}])
    assert len(tab) == 1 and tab["nspot"][0] == 144
    assert isinstance(r1, CorrelationResult) and "r =" in str(r1)


def test_skipping_bootstrap_and_null_gives_nan():
    a, b = np.random.default_rng(18).normal(size=(2, 36, 5))
    res = correlation_analysis(a, b, patch_size=3, nboot=0, nnull=0)
    assert np.isnan(res.r_err_bootstrap) and np.isnan(res.p_value) and res.nnull == 0
    assert np.isfinite(res.r_err_jackknife) and np.isfinite(res.r_err_block)


def test_bad_inputs():
    rng = np.random.default_rng(19)
    a, b = rng.normal(size=(2, 49, 6))
    with pytest.raises(InputError, match="different shapes"):
        correlation_analysis(a, b[:, :5])
    with pytest.raises(InputError, match="2-D"):
        correlation_analysis(a.ravel(), b.ravel())
    with pytest.raises(InputError, match="no jointly valid"):
        correlation_analysis(np.full_like(a, np.nan), b)
    with pytest.raises(InputError, match="block jackknife needs at least 2"):
        correlation_analysis(a, b, block="amp", block_labels=["C10"] * 49)
    with pytest.raises(InputError, match="block jackknife needs at least 2"):
        correlation_analysis(a, b, patch_size=7)
    with pytest.raises(InputError, match="needs block_labels"):
        correlation_analysis(a, b, block="amp")
    with pytest.raises(InputError, match="labels for 49 spots"):
        correlation_analysis(a, b, block="amp", block_labels=[0, 1])
    with pytest.raises(InputError, match="unknown method"):
        correlation_analysis(a, b, method="kendall")
    with pytest.raises(InputError, match="unknown block"):
        correlation_analysis(a, b, block="ccd")
    with pytest.raises(InputError, match="confidence"):
        correlation_analysis(a, b, confidence=95)
    few = np.full_like(a, np.nan)
    few[:2] = a[:2]
    with pytest.raises(InputError, match="only 2 spots"):
        correlation_analysis(few, b)
    with pytest.raises(InputError, match="constant"):
        correlation_analysis(np.ones_like(a), b)
    with pytest.raises(InputError, match="holds 48 spots"):
        correlation_analysis(a, b, grid_shape=(6, 8))
    with pytest.raises(InputError, match="no null pairings"):
        correlation_analysis(a[:4], b[:4], grid_shape=(2, 2), patch_size=1, nnull=10)


# ---------------------------------------------------------------- variance decomposition

def test_variance_decomposition_flat_explains_response():
    rng = np.random.default_rng(20)
    q = 1 + 0.02 * rng.normal(size=(100, 50))
    noise = 0.01
    t = q * (1 + noise * rng.normal(size=q.shape))
    t[rng.random(t.shape) < 0.05] = np.nan
    dec = variance_decomposition(t, q, t_err=np.full_like(t, noise))
    assert dec["var_t"] == pytest.approx(dec["var_t_between"] + dec["var_t_within"])
    assert dec["frac_explained_flat"] == pytest.approx(0.02 ** 2 / (0.02 ** 2 + noise ** 2), abs=0.03)
    assert dec["frac_explained_regression"] == pytest.approx(dec["r"] ** 2)
    assert dec["slope"] == pytest.approx(1.0, abs=0.03)
    assert abs(dec["var_d_excess"]) < 0.05 * dec["var_noise"]
    assert dec["frac_noise"] == pytest.approx(dec["frac_unexplained_flat"], rel=0.05)


def test_variance_decomposition_independent_flat():
    rng = np.random.default_rng(21)
    q = 1 + 0.02 * rng.normal(size=(100, 50))
    t = 1 + 0.02 * rng.normal(size=q.shape)
    dec = variance_decomposition(t, q)
    assert abs(dec["frac_explained_regression"]) < 0.01
    assert dec["frac_explained_flat"] == pytest.approx(-1.0, abs=0.1)  # dividing adds var(q)
    with pytest.raises(InputError, match="different shapes"):
        variance_decomposition(t, q[:, :3])


# ---------------------------------------------------------------- properties

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(3, 40), elements=finite),
       arrays(np.float64, st.integers(3, 40), elements=finite),
       st.floats(0.01, 100.0), st.floats(-1e3, 1e3), st.booleans())
def test_pearson_properties(x, y, scale, offset, flip):
    n = min(x.size, y.size)
    x, y = x[:n], y[:n]
    assume(np.std(x) > 1e-3 * (1 + np.abs(x).max()) and np.std(y) > 1e-3 * (1 + np.abs(y).max()))
    r = pearson_r(x, y)
    assert -1.0 <= r <= 1.0
    assert pearson_r(y, x) == pytest.approx(r, abs=1e-12)
    sign = -1.0 if flip else 1.0
    assert pearson_r(sign * scale * x + offset, y) == pytest.approx(sign * r, abs=1e-8)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.floats(0.0, 0.5))
def test_spot_sums_agree_with_pearson(seed, missing):
    rng = np.random.default_rng(seed)
    a = 1 + 0.01 * rng.normal(size=(20, 7))
    b = 1 + 0.01 * rng.normal(size=(20, 7)) + 0.3 * (a - 1)
    a[rng.random(a.shape) < missing] = np.nan
    assume(np.isfinite(a).sum() >= 3)
    assert spot_sums(a, b).r() == pytest.approx(pearson_r(a, b), abs=1e-10)


def test_symmetries_table():
    assert len(SYMMETRIES) == len(set(SYMMETRIES)) == 8
