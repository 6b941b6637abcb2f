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
local quadratic (Savitzky-Golay) fit over ``highpass`` pixels, so that
only the ring pattern is left. The amplitude of each spot quantity along
the flat's ring pattern is then a least-squares projection: ``flux`` on
``dq`` (1 for QE, 0 for area), ``radial_shift`` on ``-integral(dq)`` (1 for
area) and ``size`` on ``-dq`` (1 for area), each after its QE term has been
taken out with the QE fraction the flux measured (fitting that term freely
is degenerate for quasi-periodic rings, whose ``integral(dq)`` and ``dq'``
have the same shape).
Errors come from a bootstrap over spots (all the dithers of one spot go
together): the amplitudes and the templates are recomputed in every
resample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import warnings

import numpy as np
from astropy.table import Table

from .errors import InputError

__all__ = ["RadialProfiles", "radial_profiles", "treering_centre", "edge_profiles", "point_quantities"]

QUANTITIES = ("flux", "radial_shift", "size")


def treering_centre(detector: str | None) -> tuple[float, float] | None:
    """The tree-ring centre of a detector, CCD pixels (DM convention).

    From the packaged imSim table (all 189 LSSTCam science detectors: centres
    measured on LSSTCam data); None for other detectors, whose profiles then
    need an explicit ``centre``. (A centre fitted from the flat alone is not
    offered: on one CCD the ring curvature pins the direction to the centre
    well but its distance poorly.)
    """
    from .treerings import known_detector, treering_model

    if detector and known_detector(detector):
        return treering_model(detector).centre
    return None


def _centred(v: np.ndarray, ok: np.ndarray, relative: bool = False) -> np.ndarray:
    v0 = np.where(ok, v, 0.0)
    n = ok.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = v0.sum(axis=1, keepdims=True) / n
        out = np.where(ok, v - m, np.nan)
        return out / m if relative else out


def _mask_local_defects(out: dict, img: np.ndarray, sig: np.ndarray, ok: np.ndarray, box: int = 32,
                        nsigma: float = 6.0, sampled: np.ndarray | None = None) -> None:
    """Drop points on localised flat structure (dust donuts, defects): it is not a ring.

    A point is dropped when the flat over its footprint departs from the
    flat's median in its ``box``-pixel cell by more than ``nsigma`` times the
    flat's noise at a point; that noise is measured from the two
    checkerboard halves (their difference is pure noise). Real rings
    (1e-4) are far below the threshold; a 1 % dust shadow is far above it.
    ``sampled`` is the flat over the footprints of the ``ok`` points
    (:func:`spotflat.footprint.sample_flat` with ``sigma=sig``) when it is
    already at hand.
    """
    ny, nx = img.shape
    nby, nbx = ny // box, nx // box
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.empty((nby, nbx))
        # one row of cells at a time: the cells' copy stays small (the whole CCD's is 128 MB)
        for jb in range(nby):
            cells = (img[jb * box:(jb + 1) * box, :nbx * box].reshape(box, nbx, box).transpose(1, 0, 2)
                     .reshape(nbx, box * box))
            # nanmedian goes cell by cell (slow); cells without NaN take np.median's one vectorised pass
            full = np.isfinite(cells).all(axis=1)
            row = med[jb]
            if full.all():
                row[:] = np.median(cells, axis=1)
            else:
                row[full] = np.median(cells[full], axis=1)
                row[~full] = np.nanmedian(cells[~full], axis=1)
        level = np.nanmean(med)
        diff = 0.5 * (out["flat_a"] - out["flat_b"])
        noise = 1.4826 * np.nanmedian(np.abs(diff - np.nanmedian(diff)))
    x, y = out["x"], out["y"]
    fin = ok & np.isfinite(x) & np.isfinite(y)
    ib = np.clip((np.where(fin, x, 0) + 0.5) // box, 0, nbx - 1).astype(int)
    jb = np.clip((np.where(fin, y, 0) + 0.5) // box, 0, nby - 1).astype(int)
    # the per-spot centring cancels in the difference of two points of one spot; work on raw levels
    raw = np.full(x.shape, np.nan)
    if sampled is None:
        from .footprint import sample_flat

        sampled = sample_flat(img, x[ok], y[ok], sigma=sig)
    raw[ok] = sampled / level
    local = med[jb, ib] / level
    bad = fin & (np.abs(raw - local) > nsigma * max(noise, 1e-12) * np.sqrt(2))
    for key in ("flux", "dx", "dy", "size", "flat", "flat_a", "flat_b"):
        if out.get(key) is not None:
            out[key] = np.where(bad, np.nan, out[key])
    out["ok"] = ok & ~bad
    out["ndefect"] = int(bad.sum())


def _remove_amp_levels(out: dict, detector: str) -> None:
    """Subtract each amplifier's median from flux and flat deviations (gain steps are not rings)."""
    from .compare import _amp_of

    x, y = out["x"], out["y"]
    fin = out["ok"] & np.isfinite(x) & np.isfinite(y)
    amp = np.full(x.shape, "", dtype="<U3")
    try:
        amp[fin] = _amp_of(detector, x[fin], y[fin])
    except (InputError, KeyError, ValueError):
        return
    for a in set(amp[fin].tolist()) - {""}:
        m = amp == a
        for key in ("flux", "flat", "flat_a", "flat_b"):
            v = out.get(key)
            if v is not None and np.isfinite(v[m]).any():
                v[m] -= np.nanmedian(v[m])


def point_quantities(grids, flat: np.ndarray | None = None, used: np.ndarray | None = None,
                     detector: str | None = None, t: np.ndarray | None = None) -> dict:
    """Per-point ``t - 1``, centroid shift, relative size and flat, each relative to its spot's mean.

    Parameters
    ----------
    grids : SpotGrids
    flat : numpy.ndarray, optional
        Normalised flat of the detector (sampled over each spot's Gaussian
        footprint from its second moments).
    used : numpy.ndarray, optional
        Points to use.
    detector : str, optional
        With a flat: subtract each amplifier's median from the flux and
        flat deviations (gain steps are not what the profiles are about).
    t : numpy.ndarray, optional
        The relative throughput ``f / (F s)`` already computed (e.g. a
        comparison's ``t``, from the calibration's ``F`` and ``s``); points
        where it is not finite are not used. Default: ``F`` and ``s`` fitted
        here (:func:`spotflat.calibration.estimate_scales`). Either way only
        its deviation from each spot's mean enters.

    Returns
    -------
    dict
        ``x``, ``y``, ``ok``, ``flux``, ``dx``, ``dy``, ``size``, ``sigma2``
        (footprint variance per point) and ``flat``, ``flat_a``, ``flat_b``
        (the flat and its two checkerboard halves over each footprint, or
        None). Points on localised flat structure (dust, defects) are
        dropped.
    """
    from .calibration import estimate_scales

    f = np.asarray(grids.flux, float)
    ok = np.isfinite(f) & (f > 0) & np.isfinite(grids.x) & np.isfinite(grids.y)
    if used is not None:
        ok &= np.asarray(used, bool)
    if t is None:
        F, s, kept, _, _ = estimate_scales(np.where(ok, f, np.nan))
        ok &= kept
        with np.errstate(invalid="ignore", divide="ignore"):
            t = f / (F[:, None] * s[None, :])
    else:
        t = np.asarray(t, float)
        if t.shape != f.shape:
            raise InputError(f"relative throughput has shape {t.shape}, the spot data {f.shape}")
        ok &= np.isfinite(t) & (t > 0)
    T = np.asarray(grids.xx, float) + np.asarray(grids.yy, float)
    okT = ok & np.isfinite(T) & (T > 0)
    dx = np.asarray(grids.dx, float)
    dy = np.asarray(grids.dy, float)
    okc = ok & np.isfinite(dx) & np.isfinite(dy)
    out = {"x": grids.x, "y": grids.y, "ok": ok, "flux": _centred(t, ok, relative=True),
           "dx": _centred(dx, okc), "dy": _centred(dy, okc), "size": _centred(T, okT, relative=True),
           "sigma2": np.where(okT, T / 2, np.nanmedian(np.where(okT, T, np.nan)) / 2), "flat": None}
    if flat is not None:
        from .footprint import sample_flat_checkerboard

        img = np.asarray(flat, float)
        sig = np.sqrt(np.clip(out["sigma2"][ok], 0.5, 50.0))
        # two halves of the flat on a checkerboard (pixels with i + j odd: "a", even: "b"): independent
        # pixel noise, the same response; one pass gives both halves and the whole flat (for the defects)
        whole, half_a, half_b = sample_flat_checkerboard(img, grids.x[ok], grids.y[ok], sig, half_min_weight=0.2)
        for key, half in (("flat_a", half_a), ("flat_b", half_b)):
            q = np.full(f.shape, np.nan)
            q[ok] = half
            okq = ok & np.isfinite(q) & (q > 0)
            out[key] = _centred(q, okq, relative=True)
        out["flat"] = 0.5 * (out["flat_a"] + out["flat_b"])
        _mask_local_defects(out, img, sig, ok, sampled=whole)
        if detector:
            _remove_amp_levels(out, detector)
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
        Significance of the flat's own pattern in these bins: the cross
        power of the flat's profiles over the two halves of the sensor (the
        pattern is common to both, the noise, PRNU and dust are not), in
        units of its bootstrap spread over spots; the feature counts as
        detected in the flat above 5. NaN without bootstrap resamples.
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


_TEMPLATE_NAMES = {"flux": "flat", "radial_shift": "-integral(flat)", "size": "-flat",
                   "area": "centroid and size combined"}


def _savgol_width(nb: int, width: int) -> int:
    """The Savitzky-Golay window (odd, 5 .. nb) for a trend over ``width`` bins; < 5 when nb is too short."""
    return min(max(int(width) | 1, 5), nb if nb % 2 else nb - 1)


@lru_cache(maxsize=8)
def _smoother(nb: int, width: int):
    """The local quadratic (Savitzky-Golay, as ``scipy.signal.savgol_filter(..., 2, mode="interp")``)
    trend as a sparse ``nb x nb`` matrix.

    Interior bins: the quadratic least-squares fit over the ``w`` bins about
    each one, evaluated at its centre; the first and last ``w // 2`` bins:
    the fit over the first (last) ``w`` bins evaluated there. Banded apart
    from the ends, so the trend of many profiles at once is one sparse
    product. Built here rather than with ``scipy.signal``, whose import
    (with ``scipy.stats``) costs most of a second on every run. None when
    the window would be shorter than 5 bins.
    """
    from scipy.sparse import csr_matrix

    w = _savgol_width(nb, width)
    if w < 5:
        return None
    h = w // 2
    u = np.arange(-h, h + 1, dtype=float) / h  # scaled: a well-conditioned fit
    fit = np.linalg.pinv(np.vander(u, 3, increasing=True))  # (3, w): coefficients from the window
    S = np.zeros((nb, nb))
    rows = np.arange(h, nb - h)
    S[rows[:, None], rows[:, None] + np.arange(-h, h + 1)] = fit[0]  # value at the centre
    ends = np.vander(u, 3, increasing=True) @ fit  # (w, w): the window's fit at each of its bins
    S[:h, :w] = ends[:h]
    S[nb - h:, nb - w:] = ends[w - h:]
    return csr_matrix(S)


def _highpass_rows(P: np.ndarray, width: int) -> np.ndarray:
    """Each row of ``P`` minus its local quadratic trend over ``width`` bins (NaN bins stay NaN).

    NaN bins are interpolated before the trend is fitted; a row with fewer
    than 3 finite bins becomes all NaN; with fewer than 5 bins the trend is
    the row's mean.
    """
    P = np.atleast_2d(np.asarray(P, float))
    m, nb = P.shape
    fin = np.isfinite(P)
    nfin = fin.sum(axis=1)
    S = _smoother(nb, width)
    if S is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            trend = np.broadcast_to(np.nanmean(P, axis=1, keepdims=True), P.shape).copy()
    else:
        filled = P.copy()
        i = np.arange(nb)
        for r in np.flatnonzero((nfin < nb) & (nfin >= 3)):
            filled[r] = np.interp(i, i[fin[r]], P[r, fin[r]])
        filled[nfin < 3] = 0.0
        trend = (S @ filled.T).T
    trend[nfin < 3] = np.nan
    return np.where(fin, P - trend, np.nan)


def _operators(nb: int, width: float, kind: str, sigma2: float, hp_bins: int | None) -> dict:
    """Linear maps from the flat's (high-passed) profile to each quantity's (area, QE-leakage) templates.

    Identity-like and banded maps are sparse matrices (they are applied to
    every bootstrap replicate); the integral is dense.
    """
    from scipy.sparse import csr_matrix, identity

    if kind == "radial":
        T = -np.tril(np.ones((nb, nb))) * width
        S = _smoother(nb, hp_bins) if hp_bins is not None else None
        # f = -integral(dq), high-passed like the data: H T with H = 1 - S (S sparse: no n^3 product)
        integ = T - (S @ T if S is not None else T.mean(axis=0, keepdims=True)) if hp_bins is not None else T
    else:
        integ = np.triu(np.ones((nb, nb))) * width  # the displacement vanishes deep inside
    D1 = csr_matrix(np.gradient(np.eye(nb), width, axis=0))
    D2 = D1 @ D1
    eye = identity(nb, format="csr")
    return {"flux": (eye, None), "radial_shift": (integ, sigma2 * D1), "size": (-eye, 0.5 * sigma2 * D2)}


def _amplitude(v0: np.ndarray, v1: np.ndarray, Q0: np.ndarray, Q1: np.ndarray, ops: tuple, const: bool,
               leak: float | None = None, products: list | None = None) -> float:
    """Amplitude of a spot quantity along ``L Q``, from two independent halves of the sensor.

    ``v0, Q0`` and ``v1, Q1`` are the spot quantity's and the flat's
    profiles over two disjoint sets of pixels (two azimuthal halves about
    the ring centre). The rings are common to both; the flat's noise, the
    PRNU, dust and every other local structure are not. Cross products
    (template of one half against data of the other) therefore keep only
    the azimuthally coherent pattern, with no noise bias (errors in
    variables) and no leakage of local QE structure.

    ``leak`` fixes the coefficient of the second operator (the QE
    footprint-gradient term) instead of fitting it: each half's own
    ``leak * L Q`` is taken out of its data. For quasi-periodic rings the
    two templates have nearly the same shape (``integral(dq)`` and ``dq'``
    of one sinusoid differ only by ``-1/k^2``), so fitting both leaves the
    area amplitude undetermined; the QE fraction measured from the flux
    fixes the second.

    ``products``, when given, holds the operators already applied to the two
    halves' flat profiles (NaN as 0): ``products[h][id(m)] = m @ Q_h`` --
    the bootstrap computes them for all its replicates in one product.
    """
    mats = [m for m in ops if m is not None]
    ok = np.isfinite(v0) & np.isfinite(v1) & np.isfinite(Q0) & np.isfinite(Q1)
    if ok.sum() < 5:
        return float("nan")
    zs = [np.where(np.isfinite(Q), Q, 0.0) for Q in (Q0, Q1)]

    def apply(m, h):
        return products[h][id(m)] if products is not None else m @ zs[h]

    if leak is not None and len(mats) > 1:
        if not np.isfinite(leak):
            return float("nan")
        v0 = v0 - leak * apply(mats[1], 0)
        v1 = v1 - leak * apply(mats[1], 1)
        mats = mats[:1]
    X = []
    for h, z in enumerate(zs):
        cols = [apply(m, h) for m in mats] + ([np.ones(z.size)] if const else [])
        X.append(np.stack(cols, axis=1)[ok])
    G = 0.5 * (X[0].T @ X[1] + X[1].T @ X[0])
    rhs = 0.5 * (X[0].T @ v1[ok] + X[1].T @ v0[ok])
    try:
        sol = np.linalg.solve(G, rhs)
    except np.linalg.LinAlgError:
        return float("nan")
    return float(sol[0])


def _profiles_from_points(coord, values: dict, edges: np.ndarray):
    """Bin means of each quantity over all its points, and the point count per bin (of the first)."""
    nb = edges.size - 1
    idx = np.searchsorted(edges, coord, side="right") - 1
    inb = (idx >= 0) & (idx < nb)
    out, nout = {}, None
    for q, v in values.items():
        sel = np.flatnonzero(inb & np.isfinite(v))
        n = np.bincount(idx[sel], minlength=nb)
        sm = np.bincount(idx[sel], weights=v[sel], minlength=nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[q] = np.where(n > 0, sm / n, np.nan)
        if nout is None:
            nout = n
    return out, nout


def _build(kind, coord, vals, spot, nspot, edges, nboot, seed, hp_bins, sigma2, width, centre, half):
    """Profiles (all points) and amplitudes (cross products of the two ``half`` groups), with bootstrap."""
    from .resampling import bootstrap_counts

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    nb = edges.size - 1
    ops = _operators(nb, width, kind, sigma2, hp_bins)
    op_mats = {id(m): m for q in QUANTITIES if q in ops for m in ops[q] if m is not None}
    groups = [half == 0, half == 1]

    def hp_rows(P):
        """High-pass each row (profile) of ``P``: radial trend, or the edge profiles' deep level."""
        if kind != "radial":
            tail = P[:, -max(P.shape[1] // 4, 1):]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ref = np.nanmean(tail, axis=1, keepdims=True)
            return P - np.where(np.isfinite(ref), ref, 0.0)
        return _highpass_rows(P, hp_bins)

    def hp(p):
        return hp_rows(p[None, :])[0]

    def amplitudes(parts, products=None):
        if "flat" not in parts[0]:
            return {}, float("nan")
        amps = {}
        for q in QUANTITIES:  # flux first: its QE fraction fixes the QE terms of the other two
            if q in parts[0]:
                amps[q] = _amplitude(parts[0][q], parts[1][q], parts[0]["flat"], parts[1]["flat"], ops[q],
                                     const=(q == "radial_shift"), leak=None if q == "flux" else
                                     amps.get("flux", 0.0), products=products)
        a, b = parts[0]["flat"], parts[1]["flat"]
        ok = np.isfinite(a) & np.isfinite(b)
        return amps, float(np.sum(a[ok] * b[ok]))

    allp, n = _profiles_from_points(coord, vals, edges)
    prof = {q: hp(p) for q, p in allp.items()}
    parts = [{q: hp(p) for q, p in _profiles_from_points(coord[g], {q: v[g] for q, v in vals.items()},
                                                         edges)[0].items()} for g in groups]
    amp0, pow0 = amplitudes(parts)
    counts = bootstrap_counts(nspot, int(nboot), rng) if nboot > 0 else np.zeros((0, nspot))
    boot = {q: np.empty((counts.shape[0], nb)) for q in prof}
    amps_boot = {q: [] for q in amp0}
    pow_boot = []
    # A bootstrap profile is a bin's count-weighted sum over spots: with each group's per-spot bin sums
    # as sparse (bin x spot) matrices, all replicates' profiles are two sparse products (no per-replicate
    # pass over the points)
    from scipy.sparse import csr_matrix

    idx = np.searchsorted(edges, coord, side="right") - 1
    inb = (idx >= 0) & (idx < nb)
    sums = []
    for g in [np.ones(coord.shape, bool)] + groups:
        per = {}
        for q, v in vals.items():
            k = np.flatnonzero(g & inb & np.isfinite(v))
            per[q] = (csr_matrix((v[k], (idx[k], spot[k])), shape=(nb, nspot)),
                      csr_matrix((np.ones(k.size), (idx[k], spot[k])), shape=(nb, nspot)))
        sums.append(per)
    chunk = 256  # replicates per batch: bounded memory for large nboot
    for b0 in range(0, counts.shape[0], chunk):
        cf = counts[b0:b0 + chunk].T.astype(float)  # (spot, replicate)
        rows = []
        for per in sums:
            rg = {}
            for q, (S, C) in per.items():
                sm, nn = S @ cf, C @ cf
                with np.errstate(invalid="ignore", divide="ignore"):
                    rg[q] = hp_rows(np.where(nn > 0, sm / nn, np.nan).T)
            rows.append(rg)
        # the amplitude operators applied to every replicate's flat profiles at once (one matrix
        # product per operator and half, not one matrix-vector product per replicate)
        pre = None
        if all("flat" in r for r in rows[1:]):
            pre = []
            for r in rows[1:]:
                Z = np.where(np.isfinite(r["flat"]), r["flat"], 0.0).T  # (bin, replicate)
                pre.append({k: np.asarray(m @ Z).T for k, m in op_mats.items()})
        for j in range(cf.shape[1]):
            for q in prof:
                boot[q][b0 + j] = rows[0][q][j]
            ab, pw = amplitudes([{q: r[q][j] for q in r} for r in rows[1:]],
                                None if pre is None else [{k: v[j] for k, v in p.items()} for p in pre])
            for q, a in ab.items():
                amps_boot[q].append(a)
            pow_boot.append(pw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty bins: NaN errors, not a warning
        errors = {q: (np.nanstd(boot[q], axis=0, ddof=1) if counts.shape[0] > 1 else np.full(nb, np.nan))
                  for q in prof}
    amps = {q: (a, float(np.nanstd(amps_boot[q], ddof=1)) if len(amps_boot[q]) > 1 else float("nan"))
            for q, a in amp0.items()}
    if "radial_shift" in amps and "size" in amps and len(amps_boot["size"]) > 2:
        # centroid and size both measure the area part: combine them, inverse-variance weighted, the
        # weights fixed from the bootstrap and the error from the same replicates (their correlation kept)
        (ac, ec), (az, ez) = amps["radial_shift"], amps["size"]
        if np.isfinite(ec * ez) and ec > 0 and ez > 0:
            wc, wz = 1 / ec ** 2, 1 / ez ** 2
            comb = (wc * np.asarray(amps_boot["radial_shift"]) + wz * np.asarray(amps_boot["size"])) / (wc + wz)
            amps["area"] = (float((wc * ac + wz * az) / (wc + wz)), float(np.nanstd(comb, ddof=1)))
    # significance of the flat's ring pattern: the cross power of the two halves' flat profiles (common
    # rings; independent noise, PRNU and dust) in units of its bootstrap spread over spots. (A null that
    # shifts one half along the profile fails for quasi-periodic rings: a shifted sinusoid still
    # correlates, so the null's spread is the signal's own and a strong single-period pattern scored ~2.)
    snr = float("nan")
    pw = np.asarray(pow_boot, float)
    pw = pw[np.isfinite(pw)]
    if np.isfinite(pow0) and pw.size > 2 and np.std(pw) > 0:
        snr = float(pow0 / np.std(pw, ddof=1))
    for q in ("flat_a", "flat_b"):
        prof.pop(q, None)
        errors.pop(q, None)
        boot.pop(q, None)
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
        Width (pixels) of the local quadratic trend removed from every profile.
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
    pq = points or point_quantities(grids, flat, used)
    ok = pq["ok"]
    cx, cy = centre
    ex, ey = pq["x"] - cx, pq["y"] - cy
    r = np.hypot(ex, ey)
    with np.errstate(invalid="ignore", divide="ignore"):
        nx_, ny_ = ex / r, ey / r
    vals = {"flux": pq["flux"], "radial_shift": pq["dx"] * nx_ + pq["dy"] * ny_, "size": pq["size"]}
    if pq.get("flat") is not None:
        vals["flat"] = pq["flat"]
    kk = np.broadcast_to(np.arange(ok.shape[0])[:, None], ok.shape)
    sel = ok & np.isfinite(r)
    if sel.sum() < 10:
        raise InputError("too few spot measurements for radial profiles")
    lo, hi = np.floor(r[sel].min()), np.ceil(r[sel].max()) + binwidth
    edges = np.arange(lo, hi + binwidth, binwidth)
    v = {q: a[sel] for q, a in vals.items()}
    sigma2 = float(np.nanmedian(pq["sigma2"][sel]))
    # two azimuthal halves about the centre: disjoint pixels, the same rings
    phi = np.arctan2(ey[sel], ex[sel])
    phi = np.mod(phi - np.angle(np.mean(np.exp(1j * phi))) + np.pi, 2 * np.pi)
    half = (phi > np.median(phi)).astype(int)
    return _build("radial", r[sel], v, kk[sel], ok.shape[0], edges, nboot, seed,
                  max(int(round(highpass / binwidth)), 3), sigma2, binwidth, (float(cx), float(cy)), half)


def edge_profiles(grids, shape: tuple[int, int], flat: np.ndarray | None = None, used: np.ndarray | None = None,
                  *, binwidth: float = 2.0, depth: float = 120.0, nboot: int = 200,
                  seed: int | np.random.Generator = 0, points: dict | None = None) -> RadialProfiles:
    """Profiles against the distance to the nearest CCD edge (the edge roll-off).

    The centroid shift is taken along the inward normal of the nearest
    edge; the profiles are relative to the deepest quarter of the bins.
    """
    pq = points or point_quantities(grids, flat, used)
    ok = pq["ok"]
    ny, nx = shape
    x, y = pq["x"], pq["y"]
    d = np.stack([x, nx - 1 - x, y, ny - 1 - y])
    which = np.argmin(np.where(np.isfinite(d), d, np.inf), axis=0)
    dist = np.take_along_axis(d, which[None], axis=0)[0]
    normal_x = np.choose(which, [1.0, -1.0, 0.0, 0.0])
    normal_y = np.choose(which, [0.0, 0.0, 1.0, -1.0])
    vals = {"flux": pq["flux"], "radial_shift": pq["dx"] * normal_x + pq["dy"] * normal_y, "size": pq["size"]}
    if pq.get("flat") is not None:
        vals["flat"] = pq["flat"]
    kk = np.broadcast_to(np.arange(ok.shape[0])[:, None], ok.shape)
    sel = ok & np.isfinite(dist) & (dist < depth)
    if sel.sum() < 10:
        raise InputError("too few spot measurements near the CCD edges for edge profiles")
    edges = np.arange(0.0, depth + binwidth, binwidth)
    v = {q: a[sel] for q, a in vals.items()}
    sigma2 = float(np.nanmedian(pq["sigma2"][sel]))
    # two halves: the x edges (left, right) and the y edges (bottom, top)
    half = (which[sel] >= 2).astype(int)
    if min(half.sum(), (1 - half).sum()) < 10:
        half = (which[sel] % 2).astype(int)  # only one kind of edge: its two sides
    return _build("edge", dist[sel], v, kk[sel], ok.shape[0], edges, nboot, seed, None,
                  sigma2, binwidth, None, half)
