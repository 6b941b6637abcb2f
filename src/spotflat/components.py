"""Spots vs flat by component: amplifier steps, within-amplifier structure, all.

Amplifier seams, the mid-line and the CCD edges sit at the same pixels in the
spot throughput ``t`` and in the flat ``q`` whatever the flat: an unrelated
flat still has gain steps exactly where the spots do. A correlation over all
points is then dominated by a few dozen seam segments, and errors that treat
2401 spots as independent (or a null that moves the flat's seams away from
the spots') are far too small. :func:`analyse_components` therefore splits the
comparison (DESIGN.md section 2, "shared geometry is not shared response"):

``amp``
    Amplifier-level steps. Per point, ``t = c_k + G_a + P(x, y) + w`` is fitted
    by least squares with one constant ``c_k`` per spot (``t`` is relative to
    the spot's own mean, so only spots whose dithers cross a seam say anything
    about ``G``), one level ``G_a`` per amplifier and a smooth cubic surface
    ``P`` over the CCD (the CCOB illumination, which is continuous across
    seams and must not leak into the steps). The same fit is done for ``q``.
    The levels are known only within each group of amplifiers connected by
    seam-crossing spots (the mid-line band is left out of the fit, so each
    amplifier row is one group, and the row-to-row offset -- shared with the
    mid-line -- is not used). The ~16 pairs ``(G_t, G_q)`` are then a small-N
    comparison with small-N errors: Fisher-z interval of r, Student-t
    p-value, ordinary least-squares slope with a Student-t interval, degrees
    of freedom counted after the group means are removed. A permutation of
    the levels within groups (amplifiers of the same read-out row) gives a
    second p-value (``p_value_perm``).
``within``
    Within-amplifier structure: the residuals ``w`` of the same fits (seams,
    the smooth illumination and each spot's mean taken out of both sides),
    with points near seams, the mid-line and the edges (whose shape is shared
    by every flat of the detector) left out. Errors: a block jackknife over
    square patches of the spot grid, Student-t with ``G - 1`` degrees of
    freedom for the interval and the p-value.
``all``
    Every point, ``t`` against ``q`` as they are. Its variance under an
    unrelated flat is set by the amplifier steps, so its errors are a block
    jackknife over amplifiers (Student-t, ``G - 1`` degrees of freedom).

Every slope is corrected for the flat's own noise (errors in variables,
:mod:`spotflat.eiv`): ``slope = slope_raw / reliability``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

from .errors import InputError

__all__ = ["ComponentResult", "Decomposition", "boundary_keep", "decompose", "analyse_components",
           "RECOMMENDED_COLUMNS", "COMPONENTS"]

#: Recommended columns of every results row, in order.
RECOMMENDED_COLUMNS = ("r", "r_err", "r_low", "r_high", "p_value", "slope", "slope_err", "slope_low",
                       "slope_high")

COMPONENTS = ("all", "amp", "within")


@dataclass
class ComponentResult:
    """The recommended answer for one component, with its method-specific extras.

    Attributes
    ----------
    component : str
        ``"all"``, ``"amp"`` or ``"within"``.
    r, r_err, r_low, r_high : float
        Correlation, its standard error and 95 % interval.
    p_value : float
        Two-sided p-value of ``r = 0``.
    slope, slope_err, slope_low, slope_high : float
        Slope of ``a`` on ``b`` corrected for the flat's noise, its error and
        95 % interval.
    slope_raw : float
        Least-squares slope before the correction.
    reliability : float
        ``var(q_true) / var(q)``: ``slope = slope_raw / reliability`` (1 when
        the flat's noise is unknown).
    ndof : int
        Degrees of freedom of the Student-t intervals (amplifier levels or
        blocks minus one).
    nunit : int
        Independent units behind the errors (amplifiers or blocks).
    nspot, npoint : int
        Spots and points used.
    error_method : str
        How the recommended errors were made.
    extra : dict
        Method-specific numbers (bootstrap, jackknife, null, permutation).
    """

    component: str
    r: float
    r_err: float
    r_low: float
    r_high: float
    p_value: float
    slope: float
    slope_err: float
    slope_low: float
    slope_high: float
    slope_raw: float
    reliability: float
    ndof: int
    nunit: int
    nspot: int
    npoint: int
    error_method: str
    extra: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        """Recommended columns first, then the bookkeeping and the extras."""
        row = {"component": self.component}
        for name in RECOMMENDED_COLUMNS:
            row[name] = getattr(self, name)
        row.update(slope_raw=self.slope_raw, reliability=self.reliability, ndof=self.ndof,
                   nunit=self.nunit, nspot=self.nspot, npoint=self.npoint,
                   error_method=self.error_method)
        row.update(self.extra)
        return row


def _t_interval(value: float, err: float, dof: int, confidence: float = 0.95) -> tuple[float, float]:
    if not (np.isfinite(value) and np.isfinite(err)) or dof < 1:
        return float("nan"), float("nan")
    tq = float(sps.t.ppf(0.5 + confidence / 2, dof))
    return value - tq * err, value + tq * err


def _t_pvalue(value: float, err: float, dof: int) -> float:
    if not (np.isfinite(value) and np.isfinite(err)) or err <= 0 or dof < 1:
        return float("nan")
    return float(2 * sps.t.sf(abs(value) / err, dof))


# --------------------------------------------------------------------------
# decomposition

def boundary_keep(detector: str, x: np.ndarray, y: np.ndarray, seam: float = 2.0,
                  midline: float = 40.0, edge: float = 50.0) -> np.ndarray:
    """Points far enough from seams, the mid-line and the edges for the component fits.

    A footprint straddling a seam sees a blend of two gains that no per-amp
    level describes, and the mid-line and edge features have the same shape
    in every flat of a detector: both would be shared geometry in the
    ``within`` residuals.

    Parameters
    ----------
    detector : str
    x, y : numpy.ndarray
        CCD positions.
    seam, midline, edge : float
        Margins in pixels.

    Returns
    -------
    numpy.ndarray of bool
    """
    from . import geometry

    keep = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(keep, x, 0.0), np.where(keep, y, 0.0)
    for kind, margin in (("amp", seam), ("midline", midline), ("edge", edge)):
        if margin > 0:
            d = geometry.distance_to_boundary(detector, xs, ys, kind=kind)
            keep &= ~(d < margin)
    return keep


def _edge_fraction(edges: np.ndarray, pos: np.ndarray, sigma: np.ndarray | None, radius: float | None):
    """Fraction of a footprint at ``pos`` in each interval between consecutive ``edges`` (1-D)."""
    d = edges[None, :] - pos[:, None]
    if radius is not None:
        z = np.clip(d / radius, -1, 1)  # share of a disc left of a chord at distance d
        cdf = 0.5 + (z * np.sqrt(1 - z * z) + np.arcsin(z)) / np.pi
    elif sigma is not None:
        cdf = sps.norm.cdf(d / np.maximum(sigma, 1e-6)[:, None])
    else:
        cdf = (d > 0).astype(float)
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0  # beyond the CCD edges: renormalised away
    return np.diff(cdf, axis=1)


def amp_weights(detector: str, x: np.ndarray, y: np.ndarray, sigma: np.ndarray | None = None,
                radius: float | None = None) -> np.ndarray:
    """Share of each point's footprint on each amplifier, ``(npoint, namp)``.

    A footprint near a seam sees a blend of the two gains, in the spots and
    in the flat alike; these weights describe the blend, so that the
    amplifier levels are fitted right up to the seams.

    Parameters
    ----------
    detector : str
    x, y : numpy.ndarray
        Positions (1-D).
    sigma : numpy.ndarray, optional
        Per-point Gaussian footprint width; ``radius`` a top-hat instead;
        neither: the amplifier under the centre.

    Returns
    -------
    numpy.ndarray
        Columns in the order of :func:`spotflat.geometry.amp_names`.
    """
    from . import geometry

    d = geometry._det(detector)
    t = d.type
    nrow, ncol = t.amp_grid.shape
    ex = np.arange(ncol + 1) * t.amp_nx - 0.5
    ey = np.arange(nrow + 1) * t.amp_ny - 0.5
    fx = _edge_fraction(ex, x, sigma, radius)
    fy = _edge_fraction(ey, y, sigma, radius)
    names = list(d.amp_names)
    out = np.zeros((x.size, len(names)))
    for r in range(nrow):
        for c in range(ncol):
            out[:, names.index(d.amps[int(t.amp_grid[r, c])].name)] += fy[:, r] * fx[:, c]
    return out


@dataclass
class Decomposition:
    """Amplifier levels and within-amplifier residuals of two quantities.

    Attributes
    ----------
    levels_a, levels_b : numpy.ndarray
        Per-amplifier level of each quantity (NaN where not determined), with
        the mean of each connected group removed.
    group : numpy.ndarray of int
        Connected group of each amplifier (-1: not determined).
    level_var : numpy.ndarray
        Diagonal of ``(X'X)^+`` for the levels (multiply by a per-point noise
        variance to get the levels' variance).
    wa, wb : numpy.ndarray
        ``[spot, exposure]`` residuals (NaN where not used).
    use : numpy.ndarray of bool
        Points used.
    """

    levels_a: np.ndarray
    levels_b: np.ndarray
    group: np.ndarray
    level_var: np.ndarray
    wa: np.ndarray
    wb: np.ndarray
    use: np.ndarray


def _poly_terms(u: np.ndarray, v: np.ndarray, degree: int) -> list[np.ndarray]:
    return [u ** i * v ** (d - i) for d in range(1, degree + 1) for i in range(d + 1)]


def _groups(spot: np.ndarray, amp: np.ndarray, namp: int) -> np.ndarray:
    """Connected groups of amplifiers linked by spots whose points fall on several of them."""
    parent = np.arange(namp)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = np.unique(np.stack([spot, amp], axis=1), axis=0)
    first = {}
    for k, a in pairs:
        if k in first:
            ra, rb = find(first[k]), find(a)
            if ra != rb:
                parent[rb] = ra
        else:
            first[k] = a
    roots = np.array([find(i) for i in range(namp)])
    seen_amp = np.zeros(namp, bool)
    seen_amp[np.unique(amp)] = True
    sizes = np.bincount(roots, weights=seen_amp, minlength=namp)
    group = np.where(seen_amp & (sizes[roots] >= 2), roots, -1)
    labels = np.unique(group[group >= 0])
    return np.array([int(np.searchsorted(labels, g)) if g >= 0 else -1 for g in group])


def decompose(a: np.ndarray, b: np.ndarray, amp: np.ndarray, x: np.ndarray, y: np.ndarray,
              keep: np.ndarray, shape: tuple[int, int], namp: int, degree: int = 3,
              levels: bool = True, detector: str | None = None, sigma: np.ndarray | None = None,
              radius: float | None = None) -> Decomposition:
    """Fit ``c_k + G_amp + P(x, y)`` to ``a`` and ``b``; return the levels and the residuals.

    Parameters
    ----------
    a, b : numpy.ndarray
        ``[spot, exposure]`` quantities (NaN where missing).
    amp : numpy.ndarray of int
        ``[spot, exposure]`` amplifier index of every point (-1 off the CCD).
    x, y : numpy.ndarray
        Positions.
    keep : numpy.ndarray of bool
        Points allowed into the fit (see :func:`boundary_keep`).
    shape : (int, int)
        ``(ny, nx)`` of the CCD (scales the polynomial).
    namp : int
        Number of amplifiers.
    degree : int
        Degree of the smooth surface ``P``.
    levels : bool
        Fit per-amplifier levels (False: only the spot means and ``P``).
    detector, sigma, radius
        With the detector, a point's level is the footprint-weighted blend
        of the amplifiers it covers (:func:`amp_weights`; ``sigma`` per spot).

    Returns
    -------
    Decomposition
    """
    use = keep & np.isfinite(a) & np.isfinite(b) & (amp >= 0)
    # a spot needs two points to say anything relative to its own mean
    use &= use.sum(axis=1, keepdims=True) >= 2
    k, j = np.nonzero(use)
    if k.size < 10:
        raise InputError(f"only {k.size} points away from seams, mid-line and edges for the component fits")
    ny, nx = shape
    u = 2 * x[k, j] / max(nx - 1, 1) - 1
    v = 2 * y[k, j] / max(ny - 1, 1) - 1
    cols = _poly_terms(u, v, degree)
    ai = amp[k, j]
    X = np.empty((k.size, (namp if levels else 0) + len(cols)))
    if levels and detector:
        sig = None if sigma is None else np.asarray(sigma, dtype=float)[k]
        X[:, :namp] = amp_weights(detector, x[k, j], y[k, j], sig, radius)
    elif levels:
        X[:, :namp] = 0.0
        X[np.arange(k.size), ai] = 1.0
    for i, c in enumerate(cols):
        X[:, (namp if levels else 0) + i] = c
    Y = np.stack([a[k, j], b[k, j]], axis=1)
    # spot fixed effects: remove each spot's mean from every column
    spot = np.unique(k, return_inverse=True)[1].ravel()
    n = np.bincount(spot).astype(float)
    for M in (X, Y):
        for c in range(M.shape[1]):
            M[:, c] -= (np.bincount(spot, weights=M[:, c]) / n)[spot]
    XtX = X.T @ X
    pinv = np.linalg.pinv(XtX, rcond=1e-10, hermitian=True)
    beta = pinv @ (X.T @ Y)
    W = Y - X @ beta
    wa = np.full(a.shape, np.nan)
    wb = np.full(a.shape, np.nan)
    wa[k, j], wb[k, j] = W[:, 0], W[:, 1]
    la = np.full(namp, np.nan)
    lb = np.full(namp, np.nan)
    lvar = np.full(namp, np.nan)
    group = np.full(namp, -1)
    if levels:
        group = _groups(k, ai, namp)
        for g in np.unique(group[group >= 0]):
            m = group == g
            la[m] = beta[:namp, 0][m] - beta[:namp, 0][m].mean()
            lb[m] = beta[:namp, 1][m] - beta[:namp, 1][m].mean()
            lvar[m] = np.diag(pinv)[:namp][m]
    return Decomposition(levels_a=la, levels_b=lb, group=group, level_var=lvar, wa=wa, wb=wb, use=use)


# --------------------------------------------------------------------------
# the three components

def _amp_component(dec: Decomposition, noise_per_point: float | None, nperm: int,
                   rng: np.random.Generator, confidence: float, npoint: int, nspot: int) -> ComponentResult:
    ok = np.isfinite(dec.levels_a) & np.isfinite(dec.levels_b) & (dec.group >= 0)
    la, lb, grp = dec.levels_a[ok], dec.levels_b[ok], dec.group[ok]
    n, ngroup = int(ok.sum()), int(np.unique(grp).size)
    dof = n - ngroup - 1  # each group's mean is removed, then the slope
    nan = float("nan")
    if dof < 2:
        return ComponentResult("amp", nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, max(dof, 0), n,
                               nspot, npoint, "too few amplifier levels", {"p_value_perm": nan})
    saa, sbb, sab = float(la @ la), float(lb @ lb), float(la @ lb)
    r = sab / np.sqrt(saa * sbb) if saa > 0 and sbb > 0 else nan
    slope_raw = sab / sbb if sbb > 0 else nan
    resid = la - slope_raw * lb
    slope_err_raw = float(np.sqrt(resid @ resid / dof / sbb)) if sbb > 0 else nan
    lam = 1.0
    if noise_per_point is not None and np.isfinite(noise_per_point) and sbb > 0:
        lam = 1.0 - noise_per_point * float(np.nansum(dec.level_var[ok])) / sbb
        lam = lam if lam > 0.05 else nan
    slope, slope_err = slope_raw / lam, slope_err_raw / lam
    slope_low, slope_high = _t_interval(slope, slope_err, dof, confidence)
    # Fisher z on n - ngroup + 1 effective pairs
    zse = 1.0 / np.sqrt(max(dof - 1, 1))
    zq = float(sps.norm.ppf(0.5 + confidence / 2))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    r_low, r_high = float(np.tanh(z - zq * zse)), float(np.tanh(z + zq * zse))
    r_err = float((1 - r * r) * zse)
    tstat = r * np.sqrt(dof / max(1 - r * r, 1e-300))
    p = float(2 * sps.t.sf(abs(tstat), dof))
    # permutation of the levels within groups (amplifiers of one read-out row)
    p_perm = nan
    if nperm > 0:
        perm = np.tile(np.arange(n), (nperm, 1))
        for g in np.unique(grp):
            idx = np.flatnonzero(grp == g)
            perm[:, idx] = idx[rng.permuted(np.tile(np.arange(idx.size), (nperm, 1)), axis=1)]
        rn = (la[perm] @ lb) / np.sqrt(saa * sbb)
        p_perm = float((1 + np.sum(np.abs(rn) >= abs(r) - 1e-12)) / (1 + nperm))
    return ComponentResult("amp", float(r), r_err, r_low, r_high, p, float(slope), float(slope_err),
                           slope_low, slope_high, float(slope_raw), float(lam), dof, n, nspot, npoint,
                           f"{n} amplifier levels in {ngroup} read-out rows: Fisher z, Student t ({dof} dof)",
                           {"p_value_perm": p_perm})


def _method_extras(res) -> dict:
    """Method-specific columns of a :class:`spotflat.stats.CorrelationResult`."""
    return {
        "r_err_bootstrap": res.r_err_bootstrap, "ci_low": res.ci_low, "ci_high": res.ci_high,
        "bca_low": res.bca_low, "bca_high": res.bca_high, "r_err_jackknife": res.r_err_jackknife,
        "r_err_block": res.r_err_block, "block": res.block, "nblocks": res.nblocks,
        "r_null_mean": res.r_null_mean, "r_null_std": res.r_null_std, "nnull": res.nnull,
        "p_value_null": res.p_value, "slope_err_bootstrap": res.slope_err,
        "slope_err_jackknife": res.slope_err_jackknife, "slope_err_block": res.slope_err_block,
        "intercept": res.intercept, "method": res.method,
    }


def _from_block(component: str, res, lam: float, confidence: float, how: str) -> ComponentResult:
    dof = int(res.nblocks) - 1
    r_err = float(res.r_err_block)
    r_low, r_high = _t_interval(res.r, r_err, dof, confidence)
    lam_ok = lam if np.isfinite(lam) else float("nan")
    slope, slope_err = res.slope / lam_ok, res.slope_err_block / lam_ok
    slope_low, slope_high = _t_interval(slope, slope_err, dof, confidence)
    return ComponentResult(component, float(res.r), r_err, max(r_low, -1.0), min(r_high, 1.0),
                           _t_pvalue(res.r, r_err, dof), float(slope), float(slope_err), slope_low,
                           slope_high, float(res.slope), float(lam), dof, int(res.nblocks), int(res.nspot),
                           int(res.npoint), f"{how}: block jackknife over {res.nblocks} {res.block} "
                                            f"blocks, Student t ({dof} dof)", _method_extras(res))


def analyse_components(a: np.ndarray, b: np.ndarray, *, detector: str, x: np.ndarray, y: np.ndarray,
                       grid_shape: tuple[int, int], components=COMPONENTS, spot_amp=None,
                       footprint_sigma: np.ndarray | None = None, footprint_radius: float | None = None,
                       flat_electrons: float | None = None, b_is_flat: bool = True,
                       nboot: int = 1000, nnull: int = 1000, patch_size: int = 7,
                       seed: int | np.random.Generator | None = 0, method: str = "pearson",
                       confidence: float = 0.95, margins: tuple[float, float, float] = (2.0, 40.0, 50.0),
                       progress=None) -> tuple[list[ComponentResult], dict]:
    """The spot-vs-flat comparison of one quantity, split into components.

    Parameters
    ----------
    a, b : numpy.ndarray
        ``[spot, exposure]`` arrays, e.g. ``t`` and ``q``; the slope is that of
        ``a`` on ``b``.
    detector : str
        Detector (amplifier layout).
    x, y : numpy.ndarray
        ``[spot, exposure]`` CCD positions.
    grid_shape : (int, int)
        ``(nrows, ncols)`` of the spot grid.
    components : sequence of str
        Any of :data:`COMPONENTS`.
    spot_amp : array_like, optional
        Amplifier of each spot (block labels of the ``all`` row); default:
        the amplifier at each spot's mean position.
    footprint_sigma, footprint_radius
        Per-spot Gaussian width or top-hat radius used to sample the flat
        (for the flat's noise).
    flat_electrons : float, optional
        Electrons per pixel of the flat; None: the slope is not corrected.
    b_is_flat : bool
        ``b`` is the flat's relative response ``q`` itself (its noise is
        then known); False for derived quantities such as gradients, whose
        slope is left uncorrected.
    nboot, nnull : int
        Bootstrap and null (and permutation) resamples.
    patch_size : int
        Patch size (grid steps) of the ``within`` block jackknife.
    seed : int, Generator or None
    method : {"pearson", "spearman"}
        For the method-specific columns; the recommended ``r`` is Pearson.
    confidence : float
        Coverage of the intervals.
    margins : (float, float, float)
        Seam, mid-line and edge margins (pixels) of :func:`boundary_keep`.
    progress : callable, optional
        Called with 1 after each component.

    Returns
    -------
    list of ComponentResult
        One per component, in the order asked.
    dict
        ``component -> CorrelationResult`` of the method-specific analyses.
    """
    from . import eiv, geometry
    from .stats import correlation_analysis

    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise InputError(f"unknown component {bad[0]!r}", expected=", ".join(COMPONENTS))
    rng = np.random.default_rng(seed)
    children = rng.integers(0, 2 ** 63 - 1, size=len(components))
    names = list(geometry.amp_names(detector))
    shape = tuple(geometry.ccd_shape(detector))
    valid = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        labels = np.asarray(geometry.amp_of_pixel(detector, np.where(valid, x, -1e9), np.where(valid, y, -1e9)))
    lookup = {n: i for i, n in enumerate(names)}
    amp = np.vectorize(lambda s: lookup.get(s, -1), otypes=[int])(labels) if labels.size else labels
    nrows, ncols = grid_shape
    electrons = flat_electrons if b_is_flat else None

    dec = None
    if "amp" in components or "within" in components:
        keep = boundary_keep(detector, x, y, *margins)
        dec = decompose(a, b, amp, x, y, keep & valid, shape, len(names), detector=detector,
                        sigma=footprint_sigma, radius=footprint_radius)
    noise = {}
    if electrons is not None and (footprint_sigma is not None or footprint_radius is not None):
        masks = {"all": valid} if "all" in components else {}
        if dec is not None:
            masks["dec"] = dec.use
        sums = eiv.demeaned_noise(x, y, list(masks.values()), footprint_sigma, footprint_radius, electrons)
        noise = dict(zip(masks, sums))

    def noise_sum(use):
        key = "all" if use is valid else "dec"
        return noise.get(key)
    out, raw = [], {}
    for comp_name, child in zip(components, children):
        crng = np.random.default_rng(child)
        if comp_name == "all":
            if spot_amp is None:
                with np.errstate(invalid="ignore"):
                    xm = np.nanmean(np.where(valid, x, np.nan), axis=1)
                    ym = np.nanmean(np.where(valid, y, np.nan), axis=1)
                spot_amp = geometry.amp_of_pixel(detector, np.nan_to_num(xm, nan=-1e9),
                                                 np.nan_to_num(ym, nan=-1e9))
            res = correlation_analysis(a, b, grid_shape=grid_shape, block="amp", block_labels=spot_amp,
                                       nboot=nboot, nnull=nnull, seed=crng, method=method,
                                       confidence=confidence)
            lam = 1.0
            ns = noise_sum(valid)
            if ns is not None:
                bb = np.where(valid, b - np.sum(b, where=valid) / valid.sum(), 0.0)
                lam = eiv.reliability(ns, float(np.sum(bb * bb)))
            out.append(_from_block("all", res, lam, confidence, "all points"))
            raw["all"] = res
        elif comp_name == "amp":
            ns = noise_sum(dec.use)
            per_point = None if ns is None else ns / max(int(dec.use.sum()), 1)
            out.append(_amp_component(dec, per_point, nnull, crng, confidence, int(dec.use.sum()),
                                      int(dec.use.any(axis=1).sum())))
        else:
            res = correlation_analysis(dec.wa, dec.wb, grid_shape=grid_shape, block="patch",
                                       patch_size=patch_size, nboot=nboot, nnull=nnull, seed=crng,
                                       method=method, confidence=confidence)
            lam = 1.0
            ns = noise_sum(dec.use)
            if ns is not None:
                lam = eiv.reliability(ns, float(np.nansum(dec.wb ** 2)))
            out.append(_from_block("within", res, lam, confidence, "seams, illumination and spot means removed"))
            raw["within"] = res
        if progress is not None:
            progress(1)
    return out, raw
