"""Correlation of spot throughput with the flat, with honest errors.

The inputs are ``[spot, exposure]`` arrays (NaN where missing), e.g. the
relative throughput ``t[k, j]`` and the flat's relative response ``q[k, j]``
(DESIGN.md section 2), or any other per-point pair (centroid shift against
the flat's gradient, size against ``q``, ...). :func:`correlation_analysis`
returns, in a :class:`CorrelationResult`,

* the Pearson (or Spearman) ``r`` over all jointly valid points and the
  regression slope of ``a`` on ``b`` (``t`` on ``q``: 1.0 means the flat
  describes the response);
* errors from a bootstrap over spots (standard error, percentile and BCa
  intervals), the delete-one-spot jackknife and a block jackknife over
  amplifiers or spatial patches of the spot grid (neighbouring spots are not
  independent);
* a null distribution from pairing the spots' ``a`` with ``b`` of other spots
  displaced by a toroidal shift plus a rotation/flip of the spot grid (the
  flat keeps its spatial structure), and p-values from it.

All dithers of one spot are one resampling unit: they share the spot mean
``F[k]``. The per-spot sums (:class:`SpotSums`) are computed once, so that a
resample costs O(spots), not O(spots x exposures); the null is evaluated for
all shifts at once with FFTs over the spot grid (:mod:`spotflat.resampling`).

:func:`variance_decomposition` splits the relative-throughput variance into
the part the flat explains and the remainder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np

from .errors import InputError
from .resampling import (bca_interval, bootstrap_counts, jackknife_se, null_correlations,
                         patch_labels, percentile_interval)

__all__ = [
    "pearson_r",
    "SpotSums",
    "spot_sums",
    "CorrelationResult",
    "correlation_analysis",
    "variance_decomposition",
    "grid_layout",
]


def _pair(a, b, what: str = "a and b") -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise InputError(f"{what} have different shapes {a.shape} and {b.shape}")
    return a, b


def pearson_r(a, b) -> float:
    """Pearson correlation coefficient over the jointly finite pairs.

    Parameters
    ----------
    a, b : array_like
        Arrays of the same shape (any number of dimensions; flattened). NaN
        or infinite entries are dropped pairwise.

    Returns
    -------
    float
        ``r = <da db> / sqrt(<da**2> <db**2>)`` with ``da = a - <a>`` and
        ``db = b - <b>``; NaN when either has zero variance.

    Raises
    ------
    InputError
        Different shapes, or fewer than two jointly finite pairs.

    Notes
    -----
    The seed notebook computed ``<df dQ> / (<df**2> <dQ**2>)``, without the
    square root in the denominator. That quantity is not a correlation
    coefficient: it is not bounded by 1 and scales as the inverse of the
    amplitudes (for ~1 % deviations it is ~1e4 times too large). spotflat
    uses the correct formula above, which equals :func:`numpy.corrcoef` on
    complete data. The means are subtracted before the products (two-pass),
    so values near 1 with tiny deviations lose no precision.

    Examples
    --------
    >>> round(pearson_r([1.0, 2.0, 3.0, np.nan], [2.0, 4.1, 5.9, 1.0]), 3)
    0.999
    >>> pearson_r([1, 2, 3], [3, 2, 1])
    -1.0
    """
    a, b = _pair(a, b)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        raise InputError(f"pearson_r needs at least 2 jointly finite pairs, got {int(ok.sum())}")
    da = a[ok] - a[ok].mean()
    db = b[ok] - b[ok].mean()
    den = np.sqrt(np.dot(da, da) * np.dot(db, db))
    if den == 0:
        return float("nan")
    return float(np.clip(np.dot(da, db) / den, -1.0, 1.0))


# --------------------------------------------------------------------------
# per-spot sufficient statistics

_COLS = ("n", "sa", "sb", "saa", "sbb", "sab")


def _moments(s: np.ndarray):
    """Centred cross-product sums from (..., 6) raw sums."""
    n, sa, sb, saa, sbb, sab = np.moveaxis(s, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cab = sab - sa * sb / n
        caa = saa - sa * sa / n
        cbb = sbb - sb * sb / n
    return cab, caa, cbb


def _r_from(s: np.ndarray) -> np.ndarray:
    cab, caa, cbb = _moments(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(cab / np.sqrt(caa * cbb), -1.0, 1.0)


def _slope_from(s: np.ndarray) -> np.ndarray:
    cab, _, cbb = _moments(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cab / cbb


@dataclass(frozen=True)
class SpotSums:
    """Per-spot sufficient statistics of two quantities.

    For each spot, over its jointly valid exposures: the count and the sums
    of ``a``, ``b``, ``a**2``, ``b**2`` and ``a*b``, with ``a`` and ``b``
    first shifted by ``shift_a``/``shift_b`` (their overall means) so that
    the sums stay well conditioned. Any statistic of a reweighting of the
    spots (bootstrap, jackknife, blocks) is then a weighted sum of rows.

    Attributes
    ----------
    matrix : numpy.ndarray
        ``(nspot, 6)`` columns ``n, sa, sb, saa, sbb, sab``.
    shift_a, shift_b : float
        The subtracted means.
    """

    matrix: np.ndarray
    shift_a: float = 0.0
    shift_b: float = 0.0

    @property
    def n(self) -> np.ndarray:
        """Number of jointly valid points per spot."""
        return self.matrix[:, 0]

    def total(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Sums over spots, ``(6,)``, or ``(m, 6)`` for weights ``(m, nspot)``."""
        if weights is None:
            return self.matrix.sum(axis=0)
        return np.asarray(weights, dtype=float) @ self.matrix

    def r(self, weights: np.ndarray | None = None) -> np.ndarray | float:
        """Pearson r of the (weighted) spots; scalar without weights."""
        out = _r_from(self.total(weights))
        return float(out) if weights is None else out

    def slope(self, weights: np.ndarray | None = None) -> np.ndarray | float:
        """Least-squares slope of ``a`` on ``b``; scalar without weights."""
        out = _slope_from(self.total(weights))
        return float(out) if weights is None else out


def _centred(a: np.ndarray, b: np.ndarray, valid: np.ndarray):
    """Deviations from the jointly valid means, 0 where not jointly valid."""
    npt = valid.sum()
    ma = np.sum(a, where=valid) / npt
    mb = np.sum(b, where=valid) / npt
    A = np.zeros_like(a)
    B = np.zeros_like(b)
    np.subtract(a, ma, out=A, where=valid)
    np.subtract(b, mb, out=B, where=valid)
    return A, B, float(ma), float(mb)


def _sums_from_centred(A, B, valid, ma, mb) -> SpotSums:
    m = np.empty((A.shape[0], 6))
    m[:, 0] = valid.sum(axis=1)
    m[:, 1] = A.sum(axis=1)
    m[:, 2] = B.sum(axis=1)
    m[:, 3] = np.einsum("ij,ij->i", A, A)
    m[:, 4] = np.einsum("ij,ij->i", B, B)
    m[:, 5] = np.einsum("ij,ij->i", A, B)
    return SpotSums(m, ma, mb)


def spot_sums(a, b) -> SpotSums:
    """Per-spot sufficient statistics of ``[spot, exposure]`` arrays.

    Parameters
    ----------
    a, b : array_like
        ``[spot, exposure]`` arrays of the same shape, NaN where missing.

    Returns
    -------
    SpotSums

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> b = rng.normal(size=(20, 5)); a = b + rng.normal(size=(20, 5))
    >>> s = spot_sums(a, b)
    >>> bool(np.isclose(s.r(), np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    True
    """
    a, b = _pair(np.atleast_2d(a), np.atleast_2d(b))
    valid = np.isfinite(a) & np.isfinite(b)
    if not valid.any():
        raise InputError("no jointly valid points")
    A, B, ma, mb = _centred(a, b, valid)
    return _sums_from_centred(A, B, valid, ma, mb)


# --------------------------------------------------------------------------
# grid layout and blocks

def grid_layout(nspot: int, grid_shape: tuple[int, int] | None = None,
                spot_rows=None, spot_cols=None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Grid column and row of every spot, and the grid size.

    Parameters
    ----------
    nspot : int
        Number of spots (rows of the data arrays).
    grid_shape : (int, int), optional
        ``(nrows, ncols)`` of a complete grid in spot-index order (spot ``k``
        at column ``k // nrows``, row ``k % nrows``). Default: a square grid,
        ``49 x 49`` for 2401 spots. With ``spot_rows``/``spot_cols`` it only
        sets the grid size (default: the largest index + 1).
    spot_rows, spot_cols : array_like of int, optional
        Explicit grid row and column of each spot (for subsets of a grid).

    Returns
    -------
    cols, rows : numpy.ndarray
        Grid column and row per spot.
    shape : (int, int)
        ``(ncols, nrows)``: the shape of the ``[column, row]`` grid image.

    Examples
    --------
    >>> cols, rows, shape = grid_layout(6, (3, 2))
    >>> cols.tolist(), rows.tolist(), shape
    ([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2], (2, 3))
    """
    if (spot_rows is None) != (spot_cols is None):
        raise InputError("give both spot_rows and spot_cols, or neither")
    if spot_rows is not None:
        rows = np.asarray(spot_rows).astype(np.int64).ravel()
        cols = np.asarray(spot_cols).astype(np.int64).ravel()
        if rows.size != nspot or cols.size != nspot:
            raise InputError(f"spot_rows/spot_cols have {rows.size}/{cols.size} entries "
                             f"for {nspot} spots")
        if nspot and (rows.min() < 0 or cols.min() < 0):
            raise InputError("negative grid row or column")
        if grid_shape is None:
            nrows, ncols = int(rows.max()) + 1, int(cols.max()) + 1
        else:
            nrows, ncols = (int(v) for v in grid_shape)
            if rows.max() >= nrows or cols.max() >= ncols:
                raise InputError(f"spot rows/columns exceed grid_shape {tuple(grid_shape)}")
        if np.unique(cols * nrows + rows).size != nspot:
            raise InputError("two spots share one grid position")
        return cols, rows, (ncols, nrows)
    if grid_shape is None:
        side = int(round(np.sqrt(nspot)))
        if side * side != nspot:
            raise InputError(f"{nspot} spots do not fill a square grid",
                             expected="grid_shape or spot_rows/spot_cols")
        grid_shape = (side, side)
    nrows, ncols = (int(v) for v in grid_shape)
    if nrows * ncols != nspot:
        raise InputError(f"grid_shape {tuple(grid_shape)} holds {nrows * ncols} spots, "
                         f"the data have {nspot}")
    k = np.arange(nspot)
    return k // nrows, k % nrows, (ncols, nrows)


# --------------------------------------------------------------------------
# the analysis

@dataclass
class CorrelationResult:
    """Correlation of two ``[spot, exposure]`` quantities with its errors.

    Attributes
    ----------
    r : float
        Pearson (or Spearman) correlation over all jointly valid points.
    r_err_bootstrap : float
        Standard deviation of r over bootstrap resamples of spots.
    ci_low, ci_high : float
        Bootstrap percentile interval at ``confidence``.
    bca_low, bca_high : float
        Bootstrap BCa interval (acceleration from the delete-one-spot jackknife).
    r_err_jackknife : float
        Delete-one-spot jackknife standard error.
    r_err_block : float
        Block jackknife standard error over ``block`` blocks.
    block : str
        ``"amp"`` (caller's labels) or ``"patch"`` (square patches of the grid).
    nblocks : int
        Number of blocks holding data.
    r_null_mean, r_null_std : float
        Mean and spread of the shifted/rotated null distribution.
    nnull : int
        Number of null pairings used.
    p_value : float
        Two-sided: ``(1 + #{|r_null| >= |r|}) / (1 + nnull)``.
    p_value_one_sided : float
        One-sided for a positive correlation: ``(1 + #{r_null >= r}) / (1 + nnull)``.
    slope : float
        Least-squares slope of ``a`` on ``b`` (always on the raw values).
    slope_err : float
        Bootstrap (over spots) standard error of the slope.
    slope_err_jackknife, slope_err_block : float
        Delete-one-spot and block jackknife standard errors of the slope.
    intercept : float
        Intercept of the regression.
    nspot : int
        Spots with at least one jointly valid point.
    npoint : int
        Jointly valid points.
    method : str
        ``"pearson"`` or ``"spearman"``.
    confidence : float
        Coverage of the intervals.
    nboot : int
        Bootstrap resamples.
    r_boot, r_null, slope_boot : numpy.ndarray
        The replicates (not part of :meth:`as_row`).
    """

    r: float
    r_err_bootstrap: float
    ci_low: float
    ci_high: float
    bca_low: float
    bca_high: float
    r_err_jackknife: float
    r_err_block: float
    block: str
    nblocks: int
    r_null_mean: float
    r_null_std: float
    nnull: int
    p_value: float
    p_value_one_sided: float
    slope: float
    slope_err: float
    slope_err_jackknife: float
    slope_err_block: float
    intercept: float
    nspot: int
    npoint: int
    method: str
    confidence: float
    nboot: int
    r_boot: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    r_null: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    slope_boot: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    def as_row(self) -> dict:
        """The scalar fields as a dict (e.g. one row of an astropy Table)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    def __str__(self) -> str:
        return (f"{self.method} r = {self.r:.4f} +- {self.r_err_bootstrap:.4f} (boot) "
                f"+- {self.r_err_jackknife:.4f} (jack) +- {self.r_err_block:.4f} "
                f"({self.block}, {self.nblocks} blocks); null {self.r_null_mean:.4f} +- "
                f"{self.r_null_std:.4f}, p = {self.p_value:.3g}; slope = {self.slope:.4f} "
                f"+- {self.slope_err:.4f}; {self.nspot} spots, {self.npoint} points")


def _rank_centred(a, b, valid):
    """Rank-transform the jointly valid points, then centre (0 elsewhere)."""
    ra = np.zeros_like(a)
    rb = np.zeros_like(b)
    from scipy.stats import rankdata  # here: scipy.stats costs ~0.6 s to import, Spearman only

    ra[valid] = rankdata(a[valid])
    rb[valid] = rankdata(b[valid])
    return _centred(ra, rb, valid)


def correlation_analysis(a, b, *, grid_shape: tuple[int, int] | None = None,
                         spot_rows=None, spot_cols=None, block: str = "patch",
                         block_labels: Sequence | np.ndarray | None = None,
                         patch_size: int | tuple[int, int] = 7, nboot: int = 1000,
                         nnull: int = 1000, seed: int | np.random.Generator | None = 0,
                         method: str = "pearson", confidence: float = 0.95,
                         min_shift: int = 2) -> CorrelationResult:
    """Correlate two ``[spot, exposure]`` quantities with bootstrap, jackknife and null errors.

    Parameters
    ----------
    a, b : array_like
        ``[spot, exposure]`` arrays of the same shape, NaN where missing, e.g.
        ``t`` and ``q``. Only jointly finite points are used. The slope is
        that of ``a`` regressed on ``b``.
    grid_shape : (int, int), optional
        ``(nrows, ncols)`` of the spot grid (spot ``k`` at column
        ``k // nrows``, row ``k % nrows``); default square (49 x 49 for 2401
        spots). See :func:`grid_layout`.
    spot_rows, spot_cols : array_like of int, optional
        Explicit grid row/column per spot, for subsets of a grid.
    block : {"patch", "amp"}
        Blocks for the block jackknife: square patches of the spot grid of
        ``patch_size`` steps, or the caller's ``block_labels`` (one per spot,
        e.g. the amplifier each spot sits on; required for ``"amp"``).
    block_labels : array_like, optional
        Block label per spot (any values) for ``block="amp"``.
    patch_size : int or (int, int)
        Patch size in grid steps (columns, rows) for ``block="patch"``.
    nboot : int
        Bootstrap resamples of spots (0 to skip: bootstrap fields are NaN).
    nnull : int
        Null pairings (0 to skip: null fields and p-values are NaN).
    seed : int, numpy.random.Generator or None
        Seeds everything random (bootstrap first, then the null).
    method : {"pearson", "spearman"}
        Spearman ranks the jointly valid points of each quantity (ties
        averaged) once, then runs the same machinery on the ranks (the ranks
        are not recomputed inside resamples).
    confidence : float
        Coverage of the percentile and BCa intervals.
    min_shift : int
        Null pairings with both shift components below this (cyclic) are
        excluded.

    Returns
    -------
    CorrelationResult

    Raises
    ------
    InputError
        Shapes differ; no jointly valid points; fewer than 3 spots with data;
        a quantity is constant; fewer than 2 blocks with data; bad options.

    Notes
    -----
    ``r`` is the correct Pearson coefficient ``<da db> / sqrt(<da**2><db**2>)``
    over all jointly valid points (see :func:`pearson_r` on the seed's formula).
    Resampling units are spots: a bootstrap resample draws spots with
    replacement and takes all their dithers; the jackknife deletes one spot,
    the block jackknife one block at a time (standard error
    ``sqrt((G-1)/G sum (r_g - mean)**2)``). All of them reweight the
    per-spot sums of :class:`SpotSums`.

    The null pairs spot ``k``'s series of ``a`` with the series of ``b`` at
    grid position ``h(x_k) + (m, n)`` (toroidal), ``h`` one of the 8
    rotations/flips of a square grid (4 for a rectangular one), exposures
    aligned; pairings with ``|m|, |n| < min_shift`` are excluded, and so
    are, within a pairing, the spots whose partner is that near (on the axis
    of a flip, the centre of a rotation), which would otherwise pair a spot
    with itself and pull the null towards the observed r. With
    missing data each permuted r uses the points valid in both members of a
    pair (see :func:`spotflat.resampling.null_correlations`). The p-values
    count the null pairings at least as extreme as the observed r.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q = 1 + 0.01 * rng.normal(size=(100, 20))
    >>> t = 1 + 0.8 * (q - 1) + 0.01 * rng.normal(size=(100, 20))
    >>> res = correlation_analysis(t, q, patch_size=2, nboot=200, nnull=200)
    >>> 0.5 < res.r < 0.8, res.p_value < 0.01, abs(res.slope - 0.8) < 4 * res.slope_err
    (True, True, True)
    """
    a, b = _pair(a, b)
    if a.ndim != 2:
        raise InputError(f"a and b must be 2-D [spot, exposure] arrays, got {a.ndim}-D")
    if method not in ("pearson", "spearman"):
        raise InputError(f"unknown method {method!r}", expected="'pearson' or 'spearman'")
    if block not in ("patch", "amp"):
        raise InputError(f"unknown block kind {block!r}", expected="'amp' or 'patch'")
    if not 0 < confidence < 1:
        raise InputError(f"confidence {confidence} not in (0, 1)")
    if nboot < 0 or nnull < 0:
        raise InputError("nboot and nnull must be >= 0")
    rng = np.random.default_rng(seed)
    nspot_all = a.shape[0]
    cols, rows, shape = grid_layout(nspot_all, grid_shape, spot_rows, spot_cols)

    valid = np.isfinite(a) & np.isfinite(b)
    npoint = int(valid.sum())
    if npoint == 0:
        raise InputError("no jointly valid points: a and b are never both finite")

    # block labels for every spot (before dropping empty spots)
    if block == "amp":
        if block_labels is None:
            raise InputError("block='amp' needs block_labels (one label per spot)")
        labels = np.asarray(block_labels).ravel()
        if labels.size != nspot_all:
            raise InputError(f"{labels.size} block labels for {nspot_all} spots")
        labels = np.unique(labels, return_inverse=True)[1].ravel()
    else:
        if block_labels is not None:
            raise InputError("block_labels are only used with block='amp'")
        labels = patch_labels(cols, rows, patch_size)

    A, B, ma, mb = _centred(a, b, valid)
    raw = _sums_from_centred(A, B, valid, ma, mb)
    if method == "spearman":
        A, B, ma_r, mb_r = _rank_centred(a, b, valid)
        ranked = _sums_from_centred(A, B, valid, ma_r, mb_r)
    else:
        ranked = raw
    has = raw.n > 0
    nspot = int(has.sum())
    if nspot < 3:
        raise InputError(f"only {nspot} spots have jointly valid points", expected="at least 3")
    _, caa, cbb = _moments(raw.total())
    if not (caa > 0 and cbb > 0):
        raise InputError("a or b is constant over the valid points: r is undefined")

    # columns 0-5: sums for r (raw or ranked); 6-11: raw sums for the slope
    m = np.hstack([ranked.matrix[has], raw.matrix[has]])
    tot = m.sum(axis=0)
    r = float(_r_from(tot[:6]))
    slope = float(_slope_from(tot[6:]))
    intercept = float(ma + tot[7] / tot[6] - slope * (mb + tot[8] / tot[6]))

    # bootstrap over spots
    if nboot > 0:
        w = bootstrap_counts(nspot, nboot, rng).astype(float)
        bt = w @ m
        r_boot, slope_boot = _r_from(bt[:, :6]), _slope_from(bt[:, 6:])
        r_err_boot = float(np.nanstd(r_boot, ddof=1)) if nboot > 1 else float("nan")
        slope_err = float(np.nanstd(slope_boot, ddof=1)) if nboot > 1 else float("nan")
    else:
        r_boot = slope_boot = np.empty(0)
        r_err_boot = slope_err = float("nan")

    # delete-one-spot jackknife
    jk = tot - m
    r_jack, slope_jack = _r_from(jk[:, :6]), _slope_from(jk[:, 6:])

    # block jackknife
    lab = np.unique(labels[has], return_inverse=True)[1].ravel()
    nblocks = int(lab.max()) + 1
    if nblocks < 2:
        raise InputError(f"only {nblocks} {block} block holds data: the block jackknife "
                         "needs at least 2", expected="more blocks (smaller patch_size) or labels")
    blk = np.stack([np.bincount(lab, weights=m[:, i], minlength=nblocks)
                    for i in range(m.shape[1])], axis=1)
    bj = tot - blk
    r_blk, slope_blk = _r_from(bj[:, :6]), _slope_from(bj[:, 6:])

    ci_low, ci_high = percentile_interval(r_boot, confidence)
    bca_low, bca_high = bca_interval(r, r_boot, r_jack, confidence)

    # null from shifted/rotated pairings of the spot grid
    if nnull > 0:
        null = null_correlations(A, B, valid, cols, rows, shape, nnull, rng, min_shift=min_shift)
        r_null = null["r"][np.isfinite(null["r"])]
    else:
        r_null = np.empty(0)
    nn = r_null.size
    if nn:
        # a hair of tolerance so a pairing equal to the observed one counts as "as extreme"
        tol = 1e-12 * max(1.0, abs(r))
        p_two = (1 + np.sum(np.abs(r_null) >= abs(r) - tol)) / (1 + nn)
        p_one = (1 + np.sum(r_null >= r - tol)) / (1 + nn)
        null_mean, null_std = float(r_null.mean()), float(r_null.std(ddof=1)) if nn > 1 else float("nan")
    else:
        p_two = p_one = null_mean = null_std = float("nan")

    return CorrelationResult(
        r=r, r_err_bootstrap=r_err_boot, ci_low=ci_low, ci_high=ci_high,
        bca_low=bca_low, bca_high=bca_high, r_err_jackknife=jackknife_se(r_jack),
        r_err_block=jackknife_se(r_blk), block=block, nblocks=nblocks,
        r_null_mean=null_mean, r_null_std=null_std, nnull=int(nn),
        p_value=float(p_two), p_value_one_sided=float(p_one), slope=slope,
        slope_err=slope_err, slope_err_jackknife=jackknife_se(slope_jack),
        slope_err_block=jackknife_se(slope_blk), intercept=intercept, nspot=nspot,
        npoint=npoint, method=method, confidence=float(confidence), nboot=int(nboot),
        r_boot=r_boot, r_null=r_null, slope_boot=slope_boot)


# --------------------------------------------------------------------------
# variance decomposition

def _between_within(x: np.ndarray, valid: np.ndarray) -> tuple[float, float, float]:
    """Total, between-spot and within-spot variance (all divided by N)."""
    n = valid.sum(axis=1)
    npt = n.sum()
    mean = np.sum(x, where=valid) / npt
    with np.errstate(invalid="ignore", divide="ignore"):
        spot_mean = np.where(n > 0, np.sum(x, axis=1, where=valid) / np.maximum(n, 1), mean)
    dev = np.where(valid, x - spot_mean[:, None], 0.0)
    within = float(np.sum(dev * dev) / npt)
    between = float(np.sum(n * (spot_mean - mean) ** 2) / npt)
    return between + within, between, within


def variance_decomposition(t, q, *, t_err=None) -> dict:
    """How much of the relative-throughput variation the flat explains.

    Parameters
    ----------
    t, q : array_like
        ``[spot, exposure]`` relative throughput and flat relative response
        (NaN where missing; points with ``q <= 0`` are dropped).
    t_err : array_like, optional
        Per-point measurement error of ``t``; gives the noise variance.

    Returns
    -------
    dict
        Over the ``npoint`` jointly valid points of ``nspot`` spots
        (variances divided by N; *between* = spread of the spot means,
        *within* = spread of a spot's dithers about its own mean):

        * ``var_t``, ``var_t_between``, ``var_t_within``: the throughput;
        * ``var_q``; ``r`` and ``slope``/``intercept`` of the regression of
          ``t`` on ``q``;
        * ``var_explained_regression = slope**2 * var_q`` (= ``r**2 var_t``),
          ``var_unexplained_regression`` (the regression residual) and
          ``frac_explained_regression`` (= ``r**2``);
        * ``var_d``, ``var_d_between``, ``var_d_within``: the spot-vs-flat
          residual ``d = t / q - 1``, i.e. what is left when the flat is
          taken as it is (slope 1);
        * ``frac_unexplained_flat = var_d / var_t`` and
          ``frac_explained_flat = 1 - frac_unexplained_flat`` (negative when
          dividing by the flat adds variance), and the same two for the
          within-spot parts (``*_within``), the part the flat should explain
          once the spot means are normalised out;
        * with ``t_err``: ``var_noise`` (mean of ``t_err**2``),
          ``frac_noise = var_noise / var_t`` and ``var_d_excess = var_d -
          var_noise`` (residual variance beyond the noise).

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> q = 1 + 0.02 * rng.normal(size=(50, 30))
    >>> t = q * (1 + 0.01 * rng.normal(size=q.shape))
    >>> dec = variance_decomposition(t, q)
    >>> 0.75 < dec["frac_explained_flat"] < 0.85
    True
    """
    t, q = _pair(t, q, "t and q")
    t = np.atleast_2d(t)
    q = np.atleast_2d(q)
    valid = np.isfinite(t) & np.isfinite(q) & (q > 0)
    if t_err is not None:
        t_err = np.atleast_2d(np.asarray(t_err, dtype=float))
        if t_err.shape != t.shape:
            raise InputError(f"t_err has shape {t_err.shape}, t has {t.shape}")
        valid &= np.isfinite(t_err)
    npoint = int(valid.sum())
    if npoint < 2:
        raise InputError(f"only {npoint} jointly valid points in t and q")
    A, B, ma, mb = _centred(t, q, valid)
    cab = np.einsum("ij,ij->", A, B) / npoint
    var_t, var_t_between, var_t_within = _between_within(t, valid)
    var_q = float(np.einsum("ij,ij->", B, B) / npoint)
    slope = float(cab / var_q) if var_q > 0 else float("nan")
    r = float(cab / np.sqrt(var_t * var_q)) if var_t > 0 and var_q > 0 else float("nan")
    var_expl = slope ** 2 * var_q
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(valid, t / q - 1.0, 0.0)
    var_d, var_d_between, var_d_within = _between_within(d, valid)

    def frac(x, y):
        return float(x / y) if y > 0 else float("nan")

    out = {
        "npoint": npoint,
        "nspot": int((valid.sum(axis=1) > 0).sum()),
        "var_t": var_t, "var_t_between": var_t_between, "var_t_within": var_t_within,
        "var_q": var_q, "r": r, "slope": slope, "intercept": float(ma - slope * mb),
        "var_explained_regression": float(var_expl),
        "var_unexplained_regression": float(var_t - var_expl),
        "frac_explained_regression": frac(var_expl, var_t),
        "var_d": var_d, "var_d_between": var_d_between, "var_d_within": var_d_within,
        "frac_unexplained_flat": frac(var_d, var_t),
        "frac_explained_flat": 1.0 - frac(var_d, var_t),
        "frac_unexplained_flat_within": frac(var_d_within, var_t_within),
        "frac_explained_flat_within": 1.0 - frac(var_d_within, var_t_within),
    }
    if t_err is not None:
        var_noise = float(np.sum(t_err ** 2, where=valid) / npoint)
        out.update(var_noise=var_noise, frac_noise=frac(var_noise, var_t),
                   var_d_excess=var_d - var_noise)
    return out
