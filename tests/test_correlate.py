"""Injection-recovery for compare/correlate on simulated data (issue 5's checks)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kstest

import spotflat
from spotflat.calibration import estimate_scales
from spotflat.compare import normalise_like_t
from spotflat.errors import InputError
from spotflat.flats import normalize_flat
from spotflat.footprint import sample_flat
from spotflat.pipeline import run_correlate
from spotflat.response import synthetic_layout
from spotflat.simulate import simulate_data, simulate_run
from spotflat.stats import correlation_analysis

NDITHER = 30


def _run(tmp_path_factory, name, **kw):
    out = tmp_path_factory.mktemp(name)
    sim = simulate_run(out / "sim", ndither=NDITHER, seed=kw.pop("seed", 1), overwrite=True, **kw)
    grids = spotflat.read_grids(sim.spot_files)
    cal = spotflat.build_calibration(grids, min_dithers=5)
    res = run_correlate(cal, sim.flat_path, nboot=300, nnull=2000, seed=3)
    return sim, grids, cal, res


def _noise_rms(sim, grids, comp, flat_level):
    """Expected rms of d from the measured flux errors and the flat's Poisson noise."""
    v = comp.valid
    n = v.sum(axis=1, keepdims=True) * np.ones(v.shape)
    rel2 = ((grids.flux_err / grids.flux) ** 2)[v] * (1 - 1 / n[v])  # per-spot mean removed
    sig = np.sqrt((np.asarray(comp.calib.spots["xx"]) + np.asarray(comp.calib.spots["yy"])) / 2)
    q2 = 1.0 / (flat_level * 4 * np.pi * np.median(sig) ** 2)  # Gaussian weights: N_eff = 4 pi sigma^2
    ill = normalise_like_t(sim.illum, v)[v] - 1
    return float(np.sqrt(np.mean(rel2) + q2 + np.var(ill)))


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
    """The flat sees exactly the spots' response (a deep master flat, uniform CCOB light)."""
    return _run(tmp_path_factory, "none", flat_mismatch="none", flat_level=2e6, illumination=0.0)


def test_flat_describes_response(matched):
    sim, grids, cal, res = matched
    st = res.stats["flux"]
    assert abs(st.slope - 1.0) < 3 * st.slope_err, (st.slope, st.slope_err)
    assert st.r > 0.5 and st.p_value < 1e-3 and st.p_value_one_sided < 1e-3
    comp = res.comparison
    # nothing left in d: its correlation with q is consistent with the null
    dq = correlation_analysis(comp.d, comp.q, grid_shape=(49, 49), block="patch", nboot=0, nnull=1000, seed=5)
    assert dq.p_value > 0.01 and abs(dq.r) < 3 * dq.r_null_std
    # and its rms is the noise
    expected = _noise_rms(sim, grids, comp, 2e6)
    assert abs(np.std(comp.d[comp.valid]) / expected - 1) < 0.10


def test_outputs_have_the_interface_columns(matched, tmp_path):
    from spotflat.pipeline import write_outputs

    sim, grids, cal, res = matched
    files = write_outputs(res, tmp_path / "out")
    from astropy.table import Table

    t = Table.read(tmp_path / "out" / "results.ecsv")
    for c in ("quantity", "r", "r_err_bootstrap", "r_err_jackknife", "r_err_block", "r_null_std", "p_value",
              "slope", "slope_err", "nspot", "npoint"):
        assert c in t.colnames
    resid = Table.read(tmp_path / "out" / "residuals.fits")
    for c in ("spotgrid_index", "exposure", "x", "y", "t", "q", "d"):
        assert c in resid.colnames
    assert len(resid) == res.comparison.npoint
    assert sum(str(f).endswith(".png") for f in files) >= 8


@pytest.mark.parametrize("noise, floor", [(0.05, 0.9), (1.0, None)])
def test_residual_recovers_missed_treering(tmp_path_factory, noise, floor):
    sim, grids, cal, res = _run(tmp_path_factory, f"tr{noise}", flat_mismatch="treering", noise=noise,
                                flat_level=2e6 if noise < 1 else 5e4, illumination=0.0,
                                mismatch_amplitude=0.005, seed=2)
    comp = res.comparison
    ok = comp.valid
    injected = normalise_like_t(sim.mismatch, ok)[ok] - 1
    r_rec = np.corrcoef(comp.d[ok], injected)[0, 1]
    if floor is not None:
        assert r_rec > floor
    else:
        # expected from the signal-to-noise: r = s / sqrt(s^2 + n^2)
        s = np.std(injected)
        n = _noise_rms(sim, grids, comp, 5e4)
        expected = s / np.sqrt(s ** 2 + n ** 2)
        assert abs(r_rec - expected) < 0.05, (r_rec, expected)


def _independent_p(seed, layout):
    sim = simulate_data("toy", ndither=10, seed=seed, layout=layout, ncols=15, nrows=15, xstep=40.0,
                        flat_mismatch="independent", illumination=0.0)
    sp = sim.spots
    F, s, used, *_ = estimate_scales(sp.flux, stat="clipped")
    t = np.where(used, sp.flux / (F[:, None] * s[None, :]), np.nan)
    # per-amp normalisation: amplifier seams sit at the same place in both (see the docs)
    flat, _ = normalize_flat(sim.flat, "amp", amp_slices=layout[2], edge=0)
    ok = np.isfinite(t) & np.isfinite(sp.x)
    Q = np.full(t.shape, np.nan)
    Q[ok] = sample_flat(flat, sp.x[ok], sp.y[ok], sigma=2.2)
    v = ok & np.isfinite(Q)
    return correlation_analysis(normalise_like_t(t, v), normalise_like_t(Q, v), grid_shape=(15, 15),
                                block="patch", patch_size=3, nboot=0, nnull=200, seed=seed)


def test_independent_flat_gives_uniform_p_values():
    layout = synthetic_layout((700, 700))
    res = [_independent_p(seed, layout) for seed in range(200)]
    r = np.array([x.r for x in res])
    p = np.array([x.p_value for x in res])
    null_std = np.mean([x.r_null_std for x in res])
    assert abs(np.mean(r)) < 3 * null_std / np.sqrt(len(r))
    assert kstest(p, "uniform").pvalue > 0.01


def test_bad_inputs(matched, tmp_path):
    sim, grids, cal, res = matched
    from spotflat.compare import compare_spots_flat

    flat = spotflat.read_flat(sim.flat_path)
    # a flat of another detector (ITL shape for an E2V calibration)
    with pytest.raises(InputError, match="flat has shape"):
        compare_spots_flat(cal, grids, np.ones((4000, 4072)))
    other = spotflat.Calibration(cal.spots, cal.exposures, dict(cal.meta, DETECTOR="R02_S02"))
    with pytest.raises(InputError, match="R02_S02"):
        compare_spots_flat(other, grids, flat)
    # no overlap: a flat that is NaN wherever the spots are
    blank = np.full(flat.shape, np.nan, dtype=float)
    blank[:20, :20] = 1.0
    with pytest.raises(InputError, match="no overlap"):
        compare_spots_flat(cal, grids, blank)
    # too few spots for the blocks
    with pytest.raises(InputError):
        correlation_analysis(res.comparison.t[:2], res.comparison.q[:2], grid_shape=(1, 2), block="patch")
