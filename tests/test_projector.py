"""Test-stand projector conventions and the fitted projector -> grid-centre map."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from spotflat.errors import InputError
from spotflat.geometry import focal_to_ccd, get_camera
from spotflat.projector import (CONVENTIONS, BotConvention, bot_to_ccd, bot_to_focal,
                                default_convention, fit_projector_map, focal_to_bot,
                                get_convention, predicted_projector_map, set_default_convention)


def test_default_convention_swaps_axes():
    assert default_convention().name == "ccs"
    assert bot_to_focal(-296.5, 41.7) == (41.7, -296.5)
    assert focal_to_bot(41.7, -296.5) == (-296.5, 41.7)
    assert bot_to_focal(-296.5, 41.7, convention="dm") == (-296.5, 41.7)
    assert bot_to_focal(1.0, 2.0, convention="-x,y") == (-1.0, 2.0)
    assert bot_to_focal(1.0, 2.0, convention=[[0, -1, 5.0], [1, 0, -5.0]]) == (3.0, -4.0)
    custom = BotConvention("mine", ((0.0, 1.0), (-1.0, 0.0)), (1.0, 1.0))
    bx, by = np.array([1.0, -3.0]), np.array([2.0, 7.5])
    fx, fy = bot_to_focal(bx, by, custom)
    assert fx.tolist() == [3.0, 8.5] and fy.tolist() == [0.0, 4.0]
    rx, ry = focal_to_bot(fx, fy, custom)
    assert np.allclose(rx, bx) and np.allclose(ry, by)
    assert set(CONVENTIONS) >= {"ccs", "dm"}


def test_set_default_convention_is_an_override():
    try:
        assert set_default_convention("dm").name == "dm"
        assert bot_to_focal(1.0, 2.0) == (1.0, 2.0)
        assert bot_to_focal(1.0, 2.0, convention="ccs") == (2.0, 1.0)
    finally:
        set_default_convention("ccs")
    assert bot_to_focal(1.0, 2.0) == (2.0, 1.0)


def test_bad_conventions():
    for bad in ("xy", "z,x", "x,y,x", "nonsense"):
        with pytest.raises(InputError, match="unknown projector convention"):
            get_convention(bad)
    with pytest.raises(InputError, match="singular"):
        get_convention("x,x")
    with pytest.raises(InputError, match="cannot use"):
        get_convention([1, 2, 3])


def test_bot_header_of_itl_spot_lands_near_r02_s02_centre(obs_lsst_dir):
    h = fits.getheader(obs_lsst_dir / "itl_spot.fits.gz")
    det = f"{h['RAFTBAY'].strip()}_{h['CCDSLOT'].strip()}"
    assert det == "R02_S02"
    name, x, y = bot_to_ccd(h["BOTXCAM"], h["BOTYCAM"])
    assert name == "R02_S02"
    d = get_camera().detector(det)
    # within 1 mm (100 px) of the CCD's centre
    assert np.hypot(x - d.refpos[0], y - d.refpos[1]) < 100
    # the E2V file was taken with the projector at the origin: the centre of R22_S11
    h = fits.getheader(obs_lsst_dir / "e2v_spot.fits.gz")
    name, x, y = bot_to_ccd(h["BOTXCAM"], h["BOTYCAM"])
    assert name == "R22_S11" and abs(x - 2047.5) < 2 and abs(y - 2001.5) < 2
    # with the "dm" convention the same header would be far off the CCD
    assert bot_to_ccd(-296.5, 41.7, convention="dm")[0] != "R02_S02"
    name, x, y = bot_to_ccd(-296.5, 41.7, detector="R02_S02", convention="dm")
    assert name == "R02_S02" and x < -1000


def _dither(det="R02_S02", conv="ccs", n=12, offset=(0.0, 0.0), flip_x=False, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    d = get_camera().detector(det)
    cx, cy = d.offset
    fx0, fy0 = cx + rng.uniform(-3, 3, n), cy + rng.uniform(-3, 3, n)
    bx, by = focal_to_bot(fx0, fy0, conv)
    x, y = focal_to_ccd(det, fx0, fy0)
    if flip_x:
        x = d.nx - 1 - x
    return bx, by, x + offset[0] + rng.normal(0, noise, n), y + offset[1] + rng.normal(0, noise, n)


def test_fit_recovers_the_stated_convention():
    bx, by, x, y = _dither(noise=0.3)
    fit = fit_projector_map(bx, by, x, y, detector="R02_S02")
    assert fit.fitted and fit.n_positions == 12
    assert fit.scale == pytest.approx(100.0, rel=2e-3)
    assert abs(fit.rotation_deg) < 0.05
    assert fit.axes == "ccd_x = +bot_y, ccd_y = +bot_x" and fit.swapped and fit.handedness_flipped
    assert fit.relative == "agrees" and "'ccs'" in fit.implied_convention
    assert 0.1 < fit.rms < 0.6
    assert np.hypot(*fit.offset_px) < 1.0
    assert fit.warnings == []
    assert fit.predict(bx[0], by[0]) == pytest.approx((x[0], y[0]), abs=2.0)
    lines = fit.summary_lines()
    assert all(isinstance(s, str) for s in lines) and "100.0" in lines[1]


def test_fit_reports_an_offset_projector_origin():
    bx, by, x, y = _dither(offset=(440.0, -50.0))
    fit = fit_projector_map(bx, by, x, y, detector="R02_S02")
    assert fit.relative == "agrees"
    assert fit.offset_px == pytest.approx([440.0, -50.0], abs=1e-6)
    assert any("443 px" in w for w in fit.warnings)


def test_fit_detects_a_flipped_ccd_x_axis():
    bx, by, x, y = _dither(flip_x=True, seed=5)
    fit = fit_projector_map(bx, by, x, y, detector="R02_S02")
    # the ccs swap mirrors; flipping CCD x as well makes the map a pure rotation
    assert fit.fitted and not fit.handedness_flipped
    assert fit.relative == "CCD x flipped"
    assert any("disagrees with convention 'ccs'" in w for w in fit.warnings)
    # the same data under the other hypothesis: the flipped prediction agrees
    assert fit.scale == pytest.approx(100.0, rel=1e-6)


def test_fit_detects_the_wrong_convention():
    bx, by, x, y = _dither(conv="dm")  # data taken with bot = DM focal axes
    fit = fit_projector_map(bx, by, x, y, detector="R02_S02", convention="ccs")
    assert fit.relative.startswith("CCD axes swapped")
    assert "'dm'" in fit.implied_convention
    assert fit.warnings
    ok = fit_projector_map(bx, by, x, y, detector="R02_S02", convention="dm")
    assert ok.relative == "agrees" and not ok.warnings


def test_too_few_positions_cannot_be_fitted():
    fit = fit_projector_map([-293.2, -293.2], [39.6, 39.6], [2211.9, 2212.1], [2255.3, 2255.4],
                            detector="R02_S02")
    assert not fit.fitted and fit.n_positions == 1 and fit.n_exposures == 2
    assert any("cannot fit the projector map: 1 distinct" in w for w in fit.warnings)
    assert any("not fitted" in s for s in fit.summary_lines())
    with pytest.raises(InputError, match="could not be fitted"):
        fit.predict(0.0, 0.0)
    line = fit_projector_map([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [1, 2, 3, 4], [1, 2, 3, 4],
                             detector="R22_S11")
    assert not line.fitted and any("lie on a line" in w for w in line.warnings)
    empty = fit_projector_map([], [], [], [])
    assert not empty.fitted and empty.warnings
    nodet = fit_projector_map(*_dither())
    assert nodet.fitted and any("no detector" in w for w in nodet.warnings)
    with pytest.raises(InputError, match="different lengths"):
        fit_projector_map([1, 2], [1], [1], [1])


def test_real_2019_catalogue_cannot_settle_the_convention(real_catalogue):
    from spotflat.grids import parse_filename

    meta = parse_filename(real_catalogue.name)
    h = fits.getheader(real_catalogue, "GRID_INFO")
    fit = fit_projector_map([meta["bot_x"]], [meta["bot_y"]], [h["X0"]], [h["Y0"]],
                            detector=meta["detector"])
    assert not fit.fitted
    as_stated = fit.alternatives["as stated"]
    flipped = fit.alternatives["CCD x flipped"]
    # the numbers: ~440 px in x from today's DM convention, ~90 px from the x-flip
    assert 430 < as_stated[0] < 450
    assert 80 < abs(flipped[0]) < 95
    assert any("cannot" in s for s in fit.summary_lines())


def test_predicted_map_scale_and_axes():
    m, t = predicted_projector_map("R02_S02")
    assert np.allclose(m, [[0, 100], [100, 0]])
    x, y = m @ [-296.25, 42.25] + t
    assert (x, y) == pytest.approx((2036.5, 2000.5))
