"""Calibration checked on data written by a generator of its own (not spotflat.simulate).

The generator writes, with astropy only, what a test stand would hand over:
50 DM grid catalogues (``spotgrid_index``, SdssCentroid, SdssShape moments and
Gaussian-weighted flux) of a dithered 49 x 49 spot grid on R22_S11, and an
assembled CCOB flat in electrons. The response is an image: per-amplifier
gains (seams at the real amplifier boundaries), tree rings at 1e-4..1e-3,
pixel-level PRNU; the spots see it through their Gaussian squared (what a
Gaussian-weighted flux sees), the flat through the CCOB illumination and
Poisson noise. Scenarios: an unrelated flat (its own gains, rings and PRNU
at the same seams) and a flat of the same response. Then ``spotflat
calibrate`` and ``spotflat correlate`` run at their defaults through the
command line, and the recommended columns of ``results.ecsv`` are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy import stats

NY, NX = 4004, 4096  # E2V, R22_S11
AMP_NX, AMP_NY = 512, 2002
LEVEL = 5e4


def _response(rng):
    """Gains per amplifier cell, tree rings about a centre off a corner, PRNU."""
    y, x = np.mgrid[0:NY, 0:NX].astype(np.float32)
    gains = rng.normal(1, 0.01, (2, 8)).astype(np.float32)
    img = np.repeat(np.repeat(gains, AMP_NY, axis=0), AMP_NX, axis=1)
    cx, cy = rng.choice([-700, NX + 700]), rng.choice([-700, NY + 700])
    r = np.hypot(x - cx, y - cy)
    amp = 10 ** rng.uniform(-4, -3)
    img *= 1 + amp * np.sin(2 * np.pi * r / rng.uniform(35, 80) + rng.uniform(0, 6.3)).astype(np.float32)
    img *= 1 + rng.normal(0, 0.003, (NY, NX)).astype(np.float32)
    return img


def _stamp_mean(img, x, y, sigma, half=6):
    """Mean of ``img`` weighted by a Gaussian of width ``sigma`` about each point (pixel centres)."""
    out = np.empty(x.size)
    off = np.arange(-half, half + 1)
    for s in range(0, x.size, 20000):
        xs, ys = x[s:s + 20000], y[s:s + 20000]
        px = np.rint(xs)[:, None].astype(int) + off
        py = np.rint(ys)[:, None].astype(int) + off
        sg = np.broadcast_to(sigma, x.shape)[s:s + 20000, None]
        wx = np.exp(-0.5 * ((px - xs[:, None]) / sg) ** 2)
        wy = np.exp(-0.5 * ((py - ys[:, None]) / sg) ** 2)
        vals = img[np.clip(py, 0, NY - 1)[:, :, None], np.clip(px, 0, NX - 1)[:, None, :]]
        w = wy[:, :, None] * wx[:, None, :]
        out[s:s + 20000] = (w * vals).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
    return out


def grid_design(rng, step, nexp=50):
    """A 49 x 49 grid of spots (their shapes and brightnesses), exposure brightness drifts, the grid centre."""
    ncols = nrows = 49
    nspot = ncols * nrows
    k = np.arange(nspot)
    u, v = (k // nrows - 24) * step, (k % nrows - 24) * step
    xx0, yy0 = 5.0 * rng.uniform(0.95, 1.05, nspot), 5.2 * rng.uniform(0.95, 1.05, nspot)
    brightness = 3e5 * np.exp(0.03 * rng.normal(size=nspot))
    s = np.exp(np.cumsum(0.003 * rng.normal(size=nexp)))
    x0, y0 = NX / 2 + rng.uniform(-20, 20), NY / 2 + rng.uniform(-20, 20)
    return ncols, nrows, nexp, nspot, k, u, v, xx0, yy0, brightness, s, x0, y0


def write_catalogue(folder, j, det, columns, origin, step, shape, dither):
    """One DM grid catalogue (exposure ``j`` of ``det``): the columns, GRID_INFO, a test-stand file name."""
    cols = [fits.Column(name=name, format="D", array=np.asarray(a, float)) for name, a in columns.items()]
    info = fits.ImageHDU(name="GRID_INFO")
    for key, val in (("X0", origin[0]), ("Y0", origin[1]), ("XSTEP", step), ("YSTEP", step), ("THETA", 0.0),
                     ("NCOLS", shape[0]), ("NROWS", shape[1])):
        info.header[key] = val
    prim = fits.PrimaryHDU()
    raft, slot = det.split("_")
    prim.header.update(RAFTBAY=raft, CCDSLOT=slot, DETNAME=det)
    name = f"MC_C_20260101_{j + 1:06d}_{det}_20.0s_{dither[0] / 6.5:.1f}x_{dither[1] / 6.5:.1f}y_gridfit.cat"
    fits.HDUList([prim, fits.BinTableHDU.from_columns(cols), info]).writeto(folder / name)


def write_run(folder, seed, scenario):
    """Write ``spotdata/`` (50 catalogues) and ``flat.fits``; return the folder."""
    rng = np.random.default_rng([seed, 2026])
    resp = _response(rng)
    resp_flat = resp if scenario == "response" else _response(rng)
    step = 65.3
    ncols, nrows, nexp, nspot, k, u, v, xx0, yy0, brightness, s, x0, y0 = grid_design(rng, step)
    (folder / "spotdata").mkdir(parents=True)
    for j in range(nexp):
        dx, dy = rng.uniform(-0.5, 0.5, 2) * step
        gx, gy = x0 + dx + u, y0 + dy + v
        x = gx + rng.normal(0, 0.02, nspot)
        y = gy + rng.normal(0, 0.02, nspot)
        sig = np.sqrt((xx0 + yy0) / 2)
        # a Gaussian-weighted flux sees the response through G**2: width sigma / sqrt(2)
        rel = _stamp_mean(resp, x, y, sig / np.sqrt(2))
        f_true = brightness * s[j] * rel
        ferr = np.sqrt(f_true + 4 * np.pi * 5 * 64)
        flux = f_true + ferr * rng.normal(size=nspot)
        keep = rng.random(nspot) > 0.02
        n = int(keep.sum())
        write_catalogue(folder / "spotdata", j, "R22_S11", dict(
            spotgrid_index=k[keep].astype(float), base_SdssCentroid_x=x[keep], base_SdssCentroid_y=y[keep],
            spotgrid_x=gx[keep], spotgrid_y=gy[keep], base_SdssShape_xx=xx0[keep] + rng.normal(0, 0.01, n),
            base_SdssShape_yy=yy0[keep] + rng.normal(0, 0.01, n), base_SdssShape_xy=np.full(n, 0.1),
            base_SdssShape_instFlux=flux[keep], base_SdssShape_instFluxErr=ferr[keep]),
            (x0 + dx, y0 + dy), step, (ncols, nrows), (dx, dy))
    write_flat(folder / "flat.fits", resp_flat, rng.uniform(0, 2 * np.pi), rng, "R22_S11")
    return folder


def write_flat(path, resp, ang, rng, det):
    """An assembled CCOB flat in electrons: ``resp`` times a tilted, curved illumination, Poisson noise."""
    yy, xx = np.mgrid[0:NY, 0:NX].astype(np.float32)
    uu, vv = 2 * xx / NX - 1, 2 * yy / NY - 1
    illum = 1 + 0.015 * (np.cos(ang) * uu + np.sin(ang) * vv) - 0.01 * (uu * uu + vv * vv)
    flat = resp * illum * np.float32(LEVEL)
    flat += np.sqrt(flat) * rng.standard_normal(flat.shape, dtype=np.float32)
    hdu = fits.PrimaryHDU(flat.astype(np.float32))
    raft, slot = det.split("_")
    hdu.header.update(BUNIT="electron", RAFTBAY=raft, CCDSLOT=slot, DETNAME=det, IMGTYPE="FLAT")
    hdu.writeto(path)


def _correlate(run_cli, folder):
    res = run_cli("calibrate", folder / "spotdata", "-o", folder / "calib.fits", "-q")
    assert res.exit_code == 0, res.output
    res = run_cli("correlate", folder / "calib.fits", "--flat", folder / "flat.fits", "-o", folder / "out",
                  "-q", "--no-figures")
    assert res.exit_code == 0, res.output
    return Table.read(folder / "out" / "results.ecsv")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unrelated_flat_gives_no_significance(tmp_path, run_cli, seed):
    t = _correlate(run_cli, write_run(tmp_path, seed, "null"))
    assert list(t["component"]) == ["all", "amp", "within"]
    for row in t:
        # 99.9 % two-sided from the row's own Student-t: a 3x-too-small error fails this often
        tq = stats.t.ppf(0.9995, max(int(row["ndof"]), 1))
        assert abs(row["r"]) < tq * row["r_err"], (row["component"], row["r"], row["r_err"])
        assert row["p_value"] > 1e-3, (row["component"], row["p_value"])
        assert abs(row["slope"]) < tq * row["slope_err"], (row["component"], row["slope"], row["slope_err"])
        assert row["r_low"] < row["r"] < row["r_high"]


@pytest.mark.parametrize("seed", [3])
def test_matching_flat_gives_slope_one(tmp_path, run_cli, seed):
    t = _correlate(run_cli, write_run(tmp_path, seed, "response"))
    for row in t:
        tq = stats.t.ppf(0.9995, max(int(row["ndof"]), 1))
        assert abs(row["slope"] - 1) < tq * row["slope_err"], (row["component"], row["slope"], row["slope_err"])
        assert row["p_value"] < 1e-3 and row["slope_low"] < row["slope"] < row["slope_high"]
        assert row["reliability"] < 1  # the flat's photon noise was corrected for
