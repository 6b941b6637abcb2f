"""``spotflat correlate`` and ``spotflat demo`` through the command line."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from spotflat.simulate import simulate_run


@pytest.fixture(scope="module")
def simdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    simulate_run(d / "sim", ndither=12, seed=4, flat_mismatch="treering")
    return d


def test_calibrate_then_correlate(simdir, run_cli):
    res = run_cli("calibrate", simdir / "sim" / "spotdata", "-o", simdir / "calib.fits", "-q")
    assert res.exit_code == 0, res.output
    res = run_cli("correlate", simdir / "calib.fits", "--flat", next((simdir / "sim" / "flat").iterdir()),
                  "-o", simdir / "out", "--quantity", "flux,dx,size,xx-yy", "--nboot", "100", "--nnull", "200",
                  "--seed", "1", "-q")
    assert res.exit_code == 0, res.output
    assert "flux all" in res.output and "flux within" in res.output and "variance of t" in res.output
    # the recommended numbers come first in the summary
    assert res.output.index("flux all") < res.output.index("(methods)")
    t = Table.read(simdir / "out" / "results.ecsv")
    assert list(t["quantity"]) == ["flux"] * 3 + ["dx"] * 2 + ["size"] * 2 + ["xx-yy"] * 2
    assert list(t["component"]) == ["all", "amp", "within"] + ["all", "within"] * 3
    # each quantity names its regressor: gradient for centroids, second derivatives for shapes
    assert list(t["against"]) == ["q"] * 3 + ["dqdx"] * 2 + ["lapq"] * 2 + ["d2q_xx-yy"] * 2
    # the shape rows say how much of their regressor is the flat's photon noise
    shape_rows = np.isin(t["quantity"], ["size", "xx-yy"])
    assert np.all((t["regressor_reliability"][shape_rows] > -0.5) & (t["regressor_reliability"][shape_rows] < 1))
    assert np.all(np.isnan(t["regressor_reliability"][~shape_rows]))
    assert np.all(np.isfinite(t["r_err"])) and np.all(np.isfinite(t["p_value"]))
    assert np.all(t["nspot"] > 2000)
    pngs = sorted(p.name for p in (simdir / "out").glob("*.png"))
    for name in ("spot_flux_map.png", "t_map.png", "q_map.png", "residual_map.png", "t_vs_q.png",
                 "residual_hist.png", "amp_residuals.png"):
        assert name in pngs
        assert (simdir / "out" / name).stat().st_size > 5000
    # same seed, same numbers; SPOTDATA_DIR given explicitly gives the same too
    res2 = run_cli("correlate", simdir / "calib.fits", simdir / "sim" / "spotdata", "--flat",
                   next((simdir / "sim" / "flat").iterdir()), "-o", simdir / "out2", "--quantity", "flux,dx,size,xx-yy",
                   "--nboot", "100", "--nnull", "200", "--seed", "1", "-q", "--no-figures")
    assert res2.exit_code == 0, res2.output
    t2 = Table.read(simdir / "out2" / "results.ecsv")
    np.testing.assert_array_equal(t["r_err_bootstrap"], t2["r_err_bootstrap"])


def test_correlate_bad_inputs(simdir, run_cli, tmp_path):
    run_cli("calibrate", simdir / "sim" / "spotdata", "-o", simdir / "calib2.fits", "-q")
    bad_flat = tmp_path / "itl.fits"
    from astropy.io import fits

    fits.PrimaryHDU(np.ones((4000, 4072), np.float32)).writeto(bad_flat)
    res = run_cli("correlate", simdir / "calib2.fits", "--flat", bad_flat, "-o", tmp_path / "o", "-q")
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / "results.ecsv").exists()
    res = run_cli("correlate", simdir / "calib2.fits", "--flat", tmp_path / "nope.fits", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "nope.fits" in res.output
    res = run_cli("correlate", simdir / "calib2.fits", "--flat", bad_flat, "-o", tmp_path / "o",
                  "--quantity", "colour")
    assert res.exit_code == 2


def test_demo_runs(tmp_path, run_cli):
    res = run_cli("demo", tmp_path / "demo", "--ndither", "12", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "demo" / "results.ecsv").exists()
    assert "correlation with the injected pattern" in res.output
    pngs = list((tmp_path / "demo").glob("*.png"))
    assert len(pngs) >= 9 and all(p.stat().st_size > 5000 for p in pngs)


def test_figures_have_titles_and_labels():
    from spotflat import plots

    rng = np.random.default_rng(0)
    q = 1 + 0.01 * rng.normal(size=(50, 8))
    t = q + 0.005 * rng.normal(size=q.shape)
    for fig in (plots.plot_t_vs_q(t, q, slope=1.0, slope_err=0.1, r=0.8),
                plots.plot_residual_hist(t / q - 1, expected_rms=0.005),
                plots.plot_spot_map(rng.uniform(0, 4000, 50), rng.uniform(0, 4000, 50), t[:, 0],
                                    detector="R22_S11"),
                plots.plot_ccd_map(rng.normal(size=(32, 32)), bin=128, detector="R22_S11", title="map")):
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
