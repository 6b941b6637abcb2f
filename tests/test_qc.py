"""Quality control on the real dithered run (R22_S20, run 12784) and on damaged copies of it.

The damage is done here, on copies in tmp_path (tests/realdamage.py): labels
scrambled by a buggy grid fit, labels one grid column off, half the spots
5 % low. Each damaged exposure must be named and left out, and the rest of
the calibration must not move beyond its errors. The scatter of t is
measured from the catalogue's SPOTS.flux and EXPOSURES.scale and the raw
fluxes, as an outside user would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import realdamage as rd
from conftest import REAL
from spotflat.calibration import build_calibration, read_calibration
from spotflat.grids import read_grids

RUN = REAL / "mixcoatl" / "R22_S20_run12784"
pytestmark = pytest.mark.filterwarnings("ignore:Degrees of freedom:RuntimeWarning")


@pytest.fixture(scope="module")
def run_files():
    files = sorted(RUN.glob("*.fits")) if RUN.is_dir() else []
    if len(files) < 10:
        pytest.skip(f"real dithered run {RUN} is absent")
    return files


def _copy(files, dest: Path, damage=None) -> Path:
    """Copy the run into ``dest``; ``damage`` maps file index -> function(src, dst)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        if damage and i in damage:
            damage[i](f, dest / f.name)
        else:
            shutil.copy(f, dest / f.name)
    return dest


def _t_scatter(cal, folder) -> tuple[float, np.ndarray]:
    """Median over spots of the std of t = f / (F s), from the catalogue alone (used exposures)."""
    g = read_grids(folder, detector="R22_S20", max_offset=None)  # raw fluxes, as a user reads them
    names = list(cal.exposures["filename"])
    order = [list(g.exposures["filename"]).index(n) for n in names]
    f = g.flux[:, order]
    used = np.asarray(cal.exposures["used"], bool)
    F = np.asarray(cal.spots["flux"], float)
    s = np.asarray(cal.exposures["scale"], float)
    t = f[:, used] / (F[:, None] * s[None, used])
    # the points the catalogue kept (far matches are unmatched, not measurements)
    t[~cal.used[:, used]] = np.nan
    n = np.count_nonzero(np.isfinite(t), axis=1)
    std = np.nanstd(np.where(n[:, None] >= 3, t, np.nan), axis=1)
    return float(np.nanmedian(std)), t


@pytest.fixture(scope="module")
def clean(run_files, tmp_path_factory):
    folder = _copy(run_files, tmp_path_factory.mktemp("clean"))
    cal = build_calibration(read_grids(folder, detector="R22_S20"))
    return folder, cal


def _unchanged(clean_cal, cal, victims):
    """F and s of the exposures both runs used agree within their errors."""
    a, b = clean_cal.exposures, cal.exposures
    names = [n for n, u in zip(a["filename"], a["used"]) if u and n not in victims]
    ia = [list(a["filename"]).index(n) for n in names]
    ib = [list(b["filename"]).index(n) for n in names]
    assert all(b["used"][ib]), "a good exposure was excluded"
    sa, sb = np.asarray(a["scale"])[ia], np.asarray(b["scale"])[ib]
    norm = np.median(sb / sa)  # median(s) = 1 is over different sets of exposures
    err = np.hypot(np.asarray(a["scale_err"])[ia], np.asarray(b["scale_err"])[ib])
    pull_s = (sb / norm - sa) / err
    Fa, Fb = clean_cal.F, cal.F * norm
    ok = np.isfinite(Fa) & np.isfinite(Fb)
    ea, eb = np.asarray(clean_cal.spots["flux_err"]), np.asarray(cal.spots["flux_err"])
    pull_F = (Fb[ok] - Fa[ok]) / np.hypot(ea[ok], eb[ok])
    return np.abs(pull_s).max(), np.median(np.abs(pull_F)), np.mean(np.abs(pull_F) > 3)


def test_clean_run(clean):
    folder, cal = clean
    scatter, _ = _t_scatter(cal, folder)
    assert scatter < 0.01, scatter
    assert cal.meta["CONVERGD"]
    assert np.all(np.isfinite(cal.s))
    assert set(cal.exposures["detector"]) == {"R22_S20"}
    # the clean run keeps most of its exposures and says why it drops any
    used = np.asarray(cal.exposures["used"])
    assert used.sum() >= 7
    assert all(r.startswith("outlier") for r in cal.exposures["reason"][~used])
    assert cal.meta["NFAR"] > 0  # real far matches (up to 335 px) exist in this run


@pytest.mark.parametrize("case, victims", [
    ("scramble", {3: rd.scramble_labels}),
    ("shift", {4: rd.shift_labels}),            # a 643-spot exposure one column off
    ("scale", {8: rd.scale_spots}),             # half its spots 5 % low
    ("two", {3: rd.scramble_labels, 8: lambda a, b: rd.shift_labels(a, b, dcol=-1)}),
    # the case: 1000 of the grid's 2401 spots 5 % low, i.e. 2/3 of this exposure's
    ("scale-1000", {2: lambda a, b: rd.scale_spots(a, b, fraction=1000 / 1490, seed=3)}),
    ("scale-small", {9: rd.scale_spots}),       # the 452-spot exposure
    ("scramble-small", {9: rd.scramble_labels}),
])
def test_damaged_exposure_named_and_excluded(case, victims, run_files, clean, tmp_path):
    folder = _copy(run_files, tmp_path / case, victims)
    cal = build_calibration(read_grids(folder, detector="R22_S20"))
    names = {run_files[i].name for i in victims}
    e = cal.exposures
    excluded = {n for n, u in zip(e["filename"], e["used"]) if not u}
    assert names <= excluded, (names, list(e["filename", "used", "reason"]))
    assert cal.meta["CONVERGD"] and np.all(np.isfinite(cal.s))
    scatter, _ = _t_scatter(cal, folder)
    scatter0, _ = _t_scatter(clean[1], clean[0])
    assert scatter < 1.25 * scatter0, (scatter, scatter0)
    # against the clean run: F moves by far less than its errors
    worst_s, med_F, frac3 = _unchanged(clean[1], cal, names)
    assert med_F < 0.5 and frac3 < 0.02, (worst_s, med_F, frac3)
    # against the clean run without the victims: the damaged exposures have no say at all
    from spotflat.qc import QCOptions

    ref = build_calibration(read_grids(clean[0], detector="R22_S20"), qc=QCOptions(drop=tuple(names)))
    worst_s, med_F, frac3 = _unchanged(ref, cal, names)
    assert worst_s < 1 and med_F < 0.1 and frac3 == 0, (worst_s, med_F, frac3)
    if case == "shift":
        j = list(e["filename"]).index(run_files[4].name)
        assert "shift(-1 col, +0 row)" in e["registration"][j]


def test_register_option_brings_the_exposure_back(run_files, tmp_path):
    folder = _copy(run_files, tmp_path / "reg", {4: rd.shift_labels})
    from spotflat.qc import QCOptions

    cal = build_calibration(read_grids(folder, detector="R22_S20"), qc=QCOptions(register=True))
    j = list(cal.exposures["filename"]).index(run_files[4].name)
    assert cal.exposures["used"][j] and cal.meta["NREGIST"] == 1
    assert cal.qc["t_scatter"][j] < 0.01


def test_short_run_with_a_damaged_exposure(run_files, clean, tmp_path):
    """Five exposures, one of them scaled in half its spots: still found."""
    sub = [run_files[i] for i in (2, 3, 5, 6, 8)]
    folder = _copy(sub, tmp_path / "five", {1: rd.scale_spots})
    cal = build_calibration(read_grids(folder, detector="R22_S20"))
    e = cal.exposures
    assert not e["used"][list(e["filename"]).index(sub[1].name)]
    assert np.count_nonzero(e["used"]) == 4


def test_short_run_with_two_shifted_exposures(run_files, tmp_path):
    """Five exposures, two of them with shifted labels (a column, a row): the consensus is
    wrong for every exposure, but pair by pair the three good ones agree."""
    sub = [run_files[i] for i in (2, 3, 5, 6, 8)]
    folder = _copy(sub, tmp_path / "five2", {0: rd.shift_labels,
                                             4: lambda a, b: rd.shift_labels(a, b, dcol=0, drow=1)})
    cal = build_calibration(read_grids(folder, detector="R22_S20"))
    e = cal.exposures
    assert [n for n, u in zip(e["filename"], e["used"]) if not u] == [sub[0].name, sub[4].name]
    scatter, _ = _t_scatter(cal, folder)
    assert scatter < 0.01


def test_force_keep_and_drop(run_files, tmp_path):
    from spotflat.qc import QCOptions

    folder = _copy(run_files, tmp_path / "kd", {3: rd.scramble_labels})
    g = read_grids(folder, detector="R22_S20")
    cal = build_calibration(g, qc=QCOptions(keep=(run_files[3].name,), drop=(run_files[5].stem,)))
    e = cal.exposures
    assert e["used"][list(e["filename"]).index(run_files[3].name)]
    j = list(e["filename"]).index(run_files[5].name)
    assert not e["used"][j] and e["reason"][j] == "dropped by the user"
    with pytest.raises(Exception, match="names no exposure"):
        build_calibration(g, qc=QCOptions(drop=("nonexistent.fits",)))


def test_cli_on_real_run(run_files, tmp_path, run_cli):
    folder = _copy(run_files, tmp_path / "cli", {3: rd.scramble_labels})
    # an earlier output left in the folder is skipped with a warning naming it
    first = run_cli("calibrate", folder, "-o", tmp_path / "old.fits", "-q", "--detector", "R22_S20",
                    "--no-qc-figure")
    assert first.exit_code == 0, first.output
    shutil.copy(tmp_path / "old.fits", folder / "old_calib.fits")
    res = run_cli("calibrate", folder, "-o", tmp_path / "out" / "calib.fits", "-q", "--detector", "R22_S20")
    assert res.exit_code != 0  # no such output folder: a clean error
    (tmp_path / "out").mkdir()
    res = run_cli("calibrate", folder, "-o", tmp_path / "out" / "calib.fits", "-q", "--detector", "R22_S20")
    assert res.exit_code == 0, res.output
    assert "old_calib.fits" in res.output and "skipped" in res.output
    assert f"excluded           {run_files[3].name}" in res.output
    assert "far from their grid point" in res.output
    for name in ("calib.fits", "calib_qc.ecsv", "calib_qc.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    cal = read_calibration(tmp_path / "out" / "calib.fits")
    assert set(cal.exposures["detector"]) == {"R22_S20"}
    assert "used" in cal.exposures.colnames and "reason" in cal.exposures.colnames
    from astropy.table import Table

    qc = Table.read(tmp_path / "out" / "calib_qc.ecsv")
    assert len(qc) == 10 and not qc["used"][list(qc["filename"]).index(run_files[3].name)]


def _write_long_run(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` DM catalogues of the 49 x 49 grid dithered over +-130 px on a
    response with 1 % rings and a 2 % gradient: the exposures at the edges of
    the dither pattern see more of the response in ``t`` than the others."""
    from astropy.io import fits

    from spotflat.grids import grid_positions

    rng = np.random.default_rng(seed)
    ny, nx = 4004, 4096
    folder.mkdir()
    F = 3e5 * np.exp(0.03 * rng.standard_normal(2401))
    out = []
    for j in range(n):
        x0, y0 = 2047.5 + rng.uniform(-130, 130), 2001.5 + rng.uniform(-130, 130)
        gx, gy = grid_positions(x0, y0, 65.3, 65.3, 0.004, 49, 49)
        idx = np.flatnonzero((gx > 2) & (gx < nx - 3) & (gy > 2) & (gy < ny - 3))
        x, y = gx[idx] + rng.normal(0, 0.02, idx.size), gy[idx] + rng.normal(0, 0.02, idx.size)
        R = 1 + 0.01 * np.sin(np.hypot(x + 3000.0, y + 1000.0) / 200.0) + 0.02 * (x / nx - 0.5)
        ft = F[idx] * np.exp(0.003 * rng.standard_normal()) * R
        fe = np.sqrt(ft)
        cols = {"base_SdssCentroid_x": x, "base_SdssCentroid_y": y,
                "base_SdssShape_xx": np.full(idx.size, 5.0), "base_SdssShape_yy": np.full(idx.size, 5.2),
                "base_SdssShape_xy": np.zeros(idx.size),
                "base_SdssShape_instFlux": ft + fe * rng.standard_normal(idx.size),
                "base_SdssShape_instFluxErr": fe, "spotgrid_index": idx.astype(float),
                "spotgrid_x": gx[idx], "spotgrid_y": gy[idx]}
        hdu = fits.BinTableHDU.from_columns([fits.Column(name=k, format="D", array=v) for k, v in cols.items()])
        info = fits.BinTableHDU.from_columns([fits.Column(name="NORMALIZED_DX", format="D", array=np.zeros(2401))],
                                             name="GRID_INFO")
        for k, v in dict(X0=x0, Y0=y0, XSTEP=65.3, YSTEP=65.3, THETA=0.004, NCOLS=49, NROWS=49).items():
            info.header[k] = v
        path = folder / f"exp_{j:03d}_{x0:.0f}x_{y0:.0f}y.fits"
        fits.HDUList([fits.PrimaryHDU(), hdu, info]).writeto(path)
        out.append(path)
    return out


def test_long_run_keeps_dither_edges_and_names_damage(tmp_path):
    # a long run: real response structure in t must not exclude the exposures at
    # the edges of the dither pattern (34 of 200 were, judged against the
    # exposure median), while damaged exposures are still named
    files = _write_long_run(tmp_path / "clean", 90)
    clean = build_calibration(read_grids(tmp_path / "clean", detector="R22_S20"))
    assert clean.exposures["used"].all(), list(clean.exposures["filename", "reason"][~clean.exposures["used"]])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    victims = {5: rd.scramble_labels, 17: rd.shift_labels, 40: rd.scale_spots}
    for i, f in enumerate(files):
        (victims[i](f, damaged / f.name) if i in victims else shutil.copy(f, damaged / f.name))
    cal = build_calibration(read_grids(damaged, detector="R22_S20"))
    e = cal.exposures
    excluded = {n for n, u in zip(e["filename"], e["used"]) if not u}
    assert {files[i].name for i in victims} == excluded, list(e["filename", "reason"][~e["used"]])
    ok = e["used"]
    np.testing.assert_allclose(cal.s[ok], clean.s[ok], rtol=3e-4)
