"""The star flat: a response map from the spots alone.

The data here are made by a small generator written in this file (not by
spotflat.simulate): spot grids dithered over a known response, written as
LSST DM grid catalogues with astropy, read back through the package.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner

from spotflat.cli import main
from spotflat.errors import InputError
from spotflat.starflat import bin_image, compare_with_flat, solve_starflat

DET = "R22_S20"  # E2V, 4096 x 4004
NY, NX = 4004, 4096


def truth_map(kind: str, binsize: int = 256, seed: int = 0) -> np.ndarray:
    """A response image: 'bins' is constant inside each bin (the fit's model is exact); 'smooth' is not."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:NY, 0:NX].astype(np.float32)
    base = 1 + 0.03 * (xx / NX - 0.5) - 0.01 * (yy / NY - 0.5) ** 2  # an x tilt: catches a transposed map
    if kind == "bins":
        nby, nbx = -(-NY // binsize), -(-NX // binsize)
        cells = 1 + 0.01 * rng.standard_normal((nby, nbx))
        jb, ib = (np.arange(NY) // binsize), (np.arange(NX) // binsize)
        xc, yc = (ib + 0.5) * binsize, (jb + 0.5) * binsize
        tilt = 1 + 0.03 * (xc[None, :] / NX - 0.5) - 0.01 * (yc[:, None] / NY - 0.5) ** 2
        return (cells[jb][:, ib] * tilt).astype(np.float32)
    r = np.hypot(xx + 3000.0, yy + 1000.0)
    return (base * (1 + 0.01 * np.sin(r / 300.0)) * np.where(yy > NY / 2, 1.01, 1.0)).astype(np.float32)


def generate(R: np.ndarray, nexp: int, dither: float, seed: int, ncols: int = 12, step: float = 300.0,
             flux: float = 2e6):
    """Spots on a grid dithered uniformly over ``dither`` grid steps; flux = F s R(centre) + Poisson."""
    rng = np.random.default_rng(seed)
    n = ncols * ncols
    k = np.arange(n)
    u = (k // ncols - (ncols - 1) / 2) * step
    v = (k % ncols - (ncols - 1) / 2) * step
    off = rng.uniform(-0.5, 0.5, (nexp, 2)) * dither * step
    x0 = (NX - 1) / 2 + off[:, 0]
    y0 = (NY - 1) / 2 + off[:, 1]
    x = x0[None, :] + u[:, None] + rng.normal(0, 0.5, (n, 1))
    y = y0[None, :] + v[:, None] + rng.normal(0, 0.5, (n, 1))
    inside = (x > 3) & (x < NX - 4) & (y > 3) & (y < NY - 4)
    F = flux * np.exp(0.05 * rng.standard_normal(n))
    s = np.exp(0.02 * rng.standard_normal(nexp))
    ix = np.clip(np.round(x).astype(int), 0, NX - 1)
    iy = np.clip(np.round(y).astype(int), 0, NY - 1)
    ftrue = F[:, None] * s[None, :] * R[iy, ix]
    ferr = np.sqrt(ftrue)
    f = ftrue + ferr * rng.standard_normal(ftrue.shape)
    nan = np.where(inside, 1.0, np.nan)
    return dict(x=x * nan, y=y * nan, flux=f * nan, flux_err=ferr * nan, x0=x0, y0=y0, step=step, ncols=ncols)


def write_catalogues(d, data) -> None:
    """One DM grid catalogue per exposure, written with astropy only."""
    d.mkdir(parents=True, exist_ok=True)
    n, nexp = data["flux"].shape
    for j in range(nexp):
        ok = np.isfinite(data["flux"][:, j])
        idx = np.flatnonzero(ok)
        t = Table({"id": np.arange(idx.size, dtype=np.int64),
                   "base_SdssCentroid_x": data["x"][idx, j], "base_SdssCentroid_y": data["y"][idx, j],
                   "base_SdssShape_xx": np.full(idx.size, 5.0), "base_SdssShape_yy": np.full(idx.size, 5.1),
                   "base_SdssShape_xy": np.zeros(idx.size),
                   "base_SdssShape_instFlux": data["flux"][idx, j],
                   "base_SdssShape_instFluxErr": data["flux_err"][idx, j],
                   "spotgrid_index": idx.astype(float)})
        info = fits.BinTableHDU.from_columns([fits.Column(name="dummy", format="D", array=np.zeros(1))],
                                             name="GRID_INFO")
        for key, val in (("X0", data["x0"][j]), ("Y0", data["y0"][j]), ("XSTEP", data["step"]),
                         ("YSTEP", data["step"]), ("THETA", 0.0), ("NCOLS", data["ncols"]),
                         ("NROWS", data["ncols"])):
            info.header[key] = val
        fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(t), info]).writeto(d / f"exposure_{j:04d}.fits")


def _truth_binned(R, star):
    """The truth binned like the map, in the map's gauge (no mean and no linear gradient in log R).

    A grid translated rigidly cannot see a linear gradient (``log F[k]`` and
    ``log s[j]`` absorb it), so the map fixes it to zero; so must the truth.
    """
    from spotflat.starflat import _gauge_basis

    tb, _ = bin_image(R, star.binsize)
    m = star.constrained
    idx = np.flatnonzero(m.ravel())
    X = _gauge_basis(idx, m.shape[1], star.binsize, star.shape, "plane")
    lt = np.log(tb.ravel()[idx])
    out = np.full(tb.size, np.nan)
    out[idx] = np.exp(lt - X @ (X.T @ lt))
    out /= np.nanmean(out)
    return out.reshape(tb.shape), m


# ---------------------------------------------------------------- large dithers: the map is the truth

def test_large_dithers_recover_the_response_with_calibrated_errors():
    R = truth_map("bins")
    pulls, chi2n = [], []
    for seed in range(3):
        g = generate(R, nexp=60, dither=8.0, seed=seed)
        star = solve_starflat(g["x"], g["y"], g["flux"], g["flux_err"], shape=(NY, NX), binsize=256)
        tb, m = _truth_binned(R, star)
        assert star.ndegenerate == 0 and m.sum() > 0.8 * star.nvisited > 150
        assert np.corrcoef(star.response[m], tb[m])[0, 1] > 0.9
        d = np.log(star.response[m] / tb[m])  # the covariance is that of log R
        pulls.append(d / (star.response_err[m] / star.response[m]))
        chi2n.append(d @ np.linalg.pinv(star.covariance, rcond=1e-10) @ d / (m.sum() - 3))
        assert 0.8 < star.chi2_dof < 1.25
        assert np.isnan(star.response[~m]).all() and np.isnan(star.response_err[~m]).all()
        assert star.response[m].mean() == pytest.approx(1.0)
    width = np.sqrt(np.mean(np.concatenate(pulls) ** 2))
    assert 0.8 < width < 1.2, width
    assert 0.8 < np.mean(chi2n) < 1.2, chi2n


def test_smooth_response_correlates_with_its_binned_truth():
    R = truth_map("smooth")
    g = generate(R, nexp=80, dither=8.0, seed=7)
    star = solve_starflat(g["x"], g["y"], g["flux"], g["flux_err"], shape=(NY, NX), binsize=256)
    tb, m = _truth_binned(R, star)
    assert np.corrcoef(star.response[m], tb[m])[0, 1] > 0.9
    # a flat of the same response: the ratio is flat, the slope 1
    flat = R * (1 + 0.002 * np.random.default_rng(1).standard_normal(R.shape)).astype(np.float32)
    cmp = compare_with_flat(star, flat, nmc=100)
    assert cmp.r > 0.9 and abs(cmp.slope - 1) < 4 * cmp.slope_err + 0.05, (cmp.r, cmp.slope, cmp.slope_err)
    assert np.nanstd(cmp.ratio[m]) < np.nanstd(star.response[m])


def test_small_dithers_leave_long_modes_unconstrained_and_masked():
    """Dithers inside one grid cell: each spot's box level is degenerate with its F[k]."""
    R = truth_map("bins")
    g = generate(R, nexp=30, dither=0.8, seed=3)
    star = solve_starflat(g["x"], g["y"], g["flux"], g["flux_err"], shape=(NY, NX), binsize=128)
    nspot_used = int(np.isfinite(g["flux"]).any(axis=1).sum())
    assert star.ndegenerate >= nspot_used - 2
    assert star.meta["NCOMP"] >= nspot_used - 1
    assert star.nconstrained <= 0.05 * star.nvisited  # only the one mapped box, relative to itself
    assert np.isnan(star.response[~star.constrained]).all()
    assert star.dither_box[0] < g["step"]
    # the same spots with dithers over several cells: every visited bin is determined
    g2 = generate(R, nexp=30, dither=4.0, seed=3)
    star2 = solve_starflat(g2["x"], g2["y"], g2["flux"], g2["flux_err"], shape=(NY, NX), binsize=256)
    assert star2.ndegenerate == 0 and star2.nconstrained == star2.nvisited


def test_disconnected_regions_are_not_tied_together():
    """Two spot groups that never visit the same area: only one region is mapped."""
    R = truth_map("bins")
    g = generate(R, nexp=40, dither=0.9, seed=5, ncols=2, step=1500.0)
    star = solve_starflat(g["x"], g["y"], g["flux"], g["flux_err"], shape=(NY, NX), binsize=256)
    assert star.meta["NCOMP"] == 4 and star.ndegenerate >= 3
    # only the bins of one spot's box are mapped
    assert star.nconstrained <= star.nvisited / 3
    assert np.isnan(star.F).sum() >= 3


def test_per_amp_terms_recover_amplifier_steps():
    from spotflat import geometry

    amps = geometry.amp_slices(DET)
    R = np.ones((NY, NX), np.float32)
    rng = np.random.default_rng(2)
    gains = {a: 1 + 0.02 * rng.standard_normal() for a in amps}
    for a, (ys, xs) in amps.items():
        R[ys, xs] *= gains[a]
    g = generate(R, nexp=80, dither=8.0, seed=9)
    star = solve_starflat(g["x"], g["y"], g["flux"], g["flux_err"], shape=(NY, NX), binsize=512,
                          per_amp=True, detector=DET)
    got = np.array([star.amp_gains[a] for a in sorted(star.amp_gains)])
    true = np.array([gains[a] for a in sorted(star.amp_gains)])
    true /= true.mean()
    err = np.array([star.amp_gains_err[a] for a in sorted(star.amp_gains)])
    # the bin terms are free inside each amplifier; the amp terms carry the steps
    assert np.corrcoef(got, true)[0, 1] > 0.5 or np.all(np.abs(got - true) < 5 * err + 1e-3)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(InputError, match="bin size"):
        solve_starflat(np.ones((3, 3)), np.ones((3, 3)), np.ones((3, 3)), shape=(10, 10), binsize=0)
    with pytest.raises(InputError, match="one shape"):
        solve_starflat(np.ones((3, 3)), np.ones((3, 2)), np.ones((3, 3)), shape=(10, 10))
    with pytest.raises(InputError, match="too few"):
        solve_starflat(np.full((3, 3), np.nan), np.ones((3, 3)), np.ones((3, 3)), shape=(10, 10))


# ---------------------------------------------------------------- the command and response.fits

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("starflat")
    R = truth_map("smooth")
    g = generate(R, nexp=60, dither=8.0, seed=11)
    write_catalogues(d / "spots", g)
    flat = (R * 50000 * (1 + 0.004 * np.random.default_rng(4).standard_normal(R.shape))).astype(np.float32)
    hdu = fits.PrimaryHDU(flat)
    hdu.header["DETNAME"] = DET
    hdu.writeto(d / "flat.fits")
    return d, R


def test_cli_writes_response_fits_as_specified(written):
    d, R = written
    out = d / "out"
    res = CliRunner().invoke(main, ["response", str(d / "spots"), "--detector", DET, "--flat", str(d / "flat.fits"),
                                    "--binsize", "256", "-o", str(out), "--nboot", "20"])
    assert res.exit_code == 0, res.output
    with fits.open(out / "response.fits") as h:
        B = h[0].header["BINSIZE"]
        assert B == 256 and h[0].header["DETECTOR"] == DET
        h0 = h[0].header
        resp, err, cov = h["RESPONSE"].data, h["RESPONSE_ERR"].data, h["COVERAGE"].data
        flatmap = h["FLAT"].data
    nby, nbx = -(-NY // B), -(-NX // B)
    assert resp.shape == err.shape == cov.shape == (nby, nbx)
    m = np.isfinite(resp)
    assert m.sum() > 100 and np.all(cov[m] > 0) and np.all(err[m] > 0)
    assert np.nanmean(resp) == pytest.approx(1.0, abs=1e-6)
    assert h0["GAUGE"] == "mean,gradient"
    # array index [j, i] is the bin covering x in [i B, (i + 1) B), y in [j B, (j + 1) B)
    truth = np.full((nby, nbx), np.nan)
    for j in range(nby):
        for i in range(nbx):
            truth[j, i] = R[j * B:(j + 1) * B, i * B:(i + 1) * B].mean()

    def deplane(img):  # remove mean and gradient of log over the map's bins (the map's gauge)
        jj, ii = np.nonzero(m)
        X = np.stack([np.ones(ii.size), ii, jj], axis=1)
        v = np.log(img[m])
        return v - X @ np.linalg.lstsq(X, v, rcond=None)[0]

    assert np.corrcoef(deplane(resp), deplane(truth))[0, 1] > 0.9
    assert np.corrcoef(deplane(resp), deplane(truth[::-1, ::-1]))[0, 1] < 0.5  # orientation matters
    assert np.corrcoef(deplane(resp), deplane(flatmap))[0, 1] > 0.9
    for name in ("profiles.ecsv", "response_map.png", "response_vs_flat.png"):
        assert (out / name).exists(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["response", str(empty), "--detector", DET, "-o", str(out)])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())
    res = CliRunner().invoke(main, ["response", str(empty), "--binsize", "0", "-o", str(out)])
    assert res.exit_code == 2 and "binsize" in res.output
