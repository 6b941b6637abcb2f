"""The worked examples in ``examples/`` run, as scripts, and write their figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, MPLBACKEND="Agg", **env)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def assert_pngs(folder: Path, names) -> None:
    for name in names:
        path = folder / name
        assert path.exists(), path
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, path


@pytest.mark.parametrize("name", ["simulated_walkthrough.py", "real_catalogue.py", "real_dithered_run.py"])
def test_example_is_a_jupytext_notebook(name):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(EXAMPLES / name)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown"
    assert kinds.count("code") >= 5 and kinds.count("markdown") >= 5


def test_simulated_walkthrough(tmp_path):
    proc = run_example("simulated_walkthrough.py", tmp_path)
    figs = tmp_path / "simulated_walkthrough_figures"
    assert_pngs(figs, ["one_spot_t.png", "flat.png", "t_vs_q.png", "residual_vs_injected.png"])
    assert_pngs(figs / "correlate", ["spot_flux_map.png", "residual_map.png", "t_vs_q.png"])
    assert (figs / "correlate" / "results.ecsv").exists()
    out = proc.stdout
    # the calibration matches the truth and the residual recovers the injected tree rings
    pull_mean = float(re.search(r"pulls of F\[k\]: mean ([-+.\d]+)", out).group(1))
    assert abs(pull_mean) < 0.5
    r = float(re.search(r"^r = ([-+.\d]+) \+- ([.\d]+) \(bootstrap\)", out, re.M).group(1))
    assert 0.2 < r < 1
    r_rec = float(re.search(r"injected pattern: ([-+.\d]+)", out).group(1))
    assert r_rec > 0.5
    # the seed's formula is orders of magnitude off; pearson_r is the printed r
    m = re.search(r"pearson_r: ([-+.\d]+); seed's formula without the sqrt: ([-+.\de]+)", out)
    assert abs(float(m.group(1)) - r) < 1e-3 and float(m.group(2)) > 100
    # the temporary simulated data are cleaned up
    assert not list(tmp_path.glob("spotflat-walkthrough-*"))


def test_real_catalogue(tmp_path, real_catalogue):
    proc = run_example("real_catalogue.py", tmp_path, SPOTFLAT_REAL_DATA=str(real_catalogue.parents[1]))
    assert_pngs(tmp_path / "real_catalogue_figures", ["spot_flux_map.png", "centroid_offsets.png",
                                                      "focal_plane.png"])
    out = proc.stdout
    assert "2423 sources, 2401 matched" in out
    assert "2401 grid points (49 x 49), detector R02_S02, 20.0 s, projector at (-293.2, 39.6) mm" in out


def test_real_catalogue_absent_exits_cleanly(tmp_path):
    proc = run_example("real_catalogue.py", tmp_path, SPOTFLAT_REAL_DATA=str(tmp_path / "nowhere"))
    assert "The real catalogue is not here" in proc.stdout
    assert not (tmp_path / "real_catalogue_figures").exists()


def test_real_dithered_run(tmp_path, real_dir):
    run = real_dir / "mixcoatl" / "R22_S20_run12784"
    if not run.is_dir():
        pytest.skip(f"{run} is absent")
    proc = run_example("real_dithered_run.py", tmp_path, SPOTFLAT_REAL_DATA=str(real_dir))
    assert_pngs(tmp_path / "real_dithered_run_figures", ["qc.png", "t_of_spots.png"])
    out = proc.stdout
    assert "10 exposures, 2401 grid points, detector R22_S20" in out
    scatter = float(re.search(r"median scatter of t over spots: ([.\d]+)%", out).group(1))
    assert scatter < 1.0
    assert "used=False, outlier" in out and "shift(-1 col, +0 row)" in out
    assert "re-registered: used=True" in out
    assert not list(tmp_path.glob("spotflat-dithered-*"))


def test_real_dithered_run_absent_exits_cleanly(tmp_path):
    proc = run_example("real_dithered_run.py", tmp_path, SPOTFLAT_REAL_DATA=str(tmp_path / "nowhere"))
    assert "The real dithered run is not here" in proc.stdout
    assert not (tmp_path / "real_dithered_run_figures").exists()
