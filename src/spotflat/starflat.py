"""A response map from the spots alone (a "star flat").

With dithers, the same pixels are visited by different spots, so the model

    log f[k, j] = log F[k] + log s[j] + log R(x[k, j], y[k, j])

can be solved for a binned map ``R`` by weighted least squares, jointly
with the spot means ``F`` and the exposure scales ``s``. The weights are the
inverse variances of ``log f`` from the catalogues' flux errors. The solve is
exact and direct: the design is sparse (three ones per point), and its
normal equations reduce block by block -- ``F`` (a diagonal block) and
``s`` (a small dense one) are eliminated, leaving a dense system over the
map bins, solved by Cholesky. (An iterative LSMR over the millions of
points gave the same answer 10x slower.)

What the dithers do not constrain
---------------------------------
Some combinations of ``R`` are degenerate with ``F`` and ``s``:

* the global level (``R -> c R``, ``F -> F / c``): the **gauge**, fixed here
  explicitly by normalising ``R`` to mean 1 over the constrained bins;
* any mode longer than the dither box: when each spot stays inside its own
  box (dithers within one grid cell), the mean of ``R`` over the box is
  indistinguishable from the spot's own brightness ``F[k]``; two areas that
  no spot visits together are also free relative to each other.

These are found exactly, not guessed: ``F`` and ``s`` are profiled out of
the normal equations, leaving a symmetric matrix ``M`` over the map bins
whose eigenvectors with (numerically) zero eigenvalue are the degenerate
modes. A bin that has weight on any degenerate mode other than the global
level is **unconstrained**: it is reported as NaN, never filled in. The
covariance of the constrained bins is the pseudo-inverse of ``M`` on the
rest, in the gauge ``mean(log R) = 0`` over those bins.

Map bins follow the DM convention: bin ``(i, j)`` covers CCD ``x`` in
``[i B, (i + 1) B)`` and ``y`` in ``[j B, (j + 1) B)`` and is stored at
array index ``[j, i]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .errors import InputError

__all__ = ["StarFlat", "solve_starflat", "bin_image", "compare_with_flat", "FlatComparison"]

#: eigenvalues below this fraction of the largest count as degenerate
EIG_TOL = 1e-9
#: a bin with more than this squared weight on a degenerate mode is unconstrained
NULL_WEIGHT_TOL = 1e-6


@dataclass
class StarFlat:
    """A response map solved from the spots alone.

    Attributes
    ----------
    response : numpy.ndarray
        ``(nby, nbx)`` map ``R`` normalised to mean 1 over the constrained
        bins; NaN where unconstrained or not visited.
    response_err : numpy.ndarray
        1-sigma error of ``response`` (NaN where ``response`` is).
    coverage : numpy.ndarray
        ``(nby, nbx)`` int: points (spot x exposure) used in each bin.
    nspot_bin : numpy.ndarray
        ``(nby, nbx)`` int: distinct spots that visited each bin.
    constrained : numpy.ndarray
        Boolean ``(nby, nbx)``: bins the dithers determine.
    binsize : int
        Bin size ``B``, pixels.
    shape : tuple of int
        CCD ``(ny, nx)``.
    F, F_err : numpy.ndarray
        ``(nspot,)`` fitted spot means (NaN for spots not used), in the
        gauge of ``response``.
    s : numpy.ndarray
        ``(nexp,)`` fitted exposure scales, ``median(s) = 1``.
    used : numpy.ndarray
        Boolean ``(nspot, nexp)``: points that entered the final fit.
    chi2, dof : float
        Weighted residual sum of squares of the final fit and its degrees
        of freedom (points minus independent parameters).
    err_scale : float
        Factor applied to the errors: ``sqrt(chi2 / dof)`` when that exceeds
        1 and ``scale_errors`` is on (else 1).
    ndegenerate : int
        Degenerate modes besides the global level.
    niter : int
        Direct solves made (one, plus one per clipping round that dropped points).
    dither_box : tuple of float
        Peak-to-peak spread of the grid origins over exposures, ``(x, y)``
        pixels: the dithers constrain scales up to about this size.
    amp_gains, amp_gains_err : dict
        Fitted per-amplifier factors (only with ``per_amp``).
    covariance : numpy.ndarray
        Covariance of ``log R`` over the constrained bins (in the order of
        ``numpy.flatnonzero(constrained)``), after ``err_scale``.
    meta : dict
        Provenance for the output headers.
    """

    response: np.ndarray = field(repr=False)
    response_err: np.ndarray = field(repr=False)
    coverage: np.ndarray = field(repr=False)
    nspot_bin: np.ndarray = field(repr=False)
    constrained: np.ndarray = field(repr=False)
    binsize: int
    shape: tuple
    F: np.ndarray = field(repr=False)
    F_err: np.ndarray = field(repr=False)
    s: np.ndarray = field(repr=False)
    used: np.ndarray = field(repr=False)
    chi2: float
    dof: float
    err_scale: float
    ndegenerate: int
    dither_box: tuple
    niter: int
    amp_gains: dict = field(default_factory=dict)
    amp_gains_err: dict = field(default_factory=dict)
    covariance: np.ndarray | None = field(default=None, repr=False)
    meta: dict = field(default_factory=dict, repr=False)

    @property
    def nconstrained(self) -> int:
        """Number of constrained bins."""
        return int(self.constrained.sum())

    @property
    def nvisited(self) -> int:
        """Number of bins any used point fell in."""
        return int((self.coverage > 0).sum())

    @property
    def chi2_dof(self) -> float:
        """``chi2 / dof`` of the fit."""
        return float(self.chi2 / self.dof) if self.dof > 0 else float("nan")

    def bin_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin edges in CCD ``x`` and ``y`` (pixels, DM convention)."""
        nby, nbx = self.response.shape
        return np.arange(nbx + 1) * self.binsize, np.arange(nby + 1) * self.binsize

    def summary(self) -> str:
        """One paragraph for a terminal."""
        dx, dy = self.dither_box
        return (f"star flat: {self.nconstrained} of {self.nvisited} visited {self.binsize}-px bins constrained, "
                f"{self.ndegenerate} degenerate mode(s) masked; dither box {dx:.0f} x {dy:.0f} px; "
                f"chi2/dof = {self.chi2_dof:.3f} ({int(self.used.sum())} points, err scale {self.err_scale:.3f})")


def _map_shape(shape: tuple[int, int], binsize: int) -> tuple[int, int]:
    ny, nx = shape
    return -(-int(ny) // binsize), -(-int(nx) // binsize)


def bin_image(image: np.ndarray, binsize: int, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean of an image over the map bins (pixel ``ix`` belongs to bin ``ix // B``).

    Parameters
    ----------
    image : numpy.ndarray
        ``(ny, nx)`` image in the DM orientation (e.g. a normalised flat).
    binsize : int
        Bin size ``B``, pixels.
    valid : numpy.ndarray, optional
        Pixels to use (default: the finite ones).

    Returns
    -------
    mean, err : numpy.ndarray
        ``(ceil(ny / B), ceil(nx / B))`` bin means and their standard errors
        (pixel scatter / sqrt(n)); NaN in bins without valid pixels.

    Examples
    --------
    >>> m, e = bin_image(np.arange(16.0).reshape(4, 4), 2)
    >>> m.tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    img = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(img) if valid is None else (np.asarray(valid, bool) & np.isfinite(img))
    ny, nx = img.shape
    nby, nbx = _map_shape(img.shape, binsize)
    pad = np.zeros((nby * binsize, nbx * binsize))
    w = np.zeros_like(pad)
    pad[:ny, :nx] = np.where(ok, img, 0.0)
    w[:ny, :nx] = ok
    shape4 = (nby, binsize, nbx, binsize)
    n = w.reshape(shape4).sum(axis=(1, 3))
    s1 = pad.reshape(shape4).sum(axis=(1, 3))
    s2 = (pad * pad).reshape(shape4).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0) * n / np.maximum(n - 1, 1)
        err = np.sqrt(var / n)
    mean[n == 0] = np.nan
    err[n == 0] = np.nan
    return mean, err


def _point_errors(flux: np.ndarray, flux_err: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """Errors of ``log f``; ones (and ``False``) when the data carry no usable flux errors."""
    if flux_err is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            sig = np.asarray(flux_err, float) / flux
        good = np.isfinite(sig) & (sig > 0)
        if good.sum() >= 0.5 * np.isfinite(flux).sum() and good.any():
            # points without an error get the median error of their exposure's points
            med = np.nanmedian(np.where(good, sig, np.nan))
            return np.where(good, sig, med), True
    return np.ones_like(flux, dtype=float), False


def solve_starflat(x: np.ndarray, y: np.ndarray, flux: np.ndarray, flux_err: np.ndarray | None = None, *,
                   shape: tuple[int, int], binsize: int = 64, used: np.ndarray | None = None,
                   per_amp: bool = False, detector: str = "", clip: float = 5.0, maxclip: int = 3,
                   scale_errors: bool = True, min_points: int = 2, max_dense: int = 9000,
                   min_overlap: float = 0.1, gauge: str = "plane",
                   grid_origin: tuple[np.ndarray, np.ndarray] | None = None) -> StarFlat:
    """Solve the binned response map ``R`` with ``F`` and ``s`` from dithered spots.

    Parameters
    ----------
    x, y : numpy.ndarray
        ``(nspot, nexp)`` spot centroids, CCD pixels (DM convention); NaN
        where not measured.
    flux, flux_err : numpy.ndarray
        ``(nspot, nexp)`` fluxes and their errors (``flux_err=None`` or all
        NaN: equal weights, and the errors come from the scatter).
    shape : tuple of int
        CCD ``(ny, nx)``.
    binsize : int
        Map bin ``B``, pixels.
    used : numpy.ndarray, optional
        Boolean mask of the points to consider (e.g. a calibration's
        ``used``); the fit clips further outliers itself.
    per_amp : bool
        Add one free factor per amplifier (needs ``detector``): steps at the
        amplifier boundaries are then resolved inside the bins that straddle
        them. The map reports the full response (amplifier factor x bin
        term, the amplifier factor averaged over the bin's area).
    detector : str
        Detector name (amplifier layout, header).
    clip : float
        Points whose normalised residual exceeds ``clip`` (after scaling by
        the robust spread) are dropped and the fit is repeated; 0 disables.
    maxclip : int
        Clipping rounds.
    scale_errors : bool
        Multiply the errors by ``sqrt(chi2 / dof)`` when it exceeds 1 (the
        flux errors, or the binned model, do not explain all the scatter).
    min_points : int
        Spots and exposures with fewer used points are dropped.
    max_dense : int
        Largest number of visited bins for the exact error analysis (a dense
        ``n x n`` eigen-decomposition); beyond it, choose a larger ``binsize``.
    gauge : {"plane", "mean"}
        The modes fixed by convention. ``"plane"`` (default): the mean and
        the linear gradient of ``log R`` are set to zero over the constrained
        bins, because a grid translated rigidly between exposures cannot
        tell a linear gradient from the spots' positions (``log F[k]``
        absorbs ``a x_k``, ``log s[j]`` absorbs ``a dx_j``): a fitted gradient
        would only reflect sub-bin sampling. ``"mean"``: only the level is
        fixed (for data whose grid scale or rotation changes between
        exposures, which does constrain the gradient).
    min_overlap : float
        Two spots are linked (their regions share one level) when the
        bounding boxes of their positions overlap by at least this fraction
        of the smaller box. Spots linked directly or through others form a
        region; with dithers inside one grid cell every spot is its own
        region, and the level of each is degenerate with its ``F[k]``. Only
        the region with the most points is mapped; the others are reported
        as degenerate modes (``ncomponents - 1``) and masked.
    grid_origin : tuple of numpy.ndarray, optional
        Per-exposure grid origins ``(x0, y0)``, for the dither-box report
        (default: the mean spot position per exposure).

    Returns
    -------
    StarFlat

    Raises
    ------
    InputError
        Arrays of different shapes, a bad bin size, no usable point, or too
        many bins for the error analysis.
    """
    x, y, flux = (np.asarray(a, dtype=float) for a in (x, y, flux))
    if not (x.shape == y.shape == flux.shape) or x.ndim != 2:
        raise InputError(f"x, y, flux must be 2-D arrays of one shape, got {x.shape}, {y.shape}, {flux.shape}")
    if gauge not in ("plane", "mean"):
        raise InputError(f"unknown gauge {gauge!r}", expected="plane or mean")
    if int(binsize) < 1:
        raise InputError(f"bin size must be a positive number of pixels, not {binsize}", path=None,
                         expected="--binsize >= 1")
    binsize = int(binsize)
    nspot, nexp = flux.shape
    ny, nx = int(shape[0]), int(shape[1])
    nby, nbx = _map_shape((ny, nx), binsize)
    with np.errstate(invalid="ignore", divide="ignore"):
        logf = np.log(flux)
    sig, have_err = _point_errors(flux, flux_err)
    ok = (np.isfinite(logf) & np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5)
          & (y >= -0.5) & (y < ny - 0.5) & np.isfinite(sig))
    if used is not None:
        if np.shape(used) != flux.shape:
            raise InputError(f"mask of used points has shape {np.shape(used)}, the data {flux.shape}")
        ok &= np.asarray(used, bool)
    if per_amp and not detector:
        raise InputError("per-amplifier terms need the detector", expected="--detector or a named detector")
    ibin = np.full(flux.shape, -1, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        ix = np.clip(np.floor(np.where(ok, x + 0.5, 0) / binsize), 0, nbx - 1).astype(np.int64)
        iy = np.clip(np.floor(np.where(ok, y + 0.5, 0) / binsize), 0, nby - 1).astype(np.int64)
    ibin[ok] = (iy * nbx + ix)[ok]
    amp_lab = None
    amps: list[str] = []
    if per_amp:
        amp_lab = np.full(flux.shape, "", dtype="<U3")
        from .compare import _amp_of

        amp_lab[ok] = _amp_of(detector, x[ok], y[ok])
        ok &= amp_lab != ""
        amps = sorted(set(amp_lab[ok].tolist()))

    keep = _prune(ok, min_points)
    comp_of_spot, ncomp = _linked_spots(x, y, keep, min_overlap)
    main = 0
    if ncomp > 1:
        # regions no spot links are free relative to each other (each level is degenerate with its
        # spots' F): every region gets its own bin terms, and only the largest one is mapped
        lab = comp_of_spot >= 0
        sizes = np.bincount(comp_of_spot[lab], weights=keep.sum(axis=1)[lab])
        main = int(np.argmax(sizes))
        key = np.where(ibin >= 0, np.maximum(comp_of_spot, 0)[:, None] * (nbx * nby) + ibin, -1)
    else:
        key = ibin
    err_scale = 1.0
    niter = 0
    fit = None
    # every solve is exact (direct, on the reduced normal equations): a round that clips nothing
    # leaves the solution final, and the last round's reduced matrix serves the error analysis
    rounds = max(int(maxclip), 0) if clip > 0 else 0
    for it in range(rounds + 1):
        keep = _prune(keep, min_points)
        if keep.sum() < 3:
            raise InputError("too few usable spot measurements for a response map",
                             expected="dithered spot data with positive fluxes on the CCD")
        if it == 0 and _nbin_visited(key, keep) > max_dense:
            # checked before the dense reduced matrices are allocated (later rounds only drop points)
            raise InputError(f"{_nbin_visited(key, keep)} visited map bins is more than the exact error analysis "
                             f"handles ({max_dense})", expected="a larger --binsize")
        fit = _fit(logf, sig, key, keep, nbx * nby, amp_lab, amps)
        niter += 1
        if it == rounds:
            break
        chi = fit["resid"] / sig
        # robust spread of the normalised residuals: outliers must not set their own threshold
        spread = 1.4826 * np.median(np.abs(chi[keep]))
        bad = keep & (np.abs(chi) > clip * max(spread, 1e-12))
        if not bad.any():
            break
        keep &= ~bad
    chi = fit["resid"] / sig
    chi2 = float(np.sum(chi[keep] ** 2))

    ana = _analyse(fit, nbx * nby, max_dense, main, nbx, binsize, (ny, nx), gauge)
    dof = max(int(keep.sum()) - fit["rank"], 1)
    if not have_err or (scale_errors and chi2 / dof > 1):
        err_scale = float(np.sqrt(chi2 / dof))
    cov = ana["cov"] * err_scale ** 2
    logr = ana["logr"]
    con_idx = ana["constrained"]
    # gauge: the level (and, by default, the linear gradient) of log R are not determined by
    # rigidly translated grids; fix them to zero over the constrained bins, then normalise R to mean 1
    resp = np.full(nbx * nby, np.nan)
    err = np.full(nbx * nby, np.nan)
    if con_idx.size:
        X = _gauge_basis(con_idx, nbx, binsize, (ny, nx), gauge)
        r = np.exp(logr - X @ (X.T @ logr))
        resp[con_idx] = r / r.mean()
        # d log(R / mean R) = P d log R, with P removing the gauge modes and then the (weighted) mean;
        # applied as low-rank updates (the maps have thousands of bins)
        CX = cov @ X
        cov = cov - CX @ X.T
        cov -= X @ CX.T
        cov += X @ (X.T @ CX) @ X.T
        wts = r / r.sum()
        cw = cov @ wts
        cov -= cw[:, None]
        cov -= cw[None, :]
        cov += float(wts @ cw)
        err[con_idx] = resp[con_idx] * np.sqrt(np.clip(np.diag(cov), 0, None))
    coverage = np.bincount(ibin[keep], minlength=nbx * nby)
    kk = np.broadcast_to(np.arange(nspot)[:, None], flux.shape)
    pairs = np.unique(ibin[keep] * nspot + kk[keep])
    nspot_bin = np.bincount(pairs // nspot, minlength=nbx * nby)
    constrained = np.zeros(nbx * nby, bool)
    constrained[con_idx] = True

    # F and s in the gauge of the map: s from the fit (median 1), F refitted given R and s
    s = np.full(nexp, np.nan)
    s[fit["exps"]] = np.exp(fit["logs"][fit["exps"]] - np.nanmedian(fit["logs"]))
    F = np.full(nspot, np.nan)
    rb = resp[np.where(ibin >= 0, ibin, 0)]
    okF = keep & np.isfinite(rb) & (comp_of_spot == main)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        w2 = np.where(okF, 1.0 / sig ** 2, 0.0)
        lF = np.where(okF, logf - np.log(np.where(okF, rb, 1.0)) - np.log(np.where(np.isfinite(s), s, 1.0))[None, :],
                      0.0)
        F = np.exp((w2 * lF).sum(axis=1) / w2.sum(axis=1))
    F[okF.sum(axis=1) == 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        F_err = F * err_scale * np.sqrt(1.0 / w2.sum(axis=1))
    F_err[okF.sum(axis=1) == 0] = np.nan

    if grid_origin is None:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            x0 = np.nanmean(np.where(keep, x - np.nanmean(np.where(keep, x, np.nan), axis=1, keepdims=True),
                                     np.nan), axis=0)
            y0 = np.nanmean(np.where(keep, y - np.nanmean(np.where(keep, y, np.nan), axis=1, keepdims=True),
                                     np.nan), axis=0)
    else:
        x0, y0 = (np.asarray(a, float) for a in grid_origin)
    box = (float(np.nanmax(x0) - np.nanmin(x0)), float(np.nanmax(y0) - np.nanmin(y0)))

    gains, gains_err = {}, {}
    for a, (g, e) in ana.get("amps", {}).items():
        gains[amps[a]] = float(g)
        gains_err[amps[a]] = float(e * err_scale)
    meta = {"BINSIZE": binsize, "DETECTOR": detector, "NPOINT": int(keep.sum()), "CHI2": chi2,
            "DOF": float(dof), "ERRSCALE": err_scale, "ERRSRC": "flux_err" if have_err else "scatter",
            "NDEGEN": ana["ndegen"], "NCONSTR": int(con_idx.size), "NVISITED": int((coverage > 0).sum()),
            "NCOMP": int(ncomp), "DITHBOXX": box[0], "DITHBOXY": box[1], "PERAMP": bool(per_amp), "CLIP": float(clip),
            "GAUGE": "mean,gradient" if gauge == "plane" else "mean"}
    return StarFlat(response=resp.reshape(nby, nbx), response_err=err.reshape(nby, nbx),
                    coverage=coverage.reshape(nby, nbx), nspot_bin=nspot_bin.reshape(nby, nbx),
                    constrained=constrained.reshape(nby, nbx), binsize=binsize, shape=(ny, nx), F=F,
                    F_err=F_err, s=s, used=keep, chi2=chi2, dof=float(dof), err_scale=err_scale,
                    ndegenerate=ana["ndegen"], dither_box=box, niter=niter, amp_gains=gains,
                    amp_gains_err=gains_err, covariance=cov if con_idx.size else None, meta=meta)


def _linked_spots(x: np.ndarray, y: np.ndarray, keep: np.ndarray, min_overlap: float) -> tuple[np.ndarray, int]:
    """Regions of spots whose visited areas overlap (connected components); -1 for unused spots."""
    from scipy.sparse.csgraph import connected_components

    has = keep.any(axis=1)
    idx = np.flatnonzero(has)
    comp = np.full(keep.shape[0], -1, dtype=np.int64)
    if idx.size == 0:
        return comp, 0
    with np.errstate(invalid="ignore"):
        xv, yv = np.where(keep, x, np.nan)[idx], np.where(keep, y, np.nan)[idx]
        x0, x1 = np.nanmin(xv, axis=1), np.nanmax(xv, axis=1)
        y0, y1 = np.nanmin(yv, axis=1), np.nanmax(yv, axis=1)
    # a spot measured once still covers its footprint: give every box at least a pixel
    x0, x1, y0, y1 = x0 - 0.5, x1 + 0.5, y0 - 0.5, y1 + 0.5
    area = (x1 - x0) * (y1 - y0)
    rows, cols = [], []
    n = idx.size
    step = max(1, 4_000_000 // n)
    for lo in range(0, n, step):
        sl = slice(lo, min(lo + step, n))
        ox = np.clip(np.minimum(x1[sl, None], x1[None, :]) - np.maximum(x0[sl, None], x0[None, :]), 0, None)
        oy = np.clip(np.minimum(y1[sl, None], y1[None, :]) - np.maximum(y0[sl, None], y0[None, :]), 0, None)
        frac = ox * oy / np.minimum(area[sl, None], area[None, :])
        a, b = np.nonzero(frac >= min_overlap)
        rows.append(a + lo)
        cols.append(b)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(n, n))
    ncomp, lab = connected_components(graph, directed=False)
    comp[idx] = lab
    return comp, int(ncomp)


def _prune(keep: np.ndarray, min_points: int) -> np.ndarray:
    """Drop spots and exposures with fewer than ``min_points`` points, until stable."""
    keep = keep.copy()
    while True:
        bad_k = keep.sum(axis=1) < min_points
        bad_j = keep.sum(axis=0) < min_points
        if not (bad_k[keep.any(axis=1)].any() or bad_j[keep.any(axis=0)].any()):
            return keep
        keep[bad_k, :] = False
        keep[:, bad_j] = False


def _nbin_visited(key: np.ndarray, keep: np.ndarray) -> int:
    """Distinct bin terms (bins, per region) the kept points fall in."""
    return int(np.unique(key[keep]).size)


def _fit(logf, sig, ibin, keep, nbin_total, amp_lab, amps) -> dict:
    """One exact weighted least-squares solve of ``log f = log F + log s + log R (+ amp)``.

    The normal equations have a block structure that is cheap to reduce:
    the ``F`` block is diagonal (each point one spot), so ``F`` is
    eliminated exactly; the ``s`` block left is a dense ``nexp x nexp``
    matrix (Cholesky), leaving ``M`` over the bin (and amplifier) terms, a
    dense ``nbin x nbin`` matrix (the same one the error analysis needs).
    Every product is a ``bincount`` over the points or a dense BLAS product
    of the small matrices: no iteration over the millions of points.
    ``M`` is singular along each region's level (shared with its spots'
    ``F``): those directions are added to it before the Cholesky factor and
    the solution has no component along them; any other degeneracy sends
    the solve to an eigen-decomposition (pseudo-inverse, the minimum-norm
    solution), which :func:`_analyse` reuses.
    """
    nspot, nexp = logf.shape
    kk, jj = np.nonzero(keep)
    spots = np.unique(kk)
    exps = np.unique(jj)
    bins = np.unique(ibin[kk, jj])
    ck = np.searchsorted(spots, kk)
    cj = np.searchsorted(exps, jj)
    cb = np.searchsorted(bins, ibin[kk, jj])
    nK, nJ, nB = spots.size, exps.size, bins.size
    nA = len(amps)
    nU = nB + nA
    w2 = 1.0 / sig[kk, jj] ** 2
    y = logf[kk, jj]
    wy = w2 * y
    cus = [cb]
    ca = None
    if nA:
        ca = np.searchsorted(np.asarray(amps), amp_lab[kk, jj])
        cus.append(nB + ca)
    # blocks of the normal matrix, by bincount over the points
    W = np.zeros((nK, nJ))
    W[ck, cj] = w2  # one point per (spot, exposure)
    dF = W.sum(axis=1)
    dS = W.sum(axis=0)
    bF = np.bincount(ck, weights=wy, minlength=nK)
    bS = np.bincount(cj, weights=wy, minlength=nJ)
    bU = sum(np.bincount(c, weights=wy, minlength=nU) for c in cus)
    NFU = sp.csr_matrix(sum(np.bincount(ck * nU + c, weights=w2, minlength=nK * nU) for c in cus).reshape(nK, nU))
    NsU = sum(np.bincount(cj * nU + c, weights=w2, minlength=nJ * nU) for c in cus).reshape(nJ, nU)
    NUU = np.diag(sum(np.bincount(c, weights=w2, minlength=nU) for c in cus))
    if nA:
        C = np.bincount(cb * nU + nB + ca, weights=w2, minlength=nU * nU).reshape(nU, nU)
        NUU += C + C.T
        del C
    # eliminate F (diagonal block)
    iF = 1.0 / dF
    Ws = W * iF[:, None]
    NFUt = NFU.T.tocsr()
    Nss = np.diag(dS) - W.T @ Ws
    NsU -= (NFUt @ Ws).T
    NUU -= (NFUt @ sp.diags(iF) @ NFU).toarray()
    rs = bS - Ws.T @ bF
    rU = bU - NFUt @ (bF * iF)
    del Ws
    # eliminate s: N_ss is singular along the constant (s -> c s, F -> F / c), and N_sU^T 1 = 0:
    # regularise along it
    ones = np.ones(nJ) / np.sqrt(nJ)
    creg = float(np.mean(np.diag(Nss))) or 1.0
    Nreg = Nss + creg * np.outer(ones, ones)
    Lc = _psd_cholesky(Nreg)
    if Lc is not None:
        # with Nreg = L L^T: N_sU^T Nreg^-1 N_sU = Y^T Y, Y = L^-1 N_sU (one triangular solve, one syrk:
        # half the flops of solving for X and multiplying)
        from scipy.linalg import solve_triangular
        from scipy.linalg.blas import dsyrk

        YR = solve_triangular(Lc, np.column_stack([NsU, rs]), lower=True, check_finite=False)
        Y, yr = YR[:, :nU], YR[:, nU]
        C = dsyrk(1.0, Y.T, trans=0)  # Y^T Y, upper triangle
        M = NUU - (np.triu(C) + np.triu(C, 1).T)
        rM = rU - Y.T @ yr
        Sinv = None
        X = XR = YR
        del C, Y
    else:
        ev, V = np.linalg.eigh(Nss)
        good = ev > EIG_TOL * ev.max()
        Sinv = (V[:, good] / ev[good]) @ V[:, good].T
        XR = Sinv @ np.column_stack([NsU, rs])
        X, xr = XR[:, :nU], XR[:, nU]
        M = NUU - NsU.T @ X
        rM = rU - NsU.T @ xr
    M = 0.5 * (M + M.T)
    del NUU, X, XR
    comps = bins // nbin_total
    fac = None if nA else _region_cholesky(M, comps)
    if fac is not None:
        from scipy.linalg import cho_solve

        u = cho_solve(fac, rM, check_finite=False)
        eig = None
    else:
        ev, V = np.linalg.eigh(M)
        null = ev <= EIG_TOL * max(ev.max(), 1e-300)
        u = V[:, ~null] @ ((V[:, ~null].T @ rM) / ev[~null])
        eig = (ev, V, null)
    # back-substitute s, then F
    rhs_s = rs - NsU @ u
    if Sinv is None:
        from scipy.linalg import cho_solve

        ls = cho_solve((Lc, True), rhs_s, check_finite=False)
    else:
        ls = Sinv @ rhs_s
    lF = (bF - W @ ls - NFU @ u) * iF
    del W, NsU
    model = lF[ck] + ls[cj] + u[cb]
    if nA:
        model += u[nB + ca]
    resid = np.zeros(logf.shape)
    resid[kk, jj] = y - model
    logF = np.full(nspot, np.nan)
    logF[spots] = lF
    logs = np.full(nexp, np.nan)
    logs[exps] = ls
    return {"cb": cb, "ca": ca, "nK": nK, "nJ": nJ, "nB": nB, "nA": nA, "M": M, "fac": fac, "eig": eig,
            "bins": bins, "spots": spots, "exps": exps, "x": np.concatenate([lF, ls, u]), "resid": resid,
            "logF": logF, "logs": logs, "rank": nK + nJ + nU - 2 - (nA if nA else 0)}  # refined in _analyse


def _gauge_basis(bins: np.ndarray, nbx: int, binsize: int, shape, gauge: str) -> np.ndarray:
    """Orthonormal columns spanning the gauge modes (level, and x, y gradients for ``plane``) over ``bins``."""
    cols = [np.ones(bins.size)]
    if gauge == "plane" and bins.size > 3:
        ny, nx = shape
        cols += [((bins % nbx) + 0.5) * binsize / nx - 0.5, ((bins // nbx) + 0.5) * binsize / ny - 0.5]
    Q, rr = np.linalg.qr(np.stack(cols, axis=1))
    keep = np.abs(np.diag(rr)) > 1e-9 * max(np.abs(rr[0, 0]), 1e-300)
    return Q[:, keep]


def _psd_cholesky(A: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of a well-conditioned positive-definite ``A``; None otherwise."""
    from scipy.linalg import LinAlgError, cholesky

    try:
        c = cholesky(A, lower=True, check_finite=False)
    except LinAlgError:
        return None
    d = np.diag(c)
    if d.min() ** 2 < 1e-12 * d.max() ** 2:
        return None
    return c


def _region_cholesky(M: np.ndarray, comps: np.ndarray):
    """Cholesky factor of ``M`` plus the regions' level directions; None if another mode is degenerate.

    ``M`` is exactly singular along the indicator of every region (the level
    each region shares with its spots' ``F``). Adding those directions makes
    it positive definite unless some other mode is degenerate; then the
    factor has a (near-)zero pivot and None sends the caller to the
    eigen-decomposition.
    """
    from scipy.linalg import LinAlgError, cho_factor

    creg = float(np.mean(np.diag(M))) or 1.0
    A = M.copy()
    for c in np.unique(comps):
        g = (comps == c).astype(float)
        g /= np.sqrt(g.sum())
        A += creg * np.outer(g, g)
    try:
        cf, lower = cho_factor(A, lower=True, check_finite=False, overwrite_a=True)
    except LinAlgError:
        return None
    d = np.diag(cf)
    if d.min() ** 2 < 1e-10 * d.max() ** 2:
        return None
    return cf, lower


def _fast_inverse(fac) -> np.ndarray | None:
    """Inverse of ``M`` on the complement of the regions' level vectors, from :func:`_region_cholesky`."""
    from scipy.linalg.lapack import dpotri

    cf, lower = fac
    n = cf.shape[0]
    inv, info = dpotri(cf, lower=int(lower), overwrite_c=True)
    if info != 0:
        return None
    inv = np.tril(inv) + np.tril(inv, -1).T if lower else np.triu(inv) + np.triu(inv, 1).T
    if n and not np.isfinite(inv[0, 0]):
        return None
    return inv


def _analyse(fit: dict, nbin_total: int, max_dense: int, main: int = 0, nbx: int = 1, binsize: int = 1,
             shape=(1, 1), gauge: str = "mean") -> dict:
    """Degenerate modes, constrained bins and the covariance of ``log R``.

    ``F`` and ``s`` are profiled out of the normal equations (Schur
    complements), leaving ``M`` over the bin (and amplifier) terms.
    """
    nK, nJ, nB, nA = fit["nK"], fit["nJ"], fit["nB"], fit["nA"]
    nU = nB + nA
    if nB > max_dense:
        raise InputError(f"{nB} visited map bins is more than the exact error analysis handles ({max_dense})",
                         expected="a larger --binsize")
    M = fit.pop("M")
    comps = fit["bins"] // nbin_total
    rows = np.flatnonzero(comps == main)
    if fit["fac"] is not None:
        fast = _fast_inverse(fit.pop("fac"))
        if fast is not None:
            # the only degenerate modes are the levels of the regions (known): no eigen-decomposition needed
            Minv = fast
            cov = Minv[np.ix_(rows, rows)]
            u = fit["x"][nK + nJ:]
            fit["rank"] = nK + nJ - 1 + nB - int(np.unique(comps).size)
            return {"constrained": fit["bins"][rows] % nbin_total, "logr": u[rows], "cov": cov,
                    "ndegen": int(np.unique(comps).size) - 1, "logr_lsmr": u[rows]}
    if fit["eig"] is not None:
        ev, V, null = fit["eig"]
    else:
        ev, V = np.linalg.eigh(M)
        null = ev <= EIG_TOL * max(ev.max(), 1e-300)
    # output map: per-bin log R of the mapped region (+ the bin's amplifier term with per_amp)
    nO = rows.size
    L = np.zeros((nO, nU))
    L[np.arange(nO), rows] = 1.0
    if nA:
        # each bin takes the amplifier term of the points that fell in it, weighted by their number
        counts = np.bincount(fit["cb"] * nA + fit["ca"], minlength=nB * nA).reshape(nB, nA).astype(float)
        counts = counts[rows]
        L[:, nB:] = counts / counts.sum(axis=1, keepdims=True)
    LN = L @ V[:, null]
    # remove the gauge modes (level, gradient) from the degenerate directions before judging bins
    G = _gauge_basis(fit["bins"][rows] % nbin_total, nbx, binsize, shape, gauge)
    LN -= G @ (G.T @ LN)
    # orthonormal basis of the remaining degenerate directions, as seen in the map
    if LN.shape[1]:
        Q, sv, _ = np.linalg.svd(LN, full_matrices=False)
        Q = Q[:, sv > 1e-6 * max(sv.max(), 1e-300)] if sv.size and sv.max() > 1e-8 else Q[:, :0]
    else:
        Q = LN
    ndegen = max(int(null.sum()) - 1, int(Q.shape[1]))
    weight = (Q * Q).sum(axis=1)
    con = weight <= NULL_WEIGHT_TOL
    Mpinv = (V[:, ~null] / ev[~null]) @ V[:, ~null].T
    u = fit["x"][nK + nJ:]
    # keep only the determined part of the solution (LSMR keeps none of the null space, this makes sure)
    logr_lsmr = (L @ u)[con]
    u = V[:, ~null] @ (V[:, ~null].T @ u)
    logr_all = L @ u
    cov_all = L @ Mpinv @ L.T
    idx = np.flatnonzero(con)
    out = {"constrained": fit["bins"][rows[idx]] % nbin_total, "logr": logr_all[idx], "cov": cov_all[np.ix_(idx, idx)],
           "ndegen": ndegen, "logr_lsmr": logr_lsmr}
    if nA:
        ua = u[nB:]
        ca_cov = Mpinv[nB:, nB:]
        g = np.exp(ua - ua.mean())
        P = np.eye(nA) - 1.0 / nA
        e = np.sqrt(np.clip(np.diag(P @ ca_cov @ P.T), 0, None))
        out["amps"] = {a: (g[a] / g.mean(), e[a]) for a in range(nA)}
    fit["rank"] = nK + nJ + int((~null).sum()) - 1
    return out


@dataclass
class FlatComparison:
    """The star-flat map against a flat binned the same way.

    Attributes
    ----------
    flat_map, flat_err : numpy.ndarray
        The flat's bin means in the map's gauge (normalised to mean 1 over
        the bins compared; with the ``plane`` gauge also without its linear
        gradient, which the spots cannot see), and their errors.
    ratio, ratio_err : numpy.ndarray
        ``response / flat_map`` and its error.
    r, r_err : float
        Pearson correlation of the two maps over the compared bins and its
        standard error from the maps' own errors (Monte Carlo over the
        response covariance and the flat's bin errors; ``nmc`` draws).
    slope, slope_err : float
        Weighted least-squares slope of ``response - 1`` on ``flat - 1``
        (1: the flat describes the spots' response), error from the same draws.
    chi2, dof : float
        ``chi2`` of ``ratio = const`` with the full covariance: is the ratio
        flat within the errors?
    nbin : int
        Bins compared.
    """

    flat_map: np.ndarray = field(repr=False)
    flat_err: np.ndarray = field(repr=False)
    ratio: np.ndarray = field(repr=False)
    ratio_err: np.ndarray = field(repr=False)
    r: float
    r_err: float
    slope: float
    slope_err: float
    chi2: float
    dof: int
    nbin: int

    def as_row(self) -> dict:
        """The scalar results, for a table."""
        return {"r": self.r, "r_err": self.r_err, "slope": self.slope, "slope_err": self.slope_err,
                "ratio_chi2": self.chi2, "ratio_dof": self.dof, "nbin": self.nbin}


def compare_with_flat(star: StarFlat, flat: np.ndarray, nmc: int = 500,
                      seed: int | np.random.Generator = 0) -> FlatComparison:
    """Bin a flat like the star flat and compare the two maps.

    Parameters
    ----------
    star : StarFlat
    flat : numpy.ndarray
        Flat of the same detector, ``star.shape``, DM orientation (any
        normalisation: it is renormalised over the compared bins).
    nmc : int
        Monte Carlo draws for the errors of ``r`` and the slope.
    seed : int or numpy.random.Generator

    Returns
    -------
    FlatComparison
    """
    flat = np.asarray(flat, dtype=float)
    if flat.shape != tuple(star.shape):
        raise InputError(f"flat has shape {flat.shape}, the response map's CCD is {tuple(star.shape)}",
                         expected="a flat of the same detector")
    fm, fe = bin_image(flat, star.binsize, valid=np.isfinite(flat) & (flat > 0))
    use = star.constrained & np.isfinite(fm)
    idx_all = np.flatnonzero(star.constrained.ravel())
    sel = np.isin(idx_all, np.flatnonzero(use.ravel()))
    if use.sum() > 3:
        # the flat in the map's gauge: the same level (and gradient) removed over the same bins
        idx = np.flatnonzero(use.ravel())
        X = _gauge_basis(idx, use.shape[1], star.binsize, star.shape,
                         "plane" if star.meta.get("GAUGE", "mean") != "mean" else "mean")
        lf = np.log(fm.ravel()[idx])
        g = np.full(fm.size, np.nan)
        g[idx] = np.exp(lf - X @ (X.T @ lf))
        scale = g.reshape(fm.shape) / fm
        fm, fe = fm * scale, fe * scale
    norm = np.nanmean(fm[use]) if use.any() else np.nan
    fm, fe = fm / norm, fe / norm
    R = star.response
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(use, R / fm, np.nan)
        ratio_err = np.where(use, np.abs(ratio) * np.hypot(star.response_err / R, fe / fm), np.nan)
    n = int(use.sum())
    if n < 3:
        nan = float("nan")
        return FlatComparison(fm, fe, ratio, ratio_err, nan, nan, nan, nan, nan, 0, n)
    a, b = R[use], fm[use]
    ea = star.response_err[use]
    eb = fe[use]

    def stats(a, b):
        da, db = a - a.mean(), b - b.mean()
        r = float((da * db).sum() / np.sqrt((da * da).sum() * (db * db).sum()))
        slope = float((da * db).sum() / (db * db).sum())
        return r, slope

    r, slope = stats(a, b)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    cov = star.covariance[np.ix_(sel, sel)] * np.outer(a, a)
    try:
        Lc = np.linalg.cholesky(cov + 1e-18 * np.eye(n))
    except np.linalg.LinAlgError:
        Lc = np.diag(ea)
    draws = np.array([stats(a + Lc @ rng.standard_normal(n), b + eb * rng.standard_normal(n))
                      for _ in range(int(nmc))]) if nmc > 0 else np.full((1, 2), np.nan)
    # chi2 of a constant ratio, full covariance of R plus the flat's independent errors
    rc = a / b
    C = cov / np.outer(b, b) + np.diag((rc * eb / b) ** 2)
    Ci = np.linalg.pinv(C)
    one = np.ones(n)
    c0 = (one @ Ci @ rc) / (one @ Ci @ one)
    d = rc - c0
    chi2 = float(d @ Ci @ d)
    return FlatComparison(flat_map=np.where(np.isfinite(fm), fm, np.nan), flat_err=fe, ratio=ratio,
                          ratio_err=ratio_err, r=r, r_err=float(np.nanstd(draws[:, 0])), slope=slope,
                          slope_err=float(np.nanstd(draws[:, 1])), chi2=chi2, dof=n - 1, nbin=n)
