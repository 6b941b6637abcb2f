"""Quality control of exposures: metrics, a robust outlier rule, label registration.

Real spot-projector runs have bad exposures as well as bad points: a grid fit
that locked one grid step away, labels scrambled by a buggy grid fit, part of
an exposure at the wrong brightness, saturated or brighter-fatter spots. One
bad exposure must not move ``F`` or ``s`` any more than one bad point may.

:func:`run_qc` fits ``F`` and ``s`` (:func:`spotflat.calibration.estimate_scales`),
measures every exposure against the consensus and excludes the worst outlier,
then refits, until no exposure is an outlier. Per exposure (:class:`QCResult`
``.table``):

``t_scatter``
    robust scatter of ``log t`` over the exposure's spots (interquartile
    range / 1.349, a Gaussian's sigma);
``t_width``
    the 10-90 % width of ``log t`` (as a Gaussian sigma): unlike the MAD it
    sees a part of the spots (10-50 %) off by the same amount;
``pair_scatter``
    (runs of up to 64 exposures) the scatter of ``log(f_j / f_j')`` against
    the better half of the other exposures: needs no consensus, so two bad
    exposures of a five-exposure run are still told from the good ones;
``pattern_r``
    Pearson correlation of ``log(f/s)`` with ``log F`` over the grid: the
    exposure's flux pattern against the consensus;
``rejected_fraction``
    points flagged by the reader (far matches, shared sources) or farther than
    ``sigma`` typical scatters from their expectation;
``x_centre, y_centre``
    the grid centre on the CCD, from a linear fit of the spot positions;
``registration``, ``reg_gain``
    the transform of the grid labels (integer shift and one of the 8
    flips/rotations) that fits the consensus best, and how much better than
    the labels as given (ratio of scatters);
``flux_slope``, ``size_slope``, ``top_peak_t``
    dependence of ``t`` and of the spot size on the peak level, and ``t`` of
    the brightest tenth of the spots against the rest (saturation and
    brighter-fatter); ``bf_flag`` when one is significant (5 sigma) and large
    (0.2 % per e-fold of peak, 1 % at the top); the size only when it grows
    with peak. The peak level uses the spot's median moments and the model
    flux ``F s``, not the point's own (whose noise is also in ``t``).

The outlier rule, per metric ``m`` (larger is worse): the reference is the
median of the better half of the exposures in use (so that up to half of a
run can be bad), its spread the MAD of that half; an exposure is an outlier
when ``m > ratio * ref`` **and** ``m > ref + threshold * spread``. Both must
hold: the ratio keeps a large run's natural spread from excluding good
exposures, the spread keeps a tight run from excluding noise.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import InputError
from .grids import DEFAULT_MAX_OFFSET, QUANTITIES, SpotGrids
from .masks import count

__all__ = ["QCOptions", "QCResult", "run_qc", "register_labels", "grid_transforms", "apply_registration"]

#: Outlier reasons, in the order they are tested.
REASONS = ("forced", "scatter", "width", "rejected", "pairs")


@dataclass
class QCOptions:
    """Options of :func:`run_qc`.

    Attributes
    ----------
    threshold : float
        Robust standard deviations above the reference for an outlier.
    ratio : float
        And at least this many times the reference (scatter, rejected fraction).
    width_ratio : float
        The same for the 10-90 % width of ``t``, which for good exposures is
        steadier than the MAD (it averages over more of the spots).
    min_rejected : float
        A rejected fraction below this is never an outlier (cosmic rays, edges).
    keep, drop : sequence of str
        File names (or their stems) to keep whatever the rule says / to drop.
    register : bool
        Re-register exposures whose labels fit the consensus better transformed.
    max_shift : int
        Largest grid shift (columns, rows) tried by the registration.
    reg_gain : float
        A transform is reported when it lowers the scatter by this factor.
    min_used_fraction : float
        Never exclude so many that fewer than this fraction remain.
    enabled : bool
        False: no exposure-level rejection (metrics are still measured).
    max_offset : float or None
        Far-match rule of the reader, in grid steps
        (:data:`spotflat.grids.DEFAULT_MAX_OFFSET`); None switches it off.
    """

    threshold: float = 5.0
    ratio: float = 3.0
    width_ratio: float = 2.0
    min_rejected: float = 0.5
    keep: tuple = ()
    drop: tuple = ()
    register: bool = False
    max_shift: int = 2
    reg_gain: float = 1.5
    min_used_fraction: float = 0.5
    enabled: bool = True
    max_offset: float | None = DEFAULT_MAX_OFFSET


@dataclass
class QCResult:
    """What :func:`run_qc` found.

    Attributes
    ----------
    table : astropy.table.Table
        One row per exposure: ``filename``, ``used``, ``reason`` and the
        metrics of the module notes.
    exclude : numpy.ndarray of bool
        Exposures left out of ``F`` and ``s``.
    fit : tuple
        ``(F, s, used, niter, converged)`` of the final fit.
    registered : dict
        ``{filename: transform}`` of the exposures re-registered.
    spot_bf : numpy.ndarray of bool
        Spots whose size grows with their peak level across dithers.
    """

    table: object
    exclude: np.ndarray
    fit: tuple
    registered: dict = field(default_factory=dict)
    spot_bf: np.ndarray | None = None

    @property
    def rejected(self) -> list[tuple[str, str]]:
        """``(filename, reason)`` of the excluded exposures."""
        t = self.table
        return [(str(t["filename"][j]), str(t["reason"][j])) for j in np.flatnonzero(self.exclude)]

    def summary_lines(self) -> list[str]:
        """Human-readable lines: rejected exposures, suspicious registrations, BF flags."""
        t = self.table
        out = [f"{name}: {reason}" for name, reason in self.rejected]
        for j in range(len(t)):
            if t["registration"][j] != "identity" and not self.exclude[j]:
                out.append(f"{t['filename'][j]}: labels fit better as {t['registration'][j]} "
                           f"(scatter /{t['reg_gain'][j]:.1f})"
                           + (", re-registered" if str(t["filename"][j]) in self.registered else ""))
        nbf = int(np.count_nonzero(t["bf_flag"]))
        if nbf:
            out.append(f"{nbf} exposure(s) with t or size depending on peak level (saturation/brighter-fatter): "
                       + ", ".join(str(x) for x in t["filename"][np.asarray(t["bf_flag"])][:5]))
        return out


# ---------------------------------------------------------------------------- label transforms
def grid_transforms(ncols: int, nrows: int, max_shift: int = 2):
    """Candidate transforms of grid labels: ``(name, col_map, row_map)`` functions of (col, row).

    The 8 flips/rotations of a square grid (4 of a rectangular one), each with
    every integer shift up to ``max_shift`` in columns and rows.
    """
    c0, r0 = (ncols - 1) / 2.0, (nrows - 1) / 2.0
    flips = [("identity", lambda u, v: (u, v)), ("flip-col", lambda u, v: (-u, v)),
             ("flip-row", lambda u, v: (u, -v)), ("rot180", lambda u, v: (-u, -v))]
    if ncols == nrows:
        flips += [("transpose", lambda u, v: (v, u)), ("rot90", lambda u, v: (-v, u)),
                  ("rot270", lambda u, v: (v, -u)), ("antitranspose", lambda u, v: (-v, -u))]
    out = []
    for name, fn in flips:
        for dc in range(-max_shift, max_shift + 1):
            for dr in range(-max_shift, max_shift + 1):
                label = name if (dc, dr) == (0, 0) else \
                    (f"shift({dc:+d} col, {dr:+d} row)" if name == "identity" else f"{name}+shift({dc:+d},{dr:+d})")
                out.append((label, fn, c0, r0, dc, dr))
    return out


def _mapped(k: np.ndarray, ncols: int, nrows: int, tr) -> np.ndarray:
    """Label each measured spot ``k`` would have under transform ``tr`` (-1 off the grid)."""
    _, fn, c0, r0, dc, dr = tr
    u, v = fn(k // nrows - c0, k % nrows - r0)
    col = np.rint(u + c0).astype(np.int64) + dc
    row = np.rint(v + r0).astype(np.int64) + dr
    inside = (col >= 0) & (col < ncols) & (row >= 0) & (row < nrows)
    return np.where(inside, col * nrows + row, -1)


@functools.lru_cache(maxsize=8)
def _transform_table(ncols: int, nrows: int, max_shift: int):
    """The candidates of :func:`grid_transforms` and, per candidate, every label's image."""
    cands = grid_transforms(ncols, nrows, max_shift)
    k = np.arange(ncols * nrows)
    return cands, np.stack([_mapped(k, ncols, nrows, tr) for tr in cands])


def register_labels(logf: np.ndarray, logF: np.ndarray, ncols: int, nrows: int, max_shift: int = 2):
    """Best transform of one exposure's labels against the consensus pattern.

    Parameters
    ----------
    logf : numpy.ndarray
        ``log f[:, j]`` of one exposure (NaN where unmeasured), by label.
    logF : numpy.ndarray
        ``log F`` of the consensus (NaN where unknown).
    ncols, nrows : int
    max_shift : int

    Returns
    -------
    (transform, scatter, identity_scatter)
        The best candidate of :func:`grid_transforms`, the robust scatter of
        ``log f - log F`` under it (after refitting the exposure's scale) and
        that of the labels as given.
    """
    from .calibration import _nanmedian, _robust_sigma

    k = np.flatnonzero(np.isfinite(logf))
    cands, table = _transform_table(ncols, nrows, max_shift)
    if k.size < 20:  # too few measured spots to tell one labelling from another
        return cands[0], np.nan, np.nan
    n_ident = np.count_nonzero(np.isfinite(logF[k]))
    # all candidates at once: one row of log f - log F per transform
    k2 = table[:, k]
    d = logf[k][None, :] - np.where(k2 >= 0, logF[np.maximum(k2, 0)], np.nan)
    n = count(np.isfinite(d), axis=1)
    med = _nanmedian(d, 1)
    sc = _robust_sigma(d - med[:, None], 1)[:, 0]
    sc[(n < max(20, 0.5 * n_ident)) & (np.arange(len(cands)) > 0)] = np.inf
    ident = sc[0]
    b = int(np.nanargmin(np.where(np.isfinite(sc), sc, np.inf))) if np.isfinite(sc).any() else 0
    if not sc[b] < ident:
        b = 0
    return cands[b], float(sc[b]), float(ident)


def apply_registration(grids: SpotGrids, j: int, tr) -> None:
    """Relabel exposure ``j`` of ``grids`` in place by transform ``tr``."""
    ncols, nrows = grids.grid_shape
    k = np.arange(grids.nspot)
    k2 = _mapped(k, ncols, nrows, tr)
    ok = k2 >= 0
    for q in QUANTITIES:
        a = getattr(grids, q)
        col = a[:, j].copy()
        a[:, j] = np.nan
        a[k2[ok], j] = col[ok]
    fl = grids.flags[:, j].copy()
    grids.flags[:, j] = 0
    grids.flags[k2[ok], j] = fl[ok]


# ---------------------------------------------------------------------------- metrics
def _grid_centres(grids: SpotGrids) -> tuple[np.ndarray, np.ndarray]:
    """Grid centre on the CCD per exposure: linear fit of x, y on (col, row) at the grid's middle."""
    ncols, nrows = grids.grid_shape
    k = np.arange(grids.nspot)
    A = np.stack([np.ones(grids.nspot), k // nrows - (ncols - 1) / 2.0, k % nrows - (nrows - 1) / 2.0], 1)
    AA = (A[:, :, None] * A[:, None, :]).reshape(grids.nspot, 9)
    out = []
    for a in (grids.x, grids.y):
        at = a.T  # (exposure, spot): contiguous for the stacked arrays
        fin = np.isfinite(at)
        m = (fin.astype(np.float64) @ AA).reshape(-1, 3, 3)  # every exposure's normal equations
        b = np.where(fin, at, 0.0) @ A
        ok = fin.sum(1) >= 3
        res = np.full(grids.nexp, np.nan)
        if ok.any():
            with np.errstate(all="ignore"):
                try:
                    res[ok] = np.linalg.solve(m[ok], b[ok][..., None])[:, 0, 0]
                except np.linalg.LinAlgError:  # a degenerate exposure (spots on one line)
                    res[ok] = np.array([np.linalg.lstsq(mm, bb, rcond=None)[0][0] for mm, bb in zip(m[ok], b[ok])])
        out.append(res)
    return out[0], out[1]


#: Alternations of the cell model in the QC residual (long modes trade slowly
#: between the cell responses and the spot offsets).
QC_MODEL_ITER = 10


def _cell_model(cid: np.ndarray, ncell: int, logt: np.ndarray, used: np.ndarray):
    """``(r, a, count)``: ``log t[k, j] ~ r[cell] - a[k]`` over the points in use (cells ``cid``)."""
    from .calibration import cell_means

    good = used & np.isfinite(logt) & (cid >= 0)
    gk, gj = np.nonzero(good)
    return cell_means(gk, cid[gk, gj], logt[gk, gj], logt.shape[0], ncell, QC_MODEL_ITER)


def _local_residual(grids: SpotGrids, logt: np.ndarray, used, segment) -> np.ndarray:
    """``log t`` minus its local expectation (cell response + spot offset, as the
    point rejection of :func:`spotflat.calibration.estimate_scales` uses), each
    exposure's median residual removed; ``log t`` minus the exposure's median
    where no cell (up to four times the finest) holds enough points."""
    from .calibration import _Neighbourhoods

    x, y = np.asarray(grids.x, np.float64), np.asarray(grids.y, np.float64)
    nb = _Neighbourhoods(x, y, np.isfinite(logt), segment)
    expected = np.full(logt.shape, np.nan)
    todo = np.isfinite(logt) & nb.ok
    for level in range(nb.LEVELS):
        if level and np.count_nonzero(todo) < 0.01 * todo.size:
            break  # the few points left are judged against their exposure's median
        cid, ncell = nb.cells(level)
        r, a, nc = _cell_model(cid, ncell, logt, used)
        enough = todo & (nc[np.maximum(cid, 0)] >= nb.MIN_POINTS) & (cid >= 0)
        expected[enough] = (r[cid] - a[:, None])[enough]
        todo &= ~enough
    res = logt - expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res -= np.nanmedian(res, axis=0)[None, :]
        plain = logt - np.nanmedian(logt, axis=0)[None, :]
    return np.where(np.isfinite(expected), res, plain)


def _local_metrics(grids: SpotGrids, logt: np.ndarray, used, sigma: float, exclude: np.ndarray,
                   segment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scatter, width and rejected fraction of each exposure against the local expectation."""
    res = _local_residual(grids, logt, used, segment)
    _, scatter, q10, q90 = _column_stats(res)
    ref = float(np.nanmedian(scatter[~exclude])) if np.isfinite(scatter[~exclude]).any() else np.nan
    with np.errstate(invalid="ignore"):
        out = np.abs(res) > sigma * ref
    nfin = count(np.isfinite(res), axis=0)
    nflag = count(grids.flags != 0, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rejected = (count(out, axis=0) + nflag) / (nfin + nflag)
    return scatter, (q90 - q10) / 2.563, rejected


def _metrics(grids: SpotGrids, F, s, used, sigma: float, exclude: np.ndarray):
    """Per-exposure scatter, pattern correlation and rejected fraction against the fit."""
    f = grids.flux
    nk = count(used, axis=1)
    good_F = np.isfinite(F) & (F > 0) & (nk >= 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        # in f's memory order (a broadcast F s would be C-ordered: every later pass over
        # it against the Fortran-ordered stack, and its per-exposure sorts, 2-3x slower)
        logt = np.empty_like(f, dtype=np.float64)
        np.multiply(F[:, None], s[None, :], out=logt)
        np.divide(f, logt, out=logt)
        np.log(logt, out=logt)
    logt[~good_F] = np.nan
    logt[~np.isfinite(logt)] = np.nan
    med, scatter, q10, q90 = _column_stats(logt)
    width = (q90 - q10) / 2.563  # a Gaussian's sigma; sees a coherent minority of 10-50 % of the spots
    ref = float(np.nanmedian(scatter[~exclude])) if np.isfinite(scatter[~exclude]).any() else np.nan
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.abs(logt - med[None, :]) > sigma * ref
    nfin = count(np.isfinite(logt), axis=0)
    nflag = count(grids.flags != 0, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rejected = (count(out, axis=0) + nflag) / (nfin + nflag)
        logF = np.log(np.where(good_F, F, np.nan))
        lf = np.log(f / s[None, :])
    m = np.isfinite(lf) & np.isfinite(logF)[:, None] & ~out
    r = _masked_corr(np.where(m, lf, 0.0), np.where(m, logF[:, None], 0.0), m)
    return scatter, width, r, rejected, logt, med


def _column_stats(a: np.ndarray):
    """Per column (NaN-aware, one sort): median, robust scatter (interquartile range / 1.349),
    10th and 90th percentiles."""
    srt = np.sort(a, axis=0)  # NaNs last
    n = count(np.isfinite(srt), axis=0)
    cols = np.arange(a.shape[1])

    def at(q):
        pos = np.clip(q * (n - 1), 0, None)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
        w = pos - lo
        v = srt[lo, cols] * (1 - w) + srt[hi, cols] * w
        return np.where(n > 0, v, np.nan)

    return at(0.5), (at(0.75) - at(0.25)) / 1.349, at(0.1), at(0.9)


def _masked_corr(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pearson correlation per column over the points in ``m`` (x, y zero elsewhere)."""
    n = count(m, axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = x.sum(0) / n, y.sum(0) / n
        sxy = (x * y).sum(0) / n - mx * my
        sxx = (x * x).sum(0) / n - mx * mx
        syy = (y * y).sum(0) / n - my * my
        r = sxy / np.sqrt(sxx * syy)
    return np.where(n >= 3, r, np.nan)


#: Runs of at most this many exposures also get the pairwise metric (cost ~ n^2 spots).
PAIRWISE_MAX = 64


def _pair_scatter(f: np.ndarray, s: np.ndarray, min_common: int = 20) -> np.ndarray:
    """Per exposure: robust scatter of ``log(f_j / f_j')`` against its better half of partners.

    Needs no consensus: when several exposures of a short run are bad, the
    consensus ``F`` is wrong for every exposure and all look alike against
    it, but a good exposure still agrees with the other good ones. The
    metric is the mean of the smallest half of the pair scatters (each
    pair's IQR / 1.349, over their common spots).
    """
    n = f.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        lf = np.log(np.where(f > 0, f, np.nan) / s[None, :])
    fin = np.isfinite(lf)
    out = np.full(n, np.nan)
    for j in range(n):
        d = lf[:, j:j + 1] - lf
        _, sc, _, _ = _column_stats(d)
        common = count(fin[:, j:j + 1] & fin, axis=0)
        sc[(common < min_common) | (np.arange(n) == j)] = np.nan
        sc = np.sort(sc[np.isfinite(sc)])
        if sc.size:
            out[j] = sc[: max((sc.size + 1) // 2, 1)].mean()
    return out


def _reference(m: np.ndarray) -> tuple[float, float]:
    """Median and MAD-spread of the better (smaller) half of a metric."""
    m = np.sort(m[np.isfinite(m)])
    if m.size == 0:
        return np.nan, np.nan
    low = m[: max((m.size + 1) // 2, 1)]
    ref = float(np.median(low))
    spread = 1.4826 * float(np.median(np.abs(low - ref)))
    return ref, spread


def _outliers(metric: np.ndarray, pool: np.ndarray, threshold: float, ratio: float, floor: float = 0.0):
    """Score (> 1 = outlier) of each exposure on one metric against the exposures in ``pool``."""
    ref, spread = _reference(metric[pool])
    if not np.isfinite(ref):
        return np.zeros(metric.size)
    thr = max(ratio * ref, ref + threshold * spread, floor)
    if thr <= 0:
        return np.zeros(metric.size)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(metric), metric / thr, 0.0)


def _score(metrics, pool: np.ndarray, opt: QCOptions) -> tuple[np.ndarray, np.ndarray]:
    """Largest outlier score of each exposure over ``(name, metric, floor, ratio)``, and its metric's name."""
    n = pool.size
    score = np.zeros(n)
    why = np.array([""] * n, dtype=object)
    for name, metric, floor, ratio in metrics:
        sc = _outliers(metric, pool, opt.threshold, ratio, floor)
        better = sc > score
        why[better] = name
        score = np.maximum(score, sc)
    return score, why


def _spot_centre(a: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Each spot's centre of ``a`` over its dithers where ``good``: the median, so that one odd
    exposure does not move the others; the mean (cheaper) in runs longer than :data:`PAIRWISE_MAX`
    exposures, where one exposure weighs little."""
    from .calibration import _nanmedian

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if a.shape[1] <= PAIRWISE_MAX:
            return _nanmedian(np.where(good, a, np.nan), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(good, a, 0.0).sum(1) / count(good, axis=1)


def _spot_peak(grids: SpotGrids, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log peak of each spot at s = 1, points with a valid peak)``.

    A point's peak level is that of its *model* flux ``F[k] s[j]`` over the
    Gaussian of its *spot's* median moments, so ``log peak[k, j] = lpk[k] +
    log s[j]``. Neither the point's own moments nor its own flux: ``log peak``
    would then hold ``-log size`` or the flux's measurement noise, which also
    sits in ``log t = log f - log(F s)`` -- a regression of ``log t`` on such a
    ``log peak`` has the slope ``var(noise) / var(log peak)`` on clean data
    (1 % noise over a +-20 % projector pattern: 0.007 per e-fold, which
    flagged a fifth of the exposures of a clean 1400-exposure run; with the
    point's moments every exposure of a clean simulated run was flagged).
    A point's peak is valid where its flux and its own moments are.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        det = np.where(np.isfinite(grids.xy), grids.xy, 0.0)
        np.multiply(det, det, out=det)
        np.subtract(grids.xx * grids.yy, det, out=det)
        good = det > 0
        spot_det = _spot_centre(det, good)
        del det
        lpk = np.log(F / (2 * np.pi * np.sqrt(spot_det)))
    good &= np.isfinite(grids.flux)
    good &= np.isfinite(lpk)[:, None]
    return lpk, good


def _column_slopes(x: np.ndarray, y: np.ndarray, m: np.ndarray):
    """Per column: least-squares slope of ``y[:, j]`` on ``x`` (one value per row) over
    ``m[:, j]``, and its standard error (NaN with < 20 points)."""
    mf = m.astype(np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    y0 = np.where(m, y, 0.0)
    n = mf.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = (x @ mf) / n, y0.sum(0) / n
        sxx = (x * x) @ mf - n * mx * mx
        sxy = x @ y0 - n * mx * my
        syy = np.einsum("ij,ij->j", y0, y0) - n * my * my
        b = sxy / sxx
        err = np.sqrt(np.maximum(syy - b * sxy, 0.0) / np.maximum(n - 2, 1) / sxx)
    ok = (n >= 20) & (sxx > 0)
    return np.where(ok, b, np.nan), np.where(ok, err, np.nan)


def _brighter_fatter(grids: SpotGrids, logt: np.ndarray, med: np.ndarray, mad: np.ndarray,
                     F: np.ndarray, s: np.ndarray, min_effect: float = 0.002, nsig: float = 5.0):
    """Per exposure: slopes of log t and log(size / spot's mean size) on log peak; flags.

    Saturated spots lose flux at the top of the peak range (t falls with
    peak); brighter-fatter spots grow (size rises with peak). The spot's own
    mean size over dithers is divided out, so that optical size differences
    across the grid do not count. Flag: slope significant at ``nsig`` and
    larger than ``min_effect`` per e-fold of peak. The peak level is that of
    the model flux ``F s`` (:func:`_spot_peak`): within an exposure ``log peak``
    is ``lpk[k]`` plus a constant, so each exposure's slopes are slopes on
    ``lpk`` (matrix-vector products, no [spot, exposure] peak array), and the
    brightest tenth of the spots is the same set of spots in every exposure.
    """
    lpk, valid = _spot_peak(grids, F)
    with np.errstate(invalid="ignore", divide="ignore"):
        ls = grids.xx + grids.yy
        np.log(ls, out=ls)
        ls -= _spot_centre(ls, np.isfinite(ls))[:, None]  # ls_rel: size relative to the spot's own
        x = lpk - np.nanmedian(lpk) if np.isfinite(lpk).any() else lpk  # centred: better sums
        lim = 5 * np.maximum(mad, 1e-12)
        dev = np.abs(logt - med[None, :])
        mt = valid & (dev <= lim[None, :])
        ms = valid & (np.abs(ls) <= 0.2)  # a size 20 % off its spot's is not BF
    ft, e1 = _column_slopes(x, logt, mt)
    st, e2 = _column_slopes(x, ls, ms)
    del mt
    with np.errstate(invalid="ignore"):
        flag = ((np.abs(ft) > min_effect) & (np.abs(ft) > nsig * e1)) | \
               ((st > min_effect) & (st > nsig * e2))  # BF grows spots
        # saturation bites at the top of the peak range only: t of the brightest
        # tenth of the spots against the rest (clipped means)
        mtop = valid & (dev <= 0.1)  # saturation losses stay in
    del dev
    fx = np.isfinite(x)
    top_spot = (x >= np.quantile(x[fx], 0.9)) & fx if fx.any() else fx
    t0 = np.where(mtop, logt, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        hi_w = top_spot.astype(np.float64)
        nall = count(mtop, axis=0)
        nh = hi_w @ mtop
        nl = nall - nh
        sh = hi_w @ t0
        top = sh / nh - (t0.sum(0) - sh) / nl
        err = mad * np.sqrt(1.0 / nh + 1.0 / nl)
        flag |= (nh >= 5) & (np.abs(top) > 5 * min_effect) & (np.abs(top) > nsig * err)
    top = np.where(nh >= 5, top, np.nan)
    del t0, mtop
    # per spot: size against peak across dithers (the spot's own lever arm: its
    # peak moves with s[j] alone); sums over each row by matrix-vector products
    with np.errstate(invalid="ignore", divide="ignore"):
        lsj = np.log(s)
        fin_s = np.isfinite(lsj)
        lsj = np.where(fin_s, lsj - np.nanmedian(lsj), 0.0) if fin_s.any() else lsj
        m = valid & np.isfinite(ls) & fin_s[None, :]
        mf = m.astype(np.float64)
        y0 = np.where(m, ls, 0.0)
        n = mf.sum(1)
        nn = np.maximum(n, 1)
        sx, sy = mf @ lsj, y0.sum(1)
        sxx = mf @ (lsj * lsj) - sx * sx / nn
        sxy = y0 @ lsj - sx * sy / nn
        syy = np.einsum("ij,ij->i", y0, y0) - sy * sy / nn
        b = sxy / sxx
        err = np.sqrt(np.maximum(syy - b * sxy, 0.0) / np.maximum(n - 2, 1) / sxx)
        spot_bf = (n >= 5) & (b > min_effect) & (b > nsig * err)
    return ft, st, top, flag, spot_bf


# ---------------------------------------------------------------------------- driver
def _match(names, wanted) -> np.ndarray:
    wanted = {str(w) for w in wanted}
    stems = [n.split(".")[0] for n in names]
    return np.array([n in wanted or st in wanted for n, st in zip(names, stems)], dtype=bool)


def run_qc(grids: SpotGrids, stat: str = "clipped", sigma: float = 4.0, options: QCOptions | None = None,
           segment: tuple[float, float] | None = None, maxiter: int = 50, tol: float = 1e-10) -> QCResult:
    """Exposure-level quality control and the final fit of ``F`` and ``s``.

    Parameters
    ----------
    grids : SpotGrids
        Stacked data (re-registered exposures are relabelled in place when
        ``options.register``).
    stat, sigma, maxiter, tol
        As for :func:`spotflat.calibration.estimate_scales`.
    options : QCOptions, optional
    segment : (float, float), optional
        Amplifier size, for the local expectation of the point rejection.

    Returns
    -------
    QCResult
    """
    return _qc_report(_qc_fit(grids, stat, sigma, options, segment, maxiter, tol))


def _qc_fit(grids: SpotGrids, stat: str, sigma: float, options: QCOptions | None,
            segment: tuple[float, float] | None, maxiter: int, tol: float,
            on_fit: Callable[[tuple], None] | None = None) -> "_QCFit":
    """:func:`run_qc`'s exposure loop: fit, score, exclude the worst outlier (or re-register), refit.

    ``on_fit(res)`` is called with every fit (:func:`~spotflat.calibration.estimate_scales`'s
    result) as soon as it is made; the last one is the loop's result (``_QCFit.res``).
    """
    from .calibration import estimate_scales

    opt = options or QCOptions()
    names = [str(n) for n in grids.exposures["filename"]]
    nexp = grids.nexp
    for what, lst in (("keep", opt.keep), ("drop", opt.drop)):
        unknown = sorted(set(map(str, lst)) - set(names) - {n.split(".")[0] for n in names})
        if unknown:
            raise InputError(f"--{what} names no exposure of the run: {', '.join(unknown)}",
                             expected="file names of the run (with or without extension)")
    keep = _match(names, opt.keep)
    exclude = _match(names, opt.drop) & ~keep
    reason = np.array(["forced" if e else "" for e in exclude], dtype=object)
    min_used = max(2, int(np.ceil(opt.min_used_fraction * nexp)))
    registered: dict = {}
    ncols, nrows = grids.grid_shape

    def fit(excl):
        res = estimate_scales(grids.flux, stat=stat, sigma=sigma, maxiter=maxiter, tol=tol,
                              x=grids.x, y=grids.y, exclude=excl if excl.any() else None, segment=segment)
        if on_fit is not None:
            on_fit(res)
        return res

    res = fit(exclude)
    tested: dict = {}
    # a short run: also compare the exposures pair by pair (the consensus may be
    # wrong for all of them when several are bad); fixed by the first fit's scales
    pairs = _pair_scatter(grids.flux, res[1]) if opt.enabled and 3 <= nexp <= PAIRWISE_MAX else None
    while True:
        F, s, used = res[0], res[1], res[2]
        scatter, width, r, rejected, logt, med = _metrics(grids, F, s, used, sigma, exclude)
        pool = ~exclude
        # the pattern correlation is reported, not a rule of its own: how high a
        # good exposure's r is depends on the spread of F over its spots, and a
        # scrambled exposure already fails the scatter rule
        metrics = [("scatter", scatter, 0.0, opt.ratio), ("width", width, 0.0, opt.width_ratio),
                   ("rejected", rejected, opt.min_rejected, opt.ratio)]
        if pairs is not None:
            metrics.append(("pairs", pairs, 0.0, opt.ratio))
        score, why = _score(metrics, pool, opt)
        cand = np.flatnonzero((score > 1) & pool & ~keep)
        if cand.size and nexp > PAIRWISE_MAX:
            # a long run: an outlier must also be one against its points' local
            # expectation -- log t holds real response structure (an exposure at
            # the edge of a large dither pattern sees more of it), which is not a
            # fault of the exposure. (Not in short runs: each cell then holds a
            # few exposures and a bad one inflates everyone's residual.)
            lsc, lwd, lrej = _local_metrics(grids, logt, used, sigma, exclude, segment)
            local, _ = _score([("scatter", lsc, 0.0, opt.ratio), ("width", lwd, 0.0, opt.width_ratio),
                               ("rejected", lrej, opt.min_rejected, opt.ratio)], pool, opt)
            score = np.minimum(score, local)
            cand = np.flatnonzero((score > 1) & pool & ~keep)
        # registration: every suspect, and every exposure of a small run
        small = grids.nspot * nexp <= 300_000
        todo = [j for j in (range(nexp) if small else cand) if j not in tested]
        logF = np.log(np.where(np.isfinite(F) & (F > 0), F, np.nan))
        for j in todo:
            with np.errstate(invalid="ignore", divide="ignore"):
                lf = np.log(np.where(grids.flux[:, j] > 0, grids.flux[:, j], np.nan))
            tested[j] = register_labels(lf, logF, ncols, nrows, opt.max_shift)
        if opt.register:
            redo = [j for j in cand if tested[j][0][0] != "identity"
                    and tested[j][1] * opt.reg_gain < tested[j][2] and names[j] not in registered]
            if redo:
                for j in redo:
                    apply_registration(grids, j, tested[j][0])
                    registered[names[j]] = tested[j][0][0]
                    tested.pop(j)
                res = fit(exclude)
                if pairs is not None:  # the relabelled exposures compare anew
                    pairs = _pair_scatter(grids.flux, res[1])
                continue
        if not opt.enabled or cand.size == 0 or np.count_nonzero(pool) - 1 < min_used:
            break
        worst = cand[np.argmax(score[cand])]
        exclude = exclude.copy()
        exclude[worst] = True
        reason[worst] = why[worst]
        res = fit(exclude)

    return _QCFit(grids=grids, opt=opt, names=names, exclude=exclude, reason=reason, res=res, tested=tested,
                  registered=registered, pairs=pairs, metrics=(scatter, width, r, rejected, logt, med))


@dataclass
class _QCFit:
    """The state :func:`run_qc`'s exposure loop ends in: its final fit and metrics."""

    grids: SpotGrids
    opt: QCOptions
    names: list
    exclude: np.ndarray
    reason: np.ndarray
    res: tuple
    tested: dict
    registered: dict
    pairs: np.ndarray | None
    metrics: tuple


def _qc_report(state: _QCFit) -> QCResult:
    """The QC table of the loop's final state: metrics, grid centres, registration, BF/saturation."""
    return _qc_bf(state, _qc_table(state))


def _qc_table(state: _QCFit):
    """The QC table's per-exposure metrics, grid centres and registration (all but the
    brighter-fatter/saturation columns, :func:`_qc_bf`): what the QC figure shows."""
    from astropy.table import Table

    grids, opt, names, exclude, reason = state.grids, state.opt, state.names, state.exclude, state.reason
    tested, registered, pairs = state.tested, state.registered, state.pairs
    scatter, width, r, rejected, _, _ = state.metrics
    nexp = grids.nexp
    xc, yc = _grid_centres(grids)
    reg_name = np.array([tested[j][0][0] if j in tested and tested[j][1] * opt.reg_gain < tested[j][2]
                         else "identity" for j in range(nexp)], dtype=object)
    for n, tr in registered.items():
        reg_name[names.index(n)] = tr
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.array([tested[j][2] / tested[j][1] if j in tested and tested[j][1] > 0 else 1.0
                         for j in range(nexp)])
    counts = grids.flag_counts()
    table = Table()
    table["filename"] = names
    table["used"] = ~exclude
    table["reason"] = [_describe(reason[j], scatter[j], width[j], rejected[j], r[j], reg_name[j]) if exclude[j] else ""
                       for j in range(nexp)]
    table["t_scatter"] = scatter
    table["t_width"] = width
    table["pair_scatter"] = pairs if pairs is not None else np.full(nexp, np.nan)
    table["pattern_r"] = r
    table["rejected_fraction"] = rejected
    table["nfar"] = counts["far"]
    table["nambiguous"] = counts["ambiguous"]
    table["x_centre"] = xc
    table["y_centre"] = yc
    table["registration"] = reg_name.astype(str)
    table["reg_gain"] = gain
    for c, u in (("x_centre", "pix"), ("y_centre", "pix")):
        table[c].unit = u
    table["t_scatter"].description = "robust scatter of log t (IQR / 1.349)"
    table["t_width"].description = "10-90 % width of log t / 2.563"
    return table


def _qc_bf(state: _QCFit, table) -> QCResult:
    """:func:`_qc_table`'s table completed with the brighter-fatter and saturation columns."""
    scatter, _, _, _, logt, med = state.metrics
    F, s = state.res[0], state.res[1]
    ft, st, top, bf, spot_bf = _brighter_fatter(state.grids, logt, med, scatter, F, s)
    table["flux_slope"] = ft
    table["size_slope"] = st
    table["top_peak_t"] = top
    table["bf_flag"] = bf
    table["flux_slope"].description = "d log t / d log peak"
    table["size_slope"].description = "d log size / d log peak (spot's median divided out)"
    table["top_peak_t"].description = "median log t of the brightest tenth of the peaks minus the rest's"
    return QCResult(table=table, exclude=state.exclude, fit=state.res, registered=state.registered,
                    spot_bf=spot_bf)


def _describe(kind: str, scatter: float, width: float, rejected: float, r: float, reg: str) -> str:
    if kind == "forced":
        return "dropped by the user"
    text = {"scatter": f"scatter of t {scatter:.2%}",
            "width": f"10-90 % width of t {width:.2%} (a part of the spots off)",
            "pairs": "disagrees with every other exposure, pair by pair",
            "rejected": f"{rejected:.0%} of points rejected",
            "pattern": f"flux pattern uncorrelated with the consensus (r = {r:.2f})"}.get(kind, kind)
    if reg != "identity":
        text += f"; labels fit better as {reg}"
    return f"outlier: {text}"
