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
    p-value, least-squares slope with a Student-t interval whose error
    allows for the levels' correlated estimation noise (:func:`_level_residual_cov`),
    degrees of freedom counted after the group means are removed. A permutation of
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
    unrelated flat is set by the amplifier steps, so its errors are built
    from a step part (the amplifier levels) and a within part (block
    jackknife over patches), Student-t with the levels' degrees of freedom
    (:func:`_all_composite`).

Every slope is corrected for the flat's own noise (errors in variables,
:mod:`spotflat.eiv`): ``slope = slope_raw / reliability``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import special

from .errors import InputError

__all__ = ["ComponentResult", "Decomposition", "boundary_keep", "seam_margin", "decompose", "analyse_components",
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


# Student t and normal tails from scipy.special: the same functions scipy.stats.t / norm evaluate
# (stdtr, stdtrit, ndtr, ndtri), without the ~0.6 s import of scipy.stats on every run
def _t_sf(x: float, dof: float) -> float:
    """Upper tail ``P(T > x)`` of Student's t with ``dof`` degrees of freedom (NaN unless dof > 0)."""
    return float(special.stdtr(dof, -x)) if dof > 0 else float("nan")


def _t_ppf(q: float, dof: float) -> float:
    """Quantile of Student's t (NaN unless dof > 0)."""
    return float(special.stdtrit(dof, q)) if dof > 0 else float("nan")


def _t_interval(value: float, err: float, dof: int, confidence: float = 0.95) -> tuple[float, float]:
    if not (np.isfinite(value) and np.isfinite(err)) or dof < 1:
        return float("nan"), float("nan")
    tq = _t_ppf(0.5 + confidence / 2, dof)
    return value - tq * err, value + tq * err


def _t_pvalue(value: float, err: float, dof: int) -> float:
    if not (np.isfinite(value) and np.isfinite(err)) or err <= 0 or dof < 1:
        return float("nan")
    return 2 * _t_sf(abs(value) / err, dof)


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
        cdf = special.ndtr(d / np.maximum(sigma, 1e-6)[:, None])
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
    level_cov : numpy.ndarray or None
        The levels' block of ``(X'X)^+`` (multiply by a per-point noise
        variance for their covariance; remove each group's mean before use:
        the raw block carries the near-degenerate group-constant direction).
    wa, wb : numpy.ndarray
        ``[spot, exposure]`` residuals (NaN where not used).
    use : numpy.ndarray of bool
        Points used.
    amp_dot_b : numpy.ndarray or None
        ``X' b`` of the amplifier columns ``X`` (demeaned as in the fit):
        how the spots' levels enter ``sum(a b)`` given ``b``.
    amp_proj_b : float
        ``(X' b)' (X'X)^+ (X' b)`` over the amplifier columns: the variance,
        per unit per-point noise variance of ``a``, of the part of
        ``sum(a b)`` that point noise contributes through the fitted levels.
    nparam : int
        Parameters of the fit (spot and exposure means, levels, surface):
        the residuals' degrees of freedom are the points used minus these.
    """

    levels_a: np.ndarray
    levels_b: np.ndarray
    group: np.ndarray
    wa: np.ndarray
    wb: np.ndarray
    use: np.ndarray
    amp_dot_b: np.ndarray | None = None
    amp_proj_b: float = float("nan")
    level_cov: np.ndarray | None = None
    nparam: int = 0


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
              radius: float | None = None, exposures: bool = True) -> Decomposition:
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
    exposures : bool
        Also remove each exposure's mean (a factor common to all spots of one
        dither); the last step removes the spot means exactly.

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
    # spot and exposure fixed effects: t and q are relative to their spot's and their exposure's
    # means, and a factor shared by all spots of one exposure (the grid-averaged response at that
    # dither) is the same for every spot -- one number per exposure, not 2401 independent ones
    spot = np.unique(k, return_inverse=True)[1].ravel()
    n = np.bincount(spot).astype(float)
    nj = np.bincount(j, minlength=a.shape[1]).astype(float)
    nj[nj == 0] = 1.0
    from scipy import sparse

    M = np.hstack([X, Y])
    rows = np.arange(k.size)
    S = sparse.csr_matrix((np.ones(k.size), (rows, spot)), shape=(k.size, n.size))
    E = sparse.csr_matrix((np.ones(k.size), (rows, j)), shape=(k.size, a.shape[1]))
    St, Et = S.T.tocsr(), E.T.tocsr()

    def by_spot(M):
        M -= S @ ((St @ M) / n[:, None])

    for _ in range(4 if exposures else 1):  # alternating projections converge in a few steps
        by_spot(M)
        if exposures:
            M -= E @ ((Et @ M) / nj[:, None])
    if exposures:
        by_spot(M)
    X, Y = np.ascontiguousarray(M[:, :X.shape[1]]), np.ascontiguousarray(M[:, X.shape[1]:])
    XtX = X.T @ X
    pinv = np.linalg.pinv(XtX, rcond=1e-10, hermitian=True)
    beta = pinv @ (X.T @ Y)
    W = Y - X @ beta
    wa = np.full(a.shape, np.nan)
    wb = np.full(a.shape, np.nan)
    wa[k, j], wb[k, j] = W[:, 0], W[:, 1]
    la = np.full(namp, np.nan)
    lb = np.full(namp, np.nan)
    group = np.full(namp, -1)
    if levels:
        group = _groups(k, ai, namp)
        for g in np.unique(group[group >= 0]):
            m = group == g
            la[m] = beta[:namp, 0][m] - beta[:namp, 0][m].mean()
            lb[m] = beta[:namp, 1][m] - beta[:namp, 1][m].mean()
    dot_b = X[:, :namp].T @ Y[:, 1] if levels else None
    proj_b = float(dot_b @ pinv[:namp, :namp] @ dot_b) if levels else float("nan")
    nparam = int(n.size + np.unique(j).size + X.shape[1])
    return Decomposition(levels_a=la, levels_b=lb, group=group, wa=wa, wb=wb, use=use,
                         amp_dot_b=dot_b, amp_proj_b=proj_b,
                         level_cov=pinv[:namp, :namp].copy() if levels else None, nparam=nparam)


# --------------------------------------------------------------------------
# the three components

def _level_residual_cov(dec: Decomposition, ok: np.ndarray, grp: np.ndarray, la: np.ndarray, lb: np.ndarray,
                        slope_raw: float, resid: np.ndarray, dof: int) -> tuple[float, float, np.ndarray]:
    """How the levels' residuals about their regression scatter: gains, and estimation noise.

    The levels are estimated jointly, tied together only by the spots whose dithers cross a seam,
    so their estimation errors are strongly correlated (covariance ``sigma2 V``, ``V`` the levels'
    block of ``(X'X)^+`` with each group's mean removed), while a flat of another CCD differs by
    gains independent per amplifier (``s2 I``). ``s2`` and a scale ``c >= 1`` of the point noise
    ``sigma2`` (measured on the within-amplifier residuals) are fitted to the residuals
    (:func:`_level_scatter_ml`). Returns ``s2``, ``c sigma2`` and ``V``.
    """
    n = la.size
    idx = np.flatnonzero(ok)
    Mg = np.eye(n) - (grp[:, None] == grp[None, :]) / np.bincount(grp)[grp][None, :]
    V = Mg @ dec.level_cov[np.ix_(idx, idx)] @ Mg.T
    w = np.isfinite(dec.wa) & np.isfinite(dec.wb)
    e = dec.wa[w] - slope_raw * dec.wb[w]
    sigma2 = float(e @ e) / max(int(w.sum()) - dec.nparam, 1)
    IH = np.eye(n) - np.outer(lb, lb) / float(lb @ lb)
    s2, c = _level_scatter_ml(resid, IH @ Mg, IH @ V @ IH, sigma2, dof)
    return s2, c * sigma2, V


def _level_scatter_ml(resid: np.ndarray, P: np.ndarray, VP: np.ndarray, sigma2: float,
                      dof: int) -> tuple[float, float]:
    """Gain scatter ``s2`` and noise scale ``c`` of level residuals with covariance ``s2 P + c sigma2 VP``.

    ``P`` projects on the residual space (group means and the slope removed), ``VP`` is the levels'
    estimation covariance per unit point noise seen there. Restricted maximum likelihood on the
    ``dof`` residual directions, with ``c >= 1`` (the levels are at least as noisy as white point
    noise makes them; near the seams, where they are measured, the noise is somewhat larger).
    The two terms are told apart by their shapes: ``VP`` is dominated by a few smooth modes
    along each chain of amplifiers, ``P`` is flat.
    """
    from scipy.optimize import minimize

    w, U = np.linalg.eigh((P + P.T) / 2)
    Q = U[:, w > 0.5][:, -dof:] if dof > 0 else U[:, :0]
    z = Q.T @ resid
    A = Q.T @ VP @ Q * sigma2
    scale = max(float(z @ z) / max(dof, 1), 1e-300)

    def nll(p):
        S = np.exp(p[0]) * scale * np.eye(Q.shape[1]) + (1.0 + np.exp(p[1])) * A
        _, logdet = np.linalg.slogdet(S)
        return 0.5 * (logdet + z @ np.linalg.solve(S, z))

    best = None
    for p0 in ((np.log(1e-3), np.log(0.1)), (0.0, np.log(0.1)), (np.log(1e-6), 0.0)):
        r = minimize(nll, np.array(p0), method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-6})
        if best is None or r.fun < best.fun:
            best = r
    return float(np.exp(best.x[0]) * scale), float(1.0 + np.exp(best.x[1]))


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
    slope_err_raw, s2, s2_noise, trace_v = nan, nan, nan, nan
    if sbb > 0:
        # sandwich error of the least-squares slope under the residuals' covariance s2 I + c sigma2 V:
        # ordinary least squares (independent residuals) gave 0.71x the spread for a matching flat,
        # whose residuals are the levels' correlated estimation noise
        s2, s2_noise, V = _level_residual_cov(dec, ok, grp, la, lb, slope_raw, resid, dof)
        slope_err_raw = float(np.sqrt(s2 * sbb + s2_noise * float(lb @ V @ lb)) / sbb)
        trace_v = float(np.trace(V))
    lam = 1.0
    if noise_per_point is not None and np.isfinite(noise_per_point) and sbb > 0:
        # the flat's noise in the (group-demeaned) levels: trace of their covariance per unit point noise
        # (the raw diagonal of (X'X)^+ carries the near-degenerate group-constant direction, ~100x more)
        lam = 1.0 - noise_per_point * trace_v / sbb
        lam = lam if lam > 0.05 else nan
    slope, slope_err = slope_raw / lam, slope_err_raw / lam
    slope_low, slope_high = _t_interval(slope, slope_err, dof, confidence)
    # Fisher z on n - ngroup + 1 effective pairs
    zse = 1.0 / np.sqrt(max(dof - 1, 1))
    zq = float(special.ndtri(0.5 + confidence / 2))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    r_low, r_high = float(np.tanh(z - zq * zse)), float(np.tanh(z + zq * zse))
    r_err = float((1 - r * r) * zse)
    tstat = r * np.sqrt(dof / max(1 - r * r, 1e-300))
    p = 2 * _t_sf(abs(tstat), dof)
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
                           {"p_value_perm": p_perm, "_resid_var": float(resid @ resid / dof),
                            "_level_scatter": s2, "_level_noise": s2_noise})


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


def _corrected_slope_jackknife(a, b, labels, noise_k) -> tuple[float, float]:
    """Errors-in-variables slope ``cov / (var - noise)`` and its block-jackknife error.

    The noise is known spot by spot, so each delete-a-block replicate
    subtracts the noise of the spots it keeps: when the flat's noise
    dominates the variance of ``b``, the fluctuation of that variance is
    what limits the corrected slope, and the replicates see it.
    """
    from .resampling import jackknife_se
    from .stats import _moments, spot_sums

    m = spot_sums(a, b).matrix
    has = m[:, 0] > 0
    lab = np.unique(np.asarray(labels)[has], return_inverse=True)[1].ravel()
    m, e = m[has], np.asarray(noise_k, dtype=float)[has]
    g = int(lab.max()) + 1
    blk = np.stack([np.bincount(lab, weights=m[:, i], minlength=g) for i in range(6)], axis=1)
    eb = np.bincount(lab, weights=e, minlength=g)

    def slope(tot, noise):
        cab, _, cbb = _moments(tot)
        den = cbb - noise
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, cab / den, np.nan)

    tot = blk.sum(axis=0)
    return float(slope(tot, e.sum())), jackknife_se(slope(tot - blk, e.sum() - eb))


def _from_block(component: str, res, lam: float, confidence: float, how: str,
                corrected: tuple[float, float] | None = None) -> ComponentResult:
    dof = int(res.nblocks) - 1
    r_err = float(res.r_err_block)
    r_low, r_high = _t_interval(res.r, r_err, dof, confidence)
    lam_ok = lam if np.isfinite(lam) else float("nan")
    if corrected is not None:
        slope, slope_err = corrected
    else:
        slope, slope_err = res.slope / lam_ok, res.slope_err_block / lam_ok
    slope_low, slope_high = _t_interval(slope, slope_err, dof, confidence)
    return ComponentResult(component, float(res.r), r_err, max(r_low, -1.0), min(r_high, 1.0),
                           _t_pvalue(res.r, r_err, dof), float(slope), float(slope_err), slope_low,
                           slope_high, float(res.slope), float(lam), dof, int(res.nblocks), int(res.nspot),
                           int(res.npoint), f"{how}: block jackknife over {res.nblocks} {res.block} "
                                            f"blocks, Student t ({dof} dof)", _method_extras(res))


def _all_composite(res, dec: Decomposition, amp_row: ComponentResult, within_raw, lam: float,
                   corrected: tuple[float, float] | None, noise_all: float | None, saa: float, sbb: float,
                   confidence: float, patch: np.ndarray, noise_k: np.ndarray | None = None) -> ComponentResult:
    """The ``all`` row with errors from its two parts: amplifier steps and within-amplifier structure.

    ``sum(da db)`` over all points is (nearly) the spots' step part
    ``sum_a G_a (X_a' db)`` plus the within part ``sum(w_a db)`` (``X`` the
    spot-demeaned amplifier columns, ``w`` the residuals of the fit).

    For ``r`` (whose error matters under an unrelated flat) the step part
    varies as ``s**2 |X' db|**2`` with ``s**2`` the scatter of the spots'
    levels about their regression on the flat's, and the within part as the
    covariance ``sum(w_a w_b)`` does (its block-jackknife ``r`` error).

    For the slope only what varies *given the flat* counts: the residual
    ``a - slope b``. Its step part is ``s2 |X' b|**2 + c sigma2 (X'b)' (X'X)^+ (X'b)``
    (gain scatter independent per amplifier, and the levels' correlated
    estimation noise; :func:`_level_residual_cov`), its within part a block
    jackknife over ``patch`` of the spots' ``sum((w_a - slope w_b) w_b) + slope n_k``
    (``n_k`` the flat's expected noise, so that the errors-in-variables
    correction's own scatter is in it). The variance of the covariance that
    ``r`` uses overstated the slope's error of a matching flat 3.3-fold.
    Student t with the amp row's degrees of freedom. ``saa``, ``sbb``:
    centred sums of squares of the row's ``a`` and ``b``.
    """
    from .resampling import jackknife_se

    ok = np.isfinite(dec.levels_a) & (dec.group >= 0)
    s2 = amp_row.extra.get("_resid_var", np.nan)
    w = np.isfinite(dec.wa) & np.isfinite(dec.wb)
    aw, bw = float(np.sum(dec.wa[w] ** 2)), float(np.sum(dec.wb[w] ** 2))
    xb2 = float(np.sum(np.where(ok, dec.amp_dot_b, 0.0) ** 2))
    # r: given b, the spots' levels enter sum(da db) through X' b: steps, illumination and all of b
    var_step = s2 * xb2
    var_w = float(within_raw.r_err_block) ** 2 * aw * bw  # the within part, over all its points
    sd_cov = np.sqrt(var_step + var_w)
    dof = max(int(amp_row.ndof), 1)
    r_err = float(sd_cov / np.sqrt(saa * sbb))
    r_low, r_high = _t_interval(res.r, r_err, dof, confidence)
    if corrected is not None:
        slope = corrected[0]
        den = sbb - (noise_all or 0.0)
    else:
        slope = res.slope / lam if np.isfinite(lam) else float("nan")
        den = sbb * (lam if np.isfinite(lam) else float("nan"))
    # slope: the residual about the slope, given the flat
    var_step_s = amp_row.extra.get("_level_scatter", np.nan) * xb2 \
        + amp_row.extra.get("_level_noise", np.nan) * dec.amp_proj_b
    beta = slope if np.isfinite(slope) else 0.0
    uk = np.where(w, (dec.wa - beta * dec.wb) * dec.wb, 0.0).sum(axis=1)
    if noise_k is not None:
        uk = uk + beta * np.asarray(noise_k, dtype=float)
    lab = np.unique(np.asarray(patch), return_inverse=True)[1].ravel()
    ug = np.bincount(lab, weights=uk)
    var_w_s = jackknife_se(ug.sum() - ug) ** 2
    sd_slope = np.sqrt(var_step_s + var_w_s)
    slope_err = float(sd_slope / den) if den > 0 else float("nan")
    slope_low, slope_high = _t_interval(slope, slope_err, dof, confidence)
    extra = _method_extras(res)
    extra["slope_err_jackknife_corrected"] = corrected[1] if corrected is not None else float("nan")
    return ComponentResult("all", float(res.r), r_err, max(r_low, -1.0), min(r_high, 1.0),
                           _t_pvalue(res.r, r_err, dof), float(slope), slope_err, slope_low, slope_high,
                           float(res.slope), float(lam), dof, int(amp_row.nunit), int(res.nspot), int(res.npoint),
                           f"all points: amplifier-step part from {amp_row.nunit} levels + within part "
                           f"(block jackknife), Student t ({dof} dof)", extra)


#: Seam margin (pixels) of the ``all`` row's step part (:func:`_all_composite`).
ALL_SEAM_MARGIN = 2.0


def seam_margin(sigma: np.ndarray | float | None = None, radius: float | None = None) -> float:
    """Pixels from a seam beyond which a footprint sees one amplifier: three Gaussian widths
    (the median of the per-spot ``sigma``), the top-hat ``radius`` plus one pixel; 5 px
    without either (three widths of a typical Gaussian-weighted spot); at least 2 px."""
    if radius is not None and np.isfinite(radius):
        return max(2.0, float(radius) + 1.0)
    sig = np.asarray(sigma, dtype=float) if sigma is not None else np.array([])
    sig = sig[np.isfinite(sig)]
    return max(2.0, 3.0 * float(np.median(sig))) if sig.size else 5.0


def analyse_components(a: np.ndarray, b: np.ndarray, *, detector: str, x: np.ndarray, y: np.ndarray,
                       grid_shape: tuple[int, int], components=COMPONENTS, spot_amp=None,
                       footprint_sigma: np.ndarray | None = None, footprint_radius: float | None = None,
                       flat_electrons: float | None = None, b_is_flat: bool = True,
                       nboot: int = 1000, nnull: int = 1000, patch_size: int = 10, within_seam: float = 6.0,
                       block: str = "amp",
                       seed: int | np.random.Generator | None = 0, method: str = "pearson",
                       confidence: float = 0.95,
                       margins: tuple[float | None, float, float] = (None, 40.0, 50.0),
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
        Patch size (grid steps) of the ``within`` block jackknife (10: 25
        blocks of ~650 px on a 49 x 49 grid, larger than the correlation
        length of what is left within the amplifiers).
    block : {"amp", "patch"}
        Blocks of the ``all`` row's method-specific block jackknife
        (``r_err_block``, ``slope_err_block``): the spots' amplifiers or
        patches of ``patch_size``. The recommended errors do not depend on it.
    within_seam : float
        Points closer than this (pixels) to a seam are left out of the
        ``within`` residuals.
    seed : int, Generator or None
    method : {"pearson", "spearman"}
        For the method-specific columns; the recommended ``r`` is Pearson.
    confidence : float
        Coverage of the intervals.
    margins : (float or None, float, float)
        Seam, mid-line and edge margins (pixels) of :func:`boundary_keep`.
        The seam margin (None: :func:`seam_margin` of the footprint) keeps
        the level fits away from the points whose footprint blends two
        gains: the calibration's point rejection judges them against cells
        that do not resolve the blend, so the ones it drops are biased, and
        with a 2 px margin the amplifier-level slope of a flat that sees the
        spots' response was 0.994 (80 realisations, +-0.002), its error
        0.76x its spread; with 3 footprint widths, 1.000 and 1.12x
        (``benchmarks/amp_noise_sources.py``).
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
    from .resampling import patch_labels
    from .stats import _centred, correlation_analysis, grid_layout

    if block not in ("amp", "patch"):
        raise InputError(f"unknown block {block!r}", expected="amp or patch")
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise InputError(f"unknown component {bad[0]!r}", expected=", ".join(COMPONENTS))
    rng = np.random.default_rng(seed)
    children = rng.integers(0, 2 ** 63 - 1, size=3)
    names = list(geometry.amp_names(detector))
    shape = tuple(geometry.ccd_shape(detector))
    valid = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        labels = np.asarray(geometry.amp_of_pixel(detector, np.where(valid, x, -1e9), np.where(valid, y, -1e9)))
    lookup = {n: i for i, n in enumerate(names)}
    amp = np.vectorize(lambda s: lookup.get(s, -1), otypes=[int])(labels) if labels.size else labels
    nrows, ncols = grid_shape
    electrons = flat_electrons if b_is_flat else None

    if margins[0] is None:
        margins = (seam_margin(footprint_sigma, footprint_radius), *margins[1:])
    keep = boundary_keep(detector, x, y, *margins)
    dec = decompose(a, b, amp, x, y, keep & valid, shape, len(names), detector=detector,
                    sigma=footprint_sigma, radius=footprint_radius)
    # the within residuals keep away from the seams, where any error in the modelled blend of two gains
    # would be shared geometry again; each spot's mean is taken out again over the points kept
    wuse = dec.use & boundary_keep(detector, x, y, within_seam, 0.0, 0.0)
    wuse &= wuse.sum(axis=1, keepdims=True) >= 2
    nk = np.maximum(wuse.sum(axis=1, keepdims=True), 1)
    wa, wb = (np.where(wuse, w - np.sum(w, axis=1, where=wuse, keepdims=True) / nk, np.nan)
              for w in (dec.wa, dec.wb))
    if "all" in components:
        # all points, with only the smooth CCOB illumination (no spot sees it) and the spot means removed
        smooth = decompose(a, b, amp, x, y, valid, shape, len(names), levels=False)
        a_all, b_all, valid_all = smooth.wa, smooth.wb, smooth.use
        # the all row has the mid-line steps too: its step part comes from a fit across the mid-line
        # (2 px, not the level fit's margin: the all row's errors were calibrated this way --
        # with the wider margin its null p < 0.05 rose from 8 % to 13 % on the same 100 seeds)
        keep_all = boundary_keep(detector, x, y, ALL_SEAM_MARGIN, 0.0, margins[2])
        dec_all = decompose(a, b, amp, x, y, keep_all & valid, shape, len(names), detector=detector,
                            sigma=footprint_sigma, radius=footprint_radius)
    noise = {}
    if electrons is not None and (footprint_sigma is not None or footprint_radius is not None):
        masks = {"all": valid_all} if "all" in components else {}
        if "amp" in components:
            masks["dec"] = dec.use
        masks["within"] = wuse
        if "all" in components:
            masks["dec_all"] = dec_all.use
        per_spot = eiv.demeaned_noise(x, y, list(masks.values()), footprint_sigma, footprint_radius,
                                      electrons, per_spot=True)
        noise = dict(zip(masks, per_spot))

    def noise_sum(key):
        return float(noise[key].sum()) if key in noise else None
    seeds = dict(zip(("all", "amp", "within"), children))
    done, raw = {}, {}
    if "amp" in components:
        ns = noise_sum("dec")
        per_point = None if ns is None else ns / max(int(dec.use.sum()), 1)
        done["amp"] = _amp_component(dec, per_point, nnull, np.random.default_rng(seeds["amp"]), confidence,
                                     int(dec.use.sum()), int(dec.use.any(axis=1).sum()))
        for key in ("_resid_var", "_level_scatter", "_level_noise"):
            done["amp"].extra.pop(key, None)
        if progress is not None:
            progress(1)
    # within before all: the all row's errors are built from it (and from an amplifier fit of its own)
    res = correlation_analysis(wa, wb, grid_shape=grid_shape, block="patch", patch_size=patch_size,
                               nboot=nboot, nnull=nnull, seed=np.random.default_rng(seeds["within"]),
                               method=method, confidence=confidence)
    patch = patch_labels(*grid_layout(a.shape[0], grid_shape)[:2], patch_size)
    lam, corr, ns_w = 1.0, None, noise_sum("within")
    if ns_w is not None:
        lam = eiv.reliability(ns_w, float(np.nansum(wb ** 2)))
        corr = _corrected_slope_jackknife(wa, wb, patch, noise["within"])
    done["within"] = _from_block("within", res, lam, confidence, "seams, illumination and spot means removed",
                                 corr)
    raw["within"] = res
    if "within" in components and progress is not None:
        progress(1)
    if "all" in components:
        if spot_amp is None:
            with np.errstate(invalid="ignore"):
                xm = np.nanmean(np.where(valid, x, np.nan), axis=1)
                ym = np.nanmean(np.where(valid, y, np.nan), axis=1)
            spot_amp = geometry.amp_of_pixel(detector, np.nan_to_num(xm, nan=-1e9), np.nan_to_num(ym, nan=-1e9))
        blk = {"block": "amp", "block_labels": spot_amp} if block == "amp" else \
            {"block": "patch", "patch_size": patch_size}
        res = correlation_analysis(a_all, b_all, grid_shape=grid_shape, **blk, nboot=nboot, nnull=nnull, seed=np.random.default_rng(seeds["all"]),
                                   method=method, confidence=confidence)
        A, B, _, _ = _centred(a_all, b_all, valid_all)
        saa, sbb = float(np.sum(A * A)), float(np.sum(B * B))
        lam, corr, ns_all = 1.0, None, noise_sum("all")
        if ns_all is not None:
            lam = eiv.reliability(ns_all, sbb)
            corr = _corrected_slope_jackknife(a_all, b_all,
                                              np.unique(np.asarray(spot_amp), return_inverse=True)[1],
                                              noise["all"])
        amp_all = _amp_component(dec_all, None, 0, None, confidence, 0, 0)
        done["all"] = _all_composite(res, dec_all, amp_all, raw["within"], lam, corr, ns_all, saa, sbb,
                                     confidence, patch,
                                     noise.get("dec_all"))
        raw["all"] = res
        if progress is not None:
            progress(1)
    out = [done[c] for c in components]
    return out, raw
