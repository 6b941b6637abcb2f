"""Injection-recovery for compare/correlate on simulated data (issue 5's checks)."""

from __future__ import annotations

import numpy as np
import pytest

import spotflat
from spotflat.compare import normalise_like_t
from spotflat.errors import InputError
from spotflat.pipeline import run_correlate
from spotflat.simulate import simulate_run
from spotflat.stats import correlation_analysis

NDITHER = 30


def _run(tmp_path_factory, name, **kw):
    out = tmp_path_factory.mktemp(name)
    # base_SdssShape_instFlux is Gaussian-weighted: the spots see the response through G**2
    sim = simulate_run(out / "sim", ndither=NDITHER, seed=kw.pop("seed", 1), overwrite=True,
                       flux_weight="gaussian2", **kw)
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
    assert st.r > 0.5 and st.p_value < 1e-3 and st.p_value_one_sided < 1e-3
    # every component's recommended slope (corrected for the flat's noise) is consistent with 1
    parts = {c.component: c for c in res.components["flux"]}
    assert set(parts) == {"all", "amp", "within"}
    for c in parts.values():
        assert c.slope_low <= 1.0 <= c.slope_high, (c.component, c.slope, c.slope_err)
        assert abs(c.slope - 1.0) < 3 * c.slope_err, (c.component, c.slope, c.slope_err)
        assert c.p_value < 1e-3 and c.r_low > 0
        assert c.reliability <= 1.0 and c.slope >= c.slope_raw
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
    rec = ["r", "r_err", "r_low", "r_high", "p_value", "slope", "slope_err", "slope_low", "slope_high"]
    assert t.colnames[:12] == ["quantity", "against", "component"] + rec
    for c in ("slope_raw", "reliability", "r_err_bootstrap", "r_err_jackknife", "r_err_block", "r_null_std",
              "p_value_null", "p_value_perm", "nspot", "npoint", "error_method"):
        assert c in t.colnames
    assert list(t["component"]) == ["all", "amp", "within"]
    for c in rec:
        assert np.all(np.isfinite(t[c])), c
    f = Table.read(tmp_path / "out" / "results.fits")
    assert list(f["component"]) == ["all", "amp", "within"] and np.allclose(f["p_value"], t["p_value"])
    assert t.meta["FLATELEC"] > 1e5  # the flat's level, for the errors-in-variables correction
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


# The p-values under an unrelated flat (shared seams, independent gains, the CCOB illumination and
# the flat's noise, at the real detector's layout) are checked by the seeded Monte Carlo of
# tests/test_components.py and tests/test_independent_generator.py, and in full by
# benchmarks/calibrate_errors.py.


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
