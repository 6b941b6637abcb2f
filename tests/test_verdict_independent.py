"""QE or pixel area, checked on data written by a generator of its own (not spotflat.simulate).

The generator writes, with astropy only, 50 DM grid catalogues of a dithered
49 x 49 spot grid on R22_S20 and an assembled CCOB flat in electrons, from
tree rings of its own: a radial charge displacement ``f(r) = a P / (2 pi)
sin(2 pi r / P)`` about the sensor's measured ring centre (the only fact
taken from the package: the imSim table's centre, which the verdict uses).

* ``area`` mode: the charge moves. The flat sees the pixel-area factor
  ``1 / ((1 + f') (1 + f / r))``; a spot keeps its flux, its centroid moves
  by ``f`` along the radius and its second moments by ``D S D^T - S``
  (``D`` the Jacobian of the displacement).
* ``qe`` mode: the same modulation ``1 - f' - f / r`` as a QE pattern. The
  flat and the spots' Gaussian-weighted fluxes (through ``G**2``) follow it;
  a QE gradient across a spot also pulls its centroid by ``sigma^2 grad ln
  R`` (small, ``(2 pi sigma / P)^2`` of the area-mode shift), which is
  written too.

Both share per-amplifier gains and PRNU (QE-type structure) and the CCOB
illumination. Then ``spotflat calibrate`` and ``spotflat correlate`` run at
their defaults through the command line and ``verdict.ecsv`` is read.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from test_independent_generator import _stamp_mean, grid_design, write_catalogue, write_flat

NY, NX = 4004, 4096  # E2V, R22_S20
AMP_NX, AMP_NY = 512, 2002
PERIOD = 60.0


def _centre():
    from spotflat.treerings import treering_model

    return treering_model("R22_S20").centre


def _rings(x, y, a):
    """Radial unit vector, ``f``, ``f'`` and ``f / r`` at ``(x, y)``."""
    cx, cy = _centre()
    ex, ey = x - cx, y - cy
    r = np.hypot(ex, ey)
    k = 2 * np.pi / PERIOD
    f = a / k * np.sin(k * r)
    fp = a * np.cos(k * r)
    return ex / r, ey / r, f, fp, f / r


EDGE_SCALE = 10.0


def _edge(x, y, a):
    """Edge roll-off: displacement ``a L exp(-d / L)`` along the inward normal of the nearest edge.

    The flat then sees ``1 / (1 + f') ~ 1 + a exp(-d / L)`` (``a < 0``: a dark
    edge, charge pushed out towards it); no tangential stretch.
    """
    d = np.stack([x, NX - 1 - x, y, NY - 1 - y])
    which = np.argmin(d, axis=0)
    dist = np.take_along_axis(d, which[None], axis=0)[0]
    nx_ = np.choose(which, [1.0, -1.0, 0.0, 0.0])
    ny_ = np.choose(which, [0.0, 0.0, 1.0, -1.0])
    e = np.exp(-np.clip(dist, 0, None) / EDGE_SCALE)
    return nx_, ny_, a * EDGE_SCALE * e, -a * e, np.zeros_like(e)


def _field(feature, x, y, a):
    return _rings(x, y, a) if feature == "treering" else _edge(x, y, a)


def _modulation(a, feature="treering"):
    """The flat's factor on the whole CCD: ``1 / ((1 + f') (1 + f / r))``."""
    y, x = np.mgrid[0:NY, 0:NX].astype(np.float64)
    _, _, _, fp, fr = _field(feature, x, y, a)
    return (1.0 / ((1 + fp) * (1 + fr))).astype(np.float32)


def write_run(folder, seed, mode, a, feature="treering", step=65.3):
    """``spotdata/`` (50 catalogues) and ``flat.fits`` with rings (or an edge roll-off) of flat amplitude
    ``a`` in ``mode``; ``step`` > 84 px puts spots up to the CCD edges."""
    rng = np.random.default_rng([seed, 14])
    gains = rng.normal(1, 0.005, (2, 8)).astype(np.float32)
    qe = np.repeat(np.repeat(gains, AMP_NY, axis=0), AMP_NX, axis=1)
    qe *= 1 + rng.normal(0, 0.003, (NY, NX)).astype(np.float32)
    ring = _modulation(a, feature)
    spot_resp = qe * ring if mode == "qe" else qe  # what the fluxes see
    flat_resp = qe * ring  # the flat sees the rings either way
    ncols, nrows, nexp, nspot, k, u, v, xx0, yy0, brightness, s, x0, y0 = grid_design(rng, step)
    (folder / "spotdata").mkdir(parents=True)
    for j in range(nexp):
        dx, dy = rng.uniform(-0.5, 0.5, 2) * step
        gx, gy = x0 + dx + u, y0 + dy + v
        sig = np.sqrt((xx0 + yy0) / 2)
        rel = _stamp_mean(spot_resp, gx, gy, sig / np.sqrt(2))
        nx_, ny_, f, fp, fr = _field(feature, gx, gy, a)
        xx, yy, xy = xx0.copy(), yy0.copy(), np.full(nspot, 0.1)
        if mode == "area":
            cx, cy = gx + f * nx_, gy + f * ny_
            # D = I + f' n n^T + (f / r)(I - n n^T); S' = D S D^T
            dxx_, dyy_, dxy_ = fr + (fp - fr) * nx_ * nx_, fr + (fp - fr) * ny_ * ny_, (fp - fr) * nx_ * ny_
            Dxx, Dyy, Dxy = 1 + dxx_, 1 + dyy_, dxy_
            xx, yy, xy = (Dxx * Dxx * xx0 + 2 * Dxx * Dxy * xy + Dxy * Dxy * yy0,
                          Dxy * Dxy * xx0 + 2 * Dxy * Dyy * xy + Dyy * Dyy * yy0,
                          Dxx * Dxy * xx0 + (Dxx * Dyy + Dxy * Dxy) * xy + Dxy * Dyy * yy0)
        else:
            # a QE gradient pulls the flux-weighted centroid: sigma^2 grad ln R, ln R ~ -f' - f / r
            if feature == "treering":
                k_ = 2 * np.pi / PERIOD
                glr = a * k_ * np.sin(k_ * np.hypot(gx - _centre()[0], gy - _centre()[1]))
            else:  # ln R ~ a exp(-d / L): its gradient along the inward normal
                glr = -fp / EDGE_SCALE
            cx, cy = gx + sig ** 2 * glr * nx_, gy + sig ** 2 * glr * ny_
        f_true = brightness * s[j] * rel
        ferr = np.sqrt(f_true + 4 * np.pi * 5 * 64)
        flux = f_true + ferr * rng.normal(size=nspot)
        cerr = sig / np.sqrt(f_true)  # centroid noise of a Gaussian spot
        x = cx + cerr * rng.normal(size=nspot)
        y = cy + cerr * rng.normal(size=nspot)
        merr = 2 * sig ** 2 / np.sqrt(f_true)
        # spots off the CCD, or so close to its edge that their stamp is cut, are not in the catalogue
        keep = (rng.random(nspot) > 0.02) & (np.minimum(np.minimum(gx, NX - 1 - gx), np.minimum(gy, NY - 1 - gy)) > 8)
        write_catalogue(folder / "spotdata", j, "R22_S20", dict(
            spotgrid_index=k[keep].astype(float), base_SdssCentroid_x=x[keep], base_SdssCentroid_y=y[keep],
            spotgrid_x=gx[keep], spotgrid_y=gy[keep], base_SdssShape_xx=(xx + merr * rng.normal(size=nspot))[keep],
            base_SdssShape_yy=(yy + merr * rng.normal(size=nspot))[keep],
            base_SdssShape_xy=(xy + merr / np.sqrt(2) * rng.normal(size=nspot))[keep],
            base_SdssShape_instFlux=flux[keep], base_SdssShape_instFluxErr=ferr[keep]),
            (x0 + dx, y0 + dy), step, (ncols, nrows), (dx, dy))
    write_flat(folder / "flat.fits", flat_resp, 0.0, rng, "R22_S20")
    return folder


def _verdict(run_cli, folder, feature="treering"):
    res = run_cli("calibrate", folder / "spotdata", "-o", folder / "calib.fits", "-q")
    assert res.exit_code == 0, res.output
    res = run_cli("correlate", folder / "calib.fits", "--flat", folder / "flat.fits", "-o", folder / "out",
                  "-q", "--no-figures")
    assert res.exit_code == 0, res.output
    t = Table.read(folder / "out" / "verdict.ecsv")
    return t[t["feature"] == feature][0]


@pytest.mark.parametrize("mode", ["qe", "area"])
def test_strong_rings_get_the_right_verdict(tmp_path, run_cli, mode):
    """Rings at 0.3 % of the flat (the strong end, boosted): the verdict and the fractions."""
    row = _verdict(run_cli, write_run(tmp_path, 1, mode, 3e-3))
    msg = dict(zip(row.colnames, row.as_void()))
    assert row["verdict"] == mode, msg
    if mode == "qe":
        assert abs(row["qe_fraction"] - 1) < max(3 * row["qe_fraction_err"], 0.1), msg
    else:
        assert abs(row["qe_fraction"]) < max(3 * row["qe_fraction_err"], 0.1), msg
        assert abs(row["area_fraction"] - 1) < max(3 * row["area_fraction_err"], 0.1), msg


@pytest.mark.parametrize("mode", ["qe", "area"])
def test_weak_rings_are_never_given_the_wrong_cause(tmp_path, run_cli, mode):
    """Rings at 0.03 % (inside the BNL-measured range): the right verdict or ``undetected``, never the other."""
    row = _verdict(run_cli, write_run(tmp_path, 2, mode, 3e-4))
    assert row["verdict"] in (mode, "undetected"), dict(zip(row.colnames, row.as_void()))


def test_a_flat_without_rings_is_undetected(tmp_path, run_cli):
    """No rings anywhere (gains, PRNU, noise only): the flat's pattern is not significant."""
    row = _verdict(run_cli, write_run(tmp_path, 0, "qe", 0.0))
    assert row["flat_snr"] < 3 and row["verdict"] == "undetected", dict(zip(row.colnames, row.as_void()))


@pytest.mark.parametrize("mode", ["qe", "area"])
def test_edge_roll_off_gets_the_right_verdict(tmp_path, run_cli, mode):
    """A 5 % dark edge over 10 px (ITL-like) and spots up to the edges, no rings."""
    row = _verdict(run_cli, write_run(tmp_path, 3, mode, -0.05, feature="edge", step=90.0), "edge")
    msg = dict(zip(row.colnames, row.as_void()))
    assert row["verdict"] == mode, msg
