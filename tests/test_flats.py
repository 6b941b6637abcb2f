"""CCOB flats: the three file forms, overscan and assembly, masking,
normalisation (gain steps), master flats, and bad input."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from astropy.io import fits

import spotflat
from spotflat import InputError
from spotflat.flats import (MASK_BITS, FlatImage, combine_flats, detect_form, find_outliers,
                            load_flat, normalize_flat, prepare_flat, read_flat, write_flat)

E2V = (4004, 4096)
ITL = (4000, 4072)


def section(text):
    """'[x1:x2,y1:y2]' -> 1-based inclusive ints, as written."""
    a, b = text.strip("[]").split(",")
    x1, x2 = (int(v) for v in a.split(":"))
    y1, y2 = (int(v) for v in b.split(":"))
    return x1, x2, y1, y2


def small_amps(ny=8, nx=16):
    """A 2 x 4 amplifier layout of a small test image."""
    h, w = ny // 2, nx // 4
    return {f"A{r}{c}": (slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
            for r in range(2) for c in range(4)}


def pattern_image(shape, seed=0):
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    rng = np.random.default_rng(seed)
    return 1000.0 * (1 + 1e-5 * x + 2e-5 * y + 0.01 * np.sin(x / 13.0) * np.cos(y / 17.0)
                     + 0.001 * rng.standard_normal(shape))


# ---------------------------------------------------------------- raw flats

def _write_real_header_raw(src, dst, with_overscan=True):
    """The real headers of ``src`` with a known pattern in each DATASEC and a
    pedestal per segment in every pixel; return the expected DM image."""
    hdul = fits.open(src)
    out = [fits.PrimaryHDU(header=hdul[0].header)]
    x1, x2, y1, y2 = section(hdul[0].header["DETSIZE"])
    ny, nx = y2 - y1 + 1, x2 - x1 + 1
    camera = np.full((ny, nx), np.nan)  # camera-team frame: row 0 = DETSEC y = 1
    seg = 0
    for hdu in hdul[1:]:
        if not str(hdu.name).startswith("Segment"):
            out.append(hdu.copy())
            continue
        seg += 1
        h, w = hdu.header["NAXIS2"], hdu.header["NAXIS1"]  # (reading the gzipped data is slow)
        dx1, dx2, dy1, dy2 = section(hdu.header["DATASEC"])
        pedestal = 20000 + 137 * seg
        rows, cols = np.mgrid[0:dy2 - dy1 + 1, 0:dx2 - dx1 + 1]
        pattern = 1000 + (seg * 811 + rows * 3 + cols * 7) % 5003
        data = np.full((h, w), pedestal, dtype=np.int32)  # prescan, overscans: pedestal only
        data[dy1 - 1:dy2, dx1 - 1:dx2] += pattern.astype(np.int32)
        header = hdu.header.copy()
        if not with_overscan:
            data = data[:, :dx2]
        # independent assembly: DATASEC -> DETSEC (reversed range = flip)
        tx1, tx2, ty1, ty2 = section(hdu.header["DETSEC"])
        block = pattern.astype(float)
        if tx1 > tx2:
            block = block[:, ::-1]
        if ty1 > ty2:
            block = block[::-1, :]
        camera[min(ty1, ty2) - 1:max(ty1, ty2), min(tx1, tx2) - 1:max(tx1, tx2)] = block
        out.append(fits.ImageHDU(data, header=header))
    fits.HDUList(out).writeto(dst, overwrite=True)
    assert np.isfinite(camera).all()
    return camera[::-1]  # DM = camera frame flipped in y


def test_raw_real_headers_overscan_subtracted_and_assembled(obs_lsst_dir, tmp_path):
    dst = tmp_path / "raw_flat.fits"
    expected = _write_real_header_raw(obs_lsst_dir / "e2v_spot.fits.gz", dst)
    assert expected.shape == E2V
    for overscan in ("row", "mean"):
        flat = load_flat(dst, normalize=None, overscan=overscan, outliers=None)
        assert flat.form == "raw" and flat.detector == "R22_S11"
        assert np.array_equal(flat.data, expected), overscan
        assert flat.report["masked"] == 0
    # normalised: the same image over its mean outside the 10-pixel edge
    norm = read_flat(dst, normalize="ccd", outliers=None)
    level = expected[10:-10, 10:-10].mean()
    np.testing.assert_allclose(norm, expected / level, rtol=1e-12)
    # without overscan subtraction the pedestal stays
    raw = read_flat(dst, normalize=None, overscan=None, outliers=None)
    assert np.all(raw - expected >= 20000)


def test_raw_without_overscan_is_an_error(obs_lsst_dir, tmp_path):
    dst = tmp_path / "raw_no_overscan.fits"
    expected = _write_real_header_raw(obs_lsst_dir / "e2v_spot.fits.gz", dst, with_overscan=False)
    with pytest.raises(InputError, match="overscan") as err:
        read_flat(dst, overscan="row")
    assert "raw_no_overscan.fits" in str(err.value)
    # asked for no subtraction, it is read (pedestal kept)
    img = read_flat(dst, overscan=None, normalize=None, outliers=None)
    assert img.shape == expected.shape and np.all(img > expected)


def test_raw_saturated_pixels_masked(tmp_path):
    from spotflat.geometry import make_raw_hdulist

    img = np.full(ITL, 50000.0)
    img[100, 200] = 300000.0  # beyond the 18-bit ADC
    hdul = make_raw_hdulist(img, "R02_S02", overscan_level=1000.0)
    path = tmp_path / "raw.fits"
    hdul.writeto(path)
    flat = load_flat(path, normalize="ccd", outliers=None)
    assert flat.report["saturated"] == 1 and np.isnan(flat.data[100, 200])
    assert flat.mask[100, 200] & MASK_BITS["saturated"]
    np.testing.assert_allclose(np.nanmax(flat.data), 1.0, rtol=1e-12)


# ---------------------------------------------------------------- normalisation

def test_per_amp_normalisation_removes_gain_steps_exactly():
    base = pattern_image(E2V)
    gains = 1 + 0.05 * np.random.default_rng(3).standard_normal(16)
    from spotflat.geometry import amp_slices

    stepped = base.copy()
    for g, (ys, xs) in zip(gains, amp_slices("R22_S11").values()):
        stepped[ys, xs] *= g
    a = prepare_flat(stepped, normalize="amp", detector="R22_S11", outliers=None)
    b = prepare_flat(base, normalize="amp", detector="R22_S11", outliers=None)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-13, atol=0)
    ratio = np.array([a.levels[k] / b.levels[k] for k in amp_slices("R22_S11")])
    np.testing.assert_allclose(ratio, gains, rtol=1e-13)
    # a flat that is only gain steps becomes exactly 1 everywhere
    flat_steps = np.ones(E2V)
    for g, (ys, xs) in zip(gains, amp_slices("R22_S11").values()):
        flat_steps[ys, xs] = 7000.0 * g
    one = prepare_flat(flat_steps, normalize="amp", outliers=None)
    assert one.detector == "E2V"
    np.testing.assert_allclose(one.data, 1.0, rtol=1e-15, atol=0)
    # whole-CCD normalisation keeps the steps
    ccd = prepare_flat(flat_steps, normalize="ccd", outliers=None)
    assert np.nanstd(ccd.data) > 0.01


@pytest.mark.parametrize("stat", ["mean", "median"])
def test_ccd_normalisation_excludes_mask_and_edge(stat):
    rng = np.random.default_rng(4)
    img = 500.0 * (1 + 0.01 * rng.standard_normal((40, 60)))
    img[:3, :] = 100.0  # a strong edge roll-off
    img[10, 10] = np.nan
    out, levels = normalize_flat(img, "ccd", stat, edge=3)
    inner = img[3:-3, 3:-3]
    want = np.nanmean(inner) if stat == "mean" else np.nanmedian(inner)
    assert levels["ccd"] == pytest.approx(want, rel=1e-14)
    np.testing.assert_allclose(out, img / want, rtol=1e-14)


def test_normalisation_with_explicit_amp_slices():
    img = np.ones((8, 16))
    amps = small_amps()
    for i, (ys, xs) in enumerate(amps.values()):
        img[ys, xs] = 10.0 + i
    img[0, 0] = np.nan
    out, levels = normalize_flat(img, "amp", edge=0, amp_slices=amps)
    assert np.isnan(out[0, 0]) and np.nansum(np.abs(out - 1)) == 0
    assert list(levels.values()) == [10.0 + i for i in range(8)]
    with pytest.raises(InputError, match="unknown normalisation"):
        normalize_flat(img, "raft")
    with pytest.raises(InputError, match="amplifier layout"):
        normalize_flat(img, "amp", edge=0)  # a 16 x 8 image has no known layout
    with pytest.raises(InputError, match="positive"):
        normalize_flat(-img, "ccd", edge=0)


# ---------------------------------------------------------------- masking

def test_mask_reasons_and_report():
    rng = np.random.default_rng(5)
    img = 1000.0 * (1 + 0.005 * rng.standard_normal((60, 80)))
    img[2, 5] = np.nan
    img[6, 7] = np.inf
    img[30, 40] = 70000.0      # saturated
    img[20, 20] = 100.0        # dead pixel: a far outlier
    img[40, 60] = 1300.0       # hot pixel
    user = np.zeros(img.shape, bool)
    user[50:52, 10:13] = True
    flat = prepare_flat(img, mask=user, saturation=65000.0, edge=4)
    r = flat.report
    assert (r["nonfinite"], r["saturated"], r["outliers"], r["user"]) == (2, 1, 2, 6)
    assert r["masked"] == 11 and r["total"] == 4800
    assert r["edge"] == 4800 - 52 * 72 - 1  # (2, 5) lies in the 4-pixel margin
    assert np.isnan(flat.data[[2, 6, 30, 20, 40, 50], [5, 7, 40, 20, 60, 10]]).all()
    assert np.isfinite(flat.data).sum() == 4800 - 11
    assert flat.mask[20, 20] == MASK_BITS["outliers"] and flat.mask[51, 12] == MASK_BITS["user"]
    assert np.nanmean(flat.data[4:-4, 4:-4]) == pytest.approx(1.0, rel=1e-12)
    text = "\n".join(flat.summary())
    assert "masked: 11 of 4800" in text and "outliers: 2" in text


def test_outliers_follow_the_local_level():
    y, x = np.mgrid[0:80, 0:90].astype(float)
    img = 1 + 0.2 * np.exp(-x / 8.0) + 0.004 * np.sin(2 * np.pi * np.hypot(x + 300, y) / 30.0)
    img[40, 45] *= 0.5
    bad = find_outliers(img)
    assert np.argwhere(bad).tolist() == [[40, 45]]


def test_all_nan_flat_is_an_error(tmp_path):
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((20, 30), np.nan, dtype=np.float32)).writeto(path)
    with pytest.raises(InputError, match="no valid pixel") as err:
        read_flat(path)
    assert "nan.fits" in str(err.value)
    with pytest.raises(InputError, match="no valid pixel"):
        prepare_flat(np.ones((5, 5)), mask=np.ones((5, 5), bool))


# ---------------------------------------------------------------- forms

def test_assembled_flat_primary_or_extension(tmp_path):
    img = pattern_image((30, 50)).astype(np.float32)
    p1 = tmp_path / "primary.fits"
    fits.PrimaryHDU(img).writeto(p1)
    p2 = tmp_path / "ext.fits.gz"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img, name="FLAT")]).writeto(p2)
    for p in (p1, p2):
        flat = load_flat(p, normalize=None, edge=0, outliers=None)
        assert flat.form == "assembled" and flat.detector is None
        assert np.array_equal(flat.data, img.astype(np.float64))
    assert detect_form(fits.open(p1)) == "assembled"


def test_master_round_trip_keeps_mask_reasons(tmp_path):
    rng = np.random.default_rng(6)
    truth = 1 + 0.01 * rng.standard_normal((30, 40))
    exps = [s * truth for s in (800.0, 1200.0, 1000.0)]
    exps[0][3, 4] = np.nan
    master = combine_flats(exps, method="median", edge=0, outliers=None)
    want = np.nanmedian([e / np.nanmean(e) for e in exps], axis=0)
    np.testing.assert_allclose(master, want / want.mean(), rtol=1e-6)  # stacked as float32
    assert np.isfinite(master).all()  # (3, 4) comes from the other two exposures
    prepared = prepare_flat(master, saturation=1.02, edge=0, outliers=None)
    n_sat = prepared.report["saturated"]
    assert n_sat > 0
    path = tmp_path / "master.fits"
    write_flat(path, prepared, header={"NCOMBINE": 3}, inputs="a,b,c")
    head = fits.getheader(path)
    assert head["FLATTYPE"] == "MASTER" and head["NCOMBINE"] == 3 and head["CREATOR"] == "spotflat"
    assert head["INPUTS"] == "a,b,c" and head["NMSATURA"] == n_sat
    back = load_flat(path, normalize=None, edge=0, outliers=None)
    assert back.form == "master"
    assert back.report["saturated"] == n_sat and back.report["nonfinite"] == 0
    np.testing.assert_allclose(back.data, prepared.data.astype(np.float32), rtol=0, equal_nan=True)


def test_lsst_style_calibrated_flat_mask_planes(tmp_path):
    img = np.ones((20, 30), dtype=np.float32)
    mask = np.zeros((20, 30), dtype=np.int32)
    mask[2, 3] = 1 << 0  # BAD
    mask[4, 5] = 1 << 4  # some other plane, kept
    mh = fits.Header()
    mh["MP_BAD"] = 0
    mh["MP_SAT"] = 1
    mh["MP_EDGE"] = 4
    path = tmp_path / "calib.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img, name="IMAGE"),
                  fits.ImageHDU(mask, header=mh, name="MASK"),
                  fits.ImageHDU(img, name="VARIANCE")]).writeto(path)
    flat = load_flat(path, edge=0, outliers=None)
    assert flat.form == "master" and flat.report["file"] == 1
    assert np.isnan(flat.data[2, 3]) and flat.data[4, 5] == 1.0


def test_combine_clipped_rejects_a_cosmic_ray(tmp_path):
    rng = np.random.default_rng(7)
    truth = 1 + 0.01 * rng.standard_normal((20, 24))
    exps = [s * truth * (1 + 1e-4 * rng.standard_normal(truth.shape)) for s in
            (900.0, 1000.0, 1100.0, 950.0, 1050.0, 1000.0, 980.0)]
    exps[2][7, 8] *= 50.0
    paths = []
    for i, e in enumerate(exps):
        p = tmp_path / f"f{i}.fits"
        fits.PrimaryHDU(e).writeto(p)
        paths.append(p)
    clipped = combine_flats(paths, method="clipped", edge=0, outliers=None)
    assert clipped[7, 8] == pytest.approx(truth[7, 8] / truth.mean(), rel=2e-3)
    mean_all = np.mean([e / e.mean() for e in exps], axis=0)
    assert mean_all[7, 8] > 5  # the plain mean would be ruined
    with pytest.raises(InputError, match="unknown combination"):
        combine_flats(paths, method="mean")
    with pytest.raises(InputError, match="one CCD"):
        combine_flats([exps[0], exps[1][:10]], edge=0, outliers=None)
    with pytest.raises(InputError, match="no flats"):
        combine_flats([])


# ---------------------------------------------------------------- bad input

def test_shape_mismatch_with_detector(tmp_path):
    path = tmp_path / "itl_shaped.fits"
    fits.PrimaryHDU(np.ones(ITL, dtype=np.float32)).writeto(path)
    with pytest.raises(InputError, match="does not match|detector R22_S11") as err:
        read_flat(path, detector="R22_S11", outliers=None)
    assert "itl_shaped.fits" in str(err.value) and "4072 x 4000" in str(err.value)
    assert load_flat(path, detector="R02_S02", outliers=None).detector == "R02_S02"


@pytest.mark.parametrize("kind", ["text", "truncated", "truncated_gz", "missing", "empty", "cube"])
def test_unreadable_files(tmp_path, kind):
    path = tmp_path / f"{kind}.fits"
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(np.ones((50, 60), dtype=np.float32)).writeto(good)
    data = good.read_bytes()
    if kind == "text":
        path.write_text("this is not a FITS file\n" * 20)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_gz":
        path = tmp_path / "t.fits.gz"
        path.write_bytes(gzip.compress(data)[:200])
    elif kind == "empty":
        fits.PrimaryHDU().writeto(path)
    elif kind == "cube":
        fits.PrimaryHDU(np.ones((2, 5, 5), dtype=np.float32)).writeto(path)
    with pytest.raises(InputError) as err:
        read_flat(path)
    assert path.name in str(err.value)


def test_write_flat_is_atomic(tmp_path):
    with pytest.raises(InputError):
        write_flat(tmp_path / "nodir" / "m.fits", np.ones((4, 4)))
    assert not (tmp_path / "nodir").exists()
    with pytest.raises(InputError):
        write_flat(tmp_path / "m.fits", np.ones(4))
    assert os.listdir(tmp_path) == []
    write_flat(tmp_path / "m.fits", np.ones((4, 4)), detector="R22_S11")
    assert os.listdir(tmp_path) == ["m.fits"]


def test_top_level_read_flat_and_flat_image(tmp_path):
    assert spotflat.read_flat is read_flat and spotflat.combine_flats is combine_flats
    path = tmp_path / "f.fits"
    fits.PrimaryHDU(np.full((12, 14), 3.0)).writeto(path)
    flat = load_flat(path, edge=0)
    assert isinstance(flat, FlatImage) and flat.levels == {"ccd": 3.0}
    q = spotflat.sample_flat(flat, [5.0], [6.0], sigma=1.0)
    assert q[0] == pytest.approx(1.0, rel=1e-14)
