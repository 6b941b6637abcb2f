"""The documentation builds with warnings as errors, and its snippets run.

The build runs ``docs/make_figures.py`` (geometry figures and a small
``spotflat demo``, cached in ``docs/_generated/``), so it also checks that the
figures the pages show can be made from the installed code.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytest.importorskip("sphinx")
pytest.importorskip("numpydoc")
pytest.importorskip("sphinx_click")

PAGES = ("index", "getting_started", "science", "coordinates", "inputs", "examples", "cli", "api/index")
FIGURES = ("focal_plane.png", "ccd_amplifiers.png", "spot_flux_map.png", "t_map.png", "q_map.png",
           "residual_map.png", "t_vs_q.png", "residual_hist.png", "amp_residuals.png",
           "residual_vs_boundary.png", "mismatch_recovery.png", "dx_vs_dqdx.png", "dy_vs_dqdy.png",
           "size_vs_lapq.png")


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
                           "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "WARNING" not in proc.stderr, proc.stderr
    return out / "html"


def test_pages_built(html):
    for page in PAGES:
        assert (html / f"{page}.html").stat().st_size > 2000, page


def test_every_module_has_an_api_page(html):
    import pkgutil

    import spotflat

    modules = [m.name for m in pkgutil.iter_modules(spotflat.__path__)
               if not m.name.startswith("_") and m.name != "cli"]
    assert "geometry" in modules and "stats" in modules
    for name in modules:
        page = html / "api" / "generated" / f"spotflat.{name}.html"
        assert page.exists(), name
    # numpydoc rendered the sections (a Parameters field list) and the functions are there
    text = (html / "api" / "generated" / "spotflat.stats.html").read_text()
    assert "correlation_analysis" in text and "Parameters" in text


def test_cli_reference_lists_every_command(html):
    import click

    from spotflat.cli import main

    text = (html / "cli.html").read_text()
    commands = main.list_commands(click.Context(main))
    assert {"calibrate", "correlate", "coords", "demo", "simulate"} <= set(commands)
    for name in commands:
        assert f'id="spotflat-{name}"' in text, name
    assert "--flat" in text and "--nboot" in text


def test_figures_generated_and_shown(html):
    images = html / "_images"
    for name in FIGURES:
        path = images / name
        assert path.exists(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, name
    assert "focal_plane.png" in (html / "coordinates.html").read_text()
    assert "residual_map.png" in (html / "getting_started.html").read_text()


def test_science_page_states_the_corrected_formula(html):
    text = unescape(re.sub(r"<[^>]+>", "", (html / "science.html").read_text()))
    assert "lacks the square root" in text
    assert "r = <df dQ> / (<df^2> <dQ^2>)" in text  # the seed's
    assert "r = <df dQ> / sqrt(<df^2> <dQ^2>)" in text  # spotflat's


def test_examples_included(html):
    text = (html / "examples.html").read_text()
    assert "simulate_run" in text and "real_catalogue_figures" in text


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.rst")))
def test_rst_doctests(page):
    res = doctest.testfile(str(DOCS / page), module_relative=False, report=False,
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples in {page} failed"
    if page == "coordinates.rst":
        assert res.attempted >= 10


def test_every_demo_figure_has_a_caption():
    """Getting started shows every demo figure with what to look for and what a good flat looks like."""
    sys.path.insert(0, str(DOCS))
    try:
        from make_figures import DEMO_FIGURES
    finally:
        sys.path.remove(str(DOCS))
    text = (DOCS / "getting_started.rst").read_text()
    entries = re.split(r"\n(?=``[a-z_]+\.png``)", text.split("Reading the figures", 1)[1])
    for name in DEMO_FIGURES:
        assert f"_generated/demo/{name}" in text, name
        entry = next((e for e in entries if f"``{name}``" in e.split("\n", 1)[0]), None)
        assert entry is not None, f"{name} has no entry of its own"
        caption = " ".join(entry.split("\n\n", 1)[0].split())
        assert "**Look for**" in caption and "**if the flat describes" in caption, name
