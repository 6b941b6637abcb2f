"""LSSTCam geometry: the packaged table, the transforms and the boundaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotflat.errors import InputError
from spotflat.geometry import (amp_boundaries, amp_index_map, amp_names, amp_of_pixel, amp_slices,
                               amp_to_ccd, ccd_shape, ccd_to_amp, ccd_to_focal, detector_outline,
                               distance_to_boundary, focal_to_ccd, focal_to_detector, get_camera,
                               load_camera, vendor)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "src" / "spotflat" / "data" / "lsstcam_geometry.json"


@pytest.fixture(scope="module")
def cam():
    return get_camera()


@pytest.fixture
def policy_dir(obs_lsst_dir):
    pytest.importorskip("yaml")
    return obs_lsst_dir / "policy"


def _load(path):
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh)


# --------------------------------------------------------------------------- the table
def test_camera_has_every_detector(cam):
    assert len(cam.science_detectors) == 189
    assert len(cam.detectors) == 205
    assert cam.detectors[0] == "R01_S00" and cam.detector("R01_S00").id == 0
    corner = [n for n in cam.detectors if n not in cam.science_detectors]
    assert sorted(corner) == sorted(f"R{r}_{s}" for r in ("00", "04", "40", "44")
                                    for s in ("SG0", "SG1", "SW0", "SW1"))
    d = cam.detector("R22_S11")
    assert (d.name, d.raft, d.sensor, d.vendor, d.nx, d.ny, d.pixel_size) == \
        ("R22_S11", "R22", "S11", "E2V", 4096, 4004, 0.01)
    d = cam.detector("R02_S02")
    assert (d.vendor, d.nx, d.ny, d.serial) == ("ITL", 4072, 4000, "ITL-3800C-205")
    assert cam.detector("R00_SW0").shape == (2000, 4072)
    assert len(amp_names("R00_SW0")) == 8


def test_simple_queries():
    assert ccd_shape("R02_S02") == (4000, 4072)
    assert ccd_shape("R22_S11") == (4004, 4096)
    assert vendor("R02_S02") == "ITL" and vendor("R22_S11") == "E2V"
    names = amp_names("R22_S11")
    assert names == [f"C0{i}" for i in range(8)] + [f"C1{i}" for i in range(8)]
    assert get_camera() is get_camera()
    # forgiving spellings of a detector name
    assert get_camera().detector("r22s11").name == "R22_S11"
    assert get_camera().detector("R22/S11").name == "R22_S11"


def test_packaged_table_matches_regeneration(policy_dir, tmp_path):
    out = tmp_path / "table.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_geometry_table.py"),
                          str(policy_dir), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text()) == json.loads(TABLE.read_text())
    assert out.read_text() == TABLE.read_text()  # byte for byte: the script wrote the package file
    assert TABLE.stat().st_size < 64_000
    cam2 = load_camera(out)
    assert cam2.detectors == get_camera().detectors


def test_vendor_per_raft_matches_policy(cam, policy_dir):
    for path in sorted((policy_dir / "lsstCam").glob("R??.yaml")):
        raft = path.stem
        data = _load(path)[raft]
        vend = "E2V" if data["detectorType"] == "E2V" else "ITL"
        for sensor in data["ccdSerials"]:
            d = cam.detector(f"{raft}_{sensor}")
            assert d.vendor == vend
            assert d.serial == str(data["ccdSerials"][sensor])


def test_refpos_lands_at_raft_plus_ccd_offset(cam, policy_dir):
    """Independent of the generator: raft offset + R(raft yaw) (CCD layout + within-raft offset)."""
    header = _load(policy_dir / "cameraHeader.yaml")
    rafts = _load(policy_dir / "rafts.yaml")["rafts"]
    alias = {"R00W": "R00", "R04W": "R04", "R40W": "R40", "R44W": "R44"}
    checked = 0
    for raft_file, raft in rafts.items():
        data = _load(policy_dir / "lsstCam" / f"{raft_file}.yaml")[raft_file]
        layout = header[f"RAFT_{data['detectorType']}"]["ccds"]
        yaw = math.radians(raft.get("yaw", 0.0))
        within = data.get("geometryWithinRaft", {})
        for sensor in data["ccdSerials"]:
            lx, ly = layout[sensor]["offset"]
            dx, dy = within.get(sensor, {}).get("offset", [0.0, 0.0])[:2]
            ox = raft["offset"][0] + math.cos(yaw) * (lx + dx) - math.sin(yaw) * (ly + dy)
            oy = raft["offset"][1] + math.sin(yaw) * (lx + dx) + math.cos(yaw) * (ly + dy)
            d = cam.detector(f"{alias.get(raft_file, raft_file)}_{sensor}")
            rx, ry = layout[sensor]["refpos"]
            fx, fy = ccd_to_focal(d, rx, ry)
            assert fx == pytest.approx(ox, abs=1e-9) and fy == pytest.approx(oy, abs=1e-9), d.name
            checked += 1
    assert checked == 205
    # the example of DESIGN.md: R02_S02 is centred at x=42.25, y=-296.25 mm
    assert ccd_to_focal("R02_S02", 2036.5, 2000.5) == (42.25, -296.25)


def test_raft_yaw_rotates_corner_sensors(cam):
    # R00 (yaw 180) holds its wavefront sensor at its inner corner, like R44 (yaw 0)
    for raft, sign in (("R00", -1), ("R44", 1)):
        for s in ("SW0", "SW1"):
            fx, fy = cam.detector(f"{raft}_{s}").offset
            assert sign * fx < 254 and sign * fy < 254
    # a rotated guider: CCD x runs along -focal y for yaw 270 etc.; check the Jacobian is a rotation
    for d in cam:
        m = d.pixel_to_focal_matrix[:, :2] / d.pixel_size
        assert np.allclose(m.T @ m, np.eye(2), atol=1e-12)
        assert np.linalg.det(m) == pytest.approx(1.0)


# --------------------------------------------------------------------------- transforms
def test_round_trip_every_detector(cam):
    rng = np.random.default_rng(42)
    worst = 0.0
    for d in cam:
        for a in d.amps:
            ax = rng.uniform(-0.5, a.nx - 0.5, 200)
            ay = rng.uniform(-0.5, a.ny - 0.5, 200)
            cx, cy = amp_to_ccd(d, a.name, ax, ay)
            fx, fy = ccd_to_focal(d, cx, cy)
            bx, by = focal_to_ccd(d, fx, fy)
            name, rx, ry = ccd_to_amp(d, bx, by)
            assert (name == a.name).all(), (d.name, a.name)
            worst = max(worst, np.abs(rx - ax).max(), np.abs(ry - ay).max(),
                        np.abs(bx - cx).max(), np.abs(by - cy).max())
    assert worst < 1e-9


def test_amp_to_ccd_follows_read_out_flips():
    # ITL C10 (flipX, flipY): read-out corner at the CCD's top, right edge of the amp block
    assert amp_to_ccd("R02_S02", "C10", 0, 0) == (508.0, 3999.0)
    assert amp_to_ccd("R02_S02", "C00", 0, 0) == (508.0, 0.0)    # ITL C0x: flipX only
    assert amp_to_ccd("R22_S11", "C00", 0, 0) == (0.0, 0.0)      # E2V C0x: no flip
    assert amp_to_ccd("R22_S11", "C17", 0, 0) == (4095.0, 4003.0)
    assert amp_to_ccd("R22_S11", "Segment07", 0, 0) == (3584.0, 0.0)
    # arrays of names, one per point
    x, y = amp_to_ccd("R22_S11", np.array(["C00", "C10"]), np.array([0.0, 0.0]), np.array([0.0, 0.0]))
    assert x.tolist() == [0.0, 511.0] and y.tolist() == [0.0, 4003.0]


def test_scalar_in_scalar_out():
    out = ccd_to_focal("R22_S11", 1.0, 2.0)
    assert isinstance(out, tuple) and all(type(v) is float for v in out)
    assert all(type(v) is float for v in focal_to_ccd("R22_S11", 1.0, 2.0))
    name, x, y = ccd_to_amp("R22_S11", 1.0, 2.0)
    assert (name, type(x), type(y)) == ("C00", float, float)
    name, x, y = focal_to_detector(0.0, 0.0)
    assert name == "R22_S11" and (x, y) == (2047.5, 2001.5)
    assert focal_to_detector(21.0, 0.0)[0] is None
    assert type(distance_to_boundary("R22_S11", 3.0, 4.0)) is float
    assert amp_of_pixel("R22_S11", 3.0, 4.0) == "C00"
    arr = ccd_to_focal("R22_S11", np.zeros((2, 3)), np.ones((2, 3)))
    assert arr[0].shape == (2, 3)


def _brute_force(cam, fx, fy):
    """Detector number and pixel by brute force: each detector's transform and pixel range."""
    idx = np.full(fx.shape, -1)
    px = np.full(fx.shape, np.nan)
    py = np.full(fx.shape, np.nan)
    for i, d in enumerate(cam):
        u, v = focal_to_ccd(d, fx, fy)
        on = (u >= -0.5) & (u < d.nx - 0.5) & (v >= -0.5) & (v < d.ny - 0.5)
        assert not np.any(on & (idx >= 0)), "detectors overlap"
        idx[on], px[on], py[on] = i, u[on], v[on]
    return idx, px, py


def _nudge(a, ulps):
    for _ in range(abs(ulps)):
        a = np.nextafter(a, np.inf if ulps > 0 else -np.inf)
    return a


def _assert_same_as_reference(cam, fx, fy, **kw):
    idx, px, py = cam.focal_to_detector_index(fx, fy, **kw)
    ri, rx, ry = _brute_force(cam, fx, fy)
    np.testing.assert_array_equal(idx, ri)
    np.testing.assert_array_equal(px, rx)  # exactly: NaN in the same places
    np.testing.assert_array_equal(py, ry)


def test_focal_to_detector_matches_brute_force(cam):
    rng = np.random.default_rng(7)
    fx = rng.uniform(-340, 340, 200_000)
    fy = rng.uniform(-340, 340, 200_000)
    # points near edges and corners of CCDs, and non-finite ones
    d = cam.detector("R00_SG0")
    ex, ey = ccd_to_focal(d, np.array([-0.4999, d.nx - 0.4999, 10.0, -0.5001]),
                          np.array([5.0, 5.0, d.ny - 0.5001, 5.0]), check=False)
    fx = np.r_[fx, ex, np.nan, np.inf, 1e300, 0.0]
    fy = np.r_[fy, ey, 0.0, 0.0, 0.0, np.nan]
    names, px, py = focal_to_detector(fx, fy)
    bi, bx, by = _brute_force(cam, fx, fy)
    assert (names == np.array(cam.detectors + [None], dtype=object)[bi]).all()
    assert np.array_equal(np.isnan(px), np.isnan(bx))
    ok = ~np.isnan(px)
    assert np.abs(px[ok] - bx[ok]).max() < 1e-9 and np.abs(py[ok] - by[ok]).max() < 1e-9
    assert 0.6 < ok.mean() < 0.9  # gaps and the outside of the camera say so
    assert names[-8:-4].tolist() == ["R00_SG0", None, "R00_SG0", None]
    assert names[-4:].tolist() == [None] * 4


def test_focal_to_detector_every_ccd(cam):
    rng = np.random.default_rng(3)
    for d in cam:
        x = rng.uniform(-0.5, d.nx - 0.5, 300)
        y = rng.uniform(-0.5, d.ny - 0.5, 300)
        names, px, py = focal_to_detector(*ccd_to_focal(d, x, y))
        assert (names == d.name).all()
        assert np.abs(px - x).max() < 1e-9 and np.abs(py - y).max() < 1e-9


@settings(max_examples=40, deadline=None)
@given(det=st.integers(0, 204), seed=st.integers(0, 2**32 - 1), ulps=st.integers(-2, 2),
       along=st.floats(0.0, 1.0))
def test_focal_to_detector_index_matches_reference(cam, det, seed, ulps, along):
    """The lookup tables give the brute-force answer bit for bit, also exactly on CCD edges."""
    rng = np.random.default_rng(seed)
    fx, fy = rng.uniform(-345, 345, (2, 20_000))  # the whole focal plane and beyond
    # the edges and corners of one detector, through its pixel -> focal transform
    d = list(cam)[det]
    ex, ey = d.nx - 0.5, d.ny - 0.5
    u = np.r_[-0.5, ex, -0.5 + along * d.nx, -0.5 + along * d.nx, -0.5, ex, -0.5, ex]
    v = np.r_[-0.5 + along * d.ny, -0.5 + along * d.ny, -0.5, ey, -0.5, -0.5, ey, ey]
    cx, cy = ccd_to_focal(d, u, v, check=False)
    # the outline corners of every detector in mm, against a random other coordinate
    ox = np.concatenate([detector_outline(e)[0] for e in cam])
    oy = np.concatenate([detector_outline(e)[1] for e in cam])
    fx = np.r_[fx, _nudge(cx, ulps), _nudge(ox, ulps), rng.uniform(-330, 330, oy.size)]
    fy = np.r_[fy, _nudge(cy, ulps), rng.uniform(-330, 330, ox.size), _nudge(oy, ulps)]
    _assert_same_as_reference(cam, fx, fy)


def test_focal_to_detector_index_odd_inputs(cam):
    special = np.array([np.nan, np.inf, -np.inf, 1e300, -1e300, 1e18, -5e9, 0.0, -0.0, 330.0])
    gx, gy = np.meshgrid(np.r_[special, np.linspace(-320, 320, 41)],
                         np.r_[special, np.linspace(-320, 320, 41)])
    _assert_same_as_reference(cam, gx, gy)
    # chunking (and the batches of points needing the inside test) do not change the answer
    rng = np.random.default_rng(11)
    fx, fy = rng.uniform(-330, 330, (2, 3, 10_001))
    full = cam.focal_to_detector_index(fx, fy)
    for chunk in (1, 7, 1000, 1 << 20):
        for a, b in zip(cam.focal_to_detector_index(fx, fy, chunk=chunk), full):
            np.testing.assert_array_equal(a, b)
    assert full[0].shape == (3, 10_001)
    idx, px, py = cam.focal_to_detector_index(np.zeros(0), np.zeros(0))
    assert idx.shape == px.shape == py.shape == (0,)
    idx, px, py = cam.focal_to_detector_index(0.0, 0.0)
    assert idx.shape == () and cam.detectors[int(idx)] == "R22_S11" and float(px) == 2047.5
    name, x, y = focal_to_detector(np.nan, 0.0)
    assert name is None and math.isnan(x) and math.isnan(y)


# --------------------------------------------------------------------------- amplifiers / boundaries
@pytest.mark.parametrize("det", ["R02_S02", "R22_S11", "R00_SW0"])
def test_every_pixel_in_exactly_one_amp(det):
    d = get_camera().detector(det)
    m = amp_index_map(det)
    assert m.shape == d.shape and m.min() >= 0
    counts = np.bincount(m.ravel(), minlength=len(d.amps))
    a = d.amps[0]
    assert (counts == a.nx * a.ny).all() and counts.sum() == d.nx * d.ny
    # amp_slices tile the image with no overlap, and amp_of_pixel agrees with them
    cover = np.zeros(d.shape, dtype=int)
    for name, (sy, sx) in amp_slices(det).items():
        cover[sy, sx] += 1
        assert amp_names(det)[m[sy, sx][0, 0]] == name
    assert (cover == 1).all()
    yy, xx = np.mgrid[0:d.ny:7, 0:d.nx:5]
    names = amp_of_pixel(det, xx, yy)
    assert (names == np.array(amp_names(det))[m[yy, xx]]).all()
    assert amp_of_pixel(det, [-0.6, d.nx - 0.5, 0.0], [0.0, 0.0, d.ny]).tolist() == ["", "", ""]


def test_amp_slices_match_assembled_layout():
    s = amp_slices("R02_S02")
    assert s["C10"] == (slice(2000, 4000), slice(0, 509))
    assert s["C07"] == (slice(0, 2000), slice(3563, 4072))
    s = amp_slices("R22_S11")
    assert s["C17"] == (slice(2002, 4004), slice(3584, 4096))


def test_distance_to_boundary():
    det = "R22_S11"  # E2V: amps 512 x 2002
    x = np.array([0.0, 511.0, 512.0, 700.0, 2047.0, 4095.0, 100.0, 100.0])
    y = np.array([1000.0, 1000.0, 1000.0, 2001.0, 2002.0, 1000.0, 0.0, 4003.0])
    assert distance_to_boundary(det, x, y, "amp").tolist() == \
        [511.5, 0.5, 0.5, 188.5, 0.5, 511.5, 411.5, 411.5]
    assert distance_to_boundary(det, x, y, "midline").tolist() == \
        [1001.5, 1001.5, 1001.5, 0.5, 0.5, 1001.5, 2001.5, 2001.5]
    assert distance_to_boundary(det, x, y, "edge").tolist() == \
        [0.5, 511.5, 512.5, 700.5, 2001.5, 0.5, 0.5, 0.5]
    anyd = distance_to_boundary(det, x, y, "any")
    assert anyd.tolist() == np.minimum.reduce([distance_to_boundary(det, x, y, k)
                                               for k in ("amp", "midline", "edge")]).tolist()
    assert np.isnan(distance_to_boundary(det, [-1.0], [5.0])).all()
    # wavefront sensors have one row of amplifiers: no mid-line
    assert distance_to_boundary("R00_SW0", 100.0, 100.0, "midline") == math.inf
    b = amp_boundaries(det)
    assert len(b["amp"]) == 14 and len(b["midline"]) == 1 and len(b["edge"]) == 4
    assert b["midline"][0] == (-0.5, 2001.5, 4095.5, 2001.5)
    assert (511.5, -0.5, 511.5, 2001.5) in b["amp"]


def test_detector_outline():
    fx, fy = detector_outline("R02_S02")
    assert fx.min() == pytest.approx(42.25 - 20.37) and fx.max() == pytest.approx(42.25 + 20.35)
    assert fy.min() == pytest.approx(-296.25 - 20.01) and fy.max() == pytest.approx(-296.25 + 19.99)


# --------------------------------------------------------------------------- errors
def test_bad_input_errors():
    with pytest.raises(InputError, match="unknown detector 'R99_S11'"):
        ccd_to_focal("R99_S11", 1, 1)
    with pytest.raises(InputError, match="unknown detector"):
        get_camera().detector("nonsense")
    with pytest.raises(InputError, match="unknown amplifier 'C20' for R22_S11"):
        amp_to_ccd("R22_S11", "C20", 1, 1)
    with pytest.raises(InputError, match="x = 600 is outside the amplifier"):
        amp_to_ccd("R22_S11", "C10", 600, 1)
    with pytest.raises(InputError, match="y = -3 is outside the CCD"):
        ccd_to_focal("R22_S11", [1, 2], [5, -3])
    with pytest.raises(InputError, match="outside the CCD"):
        ccd_to_amp("R02_S02", 4072, 5)
    with pytest.raises(InputError, match="unknown boundary kind"):
        distance_to_boundary("R22_S11", 1, 1, kind="corner")
    with pytest.raises(InputError, match="different shapes"):
        ccd_to_focal("R22_S11", [1, 2, 3], [1, 2])
    # check=False extrapolates; NaN passes through the check
    assert ccd_to_focal("R22_S11", 5000.0, 1.0, check=False)[0] > 20.48
    assert np.isnan(ccd_to_focal("R22_S11", [np.nan, 1.0], [1.0, 1.0])[0][0])
    name, ax, ay = ccd_to_amp("R22_S11", [-5.0], [1.0], check=False)
    assert name.tolist() == [""] and np.isnan(ax).all()


def test_load_camera_rejects_bad_tables(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON geometry table"):
        load_camera(p)
    p.write_text('{"ccd_types": {}}')
    with pytest.raises(InputError, match="malformed geometry table"):
        load_camera(p)
