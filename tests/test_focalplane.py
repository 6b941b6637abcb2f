"""Focal-plane mode: finding catalogues and flats by detector, the figure, output layout and clean failure."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gridfiles import write_run
from spotflat.errors import InputError
from spotflat.focalplane import (correlate_focal_plane, find_calibrations, find_flats, plot_focal_plane)


@pytest.fixture
def calib_dir(tmp_path, run_cli):
    """Catalogues of two detectors written by ``spotflat calibrate TREE -o DIR/``."""
    write_run(tmp_path / "tree" / "a", nexp=5, ncols=4, nrows=4, det="R22_S11")
    write_run(tmp_path / "tree" / "b", nexp=6, ncols=4, nrows=4, det="R10_S02")
    res = run_cli("calibrate", tmp_path / "tree", "-o", f"{tmp_path / 'calib'}/", "-q", "-j", 1)
    assert res.exit_code == 0, res.output
    return tmp_path / "calib"


def _tiny_fits(path, **cards):
    hdu = fits.PrimaryHDU(np.ones((10, 10), np.float32))
    for k, v in cards.items():
        hdu.header[k] = v
    hdu.writeto(path)
    return path


def test_calibrate_into_a_folder(calib_dir, tmp_path, run_cli):
    assert sorted(p.name for p in calib_dir.glob("*.fits")) == ["calib_R10_S02.fits", "calib_R22_S11.fits"]
    # an existing folder without the trailing slash, and a single detector, go there too
    res = run_cli("calibrate", tmp_path / "tree" / "a", "-o", calib_dir, "-q", "-j", 1)
    assert res.exit_code == 0 and "Calibration of R22_S11" in res.output
    assert sorted(p.name for p in calib_dir.glob("*.fits")) == ["calib_R10_S02.fits", "calib_R22_S11.fits"]


def test_find_calibrations(calib_dir, tmp_path):
    _tiny_fits(calib_dir / "not_a_catalogue.fits")
    (calib_dir / "notes.ecsv").write_text("# nothing\n")
    found = find_calibrations(calib_dir)
    assert list(found) == ["R10_S02", "R22_S11"]
    assert found["R22_S11"].name == "calib_R22_S11.fits"
    assert list(find_calibrations(f"{calib_dir}/calib_R22*.fits")) == ["R22_S11"]
    (tmp_path / "dup").mkdir()
    for i in (1, 2):
        (tmp_path / "dup" / f"c{i}.fits").write_bytes((calib_dir / "calib_R22_S11.fits").read_bytes())
    with pytest.raises(InputError, match="two calibration catalogues for R22_S11"):
        find_calibrations(tmp_path / "dup")
    with pytest.raises(InputError, match="no spotflat calibration catalogues"):
        find_calibrations(f"{calib_dir}/not_*.fits")
    with pytest.raises(InputError, match="no such file"):
        find_calibrations(tmp_path / "nowhere")


def test_find_flats_by_name_or_header(tmp_path):
    d = tmp_path / "flats"
    (d / "sub").mkdir(parents=True)
    _tiny_fits(d / "ccob_flat_R22_S11.fits")
    _tiny_fits(d / "sub" / "MC_C_20191031_000100_R02_S02.fits")
    _tiny_fits(d / "flat_a.fits", RAFTBAY="R10", CCDSLOT="S02")
    _tiny_fits(d / "junk.fits")                    # no detector anywhere: ignored
    _tiny_fits(d / "xR33_S119.fits")               # not a detector name
    found = find_flats(d)
    assert {k: v.name for k, v in found.items()} == {
        "R02_S02": "MC_C_20191031_000100_R02_S02.fits", "R10_S02": "flat_a.fits",
        "R22_S11": "ccob_flat_R22_S11.fits"}
    assert list(find_flats(d, ["R22_S11"])) == ["R22_S11"]
    with pytest.raises(InputError, match=r"no flat for 2 detector\(s\): R01_S00, R44_S22"):
        find_flats(d, ["R22_S11", "R01_S00", "R44_S22"])
    _tiny_fits(d / "other_R22_S11.fits")
    with pytest.raises(InputError, match="two flats for R22_S11"):
        find_flats(d, ["R22_S11"])


def test_failing_detector_writes_nothing(calib_dir, tmp_path):
    flats = tmp_path / "flats"
    flats.mkdir()
    for det in ("R22_S11", "R10_S02"):  # wrong size for the CCD: the task fails on the worker
        _tiny_fits(flats / f"ccob_flat_{det}.fits")
    out = tmp_path / "new" / "out"
    with pytest.raises(InputError, match="flat is 10 x 10 pixels"):
        correlate_focal_plane(find_calibrations(calib_dir), find_flats(flats), out, nboot=10, nnull=10)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(InputError):
        correlate_focal_plane(find_calibrations(calib_dir), find_flats(flats), existing, nboot=10, nnull=10)
    assert list(existing.iterdir()) == []          # no staging folder, no partial detector


def test_correlate_cli_focal_plane_needs_flat_dir(calib_dir, tmp_path, run_cli):
    res = run_cli("correlate", calib_dir, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--flat-dir" in res.output
    res = run_cli("correlate", calib_dir, "--flat-dir", tmp_path / "none", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "none: not a directory" in res.output
    assert not (tmp_path / "o").exists()


def test_plot_focal_plane_draws_ccds_and_amps():
    from matplotlib.collections import PolyCollection

    from spotflat import geometry
    from spotflat.focalplane import _amp_polygon

    summary = Table({"detector": ["R22_S11", "R02_S02"], "r": [0.5, -0.2], "d_rms": [1e-3, 2e-3]})
    amps = Table({"detector": ["R22_S11"] * 16, "amp": geometry.amp_names("R22_S11"),
                  "d_rms": np.linspace(1e-3, 2e-3, 16)})
    fig = plot_focal_plane(summary, amps)
    ax_ccd, ax_amp = fig.axes[:2]
    cols = [[c for c in ax.collections if isinstance(c, PolyCollection)][0] for ax in (ax_ccd, ax_amp)]
    assert np.allclose(cols[0].get_array(), [0.5, -0.2])
    assert np.allclose(cols[1].get_array(), amps["d_rms"])
    # the 16 amplifier polygons tile the CCD outline
    fx, fy = geometry.detector_outline("R22_S11")
    polys = [_amp_polygon("R22_S11", a) for a in amps["amp"]]

    def area(p):
        x, y = p[:, 0], p[:, 1]
        return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))

    assert np.isclose(sum(area(p) for p in polys), area(np.column_stack([fx[:4], fy[:4]])), rtol=1e-9)
    for p in polys:
        assert fx.min() - 1e-6 <= p[:, 0].min() and p[:, 0].max() <= fx.max() + 1e-6
    # without amplifiers the right panel shows the residual RMS per CCD
    fig = plot_focal_plane(summary)
    col = [c for c in fig.axes[1].collections if isinstance(c, PolyCollection)][0]
    assert np.allclose(col.get_array(), [1e-3, 2e-3])
