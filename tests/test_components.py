"""The component split (amp / within / all), the flat-noise correction and a seeded Monte Carlo.

The Monte Carlo here generates ``[spot, exposure]`` data directly with numpy
(not with :mod:`spotflat.simulate`): the real R22_S11 amplifier layout, a
49 x 49 grid dithered over one grid step, 50 dithers, spot footprints that
blend the gains across seams, independent or shared gains, tree rings at
1e-4..1e-3, the CCOB illumination gradient and the flat's photon noise. The
statistics then run at the defaults of ``spotflat correlate`` (1000
bootstrap, 1000 null). Bounds are loose (20 realisations) but an error three
times too small fails them. The full table is ``benchmarks/calibrate_errors.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from spotflat import geometry
from spotflat.components import amp_weights, analyse_components, boundary_keep, decompose
from spotflat.compare import flux_footprint
from spotflat.eiv import demeaned_noise, flat_electrons, reliability
from spotflat.errors import InputError
from spotflat.footprint import sample_flat

DET = "R22_S11"
NY, NX = 4004, 4096
AMP_NX, AMP_NY = 512, 2002


def _rings(x, y, rng):
    """A tree-ring pattern: radial sinusoid of drifting wavelength about a centre off one corner."""
    amp = 10 ** rng.uniform(-4, -3)
    cx, cy = rng.choice([-600, NX + 600]), rng.choice([-600, NY + 600])
    r = np.hypot(x - cx, y - cy)
    lam = rng.uniform(30, 90)
    return amp * np.sin(2 * np.pi * r / lam + 0.3 * np.sin(r / 700.0) + rng.uniform(0, 2 * np.pi))


def generate(rng, scenario, ndither=50, electrons=5e4, sigma=np.sqrt(5.0) / np.sqrt(2), pixel_noise=False):
    """``t, q, x, y`` of one run; ``scenario`` is ``"null"`` (unrelated flat) or ``"response"``.

    The flat's photon noise is drawn per pixel and sampled with the footprint
    (as a real flat's is) when ``pixel_noise``, else per point with the
    covariance of overlapping footprints (much cheaper).
    """
    ncols = nrows = 49
    step = 65.3
    k = np.arange(ncols * nrows)
    u = (k // nrows - 24) * step
    v = (k % nrows - 24) * step
    x0, y0 = NX / 2 + rng.uniform(-20, 20), NY / 2 + rng.uniform(-20, 20)
    off = rng.uniform(-0.5, 0.5, (ndither, 2)) * step
    th = 0.004
    x = x0 + off[:, 0][None, :] + (u * np.cos(th) - v * np.sin(th))[:, None]
    y = y0 + off[:, 1][None, :] + (u * np.sin(th) + v * np.cos(th))[:, None]
    # footprint share on each amplifier column/row (the spots and the flat blend the gains alike)
    ex = np.arange(9) * AMP_NX - 0.5
    ey = np.arange(3) * AMP_NY - 0.5
    fx = np.diff(ndtr((ex[None, None, :] - x[..., None]) / sigma), axis=-1)
    fy = np.diff(ndtr((ey[None, None, :] - y[..., None]) / sigma), axis=-1)
    fx /= fx.sum(-1, keepdims=True)
    fy /= fy.sum(-1, keepdims=True)
    g_t = rng.normal(0, 0.01, (2, 8))
    g_q = g_t if scenario == "response" else rng.normal(0, 0.01, (2, 8))
    steps_t = np.einsum("kjr,kjc,rc->kj", fy, fx, g_t)
    steps_q = np.einsum("kjr,kjc,rc->kj", fy, fx, g_q)
    ring_t = _rings(x, y, rng)
    ring_q = ring_t if scenario == "response" else _rings(x, y, rng)
    ang = rng.uniform(0, 2 * np.pi)
    uu, vv = 2 * x / NX - 1, 2 * y / NY - 1
    illum = 0.015 * (np.cos(ang) * uu + np.sin(ang) * vv) - 0.01 * (uu ** 2 + vv ** 2)
    # pixel-scale response (PRNU, dust) seen through the footprint: shared by a matching flat
    small_t = rng.normal(0, 5e-4, x.shape)
    small_q = small_t if scenario == "response" else rng.normal(0, 5e-4, x.shape)
    if pixel_noise:
        img = np.float32(1) + rng.standard_normal((NY, NX), dtype=np.float32) / np.float32(np.sqrt(electrons))
        noise = sample_flat(img, x.ravel(), y.ravel(), sigma=sigma).reshape(x.shape) - 1
    else:
        # per point, with the covariance that sampling a white-noise image gives (overlapping
        # footprints of nearby dithers share pixels; test_flat_noise_sum_matches_sampled_white_noise
        # checks this covariance against sample_flat itself)
        from spotflat.eiv import _tent_overlap
        from spotflat.footprint import SIZE_STEP, gaussian_kernel1d

        g = gaussian_kernel1d(SIZE_STEP * round(sigma / SIZE_STEP))
        c1, half = np.correlate(g, g, mode="full"), g.size - 1
        cov = (_tent_overlap(c1, half, x[:, :, None], x[:, None, :])
               * _tent_overlap(c1, half, y[:, :, None], y[:, None, :])) / electrons
        chol = np.linalg.cholesky(cov + 1e-9 * np.eye(ndither) * cov.max())
        noise = np.einsum("kij,kj->ki", chol, rng.standard_normal(x.shape))
    t = 1 + steps_t + ring_t + small_t + rng.normal(0, 1.8e-3, x.shape)
    # a flat is response x illumination: added instead, the illumination's mean over the spots
    # (-0.4 %, its quadratic fall-off) scaled q's structure after the per-spot normalisation and
    # biased the all-row slope by -0.46 % (1.25 of its calibrated errors)
    q = (1 + steps_q + ring_q + small_q) * (1 + illum) + noise
    miss = rng.random(x.shape) < 0.03
    t[miss] = q[miss] = np.nan
    t /= np.nanmean(t, axis=1, keepdims=True)
    q /= np.nanmean(q, axis=1, keepdims=True)
    return t, q, x, y, np.full(ncols * nrows, sigma)


def _analyse(t, q, x, y, sig, seed, electrons=5e4, resample=False):
    """The recommended numbers at the correlate defaults.

    They do not depend on the bootstrap and null resamples (those feed the
    method-specific columns only; ``test_recommended_numbers_do_not_need_resamples``
    checks it), so the Monte Carlo skips them unless ``resample``.
    """
    kw = {} if resample else {"nboot": 0, "nnull": 0}
    res, _ = analyse_components(t, q, detector=DET, x=x, y=y, grid_shape=(49, 49), footprint_sigma=sig,
                                flat_electrons=electrons, seed=seed, **kw)
    return {r.component: r for r in res}


def test_recommended_numbers_do_not_need_resamples():
    t, q, x, y, sig = generate(np.random.default_rng(11), "null")
    full = _analyse(t, q, x, y, sig, seed=3, resample=True)  # 1000 bootstrap + 1000 null, as correlate
    bare = _analyse(t, q, x, y, sig, seed=3)
    for c in full:
        for name in ("r", "r_err", "r_low", "r_high", "p_value", "slope", "slope_err", "slope_low", "slope_high"):
            assert getattr(full[c], name) == getattr(bare[c], name), (c, name)
    assert np.isfinite(full["all"].extra["p_value_null"]) and np.isfinite(full["amp"].extra["p_value_perm"])


def test_block_chooses_the_all_rows_method_blocks_only():
    t, q, x, y, sig = generate(np.random.default_rng(5), "null")
    kw = dict(detector=DET, x=x, y=y, grid_shape=(49, 49), footprint_sigma=sig, flat_electrons=5e4, seed=1,
              nboot=0, nnull=0, components=("all",))
    (amp,), _ = analyse_components(t, q, block="amp", **kw)
    (patch,), _ = analyse_components(t, q, block="patch", patch_size=10, **kw)
    assert amp.extra["block"] == "amp" and patch.extra["block"] == "patch"
    assert patch.extra["nblocks"] == 25 and amp.extra["nblocks"] == 16
    assert patch.extra["r_err_block"] != amp.extra["r_err_block"]
    for name in ("r", "r_err", "r_low", "r_high", "p_value", "slope", "slope_err", "slope_low", "slope_high"):
        assert getattr(amp, name) == getattr(patch, name), name
    with pytest.raises(InputError, match="unknown block"):
        analyse_components(t, q, block="ccd", **kw)


@pytest.fixture(scope="module")
def monte_carlo():
    out = {"null": [], "response": []}
    for scen in out:
        for i in range(20):
            rng = np.random.default_rng([i, 12, scen == "null"])
            out[scen].append(_analyse(*generate(rng, scen), seed=i))
    return out


@pytest.mark.parametrize("component", ["all", "amp", "within"])
def test_null_p_values_and_r_intervals_are_calibrated(monte_carlo, component):
    rows = [m[component] for m in monte_carlo["null"]]
    p = np.array([r.p_value for r in rows])
    r = np.array([r.r for r in rows])
    err = np.array([r.r_err for r in rows])
    cover = np.mean([r.r_low <= 0 <= r.r_high for r in rows])
    assert np.mean(p < 0.05) <= 0.2, p  # 5 % expected; 3x-too-small errors give ~50 %
    assert cover >= 0.8, cover
    ratio = np.sqrt(np.mean(err ** 2)) / np.std(r, ddof=1)
    assert 0.6 < ratio < 1.7, ratio
    slope_cover = np.mean([r.slope_low <= 0 <= r.slope_high for r in rows])
    assert slope_cover >= 0.8, slope_cover


@pytest.mark.parametrize("component", ["all", "amp", "within"])
def test_response_slope_consistent_with_one(monte_carlo, component):
    rows = [m[component] for m in monte_carlo["response"]]
    slope = np.array([r.slope for r in rows])
    err = np.array([r.slope_err for r in rows])
    cover = np.mean([r.slope_low <= 1 <= r.slope_high for r in rows])
    assert cover >= 0.8, (cover, slope)
    z = (slope - 1) / err
    assert abs(np.mean(z)) < 0.8 and np.std(z, ddof=1) < 1.6, z
    assert all(r.p_value < 1e-3 for r in rows)


def test_decompose_recovers_injected_levels_and_removes_illumination():
    rng = np.random.default_rng(4)
    t, q, x, y, sig = generate(rng, "response", electrons=1e9)
    names = geometry.amp_names(DET)
    lab = geometry.amp_of_pixel(DET, np.nan_to_num(x, nan=-1), np.nan_to_num(y, nan=-1))
    amp = np.vectorize({n: i for i, n in enumerate(names)}.get)(lab)
    keep = boundary_keep(DET, x, y) & np.isfinite(t)
    dec = decompose(t, q, amp, x, y, keep, (NY, NX), len(names), detector=DET, sigma=sig)
    ok = np.isfinite(dec.levels_a)
    # the mid-line band is left out: the two read-out rows are separate groups (a seam no spot
    # crosses splits a row further)
    assert ok.sum() >= 14 and len(set(dec.group[ok])) >= 2
    top = np.array([geometry.amp_slices(DET)[n][0].start > 0 for n in names])
    assert not set(dec.group[ok & top]) & set(dec.group[ok & ~top])
    # the same gains: the levels agree; the illumination (only in q) stays out of them
    assert np.corrcoef(dec.levels_a[ok], dec.levels_b[ok])[0, 1] > 0.97
    assert np.median(np.abs(dec.levels_a[ok] - dec.levels_b[ok])) < 1e-3  # t carries 1.8e-3 noise per point
    w = np.isfinite(dec.wa)
    assert np.corrcoef(dec.wa[w], dec.wb[w])[0, 1] > 0.1  # the shared rings survive


def test_amp_weights_blend_at_seams():
    w = amp_weights(DET, np.array([511.5 - 0.5, 100.0]), np.array([1000.0, 1000.0]), np.array([1.5, 1.5]))
    assert np.allclose(w.sum(axis=1), 1)
    assert np.isclose(np.sort(w[0])[-2:], [ndtr(-0.5 / 1.5), ndtr(0.5 / 1.5)], atol=1e-9).all()
    assert w[1].max() == 1.0


def test_flat_noise_sum_matches_sampled_white_noise():
    """The errors-in-variables noise is exact for how the flat is sampled."""
    rng = np.random.default_rng(0)
    ny, nx = 600, 600
    nspot, nexp = 60, 30
    cx, cy = rng.uniform(60, 540, (2, nspot))
    x = cx[:, None] + rng.uniform(-6, 6, (nspot, nexp))  # dense dithers: overlapping footprints
    y = cy[:, None] + rng.uniform(-6, 6, (nspot, nexp))
    sig = rng.choice([1.2, 1.6, 2.0], nspot)
    electrons = 2.5e4
    use = rng.random((nspot, nexp)) > 0.1
    expect = demeaned_noise(x, y, use, sig, None, electrons)
    sums = []
    for _ in range(30):
        img = 1 + rng.normal(0, 1 / np.sqrt(electrons), (ny, nx))
        s = sample_flat(img, x.ravel(), y.ravel(), sigma=np.repeat(sig, nexp)).reshape(nspot, nexp)
        s = np.where(use, s, np.nan)
        d = s - np.nanmean(s, axis=1, keepdims=True)
        sums.append(np.nansum(d ** 2))
    # 30 independent images: the mean is known to ~2 %
    assert abs(np.mean(sums) / expect - 1) < 0.05, (np.mean(sums), expect)
    # a top-hat footprint, and a list of masks at once
    both = demeaned_noise(x, y, [use, use & (x > 300)], None, 4.0, electrons)
    assert both[1] < both[0] and both[0] > 0


def test_flat_electrons_and_reliability():
    assert flat_electrons({"ccd": 2e4}, {"GAIN": 1.5}) == 3e4
    assert flat_electrons({"ccd": 0.98}) is None
    assert flat_electrons(None, None, 7e4) == 7e4
    with pytest.raises(Exception, match="positive"):
        flat_electrons(None, None, -1.0)
    assert reliability(1.0, 4.0) == 0.75 and np.isnan(reliability(5.0, 4.0))


def test_flux_footprint_rules():
    assert flux_footprint("base_SdssShape_instFlux") == ("gaussian2", None)
    assert flux_footprint("base_GaussianFlux_instFlux") == ("gaussian2", None)
    assert flux_footprint("base_CircularApertureFlux_17_0_instFlux") == ("tophat", 17.0)
    assert flux_footprint("DFLUX") == ("gaussian", None)


@pytest.mark.parametrize("electrons", [1e4, 1e6])
def test_slope_corrected_over_flat_levels(electrons):
    """Errors in variables from 1e4 to 1e6 e-/pixel: the corrected slope stays at 1."""
    z = []
    for i in range(2):
        rng = np.random.default_rng([i, int(electrons)])
        res = _analyse(*generate(rng, "response", electrons=electrons, pixel_noise=True), seed=i,
                       electrons=electrons)
        w = res["within"]
        z.append((w.slope - 1) / w.slope_err)
        if electrons == 1e4:
            assert w.reliability < 0.5 and w.slope_raw < 0.6  # a strong attenuation, corrected
    # at 1e4 e-/pixel the within reliability is ~0.1: the correction holds to ~2 sigma here (see docs)
    assert abs(np.mean(z)) < 3.0, z
