"""Reading processed-grid files: both formats, metadata, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

import spotflat
from spotflat.errors import InputError
from spotflat.grids import grid_positions, parse_filename, read_grid_file

from gridfiles import grid_params, name, write_dm, write_legacy, write_run


def test_real_catalogue_reads(real_catalogue):
    grids = spotflat.read_grids(real_catalogue)
    assert grids.nspot == 2401 and grids.nexp == 1
    row = grids.exposures[0]
    with fits.open(real_catalogue) as hdul:
        h = hdul["GRID_INFO"].header
        assert row["x0"] == h["X0"] and row["y0"] == h["Y0"]
        assert row["xstep"] == h["XSTEP"] and row["ystep"] == h["YSTEP"]
        assert row["theta"] == h["THETA"] and row["ncols"] == h["NCOLS"] == 49 and row["nrows"] == 49
        data = hdul[1].data
    assert grids.detector == "R02_S02" and row["detector"] == "R02_S02"
    assert row["exptime"] == 20.0 and (row["bot_x"], row["bot_y"]) == (-293.2, 39.6)
    assert row["obs_date"] == "2019-10-31" and row["seqnum"] == 1500
    assert grids.flux_column == "base_SdssShape_instFlux"
    # values land at their spot index
    ok = np.isfinite(data["spotgrid_index"])
    k = data["spotgrid_index"][ok].astype(int)
    np.testing.assert_array_equal(grids.flux[k, 0], data["base_SdssShape_instFlux"][ok])
    np.testing.assert_allclose(grids.dx[k, 0], data["base_SdssCentroid_x"][ok] - data["spotgrid_x"][ok])
    # the grid model reproduces the fitted grid points of the real file
    gx, gy = grid_positions(h["X0"], h["Y0"], h["XSTEP"], h["YSTEP"], h["THETA"], 49, 49)
    np.testing.assert_allclose(gx[k], data["spotgrid_x"][ok], atol=1e-8)
    np.testing.assert_allclose(gy[k], data["spotgrid_y"][ok], atol=1e-8)


def test_real_catalogue_other_flux_column(real_catalogue):
    col = "base_CircularApertureFlux_12_0_instFlux"
    grids = spotflat.read_grids(real_catalogue, flux_column=col)
    assert grids.flux_column == col
    assert np.isfinite(grids.flux_err).sum() > 2000


def test_parse_filename_variants():
    m = parse_filename("/a/b/MC_C_20200110_000123_R22_S11_15s_1.0x_-2.5y_processed_grid.fits")
    assert m["detector"] == "R22_S11" and m["exptime"] == 15.0 and m["bot_y"] == -2.5
    assert parse_filename("random.fits") is None


@pytest.mark.parametrize("fmt", ["dm", "legacy"])
def test_both_formats_same_values(tmp_path, fmt):
    grid = grid_params(7, 5)
    rng = np.random.default_rng(3)
    flux = rng.uniform(1e4, 2e4, 35)
    flux[[2, 11]] = np.nan
    dxy = (rng.normal(0, 0.5, 35), rng.normal(0, 0.5, 35))
    p = tmp_path / name(0, fmt=fmt)
    (write_dm if fmt == "dm" else write_legacy)(p, grid, flux, dxy=dxy)
    gf = read_grid_file(p)
    assert gf.format == fmt and gf.nspot == 35
    np.testing.assert_array_equal(np.isnan(gf.values["flux"]), np.isnan(flux))
    np.testing.assert_allclose(gf.values["flux"], flux)
    gx, gy = grid_positions(*(grid[k] for k in ("X0", "Y0", "XSTEP", "YSTEP", "THETA", "NCOLS", "NROWS")))
    ok = np.isfinite(flux)
    np.testing.assert_allclose(gf.values["x"][ok], (gx + dxy[0])[ok])
    np.testing.assert_allclose(gf.values["dy"][ok], dxy[1][ok])
    np.testing.assert_allclose(gf.values["yy"][ok], 5.2)
    assert np.isnan(gf.values["x"][~ok]).all()


def test_legacy_flux_columns(tmp_path):
    grid = grid_params(3, 3)
    flux = np.arange(1.0, 10.0)
    p = tmp_path / name(0, fmt="legacy")
    write_legacy(p, grid, flux)
    assert read_grid_file(p).flux_column == "FLUX+DFLUX"
    np.testing.assert_allclose(read_grid_file(p, flux_column="DFLUX").values["flux"], flux)
    np.testing.assert_allclose(read_grid_file(p, flux_column="FLUX").values["flux"], 0.0)


def test_stacking_order_and_shape(tmp_path):
    paths, F, s, f = write_run(tmp_path, nexp=5, ncols=4, nrows=3)
    grids = spotflat.read_grids(list(reversed(paths)))
    assert grids.flux.shape == (12, 5)
    assert list(grids.exposures["filename"]) == [p.name for p in paths]
    np.testing.assert_allclose(grids.flux, f)
    assert grids.exposures["bot_x"].unit == "mm"


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        spotflat.read_grids(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no processed-grid FITS"):
        spotflat.read_grids(tmp_path / "empty")
    bad = tmp_path / "trunc.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    with pytest.raises(InputError, match="trunc.fits"):
        read_grid_file(bad)
    # grid size mismatch between files
    d = tmp_path / "mix"
    d.mkdir()
    write_dm(d / name(0), grid_params(5, 5), np.ones(25))
    write_dm(d / name(1), grid_params(6, 5), np.ones(30))
    with pytest.raises(InputError, match="grid size 6 x 5 differs"):
        spotflat.read_grids(d)
    # duplicate indices
    p = tmp_path / name(3)
    write_dm(p, grid_params(3, 3), np.ones(9), extra_junk=0)
    with fits.open(p, mode="update") as hdul:
        hdul[1].data["spotgrid_index"][1] = 0.0
    with pytest.raises(InputError, match="duplicate spot indices"):
        read_grid_file(p)
    with pytest.raises(InputError, match="no column 'nope'"):
        read_grid_file(d / name(0), flux_column="nope")


def test_mixed_detectors_need_choice(tmp_path):
    write_run(tmp_path, nexp=3, det="R22_S11", ncols=3, nrows=3)
    write_run(tmp_path, nexp=4, det="R10_S02", ncols=3, nrows=3)
    with pytest.raises(InputError, match="2 detectors.*R10_S02, R22_S11"):
        spotflat.read_grids(tmp_path)
    g = spotflat.read_grids(tmp_path, detector="R10_S02")
    assert g.nexp == 4 and g.detector == "R10_S02"


def test_fast_reader_matches_astropy(real_catalogue, tmp_path):
    """The numpy FITS reader and the astropy path give identical values."""
    from astropy.io import fits as afits

    from spotflat.grids import _read_astropy, _read_fast

    write_legacy(tmp_path / name(0, fmt="legacy"), grid_params(5, 4), np.linspace(1, 2, 20))
    for p in (real_catalogue, tmp_path / name(0, fmt="legacy")):
        fast = _read_fast(p, None)
        with afits.open(p) as hdul:
            slow = _read_astropy(p, hdul, None)
        assert fast.grid == slow.grid and fast.meta == slow.meta
        for q in fast.values:
            np.testing.assert_array_equal(fast.values[q], slow.values[q])


def test_gzip_file_falls_back(tmp_path):
    import gzip

    p = tmp_path / name(0)
    write_dm(p, grid_params(3, 3), np.arange(1.0, 10.0))
    gz = tmp_path / (p.name + ".gz")
    gz.write_bytes(gzip.compress(p.read_bytes()))
    np.testing.assert_array_equal(read_grid_file(gz).values["flux"], read_grid_file(p).values["flux"])
    assert parse_filename(gz)["detector"] == "R22_S11"


def test_fast_header_parser_matches_astropy(real_catalogue, tmp_path):
    """Every keyword value of every HDU agrees with astropy's header."""
    from astropy.io import fits as afits

    from spotflat.fitstable import FitsFile

    p = tmp_path / "cards.fits"
    hdr = afits.Header()
    hdr["STR"] = ("it''s END here", "a comment / with a slash")
    hdr["NEG"] = -42
    hdr["FLT"] = 1.5e-7
    hdr["EXPD"] = 1e300
    hdr["LOGT"], hdr["LOGF"] = True, False
    hdr["HIERARCH LONG KEYWORD NAME"] = 3.25
    hdr["COMMENT"] = "KEY     = 'not a card'"
    afits.HDUList([afits.PrimaryHDU(header=hdr), afits.BinTableHDU.from_columns(
        [afits.Column(name="a", format="D", array=np.arange(3.0))])]).writeto(p)
    for path in (real_catalogue, p):
        ff = FitsFile(path)
        with afits.open(path) as hdul:
            assert len(ff.headers) == len(hdul)
            for ours, theirs in zip(ff.headers, hdul):
                keys = [k for k in theirs.header if k not in ("COMMENT", "HISTORY", "")]
                assert sorted(ours) == sorted(set(keys))
                for k in keys:
                    assert ours[k] == theirs.header[k], k
    assert FitsFile(p).headers[0]["LONG KEYWORD NAME"] == 3.25


def test_fast_header_parser_truncated(tmp_path):
    from spotflat.fitstable import FitsFile, Unsupported

    p = tmp_path / "cut.fits"
    write_dm(p, grid_params(3, 3), np.arange(1.0, 10.0))
    raw = p.read_bytes()
    end = raw.index(b"END" + b" " * 77)
    for cut in (end, end + 80, 2880 * 2 + 100, len(raw) - 3000):
        p.write_bytes(raw[:cut])
        with pytest.raises(Unsupported):
            FitsFile(p)


def test_exposure_paths_follow_the_working_directory(tmp_path, monkeypatch):
    """Relative folders are resolved against the current directory at each read."""
    for sub in ("a", "b"):
        (tmp_path / sub / "spotdata").mkdir(parents=True)
        write_dm(tmp_path / sub / "spotdata" / name(0), grid_params(3, 3), np.arange(1.0, 10.0))
    for sub in ("a", "b"):
        monkeypatch.chdir(tmp_path / sub)
        g = spotflat.read_grids("spotdata")
        assert g.exposures["path"][0] == str((tmp_path / sub / "spotdata" / name(0)).resolve())


# ---------------------------------------------------------------------------- point-level QC
def _legacy_with_neighbour_matches(path, seed=0):
    """A legacy grid as older grid tasks wrote it: grid points without a spot of their own
    "matched" to the nearest source -- the neighbour one step away -- which is then
    assigned to two grid points."""
    grid = grid_params(9, 9)
    rng = np.random.default_rng(seed)
    flux = rng.uniform(8e4, 1.2e5, 81)
    write_legacy(path, grid, flux, seed=seed)
    with fits.open(path, mode="update") as hdul:
        d = hdul[1].data
        for a, b in ((40, 41), (10, 19)):  # a has no spot: gets b's source (next row / next column)
            xb, yb = d["X"][b] + d["DX"][b], d["Y"][b] + d["DY"][b]
            d["DX"][a], d["DY"][a] = xb - d["X"][a], yb - d["Y"][a]
            d["DFLUX"][a], d["DXX"][a], d["DYY"][a] = d["DFLUX"][b], d["DXX"][b], d["DYY"][b]
    return grid


def test_legacy_far_matches_and_shared_sources(tmp_path):
    p = tmp_path / name(0, fmt="legacy")
    _legacy_with_neighbour_matches(p)
    gf = read_grid_file(p)
    # the shared source is dropped for both grid points
    assert sorted(gf.ambiguous) == [10, 19, 40, 41]
    assert np.all(np.isnan(gf.values["flux"][[10, 19, 40, 41]]))
    assert np.isfinite(gf.values["flux"]).sum() == 77
    grids = spotflat.read_grids([p])
    counts = grids.flag_counts()
    assert counts["ambiguous"][0] == 4
    assert grids.flags[40, 0] & 2 and grids.flags[41, 0] & 2


def test_far_match_rule_is_configurable(tmp_path):
    """A match one step away (not shared) is unmatched by the far rule; a point 0.2 step
    away is kept by the default (0.25) and unmatched with max_offset=0.1."""
    grid = grid_params(9, 9)
    flux = np.full(81, 1e5)
    dx = np.random.default_rng(1).normal(0, 0.3, 81)
    dy = np.zeros(81)
    dx[5] = grid["XSTEP"] * 1.0   # neighbour's position, its flux
    dx[7] = grid["XSTEP"] * 0.2   # a large but real offset
    write_legacy(tmp_path / name(0, fmt="legacy"), grid, flux, dxy=(dx, dy))
    g = spotflat.read_grids(tmp_path)
    assert g.flags[5, 0] == 1 and np.isnan(g.flux[5, 0])
    assert g.flags[7, 0] == 0 and np.isfinite(g.flux[7, 0])
    assert g.meta["max_offset"] == 0.25
    g = spotflat.read_grids(tmp_path, max_offset=0.1)
    assert g.flags[7, 0] == 1
    g = spotflat.read_grids(tmp_path, max_offset=None)
    assert not g.flags.any()


def test_far_matches_in_dm_catalogues(tmp_path):
    grid = grid_params(9, 9)
    flux = np.full(81, 1e5)
    dx = np.random.default_rng(2).normal(0, 0.3, 81)
    dx[12] = 64.0
    write_dm(tmp_path / name(0), grid, flux, dxy=(dx, np.zeros(81)))
    g = spotflat.read_grids(tmp_path)
    assert g.flag_counts()["far"][0] == 1 and np.isnan(g.flux[12, 0])


def test_far_flags_counted_in_catalogue(tmp_path, run_cli):
    (tmp_path / "d").mkdir()
    for j in range(4):
        _legacy_with_neighbour_matches(tmp_path / "d" / name(j, fmt="legacy"), seed=j)
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "c.fits", "-q", "--no-qc-figure")
    assert res.exit_code == 0, res.output
    assert "16 sharing a source" in res.output
    cal = spotflat.read_calibration(tmp_path / "c.fits")
    assert cal.meta["NAMBIG"] == 16 and list(cal.exposures["nambiguous"]) == [4, 4, 4, 4]


# ---------------------------------------------------------------------------- detectors, non-grid files
def _unnamed_run(tmp_path, n=4):
    paths, *_ = write_run(tmp_path / "d", nexp=n, ncols=6, nrows=6)
    for p in paths:
        p.rename(p.with_name(f"grid_{p.name[14:20]}.fits"))  # names without metadata
    return tmp_path / "d"


def test_detector_assigned_to_unnamed_files(tmp_path, run_cli):
    d = _unnamed_run(tmp_path)
    assert spotflat.read_grids(d).detector == ""
    g = spotflat.read_grids(d, detector="R22_S20")
    assert g.detector == "R22_S20" and set(g.exposures["detector"]) == {"R22_S20"}
    assert set(g.exposures["raft"]) == {"R22"} and set(g.exposures["sensor"]) == {"S20"}
    res = run_cli("calibrate", d, "-o", tmp_path / "c.fits", "-q", "--detector", "R22_S20", "--no-qc-figure")
    assert res.exit_code == 0, res.output
    assert "Calibration of R22_S20" in res.output
    assert spotflat.read_calibration(tmp_path / "c.fits").detector == "R22_S20"


def test_detector_conflict_refused(tmp_path, run_cli):
    write_run(tmp_path / "d", nexp=3, ncols=6, nrows=6, det="R22_S11")
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "c.fits", "-q", "--detector", "R22_S20")
    assert res.exit_code != 0 and "R22_S20" in res.output and "R22_S11" in res.output
    assert not (tmp_path / "c.fits").exists()
    # the library refuses the same way when files carrying R22_S11 are stacked as R22_S20
    from spotflat.grids import read_grid_file, stack_grid_files

    files = [read_grid_file(p) for p in sorted((tmp_path / "d").iterdir())]
    with pytest.raises(InputError, match="R22_S11, not R22_S20"):
        stack_grid_files(files, detector="R22_S20")


def test_non_grid_fits_skipped_with_warning(tmp_path, run_cli):
    d = _unnamed_run(tmp_path)
    res = run_cli("calibrate", d, "-o", tmp_path / "c.fits", "-q", "--no-qc-figure")
    assert res.exit_code == 0, res.output
    import shutil

    shutil.copy(tmp_path / "c.fits", d / "calib_old.fits")  # an earlier output in the folder
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(d / "image.fits")  # an image
    with pytest.warns(UserWarning, match="calib_old.fits"), pytest.warns(UserWarning, match="image.fits"):
        g = spotflat.read_grids(d)
    assert g.nexp == 4 and sorted(map(str, g.meta["skipped"]))[0].endswith("calib_old.fits")
    res = run_cli("calibrate", d, "-o", tmp_path / "c2.fits", "-q", "--no-qc-figure")
    assert res.exit_code == 0, res.output
    assert "calib_old.fits" in res.output and "image.fits" in res.output and "skipped" in res.output
    # a grid file without its flux column stays an error
    res = run_cli("calibrate", d, "-o", tmp_path / "c3.fits", "-q", "--flux-column", "nope_instFlux")
    assert res.exit_code != 0 and "nope_instFlux" in res.output
