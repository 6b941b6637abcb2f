"""spotflat: does the flat field describe the CCD's pixel-to-pixel response?

Compare spot-projector relative throughput with CCOB flat fields on LSST
Camera CCDs. The public functions are importable from the top level::

    from spotflat import read_grids, build_calibration, read_flat, sample_flat

Submodules are imported on first use so that ``import spotflat`` and the
command line start quickly.
"""

from __future__ import annotations

import importlib

from .errors import InputError, SpotflatError

# public name -> submodule that defines it
_EXPORTS = {
    # grids
    "read_grids": "grids",
    "SpotGrids": "grids",
    "parse_filename": "grids",
    # calibration
    "build_calibration": "calibration",
    "Calibration": "calibration",
    "read_calibration": "calibration",
    "write_calibration": "calibration",
    # geometry
    "assemble_raw": "geometry",
    "Camera": "geometry",
    "get_camera": "geometry",
    "make_raw_hdulist": "geometry",
    "fit_projector_map": "projector",
    # flats
    "read_flat": "flats",
    "sample_flat": "flats",
    "flat_gradient": "flats",
    "combine_flats": "flats",
    "load_flat": "flats",
    # compare
    "relative_throughput": "compare",
    "compare_spots_flat": "compare",
    # stats
    "pearson_r": "stats",
    "correlation_analysis": "stats",
    "CorrelationResult": "stats",
    "variance_decomposition": "stats",
    # simulate
    "simulate_run": "simulate",
}

__all__ = ["__version__", "InputError", "SpotflatError", *_EXPORTS]


def _package_version() -> str:
    # importlib.metadata costs ~30 ms to import: only when the version is asked for
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spotflat")
    except PackageNotFoundError:  # running from a source tree without install
        return "0.0.0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        globals()["__version__"] = value = _package_version()
        return value
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'spotflat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
