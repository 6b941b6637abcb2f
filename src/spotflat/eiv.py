"""Errors in variables: how much of the flat's variance at the spots is its own noise.

The regression slope of ``t`` on ``q`` is attenuated by the photon noise of
the flat: with ``q = q_true + e``, least squares gives
``slope_raw = slope_true * lambda`` with the reliability ratio
``lambda = var(q_true) / var(q) = 1 - var(e) / var(q)``. The flat's noise is
known from its level: a flat of ``N`` electrons per pixel has relative
variance ``1 / N`` per pixel, and the spot footprint ``K`` (weights summing
to 1) averages it down to ``sum(K**2) / N`` -- ``1 / (4 pi s**2 N)`` for a
Gaussian of width ``s``, ``1 / (pi R**2 N)`` for a top-hat of radius ``R``.
Two dithers of one spot whose footprints overlap share noise
(``sum(K1 K2) / N``), and the per-spot normalisation of ``q`` removes each
spot's mean; :func:`demeaned_noise` does that sum exactly, spot by spot.

:func:`flat_electrons` finds ``N`` from a flat's level and gain;
:func:`reliability` turns the noise into ``lambda``.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

__all__ = ["flat_electrons", "footprint_overlap", "demeaned_noise", "reliability"]

_GAIN_KEYS = ("GAIN", "CCDGAIN", "EGAIN")


def flat_electrons(levels: dict | None, header=None, electrons: float | None = None) -> float | None:
    """Mean electrons per pixel of a flat.

    Parameters
    ----------
    levels : dict or None
        Normalisation levels divided out of the flat
        (:attr:`spotflat.flats.FlatImage.levels`), in the file's units.
    header : astropy.io.fits.Header, optional
        The flat's primary header: ``GAIN`` (or ``CCDGAIN``, ``EGAIN``;
        electrons per ADU) converts ADU to electrons; ``BUNIT = electron``
        says the values are electrons already.
    electrons : float, optional
        User-given electrons per pixel: returned as is.

    Returns
    -------
    float or None
        ``None`` when the flat carries no usable level (a flat already
        normalised to ~1 by someone else): the noise is then unknown and the
        slope is left uncorrected unless ``electrons`` is given.

    Examples
    --------
    >>> flat_electrons({"ccd": 25000.0}, {"GAIN": 1.6})
    40000.0
    >>> flat_electrons({"ccd": 1.0}) is None
    True
    """
    if electrons is not None:
        if not np.isfinite(electrons) or electrons <= 0:
            raise InputError(f"flat electrons per pixel {electrons!r} must be a positive number",
                             expected="e.g. --flat-electrons 50000")
        return float(electrons)
    if not levels:
        return None
    vals = np.asarray([float(v) for v in levels.values()], dtype=float)
    level = float(np.nanmean(vals)) if vals.size else float("nan")
    if not np.isfinite(level) or level < 100.0:  # normalised already: no counts left
        return None
    gain = 1.0
    if header is not None:
        for key in _GAIN_KEYS:
            if key in header:
                try:
                    g = float(header[key])
                except (TypeError, ValueError):
                    continue
                if np.isfinite(g) and g > 0:
                    gain = g
                    break
    return level * gain


def footprint_overlap(d2: np.ndarray, s1: np.ndarray | float | None, s2: np.ndarray | float | None,
                      radius: float | None = None) -> np.ndarray:
    """``sum(K1 K2)`` of two unit-sum footprints a squared distance ``d2`` apart.

    Gaussian footprints of widths ``s1``, ``s2``:
    ``exp(-d2 / 2 (s1**2 + s2**2)) / (2 pi (s1**2 + s2**2))``; top-hats of
    ``radius``: the overlap area of the two discs over ``(pi R**2)**2``.

    Examples
    --------
    >>> float(footprint_overlap(np.array(0.0), 2.0, 2.0)) * 4 * np.pi * 4
    1.0
    """
    d2 = np.asarray(d2, dtype=float)
    if radius is not None:
        r = float(radius)
        d = np.sqrt(d2)
        x = np.clip(d / (2 * r), 0, 1)
        area = 2 * r * r * (np.arccos(x) - x * np.sqrt(1 - x * x))
        return area / (np.pi * r * r) ** 2
    s = np.asarray(s1, dtype=float) ** 2 + np.asarray(s2, dtype=float) ** 2
    return np.exp(-d2 / (2 * s)) / (2 * np.pi * s)


def _tent_overlap(c1: np.ndarray, half: int, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """1-D ``sum_u w_p(u) w_q(u)`` of kernel-convolved bilinear tents at positions ``p``, ``q``.

    ``c1[half + lag]`` is the kernel's autocorrelation at integer ``lag``.
    """
    i0, j0 = np.floor(p), np.floor(q)
    fp, fq = p - i0, q - j0
    gp = 1.0 - fp
    # the four tent corners fall on three lags: lag - 1, lag, lag + 1 (in units of c1's index);
    # c1 padded with zeros so that one clipped index serves all three (lags beyond it are zero)
    cpad = np.zeros(c1.size + 6)
    cpad[3:-3] = c1
    base = (j0 - i0).astype(np.int64)
    base += half + 3
    np.clip(base, 1, cpad.size - 2, out=base)
    out = cpad[base] * (gp * (1.0 - fq) + fp * fq)
    out += cpad[base + 1] * (gp * fq)
    out += cpad[base - 1] * (fp * (1.0 - fq))
    return out


def demeaned_noise(x: np.ndarray, y: np.ndarray, use, sigma: np.ndarray | None,
                   radius: float | None, electrons: float, per_spot: bool = False):
    """Expected sum over points of the flat's noise in ``q`` after removing each spot's mean.

    Parameters
    ----------
    x, y : numpy.ndarray
        ``[spot, exposure]`` positions.
    use : numpy.ndarray of bool, or a list of them
        Points entering the sum (a list: one sum per mask, for the cost of one).
    sigma : numpy.ndarray or None
        Per-spot Gaussian footprint width (pixels).
    radius : float or None
        Top-hat radius instead.
    electrons : float
        Electrons per pixel of the flat.
    per_spot : bool
        Return each spot's term (an array per mask) instead of the sum.

    Returns
    -------
    float or list of float
        ``sum_k [tr(C_k) - 1' C_k 1 / n_k]`` with ``C_k`` the noise covariance
        of spot ``k``'s used points (relative units).

    Notes
    -----
    For the Gaussian footprint the covariances are exact for the sampling of
    :func:`spotflat.footprint.sample_flat` (a separable kernel, quantised to
    :data:`spotflat.footprint.SIZE_STEP`, convolved with the bilinear tent):
    ``C = sum_p w_p w'_p / N`` is a product of two 1-D sums of the kernel's
    autocorrelation. The top-hat uses the continuous disc overlap.
    """
    from .footprint import SIZE_STEP, TRUNCATE, gaussian_kernel1d

    if sigma is None and radius is None:
        raise InputError("the footprint (sigma or radius) is needed for the flat's noise")
    many = isinstance(use, (list, tuple))
    uses = list(use) if many else [use]
    anyuse = np.logical_or.reduce(uses)
    nspot = x.shape[0]
    totals = [np.zeros(nspot) for _ in uses]
    if radius is not None:
        groups = [(None, np.arange(nspot))]
    else:
        sq = SIZE_STEP * np.round(np.asarray(sigma, dtype=float) / SIZE_STEP)
        groups = [(s, np.flatnonzero(sq == s)) for s in np.unique(sq[np.isfinite(sq)])]
    for s, spots in groups:
        if s is not None:
            g = gaussian_kernel1d(float(s), TRUNCATE) if s > 0 else np.ones(1)
            c1 = np.correlate(g, g, mode="full")
            half = g.size - 1
        for c0 in range(0, spots.size, 128):
            sl = spots[c0:c0 + 128]
            u = anyuse[sl]
            if not u.any():
                continue
            xs = np.where(u, x[sl], 0.0)
            ys = np.where(u, y[sl], 0.0)
            if s is None:
                d2 = (xs[:, :, None] - xs[:, None, :]) ** 2 + (ys[:, :, None] - ys[:, None, :]) ** 2
                c = footprint_overlap(d2, None, None, radius=radius)
            else:
                c = (_tent_overlap(c1, half, xs[:, :, None], xs[:, None, :])
                     * _tent_overlap(c1, half, ys[:, :, None], ys[:, None, :]))
            for i, um in enumerate(uses):
                m = um[sl].astype(float)
                n = m.sum(axis=1)
                tr = np.einsum("kjj,kj->k", c, m)
                tot = np.einsum("kij,ki,kj->k", c, m, m)
                totals[i][sl] = np.where(n > 0, tr - tot / np.maximum(n, 1), 0.0)
    out = [t / float(electrons) if per_spot else float(t.sum()) / float(electrons) for t in totals]
    return out if many else out[0]


def reliability(noise_sum: float, var_sum: float) -> float:
    """Reliability ratio ``1 - noise / total`` (NaN when the noise swamps the signal).

    Examples
    --------
    >>> reliability(5.0, 100.0)
    0.95
    """
    if not (np.isfinite(noise_sum) and np.isfinite(var_sum)) or var_sum <= 0:
        return float("nan")
    lam = 1.0 - noise_sum / var_sum
    return float(lam) if lam > 0.05 else float("nan")
