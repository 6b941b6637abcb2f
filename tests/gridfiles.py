"""Write small synthetic processed-grid files (both formats) with a known truth.

Kept independent of ``spotflat.simulate`` on purpose: the reader is tested
against files written here by a different hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from spotflat.grids import GRID_KEYS, grid_positions


def grid_params(ncols=49, nrows=49, x0=2036.0, y0=2000.0, step=65.0, theta=0.01):
    return {"X0": x0, "Y0": y0, "XSTEP": step, "YSTEP": step * 1.001, "THETA": theta,
            "NCOLS": ncols, "NROWS": nrows}


def truth(nspot, nexp, seed=0, noise=0.005, missing=0.03, outliers=5):
    rng = np.random.default_rng(seed)
    F = rng.uniform(8e4, 1.2e5, nspot)
    s = rng.uniform(0.9, 1.1, nexp)
    f = F[:, None] * s[None, :] * (1 + noise * rng.standard_normal((nspot, nexp)))
    f[rng.random((nspot, nexp)) < missing] = np.nan
    k = rng.integers(0, nspot, outliers)
    j = rng.integers(0, nexp, outliers)
    f[k, j] *= rng.choice([0.3, 3.0], outliers)
    return F, s, f, (k, j)


def name(j, det="R22_S11", x=-10.0, y=5.0, fmt="dm", exptime=20.0):
    raft, sensor = det.split("_")
    suffix = "gridfit.cat" if fmt == "dm" else "processed_grid.fits"
    return f"MC_C_20200110_{100 + j:06d}_{raft}_{sensor}_{exptime}s_{x:.1f}x_{y:.1f}y_{suffix}"


def write_dm(path, grid, flux, flux_err=None, dxy=None, extra_junk=3, seed=0):
    rng = np.random.default_rng(seed)
    gx, gy = grid_positions(*(grid[k] for k in GRID_KEYS))
    ok = np.isfinite(flux)
    idx = np.flatnonzero(ok)
    n = len(idx) + extra_junk
    dx = rng.normal(0, 0.3, len(idx)) if dxy is None else dxy[0][idx]
    dy = rng.normal(0, 0.3, len(idx)) if dxy is None else dxy[1][idx]
    cols = {
        "id": np.arange(n, dtype=np.int64),
        "base_SdssCentroid_x": np.r_[gx[idx] + dx, rng.uniform(0, 4000, extra_junk)],
        "base_SdssCentroid_y": np.r_[gy[idx] + dy, rng.uniform(0, 4000, extra_junk)],
        "base_SdssShape_xx": np.r_[np.full(len(idx), 5.0), np.full(extra_junk, 0.1)],
        "base_SdssShape_yy": np.r_[np.full(len(idx), 5.2), np.full(extra_junk, 0.1)],
        "base_SdssShape_xy": np.r_[np.full(len(idx), 0.1), np.zeros(extra_junk)],
        "base_SdssShape_instFlux": np.r_[flux[idx], rng.uniform(1e3, 1e4, extra_junk)],
        "base_SdssShape_instFluxErr": np.r_[np.sqrt(np.abs(flux[idx])) if flux_err is None
                                            else flux_err[idx], np.full(extra_junk, 10.0)],
        "spotgrid_index": np.r_[idx.astype(float), np.full(extra_junk, np.nan)],
        "spotgrid_x": np.r_[gx[idx], np.full(extra_junk, np.nan)],
        "spotgrid_y": np.r_[gy[idx], np.full(extra_junk, np.nan)],
    }
    table = fits.BinTableHDU.from_columns([fits.Column(name=k, array=v, format="K" if v.dtype.kind == "i" else "D")
                                           for k, v in cols.items()])
    info = fits.BinTableHDU.from_columns([fits.Column(name="NORMALIZED_DY", format="D", array=np.zeros(3)),
                                          fits.Column(name="NORMALIZED_DX", format="D", array=np.zeros(3))],
                                         name="GRID_INFO")
    for k in GRID_KEYS:
        info.header[k] = grid[k]
    fits.HDUList([fits.PrimaryHDU(), table, info]).writeto(path, overwrite=True)


def write_legacy(path, grid, flux, dxy=None, seed=0):
    rng = np.random.default_rng(seed)
    gx, gy = grid_positions(*(grid[k] for k in GRID_KEYS))
    nspot = len(gx)
    ok = np.isfinite(flux)
    dx = rng.normal(0, 0.3, nspot) if dxy is None else dxy[0]
    dy = rng.normal(0, 0.3, nspot) if dxy is None else dxy[1]
    nan = np.where(ok, 1.0, np.nan)
    cols = {"X": gx, "Y": gy, "DX": dx * nan, "DY": dy * nan, "XX": np.zeros(nspot), "YY": np.zeros(nspot),
            "DXX": 5.0 * nan, "DYY": 5.2 * nan, "FLUX": np.zeros(nspot), "DFLUX": flux}
    table = fits.BinTableHDU.from_columns([fits.Column(name=k, array=np.asarray(v, float), format="D")
                                           for k, v in cols.items()])
    primary = fits.PrimaryHDU()
    for k in GRID_KEYS:
        primary.header[k] = grid[k]
    fits.HDUList([primary, table]).writeto(path, overwrite=True)


def write_run(directory, fmt="dm", nexp=12, seed=0, det="R22_S11", ncols=15, nrows=15, **kw):
    """Write one dithered run; return (paths, F, s, f)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    grid = grid_params(ncols, nrows)
    F, s, f, _ = truth(ncols * nrows, nexp, seed=seed, **kw)
    err = kw.get("noise", 0.005) * F[:, None] * s[None, :]  # the true 1-sigma noise
    paths = []
    for j in range(nexp):
        p = directory / name(j, det=det, x=-10.0 + 0.1 * j, y=5.0 - 0.1 * j, fmt=fmt)
        if fmt == "dm":
            write_dm(p, grid, f[:, j], flux_err=err[:, j], seed=seed + j)
        else:
            write_legacy(p, grid, f[:, j], seed=seed + j)
        paths.append(p)
    return paths, F, s, f
