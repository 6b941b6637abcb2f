"""Radial (tree-ring) and edge profiles of the spots against the flat.

Physics tells the two kinds of response variation apart (DESIGN.md, "QE or
pixel area"). Take a charge displacement ``f(r)`` along the radius from the
tree-ring centre (the imSim model: lateral fields move the charge a photon
makes). Then, to first order,

* the flat sees the area change: ``dq(r) = -f'(r)``;
* a spot keeps its flux (``dt = 0``), its centroid moves by ``f(r)`` along
  the radius, i.e. by ``-integral(dq dr)``, and its size ``T = xx + yy``
  changes by ``dT / T = f'(r) = -dq``.

A QE variation ``dq`` instead gives ``dt = dq``, and only the small
footprint-gradient terms in the centroid (``sigma^2 dq'``) and the size
(``sigma^2 dq'' / 2``).

:func:`radial_profiles` bins, in radius about the ring centre, the
relative throughput ``t - 1``, the radial centroid shift, the relative size
change and (with a flat) the flat sampled over each spot's footprint, each
relative to its own spot's mean. Large-scale trends are removed with a
running mean over ``highpass`` pixels, so that only the ring pattern is
left. The amplitude of each spot quantity along the flat's ring pattern is
then a least-squares projection: ``flux`` on ``dq`` (1 for QE, 0 for area),
``radial_shift`` on ``-integral(dq)`` (1 for area; the QE term is fitted
alongside), ``size`` on ``-dq`` (1 for area). Errors come from a bootstrap
over spots (all the dithers of one spot go together): the amplitudes and the
templates are recomputed in every resample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from .errors import InputError

__all__ = ["RadialProfiles", "radial_profiles", "treering_centre", "edge_profiles", "point_quantities"]

QUANTITIES = ("flux", "radial_shift", "size")


def treering_centre(detector: str | None, flat: np.ndarray | None = None,
                    shape: tuple[int, int] | None = None) -> tuple[float, float] | None:
    """The tree-ring centre of a detector, CCD pixels (DM convention).

    From the packaged imSim table for LSSTCam science detectors; otherwise
    (unknown detector) fitted from the flat when one is given
    (:func:`fit_centre`); otherwise None.
    """
    from .treerings import known_detector, treering_model

    if detector and known_detector(detector):
        return treering_model(detector).centre
    if flat is not None:
        return fit_centre(flat)
    return None


def fit_centre(flat: np.ndarray, grid: int = 9, span: float = 12000.0) -> tuple[float, float]:
    """Fit a tree-ring centre to a flat: the centre that makes its rings sharpest.

    For trial centres on a coarse then finer grid, the flat (binned 4 x 4) is
    azimuthally averaged in 4-px radial bins; the centre maximising the
    variance of the high-passed radial profile (rings add coherently only
    about their own centre) wins.
    """
    img = np.asarray(flat, dtype=float)
    ny, nx = img.shape
    b = 4
    sm = img[: ny // b * b, : nx // b * b].reshape(ny // b, b, nx // b, b).mean(axis=(1, 3))
    yy, xx = np.mgrid[0:sm.shape[0], 0:sm.shape[1]]
    xx = xx * b + (b - 1) / 2
    yy = yy * b + (b - 1) / 2
    ok = np.isfinite(sm)
    v = sm[ok] / np.nanmean(sm[ok]) - 1
    xs, ys = xx[ok], yy[ok]

    def score(cx, cy):
        r = np.hypot(xs - cx, ys - cy)
        i = ((r - r.min()) / 4).astype(int)
        n = np.bincount(i)
        m = np.bincount(i, weights=v) / np.maximum(n, 1)
        hp = m - _running_mean(m, n > 0, 40)
        return float(np.nansum(n * hp * hp))

    cx0, cy0, half = (nx - 1) / 2, (ny - 1) / 2, span
    best = (cx0, cy0)
    for _ in range(4):
        cands = [(cx0 + dx, cy0 + dy) for dx in np.linspace(-half, half, grid) for dy in np.linspace(-half, half, grid)]
        scores = [score(cx, cy) for cx, cy in cands]
        best = cands[int(np.argmax(scores))]
        cx0, cy0 = best
        half /= grid / 2
    return float(best[0]), float(best[1])


def _running_mean(v: np.ndarray, ok: np.ndarray, width: int) -> np.ndarray:
    """Mean of the finite ``v[ok]`` over a centred window of ``width`` bins."""
    w = max(int(width) | 1, 1)
    ker = np.ones(w)
    vv = np.where(ok & np.isfinite(v), v, 0.0)
    nn = (ok & np.isfinite(v)).astype(float)
    s = np.convolve(vv, ker, mode="same")
    n = np.convolve(nn, ker, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / n, np.nan)


def _centred(v: np.ndarray, ok: np.ndarray, relative: bool = False) -> np.ndarray:
    v0 = np.where(ok, v, 0.0)
    n = ok.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = v0.sum(axis=1, keepdims=True) / n
        out = np.where(ok, v - m, np.nan)
        return out / m if relative else out


def point_quantities(grids, flat: np.ndarray | None = None, used: np.ndarray | None = None) -> dict:
    """Per-point ``t - 1``, centroid shift, relative size and flat, each relative to its spot's mean.

    Parameters
    ----------
    grids : SpotGrids
    flat : numpy.ndarray, optional
        Normalised flat of the detector (sampled over each spot's Gaussian
        footprint from its second moments).
    used : numpy.ndarray, optional
        Points to use.

    Returns
    -------
    dict
        ``x``, ``y``, ``ok``, ``flux``, ``dx``, ``dy``, ``size``, ``sigma2``
        (footprint variance per point) and ``flat`` (or None).
    """
    from .calibration import estimate_scales

    f = np.asarray(grids.flux, float)
    ok = np.isfinite(f) & (f > 0) & np.isfinite(grids.x) & np.isfinite(grids.y)
    if used is not None:
        ok &= np.asarray(used, bool)
    F, s, kept, _, _ = estimate_scales(np.where(ok, f, np.nan))
    ok &= kept
    with np.errstate(invalid="ignore", divide="ignore"):
        t = f / (F[:, None] * s[None, :])
    T = np.asarray(grids.xx, float) + np.asarray(grids.yy, float)
    okT = ok & np.isfinite(T) & (T > 0)
    dx = np.asarray(grids.dx, float)
    dy = np.asarray(grids.dy, float)
    okc = ok & np.isfinite(dx) & np.isfinite(dy)
    out = {"x": grids.x, "y": grids.y, "ok": ok, "flux": _centred(t, ok, relative=True),
           "dx": _centred(dx, okc), "dy": _centred(dy, okc), "size": _centred(T, okT, relative=True),
           "sigma2": np.where(okT, T / 2, np.nanmedian(np.where(okT, T, np.nan)) / 2), "flat": None}
    if flat is not None:
        from .footprint import sample_flat

        sig = np.sqrt(np.clip(out["sigma2"][ok], 0.5, 50.0))
        q = np.full(f.shape, np.nan)
        q[ok] = sample_flat(np.asarray(flat, float), grids.x[ok], grids.y[ok], sigma=sig)
        okq = ok & np.isfinite(q) & (q > 0)
        out["flat"] = _centred(q, okq, relative=True)
    return out


@dataclass
class RadialProfiles:
    """Binned profiles of the spot quantities and the flat about a centre (or an edge).

    Attributes
    ----------
    kind : str
        ``"radial"`` (about ``centre``) or ``"edge"`` (against the distance
        to the nearest CCD edge).
    centre : tuple of float or None
    r : numpy.ndarray
        Bin centres, pixels.
    n : numpy.ndarray
        Points per bin.
    values, errors : dict
        ``quantity -> (nbin,)`` profile (high-passed for ``radial``) and its
        bootstrap error; quantities ``flux``, ``radial_shift``, ``size`` and
        ``flat`` (when a flat was given).
    boot : dict
        ``quantity -> (nboot, nbin)`` resampled profiles.
    amplitudes : dict
        ``quantity -> (amplitude, error)`` along the flat's pattern (see the
        module notes); empty without a flat.
    flat_snr : float
        Significance of the flat's own pattern in these bins (its
        ``sqrt(chi2 - dof)`` against 0 in units of ``sqrt(2 dof)``); the
        feature counts as detected in the flat above 5.
    sigma2 : float
        Median footprint variance (pixel^2), for the QE leakage terms.
    """

    kind: str
    centre: tuple | None
    r: np.ndarray = field(repr=False)
    n: np.ndarray = field(repr=False)
    values: dict = field(repr=False)
    errors: dict = field(repr=False)
    boot: dict = field(repr=False)
    amplitudes: dict = field(default_factory=dict)
    flat_snr: float = float("nan")
    sigma2: float = 5.0
    binwidth: float = 4.0

    def table(self) -> Table:
        """The profiles as a table (one row per bin)."""
        tab = Table({"r": self.r, "npoint": self.n})
        tab["r"].unit = "pix"
        for q in list(QUANTITIES) + (["flat"] if "flat" in self.values else []):
            if q not in self.values:
                continue
            tab[q] = self.values[q]
            tab[f"{q}_err"] = self.errors[q]
            if q == "radial_shift":
                tab[q].unit = tab[f"{q}_err"].unit = "pix"
        tab.meta.update({"KIND": self.kind, "BINWIDTH": self.binwidth, "SIGMA2": self.sigma2,
                         "FLAT_SNR": self.flat_snr})
        if self.centre is not None:
            tab.meta.update({"CENTREX": float(self.centre[0]), "CENTREY": float(self.centre[1])})
        for q, (a, e) in self.amplitudes.items():
            tab.meta[f"AMP_{q.upper()}"] = a
            tab.meta[f"AMP_{q.upper()}_ERR"] = e
        return tab

    def amplitude_table(self) -> Table:
        """One row per quantity: its amplitude along the flat's pattern, with error."""
        rows = [{"feature": "treering" if self.kind == "radial" else "edge", "quantity": q,
                 "template": _TEMPLATE_NAMES[q], "amplitude": a, "amplitude_err": e}
                for q, (a, e) in self.amplitudes.items()]
        return Table(rows=rows) if rows else Table()

    def template(self, quantity: str) -> np.ndarray | None:
        """The flat's prediction for ``quantity`` if the whole flat signal were pixel area."""
        if "flat" not in self.values:
            return None
        q = np.where(np.isfinite(self.values["flat"]), self.values["flat"], 0.0)
        ops = _operators(q.size, self.binwidth, self.kind, self.sigma2, None)
        return ops[quantity][0] @ q


_TEMPLATE_NAMES = {"flux": "flat", "radial_shift": "-integral(flat)", "size": "-flat"}


def _highpass_matrix(nb: int, width: int | None) -> np.ndarray:
    """``H = I - running mean`` as a matrix (identity for ``width=None``)."""
    eye = np.eye(nb)
    if width is None:
        return eye
    w = max(int(width) | 1, 1)
    half = w // 2
    i = np.arange(nb)
    lo, hi = np.clip(i - half, 0, nb), np.clip(i + half + 1, 0, nb)
    M = ((i[None, :] >= lo[:, None]) & (i[None, :] < hi[:, None])).astype(float)
    M /= M.sum(axis=1, keepdims=True)
    return eye - M


def _operators(nb: int, width: float, kind: str, sigma2: float, hp_bins: int | None) -> dict:
    """Linear maps from the flat's profile to each spot quantity's (area, QE-leakage) templates."""
    H = _highpass_matrix(nb, hp_bins if kind == "radial" else None)
    if kind == "radial":
        S = -np.tril(np.ones((nb, nb))) * width  # f = -integral(dq) from the innermost bin
        integ = H @ S @ H
    else:
        S = np.triu(np.ones((nb, nb))) * width  # the displacement vanishes deep inside
        integ = S
    D1 = np.gradient(np.eye(nb), width, axis=0)
    D2 = D1 @ D1
    base = H if kind == "radial" else np.eye(nb)
    return {"flux": (base, None), "radial_shift": (integ, sigma2 * D1 @ base),
            "size": (-base, 0.5 * sigma2 * D2 @ base), "H": H}


def _amplitude(v: np.ndarray, Q: np.ndarray, var: np.ndarray, ops: tuple, const: bool) -> float:
    """Least-squares amplitude of ``v`` along ``L Q``, corrected for the noise in ``Q``.

    The flat's profile ``Q`` is noisy (variance ``var`` per bin): the plain
    projection would be biased low (errors in variables). ``E[X^T X]``
    exceeds the noiseless one by ``tr(L_a diag(var) L_b^T)``, which is
    subtracted.
    """
    mats = [m for m in ops if m is not None]
    ok = np.isfinite(v) & np.isfinite(Q)
    if ok.sum() < 5:
        return float("nan")
    q0 = np.where(np.isfinite(Q), Q, 0.0)
    vv = np.where(ok, v, 0.0)
    X = [m @ q0 for m in mats]
    noise = [m * np.where(np.isfinite(var), var, 0.0)[None, :] for m in mats]
    if const:
        X.append(np.ones_like(q0))
    X = np.stack(X, axis=1)[ok]
    G = X.T @ X
    for a in range(len(mats)):
        for b in range(len(mats)):
            G[a, b] -= float(np.sum(noise[a][ok] * mats[b][ok]))
    try:
        sol = np.linalg.solve(G, X.T @ vv[ok])
    except np.linalg.LinAlgError:
        return float("nan")
    return float(sol[0])


def _profiles_from_points(coord, values: dict, spot: np.ndarray, edges: np.ndarray, counts: np.ndarray | None):
    """Bin means of each quantity; ``counts`` weights spots (bootstrap)."""
    nb = edges.size - 1
    idx = np.searchsorted(edges, coord, side="right") - 1
    inb = (idx >= 0) & (idx < nb)
    out, nout = {}, None
    for q, v in values.items():
        ok = inb & np.isfinite(v)
        w = np.ones(ok.sum()) if counts is None else counts[spot[ok]].astype(float)
        n = np.bincount(idx[ok], weights=w, minlength=nb)
        sm = np.bincount(idx[ok], weights=w * v[ok], minlength=nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[q] = np.where(n > 0, sm / n, np.nan)
        if nout is None:
            nout = n
    return out, nout


def flat_profile(flat: np.ndarray, coord_of_pixel, edges: np.ndarray, sigma: float,
                 step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The flat's mean in each bin of a pixel coordinate, smoothed like a spot footprint.

    Parameters
    ----------
    flat : numpy.ndarray
        Normalised flat.
    coord_of_pixel : callable
        ``(x, y) -> coordinate`` (radius, or distance to the edge) for pixel
        centres.
    edges : numpy.ndarray
        Bin edges of the profile.
    sigma : float
        Footprint width (pixels) along the coordinate.

    Returns
    -------
    mean, var : numpy.ndarray
        Per bin: ``flat - 1`` averaged over the pixels (after a Gaussian
        smoothing of width ``sigma`` along the coordinate, as a spot's
        footprint averages the flat) and the variance of that mean from the
        pixel scatter.
    """
    from scipy.ndimage import gaussian_filter1d

    img = np.asarray(flat, dtype=float)
    ny, nx = img.shape
    lo, hi = float(edges[0]) - 6 * sigma, float(edges[-1]) + 6 * sigma
    fine = np.arange(lo, hi + step, step)
    nf = fine.size - 1
    s1 = np.zeros(nf)
    s2 = np.zeros(nf)
    n = np.zeros(nf)
    rows = max(1, 2_000_000 // nx)
    xs = np.arange(nx, dtype=float)
    for y0 in range(0, ny, rows):
        ys = np.arange(y0, min(y0 + rows, ny), dtype=float)
        c = coord_of_pixel(xs[None, :], ys[:, None]).ravel()
        v = img[y0:y0 + ys.size].ravel()
        ok = np.isfinite(v) & (c >= lo) & (c < hi)
        i = ((c[ok] - lo) / step).astype(np.int64)
        i = np.clip(i, 0, nf - 1)
        n += np.bincount(i, minlength=nf)
        s1 += np.bincount(i, weights=v[ok], minlength=nf)
        s2 += np.bincount(i, weights=v[ok] ** 2, minlength=nf)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s1 / n
        pix_var = np.where(n > 1, (s2 / n - m * m) * n / np.maximum(n - 1, 1), np.nan)
    # pixel noise: the median pixel variance (structure in a 1-px annulus is tiny next to it)
    pv = float(np.nanmedian(pix_var)) if np.isfinite(pix_var).any() else 0.0
    good = n > 0
    mean_all = np.sum(s1[good]) / np.sum(n[good])
    d = np.where(good, m / mean_all - 1.0, 0.0)
    wgt = good.astype(float)
    # smooth with the footprint: a normalised convolution that skips empty fine bins
    sm = gaussian_filter1d(d * wgt, sigma / step, mode="constant")
    sw = gaussian_filter1d(wgt, sigma / step, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = sm / sw
    centres = 0.5 * (fine[1:] + fine[:-1])
    idx = np.searchsorted(edges, centres, side="right") - 1
    nb = edges.size - 1
    inb = (idx >= 0) & (idx < nb) & good
    npx = np.bincount(idx[inb], weights=n[inb], minlength=nb)
    tot = np.bincount(idx[inb], weights=(smooth * n)[inb], minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(npx > 0, tot / npx, np.nan)
        # smoothing spreads the same pixels over neighbouring bins; the bin mean's variance is at
        # most the pixel variance over the bin's pixels (a conservative bound for a footprint << bin)
        var = np.where(npx > 0, pv / (mean_all ** 2) / npx, np.nan)
    return mean, var


def _build(kind, coord, vals, spot, nspot, edges, nboot, seed, hp_bins, sigma2, width, centre,
           flat_prof=None):
    from .resampling import bootstrap_counts

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    nb = edges.size - 1
    ops = _operators(nb, width, kind, sigma2, hp_bins)
    H = ops["H"]

    def hp(p):
        if kind != "radial":
            tail = p[-max(len(p) // 4, 1):]
            ref = np.nanmean(tail) if np.isfinite(tail).any() else 0.0
            return p - ref
        # H on the finite bins (empty bins left out of the running mean)
        return p - _running_mean(p, np.isfinite(p), hp_bins)

    prof, n = _profiles_from_points(coord, vals, spot, edges, None)
    prof = {q: hp(p) for q, p in prof.items()}
    counts = bootstrap_counts(nspot, int(nboot), rng) if nboot > 0 else np.zeros((0, nspot))
    boot = {q: np.empty((counts.shape[0], nb)) for q in prof}
    amps_boot = {q: [] for q in QUANTITIES}
    Q = var = None
    if flat_prof is not None:
        Q, var = flat_prof
        Q = Q - np.nanmean(Q[-max(nb // 4, 1):]) if kind != "radial" else Q
    for b in range(counts.shape[0]):
        pb, _ = _profiles_from_points(coord, vals, spot, edges, counts[b])
        for q in pb:
            boot[q][b] = hp(pb[q])
        if Q is not None:
            # the flat's own noise enters through a parametric draw of its profile
            Qb = Q + np.sqrt(np.where(np.isfinite(var), var, 0.0)) * rng.standard_normal(nb)
            for q in QUANTITIES:
                if q in pb:
                    amps_boot[q].append(_amplitude(boot[q][b], Qb, var, ops[q], const=(q == "radial_shift")))
    errors = {q: (np.nanstd(boot[q], axis=0, ddof=1) if counts.shape[0] > 1 else np.full(nb, np.nan))
              for q in prof}
    amps, snr = {}, float("nan")
    if Q is not None:
        prof["flat"] = H @ np.where(np.isfinite(Q), Q, 0.0) if kind == "radial" else Q
        prof["flat"] = np.where(np.isfinite(Q), prof["flat"], np.nan)
        errors["flat"] = np.sqrt(var)
        for q in QUANTITIES:
            if q in vals:
                a = _amplitude(prof[q], Q, var, ops[q], const=(q == "radial_shift"))
                e = float(np.nanstd(amps_boot[q], ddof=1)) if len(amps_boot[q]) > 1 else float("nan")
                amps[q] = (a, e)
        # significance of the flat's own pattern: excess of sum(Qhp^2) over its noise
        ok = np.isfinite(Q) & np.isfinite(var)
        base = ops["flux"][0]
        Bm = base[np.ix_(ok, ok)]
        qh = Bm @ Q[ok]
        C = (Bm * var[ok][None, :]) @ Bm.T
        snr = float((qh @ qh - np.trace(C)) / np.sqrt(2 * np.sum(C * C))) if ok.sum() > 2 else float("nan")
    r = 0.5 * (edges[1:] + edges[:-1])
    return RadialProfiles(kind=kind, centre=centre, r=r, n=n, values=prof, errors=errors, boot=boot,
                          amplitudes=amps, flat_snr=snr, sigma2=sigma2, binwidth=width)


def radial_profiles(grids, centre: tuple[float, float], flat: np.ndarray | None = None,
                    used: np.ndarray | None = None, *, binwidth: float = 4.0, highpass: float = 160.0,
                    nboot: int = 200, seed: int | np.random.Generator = 0,
                    points: dict | None = None) -> RadialProfiles:
    """Radial profiles of flux, radial centroid shift, size (and the flat) about ``centre``.

    Parameters
    ----------
    grids : SpotGrids
        Stacked spot data (centroid shifts ``dx, dy`` from the fitted grid,
        second moments ``xx, yy``).
    centre : tuple of float
        Ring centre ``(x, y)``, CCD pixels (:func:`treering_centre`).
    flat : numpy.ndarray, optional
        Normalised flat: adds its profile and the amplitudes along it.
    used : numpy.ndarray, optional
        Points to use.
    binwidth : float
        Radial bin, pixels (well below the shortest ring wavelength, ~20 px).
    highpass : float
        Width (pixels) of the running mean removed from every profile.
    nboot : int
        Bootstrap resamples over spots.
    seed : int or numpy.random.Generator
    points : dict, optional
        Precomputed :func:`point_quantities`.

    Returns
    -------
    RadialProfiles
    """
    if binwidth <= 0:
        raise InputError(f"radial bin width must be positive, not {binwidth}")
    pq = points or point_quantities(grids, None, used)
    ok = pq["ok"]
    cx, cy = centre
    ex, ey = pq["x"] - cx, pq["y"] - cy
    r = np.hypot(ex, ey)
    with np.errstate(invalid="ignore", divide="ignore"):
        nx_, ny_ = ex / r, ey / r
    vals = {"flux": pq["flux"], "radial_shift": pq["dx"] * nx_ + pq["dy"] * ny_, "size": pq["size"]}
    kk = np.broadcast_to(np.arange(ok.shape[0])[:, None], ok.shape)
    sel = ok & np.isfinite(r)
    if sel.sum() < 10:
        raise InputError("too few spot measurements for radial profiles")
    lo, hi = np.floor(r[sel].min()), np.ceil(r[sel].max()) + binwidth
    edges = np.arange(lo, hi + binwidth, binwidth)
    v = {q: a[sel] for q, a in vals.items()}
    sigma2 = float(np.nanmedian(pq["sigma2"][sel]))
    fp = None
    if flat is not None:
        fp = flat_profile(flat, lambda px, py: np.hypot(px - cx, py - cy), edges, np.sqrt(sigma2))
    return _build("radial", r[sel], v, kk[sel], ok.shape[0], edges, nboot, seed,
                  max(int(round(highpass / binwidth)), 3), sigma2, binwidth, (float(cx), float(cy)), fp)


def edge_profiles(grids, shape: tuple[int, int], flat: np.ndarray | None = None, used: np.ndarray | None = None,
                  *, binwidth: float = 2.0, depth: float = 120.0, nboot: int = 200,
                  seed: int | np.random.Generator = 0, points: dict | None = None) -> RadialProfiles:
    """Profiles against the distance to the nearest CCD edge (the edge roll-off).

    The centroid shift is taken along the inward normal of the nearest
    edge; the profiles are relative to the deepest quarter of the bins.
    """
    pq = points or point_quantities(grids, None, used)
    ok = pq["ok"]
    ny, nx = shape
    x, y = pq["x"], pq["y"]
    d = np.stack([x, nx - 1 - x, y, ny - 1 - y])
    which = np.argmin(np.where(np.isfinite(d), d, np.inf), axis=0)
    dist = np.take_along_axis(d, which[None], axis=0)[0]
    normal_x = np.choose(which, [1.0, -1.0, 0.0, 0.0])
    normal_y = np.choose(which, [0.0, 0.0, 1.0, -1.0])
    vals = {"flux": pq["flux"], "radial_shift": pq["dx"] * normal_x + pq["dy"] * normal_y, "size": pq["size"]}
    kk = np.broadcast_to(np.arange(ok.shape[0])[:, None], ok.shape)
    sel = ok & np.isfinite(dist) & (dist < depth)
    if sel.sum() < 10:
        raise InputError("too few spot measurements near the CCD edges for edge profiles")
    edges = np.arange(0.0, depth + binwidth, binwidth)
    v = {q: a[sel] for q, a in vals.items()}
    sigma2 = float(np.nanmedian(pq["sigma2"][sel]))
    fp = None
    if flat is not None:
        def edge_dist(px, py):
            return np.minimum(np.minimum(px, nx - 1 - px), np.minimum(py, ny - 1 - py))

        fp = flat_profile(flat, edge_dist, edges, np.sqrt(sigma2))
    return _build("edge", dist[sel], v, kk[sel], ok.shape[0], edges, nboot, seed, None,
                  sigma2, binwidth, None, fp)
