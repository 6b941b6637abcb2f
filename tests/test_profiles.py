"""QE or pixel area: injection-recovery of the tree-ring verdict on simulated sensors.

The rings are the imSim model of R22_S20 (real centre, real shape), scaled
up to the strong end of the BNL-measured range (flat modulation rms ~0.05-0.09 %)
so that one small run resolves them. The real-amplitude case (R22_S20's
4e-5) is in ``benchmarks/bench_starflat.py --verdict``.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from spotflat.grids import SpotGrids
from spotflat.response import ResponseParams
from spotflat.simulate import simulate_data
from spotflat.verdict import classify, sensor_verdict

DET = "R22_S20"


def _grids(sim) -> SpotGrids:
    sp = sim.spots
    return SpotGrids(flux=sp.flux, flux_err=sp.flux_err, x=sp.x, y=sp.y, dx=sp.x - sp.gx, dy=sp.y - sp.gy,
                     xx=sp.xx, yy=sp.yy, xy=sp.xy, exposures=Table({"x0": sp.grid["x0"], "y0": sp.grid["y0"]}),
                     flux_column="base_SdssShape_instFlux", detector=DET)


def _verdict(kind: str, boost: float, seed: int = 3, ndither: int = 40):
    sim = simulate_data(DET, ndither=ndither, seed=seed,
                        response=ResponseParams(treering_kind=kind, treering_boost=boost))
    flat = sim.flat / np.mean(sim.flat)
    return sim, sensor_verdict(_grids(sim), flat, DET, nboot=20, seed=seed)


@pytest.fixture(scope="module")
def strong():
    return {kind: _verdict(kind, 25.0) for kind in ("qe", "area")}


def test_qe_rings_flux_follows_the_flat(strong):
    sim, v = strong["qe"]
    row = v.table[v.table["feature"] == "treering"][0]
    assert abs(row["qe_fraction"] - 1) < 3 * row["qe_fraction_err"] and row["qe_fraction_err"] < 0.2
    assert abs(row["area_fraction"]) < 3 * row["area_fraction_err"]
    assert row["verdict"] == "qe"


def test_area_rings_centroids_follow_the_integral_flux_does_not(strong):
    sim, v = strong["area"]
    row = v.table[v.table["feature"] == "treering"][0]
    assert abs(row["qe_fraction"]) < 3 * row["qe_fraction_err"]
    assert abs(row["area_fraction"] - 1) < 3 * row["area_fraction_err"] and row["area_fraction_err"] < 0.4
    assert row["verdict"] == "area"
    # the profile's centre is the table's, and the centroid profile follows the injected f(r)
    prof = v.profiles["treering"]
    assert prof.centre == pytest.approx(sim.treering.centre)


def test_verdict_table_columns(strong):
    _, v = strong["area"]
    t = v.table
    assert list(t["feature"]) == ["treering", "edge"]
    for col in ("qe_fraction", "qe_fraction_err", "area_fraction", "area_fraction_err", "verdict"):
        assert col in t.colnames
    assert set(t["verdict"]) <= {"qe", "area", "mixed", "undetected"}


def test_classify_rules():
    assert classify(1.0, 0.1, 0.0, 0.1, 20) == "qe"
    assert classify(0.0, 0.1, 1.0, 0.1, 20) == "area"
    assert classify(0.5, 0.1, 0.5, 0.1, 20) == "mixed"
    assert classify(0.05, 0.1, 0.05, 0.1, 20) == "undetected"
    assert classify(1.0, 0.1, 0.0, 0.1, 2) == "undetected"  # the flat shows no rings
    # significant but tiny: not a second cause (a QE ring's unmodelled centroid pull at high S/N)
    assert classify(1.0, 0.004, 0.004, 0.001, 90) == "qe"
    assert classify(0.004, 0.001, 1.0, 0.01, 90) == "area"


def test_focal_plane_verdict_has_a_row_per_detector_and_feature(tmp_path):
    """``spotflat correlate`` gains the profiles and verdict: per detector one row per feature, and in
    focal-plane mode ``verdict.ecsv`` at the top with one row per (detector, feature) and a ``detector`` column."""
    from spotflat import build_calibration, read_grids
    from spotflat.calibration import write_calibration
    from spotflat.focalplane import correlate_focal_plane
    from spotflat.simulate import simulate_run

    calibs, flats = {}, {}
    for det, seed in (("R22_S20", 2), ("R22_S11", 5)):
        sim = simulate_run(tmp_path / det, detector=det, ndither=6, seed=seed, ncols=12, nrows=12, xstep=250.0,
                           response=ResponseParams(treering_boost=25.0))
        cal = build_calibration(read_grids(sim.spot_files), min_dithers=3)
        write_calibration(cal, tmp_path / f"calib_{det}.fits")
        calibs[det], flats[det] = tmp_path / f"calib_{det}.fits", sim.flat_path
    res = correlate_focal_plane(calibs, flats, tmp_path / "out", figures=False, nboot=10, nnull=10, block="patch")
    t = Table.read(tmp_path / "out" / "verdict.ecsv")
    assert t.colnames[:2] == ["detector", "feature"]
    assert [(d, f) for d, f in zip(t["detector"], t["feature"])] == [
        ("R22_S20", "treering"), ("R22_S20", "edge"), ("R22_S11", "treering"), ("R22_S11", "edge")]
    assert set(t["verdict"]) <= {"qe", "area", "mixed", "undetected"}
    for det in calibs:  # each detector's rows are its own verdict.ecsv's
        own = Table.read(tmp_path / "out" / det / "verdict.ecsv")
        assert list(own["feature"]) == ["treering", "edge"]
        assert (tmp_path / "out" / det / "profiles.ecsv").exists()
        mine = t[t["detector"] == det]
        for col in own.colnames:
            a, b = np.asarray(own[col]), np.asarray(mine[col])
            assert (np.allclose(a, b, equal_nan=True) if a.dtype.kind == "f" else list(a) == list(b)), col
    assert len(res.verdict) == 4


def test_ring_centre_fitted_from_the_flat(strong):
    """The centre from the flat alone: the simulated sensor's (the table's), and one injected elsewhere."""
    from spotflat.ringcentre import fit_treering_centre
    from spotflat.treerings import area_factor_map
    from spotflat.verdict import MIN_COHERENCE, _centre

    sim, _ = strong["area"]
    got = fit_treering_centre(sim.flat, DET)  # its PRNU, dust and gain steps too
    assert np.hypot(*np.subtract(got.centre, sim.treering.centre)) < 10, (got, sim.treering.centre)
    assert got.coherence > MIN_COHERENCE
    # rings about a centre no table has (other side of the CCD), realistic flat noise
    true = (-2500.0, 6100.0)
    rng = np.random.default_rng(4)
    flat = area_factor_map(sim.treering.with_centre(true), sim.flat.shape)
    flat = flat * (1 + rng.standard_normal(flat.shape).astype(np.float32) / np.sqrt(50000.0))
    c, source = _centre("fit", None, flat)
    assert source == "fit" and np.hypot(c[0] - true[0], c[1] - true[1]) < 10, c
    # noise alone: no coherent rings, no centre (and the table wins for a known detector)
    noise = 1 + rng.standard_normal((1024, 1024)) / np.sqrt(50000.0)
    assert fit_treering_centre(noise).coherence < MIN_COHERENCE
    assert _centre(None, "UNKNOWN", noise) == (None, "fit")
    assert _centre(None, DET, noise)[1] == "table"
