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
