"""Raw 16-segment assembly against obs_lsst's expected images, and its inverse."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
from astropy.io import fits

import spotflat
from spotflat.assembly import amp_sections, assemble_raw, make_raw_hdulist, parse_section
from spotflat.errors import InputError
from spotflat.geometry import get_camera


def _read(path) -> fits.HDUList:
    """Whole file in memory (fast for .gz), so tests can edit headers freely."""
    with gzip.open(path, "rb") as fh:
        return fits.open(io.BytesIO(fh.read()))


@pytest.fixture(scope="module")
def raw_files():
    from conftest import OBS_LSST

    if not OBS_LSST.is_dir():
        pytest.skip(f"{OBS_LSST} is absent")
    return {v: (OBS_LSST / f"{v}_spot.fits.gz", OBS_LSST / f"{v}_expected_assembled.fits.gz")
            for v in ("itl", "e2v")}


@pytest.mark.parametrize("vendor", ["itl", "e2v"])
def test_matches_obs_lsst_pixel_for_pixel(raw_files, vendor):
    raw, expected = raw_files[vendor]
    img = spotflat.assemble_raw(raw)
    exp = fits.getdata(expected)
    assert img.shape == exp.shape and img.dtype == np.float64
    assert np.array_equal(img, exp)
    # the same through spotflat.geometry and from an open HDUList
    from spotflat.geometry import assemble_raw as geo_assemble

    assert geo_assemble is assemble_raw
    assert np.array_equal(assemble_raw(_read(raw)), exp)


@pytest.mark.parametrize("vendor", ["itl", "e2v"])
def test_fallback_to_geometry_table(raw_files, vendor):
    raw, expected = raw_files[vendor]
    hdul = _read(raw)
    for hdu in hdul[1:17]:
        del hdu.header["DATASEC"], hdu.header["DETSEC"]
    del hdul[0].header["DETSIZE"]
    for hdu in hdul[1:17]:
        del hdu.header["DETSIZE"]
    assert np.array_equal(assemble_raw(hdul), fits.getdata(expected))
    # nothing to tell the detector by: a clear error
    for key in ("RAFTBAY", "CCDSLOT", "LSST_NUM"):
        del hdul[0].header[key]
    with pytest.raises(InputError, match="has no DATASEC and the detector is unknown|no DETSIZE"):
        assemble_raw(hdul)
    # ... unless the caller names it
    det = "R02_S02" if vendor == "itl" else "R22_S11"
    assert np.array_equal(assemble_raw(hdul, detector=det), fits.getdata(expected))


def test_headers_from_the_table_match_real_files(raw_files):
    for vendor, det in (("itl", "R02_S02"), ("e2v", "R22_S11")):
        real = _read(raw_files[vendor][0])
        made = make_raw_hdulist(np.zeros(get_camera().detector(det).shape), det)
        real_segments = [h for h in real[1:] if h.name.upper().startswith("SEGMENT")]
        assert len(real_segments) == 16
        assert [h.name for h in made[1:]] == [h.name for h in real_segments]
        for r, m in zip(real_segments, made[1:]):
            assert m.data.shape == r.data.shape
            for key in ("DATASEC", "DETSEC", "DETSIZE", "DTV1", "DTV2", "DTM1_1", "DTM2_2"):
                assert m.header[key] == r.header[key], (det, r.name, key)
        for key in ("RAFTBAY", "CCDSLOT", "LSST_NUM", "DETSIZE"):
            assert made[0].header[key] == real[0].header[key]


@pytest.mark.parametrize("det", ["R02_S02", "R22_S11", "R00_SW1"])
def test_make_raw_is_the_inverse_of_assembly(det):
    d = get_camera().detector(det)
    rng = np.random.default_rng(1)
    img = rng.normal(1000.0, 30.0, d.shape)
    hdul = make_raw_hdulist(img, det)
    assert len(hdul) == len(d.amps) + 1
    out = assemble_raw(hdul)
    assert out.dtype == np.float64 and np.array_equal(out, img)
    # the amplifiers land where amp_slices says; raw (0, 0) of the data is the read-out corner
    from spotflat.geometry import amp_to_ccd

    a = d.amps[3]
    seg = hdul[a.extname].data
    dx0, dy0 = d.type.data[:2]
    cx, cy = amp_to_ccd(det, a.name, 0, 0)
    assert seg[dy0, dx0] == img[int(cy), int(cx)]


def test_written_file_round_trip_with_overscan(tmp_path):
    det = "R22_S11"
    d = get_camera().detector(det)
    img = np.arange(d.nx * d.ny, dtype=np.float64).reshape(d.shape) % 977
    levels = {n: 1000.0 + 10 * i for i, n in enumerate(d.amp_names)}
    hdul = make_raw_hdulist(img, det, overscan_level=levels, header_template={"BOTXCAM": -1.5},
                            dtype=np.int32)
    assert hdul[1].data.dtype.kind == "i" and hdul[0].header["BOTXCAM"] == -1.5
    path = tmp_path / "raw.fits.gz"
    hdul.writeto(path)
    assert np.array_equal(assemble_raw(path), img + np.vstack([
        np.hstack([np.full((2002, 512), levels[f"C{r}{c}"]) for c in range(8)]) for r in (0, 1)]))
    for mode in ("mean", "row"):
        assert np.array_equal(assemble_raw(path, overscan=mode), img)


def test_overscan_row_removes_a_row_dependent_bias():
    det = "R02_S02"
    d = get_camera().detector(det)
    img = np.full(d.shape, 500.0)
    hdul = make_raw_hdulist(img, det, overscan_level=[100.0 * i for i in range(16)])
    for hdu in hdul[1:]:
        hdu.data += np.linspace(0.0, 40.0, hdu.data.shape[0])[:, None]  # a bias ramp along y
    per_row = assemble_raw(hdul, overscan="row")
    assert np.allclose(per_row, 500.0, atol=1e-9)
    mean = assemble_raw(hdul, overscan="mean")
    assert np.ptp(mean) > 30  # a single level cannot follow the ramp
    assert abs(mean.mean() - 500.0) < 2.0
    noisy = make_raw_hdulist(img, det, overscan_level=2000.0, read_noise=5.0, rng=3)
    sub = assemble_raw(noisy, overscan="mean")
    assert abs(sub.mean() - 500.0) < 0.5 and 4.5 < sub.std() < 5.5


def test_parse_section():
    assert parse_section("[4:512,1:2000]") == (4, 512, 1, 2000)
    assert parse_section(" [ 509:1 , 4000:2001 ] ") == (509, 1, 4000, 2001)
    for bad in ("[4:512,1:]", "4:512,1:2000", "[0:10,1:5]", "[a:b,c:d]", 17):
        with pytest.raises(InputError, match="malformed"):
            parse_section(bad)


def test_amp_sections_describe_the_camera_frame():
    d = get_camera().detector("R22_S11")
    assert amp_sections(d.type, d.amp("C07")) == {
        "DATASEC": "[11:522,1:2002]", "DETSEC": "[3585:4096,4004:2003]", "DETSIZE": "[1:4096,1:4004]"}


def _synthetic(det="R22_S11"):
    return make_raw_hdulist(np.zeros(get_camera().detector(det).shape), det)


def test_bad_raw_files(tmp_path):
    hdul = _synthetic()
    hdul["Segment03"].header["DATASEC"] = "[11:522;1:2002]"
    with pytest.raises(InputError, match=r"malformed DATASEC '\[11:522;1:2002\]' in Segment03"):
        assemble_raw(hdul)

    hdul = _synthetic()
    del hdul["Segment05"]
    with pytest.raises(InputError, match="missing segment\\(s\\) Segment05"):
        assemble_raw(hdul)
    # without the detector in the header, the DETSEC tiling catches it
    for key in ("RAFTBAY", "CCDSLOT", "LSST_NUM"):
        del hdul[0].header[key]
    with pytest.raises(InputError, match="do not tile the detector"):
        assemble_raw(hdul)

    hdul = _synthetic()
    hdul["Segment04"].header["DETSEC"] = hdul["Segment05"].header["DETSEC"]
    with pytest.raises(InputError, match="do not tile"):
        assemble_raw(hdul)

    hdul = _synthetic()
    hdul["Segment04"].header["DATASEC"] = "[11:600,1:2002]"
    with pytest.raises(InputError, match="outside the 576 x 2048 segment"):
        assemble_raw(hdul)

    hdul = _synthetic()
    hdul["Segment04"].header["DETSEC"] = "[1:100,1:2002]"
    with pytest.raises(InputError, match="differ in size"):
        assemble_raw(hdul)

    with pytest.raises(InputError, match="no SegmentNN"):
        assemble_raw(fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4)))]))
    with pytest.raises(InputError, match="unknown overscan mode"):
        assemble_raw(_synthetic(), overscan="median")
    with pytest.raises(InputError, match="no such file"):
        assemble_raw(tmp_path / "nope.fits")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"not a fits file at all" * 200)
    with pytest.raises(InputError, match="junk.fits"):
        assemble_raw(junk)
    with pytest.raises(InputError, match="image is 10 x 10 pixels"):
        make_raw_hdulist(np.zeros((10, 10)), "R22_S11")
    with pytest.raises(InputError, match="unknown detector"):
        make_raw_hdulist(np.zeros((10, 10)), "R99_S99")
    with pytest.raises(InputError, match="overscan_level has 3 values"):
        make_raw_hdulist(np.zeros((4004, 4096)), "R22_S11", overscan_level=[1, 2, 3])
