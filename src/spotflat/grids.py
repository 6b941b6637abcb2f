"""Read processed-grid files and stack them into a spot-by-exposure set.

Two on-disk formats are understood (DESIGN.md section 4):

* **DM grid source catalogues** (``gridSpotSrc``, mixcoatl ``gridFit``): an LSST
  SourceCatalog FITS table with ``spotgrid_index`` (NaN or -1 when a source
  was not matched to the grid), ``base_SdssCentroid_x/y``,
  ``base_SdssShape_xx/yy/xy``, ``base_SdssShape_instFlux`` (+``Err``) and the
  grid parameters in a ``GRID_INFO`` HDU header (or ``GRID_*`` header cards).
* **Legacy processed grids** (mixcoatl 2019-2020): grid parameters in the
  primary header and one row per grid point with ``X Y DX DY XX YY DXX DYY
  FLUX DFLUX`` (NaN where unmatched). Every measured quantity is base + delta.

Flux column defaults: ``base_SdssShape_instFlux`` for DM catalogues (the
adaptive-moment flux, measured with the same weight as the shapes used to
sample the flat), and ``FLUX+DFLUX`` for legacy files (the sum is right both
for files straight from the grid task, where ``FLUX = 0``, and for files after
distortion correction, where ``FLUX`` holds the per-spot mean). Any other
column of the table can be named instead, e.g.
``base_CircularApertureFlux_12_0_instFlux`` or ``DFLUX``.

The spot index ``k`` runs over the grid with grid column ``k // nrows`` and
grid row ``k % nrows`` (the mixcoatl convention, checked on a real catalogue).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # astropy is imported where it is used: the fast reader needs none of it
    from astropy.table import Table

from .errors import InputError
from .fileio import check_readable, reading
from .fitstable import FitsFile, Unsupported

__all__ = [
    "SpotGrids",
    "GridFile",
    "GRID_KEYS",
    "QUANTITIES",
    "grid_positions",
    "parse_filename",
    "find_grid_files",
    "read_grid_file",
    "read_grid_files",
    "read_grids",
    "NotAGridFile",
    "POINT_FLAGS",
    "DEFAULT_MAX_OFFSET",
    "flag_points",
    "group_by_detector",
]

#: Grid-parameter header keywords, in the order mixcoatl writes them.
GRID_KEYS = ("X0", "Y0", "XSTEP", "YSTEP", "THETA", "NCOLS", "NROWS")

#: Per-spot quantities stacked into ``[spot, exposure]`` arrays.
QUANTITIES = ("flux", "flux_err", "x", "y", "dx", "dy", "xx", "yy", "xy")

#: Per-point flag bits of :attr:`SpotGrids.flags` (the calibration adds its own).
POINT_FLAGS = {"far": 1, "ambiguous": 2}

#: Default largest offset of a matched spot from its grid point, in grid steps.
#: Real centroids sit within ~0.5 px of the fitted (distorted) grid, ~1 % of a
#: step; a point "matched" to a neighbouring spot is one step (64-67 px) away.
#: A quarter step is far beyond any real centroid error or residual distortion
#: and far inside the half-step where the nearest spot becomes another grid point.
DEFAULT_MAX_OFFSET = 0.25

DM_DEFAULT_FLUX = "base_SdssShape_instFlux"
LEGACY_DEFAULT_FLUX = "FLUX+DFLUX"

_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".cat", ".fits.gz", ".fit.gz", ".cat.gz", ".fits.fz")
_SUFFIXES_LONGEST_FIRST = sorted(_FITS_SUFFIXES, key=len, reverse=True)

_NAME_RE = re.compile(
    r"^(?P<prefix>[A-Z]{2}_[A-Z])_(?P<date>\d{8})_(?P<seq>\d{6})_"
    r"(?P<raft>R\d\d)_(?P<sensor>S\d\d|SG\d|SW\d)_"
    r"(?P<exptime>\d+(?:\.\d*)?)s_(?P<x>[-+]?\d+(?:\.\d*)?)x_(?P<y>[-+]?\d+(?:\.\d*)?)y"
    r"(?:_(?P<suffix>.*))?$"
)


def grid_positions(x0: float, y0: float, xstep: float, ystep: float, theta: float,
                   ncols: int, nrows: int) -> tuple[np.ndarray, np.ndarray]:
    """CCD pixel positions of every grid point, in spot-index order.

    Parameters
    ----------
    x0, y0 : float
        Grid centre in CCD pixels.
    xstep, ystep : float
        Grid step along the grid's columns and rows (pixels).
    theta : float
        Grid rotation (radians, counter-clockwise).
    ncols, nrows : int
        Grid size.

    Returns
    -------
    x, y : numpy.ndarray
        Arrays of length ``ncols * nrows``; spot ``k`` has grid column
        ``k // nrows`` and grid row ``k % nrows``.

    Examples
    --------
    >>> x, y = grid_positions(100.0, 200.0, 10.0, 10.0, 0.0, 3, 3)
    >>> x.reshape(3, 3)[:, 0], y[:3]
    (array([ 90., 100., 110.]), array([190., 200., 210.]))
    """
    k = np.arange(int(ncols) * int(nrows))
    u = (k // nrows - (ncols - 1) / 2.0) * xstep
    v = (k % nrows - (nrows - 1) / 2.0) * ystep
    c, s = np.cos(theta), np.sin(theta)
    return x0 + u * c - v * s, y0 + u * s + v * c


def parse_filename(name: str | os.PathLike) -> dict | None:
    """Metadata encoded in a processed-grid file name.

    Parameters
    ----------
    name : str or os.PathLike
        A name like ``MC_C_20191031_001500_R02_S02_20.0s_-293.2x_39.6y_gridfit.cat``
        (a directory part is ignored).

    Returns
    -------
    dict or None
        ``obs_date`` (``YYYY-MM-DD``), ``seqnum`` (int), ``raft``, ``sensor``,
        ``detector`` (``R02_S02``), ``exptime`` (s), ``bot_x``, ``bot_y``
        (projector position, mm) and ``obsid`` (``MC_C_20191031_001500``);
        ``None`` when the name does not follow the convention.

    Examples
    --------
    >>> m = parse_filename("MC_C_20191031_001500_R02_S02_20.0s_-293.2x_39.6y_gridfit.cat")
    >>> m["detector"], m["exptime"], m["bot_x"], m["bot_y"], m["seqnum"]
    ('R02_S02', 20.0, -293.2, 39.6, 1500)
    """
    meta = _parse_name(os.path.basename(os.fspath(name)))
    return None if meta is None else dict(meta)


@functools.lru_cache(maxsize=8192)
def _parse_name(base: str) -> dict | None:
    """:func:`parse_filename` of a bare file name, cached (each file is looked at several times)."""
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    m = _NAME_RE.match(base)
    if m is None:
        return None
    d = m["date"]
    return {
        "obsid": f"{m['prefix']}_{d}_{m['seq']}",
        "obs_date": f"{d[:4]}-{d[4:6]}-{d[6:]}",
        "seqnum": int(m["seq"]),
        "raft": m["raft"],
        "sensor": m["sensor"],
        "detector": f"{m['raft']}_{m['sensor']}",
        "exptime": float(m["exptime"]),
        "bot_x": float(m["x"]),
        "bot_y": float(m["y"]),
    }


def _is_fits(path: str | os.PathLike) -> bool:
    """True when the file starts like FITS (plain or gzip-compressed).

    A file that cannot be read (permission denied, mode 000 even for root)
    is an error naming it, not "not a FITS file".
    """
    # os-level calls: a run has thousands of files and each system call counts
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        check_readable(path, "a processed-grid file")
        return False
    try:
        if not os.fstat(fd).st_mode & 0o444:
            check_readable(path, "a processed-grid file")
        head = os.read(fd, 9)
    except OSError:
        check_readable(path, "a processed-grid file")
        return False
    finally:
        os.close(fd)
    return head.startswith(b"SIMPLE  =") or head[:2] == b"\x1f\x8b"


def _walk_files(directory: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    """Files under ``directory`` (not hidden ones), without a stat per file.

    Like ``directory.glob("**/*")``: symbolic links to files count, links to
    folders are not followed. Returns the regular files and, apart, the other
    entries (pipes, sockets, device nodes), which are never opened: reading a
    pipe would hang.
    """
    out, special, todo = [], [], [directory]
    while todo:
        d = todo.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if recursive:
                        todo.append(Path(e.path))
                elif e.name.startswith("."):
                    continue
                elif e.is_file():
                    out.append(Path(e.path))
                elif e.is_symlink():  # dangling or looping: the user meant a file here
                    check_readable(e.path, "a processed-grid file (or remove the broken link)")
                else:
                    special.append(Path(e.path))
    return sorted(out), sorted(special)


def find_grid_files(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Processed-grid FITS files under ``directory``, sorted by name.

    Files that are not FITS (by content, not only by name), and entries that
    are not regular files (a pipe, socket or device node), are skipped with a
    :class:`UserWarning` naming them.

    Parameters
    ----------
    directory : str or os.PathLike
        Folder to search.
    recursive : bool
        Search sub-folders too (a focal-plane tree holds one per detector).

    Returns
    -------
    list of pathlib.Path

    Raises
    ------
    InputError
        When the folder does not exist or holds no FITS file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("not a directory", path=directory, expected="a folder of processed-grid files")
    found, skipped = [], []
    files, special = _walk_files(directory, recursive)
    for p in files:
        if _is_fits(p):
            found.append(p)
        else:
            skipped.append(p)
    for p in special:
        warnings.warn(f"{p}: not a regular file (a pipe, socket or device), skipped", UserWarning, stacklevel=2)
    for p in skipped:
        warnings.warn(f"{p}: not a FITS file, skipped", UserWarning, stacklevel=2)
    if not found:
        raise InputError("no processed-grid FITS files found", path=directory,
                         expected="*_gridfit.cat or *_processed_grid.fits files")
    return found


class NotAGridFile(InputError):
    """A FITS file that is not a processed grid (e.g. an earlier output catalogue)."""


@dataclass
class GridFile:
    """One processed-grid file: per-spot arrays of length ``ncols * nrows``.

    Attributes
    ----------
    path : pathlib.Path
    format : str
        ``"dm"`` or ``"legacy"``.
    grid : dict
        Grid parameters ``X0 Y0 XSTEP YSTEP THETA NCOLS NROWS``.
    values : dict of numpy.ndarray
        The quantities of :data:`QUANTITIES`, NaN where a spot is missing.
    meta : dict
        File-name and header metadata (detector, exptime, bot_x, bot_y, ...).
    flux_column : str
        The column (or sum) the ``flux`` values came from.
    """

    path: Path
    format: str
    grid: dict
    values: dict
    meta: dict
    flux_column: str

    @property
    def nspot(self) -> int:
        return int(self.grid["NCOLS"]) * int(self.grid["NROWS"])

    @property
    def ambiguous(self) -> np.ndarray:
        """Spot indices dropped because one source was assigned to several grid points."""
        return np.asarray(self.meta.get("ambiguous", ()), dtype=np.int64)


#: Largest grid accepted (the projector's is 49 x 49): a damaged header asking
#: for more fails here instead of allocating.
MAX_GRID_POINTS = 1_000_000


def _grid_from_header(header, path, prefix: str = "") -> dict | None:
    keys = [prefix + k for k in GRID_KEYS]
    if not all(k in header for k in keys):
        return None
    grid = {}
    for k in GRID_KEYS:
        v = header[prefix + k]
        integer = k in ("NCOLS", "NROWS")
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
            and np.isfinite(v) and (not integer or float(v).is_integer())
        if not ok:
            raise InputError(f"grid card {prefix + k} = {v!r} is not {'an integer' if integer else 'a finite number'}",
                             path=path, expected="numeric grid parameters X0 Y0 XSTEP YSTEP THETA NCOLS NROWS")
        grid[k] = int(v) if integer else float(v)
    if grid["NCOLS"] < 1 or grid["NROWS"] < 1:
        raise InputError(f"grid size {grid['NCOLS']} x {grid['NROWS']} is empty", path=path)
    if grid["NCOLS"] * grid["NROWS"] > MAX_GRID_POINTS:
        raise InputError(f"grid size {grid['NCOLS']} x {grid['NROWS']} is implausibly large (damaged header?)",
                         path=path, expected=f"at most {MAX_GRID_POINTS} grid points (the projector's is 49 x 49)")
    return grid


@dataclass
class _Source:
    """What the format readers need from an open file, however it was opened."""

    names: list
    headers: list  # primary header, table header
    grid_info: object  # GRID_INFO header or None
    get: object  # callable: column name -> array
    nrows: int


def _column(src: _Source, name: str, path) -> np.ndarray:
    """A table column as float64, or a clear error naming what is there."""
    if "+" in name:  # a sum of columns, e.g. FLUX+DFLUX
        return sum(_column(src, p.strip(), path) for p in name.split("+"))
    if name not in src.names:
        fluxes = [n for n in src.names if "flux" in n.lower() and not n.lower().endswith(("err", "flag"))]
        raise InputError(f"table has no column {name!r}", path=path,
                         expected=("one of " + ", ".join(fluxes[:6]) + (", ..." if len(fluxes) > 6 else ""))
                         if fluxes else None)
    raw = np.asarray(src.get(name))
    if raw.ndim != 1:
        raise InputError(f"column {name!r} holds {raw.shape[1] if raw.ndim == 2 else 'several'} values per row",
                         path=path, expected="a scalar column (one value per spot)")
    if raw.dtype.kind not in "iuf":
        raise InputError(f"column {name!r} is not numeric (dtype {raw.dtype})", path=path,
                         expected="a numeric column")
    return raw.astype(np.float64)


#: Fluxes outside this range are treated as unmeasured: a denormal (1e-310) or
#: astronomically large value is a damaged point, and its square would
#: underflow or overflow in the statistics.
FLUX_RANGE = (1e-100, 1e100)


def _sane_flux(flux: np.ndarray) -> np.ndarray:
    """Fluxes with damaged values (non-finite, tiny or huge in magnitude) set to NaN."""
    a = np.abs(flux)  # NaN compares False: it stays NaN; zero stays zero (non-positive, for the calibration)
    bad = ((a < FLUX_RANGE[0]) & (a != 0)) | (a > FLUX_RANGE[1])
    if bad.any():
        flux = np.where(bad, np.nan, flux)
    return flux


def _sane_moments(values: dict) -> None:
    """Points no detector can have measured become unmeasured.

    Negative second moments and moments above 1e6 pixel^2 (a spot 1000
    pixels wide) are damage, and would send the footprint sampling of the
    flat astray.
    """
    xx, yy = values["xx"], values["yy"]
    with np.errstate(invalid="ignore"):
        bad = (np.minimum(xx, yy) < 0) | (np.maximum(xx, yy) > 1e6)
    if bad.any():
        for v in values.values():
            v[bad] = np.nan


def _header_meta(path: Path, headers: Sequence) -> dict:
    """File-name metadata, completed/overridden from header cards when present."""
    meta = parse_filename(path) or {}
    meta = dict(meta)
    for hdr in headers:
        if "EXPTIME" in hdr and "exptime" not in meta:
            meta["exptime"] = float(hdr["EXPTIME"])
        if "BOTXCAM" in hdr and "bot_x" not in meta:
            meta["bot_x"] = float(hdr["BOTXCAM"])
        if "BOTYCAM" in hdr and "bot_y" not in meta:
            meta["bot_y"] = float(hdr["BOTYCAM"])
        if "RAFTBAY" in hdr and "CCDSLOT" in hdr and "detector" not in meta:
            meta["raft"] = str(hdr["RAFTBAY"]).strip()
            meta["sensor"] = str(hdr["CCDSLOT"]).strip()
            meta["detector"] = f"{meta['raft']}_{meta['sensor']}"
    return meta


def _read_dm(path: Path, src: _Source, flux_column: str | None, out: np.ndarray | None = None) -> GridFile:
    data = src
    grid = None
    if src.grid_info is not None:
        grid = _grid_from_header(src.grid_info, path)
    for hdr in reversed(src.headers):
        if grid is None:
            grid = _grid_from_header(hdr, path, prefix="GRID_")
    if grid is None:
        raise InputError("no grid parameters", path=path,
                         expected="a GRID_INFO HDU or GRID_X0..GRID_NROWS header cards")
    nspot = grid["NCOLS"] * grid["NROWS"]
    flux_column = flux_column or DM_DEFAULT_FLUX
    index = _column(data, "spotgrid_index", path)
    sel = np.flatnonzero(np.isfinite(index) & (index >= 0))  # the rest are unmatched
    matched = index[sel]
    idx = matched.astype(np.int64)
    if idx.size and (idx.max() >= nspot or np.any(idx != matched)):
        raise InputError(f"spotgrid_index outside the {grid['NCOLS']} x {grid['NROWS']} grid", path=path)
    counts = np.bincount(idx, minlength=nspot)
    if counts.max(initial=0) > 1:
        dup = np.flatnonzero(counts > 1)
        raise InputError(f"duplicate spot indices ({', '.join(map(str, dup[:5]))}"
                         f"{', ...' if len(dup) > 5 else ''})", path=path, expected="each grid point matched once")

    names = src.names
    nan = np.full(src.nrows, np.nan)
    x = _column(data, "base_SdssCentroid_x", path)
    y = _column(data, "base_SdssCentroid_y", path)
    if "spotgrid_x" in names and "spotgrid_y" in names:
        dx, dy = x - _column(data, "spotgrid_x", path), y - _column(data, "spotgrid_y", path)
    else:
        gx, gy = grid_positions(*(grid[k] for k in GRID_KEYS))
        k = np.zeros(src.nrows, dtype=np.int64)
        k[sel] = idx  # unmatched rows get spot 0 here and are dropped below
        dx, dy = x - gx[k], y - gy[k]
    err_name = flux_column + "Err"
    rows = {
        "flux": _sane_flux(_column(data, flux_column, path)),
        "flux_err": _sane_flux(_column(data, err_name, path)) if err_name in names else nan,
        "x": x, "y": y, "dx": dx, "dy": dy,
        "xx": _column(data, "base_SdssShape_xx", path),
        "yy": _column(data, "base_SdssShape_yy", path),
        "xy": _column(data, "base_SdssShape_xy", path) if "base_SdssShape_xy" in names else nan,
    }
    # scatter each quantity into its row of one (quantity, spot) block; 1-D
    # scatters are several times faster than one 2-D fancy-indexed one
    if out is not None and out.shape == (len(QUANTITIES), nspot) and out.dtype == np.float64:
        block = out  # e.g. the file's slot of a stack: no block of its own to copy there
        block.fill(np.nan)
    else:
        block = np.full((len(QUANTITIES), nspot), np.nan)
    for row, q in zip(block, QUANTITIES):
        row[idx] = rows[q].take(sel)
    values = dict(zip(QUANTITIES, block))
    _sane_moments(values)
    meta = _header_meta(path, src.headers)
    return GridFile(path, "dm", grid, values, meta, flux_column)


def _read_legacy(path: Path, src: _Source, flux_column: str | None) -> GridFile:
    grid = _grid_from_header(src.headers[0], path)
    if grid is None:
        raise InputError("no grid parameters in the primary header", path=path,
                         expected="X0 Y0 XSTEP YSTEP THETA NCOLS NROWS")
    nspot = grid["NCOLS"] * grid["NROWS"]
    data = src
    nrow = src.nrows
    if nrow != nspot:
        raise InputError(f"table has {nrow} rows for a {grid['NCOLS']} x {grid['NROWS']} grid",
                         path=path, expected=f"{nspot} rows, one per grid point")
    flux_column = flux_column or LEGACY_DEFAULT_FLUX
    c = {n: _column(data, n, path) for n in ("X", "Y", "DX", "DY", "XX", "YY", "DXX", "DYY")}
    flux = _sane_flux(_column(data, flux_column, path))
    values = {
        "flux": flux,
        "flux_err": np.full(nspot, np.nan),
        "x": c["X"] + c["DX"], "y": c["Y"] + c["DY"],
        "dx": c["DX"].copy(), "dy": c["DY"].copy(),
        "xx": c["XX"] + c["DXX"], "yy": c["YY"] + c["DYY"],
        "xy": np.full(nspot, np.nan),
    }
    # a spot with no flux is unmatched, whatever its base columns say
    missing = ~np.isfinite(flux)
    # one source assigned to several grid points (older grid tasks match every
    # grid point to its nearest source): the same centroid on several rows
    ambiguous = _shared_sources(values["x"], values["y"], ~missing)
    missing[ambiguous] = True
    for v in values.values():
        v[missing] = np.nan
    _sane_moments(values)
    meta = _header_meta(path, src.headers)
    if ambiguous.size:
        meta["ambiguous"] = ambiguous
    return GridFile(path, "legacy", grid, values, meta, flux_column)


def _shared_sources(x: np.ndarray, y: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Indices of the rows whose (x, y) centroid equals that of another row."""
    rows = np.flatnonzero(ok & np.isfinite(x) & np.isfinite(y))
    if rows.size < 2:
        return np.empty(0, dtype=np.int64)
    order = rows[np.lexsort((y[rows], x[rows]))]
    same = (x[order[1:]] == x[order[:-1]]) & (y[order[1:]] == y[order[:-1]])
    dup = np.zeros(order.size, dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    return np.sort(order[dup])


def read_grid_file(path: str | os.PathLike, flux_column: str | None = None,
                   out: np.ndarray | None = None) -> GridFile:
    """Read one processed-grid file of either format.

    Parameters
    ----------
    path : str or os.PathLike
        A DM grid source catalogue or a legacy processed-grid file.
    flux_column : str, optional
        Flux column to use (a ``+`` between names sums columns). Defaults to
        ``base_SdssShape_instFlux`` (DM) or ``FLUX+DFLUX`` (legacy).
    out : numpy.ndarray, optional
        A float64 array of shape ``(len(QUANTITIES), nspot)``: a DM
        catalogue of a grid of ``nspot`` points is scattered into it (its
        ``values`` are then views of ``out``'s rows), e.g. into its slot of a
        stack. Ignored for other files and grid sizes.

    Returns
    -------
    GridFile

    Raises
    ------
    InputError
        When the file is unreadable, truncated, of neither format, lacks the
        flux column or the grid parameters, or has duplicate spot indices.
    """
    path = Path(path)
    with reading(path, "a processed-grid FITS file"):
        try:
            return _read_fast(path, flux_column, out)
        except Unsupported:
            pass  # compressed, unusual or damaged: astropy reads it or says what is wrong
        from astropy.io import fits
        from astropy.utils.exceptions import AstropyUserWarning

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyUserWarning)
                warnings.filterwarnings("error", message=".*truncated.*", category=AstropyUserWarning)
                with fits.open(path, memmap=False) as hdul:
                    return _read_astropy(path, hdul, flux_column)
        except AstropyUserWarning as exc:
            raise InputError(f"damaged FITS file ({exc})", path=path) from None


def _dispatch(path: Path, src: _Source, flux_column: str | None, out: np.ndarray | None = None) -> GridFile:
    # a DM grid catalogue (spot indices and LSST base_ measurements): a missing
    # column is then an error, not a reason to skip the file
    if "spotgrid_index" in src.names and any(n.startswith("base_") for n in src.names):
        return _read_dm(path, src, flux_column, out)
    if "DFLUX" in src.names or ("X" in src.names and "DX" in src.names):
        return _read_legacy(path, src, flux_column)
    raise NotAGridFile("neither a DM grid catalogue nor a legacy processed grid", path=path,
                     expected="a 'spotgrid_index' column or X/DX/FLUX/DFLUX columns")


_WANTED = ("spotgrid_index", "spotgrid_x", "spotgrid_y", "base_SdssCentroid_x", "base_SdssCentroid_y",
           "base_SdssShape_xx", "base_SdssShape_yy", "base_SdssShape_xy",
           "X", "Y", "DX", "DY", "XX", "YY", "DXX", "DYY", "FLUX", "DFLUX")


def _read_fast(path: Path, flux_column: str | None, out: np.ndarray | None = None) -> GridFile:
    ff = FitsFile(path)
    if len(ff.headers) < 2 or str(ff.headers[1].get("XTENSION", "")).strip() != "BINTABLE":
        raise Unsupported("no binary table in HDU 1")
    names = ff.colnames(1)
    wanted = set(_WANTED)
    if flux_column:
        wanted |= {p.strip() for p in flux_column.split("+")}
        wanted.add(flux_column + "Err")
    else:
        wanted |= {DM_DEFAULT_FLUX, DM_DEFAULT_FLUX + "Err"}
    cols = ff.columns(1, [n for n in names if n in wanted])
    gi = ff.index("GRID_INFO")
    src = _Source(names=names, headers=[ff.headers[0], ff.headers[1]],
                  grid_info=None if gi is None else ff.headers[gi], get=cols.__getitem__,
                  nrows=int(ff.headers[1]["NAXIS2"]))
    return _dispatch(path, src, flux_column, out)


def _read_astropy(path: Path, hdul, flux_column: str | None) -> GridFile:
    from astropy.io import fits

    hdul.verify("silentfix")
    if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
        raise NotAGridFile("no binary table in HDU 1", path=path,
                         expected="a processed-grid table (DM or legacy)")
    data = hdul[1].data
    src = _Source(names=list(hdul[1].columns.names), headers=[hdul[0].header, hdul[1].header],
                  grid_info=hdul["GRID_INFO"].header if "GRID_INFO" in hdul else None,
                  get=lambda n: data[n], nrows=0 if data is None else len(data))
    return _dispatch(path, src, flux_column)


@dataclass
class SpotGrids:
    """Processed-grid measurements stacked as ``[spot, exposure]`` arrays.

    Attributes
    ----------
    flux, flux_err, x, y, dx, dy, xx, yy, xy : numpy.ndarray
        2-D float arrays of shape ``(nspot, nexp)``, NaN where a spot was not
        measured. ``x, y`` are CCD pixel centroids; ``dx, dy`` the shift from
        the fitted grid point; ``xx, yy, xy`` second moments (pixel^2).
    exposures : astropy.table.Table
        One row per exposure (file): ``filename``, ``path``, ``format``,
        ``detector``, ``raft``, ``sensor``, ``obsid``, ``obs_date``, ``seqnum``,
        ``exptime`` (s), ``bot_x``, ``bot_y`` (mm), the grid parameters
        ``x0 y0 xstep ystep theta ncols nrows`` and ``nfound`` (spots measured).
    flux_column : str
        Column the fluxes came from.
    detector : str
        Detector name (``R22_S11``); ``""`` when the files do not say.
    meta : dict
        ``max_offset`` (grid steps) of the far-match rule, ``skipped``
        (files that were not processed grids).
    flags : numpy.ndarray of uint8
        ``[spot, exposure]`` bits of :data:`POINT_FLAGS`: ``far`` (centroid
        farther than ``max_offset`` grid steps from its grid point) and
        ``ambiguous`` (one source assigned to several grid points). Flagged
        points are unmatched: their values are NaN.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    x: np.ndarray
    y: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    xy: np.ndarray
    exposures: Table
    flux_column: str
    detector: str = ""
    meta: dict = field(default_factory=dict)
    flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.flags is None:
            self.flags = np.zeros(self.flux.shape, dtype=np.uint8)

    def flag_counts(self) -> dict[str, np.ndarray]:
        """Per-exposure number of points flagged for each reason of :data:`POINT_FLAGS`."""
        return {name: np.count_nonzero(self.flags & bit, axis=0) for name, bit in POINT_FLAGS.items()}

    @property
    def nspot(self) -> int:
        """Number of grid points."""
        return self.flux.shape[0]

    @property
    def nexp(self) -> int:
        """Number of exposures."""
        return self.flux.shape[1]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(ncols, nrows)`` of the spot grid."""
        return int(self.exposures["ncols"][0]), int(self.exposures["nrows"][0])

    @property
    def spotgrid_index(self) -> np.ndarray:
        """Spot indices ``0 .. nspot-1``."""
        return np.arange(self.nspot)

    def quantity(self, name: str) -> np.ndarray:
        """One of :data:`QUANTITIES`, or ``size`` (``xx + yy``)."""
        if name == "size":
            return self.xx + self.yy
        if name not in QUANTITIES:
            raise InputError(f"unknown quantity {name!r}", expected=", ".join(QUANTITIES + ("size",)))
        return getattr(self, name)


_EXPOSURE_COLUMNS = (
    ("filename", str), ("path", str), ("format", str), ("detector", str), ("raft", str),
    ("sensor", str), ("obsid", str), ("obs_date", str), ("seqnum", np.int64),
    ("exptime", np.float64), ("bot_x", np.float64), ("bot_y", np.float64),
    ("x0", np.float64), ("y0", np.float64), ("xstep", np.float64), ("ystep", np.float64),
    ("theta", np.float64), ("ncols", np.int64), ("nrows", np.int64), ("nfound", np.int64),
)
_EXPOSURE_UNITS = {"exptime": "s", "bot_x": "mm", "bot_y": "mm", "x0": "pix", "y0": "pix",
                   "xstep": "pix", "ystep": "pix", "theta": "rad"}


def _exposure_row(gf: GridFile, folders: dict) -> dict:
    """The exposure-table row of one file; ``folders`` caches resolved folders (one
    ``resolve`` per folder, not per file: each costs several system calls)."""
    m = gf.meta
    g = gf.grid
    folder = folders.get(gf.path.parent)
    if folder is None:
        folder = folders[gf.path.parent] = gf.path.parent.resolve()
    return {
        "filename": gf.path.name, "path": str(folder / gf.path.name),
        "format": gf.format,
        "detector": m.get("detector", ""), "raft": m.get("raft", ""), "sensor": m.get("sensor", ""),
        "obsid": m.get("obsid", ""), "obs_date": m.get("obs_date", ""), "seqnum": m.get("seqnum", -1),
        "exptime": m.get("exptime", np.nan), "bot_x": m.get("bot_x", np.nan), "bot_y": m.get("bot_y", np.nan),
        "x0": g["X0"], "y0": g["Y0"], "xstep": g["XSTEP"], "ystep": g["YSTEP"], "theta": g["THETA"],
        "ncols": g["NCOLS"], "nrows": g["NROWS"],
        "nfound": int(np.isfinite(gf.values["flux"]).sum()),
    }


def _as_paths(path_or_paths) -> list[Path]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        p = Path(path_or_paths)
        if not p.exists():
            raise InputError("no such file or directory", path=p,
                             expected="processed-grid files or a folder of them")
        return find_grid_files(p) if p.is_dir() else [p]
    paths = [Path(p) for p in path_or_paths]
    if not paths:
        raise InputError("no input files given", expected="processed-grid files or a folder of them")
    return paths


def group_by_detector(paths: Iterable[str | os.PathLike]) -> dict[str, list[Path]]:
    """Group processed-grid files by detector, using their names (or headers).

    Parameters
    ----------
    paths : iterable of path-like

    Returns
    -------
    dict
        ``{detector: [paths...]}`` in sorted detector order; files whose
        detector cannot be told are grouped under ``""``.
    """
    groups: dict[str, list[Path]] = {}
    for p in map(Path, paths):
        meta = parse_filename(p)
        if meta is None:
            meta = _meta_from_headers(p)
        groups.setdefault(meta.get("detector", ""), []).append(p)
    return dict(sorted(groups.items()))


def _meta_from_headers(p: Path) -> dict:
    """:func:`_header_meta` of a file whose name says nothing (fast reader first)."""
    try:
        ff = FitsFile(p)
        return _header_meta(p, ff.headers[:2])
    except (Unsupported, OSError, ValueError, KeyError):
        pass
    from astropy.io import fits

    try:
        with fits.open(p) as hdul:
            return _header_meta(p, [h.header for h in hdul[:2]])
    except (OSError, ValueError):
        return {}


def stack_grid_files(files: Iterable[GridFile], detector: str | None = None,
                     count: int | None = None, max_offset: float | None = DEFAULT_MAX_OFFSET) -> SpotGrids:
    """Stack :class:`GridFile` objects into a :class:`SpotGrids`, streaming.

    Each file's values are copied into the stacked arrays as it arrives, so
    a generator of files never holds more than one file's arrays at a time.
    Exposures are ordered by observation date, sequence number and file name.
    All files must share the grid size and (if known) the detector.

    Parameters
    ----------
    files : iterable of GridFile
    detector : str, optional
        The detector the files must belong to. Files that name no detector
        are assigned this one; files that name another are refused.
    count : int, optional
        Number of files, when ``files`` is a generator (avoids a list); a
        generator may yield fewer (files skipped as not processed grids).
    max_offset : float or None
        Far-match rule (see :func:`flag_points`); None switches it off.

    Raises
    ------
    InputError
        On no files, a grid-size mismatch or mixed detectors.
    """
    if count is None:
        files = list(files)
        count = len(files)
    if count == 0:
        raise InputError("no processed-grid files to stack")
    big = None
    rows, ref, folders, ambiguous = [], None, {}, []
    for j, f in enumerate(files):
        if ref is None:
            ref = f
            # (quantity, exposure, spot) in C order, so each quantity's [spot, exposure]
            # array is a Fortran-ordered view: filled by contiguous copies, no transpose
            big = np.empty((len(QUANTITIES), count, f.nspot))
        elif (err := _size_mismatch(f, ref)) is not None:
            raise err
        for iq, q in enumerate(QUANTITIES):
            big[iq, j] = f.values[q]
        rows.append(_exposure_row(f, folders))
        ambiguous.append(f.ambiguous)
    if not rows:
        raise InputError("no processed-grid files to stack")
    if len(rows) < count:
        big = big[:, : len(rows)]
    return _stacked(big, rows, ambiguous, ref.flux_column, detector, max_offset)


def _size_mismatch(f: GridFile, ref: GridFile) -> InputError | None:
    """The error for a file whose grid size differs from the run's first file (None: the same)."""
    if (f.grid["NCOLS"], f.grid["NROWS"]) == (ref.grid["NCOLS"], ref.grid["NROWS"]):
        return None
    return InputError(f"grid size {f.grid['NCOLS']} x {f.grid['NROWS']} differs from "
                      f"{ref.grid['NCOLS']} x {ref.grid['NROWS']} in {ref.path.name}", path=f.path,
                      expected="all files of one run on the same grid")


def _stacked(big: np.ndarray, rows: list, ambiguous: list, flux_column: str, detector: str | None,
             max_offset: float | None) -> SpotGrids:
    """The :class:`SpotGrids` of a filled ``(quantity, exposure, spot)`` stack, its exposure rows
    (:func:`_exposure_row`) and ambiguous spots, in reading order: detector checks, date order,
    point flags."""
    dets = sorted({r["detector"] for r in rows} - {""})
    if detector:
        if dets and dets != [detector]:
            other = [r["filename"] for r in rows if r["detector"] not in ("", detector)]
            raise InputError(f"files are from {', '.join(d for d in dets if d != detector)}, not {detector} "
                             f"(e.g. {other[0]})", expected=f"only files of {detector}, or files naming no detector")
        dets = [detector]
        for r in rows:  # files that carry no detector get the one the user gave
            if not r["detector"]:
                r["detector"] = detector
                r["raft"], r["sensor"] = (detector.split("_", 1) + [""])[:2]
    if len(dets) > 1:
        raise InputError(f"files from {len(dets)} detectors ({', '.join(dets)}); "
                         "choose one with detector=... (or --detector)")
    order = sorted(range(len(rows)), key=lambda j: (rows[j]["obs_date"], rows[j]["seqnum"], rows[j]["filename"]))
    if order != list(range(len(rows))):
        big = big[:, order, :]
        rows = [rows[j] for j in order]
        ambiguous = [ambiguous[j] for j in order]
    from astropy.table import Table

    values = {q: big[iq].T for iq, q in enumerate(QUANTITIES)}
    exposures = Table({name: np.array([r[name] for r in rows], dtype=dtype)
                       for name, dtype in _EXPOSURE_COLUMNS})
    for name, unit in _EXPOSURE_UNITS.items():
        exposures[name].unit = unit
    flags = np.zeros(values["flux"].shape, dtype=np.uint8)
    for j, k in enumerate(ambiguous):
        flags[k, j] |= POINT_FLAGS["ambiguous"]
    grids = SpotGrids(**values, exposures=exposures, flux_column=flux_column,
                      detector=dets[0] if dets else "", flags=flags)
    flag_points(grids, max_offset)
    return grids


def flag_points(grids: SpotGrids, max_offset: float | None = DEFAULT_MAX_OFFSET) -> SpotGrids:
    """Unmatch the grid points whose centroid is far from their grid position (in place).

    A point whose measured centroid lies more than ``max_offset`` grid steps
    from its grid point was "matched" to something else -- typically the
    neighbouring spot one step away, when a grid point has no spot of its
    own. Its values become NaN and its ``far`` bit is set in
    :attr:`SpotGrids.flags`.

    Parameters
    ----------
    grids : SpotGrids
    max_offset : float or None
        Fraction of the grid step (the smaller of ``xstep``, ``ystep`` of each
        exposure); None (or inf) flags nothing.

    Returns
    -------
    SpotGrids
        ``grids`` itself.
    """
    grids.meta["max_offset"] = np.inf if max_offset is None else float(max_offset)
    if max_offset is None or not np.isfinite(max_offset):
        return grids
    if max_offset <= 0:
        raise InputError(f"max_offset must be positive, got {max_offset}",
                         expected="a fraction of the grid step, e.g. 0.25")
    step = np.minimum(np.asarray(grids.exposures["xstep"], float), np.asarray(grids.exposures["ystep"], float))
    limit2 = (max_offset * step) ** 2
    far = np.empty(grids.dx.shape, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        # by blocks of exposures: no [spot, exposure]-sized float temporary; squared
        # distances (hypot guards against overflow at a cost, offsets are pixels)
        for j0 in range(0, grids.nexp, 128):
            b = slice(j0, j0 + 128)
            d2 = grids.dx[:, b] * grids.dx[:, b]
            d2 += grids.dy[:, b] * grids.dy[:, b]
            np.greater(d2, limit2[None, b], out=far[:, b])
    if far.any():
        grids.flags[far] |= POINT_FLAGS["far"]
        for q in QUANTITIES:
            getattr(grids, q)[far] = np.nan
    return grids


def read_grid_files(paths: Iterable[str | os.PathLike], flux_column: str | None = None,
                    skipped: list | None = None) -> Iterator[GridFile]:
    """Read processed-grid files one by one, skipping FITS files that are not grids.

    A file that is not a processed grid (no ``spotgrid_index`` column and no
    legacy ``X/DX/FLUX/DFLUX`` table, e.g. an earlier output catalogue left in
    the folder) is skipped with a :class:`UserWarning` naming it. Every other
    problem -- a grid file without its flux column, a damaged file -- stays an
    :class:`InputError`.

    Parameters
    ----------
    paths : iterable of path-like
    flux_column : str, optional
    skipped : list, optional
        The skipped paths are appended to it.

    Yields
    ------
    GridFile
    """
    for p in paths:
        try:
            gf = read_grid_file(p, flux_column)
        except NotAGridFile as exc:
            warnings.warn(f"{exc}; skipped", UserWarning, stacklevel=2)
            if skipped is not None:
                skipped.append(Path(p))
            continue
        yield gf


def read_grids(path_or_paths, flux_column: str | None = None, detector: str | None = None,
               progress: bool = False, max_offset: float | None = DEFAULT_MAX_OFFSET) -> SpotGrids:
    """Read processed-grid files into a stacked spot-by-exposure set.

    Parameters
    ----------
    path_or_paths : path-like or sequence of path-like
        A folder (searched recursively; non-FITS files are skipped with a
        warning), one file, or a list of files.
    flux_column : str, optional
        Flux column; see the module notes for the defaults.
    detector : str, optional
        Keep only the files of this detector (by file name or header); files
        that name no detector are assigned this one. Without it, files from
        several detectors are an error: spotflat never mixes detectors
        silently.
    progress : bool
        Show a progress bar over files (for the command line).
    max_offset : float or None
        Far-match rule in grid steps (:func:`flag_points`).

    Returns
    -------
    SpotGrids

    Examples
    --------
    >>> grids = read_grids("spotdata/")                       # doctest: +SKIP
    >>> grids.flux.shape                                      # doctest: +SKIP
    (2401, 200)
    >>> grids.exposures["filename", "bot_x", "bot_y"][:2]      # doctest: +SKIP
    """
    paths = _as_paths(path_or_paths)
    if detector:
        paths = select_detector(group_by_detector(paths), detector)
    from .progress import progress_iter as progress_bar

    skipped: list = []
    with progress_bar(paths, "Reading grid files", quiet=not progress) as bar:
        grids = stack_grid_files(read_grid_files(bar, flux_column, skipped),
                                 detector=detector, count=len(paths), max_offset=max_offset)
    grids.meta["skipped"] = [str(p) for p in skipped]
    return grids


def select_detector(groups: dict[str, list[Path]], detector: str, where=None) -> list[Path]:
    """The files of ``detector`` among ``groups`` (:func:`group_by_detector`), plus those naming none.

    Raises
    ------
    InputError
        When no file names ``detector`` and none is unnamed (the files carry
        other detectors: a conflict, not something to assign).
    """
    paths = list(groups.get(detector, [])) + list(groups.get("", []))
    if not paths:
        raise InputError(f"no files for detector {detector}", path=where,
                         expected="one of " + ", ".join(k for k in groups if k))
    return paths
