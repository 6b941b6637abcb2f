"""Tests of the simulator: response model, spot measurements, files and truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from spotflat.errors import InputError
from spotflat.response import ResponseParams, detector_layout, response_map, synthetic_layout
from spotflat.simulate import (bot_position, effective_scales, footprint_moments, read_truth, simulate_data,
                               simulate_run, simulate_spots, spot_filename)

SMALL = dict(ncols=15, nrows=15, xstep=200.0)  # a sparse grid covering the CCD: fast


def _corr(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    return np.corrcoef(a[ok], b[ok])[0, 1]


@pytest.fixture(scope="module")
def e2v_response():
    return response_map("R22_S11", seed=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A few small simulated runs, written once for the module."""
    base = tmp_path_factory.mktemp("sim")
    out = {}
    # QE-like rings: the flat then sees exactly the spots' response (pixel-area rings break that, below)
    qe = ResponseParams(treering_kind="qe")
    out["none"] = simulate_run(base / "none", ndither=8, seed=5, noise=0.0, illumination=0.0, **SMALL,
                               response=qe)
    out["area"] = simulate_run(base / "area", ndither=8, seed=5, noise=0.0, illumination=0.0, **SMALL)
    out["norings"] = simulate_run(base / "norings", ndither=8, seed=5, noise=0.0, illumination=0.0, **SMALL,
                                  response=ResponseParams(treering_boost=0.0))
    out["illum"] = simulate_run(base / "illum", ndither=8, seed=5, noise=0.0, illumination=0.05, **SMALL,
                                response=qe)
    out["treering"] = simulate_run(base / "tr", ndither=8, seed=5, noise=0.0, illumination=0.0,
                                   flat_mismatch="treering", **SMALL)
    # without gain steps and dust: the few amp boundaries would make one seed's r noisy
    out["independent"] = simulate_run(base / "ind", ndither=8, seed=5, noise=0.0, illumination=0.0,
                                      flat_mismatch="independent", **SMALL,
                                      response=ResponseParams(gain_sigma=0.0, ndust=0))
    # the old synthetic E2V rings (0.15 %, 10-100x real ones), asked for explicitly: at real amplitudes
    # a flat at another wavelength differs from the spots by less than this test resolves
    out["wavelength"] = simulate_run(base / "wl", ndither=8, seed=5, noise=0.0, illumination=0.0,
                                     flat_mismatch="wavelength", **SMALL,
                                     response=ResponseParams(treering_amplitude=0.0015))
    out["dm"] = simulate_run(base / "dm", detector="R02_S02", ndither=4, seed=2)
    out["itl0"] = simulate_run(base / "itl0", detector="R02_S02", ndither=1, seed=1, noise=0.0, **SMALL)
    out["legacy"] = simulate_run(base / "legacy", detector="R02_S02", ndither=4, seed=2, fmt="legacy")
    return out


# ---------------------------------------------------------------- footprints

def test_footprint_moments_uniform_and_gradient():
    img = np.ones((60, 70))
    m = footprint_moments(img, [30.3, 35.7], [25.1, 30.9], 5.0, 5.5, 0.4)
    assert np.allclose(m["mean"], 1.0)
    for k in ("dx", "dy", "dxx", "dyy", "dxy"):
        assert np.allclose(m[k], 0.0, atol=1e-12)
    # R = 1 + g x: footprint mean is R at the centre, centroid moves by Sigma grad ln R
    g = 0.01
    yy_, xx_ = np.mgrid[0:60, 0:70]
    img = 1.0 + g * xx_
    m = footprint_moments(img, [30.3], [25.1], 5.0, 5.5, 0.4)
    r0 = 1 + g * 30.3
    assert m["mean"][0] == pytest.approx(r0, rel=2e-5)  # pixel sampling of G
    assert m["dx"][0] == pytest.approx(5.0 * g / r0, rel=1e-2)
    assert m["dy"][0] == pytest.approx(0.4 * g / r0, rel=1e-2)


def test_footprint_moments_off_image_loses_flux():
    m = footprint_moments(np.ones((40, 40)), [-0.5, 20.0], [20.0, 20.0], 5.0, 5.0, 0.0)
    assert m["mean"][0] == pytest.approx(0.5, abs=1e-3)  # centred on the CCD edge: half the spot is off
    assert m["mean"][1] == pytest.approx(1.0)


# ---------------------------------------------------------------- response

def test_response_map_shape_level_and_seed(e2v_response):
    shape, vendor, amps = detector_layout("R22_S11")
    assert vendor == "E2V" and len(amps) == 16
    assert e2v_response.shape == shape == (4004, 4096)
    assert e2v_response.dtype == np.float32
    assert abs(float(e2v_response.mean()) - 1) < 0.03
    assert np.array_equal(response_map("R22_S11", seed=3), e2v_response)
    assert not np.array_equal(response_map("R22_S11", seed=4), e2v_response)


def test_response_components_are_separable():
    """Turning the rings off changes only the ring factor (own random streams)."""
    p0 = ResponseParams(treering_amplitude=0.0)
    # the synthetic (QE-like) rings at the old ITL default of 0.4 %, asked for explicitly
    with_rings, info = response_map("R02_S02", seed=1, return_info=True,
                                    params=ResponseParams(treering_amplitude=0.004))
    without = response_map("R02_S02", seed=1, params=p0)
    ratio = with_rings / without
    amp = info["params"]["treering_amplitude"]
    assert info["vendor"] == "ITL" and amp == pytest.approx(0.004)
    assert 0.3 * amp < ratio.std() < amp  # a sinusoid of peak amp, modulated
    # the ratio is radial about the ring centre: constant along a circle arc
    xc, yc = info["treering_center"]
    assert not (0 <= xc < 4072 and 0 <= yc < 4000)  # centre off the CCD


def test_imsim_rings_are_the_default_with_real_centre_and_amplitude():
    from spotflat.treerings import treering_model

    full, info = response_map("R22_S20", seed=2, return_info=True)
    bare = response_map("R22_S20", seed=2, treerings=False)
    ring = full / bare
    model = treering_model("R22_S20")
    assert info["treering_kind"] == "area" and info["treering_center"] == pytest.approx(model.centre)
    # real amplitude: flat modulation rms ~4e-5 .. 1.3e-4 (imSim table rescaled to measured flats)
    assert 2e-5 < ring.std() < 2e-4
    assert info["params"]["treering_amplitude"] == pytest.approx(ring.std(), rel=0.01)
    # the ring factor is the area change 1 / ((1 + f') (1 + f / r)) of the table's f(r), about its centre
    ny, nx = ring.shape
    yy, xx = 2000, np.arange(0, nx, 97)
    r = np.hypot(xx - model.centre[0], yy - model.centre[1])
    expect = 1 / ((1 + model.derivative(r)) * (1 + model.displacement(r) / r))
    np.testing.assert_allclose(ring[yy, xx], expect, atol=2e-6)
    # a boost scales the displacement (for demonstrations)
    big = response_map("R22_S20", seed=2, params=ResponseParams(treering_boost=20.0)) / bare
    assert 15 < (big - 1).std() / (ring - 1).std() < 25


def test_vendor_edges_differ():
    itl = response_map("R02_S02", seed=0, params=ResponseParams(prnu=0, ndust=0, gain_sigma=0,
                                                                  treering_amplitude=0))
    e2v = response_map("R22_S11", seed=0, params=ResponseParams(prnu=0, ndust=0, gain_sigma=0,
                                                                 treering_amplitude=0))
    assert itl[1000, 0] < itl[1000, 500] - 0.05  # ITL loses response at the edge
    assert e2v[1000, 0] > e2v[1000, 500]  # E2V gains a little
    ny = itl.shape[0]
    assert itl[ny // 2 - 1, 500] < itl[ny // 2 - 10, 500] - 0.01  # ITL narrow mid-line row
    mid = e2v.shape[0] // 2
    assert e2v[mid + 50, 500] > e2v[mid - 50, 500]  # E2V step across the mid-line


def test_unknown_detector():
    with pytest.raises(InputError):
        response_map("R99_S99")


# ---------------------------------------------------------------- spots

def test_simulate_spots_reproducible_and_consistent(e2v_response):
    a = simulate_spots(e2v_response, ndither=5, seed=11, **SMALL)
    b = simulate_spots(e2v_response, ndither=5, seed=11, **SMALL)
    c = simulate_spots(e2v_response, ndither=5, seed=12, **SMALL)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.allclose(np.nan_to_num(a.flux), np.nan_to_num(c.flux))
    assert a.flux.shape == (225, 5)
    assert np.median(a.s) == pytest.approx(1.0)
    # the truth: flux_true = F s <R>_footprint, <R> from the response itself, seen through G**2 (moments
    # halved) as the SdssShape flux the catalogues are labelled with does
    fm = footprint_moments(e2v_response, a.x_true, a.y_true, a.xx_true / 2, a.yy_true / 2, a.xy_true / 2)
    np.testing.assert_allclose(a.resp, fm["mean"])
    g = simulate_spots(e2v_response, ndither=5, seed=11, flux_weight="gaussian", **SMALL)
    fm = footprint_moments(e2v_response, g.x_true, g.y_true, g.xx_true, g.yy_true, g.xy_true)
    np.testing.assert_allclose(g.resp, fm["mean"])
    assert not np.allclose(g.resp, a.resp)
    np.testing.assert_allclose(a.flux_true, a.F[:, None] * a.s[None, :] * a.resp)


def test_zero_noise_measurements_are_the_truth(e2v_response):
    sim = simulate_spots(e2v_response, ndither=6, seed=1, noise=0.0, outlier_fraction=0.0, **SMALL)
    ok = ~sim.missing
    np.testing.assert_allclose(sim.flux[ok] / (sim.F[:, None] * sim.s[None, :])[ok], sim.resp[ok], rtol=1e-12)
    assert np.all(np.isnan(sim.flux[sim.missing]))
    # centroids move up the response gradient by tiny amounts (~0.01 px)
    shift = np.hypot(sim.x - sim.x_true, sim.y - sim.y_true)[ok]
    assert 0 < np.median(shift) < 0.1


def test_noise_missing_and_outliers(e2v_response):
    sim = simulate_spots(e2v_response, ndither=20, seed=2, missing_fraction=0.05,
                         outlier_fraction=0.01, **SMALL)
    assert 0.03 < sim.missing.mean() < 0.07
    assert sim.outlier.sum() > 10
    good = ~sim.missing & ~sim.outlier
    pull = (sim.flux - sim.flux_true) / sim.flux_err
    assert np.std(pull[good]) == pytest.approx(1.0, abs=0.1)
    assert np.median(np.abs(pull[sim.outlier & ~sim.missing])) > 5


def test_raster_dither_covers_one_step(e2v_response):
    sim = simulate_spots(e2v_response, ndither=16, seed=0, dither="raster", **SMALL)
    ddx = np.asarray(sim.grid["ddx"])
    assert len(np.unique(np.round(ddx, 6))) == 4
    assert np.ptp(ddx) == pytest.approx(0.75 * 200.0)
    with pytest.raises(InputError):
        simulate_spots(e2v_response, ndither=2, dither="spiral", **SMALL)


# ---------------------------------------------------------------- names

def test_spot_filename_round_trips_through_parse_filename():
    from spotflat.grids import parse_filename

    name = spot_filename("R02_S02", 1500, -293.2, 39.6)
    assert name == "MC_C_20191031_001500_R02_S02_20.0s_-293.2x_39.6y_gridfit.cat"
    meta = parse_filename(spot_filename("R22_S11", 12, 1.26, -0.04, fmt="legacy"))
    assert meta["detector"] == "R22_S11" and meta["seqnum"] == 12
    assert (meta["bot_x"], meta["bot_y"]) == (1.3, -0.0)


def test_bot_position_inverts_projector_map():
    from spotflat.projector import bot_to_ccd

    x0, y0 = np.array([2100.0, 1900.5]), np.array([1950.0, 2010.0])
    bx, by = bot_position("R02_S02", x0, y0)
    name, x, y = bot_to_ccd(bx, by, detector="R02_S02")
    np.testing.assert_allclose(x, x0, atol=1e-6)
    np.testing.assert_allclose(y, y0, atol=1e-6)
    # the real R02_S02 exposure's header position lands near its CCD centre
    assert abs(float(bot_position("R02_S02", 2036.5, 2000.5)[0]) - (-296.5)) < 1


# ---------------------------------------------------------------- truth and modes

def test_mismatch_none_t_equals_q(runs):
    res = runs["none"]
    ok = np.isfinite(res.t) & ~res.spots.missing
    np.testing.assert_allclose(res.t_spot[ok], res.q[ok], rtol=1e-9)
    np.testing.assert_allclose(res.mismatch[ok], 1.0, rtol=1e-9)
    assert np.nanstd(res.t[ok]) > 1e-3  # there is structure to see
    # the calibration's t differs from q only by factors per spot and per exposure (~1e-3)
    ratio = res.t / res.q
    assert np.nanmax(np.abs(ratio[ok] - 1)) < 5e-3
    a, b = effective_scales(np.where(ok, ratio, 1.0), ok)
    np.testing.assert_allclose(ratio[ok], (a[:, None] * b[None, :])[ok], rtol=1e-10)


def test_area_rings_are_seen_by_the_flat_not_by_the_spot_flux(runs):
    """Pixel-area rings: flux conserved, centroid moved by f(r), flat modulated by the area change."""
    area, qe, bare = runs["area"], runs["none"], runs["norings"]
    ok = ~area.spots.missing & ~area.spots.outlier
    # the same draws, the same flat; the spots' flux misses exactly the ring area factor
    np.testing.assert_allclose(area.resp_flat[ok], qe.resp_flat[ok], rtol=1e-12)
    # f/r and 2nd order; <f'> is averaged over the spot's G, the flat over the flux's G**2
    np.testing.assert_allclose((area.mismatch * (1 - area.treering_fprime))[ok], 1.0, atol=1e-5)
    assert np.nanstd(area.treering_fprime[ok]) > 1e-5
    # the centroid moved by the footprint mean of f along the radius (noise 0)
    cx, cy = area.treering.centre
    ex, ey = area.spots.x_true - cx, area.spots.y_true - cy
    r = np.hypot(ex, ey)
    shift = ((area.spots.x - bare.spots.x) * ex + (area.spots.y - bare.spots.y) * ey) / r
    np.testing.assert_allclose(shift[ok], area.treering_shift[ok], atol=3e-7)  # float32 maps
    np.testing.assert_allclose(area.spots.flux[ok], bare.spots.flux[ok], rtol=1e-6)  # flux conserved
    # sizes change by f' across the ring: d(xx + yy) / (xx + yy) ~ <f'> (round spots)
    dT = (area.spots.xx + area.spots.yy) / (bare.spots.xx + bare.spots.yy) - 1
    assert _corr(dT[ok], area.treering_fprime[ok]) > 0.95
    assert np.nanstd(area.treering_shift[ok]) > 5e-5
    tr = read_truth(area.truth_path)
    assert tr["header"]["TRKIND"] == "area" and tr["header"]["TRMODEL"] == "imsim"
    np.testing.assert_allclose(np.asarray(tr["points"]["tr_shift"]), area.treering_shift.ravel())


def test_illumination_is_the_only_difference(runs):
    res = runs["illum"]
    ok = ~res.spots.missing & ~res.spots.outlier
    resp = np.where(ok, res.spots.resp, np.nan)
    expect = (np.nanmean(resp * res.illum, axis=1, keepdims=True)
              / np.nanmean(resp, axis=1, keepdims=True) / res.illum)
    np.testing.assert_allclose((res.t_spot / res.q)[ok], expect[ok], rtol=1e-9)
    assert np.nanstd(res.t_spot / res.q) > 1e-5


def test_mismatch_modes_do_what_they_say(runs):
    dev = {k: (runs[k].t_spot - 1, runs[k].q - 1) for k in ("none", "treering", "independent", "wavelength")}
    assert _corr(*dev["none"]) > 0.9999
    assert abs(_corr(*dev["independent"])) < 0.15
    assert 0.3 < _corr(*dev["treering"]) < 0.99
    assert 0.9 < _corr(*dev["wavelength"]) < 0.9999
    # treering: the spot/flat ratio is the injected pattern, of the requested size
    res = runs["treering"]
    m = res.mismatch[~res.spots.missing]
    assert 0.3 * 0.005 < np.std(m) < 0.005
    # t / q is the mismatch up to a constant per spot
    per_spot = np.where(res.spots.missing, np.nan, res.t_spot / res.q / res.mismatch)
    assert np.nanmax(np.nanstd(per_spot, axis=1)) < 1e-12


def test_truth_scales_are_what_a_calibration_recovers(tmp_path):
    from spotflat import build_calibration, read_grids

    res = simulate_run(tmp_path / "cal", ndither=6, seed=4, noise=0.0, outlier_fraction=0.0, **SMALL)
    cal = build_calibration(read_grids(res.outdir / "spotdata"), stat="mean", min_dithers=1,
                            tol=1e-14, maxiter=500)
    np.testing.assert_allclose(cal.exposures["scale"], res.s, rtol=1e-8)
    np.testing.assert_allclose(cal.spots["flux"], res.F, rtol=1e-8)
    # the projector's own brightness differs by the exposure-mean response (~1e-4)
    assert 1e-6 < np.std(res.s / res.spots.s) < 1e-3
    assert np.median(res.s) == pytest.approx(1.0)


def test_simulate_data_is_what_simulate_run_writes(runs):
    res = runs["treering"]
    sim = simulate_data("R22_S11", ndither=8, seed=5, noise=0.0, illumination=0.0,
                        flat_mismatch="treering", **SMALL)
    np.testing.assert_array_equal(sim.t, res.t)
    np.testing.assert_array_equal(sim.spots.flux, res.spots.flux)
    np.testing.assert_array_equal(sim.flat, fits.getdata(res.flat_path))


def test_independent_mode_over_seeds():
    """On a toy CCD, many realisations are cheap: r scatters about 0 (and is ~1 for none)."""
    layout = synthetic_layout((600, 600))
    kw = dict(ndither=10, layout=layout, ncols=8, nrows=8, xstep=60.0, noise=0.0, illumination=0.0)
    rs = []
    for seed in range(30):
        sim = simulate_data("toy", seed=seed, flat_mismatch="independent", **kw)
        ok = ~sim.spots.missing
        rs.append(_corr(sim.t_spot[ok] - 1, sim.q[ok] - 1))
    assert abs(np.mean(rs)) < 3 * np.std(rs) / np.sqrt(len(rs)) + 0.02
    sim = simulate_data("toy", seed=0, **kw)
    assert _corr(sim.t_spot - 1, sim.q - 1) > 0.9999


def test_truth_file_round_trip(runs):
    res = runs["treering"]
    tr = read_truth(res.truth_path)
    h = tr["header"]
    assert h["MISMATCH"] == "treering" and h["NDITHER"] == 8 and h["DETECTOR"] == "R22_S11"
    assert h["MISMAMP"] == 0.005 and h["NCOLS"] == 15
    nspot, nexp = res.t.shape
    assert len(tr["points"]) == nspot * nexp and len(tr["spots"]) == nspot
    np.testing.assert_allclose(np.asarray(tr["points"]["t"]).reshape(nspot, nexp), res.t)
    np.testing.assert_allclose(np.asarray(tr["points"]["mismatch"]).reshape(nspot, nexp), res.mismatch)
    np.testing.assert_allclose(tr["exposures"]["s"], res.s)
    np.testing.assert_allclose(tr["spots"]["F"], res.F)
    np.testing.assert_allclose(tr["spots"]["F_proj"], res.spots.F)
    np.testing.assert_allclose(np.asarray(tr["points"]["t_spot"]).reshape(nspot, nexp), res.t_spot)
    assert len(tr["amps"]) == 16
    assert tr["bin"] == 8 and tr["resp_bin"].shape == (4004 // 8, 4096 // 8)
    # binned mismatch is the injected ring pattern: ~1 on average, rms ~ amplitude
    assert abs(np.mean(tr["mismatch_bin"]) - 1) < 1e-3
    assert 0.001 < np.std(tr["mismatch_bin"]) < 0.005


def test_truth_flat_matches_written_flat(runs):
    """The assembled flat, sampled like the spots, gives the truth's q (noise 0)."""
    res = runs["illum"]
    img = fits.getdata(res.flat_path).astype(np.float64)
    sim = res.spots
    # the SdssShape flux sees the response through G**2: moments halved
    fm = footprint_moments(img, sim.x_true, sim.y_true, sim.xx_true / 2, sim.yy_true / 2, sim.xy_true / 2)
    ok = ~sim.missing & ~sim.outlier
    q = fm["mean"] / np.nanmean(np.where(ok, fm["mean"], np.nan), axis=1, keepdims=True)
    np.testing.assert_allclose(q[ok], res.q[ok], rtol=2e-5)  # float32 image, smooth-I approximation
    # the package's flat sampler (circular Gaussian footprint from the measured moments)
    # agrees to ~1e-5: a simulated run with no mismatch has nothing left but noise
    from spotflat.footprint import footprint_sigma, sample_flat

    qs = sample_flat(img, sim.x, sim.y, sigma=footprint_sigma(sim.xx, sim.yy) / np.sqrt(2))
    qs = qs / np.nanmean(np.where(ok, qs, np.nan), axis=1, keepdims=True)
    assert np.sqrt(np.nanmean((qs[ok] / res.q[ok] - 1) ** 2)) < 1e-4


def test_read_truth_rejects_other_files(runs):
    with pytest.raises(InputError):
        read_truth(runs["dm"].spot_files[0])


# ---------------------------------------------------------------- files

def test_dm_files_like_the_real_catalogue(runs, real_catalogue):
    res = runs["dm"]
    real = fits.open(real_catalogue)
    ours = fits.open(res.spot_files[0])
    real_cols = {c.name: c.format for c in real[1].columns}
    for c in ours[1].columns:
        assert c.name in real_cols, c.name
        assert c.format == real_cols[c.name], c.name
    for key in ("X0", "Y0", "XSTEP", "YSTEP", "THETA", "NCOLS", "NROWS"):
        assert key in ours["GRID_INFO"].header
    assert ours["GRID_INFO"].columns.names == real["GRID_INFO"].columns.names
    assert len(ours["GRID_INFO"].data) == 49 * 49
    idx = ours[1].data["spotgrid_index"]
    assert np.isnan(idx).sum() > 0  # unmatched junk sources
    assert np.array_equal(np.unique(ours[1].data["id"]), np.arange(1, len(idx) + 1))


def test_dm_files_read_back(runs):
    from spotflat import read_grids

    res = runs["dm"]
    g = read_grids(res.outdir / "spotdata")
    sim = res.spots
    assert g.flux.shape == (49 * 49, 4) and g.detector == "R02_S02"
    assert list(g.exposures["filename"]) == [p.name for p in res.spot_files]
    np.testing.assert_array_equal(np.isnan(g.flux), sim.missing)
    np.testing.assert_allclose(g.flux, sim.flux)
    np.testing.assert_allclose(g.x, sim.x)
    np.testing.assert_allclose(g.xy, sim.xy)
    np.testing.assert_allclose(g.dx, sim.x - sim.gx)
    np.testing.assert_allclose(g.exposures["x0"], sim.grid["x0"])


def test_legacy_files_read_back(runs):
    from spotflat import read_grids

    res = runs["legacy"]
    assert res.spot_files[0].name.endswith("_processed_grid.fits")
    with fits.open(res.spot_files[0]) as h:
        assert len(h[1].data) == 49 * 49
        assert h[1].columns.names == ["X", "Y", "DX", "DY", "XX", "YY", "DXX", "DYY", "FLUX", "DFLUX"]
        ok = np.isfinite(h[1].data["DFLUX"])
        assert np.all(h[1].data["FLUX"][ok] == 0) and np.all(h[1].data["XX"][ok] == 0)
        assert h[0].header["NCOLS"] == 49
    g = read_grids(res.outdir / "spotdata")
    sim = res.spots
    np.testing.assert_array_equal(np.isnan(g.flux), sim.missing)
    np.testing.assert_allclose(g.flux, sim.flux)
    np.testing.assert_allclose(g.yy, sim.yy)


def test_reproducible_files(tmp_path):
    a = simulate_run(tmp_path / "a", ndither=2, seed=9, **SMALL)
    b = simulate_run(tmp_path / "b", ndither=2, seed=9, **SMALL)
    assert [p.name for p in a.spot_files] == [p.name for p in b.spot_files]
    for pa, pb in zip(a.spot_files, b.spot_files):
        ta, tb = Table.read(pa, hdu=1), Table.read(pb, hdu=1)
        for name in ta.colnames:
            np.testing.assert_array_equal(ta[name], tb[name])
    np.testing.assert_array_equal(fits.getdata(a.flat_path), fits.getdata(b.flat_path))
    np.testing.assert_array_equal(read_truth(a.truth_path)["points"]["flux"],
                                  read_truth(b.truth_path)["points"]["flux"])


def test_raw_flat_assembles_back(tmp_path, runs):
    from spotflat import geometry

    res = simulate_run(tmp_path / "raw", detector="R02_S02", ndither=1, seed=1, noise=0.0,
                       flat_form="raw", **SMALL)
    ref = runs["itl0"]  # the same run, flat written assembled
    with fits.open(res.flat_path) as hdul:
        names = [h.name for h in hdul[1:] if h.name.upper().startswith("SEGMENT")]
        assert len(names) == 16
        assert hdul[0].header["RAFTBAY"] == "R02" and hdul[0].header["CCDSLOT"] == "S02"
        for h in hdul[1:17]:
            assert "DATASEC" in h.header and "DETSEC" in h.header
        assert hdul[1].data.dtype.kind == "i"  # integer ADU, as real raw files
        assembled = geometry.assemble_raw(hdul, overscan="mean")
    expected = fits.getdata(ref.flat_path).astype(np.float64)
    assert assembled.shape == expected.shape
    np.testing.assert_allclose(assembled, expected, atol=0.51)  # rounded to ADU, no noise
    # and the flat reader takes it to the same flat
    from spotflat.flats import load_flat

    raw = load_flat(res.flat_path, overscan="mean")
    assert raw.detector == "R02_S02" and raw.form == "raw"
    np.testing.assert_allclose(raw.data * raw.levels["ccd"], expected, atol=0.51)


def test_outdir_rules(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        simulate_run(tmp_path / "full", ndither=1, **SMALL)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    res = simulate_run(tmp_path / "full", ndither=2, overwrite=True, **SMALL)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["flat", "keep.txt", "spotdata", "truth.fits"]
    res = simulate_run(tmp_path / "full", ndither=1, overwrite=True, **SMALL)
    assert len(list((tmp_path / "full" / "spotdata").iterdir())) == 1 == len(res.spot_files)
    for bad in (dict(detector="R99_S99"), dict(fmt="csv"), dict(flat_mismatch="some"),
                dict(flat_form="png"), dict(ndither=0), dict(preset="huge")):
        with pytest.raises(InputError):
            simulate_run(tmp_path / "new", **{"ndither": 1, **bad})
        assert not (tmp_path / "new").exists()
