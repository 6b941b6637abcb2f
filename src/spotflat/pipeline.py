"""One ``run`` per stage: the correlate stage as a function over files.

:func:`run_correlate` is what ``spotflat correlate`` does for one detector:
read the calibration catalogue, the spot data and the flat, compare them,
correlate each requested quantity with honest errors, and write the results
table, the per-point residuals, summaries and figures. Notebooks can call the
pieces (:func:`correlate_quantities`, :func:`write_figures`) directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .calibration import Calibration, read_calibration
from .compare import Comparison, compare_spots_flat, summarize_by_amp, summarize_by_distance
from .derivatives import REGRESSORS
from .errors import InputError
from .fileio import atomic_path, fits_safe, fits_table_safe, make_output_dir, provenance_cards, staged_outputs
from .grids import SpotGrids, read_grids

__all__ = [
    "QUANTITY_PAIRS",
    "CorrelateResult",
    "load_spot_data",
    "quantity_pair",
    "correlate_quantities",
    "run_correlate",
    "write_outputs",
    "write_figures",
]

#: quantity -> its regressor (the ``against`` column; DESIGN.md section 2, issue 12 item 5):
#: the flux against q, centroid shifts against the flat's gradient, second moments against
#: its second derivatives (spotflat.derivatives.REGRESSORS)
QUANTITY_PAIRS = {
    "flux": "q",
    "dx": "dqdx",
    "dy": "dqdy",
    "size": "lapq",
    "xx-yy": "d2q_xx-yy",
    "xy": "d2qdxdy",
    "xx": "d2qdx2",
    "yy": "d2qdy2",
}


def load_spot_data(calib: Calibration, spotdata: str | os.PathLike | None = None,
                   progress: bool = False) -> SpotGrids:
    """The spot data a catalogue was built from.

    Parameters
    ----------
    calib : Calibration
    spotdata : path-like, optional
        Folder of processed-grid files. When omitted, the exact files listed
        in the catalogue's ``EXPOSURES.path`` column are read.
    progress : bool
        Progress bar over files.

    Returns
    -------
    SpotGrids
        Restricted to (and ordered like) the catalogue's exposures.
    """
    det = calib.detector or None
    flux_column = calib.meta.get("FLUXCOL") or None
    if spotdata is None:
        paths = [Path(p) for p in calib.exposures["path"]]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise InputError("input file recorded in the calibration catalogue is missing", path=missing[0],
                             expected="the spot data at the recorded path, or give SPOTDATA_DIR")
    else:
        from .grids import find_grid_files, group_by_detector

        found = find_grid_files(spotdata)
        groups = group_by_detector(found)
        candidates = groups.get(det, []) + groups.get("", []) if det else found
        wanted = {str(n) for n in calib.exposures["filename"]}
        paths = [p for p in candidates if p.name in wanted]
        missing = sorted(wanted - {p.name for p in paths})
        if missing:
            raise InputError(f"{len(missing)} exposure(s) of the catalogue are not in the spot data "
                             f"(e.g. {missing[0]})", path=spotdata)
    return read_grids(paths, flux_column=flux_column, detector=det, progress=progress)


def _centre_per_spot(v: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Deviation of each point from its spot's mean over the valid points."""
    v0 = np.where(valid, v, 0.0)
    n = valid.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, v - v0.sum(axis=1, keepdims=True) / n, np.nan)


def quantity_pair(comp: Comparison, quantity: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The two ``[spot, exposure]`` arrays correlated for ``quantity``.

    ``flux`` is ``t`` against ``q``. Centroid shifts ``dx``, ``dy`` are
    compared with the flat's gradient along the same axis; the second
    moments with the flat's second derivatives over the same footprint
    (:mod:`spotflat.derivatives`): ``size = xx + yy`` with the Laplacian,
    ``xx - yy`` with ``d2q/dx2 - d2q/dy2``, ``xy`` with ``d2q/dxdy``, ``xx``
    and ``yy`` with ``d2q/dx2`` and ``d2q/dy2``. Every quantity other than
    ``t`` is taken relative to its own spot's mean (a spot's mean shift or
    size is a property of the projector, not of the pixels), and so is each
    regressor; ``size``, ``xx``, ``yy`` are relative changes (divided by the
    spot's mean), ``xx - yy`` and ``xy`` changes in pix**2.

    Returns
    -------
    a, b : numpy.ndarray
    against : str
        Name of ``b``.
    """
    if quantity not in QUANTITY_PAIRS:
        raise InputError(f"unknown quantity {quantity!r}", expected=", ".join(QUANTITY_PAIRS))
    against = QUANTITY_PAIRS[quantity]
    valid = comp.valid
    if against == "q":
        b = comp.q
    elif against in ("dqdx", "dqdy"):
        if comp.dqdx is None:
            raise InputError(f"quantity {quantity!r} needs the flat gradient (gradient=True)")
        b = _centre_per_spot(comp.dqdx if against == "dqdx" else comp.dqdy, valid)
    else:
        if comp.hessian is None:
            raise InputError(f"quantity {quantity!r} needs the flat's second derivatives (hessian=True)")
        b = _centre_per_spot(comp.hessian.regressor(against), valid & np.isfinite(comp.hessian.dxx))
    if quantity == "flux":
        a = comp.t
    else:
        g = comp.grids
        raw = g.quantity("xx") - g.quantity("yy") if quantity == "xx-yy" else g.quantity(quantity)
        ok = valid & np.isfinite(raw)
        if ok.sum() < 3:
            raise InputError(f"quantity {quantity!r} is not measured in the spot data")
        a = _centre_per_spot(raw, ok)
        if quantity in ("size", "xx", "yy"):  # relative size change
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.nanmean(np.where(ok, raw, np.nan), axis=1, keepdims=True)
                a = a / mean
    return a, b, against


@dataclass
class CorrelateResult:
    """Everything the correlate stage produces for one detector.

    Attributes
    ----------
    results : astropy.table.Table
        One row per quantity and component (``all``, ``amp``, ``within``):
        ``quantity``, ``against``, ``component``, the recommended ``r``,
        ``r_err``, ``r_low``, ``r_high`` (95 %), ``p_value``, ``slope``
        (corrected for the flat's noise), ``slope_err``, ``slope_low``,
        ``slope_high``; then ``slope_raw``, ``reliability``, ``ndof``,
        ``nunit``, ``nspot``, ``npoint``, ``error_method`` and the
        method-specific columns (bootstrap, jackknife, block, null,
        permutation); for the shape rows (regressed on the flat's second
        derivatives) ``regressor_reliability``, ``1 - var(noise) / var``
        of the regressor from the flat's photon noise (their slope is not
        corrected for it).
    comparison : Comparison
    stats : dict
        ``quantity -> CorrelationResult``.
    variance : dict
        Variance decomposition of ``t`` (flat-explained vs not).
    amp_summary, boundary_summary : astropy.table.Table
    files : list of pathlib.Path
        Files written (empty until :func:`write_outputs`).
    components : dict
        ``quantity -> list of ComponentResult``.
    removed_figures : list of pathlib.Path
        Stale spotflat figures of an earlier run removed by :func:`write_figures`.
    """

    results: Table
    comparison: Comparison
    stats: dict
    variance: dict
    amp_summary: Table
    boundary_summary: Table | None
    files: list = field(default_factory=list)
    components: dict = field(default_factory=dict)
    removed_figures: list = field(default_factory=list)
    verdict: object = None  # spotflat.verdict.Verdict: QE or pixel area, per feature (issue 14)


def _components_for(quantity: str) -> tuple[str, ...]:
    """Components of a quantity: amplifier steps only make sense for the flux."""
    return ("all", "amp", "within") if quantity == "flux" else ("all", "within")


def correlate_quantities(comp: Comparison, quantities=("flux",), nboot: int = 1000, nnull: int = 1000,
                         block: str = "amp", patch_size: int = 10, seed: int = 0,
                         method: str = "pearson", progress: bool = False) -> tuple[Table, dict, dict]:
    """Correlate each quantity with its flat counterpart (see :func:`quantity_pair`), by component.

    With a known detector every quantity is split into components
    (:func:`spotflat.components.analyse_components`): ``all`` (every point,
    errors from a block jackknife over amplifiers), ``amp`` (amplifier-level
    steps, flux only) and ``within`` (within-amplifier structure, seams and
    illumination removed). Without a detector only the classic analysis of
    :func:`spotflat.stats.correlation_analysis` is possible (a block
    jackknife over patches of ``patch_size``: without a detector there are no
    amplifiers) and its block-jackknife errors become the recommended ones.
    ``block`` (``amp`` or ``patch``) chooses the blocks of the ``all`` row's
    method-specific block jackknife (``r_err_block``, ``slope_err_block``);
    the recommended errors of every row have their own blocks and do not
    depend on it.

    Returns
    -------
    results : astropy.table.Table
        One row per quantity and component; the recommended columns
        (:data:`spotflat.components.RECOMMENDED_COLUMNS`) first.
    stats : dict
        ``quantity -> CorrelationResult`` of the ``all`` row (method-specific).
    components : dict
        ``quantity -> list of ComponentResult``.
    """
    from .components import _from_block, analyse_components
    from .progress import progress_bar
    from .stats import correlation_analysis

    ncols, nrows = comp.grids.grid_shape
    rows, out, parts = [], {}, {}
    noise_h = None
    rng = np.random.SeedSequence(seed)
    ntask = sum(len(_components_for(q)) for q in quantities) if comp.detector else len(quantities)
    with progress_bar(ntask, f"Resampling ({nboot} bootstrap, {nnull} null)", show=progress) as advance:
        for quantity, child in zip(quantities, rng.spawn(len(quantities))):
            a, b, against = quantity_pair(comp, quantity)
            crng = np.random.default_rng(child)
            if comp.detector:
                res_list, raw = analyse_components(
                    a, b, detector=comp.detector, x=comp.x, y=comp.y, grid_shape=(nrows, ncols),
                    components=_components_for(quantity), spot_amp=comp.spot_amp_labels(),
                    footprint_sigma=comp.footprint_sigma, footprint_radius=comp.footprint_radius,
                    flat_electrons=comp.flat_electrons, b_is_flat=against == "q" and quantity == "flux",
                    nboot=nboot, nnull=nnull, patch_size=patch_size, block=block, seed=crng,
                    method=method, progress=advance)
                out[quantity] = raw["all"]
            else:
                res = correlation_analysis(a, b, grid_shape=(nrows, ncols), block="patch",
                                           patch_size=patch_size, nboot=nboot, nnull=nnull, seed=crng,
                                           method=method)
                res_list = [_from_block("all", res, 1.0, res.confidence, "all points")]
                out[quantity] = res
                advance(1)
            parts[quantity] = res_list
            extra = {}
            if against in REGRESSORS:  # the flat's noise in its second derivatives (no EIV fix)
                noise_h = noise_h or _noise_hessian(comp, seed)
                if noise_h is not None:
                    extra["regressor_reliability"] = _reliability(b, noise_h.regressor(against))
            for cr in res_list:
                row = {"quantity": quantity, "against": against}
                row.update(cr.as_row())
                row.update(extra)
                rows.append(row)
    return _rows_table(rows), out, parts


def _noise_hessian(comp: Comparison, seed: int):
    """Second derivatives of the flat's photon noise alone at the valid points (None if unknown)."""
    from .derivatives import noise_hessian
    from .geometry import ccd_shape

    if not comp.flat_electrons or comp.hessian is None:
        return None
    v = comp.valid & np.isfinite(comp.hessian.dxx)
    shape = (tuple(ccd_shape(comp.detector)) if comp.detector
             else (int(np.nanmax(comp.y)) + 8, int(np.nanmax(comp.x)) + 8))
    sig = None if comp.footprint_sigma is None else np.broadcast_to(comp.footprint_sigma[:, None], v.shape)[v]
    return noise_hessian(shape, comp.x[v], comp.y[v], comp.flat_electrons, sigma=sig,
                         radius=comp.footprint_radius, seed=np.random.default_rng([seed, 12])).scattered(v)


def _reliability(b: np.ndarray, noise: np.ndarray) -> float:
    """``1 - var(noise) / var(b)`` over the points, both centred per spot like ``b``."""
    ok = np.isfinite(b) & np.isfinite(noise)
    n = _centre_per_spot(noise, ok)
    vb, vn = float(np.var(b[ok])), float(np.var(n[ok]))
    return 1.0 - vn / vb if vb > 0 else float("nan")


_STRING_COLUMNS = ("quantity", "against", "component", "error_method", "block", "method")


def _rows_table(rows: list[dict]) -> Table:
    """One table from rows with different extras (missing numbers NaN, missing strings empty)."""
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    cols = {}
    for name in names:
        if name in _STRING_COLUMNS:
            cols[name] = np.array([str(row.get(name, "")) for row in rows])
        else:
            cols[name] = np.array([row.get(name, np.nan) for row in rows], dtype=float)
            if name in ("ndof", "nunit", "nspot", "npoint", "nblocks", "nnull"):
                cols[name] = np.nan_to_num(cols[name], nan=-1).astype(np.int64)
    return Table(cols, names=names)


def run_correlate(calib: Calibration | str | os.PathLike, flat: np.ndarray | str | os.PathLike,
                  spotdata: str | os.PathLike | None = None, quantities=("flux",), nboot: int = 1000,
                  nnull: int = 1000, block: str = "amp", patch_size: int = 10, seed: int = 0,
                  method: str = "pearson", normalize: str = "ccd", sigma="moments",
                  radius: float | None = None, progress: bool = False, weight: str = "auto",
                  flat_electrons: float | None = None) -> CorrelateResult:
    """Compare one detector's spots with its flat and correlate them.

    Parameters
    ----------
    calib : Calibration or path-like
        Catalogue from ``spotflat calibrate``.
    flat : numpy.ndarray or path-like
        The flat (any form :func:`spotflat.read_flat` reads), or an already
        normalised array.
    spotdata : path-like, optional
        Folder of the spot data; default: the files the catalogue records.
    quantities : sequence of str
        Keys of :data:`QUANTITY_PAIRS`.
    nboot, nnull : int
        Bootstrap and null resamples (the null count is also the number of
        permutations of the amplifier levels).
    block : {"amp", "patch"}
        Blocks of the ``all`` row's method-specific block jackknife
        (``r_err_block``, ``slope_err_block``, recorded as ``BLOCK``):
        amplifiers or patches of ``patch_size``; without a detector always
        patches. The recommended errors do not depend on it.
    patch_size : int
        Patch size (grid steps) of the ``within`` block jackknife.
    seed : int
        Seeds all resampling (one independent stream per quantity).
    method : {"pearson", "spearman"}
    normalize : {"ccd", "amp"}
        Flat normalisation when ``flat`` is a file. ``amp`` divides each
        amplifier by its own mean, which turns the CCOB illumination gradient
        into steps at the seams; keep ``ccd`` for an illuminated flat.
    sigma, radius, weight
        Spot footprint (see :func:`spotflat.compare.compare_spots_flat`).
    progress : bool
        Progress bars while reading and resampling.
    flat_electrons : float, optional
        Electrons per pixel of the flat, for the errors-in-variables
        correction of the slope; default: the flat's level times its
        header ``GAIN`` (electrons when there is none), unknown for a flat
        normalised before it was written (and for an array) -- the slope is
        then left uncorrected (``reliability = 1``).

    Returns
    -------
    CorrelateResult
    """
    from .eiv import flat_electrons as _electrons
    from .flats import check_flat_varies, load_flat
    from .stats import variance_decomposition

    if not isinstance(calib, Calibration):
        calib = read_calibration(calib)
    grids = load_spot_data(calib, spotdata, progress=progress)
    electrons = _electrons(None, None, flat_electrons) if flat_electrons is not None else None
    flat_path = None if isinstance(flat, np.ndarray) else flat
    if not isinstance(flat, np.ndarray):
        image = load_flat(flat, normalize=normalize, detector=calib.detector or None)
        flat = image.data
        if electrons is None:
            electrons = _electrons(image.levels, image.header)
    check_flat_varies(flat, flat_path)
    comp = compare_spots_flat(calib, grids, flat, sigma=sigma, radius=radius, weight=weight,
                              detector=calib.detector or None,
                              gradient=any(QUANTITY_PAIRS.get(q) in ("dqdx", "dqdy") for q in quantities),
                              hessian=any(QUANTITY_PAIRS.get(q) in REGRESSORS for q in quantities))
    comp.flat_electrons = electrons
    results, stats, parts = correlate_quantities(comp, quantities, nboot=nboot, nnull=nnull, block=block,
                                                 patch_size=patch_size, seed=seed, method=method,
                                                 progress=progress)
    variance = variance_decomposition(comp.t, comp.q)
    amp = summarize_by_amp(comp) if comp.detector else Table()
    boundary = summarize_by_distance(comp, "any") if comp.detector else None
    meta = provenance_cards(DETECTOR=comp.detector, NBOOT=nboot, NNULL=nnull, BLOCK=block, SEED=seed,
                            METHOD=method, NSPOT=comp.nspot, NPOINT=comp.npoint,
                            FLATELEC=float(electrons) if electrons is not None else -1.0, **comp.meta)
    results.meta.update(meta)
    from .verdict import correlate_hook

    return CorrelateResult(results=results, comparison=comp, stats=stats, variance=variance,
                           amp_summary=amp, boundary_summary=boundary, components=parts,
                           verdict=correlate_hook(comp, flat, nboot=min(nboot, 100), seed=seed))


def _write_table(table: Table, path: Path, fmt: str) -> Path:
    with atomic_path(path) as tmp:
        if fmt == "fits":
            hdu = fits.table_to_hdu(fits_table_safe(table))
            primary = fits.PrimaryHDU()
            for k, v in table.meta.items():
                if len(str(k)) <= 8 and isinstance(v, (str, int, float, bool)):
                    primary.header[str(k)] = fits_safe(v)
            hdu.header["EXTNAME"] = path.stem.upper()
            fits.HDUList([primary, hdu]).writeto(tmp)
        else:
            table.write(tmp, format="ascii.ecsv")
    return path


def write_outputs(res: CorrelateResult, outdir: str | os.PathLike, figures: bool = True) -> list[Path]:
    """Write the results, residuals, summaries and figures into ``outdir``.

    Files: ``results.ecsv``, ``results.fits``, ``residuals.fits``,
    ``amp_summary.ecsv``, ``boundary_summary.ecsv``, ``variance.ecsv`` and
    the PNG figures of :func:`write_figures`.

    Parameters
    ----------
    res : CorrelateResult
    outdir : str or os.PathLike
        Created if needed.
    figures : bool
        Also write the PNG figures.

    Returns
    -------
    list of pathlib.Path
        The files written (each atomically).
    """
    with staged_outputs():  # all files appear together, or none (and no new empty folder)
        return _write_outputs(res, make_output_dir(outdir), figures)


def _write_outputs(res: CorrelateResult, outdir: Path, figures: bool) -> list[Path]:
    meta = dict(res.results.meta)
    files = [
        _write_table(res.results, outdir / "results.ecsv", "ecsv"),
        _write_table(res.results, outdir / "results.fits", "fits"),
    ]
    resid = res.comparison.residual_table()
    resid.meta.update(meta)
    files.append(_write_table(resid, outdir / "residuals.fits", "fits"))
    if len(res.amp_summary):
        res.amp_summary.meta.update(meta)
        files.append(_write_table(res.amp_summary, outdir / "amp_summary.ecsv", "ecsv"))
    if res.boundary_summary is not None:
        res.boundary_summary.meta.update(meta)
        files.append(_write_table(res.boundary_summary, outdir / "boundary_summary.ecsv", "ecsv"))
    if res.verdict is not None:  # QE or pixel area (spotflat.verdict)
        files += res.verdict.write(outdir, meta)
    var = Table(rows=[{k: v for k, v in res.variance.items() if np.isscalar(v)}])
    var.meta.update(meta)
    files.append(_write_table(var, outdir / "variance.ecsv", "ecsv"))
    if figures:
        files += write_figures(res, outdir)
    res.files = files
    return files


def write_figures(res: CorrelateResult, outdir: str | os.PathLike, bin: int | None = None,
                  extra: dict | None = None) -> list[Path]:
    """PNG figures: spot flux map, t / q / residual maps, t vs q, histogram, per-amp bars, ...

    The figures (:func:`spotflat.figures.render_figures`) are staged and
    moved into ``outdir`` together; spotflat figures of an earlier run in
    ``outdir`` that this run does not make are removed and listed in
    ``res.removed_figures`` (a user's other files are never touched).

    Parameters
    ----------
    res : CorrelateResult
    outdir : str or os.PathLike
    bin : int, optional
        Bin size of the maps (pixels); default chosen from the residual's
        signal and noise.
    extra : dict, optional
        Further figures (file name -> Figure) written in the same set.

    Returns
    -------
    list of pathlib.Path
        The PNG files written (a :class:`spotflat.figures.FigureFiles`).
    """
    from .figures import render_figures, write_figure_set

    figs = render_figures(res, bin=bin)
    figs.update(extra or {})
    files = write_figure_set(figs, outdir)
    res.removed_figures = list(files.removed)
    return files


def _expected_rms(comp: Comparison) -> float | None:
    """Noise expected in ``d`` from the measured flux errors, when the files give them."""
    f, e = comp.grids.flux, comp.grids.flux_err
    ok = comp.valid & np.isfinite(e) & (f > 0)
    if ok.sum() < 10:
        return None
    return float(np.sqrt(np.mean((e[ok] / f[ok]) ** 2)))
