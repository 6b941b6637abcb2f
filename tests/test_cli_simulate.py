"""Tests of ``spotflat simulate``."""

from __future__ import annotations

import numpy as np
from astropy.io import fits


def test_simulate_writes_run(run_cli, tmp_path):
    out = tmp_path / "run"
    r = run_cli("simulate", out, "--ndither", 3, "--seed", 1, "--flat-mismatch", "treering")
    assert r.exit_code == 0, r.output
    assert "Simulated R22_S11 (E2V)" in r.output
    assert "3 DM files" in r.output and "treering" in r.output
    files = sorted((out / "spotdata").iterdir())
    assert len(files) == 3 and all(f.name.endswith("_gridfit.cat") for f in files)
    assert [p.name for p in (out / "flat").iterdir()] == ["ccob_flat_R22_S11.fits"]
    with fits.open(out / "truth.fits") as h:
        assert h[0].header["MISMATCH"] == "treering" and h[0].header["SEED"] == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_simulate_legacy_raw_itl(run_cli, tmp_path):
    out = tmp_path / "run"
    r = run_cli("simulate", out, "--detector", "R02_S02", "--ndither", 2, "--format", "legacy",
                "--flat-form", "raw", "--noise", 0, "-q")
    assert r.exit_code == 0, r.output
    assert "(ITL)" in r.output
    files = sorted((out / "spotdata").iterdir())
    assert len(files) == 2 and all("_R02_S02_" in f.name and f.name.endswith("_processed_grid.fits")
                                   for f in files)
    (flat,) = (out / "flat").iterdir()
    with fits.open(flat) as h:
        assert sum(x.name.upper().startswith("SEGMENT") for x in h) == 16


def test_simulate_refuses_non_empty_outdir(run_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_cli("simulate", out, "--ndither", 1)
    assert r.exit_code == 1
    assert "not empty" in r.output and str(out) in r.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    r = run_cli("simulate", out, "--ndither", 1, "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert (out / "truth.fits").exists() and (out / "notes.txt").exists()


def test_simulate_bad_input_leaves_nothing(run_cli, tmp_path):
    out = tmp_path / "run"
    r = run_cli("simulate", out, "--detector", "R99_S42", "--ndither", 1)
    assert r.exit_code == 1 and "R99_S42" in r.output
    assert "Traceback" not in r.output
    assert not out.exists()
    r = run_cli("simulate", out, "--format", "csv")
    assert r.exit_code == 2
    r = run_cli("simulate", out, "--ndither", 0)
    assert r.exit_code == 2
    assert not out.exists()


def test_simulate_seed_reproducible(run_cli, tmp_path):
    for name in ("a", "b"):
        assert run_cli("simulate", tmp_path / name, "--ndither", 1, "--seed", 7, "-q").exit_code == 0
    (fa,) = (tmp_path / "a" / "spotdata").iterdir()
    (fb,) = (tmp_path / "b" / "spotdata").iterdir()
    assert fa.name == fb.name
    np.testing.assert_array_equal(fits.getdata(fa, 1)["base_SdssShape_instFlux"],
                                  fits.getdata(fb, 1)["base_SdssShape_instFlux"])


def test_cli_simulate_treering_kind_and_boost(run_cli, tmp_path):
    from astropy.io import fits

    out = tmp_path / "qe"
    r = run_cli("simulate", out, "--ndither", 2, "--seed", 1, "--treering-kind", "qe", "--treering-boost", 10)
    assert r.exit_code == 0, r.output
    assert "imSim model" in r.output and "qe, x10" in r.output
    with fits.open(out / "truth.fits") as h:
        assert h[0].header["TRKIND"] == "qe" and h[0].header["TRBOOST"] == 10.0
        assert h[0].header["TRMODEL"] == "imsim"
