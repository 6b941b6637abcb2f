"""``spotflat calibrate`` end to end, and every bad input the issue lists."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

import spotflat
from gridfiles import grid_params, name, write_dm, write_run


def _assert_clean_failure(result, tmp_path, must_name, out="calib.fits"):
    assert result.exit_code == 1, result.output
    err = result.stderr if hasattr(result, "stderr") else result.output
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and must_name in lines[0], err
    assert "Traceback" not in result.output
    assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob(".*.tmp*"))


def test_calibrate_writes_catalogue(tmp_path, run_cli):
    write_run(tmp_path / "spotdata", nexp=10, ncols=8, nrows=8)
    res = run_cli("calibrate", tmp_path / "spotdata", "-o", tmp_path / "calib.fits", "--ecsv")
    assert res.exit_code == 0, res.output
    assert "files read" in res.output and "spots kept" in res.output and "median scatter of t" in res.output
    with fits.open(tmp_path / "calib.fits") as hdul:
        spots, exps = hdul["SPOTS"].columns.names, hdul["EXPOSURES"].columns.names
        assert hdul[0].header["NINPUT"] == 10 and hdul[0].header["DETECTOR"] == "R22_S11"
    for c in ("spotgrid_index", "flux", "flux_err", "flux_std", "ndither", "x", "y"):
        assert c in spots
    for c in ("filename", "detector", "exptime", "bot_x", "bot_y", "scale"):
        assert c in exps
    assert (tmp_path / "calib_spots.ecsv").exists()


def test_calibrate_several_detectors(tmp_path, run_cli):
    write_run(tmp_path / "d", nexp=4, ncols=3, nrows=3, det="R22_S11")
    write_run(tmp_path / "d", nexp=5, ncols=3, nrows=3, det="R10_S02")
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "calib.fits")
    assert res.exit_code == 0, res.output
    assert "2 detectors found (R10_S02, R22_S11)" in res.output
    a = spotflat.read_calibration(tmp_path / "calib_R10_S02.fits")
    b = spotflat.read_calibration(tmp_path / "calib_R22_S11.fits")
    assert len(a.exposures) == 5 and len(b.exposures) == 4
    assert set(a.exposures["detector"]) == {"R10_S02"}
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "one.fits", "--detector", "R22_S11")
    assert res.exit_code == 0 and len(spotflat.read_calibration(tmp_path / "one.fits").exposures) == 4
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "x.fits", "--detector", "R01_S00")
    assert res.exit_code == 1 and "R10_S02, R22_S11" in res.output


def test_non_fits_skipped_with_warning(tmp_path, run_cli):
    write_run(tmp_path / "d", nexp=4, ncols=3, nrows=3)
    (tmp_path / "d" / "notes.txt").write_text("hello")
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "calib.fits")
    assert res.exit_code == 0
    assert "notes.txt: not a FITS file, skipped" in res.output


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this system")
def test_fifo_skipped_with_warning(tmp_path, run_cli):
    import os

    write_run(tmp_path / "d", nexp=4, ncols=3, nrows=3)
    os.mkfifo(tmp_path / "d" / "pipe_gridfit.cat")  # opening it to read would hang
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "calib.fits")
    assert res.exit_code == 0, res.output
    assert "pipe_gridfit.cat: not a regular file (a pipe, socket or device), skipped" in res.output
    assert len(spotflat.read_calibration(tmp_path / "calib.fits").exposures) == 4


def test_output_folder_checked_like_other_commands(tmp_path, run_cli):
    write_run(tmp_path / "d", nexp=4, ncols=3, nrows=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "calib.fits").mkdir()  # a name calibrate never writes here: no reason to refuse
    res = run_cli("calibrate", tmp_path / "d", "-o", out)
    assert res.exit_code == 0, res.output
    assert (out / "calib_R22_S11.fits").is_file() and (out / "calib_R22_S11_qc.png").is_file()
    # a file this run would write, but a folder: refused before any work, naming it
    (out / "calib_R22_S11.fits").unlink()
    (out / "calib_R22_S11.fits").mkdir()
    res = run_cli("calibrate", tmp_path / "d", "-o", out)
    assert res.exit_code == 1 and "calib_R22_S11.fits" in res.output, res.output
    assert "Traceback" not in res.output
    # a new folder (name ending in /) under a regular file: refused like correlate's -o
    (tmp_path / "afile").write_text("x")
    res = run_cli("calibrate", tmp_path / "d", "-o", f"{tmp_path / 'afile' / 'sub'}/")
    assert res.exit_code == 1 and "afile" in res.output and "not a directory" in res.output, res.output


def test_bad_usage_exit_2(tmp_path, run_cli):
    assert run_cli("calibrate", tmp_path).exit_code == 2
    assert run_cli("calibrate", tmp_path, "-o", "x.fits", "--stat", "mode").exit_code == 2


def _dm_dir(tmp_path, n=4, **kw):
    d = tmp_path / "d"
    write_run(d, nexp=n, ncols=3, nrows=3, **kw)
    return d


def test_empty_directory(tmp_path, run_cli):
    (tmp_path / "d").mkdir()
    res = run_cli("calibrate", tmp_path / "d", "-o", tmp_path / "calib.fits")
    _assert_clean_failure(res, tmp_path, "no processed-grid FITS files")


def test_truncated_fits(tmp_path, run_cli):
    d = _dm_dir(tmp_path)
    full = (d / name(0)).read_bytes()
    (d / name(9)).write_bytes(full[: len(full) // 2])
    res = run_cli("calibrate", d, "-o", tmp_path / "calib.fits")
    _assert_clean_failure(res, tmp_path, name(9))


def test_missing_flux_column(tmp_path, run_cli):
    d = _dm_dir(tmp_path)
    res = run_cli("calibrate", d, "-o", tmp_path / "calib.fits", "--flux-column", "base_PsfFlux_instFlux")
    _assert_clean_failure(res, tmp_path, "no column 'base_PsfFlux_instFlux'")


def test_grid_size_mismatch(tmp_path, run_cli):
    d = _dm_dir(tmp_path)
    write_dm(d / name(7), grid_params(4, 3), np.ones(12))
    res = run_cli("calibrate", d, "-o", tmp_path / "calib.fits")
    _assert_clean_failure(res, tmp_path, name(7))


def test_duplicate_indices(tmp_path, run_cli):
    d = _dm_dir(tmp_path)
    with fits.open(sorted(d.glob("*.cat"))[2], mode="update") as hdul:
        hdul[1].data["spotgrid_index"][1] = hdul[1].data["spotgrid_index"][0]
    res = run_cli("calibrate", d, "-o", tmp_path / "calib.fits")
    _assert_clean_failure(res, tmp_path, "duplicate spot indices")


def test_all_nan_fluxes(tmp_path, run_cli):
    d = tmp_path / "d"
    d.mkdir()
    for j in range(4):
        write_dm(d / name(j), grid_params(3, 3), np.full(9, np.nan), extra_junk=2)
    res = run_cli("calibrate", d, "-o", tmp_path / "calib.fits")
    _assert_clean_failure(res, tmp_path, "all fluxes are NaN")


def test_unwritable_output(tmp_path, run_cli):
    d = _dm_dir(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = run_cli("calibrate", d, "-o", ro / "calib.fits")
        if res.exit_code == 0:  # running as a user who can write anywhere
            pytest.skip("directory permissions are not enforced for this user")
        _assert_clean_failure(res, tmp_path, str(ro))
    finally:
        ro.chmod(0o700)
    res = run_cli("calibrate", d, "-o", tmp_path / "missing" / "calib.fits")
    _assert_clean_failure(res, tmp_path, "output directory does not exist")
    (tmp_path / "afile").write_text("x")
    res = run_cli("calibrate", d, "-o", tmp_path / "afile" / "calib.fits")
    _assert_clean_failure(res, tmp_path, "afile: not a directory")


def test_astropy_log_quiet_when_astropy_imported_during_the_command():
    """The commands keep astropy's log at ERROR; when astropy is first imported during
    the command (calibrate imports it while its readers read), the level applies from
    that import on, and is restored afterwards."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from spotflat.cli import _astropy_log_errors_only\n"
        "assert 'astropy' not in sys.modules\n"
        "with _astropy_log_errors_only():\n"
        "    import astropy\n"
        "    inside = astropy.log.level\n"
        "after = astropy.log.level\n"
        "with _astropy_log_errors_only():\n"
        "    again = astropy.log.level\n"
        "print(inside, after, again, astropy.log.level, any(type(f).__name__ == '_AfterImport' for f in sys.meta_path))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["40", "20", "40", "20", "False"], out
