"""The per-spot calibration catalogue: spot means ``F[k]`` and exposure scales ``s[j]``.

Model (DESIGN.md section 2)::

    f[k, j] = F[k] * s[j] * T(x[k, j], y[k, j]) * noise

``F`` and ``s`` are estimated together by alternating ``F = stat_j(f / s)`` and
``s = stat_k(f / F)`` until they stop changing, with the normalisation
``median(s) = 1``. The default statistic is a sigma-clipped mean: outliers
(cosmic rays, spots cut by an edge, blends) are rejected point by point
against the current model with a robust (MAD) scale per spot, so one bad
point cannot move ``F[k]``.

The relative throughput is then ``t[k, j] = f[k, j] / (F[k] s[j])``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .errors import InputError
from .fileio import atomic_path, provenance_cards
from .grids import SpotGrids

__all__ = [
    "STATISTICS",
    "Calibration",
    "estimate_scales",
    "build_calibration",
    "write_calibration",
    "read_calibration",
]

#: Statistics accepted for ``F`` and ``s``.
STATISTICS = ("mean", "median", "clipped")

# standard error of the median of a Gaussian sample, in units of std / sqrt(n)
_MEDIAN_EFF = np.sqrt(np.pi / 2.0)


def _nanmedian(a: np.ndarray, axis: int) -> np.ndarray:
    """NaN-aware median along ``axis`` by one sort (numpy's nanmedian loops over rows)."""
    a = np.sort(np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1), axis=-1)  # NaNs sort last
    n = np.isfinite(a).sum(axis=-1)
    lo = np.maximum((n - 1) // 2, 0)[..., None]
    hi = np.maximum(n // 2, 0)[..., None]
    med = 0.5 * (np.take_along_axis(a, lo, -1) + np.take_along_axis(a, hi, -1))[..., 0]
    return np.where(n > 0, med, np.nan)


def _robust_sigma(resid: np.ndarray, axis: int) -> np.ndarray:
    """Normalised median absolute deviation along ``axis`` (NaN-aware)."""
    with np.errstate(all="ignore"):
        return 1.4826 * np.expand_dims(_nanmedian(np.abs(resid), axis), axis)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN-slice warnings: missing spots are expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def estimate_scales(flux: np.ndarray, stat: str = "clipped", sigma: float = 4.0,
                    maxiter: int = 50, tol: float = 1e-10
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """Jointly estimate spot means ``F`` and exposure scales ``s``.

    Parameters
    ----------
    flux : numpy.ndarray
        ``f[k, j]``, shape ``(nspot, nexp)``; NaN where missing.
    stat : {"clipped", "mean", "median"}
        ``clipped`` is a mean after rejecting points more than ``sigma``
        robust standard deviations (MAD) from the current model ``F s``, the
        rejection being redone at every iteration.
    sigma : float
        Clipping threshold (``stat="clipped"`` only).
    maxiter : int
        Maximum number of alternations.
    tol : float
        Stop when ``F`` and ``s`` change by less than this (relative).

    Returns
    -------
    F : numpy.ndarray
        Spot means, shape ``(nspot,)`` (NaN for spots never measured).
    s : numpy.ndarray
        Exposure scales, shape ``(nexp,)``, with ``median(s) = 1``.
    used : numpy.ndarray of bool
        Points used in the final estimate (finite and not clipped).
    niter : int
        Alternations done.
    converged : bool
        Whether ``tol`` was reached.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> F0, s0 = rng.uniform(1e4, 2e4, 50), rng.uniform(0.8, 1.2, 20)
    >>> f = F0[:, None] * s0[None, :]
    >>> F, s, used, n, ok = estimate_scales(f, stat="mean")
    >>> bool(np.allclose(F[:, None] * s[None, :], f)), float(np.median(s)), ok
    (True, 1.0, True)
    """
    if stat not in STATISTICS:
        raise InputError(f"unknown statistic {stat!r}", expected=" or ".join(STATISTICS))
    f = np.asarray(flux, dtype=np.float64)
    if f.ndim != 2:
        raise InputError(f"flux must be 2-D [spot, exposure], got shape {f.shape}")
    finite = np.isfinite(f) & (f > 0)
    if not finite.any():
        raise InputError("all fluxes are NaN or non-positive", expected="some measured spots")
    used = finite.copy()
    f0 = np.where(finite, f, 0.0)
    s = np.ones(f.shape[1])
    F = np.full(f.shape[0], np.nan)
    w = used.astype(np.float64)
    fw = f0.copy()
    converged = False
    it = 0
    for it in range(1, maxiter + 1):
        if stat == "median":
            fu = np.where(used, f, np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                F_new = _nanmedian(fu / s[None, :], 1)
                s_new = _nanmedian(fu / F_new[:, None], 0)
        else:  # masked sums as matrix-vector products: far faster than nanmean
            with np.errstate(invalid="ignore", divide="ignore"):
                F_new = (fw @ (1.0 / s)) / w.sum(axis=1)
                known = np.isfinite(F_new)
                invF = np.where(known, 1.0 / F_new, 0.0)
                s_new = (invF @ fw) / (known.astype(np.float64) @ w)
        norm = np.nanmedian(s_new)
        s_new, F_new = s_new / norm, F_new * norm
        if stat == "clipped":
            with np.errstate(invalid="ignore", divide="ignore"):
                resid = f0 * (1.0 / F_new)[:, None]
                resid *= (1.0 / s_new)[None, :]
                resid -= 1.0
            if it == 1:  # robust first pass, so gross outliers cannot inflate the scale
                scale = _robust_sigma(np.where(used, resid, np.nan), axis=1)
            else:  # then the plain std of what is kept, as in classic sigma clipping
                n = w.sum(axis=1, keepdims=True)
                with np.errstate(invalid="ignore", divide="ignore"):
                    r0 = resid * w
                    mean = r0.sum(axis=1, keepdims=True) / n
                    scale = np.sqrt(np.maximum((r0 * resid).sum(axis=1, keepdims=True) / n - mean ** 2, 0.0)
                                    * n / (n - 1))
            with np.errstate(invalid="ignore"):
                new_used = finite & ~(np.abs(resid) > sigma * np.maximum(scale, 1e-12))
        else:
            new_used = used
        with np.errstate(invalid="ignore", divide="ignore"), _quiet():
            dF = np.nanmax(np.abs(F_new / F - 1.0)) if np.isfinite(F).any() else np.inf
            ds = np.nanmax(np.abs(s_new / s - 1.0))
        F, s = F_new, s_new
        changed = not np.array_equal(new_used, used)
        if changed:
            used = new_used
            w = used.astype(np.float64)
            fw = f0 * w
        if not changed and max(dF, ds) < tol and it > 1:
            converged = True
            break
    return F, s, used, it, converged


@dataclass
class Calibration:
    """A calibration catalogue: per-spot and per-exposure tables.

    Attributes
    ----------
    spots : astropy.table.Table
        One row per grid point: ``spotgrid_index``, ``grid_col``, ``grid_row``,
        ``flux`` (``F[k]``, the chosen statistic), ``flux_err`` (its standard
        error), ``flux_std`` (scatter of ``f/s`` over dithers), ``flux_mean``,
        ``flux_median``, ``flux_clipped``, ``ndither`` (dithers used),
        ``nmeasured``, mean position ``x``, ``y`` and its scatter, mean
        ``dx``, ``dy``, ``xx``, ``yy``, ``xy``, ``t_std`` (scatter of the
        relative throughput) and ``valid`` (enough dithers).
    exposures : astropy.table.Table
        One row per exposure: the columns of :attr:`SpotGrids.exposures` plus
        ``scale`` (``s[j]``), ``scale_err``, ``nused`` and ``t_std``.
    meta : dict
        Provenance: statistic, flux column, detector, input count, ...
    """

    spots: Table
    exposures: Table
    meta: dict = field(default_factory=dict)

    @property
    def detector(self) -> str:
        """Detector name the catalogue belongs to."""
        return str(self.meta.get("DETECTOR", ""))

    @property
    def F(self) -> np.ndarray:
        """Spot means ``F[k]`` (NaN for spots that are not valid)."""
        return np.asarray(self.spots["flux"], dtype=float)

    @property
    def s(self) -> np.ndarray:
        """Exposure scales ``s[j]``."""
        return np.asarray(self.exposures["scale"], dtype=float)

    def relative_throughput(self, grids: SpotGrids, clip: bool = True) -> np.ndarray:
        """``t[k, j] = f[k, j] / (F[k] s[j])`` for matching spot data.

        Parameters
        ----------
        grids : SpotGrids
            The stacked measurements the catalogue was built from (same
            exposures, in the same order: checked by file name).
        clip : bool
            For a clipped catalogue, set points more than the catalogue's
            clipping threshold (``SIGCLIP``) robust (MAD) standard deviations
            from their spot's mean to NaN. This is the estimator's first,
            robust rejection pass; its later passes (std of the kept points)
            are not repeated, so the set can differ by a few marginal points.

        Returns
        -------
        numpy.ndarray
            Shape ``(nspot, nexp)``.
        """
        check_matches(self, grids)
        if self.meta.get("FLUXCOL") not in (None, grids.flux_column):
            raise InputError(f"spot data use flux column {grids.flux_column!r} but the catalogue "
                             f"was built from {self.meta.get('FLUXCOL')!r}")
        with np.errstate(invalid="ignore", divide="ignore"):
            t = grids.flux / (self.F[:, None] * self.s[None, :])
        t[~np.isfinite(t)] = np.nan
        if clip and self.meta.get("STAT") == "clipped":
            sig = float(self.meta.get("SIGCLIP", 4.0))
            scale = _robust_sigma(t - 1.0, axis=1)
            with np.errstate(invalid="ignore"):
                t[np.abs(t - 1.0) > sig * np.maximum(scale, 1e-12)] = np.nan
        return t


def check_matches(calib: Calibration, grids: SpotGrids) -> None:
    """Raise :class:`InputError` unless ``grids`` holds the catalogue's exposures."""
    if grids.nspot != len(calib.spots):
        raise InputError(f"spot data have {grids.nspot} grid points, the calibration {len(calib.spots)}")
    a = [str(x) for x in calib.exposures["filename"]]
    b = [str(x) for x in grids.exposures["filename"]]
    if a != b:
        missing = sorted(set(a) - set(b))[:3]
        raise InputError("spot data and calibration catalogue hold different exposures"
                         + (f" (e.g. {', '.join(missing)} is not in the spot data)" if missing else ""),
                         expected="the files the catalogue was built from")
    det = calib.detector
    if det and grids.detector and det != grids.detector:
        raise InputError(f"calibration is for {det}, spot data for {grids.detector}")


def _spot_stats(r: np.ndarray, used: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, median, clipped mean, std and count of ``r`` per spot over ``used``."""
    finite = np.isfinite(r)
    n_all = finite.sum(axis=1)
    n = used.sum(axis=1)
    r_all = np.where(finite, r, 0.0)
    ru = np.where(used, r, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        clipped = ru.sum(axis=1) / n
        var = ((ru - clipped[:, None]) ** 2 * used).sum(axis=1) / (n - 1)
        return {
            "mean": r_all.sum(axis=1) / n_all,
            "median": _nanmedian(np.where(finite, r, np.nan), 1),
            "clipped": clipped,
            "std": np.where(n > 1, np.sqrt(var), np.nan),
            "n": n,
        }


def build_calibration(grids: SpotGrids, stat: str = "clipped", min_dithers: int = 3,
                      sigma: float = 4.0, maxiter: int = 50, tol: float = 1e-10) -> Calibration:
    """Build the calibration catalogue from stacked processed-grid data.

    Parameters
    ----------
    grids : SpotGrids
        From :func:`spotflat.read_grids`.
    stat : {"clipped", "mean", "median"}
        Statistic for ``F`` and ``s`` (see :func:`estimate_scales`). The
        sigma-clipped mean is robust to the outliers real data has.
    min_dithers : int
        Spots measured (and kept) in fewer exposures get ``valid = False`` and
        NaN ``flux``: their mean is too poorly known to compare with the flat.
    sigma, maxiter, tol
        Passed to :func:`estimate_scales`.

    Returns
    -------
    Calibration

    Raises
    ------
    InputError
        When fluxes are all NaN, or fewer exposures than ``min_dithers``.

    Examples
    --------
    >>> grids = spotflat.read_grids("spotdata/")              # doctest: +SKIP
    >>> cal = spotflat.build_calibration(grids, stat="clipped", min_dithers=5)  # doctest: +SKIP
    >>> cal.spots["spotgrid_index", "flux", "flux_err", "ndither"][:3]          # doctest: +SKIP
    """
    if min_dithers < 1:
        raise InputError(f"min_dithers must be at least 1, got {min_dithers}")
    if grids.nexp < min_dithers:
        raise InputError(f"only {grids.nexp} exposure(s), fewer than min_dithers={min_dithers}",
                         expected="more dithers, or a lower --min-dithers")
    f = grids.flux
    F, s, used, niter, converged = estimate_scales(f, stat=stat, sigma=sigma, maxiter=maxiter, tol=tol)
    with np.errstate(invalid="ignore", divide="ignore"):
        fs = f / s[None, :]
        t = f / (F[:, None] * s[None, :])
    st = _spot_stats(fs, used)
    n = st["n"]
    eff = _MEDIAN_EFF if stat == "median" else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        flux_err = eff * st["std"] / np.sqrt(n)
    valid = (n >= min_dithers) & np.isfinite(F)
    ncols, nrows = grids.grid_shape
    k = np.arange(grids.nspot)

    nused = used.sum(axis=1)

    def mean_used(a: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(used, a, 0.0).sum(axis=1) / nused

    def std_used(a: np.ndarray) -> np.ndarray:
        a0 = np.where(used, a, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = a0.sum(axis=1) / nused
            return np.sqrt(np.maximum((a0 * a0).sum(axis=1) / nused - m * m, 0.0))

    spots = Table()
    spots["spotgrid_index"] = k
    spots["grid_col"] = k // nrows
    spots["grid_row"] = k % nrows
    spots["flux"] = np.where(valid, F, np.nan)
    spots["flux_err"] = np.where(valid, flux_err, np.nan)
    spots["flux_std"] = st["std"]
    spots["flux_mean"] = st["mean"]
    spots["flux_median"] = st["median"]
    spots["flux_clipped"] = st["clipped"]
    spots["ndither"] = n.astype(np.int64)
    spots["nmeasured"] = np.isfinite(f).sum(axis=1).astype(np.int64)
    spots["x"] = mean_used(grids.x)
    spots["y"] = mean_used(grids.y)
    spots["x_std"] = std_used(grids.x)
    spots["y_std"] = std_used(grids.y)
    for q in ("dx", "dy", "xx", "yy", "xy"):
        spots[q] = mean_used(getattr(grids, q))
    spots["t_std"] = std_used(t)
    spots["valid"] = valid
    units = {"flux": "ct", "flux_err": "ct", "flux_std": "ct", "flux_mean": "ct", "flux_median": "ct",
             "flux_clipped": "ct", "x": "pix", "y": "pix", "x_std": "pix", "y_std": "pix",
             "dx": "pix", "dy": "pix", "xx": "pix2", "yy": "pix2", "xy": "pix2"}
    for name, unit in units.items():
        spots[name].unit = unit
    spots["flux"].description = f"F[k], {stat} of f/s over dithers"

    exposures = grids.exposures.copy()
    with _quiet():
        r = np.where(used & valid[:, None], f / F[:, None], np.nan)
        nused = np.isfinite(r).sum(axis=0)
        s_std = np.nanstd(r, axis=0, ddof=1)
        exposures["scale"] = s
        # s[j] is an average over spots of f/F: the fixed response pattern the
        # spots sample is common to all exposures and cancels, so only the
        # measurement noise moves s. Use the measured flux errors when the
        # files give them; otherwise the scatter over spots (conservative).
        rel = grids.flux_err / f
        m = used & valid[:, None] & np.isfinite(rel)
        measured = m.sum() >= 0.9 * (used & valid[:, None]).sum() and m.any()
        if measured:
            n_m = m.sum(axis=0)
            exposures["scale_err"] = eff * s * np.sqrt(np.where(m, rel ** 2, 0.0).sum(axis=0)) / n_m
            n_k = m.sum(axis=1)
            spots["flux_err_stat"] = np.where(valid, eff * F * np.sqrt(np.where(m, rel ** 2, 0.0).sum(axis=1))
                                              / n_k, np.nan)
        else:
            exposures["scale_err"] = eff * s_std / np.sqrt(nused)
            spots["flux_err_stat"] = np.full(len(F), np.nan)
        spots["flux_err_stat"].unit = "ct"
        spots["flux_err_stat"].description = "error of F[k] from the measured flux errors only"
        exposures["nused"] = nused.astype(np.int64)
        exposures["t_std"] = np.nanstd(np.where(used & valid[:, None], t, np.nan), axis=0)
    exposures["scale"].description = "s[j], exposure scale, median(s) = 1"

    paths = [Path(p) for p in grids.exposures["path"]]
    common = os.path.commonpath([str(p.parent) for p in paths]) if paths else ""
    meta = {
        "DETECTOR": grids.detector,
        "NINPUT": grids.nexp,
        "NSPOT": grids.nspot,
        "NVALID": int(valid.sum()),
        "STAT": stat,
        "FLUXCOL": grids.flux_column,
        "MINDITH": int(min_dithers),
        "SIGCLIP": float(sigma),
        "NITER": int(niter),
        "CONVERGD": bool(converged),
        "INPUTDIR": common,
        "SERRMETH": "measured" if measured else "scatter",
    }
    return Calibration(spots=spots, exposures=exposures, meta=meta)


def _hdu(table: Table, name: str) -> fits.BinTableHDU:
    hdu = fits.table_to_hdu(table)
    hdu.name = name
    return hdu


def write_calibration(calib: Calibration, path: str | os.PathLike, ecsv: bool = False,
                      overwrite: bool = True) -> list[Path]:
    """Write the catalogue as FITS (and optionally ECSV), atomically.

    The FITS file has a primary HDU with provenance (package version, date,
    detector, statistic, flux column, input count, ...) and the HDUs
    ``SPOTS`` and ``EXPOSURES``. With ``ecsv=True`` two ECSV files are
    written beside it, ``<stem>_spots.ecsv`` and ``<stem>_exposures.ecsv``,
    carrying the same metadata.

    Parameters
    ----------
    calib : Calibration
    path : str or os.PathLike
        Output FITS file.
    ecsv : bool
        Also write the ECSV pair.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    path = Path(path)
    cards = provenance_cards(**calib.meta)
    primary = fits.PrimaryHDU()
    for key, value in cards.items():
        primary.header[key] = value
    primary.header["COMMENT"] = "spotflat calibration catalogue: HDU SPOTS (F[k]) and EXPOSURES (s[j])"
    spots, exposures = calib.spots.copy(), calib.exposures.copy()
    spots.meta, exposures.meta = {}, {}
    hdul = fits.HDUList([primary, _hdu(spots, "SPOTS"), _hdu(exposures, "EXPOSURES")])
    written = []
    with atomic_path(path, overwrite=overwrite) as tmp:
        hdul.writeto(tmp)
    written.append(path)
    if ecsv:
        for name, table in (("spots", calib.spots), ("exposures", calib.exposures)):
            out = path.with_name(f"{path.stem}_{name}.ecsv")
            t = table.copy()
            t.meta = dict(cards)
            with atomic_path(out, overwrite=overwrite) as tmp:
                t.write(tmp, format="ascii.ecsv")
            written.append(out)
    return written


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Read a catalogue written by :func:`write_calibration` (FITS or ECSV).

    Parameters
    ----------
    path : str or os.PathLike
        The FITS file, or the ``<stem>_spots.ecsv`` of an ECSV pair.

    Returns
    -------
    Calibration

    Raises
    ------
    InputError
        When the file is missing, unreadable or not a spotflat calibration.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path=path, expected="a calibration catalogue")
    try:
        if path.suffix == ".ecsv":
            spots = Table.read(path, format="ascii.ecsv")
            exp_path = path.with_name(path.name.replace("_spots.ecsv", "_exposures.ecsv"))
            exposures = Table.read(exp_path, format="ascii.ecsv")
            meta = dict(spots.meta)
            spots.meta, exposures.meta = {}, {}
        else:
            with fits.open(path) as hdul:
                if "SPOTS" not in hdul or "EXPOSURES" not in hdul:
                    raise InputError("not a spotflat calibration catalogue", path=path,
                                     expected="HDUs SPOTS and EXPOSURES")
                meta = {k: v for k, v in hdul[0].header.items()
                        if k not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "COMMENT", "")}
            spots = Table.read(path, hdu="SPOTS")
            exposures = Table.read(path, hdu="EXPOSURES")
            spots.meta, exposures.meta = {}, {}
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read calibration catalogue ({exc})", path=path) from None
    for t in (spots, exposures):
        for name in t.colnames:
            if t[name].dtype.kind == "S":
                t[name] = t[name].astype(str)
    missing = [c for c in ("spotgrid_index", "flux", "flux_err") if c not in spots.colnames] + \
              [c for c in ("filename", "scale") if c not in exposures.colnames]
    if missing:
        raise InputError(f"calibration catalogue lacks columns {', '.join(missing)}", path=path)
    return Calibration(spots=spots, exposures=exposures, meta=meta)
