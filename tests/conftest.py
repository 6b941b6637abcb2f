"""Shared fixtures: where the real test data lives, and helpers to run the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("SPOTFLAT_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
REAL_CATALOGUE = REAL / "mixcoatl" / "MC_C_20191031_001500_R02_S02_20.0s_-293.2x_39.6y_gridfit.cat"
OBS_LSST = REAL / "obs_lsst"


@pytest.fixture
def real_dir() -> Path:
    """The folder of real data beside the project; skip when it is absent."""
    if not REAL.is_dir():
        pytest.skip(f"real data folder {REAL} is absent (only in the project's shared/ checkout)")
    return REAL


@pytest.fixture
def real_catalogue(real_dir) -> Path:
    if not REAL_CATALOGUE.exists():
        pytest.skip(f"{REAL_CATALOGUE} is absent")
    return REAL_CATALOGUE


@pytest.fixture
def obs_lsst_dir(real_dir) -> Path:
    if not OBS_LSST.is_dir():
        pytest.skip(f"{OBS_LSST} is absent")
    return OBS_LSST


@pytest.fixture
def run_cli():
    """Run ``spotflat`` in-process with click's runner; return the result."""
    from click.testing import CliRunner

    from spotflat.cli import main

    def _run(*args, **kwargs):
        runner = CliRunner()
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return _run
