"""``spotflat coords``: the examples of issue 3, JSON output, point files and errors."""

from __future__ import annotations

import json

import pytest

from spotflat.geometry import amp_to_ccd, ccd_to_focal, focal_to_detector

KEYS = {"detector", "amp", "ccd_x", "ccd_y", "focal_x", "focal_y"}


def _json(result):
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list) and all(KEYS <= set(row) for row in data)
    return data


def test_ccd_to_focal(run_cli):
    res = run_cli("coords", "--detector", "R22_S11", "--ccd", 100, 200, "--to", "focal")
    assert res.exit_code == 0, res.output
    fx, fy = ccd_to_focal("R22_S11", 100, 200)
    assert "focal_x" in res.stdout and f"{fx:.4f}" in res.stdout and f"{fy:.4f}" in res.stdout
    (row,) = _json(run_cli("coords", "--detector", "R22_S11", "--ccd", 100, 200, "--to", "focal",
                           "--json"))
    assert row["detector"] == "R22_S11" and row["amp"] == "C00"
    assert (row["ccd_x"], row["ccd_y"]) == (100.0, 200.0)
    assert (row["focal_x"], row["focal_y"]) == pytest.approx((fx, fy), abs=1e-12)


def test_focal_to_ccd(run_cli):
    res = run_cli("coords", "--focal", 12.3, -45.6, "--to", "ccd")
    name, x, y = focal_to_detector(12.3, -45.6)
    assert res.exit_code == 0 and name in res.stdout and f"{x:.4f}" in res.stdout
    (row,) = _json(run_cli("coords", "--focal", 12.3, -45.6, "--to", "ccd", "--json"))
    assert row["detector"] == name == "R22_S01"
    assert (row["ccd_x"], row["ccd_y"]) == pytest.approx((x, y))


def test_amp_to_ccd(run_cli):
    res = run_cli("coords", "--detector", "R22_S11", "--amp", "C10", 5, 5, "--to", "ccd")
    x, y = amp_to_ccd("R22_S11", "C10", 5, 5)
    assert res.exit_code == 0 and f"{x:.4f}" in res.stdout and f"{y:.4f}" in res.stdout
    (row,) = _json(run_cli("coords", "--detector", "R22_S11", "--amp", "C10", 5, 5, "--to", "ccd",
                           "--json"))
    assert (row["amp"], row["ccd_x"], row["ccd_y"]) == ("C10", x, y)
    assert (row["amp_x"], row["amp_y"]) == (5.0, 5.0)


def test_bot_to_ccd(run_cli):
    res = run_cli("coords", "--bot", -296.5, 41.7, "--to", "ccd")
    assert res.exit_code == 0 and "R02_S02" in res.stdout
    (row,) = _json(run_cli("coords", "--bot", -296.5, 41.7, "--to", "ccd", "--json"))
    assert row["detector"] == "R02_S02"
    assert (row["focal_x"], row["focal_y"]) == pytest.approx((41.7, -296.5))
    assert (row["ccd_x"], row["ccd_y"]) == pytest.approx((1981.5, 1975.5))
    assert "convention 'ccs'" in res.stderr
    (row,) = _json(run_cli("coords", "--bot", -296.5, 41.7, "--convention", "dm", "--json"))
    assert row["detector"] != "R02_S02"


def test_gap_and_several_points(run_cli):
    data = _json(run_cli("coords", "--focal", 21.0, 0.0, "--focal", 0.0, 0.0, "--json"))
    assert data[0]["detector"] is None and data[0]["ccd_x"] is None and data[0]["amp"] is None
    assert data[1]["detector"] == "R22_S11" and data[1]["amp"] is not None
    res = run_cli("coords", "--focal", 21.0, 0.0)
    assert res.exit_code == 0 and "gap" in res.stderr


def test_points_file(run_cli, tmp_path):
    pts = tmp_path / "pts.txt"
    pts.write_text("# detector x y\nR22_S11 100 200\nR02_S02, 5, 6  # comment\n\n")
    data = _json(run_cli("coords", "--points", pts, "--from", "ccd", "--json"))
    assert [r["detector"] for r in data] == ["R22_S11", "R02_S02"]
    assert data[1]["focal_x"] == pytest.approx(ccd_to_focal("R02_S02", 5, 6)[0])
    foc = tmp_path / "focal.csv"
    foc.write_text("x,y\n0,0\n21,0\n42.25,-296.25\n")
    data = _json(run_cli("coords", "--points", foc, "--from", "focal", "--json"))
    assert [r["detector"] for r in data] == ["R22_S11", None, "R02_S02"]
    amp = tmp_path / "amp.txt"
    amp.write_text("C10 5 5\nC00 0 0\n")
    data = _json(run_cli("coords", "-d", "R22_S11", "--points", amp, "--from", "amp", "--json"))
    assert [(r["ccd_x"], r["ccd_y"]) for r in data] == [(506.0, 3998.0), (0.0, 0.0)]
    res = run_cli("coords", "-d", "R22_S11", "--points", amp, "--from", "amp")
    assert res.exit_code == 0 and "506.0000" in res.stdout


def test_errors(run_cli, tmp_path):
    res = run_cli("coords", "--detector", "R99_S11", "--ccd", 1, 2)
    assert res.exit_code == 1 and "unknown detector 'R99_S11'" in res.output and res.stdout == ""
    res = run_cli("coords", "--detector", "R22_S11", "--amp", "C20", 1, 2)
    assert res.exit_code == 1 and "unknown amplifier 'C20'" in res.output and res.stdout == ""
    res = run_cli("coords", "--detector", "R22_S11", "--ccd", 5000, 2, "--json")
    assert res.exit_code == 1 and "x = 5000 is outside the CCD" in res.output
    assert "check=False" not in res.output and res.stdout == ""
    res = run_cli("coords", "--detector", "R22_S11", "--amp", "C10", 600, 2)
    assert res.exit_code == 1 and "outside the amplifier" in res.output
    res = run_cli("coords", "--ccd", 1, 2)
    assert res.exit_code == 2 and "needs --detector" in res.output
    res = run_cli("coords")
    assert res.exit_code == 2 and "give a position" in res.output
    res = run_cli("coords", "--bot", 1, 2, "--convention", "zz")
    assert res.exit_code == 1 and "unknown projector convention" in res.output
    res = run_cli("coords", "--points", tmp_path / "none.txt", "--from", "focal")
    assert res.exit_code == 1 and "none.txt: no such file" in res.output
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n3 four\n")
    res = run_cli("coords", "--points", bad, "--from", "focal")
    assert res.exit_code == 1 and "line 2" in res.output and "bad.txt" in res.output
    assert res.stdout == ""
    res = run_cli("coords", "--points", bad)
    assert res.exit_code == 2 and "--from" in res.output
