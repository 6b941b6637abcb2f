"""Fuzz campaign: damaged copies of valid inputs through the CLI and the public readers.

Every case damages a copy (in ``tmp_path``) of a simulated run, the real
mixcoatl catalogue or the real raw headers, by one *kind* of damage, and
asserts what a user must see:

* rejected input: exit code 1 (bad data) or 2 (bad usage), one ``Error:`` line
  naming the offending file or option, no traceback, no numpy RuntimeWarning,
  no "unexpected error", and nothing written, moved or changed (inputs and
  output folder are snapshotted, bytes and mtimes);
* accepted input: exit 0 and the *right* result (e.g. the same calibration as
  the undamaged run), not merely a result.

Cases come from a seeded generator (``SEED``): the same cases every run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import spotflat
from fuzzkit import (error_problems, flip_bytes, is_char_device, rewrite_table, run_cli, run_subprocess,
                     set_card, sim_flux_table, snapshot, truncate)
from gridfiles import write_run

SEED = 20261202
RNG = np.random.default_rng(SEED)


# --------------------------------------------------------------------------- base inputs (built once)

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small simulated DM run (+ flat + calibration), a legacy run, and reference results."""
    root = tmp_path_factory.mktemp("fuzzbase")
    out = run_cli(["simulate", root / "sim", "--ndither", "5", "--seed", "3", "-q"])
    assert out.code == 0, out.stderr
    write_run(root / "legacy", fmt="legacy", nexp=5, ncols=9, nrows=9)
    out = run_cli(["calibrate", root / "sim" / "spotdata", "-o", root / "calib.fits", "-q"])
    assert out.code == 0, out.stderr
    out = run_cli(["calibrate", root / "legacy", "-o", root / "calib_legacy.fits", "-q"])
    assert out.code == 0, out.stderr
    return {
        "root": root,
        "dm": root / "sim" / "spotdata",
        "flat": next((root / "sim" / "flat").iterdir()),
        "legacy": root / "legacy",
        "calib": root / "calib.fits",
        "F": sim_flux_table(root / "calib.fits"),
        "F_legacy": sim_flux_table(root / "calib_legacy.fits"),
    }


def _copy_run(src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        shutil.copyfile(p, dst / p.name)  # copyfile: writable copies even of read-only originals
    return sorted(dst.iterdir())


def _check_error(out, names, watched_before, watched: list[Path], codes=(1, 2)):
    problems = error_problems(out, [str(n) for n in names], codes)
    after = snapshot(*watched)
    if after != watched_before:
        changed = sorted(set(after.items()) ^ set(watched_before.items()))
        problems.append(f"files left behind or changed: {changed[:4]}")
    assert not problems, "\n".join(problems) + f"\nstderr: {out.stderr[-500:]}"


def _calibrate_case(tmp_path, base, damage, expect="error", fmt="dm", extra=(), names=None):
    """Damage one file of a copied run, run calibrate, check the verdict."""
    run = tmp_path / "run"
    files = _copy_run(base[fmt], run)
    target = files[1]
    damage(target)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = snapshot(run, outdir)
    out = run_cli(["calibrate", run, "-o", outdir / "calib.fits", "-q", *extra])
    if expect == "either" and out.code == 0:
        assert not out.stderr.count("RuntimeWarning"), out.stderr
        cal = spotflat.read_calibration(outdir / "calib.fits")  # complete, readable
        assert len(cal.exposures) >= len(files) - 1
        return out
    if expect == "ok":
        assert out.code == 0 and out.exception is None, out.stderr
        assert "RuntimeWarning" not in out.stderr, out.stderr
        return out
    _check_error(out, names or [target.name], before, [run, outdir])
    return out


# --------------------------------------------------------------------------- 1. structural header cards

_STRUCTURAL = [
    (1, "NAXIS1", "'abc'"), (1, "NAXIS1", "-809"), (1, "NAXIS1", "99999999999"),
    (1, "NAXIS2", "'many'"), (1, "NAXIS2", "-3"), (1, "NAXIS2", "1000000000"), (1, "NAXIS2", "3.5"),
    (1, "TFIELDS", "'x'"), (1, "TFIELDS", "-1"), (1, "TFIELDS", "5000"),
    (0, "BITPIX", "'eight'"), (0, "BITPIX", "7"), (1, "BITPIX", "-16"), (0, "NAXIS", "-2"),
    (1, "TFORM1", "'Q'"), (1, "TFORM13", "'Q'"), (1, "TFORM13", "'2D'"),
]


@pytest.mark.parametrize("hdu,key,value", _STRUCTURAL, ids=[f"{k}={v}" for _, k, v in _STRUCTURAL])
def test_structural_cards(tmp_path, base, hdu, key, value):
    _calibrate_case(tmp_path, base, lambda p: set_card(p, hdu, key, value))


def test_inconsistent_naxis1(tmp_path, base):
    def damage(p):
        with fits.open(p) as h:
            n1 = h[1].header["NAXIS1"]
        set_card(p, 1, "NAXIS1", str(n1 + 8))
    _calibrate_case(tmp_path, base, damage)


@pytest.mark.parametrize("card", ["NAXIS1  = ='x' / broken", "NAXIS2  = 12 34 56", "TFIELDS =          ",
                                  "GCOUNT  = 'one'", "PCOUNT  = -5"])
def test_unparsable_cards(tmp_path, base, card):
    key = card[:8].strip()
    hdu = 1
    _calibrate_case(tmp_path, base, lambda p: set_card(p, hdu, key, card=card))


@pytest.mark.parametrize("key,value", [("NCOLS", "100000"), ("NROWS", "100000"), ("NCOLS", "T"),
                                       ("X0", "T"), ("XSTEP", "'wide'"), ("THETA", "NAN"), ("NCOLS", "4.5"),
                                       ("NROWS", "0"), ("NCOLS", "-49")])
def test_grid_cards_dm(tmp_path, base, key, value):
    """GRID_INFO cards of a DM catalogue (HDU 2 in the simulated files)."""
    _calibrate_case(tmp_path, base, lambda p: set_card(p, 2, key, value))


@pytest.mark.parametrize("key,value", [("X0", "T"), ("NCOLS", "100000"), ("YSTEP", "'a'")])
def test_grid_cards_legacy(tmp_path, base, key, value):
    _calibrate_case(tmp_path, base, lambda p: set_card(p, 0, key, value), fmt="legacy")


# --------------------------------------------------------------------------- 2. truncations and byte flips

@pytest.mark.parametrize("fraction", sorted(RNG.uniform(0.001, 0.999, 6).round(4)))
def test_truncated(tmp_path, base, fraction):
    _calibrate_case(tmp_path, base, lambda p: truncate(p, fraction))


@pytest.mark.parametrize("seed", list(RNG.integers(0, 2**31, 6)))
def test_byte_flips(tmp_path, base, seed):
    rng = np.random.default_rng(seed)
    _calibrate_case(tmp_path, base, lambda p: flip_bytes(p, rng, 12), expect="either")


@pytest.mark.parametrize("seed", list(RNG.integers(0, 2**31, 3)))
def test_header_byte_flips(tmp_path, base, seed):
    """Flips inside the headers (the first 2 blocks): structural damage, mostly."""
    rng = np.random.default_rng(seed)

    def damage(p):
        buf = bytearray(p.read_bytes())
        for i in rng.integers(0, 5760, 6):
            buf[i] = int(rng.choice(list(b"0123456789-'=TX ")))
        p.write_bytes(bytes(buf))
    _calibrate_case(tmp_path, base, damage, expect="either")


# --------------------------------------------------------------------------- 3. dtypes, vectors, columns

def _retype(col, fn):
    def edit(t):
        t[col] = fn(np.asarray(t[col]))
        return t
    return edit


@pytest.mark.parametrize("kind", ["string", "bool", "vector", "complex", "missing_flux",
                                  "missing_x", "vector_index"])
def test_columns(tmp_path, base, kind):
    flux = "base_SdssShape_instFlux"
    edits = {
        "string": _retype(flux, lambda a: a.astype("S12")),
        "bool": _retype(flux, lambda a: a > 1e5),
        "vector": _retype(flux, lambda a: np.stack([a, a[::-1]], axis=1)),
        "complex": _retype(flux, lambda a: a.astype(complex)),
        "missing_flux": lambda t: t.remove_column(flux),
        "missing_x": lambda t: t.remove_column("base_SdssCentroid_x"),
        "vector_index": _retype("spotgrid_index", lambda a: np.stack([a, a], axis=1)),
    }
    _calibrate_case(tmp_path, base, lambda p: rewrite_table(p, edits[kind]))


def test_table_without_grid_columns_is_skipped_by_name(tmp_path, base):
    """A FITS table with neither ``spotgrid_index`` nor legacy columns is not a grid: skipped, named."""
    out = _calibrate_case(tmp_path, base, lambda p: rewrite_table(p, lambda t: t.remove_column("spotgrid_index")),
                          expect="ok")
    damaged = sorted((tmp_path / "run").iterdir())[1]
    assert f"{damaged}: neither a DM grid catalogue" in out.stderr and "skipped" in out.stderr, out.stderr
    cal = spotflat.read_calibration(tmp_path / "out" / "calib.fits")
    assert damaged.name not in {str(n) for n in cal.exposures["filename"]}
    assert len(cal.exposures) == len(list((tmp_path / "run").iterdir())) - 1


def test_integer_flux_column_is_read_right(tmp_path, base):
    """An integer flux column is valid data: the calibration must follow it, not fail."""
    flux = "base_SdssShape_instFlux"
    _calibrate_case(tmp_path, base, lambda p: rewrite_table(p, _retype(flux, lambda a: np.round(a).astype(np.int64))),
                    expect="ok")
    F = sim_flux_table(tmp_path / "out" / "calib.fits")
    assert np.nanmax(np.abs(F / base["F"] - 1)) < 1e-3


# --------------------------------------------------------------------------- 4. odd values

def _set_values(value, frac=1.0, col="base_SdssShape_instFlux", seed=0):
    def edit(t):
        a = np.asarray(t[col], float).copy()
        sel = np.random.default_rng(seed).random(a.size) < frac
        a[sel] = value
        t[col] = a
        return t
    return edit


@pytest.mark.parametrize("value", [1e-310, 1e-200, 1e300, np.inf, -np.inf, np.nan, -5.0, 0.0])
def test_one_exposure_of_odd_fluxes_does_not_wipe_the_run(tmp_path, base, value):
    """The whole exposure damaged: dropped; the other exposures calibrate as before."""
    out = _calibrate_case(tmp_path, base, lambda p: rewrite_table(p, _set_values(value)), expect="ok")
    assert "NOT converged" not in out.stdout
    cal = spotflat.read_calibration(tmp_path / "out" / "calib.fits")
    ok = np.isfinite(base["F"])
    F = np.asarray(cal.spots["flux"], float)
    assert np.isfinite(F[ok]).mean() > 0.99
    assert np.nanmedian(np.abs(F[ok] / base["F"][ok] - 1)) < 0.01


@pytest.mark.parametrize("value", [1e-310, 1e300, -1.0])
def test_a_few_odd_points(tmp_path, base, value):
    """A few damaged points: excluded, the calibration unchanged elsewhere, no RuntimeWarning."""
    _calibrate_case(tmp_path, base, lambda p: rewrite_table(p, _set_values(value, frac=0.02, seed=5)), expect="ok")
    F = sim_flux_table(tmp_path / "out" / "calib.fits")
    ok = np.isfinite(base["F"])
    assert np.nanmax(np.abs(F[ok] / base["F"][ok] - 1)) < 0.05


def test_negative_moments_are_not_measurements(tmp_path, base):
    """Negative second moments: those points are unmeasured (not used for the footprint)."""
    run = tmp_path / "run"
    files = _copy_run(base["dm"], run)
    rewrite_table(files[0], _set_values(-4.0, frac=0.5, col="base_SdssShape_xx", seed=1))
    grids = spotflat.read_grids(run)
    assert np.nanmin(grids.xx) >= 0 and np.nanmin(grids.yy) >= 0
    j = list(grids.exposures["filename"]).index(files[0].name)
    assert 0.3 < np.isnan(grids.flux[:, j]).mean() < 0.7


def test_all_fluxes_bad_names_the_folder(tmp_path, base):
    run = tmp_path / "run"
    for p in _copy_run(base["dm"], run):
        rewrite_table(p, _set_values(-1.0))
    before = snapshot(run, tmp_path)
    out = run_cli(["calibrate", run, "-o", tmp_path / "c.fits", "-q"])
    _check_error(out, [run.name], before, [run, tmp_path])


# --------------------------------------------------------------------------- 5. names, folders, links, modes

@pytest.mark.parametrize("folder,rename", [("données", None), ("run", "é"), ("naïve dir", "ü ß"), ("日本", None)])
def test_non_ascii_paths_give_the_same_calibration(tmp_path, base, folder, rename):
    run = tmp_path / folder / "spotdata"
    files = _copy_run(base["dm"], run)
    if rename:
        for p in files:
            p.rename(p.with_name(p.name.replace("_gridfit", f"_{rename}_gridfit")))
    out = run_cli(["calibrate", run, "-o", tmp_path / folder / "calib é.fits", "--ecsv", "-q"])
    assert out.code == 0, out.stderr
    cal = spotflat.read_calibration(tmp_path / folder / "calib é.fits")
    assert np.array_equal(np.asarray(cal.spots["flux"]), base["F"], equal_nan=True)
    assert all(Path(p).exists() for p in cal.exposures["path"])  # the paths survive the FITS round trip
    assert (tmp_path / folder / "calib é_spots.ecsv").exists()


def test_dangling_symlink_in_run(tmp_path, base):
    def damage(p):
        link = p.with_name("MC_C_20191031_009999_R22_S11_20.0s_0.0x_0.0y_gridfit.cat")
        os.symlink(p.parent / "gone.cat", link)
    _calibrate_case(tmp_path, base, damage, names=["009999"])


def test_symlink_loop_in_run(tmp_path, base):
    def damage(p):
        a, b = p.with_name("loop_a.cat"), p.with_name("loop_b.cat")
        os.symlink(b, a)
        os.symlink(a, b)
    _calibrate_case(tmp_path, base, damage, names=["loop_"])


def test_symlink_loop_as_argument(tmp_path):
    a = tmp_path / "a"
    os.symlink(tmp_path / "b", a)
    os.symlink(a, tmp_path / "b")
    before = snapshot(tmp_path)
    out = run_cli(["calibrate", a, "-o", tmp_path / "c.fits"])
    _check_error(out, [str(a)], before, [tmp_path])
    with pytest.raises(spotflat.InputError, match=str(a)):
        spotflat.read_grids(a)


def test_symlink_to_a_good_file_is_read(tmp_path, base):
    run = tmp_path / "run"
    files = _copy_run(base["dm"], run)
    keep = tmp_path / "elsewhere.cat"
    files[2].rename(keep)
    os.symlink(keep, files[2])
    out = run_cli(["calibrate", run, "-o", tmp_path / "c.fits", "-q"])
    assert out.code == 0, out.stderr
    assert np.array_equal(sim_flux_table(tmp_path / "c.fits"), base["F"], equal_nan=True)


def test_mode_000_file_is_an_error_not_skipped(tmp_path, base):
    def damage(p):
        os.chmod(p, 0)
    out = _calibrate_case(tmp_path, base, damage)
    assert "permission denied" in out.stderr


def test_mode_000_file_read_directly(tmp_path, base):
    p = tmp_path / "x.cat"
    shutil.copyfile(next(base["dm"].iterdir()), p)
    os.chmod(p, 0)
    for reader in (spotflat.read_grids, spotflat.read_flat, spotflat.read_calibration):
        with pytest.raises(spotflat.InputError, match="permission denied") as info:
            reader(p)
        assert str(p) in str(info.value)


def test_stray_file_of_unknown_detector_is_explained(tmp_path, base):
    """One stray file without a detector splits the run: the message says so and how to fix it."""
    def damage(p):
        shutil.copyfile(p, p.with_name("stray.fits"))
        with fits.open(p.with_name("stray.fits"), mode="update") as h:
            for k in ("RAFTBAY", "CCDSLOT"):
                del h[0].header[k]
    out = _calibrate_case(tmp_path, base, damage, names=["stray.fits"])
    assert "--detector" in out.stderr


def test_single_exposure_suggests_min_dithers(tmp_path, real_catalogue):
    run = tmp_path / "one"
    run.mkdir()
    shutil.copyfile(real_catalogue, run / real_catalogue.name)
    before = snapshot(run, tmp_path)
    out = run_cli(["calibrate", run, "-o", tmp_path / "c.fits", "-q"])
    _check_error(out, [real_catalogue.name], before, [tmp_path])
    assert "--min-dithers 1" in out.stderr
    out = run_cli(["calibrate", run, "-o", tmp_path / "c.fits", "-q", "--min-dithers", "1"])
    assert out.code == 0, out.stderr


# --------------------------------------------------------------------------- 6. the real catalogue, damaged

_REAL_DAMAGE = [
    ("NAXIS2", lambda p: set_card(p, 1, "NAXIS2", "100000000")),
    ("TFIELDS", lambda p: set_card(p, 1, "TFIELDS", "'x'")),
    ("grid", lambda p: set_card(p, 6, "NCOLS", "100000") if _has_card(p, 6, "NCOLS") else
     set_card(p, 6, "NAXIS2", "-1")),
    ("truncated", lambda p: truncate(p, 0.37)),
    ("truncated_end", lambda p: truncate(p, 0.999)),
    ("TFORM", lambda p: set_card(p, 1, "TFORM2", "'Q'")),
    ("vector", lambda p: rewrite_table(p, _retype("base_SdssShape_instFlux", lambda a: np.stack([a, a], 1)))),
]


def _has_card(p, hdu, key):
    with fits.open(p) as h:
        return key in h[hdu].header


@pytest.mark.parametrize("what,damage", _REAL_DAMAGE, ids=[w for w, _ in _REAL_DAMAGE])
def test_real_catalogue_damaged(tmp_path, real_catalogue, what, damage):
    p = tmp_path / real_catalogue.name
    shutil.copyfile(real_catalogue, p)
    damage(p)
    with pytest.raises(spotflat.InputError) as info:
        spotflat.read_grids(p)
    assert p.name in str(info.value)
    before = snapshot(tmp_path)
    out = run_cli(["calibrate", tmp_path, "-o", tmp_path / "out" / "c.fits", "--min-dithers", "1", "-q"])
    _check_error(out, [p.name, "out"], before, [tmp_path])


def test_real_catalogue_renamed_non_ascii(tmp_path, real_catalogue):
    ref = spotflat.read_grids(real_catalogue)
    d = tmp_path / "données"
    d.mkdir()
    p = d / real_catalogue.name.replace("gridfit", "é_gridfit")
    shutil.copyfile(real_catalogue, p)
    got = spotflat.read_grids(d)
    assert np.array_equal(got.flux, ref.flux, equal_nan=True)


# --------------------------------------------------------------------------- 7. output paths

def _out_case(tmp_path, base, output_of, names, codes=(1, 2), setup=None, extra=()):
    run = tmp_path / "run"
    files = _copy_run(base["dm"], run)
    output = output_of(tmp_path, files)
    if setup:
        setup(tmp_path)
    before = snapshot(tmp_path)
    out = run_cli(["calibrate", run, "-o", output, "-q", *extra], cwd=tmp_path)
    _check_error(out, names, before, [tmp_path], codes)
    return out


def test_output_is_an_input(tmp_path, base):
    _out_case(tmp_path, base, lambda t, f: f[0], ["-o", "input"])


def test_output_is_a_link_to_an_input(tmp_path, base):
    def output(t, f):
        os.symlink(f[0], t / "link.fits")
        return t / "link.fits"
    _out_case(tmp_path, base, output, ["link.fits"])


def test_output_empty(tmp_path, base):
    _out_case(tmp_path, base, lambda t, f: "", ["-o"])


def test_output_dev_null(tmp_path, base):
    _out_case(tmp_path, base, lambda t, f: "/dev/null", ["/dev/null"])
    assert is_char_device("/dev/null")


def test_output_dangling_symlink(tmp_path, base):
    def output(t, f):
        os.symlink(t / "nowhere" / "x.fits", t / "dangling.fits")
        return t / "dangling.fits"
    _out_case(tmp_path, base, output, ["dangling.fits"])


def test_output_in_missing_folder_or_under_a_file(tmp_path, base):
    _out_case(tmp_path, base, lambda t, f: t / "no" / "such" / "c.fits", ["no/such"])
    _out_case(tmp_path / "b", base, lambda t, f: f[0] / "c.fits", [f"{(tmp_path / 'b' / 'run').name}"])


def test_output_existing_directory_gets_one_file_per_detector(tmp_path, base):
    run = tmp_path / "run"
    _copy_run(base["dm"], run)
    (tmp_path / "out").mkdir()
    out = run_cli(["calibrate", run, "-o", tmp_path / "out", "-q"])
    assert out.code == 0, out.stderr
    assert np.array_equal(sim_flux_table(tmp_path / "out" / "calib_R22_S11.fits"), base["F"], equal_nan=True)


def test_ecsv_blocked_leaves_no_fits(tmp_path, base):
    """--ecsv with calib_spots.ecsv blocked (a folder of that name): no calib.fits either."""
    _out_case(tmp_path, base, lambda t, f: t / "calib.fits", ["calib_spots.ecsv"],
              setup=lambda t: (t / "calib_spots.ecsv").mkdir(), extra=["--ecsv"])


def test_calibrate_output_set_is_all_or_nothing_with_ecsv(tmp_path, base):
    run = tmp_path / "run"
    _copy_run(base["dm"], run)
    (tmp_path / "calib_exposures.ecsv").mkdir()
    before = snapshot(tmp_path)
    out = run_cli(["calibrate", run, "-o", tmp_path / "calib.fits", "--ecsv", "-q"])
    _check_error(out, ["calib_exposures.ecsv"], before, [tmp_path])


# --------------------------------------------------------------------------- 8. options

@pytest.mark.parametrize("opts,names", [
    (["--sigma", "0"], ["--sigma"]), (["--sigma", "nan"], ["--sigma"]), (["--sigma", "-3"], ["--sigma"]),
    (["--flux-column", "NOPE"], ["NOPE"]), (["--detector", "R99_S99"], ["R99_S99"]),
    (["--min-dithers", "0"], ["--min-dithers"]), (["--stat", "mode"], ["--stat"]),
])
def test_calibrate_bad_options(tmp_path, base, opts, names):
    run = tmp_path / "run"
    _copy_run(base["dm"], run)
    before = snapshot(tmp_path)
    out = run_cli(["calibrate", run, "-o", tmp_path / "c.fits", "-q", *opts])
    _check_error(out, names, before, [tmp_path])


# --------------------------------------------------------------------------- 9. flats and correlate

def _flat_copy(tmp_path, base, name="flat.fits"):
    p = tmp_path / name
    shutil.copyfile(base["flat"], p)
    return p


def _edit_flat(p, fn):
    with fits.open(p, mode="update") as h:
        fn(h)


_FLAT_DAMAGE = {
    "other_detector": lambda h: (h[0].header.__setitem__("CCDSLOT", "S12"),
                                 h[0].header.__setitem__("DETNAME", "R22_S12")),
    "nan": lambda h: h[0].data.__setitem__(slice(None), np.nan),
    "zero": lambda h: h[0].data.__setitem__(slice(None), 0.0),
    "negative": lambda h: h[0].data.__setitem__(slice(None), -1.0),
}


def _small_flat(tmp_path, base, name="flat.fits"):
    """A corner of the simulated flat, header kept (reading a whole CCD costs seconds)."""
    p = tmp_path / name
    with fits.open(base["flat"]) as h:
        fits.PrimaryHDU(np.array(h[0].data[:300, :400]), header=h[0].header).writeto(p)
    return p


@pytest.mark.parametrize("kind", sorted(_FLAT_DAMAGE))
def test_read_flat_refuses(tmp_path, base, kind):
    p = _flat_copy(tmp_path, base) if kind == "other_detector" else _small_flat(tmp_path, base)
    _edit_flat(p, _FLAT_DAMAGE[kind])
    with pytest.raises(spotflat.InputError) as info:
        spotflat.read_flat(p, detector="R22_S11" if kind == "other_detector" else None)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("damage", ["NAXIS1='abc'", "NAXIS2=-4", "BITPIX=12", "truncate", "NAXIS1=1000000"])
def test_read_flat_damaged_headers(tmp_path, base, damage):
    p = _small_flat(tmp_path, base)
    if damage == "truncate":
        truncate(p, 0.6)
    else:
        key, value = damage.split("=")
        set_card(p, 0, key, value)
    with pytest.raises(spotflat.InputError) as info:
        spotflat.read_flat(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("which", ["itl", "e2v"])
@pytest.mark.parametrize("damage", ["DATASEC", "NAXIS1", "truncate", "segment_dtype"])
def test_real_raw_flat_damaged(tmp_path, obs_lsst_dir, which, damage):
    import gzip

    src = obs_lsst_dir / f"{which}_spot.fits.gz"
    p = tmp_path / f"{which}_raw.fits"
    p.write_bytes(gzip.decompress(src.read_bytes()))
    if damage == "DATASEC":
        set_card(p, 3, "DATASEC", "'[abc]'")
    elif damage == "NAXIS1":
        set_card(p, 3, "NAXIS1", "'x'")
    elif damage == "truncate":
        truncate(p, 0.5)
    else:
        set_card(p, 3, "BITPIX", "5")
    with pytest.raises(spotflat.InputError) as info:
        spotflat.read_flat(p)
    assert str(p) in str(info.value)


def test_real_raw_flat_renamed_non_ascii(tmp_path, obs_lsst_dir):
    src = obs_lsst_dir / "itl_spot.fits.gz"
    ref = spotflat.read_flat(src, outliers=None)
    d = tmp_path / "données"
    d.mkdir()
    shutil.copyfile(src, d / "flat é.fits.gz")
    assert np.array_equal(spotflat.read_flat(d / "flat é.fits.gz", outliers=None), ref, equal_nan=True)


def _correlate(tmp_path, base, flat, *opts):
    outdir = tmp_path / "res"
    before = snapshot(tmp_path)
    out = run_cli(["correlate", base["calib"], "--flat", flat, "-o", outdir, "--nboot", "10",
                   "--nnull", "10", "--no-figures", "-q", *opts])
    return out, before


@pytest.mark.parametrize("kind", ["other_detector", "constant"])
def test_correlate_refuses_bad_flats(tmp_path, base, kind):
    p = _flat_copy(tmp_path, base)
    if kind == "constant":
        _edit_flat(p, lambda h: h[0].data.__setitem__(slice(None), 1234.0))
    else:
        _edit_flat(p, _FLAT_DAMAGE[kind])
    out, before = _correlate(tmp_path, base, p)
    _check_error(out, [p.name], before, [tmp_path])


@pytest.mark.parametrize("opts,names", [
    (["--radius", "0"], ["--radius"]), (["--radius", "-2"], ["--radius"]), (["--radius", "nan"], ["--radius"]),
    (["--sigma", "wide"], ["--sigma"]), (["--sigma", "0"], ["--sigma"]), (["--sigma", "inf"], ["--sigma"]),
    (["--quantity", "colour"], ["--quantity"]),
])
def test_correlate_bad_options(tmp_path, base, opts, names):
    out, before = _correlate(tmp_path, base, base["flat"], *opts)
    _check_error(out, names, before, [tmp_path])


def test_correlate_outputs_all_or_nothing(tmp_path, base):
    """results.fits blocked by a folder of that name: no results.ecsv or other file is left."""
    outdir = tmp_path / "res"
    outdir.mkdir()
    (outdir / "results.fits").mkdir()
    out, before = _correlate(tmp_path, base, base["flat"])
    _check_error(out, ["results.fits"], before, [tmp_path])


def _bad_outdir(tmp_path, target):
    """``"file"`` and ``"dangling"`` made real in ``tmp_path`` (a file, a dangling link); others as given."""
    if target == "file":
        target = tmp_path / "afile"
        target.write_text("x")
    elif target == "dangling":
        target = tmp_path / "dl"
        os.symlink(tmp_path / "gone", target)
    return target


@pytest.mark.parametrize("target", ["/dev/null", "file", "dangling", ""])
def test_correlate_bad_outdir(tmp_path, base, target):
    target = _bad_outdir(tmp_path, target)
    before = snapshot(tmp_path)
    out = run_cli(["correlate", base["calib"], "--flat", base["flat"], "-o", target, "--nboot", "5",
                   "--nnull", "5", "-q", "--no-figures"], cwd=tmp_path)
    _check_error(out, [str(target) or "-o", "-o"], before, [tmp_path])
    assert is_char_device("/dev/null")


@pytest.mark.parametrize("damage", ["truncate", "NAXIS2", "no_spots", "text"])
def test_damaged_calibration(tmp_path, base, damage):
    p = tmp_path / "calib.fits"
    shutil.copyfile(base["calib"], p)
    if damage == "truncate":
        truncate(p, 0.5)
    elif damage == "NAXIS2":
        set_card(p, 1, "NAXIS2", "'x'")
    elif damage == "no_spots":
        with fits.open(p) as h:
            fits.HDUList([h[0].copy(), h["EXPOSURES"].copy()]).writeto(p, overwrite=True)
    else:
        p.write_text("not a catalogue\n")
    with pytest.raises(spotflat.InputError) as info:
        spotflat.read_calibration(p)
    assert str(p) in str(info.value)
    out, before = _correlate(tmp_path, {**base, "calib": p}, base["flat"])
    _check_error(out, [p.name], before, [tmp_path])


# --------------------------------------------------------------------------- 10. coords and simulate

@pytest.mark.parametrize("args,names", [
    (["--detector", "R22_S11", "--ccd", "nan", "5"], ["--ccd"]),
    (["--detector", "R22_S11", "--ccd", "5", "inf"], ["--ccd"]),
    (["--focal", "-inf", "0"], ["--focal"]), (["--bot", "nan", "nan"], ["--bot"]),
    (["--detector", "R22_S11", "--amp", "C10", "nan", "3"], ["--amp"]),
    (["--detector", "R99_S11", "--ccd", "1", "1"], ["R99_S11", "--detector"]),
    (["--detector", "R22_S11", "--amp", "C99", "1", "1"], ["C99", "--amp"]),
    (["--detector", "R22_S11", "--ccd", "1e300", "1"], ["--ccd"]),
    (["--convention", "sideways", "--bot", "1", "1"], ["--convention", "sideways"]),
])
def test_coords_bad_positions(tmp_path, args, names):
    out = run_cli(["coords", *args])
    problems = error_problems(out, names)
    assert not problems, problems


@pytest.mark.parametrize("content,mode", [("nan 1\n", 0o644), ("1 inf\n", 0o644), ("1 2\n", 0),
                                          (b"\xff\xfe\x00 bin", 0o644), ("1 2 3 4 5\n", 0o644)])
def test_coords_bad_points_files(tmp_path, content, mode):
    p = tmp_path / "pöints é.txt"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.chmod(p, mode)
    out = run_cli(["coords", "--points", p, "--from", "focal"])
    problems = error_problems(out, [p.name])
    assert not problems, problems


def test_coords_points_file_non_ascii_name_is_read(tmp_path):
    p = tmp_path / "données" / "pöints.txt"
    p.parent.mkdir()
    p.write_text("0 0\n12.5 -40\n")
    out = run_cli(["coords", "--points", p, "--from", "focal", "--json"])
    assert out.code == 0, out.stderr
    ref = run_cli(["coords", "--focal", "0", "0", "--focal", "12.5", "-40", "--json"])
    assert out.stdout == ref.stdout


def test_coords_huge_values_are_off_the_camera_without_warnings():
    """Finite but far away: a point off the camera (null detector), exit 0, no RuntimeWarning."""
    import json

    out = run_subprocess(["coords", "--focal", "1e200", "1e308", "--json"])
    assert out.code == 0 and "Warning" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    row = json.loads(out.stdout)[0]
    assert row["detector"] is None and row["focal_x"] == 1e200


@pytest.mark.parametrize("target", ["", "/dev/null", "file", "dangling"])
def test_simulate_bad_outdir(tmp_path, target):
    target = _bad_outdir(tmp_path, target)
    before = snapshot(tmp_path)
    out = run_cli(["simulate", target, "--ndither", "2", "-q"], cwd=tmp_path)
    _check_error(out, [str(target), "OUTDIR"], before, [tmp_path])
    assert is_char_device("/dev/null")


# --------------------------------------------------------------------------- 11. as a user runs it

def test_subprocess_no_traceback_on_bad_input(tmp_path, base):
    """A new interpreter (not click's runner): real stderr, real exit codes."""
    run = tmp_path / "run"
    files = _copy_run(base["dm"], run)
    set_card(files[0], 1, "NAXIS2", "'abc'")
    out = run_subprocess(["calibrate", run, "-o", tmp_path / "c.fits", "-q"])
    assert out.code == 1 and "Traceback" not in out.stderr and files[0].name in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = run_subprocess(["calibrate", run, "-o", "", "-q"])
    assert out.code in (1, 2) and "Traceback" not in out.stderr and "-o" in out.stderr, out.stderr
    out = run_subprocess(["coords", "--focal", "nan", "0"])
    assert out.code in (1, 2) and "Traceback" not in out.stderr and "--focal" in out.stderr, out.stderr


def test_subprocess_huge_fluxes_no_runtime_warning(tmp_path, base):
    run = tmp_path / "run"
    files = _copy_run(base["dm"], run)
    rewrite_table(files[1], _set_values(1e250, frac=0.3, seed=2))
    out = run_subprocess(["calibrate", run, "-o", tmp_path / "c.fits", "-q"])
    assert out.code == 0 and "Warning" not in out.stderr, out.stderr


def test_pipes_are_refused_not_read(tmp_path, base):
    """A named pipe as an input must fail at once (reading it would hang), in a subprocess for safety."""
    fifo = tmp_path / "pipe.fits"
    os.mkfifo(fifo)
    for args in (["correlate", base["calib"], "--flat", fifo, "-o", tmp_path / "o", "-q"],
                 ["correlate", fifo, "--flat", base["flat"], "-o", tmp_path / "o", "-q"],
                 ["coords", "--points", fifo, "--from", "focal"]):
        out = run_subprocess(args, timeout=60)
        assert out.code == 1 and "pipe.fits: not a regular file" in out.stderr, out.stderr
    assert not (tmp_path / "o").exists()


def test_staged_outputs_roll_back_a_failed_rename(tmp_path):
    """If one rename of the set fails, the files already renamed are put back as they were."""
    from spotflat.fileio import atomic_path, make_output_dir, staged_outputs

    old = tmp_path / "a.txt"
    old.write_text("old")
    blocker = tmp_path / "b.txt"
    with pytest.raises(spotflat.InputError, match="b.txt"):
        with staged_outputs():
            make_output_dir(tmp_path / "new" / "sub")
            for name in ("a.txt", "b.txt"):
                with atomic_path(tmp_path / name) as tmp:
                    tmp.write_text("new")
            blocker.mkdir()  # appears after the checks, before the commit
    assert old.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"] and blocker.is_dir()
    assert not list(blocker.iterdir())
    blocker.rmdir()
    with pytest.raises(OSError):
        with staged_outputs():
            for name in ("a.txt", "b.txt"):
                with atomic_path(tmp_path / name) as tmp:
                    tmp.write_text("new")
                    last = tmp
            last.unlink()  # the second rename fails (its temporary file is gone)
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_staged_outputs_refuse_inputs(tmp_path):
    from spotflat.fileio import atomic_path, staged_outputs

    inp = tmp_path / "in.fits"
    inp.write_text("data")
    with pytest.raises(spotflat.InputError, match="one of the input files"):
        with staged_outputs(inputs=[inp]):
            with atomic_path(tmp_path / "in.fits") as tmp:
                tmp.write_text("x")
    assert inp.read_text() == "data" and sorted(p.name for p in tmp_path.iterdir()) == ["in.fits"]


@pytest.mark.parametrize("damage", ["NAXIS2=1000000000", "TFIELDS='x'", "truncate"])
def test_gzipped_grid_damaged_fails_fast(tmp_path, base, damage):
    """Compressed files get the same structural checks (no allocation of what a damaged header asks)."""
    import gzip

    src = sorted(base["dm"].iterdir())[0]
    p = tmp_path / "plain.fits"
    shutil.copyfile(src, p)
    if damage != "truncate":
        key, value = damage.split("=")
        set_card(p, 1, key, value)
    gz = tmp_path / (src.name + ".gz")
    gz.write_bytes(gzip.compress(p.read_bytes()))
    if damage == "truncate":
        truncate(gz, 0.5)
    with pytest.raises(spotflat.InputError) as info:
        spotflat.read_grids(gz)
    assert gz.name in str(info.value)


def test_gzipped_grid_reads_the_same(tmp_path, base):
    import gzip

    src = sorted(base["dm"].iterdir())[0]
    gz = tmp_path / (src.name + ".gz")
    gz.write_bytes(gzip.compress(src.read_bytes()))
    assert np.array_equal(spotflat.read_grids(gz).flux, spotflat.read_grids(src).flux, equal_nan=True)


@pytest.mark.parametrize("opts,name", [(["--noise", "nan"], "--noise"), (["--illumination", "inf"], "--illumination"),
                                      (["--flat-mismatch", "treering", "--mismatch-amplitude", "nan"],
                                       "--mismatch-amplitude")])
def test_simulate_non_finite_options(tmp_path, opts, name):
    before = snapshot(tmp_path)
    out = run_cli(["simulate", tmp_path / "sim", "--ndither", "2", "-q", *opts])
    _check_error(out, [name], before, [tmp_path], codes=(2,))
