"""Sphinx configuration of the spotflat documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The figures of the coordinate-frame and getting-started pages are made at
build time by ``docs/make_figures.py`` (into ``docs/_generated/``, not in
git), so they always show what the installed code does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# document the checkout's code even when another spotflat is installed
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import spotflat  # noqa: E402

os.environ.setdefault("MPLBACKEND", "Agg")

# -- project -------------------------------------------------------------------
project = "spotflat"
author = "spotflat developers"
copyright = "spotflat developers, BSD-3-Clause"
release = spotflat.__version__
version = ".".join(release.split(".")[:2])

# -- general -------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_click",
]
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
root_doc = "index"
nitpicky = False
default_role = "obj"

# autodoc / numpydoc: the docstrings are numpydoc style (DESIGN.md section 5)
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc Parameters sections say it better
autodoc_default_options = {"members": True, "show-inheritance": False}
numpydoc_show_class_members = False  # no stub tables of class members
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- html ----------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"spotflat {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Spot-projector throughput vs CCOB flats on LSST Camera CCDs",
    "fixed_sidebar": True,
    "page_width": "1100px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}


#: API pages: module -> title, in the order of the analysis; modules not listed
#: here (new ones) follow, titled by the first line of their docstring.
API_MODULES = {
    "grids": "Processed-grid readers",
    "calibration": "Calibration catalogue: F[k] and s[j]",
    "geometry": "LSSTCam geometry and coordinate transforms",
    "assembly": "Raw CCD assembly",
    "projector": "Test-stand (BOT) projector coordinates",
    "flats": "CCOB flats",
    "footprint": "Sampling the flat over spot footprints",
    "compare": "Spots vs flat: t, q and d",
    "stats": "Correlation with honest errors",
    "resampling": "Resampling machinery",
    "pipeline": "The correlate stage as a function",
    "parallel": "Local and Dask execution",
    "plots": "Figures",
    "simulate": "Simulator with a known truth",
    "response": "Synthetic detector response maps",
    "errors": "Errors",
    "fileio": "Writing output files",
    "fitstable": "Fast FITS table reader",
}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_api_pages(outdir: Path = HERE / "api" / "generated") -> list[str]:
    """One ``automodule`` page per public module of spotflat, and their toctree.

    The pages go to ``docs/api/generated/`` (ignored by git); the command-line
    package ``spotflat.cli`` is documented by sphinx-click in ``cli.rst``.
    """
    import importlib
    import pkgutil

    found = sorted(m.name for m in pkgutil.iter_modules(spotflat.__path__)
                   if not m.name.startswith("_") and m.name != "cli")
    names = [m for m in API_MODULES if m in found] + [m for m in found if m not in API_MODULES]
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("*.rst"):
        if old.stem.removeprefix("spotflat.") not in names:
            old.unlink()
    for name in names:
        title = API_MODULES.get(name)
        if title is None:
            doc = importlib.import_module(f"spotflat.{name}").__doc__ or name
            title = doc.strip().splitlines()[0].rstrip(".")
        head = f"``spotflat.{name}``: {title}"
        _write_if_changed(outdir / f"spotflat.{name}.rst",
                          f"{head}\n{'=' * len(head)}\n\n.. automodule:: spotflat.{name}\n")
    toc = ".. toctree::\n   :maxdepth: 1\n   :caption: Modules, in the order of the analysis\n\n"
    toc += "".join(f"   generated/spotflat.{n}\n" for n in names)
    _write_if_changed(outdir / "toctree.inc", toc)
    return names


def _make_figures(app) -> None:
    """Make the generated figures before reading the sources (``builder-inited``)."""
    import make_figures

    make_figures.main(HERE / "_generated", force=bool(os.environ.get("SPOTFLAT_DOCS_FORCE")))


# before Sphinx looks for source files, so the generated pages are found
write_api_pages()


def setup(app):
    app.connect("builder-inited", _make_figures)
    return {"parallel_read_safe": True}
