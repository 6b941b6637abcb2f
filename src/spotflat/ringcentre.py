"""The tree-ring centre fitted from a flat (for detectors the imSim table does not have).

Tree rings are arcs of circles about one centre, usually off the CCD. The
flat's gradient is radial everywhere, so in each tile of the flat the
dominant gradient direction (the structure tensor's main axis) defines a
line through the centre; the centre is the weighted least-squares
intersection of those lines, with tiles whose direction disagrees with the
fit down-weighted (a few robust rounds). A tile's weight is its coherence
(how one-directional its gradients are) times its gradient energy, so
noise-only tiles (isotropic gradients) count little.

The result says how well the lines agree (``coherence``, the weighted mean
over tiles; pixel noise alone gives ~``1/sqrt(pixels per tile)``), and
``centre_err`` is the spread of the intersection under the residual scatter
of the lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["RingCentre", "fit_treering_centre"]


@dataclass
class RingCentre:
    """A tree-ring centre fitted from a flat.

    Attributes
    ----------
    centre : tuple of float
        ``(x, y)``, CCD pixels, DM convention.
    centre_err : tuple of float
        1-sigma errors of ``x`` and ``y`` from the lines' residual scatter.
    coherence : float
        Weighted mean coherence of the tiles (0: isotropic noise, 1: every
        tile one clean direction).
    ntile : int
        Tiles used.
    """

    centre: tuple
    centre_err: tuple
    coherence: float
    ntile: int


def _bin(img: np.ndarray, ok: np.ndarray, b: int) -> np.ndarray:
    ny, nx = img.shape
    my, mx = ny // b * b, nx // b * b
    v = np.where(ok, img, 0.0)[:my, :mx].reshape(my // b, b, mx // b, b).sum(axis=(1, 3))
    n = ok[:my, :mx].reshape(my // b, b, mx // b, b).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, v / n, np.nan)


def fit_treering_centre(flat: np.ndarray, detector: str | None = None, *, binsize: int = 4, tile: int = 32,
                        smooth: float = 1.0, highpass: float = 12.0, rounds: int = 4) -> RingCentre:
    """Fit the tree-ring centre of a flat from the direction of its gradients.

    Parameters
    ----------
    flat : numpy.ndarray
        ``(ny, nx)`` flat of one CCD, DM orientation (any normalisation;
        non-finite or non-positive pixels are ignored).
    detector : str, optional
        With it, each amplifier is divided by its median and the tiles that
        touch an amplifier boundary are left out (gain steps have strong
        gradients that point nowhere near the centre).
    binsize : int
        The flat is first averaged in ``binsize x binsize`` blocks (rings of
        10-100 px periods survive; pixel noise drops).
    tile : int
        Tile size in binned pixels for the structure tensor.
    smooth, highpass : float
        Gaussian widths (binned pixels) of the smoothing before the
        gradient and of the large-scale trend removed first.
    rounds : int
        Robust re-weighting rounds.

    Returns
    -------
    RingCentre

    Raises
    ------
    InputError
        A flat too small for the tiles, or one without coherent structure.
    """
    from scipy import ndimage

    img = np.asarray(flat, dtype=float)
    if img.ndim != 2 or min(img.shape) < 4 * binsize * tile:
        raise InputError(f"flat of shape {img.shape} is too small to fit a tree-ring centre",
                         expected=f"at least {4 * binsize * tile} pixels a side")
    ok = np.isfinite(img) & (img > 0)
    img = img / np.median(img[ok])
    seam = np.zeros(img.shape, bool)
    if detector:
        from . import geometry

        img = img.copy()
        for ys, xs in geometry.amp_slices(detector).values():
            part = img[ys, xs]
            good_part = ok[ys, xs]
            if good_part.any():
                img[ys, xs] = part / np.median(part[good_part])
            seam[ys, xs][[0, -1], :] = True
            seam[ys, xs][:, [0, -1]] = True
    b = _bin(img, ok, binsize)
    good = np.isfinite(b)
    b = np.where(good, b, 1.0)
    # remove the large-scale response (and edge roll-off) so the gradient is the rings'
    w = ndimage.gaussian_filter(good.astype(float), highpass)
    with np.errstate(invalid="ignore", divide="ignore"):
        trend = ndimage.gaussian_filter(np.where(good, b, 0.0), highpass) / w
    hp = np.where(good, b - trend, 0.0)
    hp = ndimage.gaussian_filter(hp, smooth)
    gy, gx = np.gradient(hp)
    # structure tensor per tile (edges of the CCD, with the roll-off, excluded by a margin of one tile)
    ny, nx = hp.shape
    tys, txs = ny // tile, nx // tile
    sl = (slice(0, tys * tile), slice(0, txs * tile))

    def tsum(a):
        return a[sl].reshape(tys, tile, txs, tile).sum(axis=(1, 3))

    Jxx, Jyy, Jxy = tsum(gx * gx), tsum(gy * gy), tsum(gx * gy)
    inside = np.zeros((tys, txs), bool)
    inside[1:-1, 1:-1] = True
    inside &= tsum(good.astype(float)) > 0.9 * tile * tile
    if seam.any():
        # a tile near a seam (within the smoothing reach) is left out
        sb = _bin(seam.astype(float), np.ones(seam.shape, bool), binsize) > 0
        sb = ndimage.binary_dilation(np.nan_to_num(sb).astype(bool), iterations=int(3 * smooth) + 2)
        inside &= tsum(sb.astype(float)) == 0
    tr = Jxx + Jyy
    with np.errstate(invalid="ignore", divide="ignore"):
        coh = np.sqrt((Jxx - Jyy) ** 2 + 4 * Jxy ** 2) / tr
    theta = 0.5 * np.arctan2(2 * Jxy, Jxx - Jyy)  # gradient direction: along the radius
    use = inside & np.isfinite(coh) & (tr > 0)
    if use.sum() < 6:
        raise InputError("too few tiles of the flat to fit a tree-ring centre")
    # tile centres in CCD pixels (binned pixel i covers [i b, (i + 1) b))
    jy, ix = np.nonzero(use)
    px = ((ix + 0.5) * tile) * binsize - 0.5
    py = ((jy + 0.5) * tile) * binsize - 0.5
    th = theta[use]
    wt = coh[use] * tr[use]
    wt = wt / wt.mean()
    tx, ty = -np.sin(th), np.cos(th)  # the line's normal: t . (c - p) = 0
    c = None
    for _ in range(max(int(rounds), 1)):
        A = np.stack([tx, ty], axis=1)
        rhs = tx * px + ty * py
        N = (A * wt[:, None]).T @ A
        c = np.linalg.solve(N, (A * wt[:, None]).T @ rhs)
        d = A @ c - rhs  # perpendicular distance of the centre from each tile's line
        dist = np.hypot(c[0] - px, c[1] - py)
        ang = d / np.maximum(dist, 1.0)  # the angle each line misses by
        s = 1.4826 * np.median(np.abs(ang)) + 1e-12
        base = coh[use] * tr[use]
        wt = base / base.mean() / (1.0 + (ang / (3 * s)) ** 2)  # Cauchy down-weighting of stray tiles
    A = np.stack([tx, ty], axis=1)
    d = A @ c - (tx * px + ty * py)
    N = (A * wt[:, None]).T @ A
    sigma2 = float(np.sum(wt * d * d) / max(wt.sum(), 1e-300) * wt.size / max(wt.size - 2, 1))
    # covariance of the weighted LSQ with weights normalised to the residual scatter
    cov = np.linalg.inv(N) * sigma2 * float((wt ** 2).sum() / wt.sum()) if wt.sum() > 0 else np.full((2, 2), np.nan)
    cw = coh[use]
    # the lines fix the direction to the centre well, its distance poorly (far from the CCD they are
    # nearly parallel): refine on the radial profile's contrast along and across that direction
    c = _refine(hp, good, binsize, c, float(np.sqrt(max(np.trace(cov), 0.0))))
    return RingCentre(centre=(float(c[0]), float(c[1])),
                      centre_err=(float(np.sqrt(max(cov[0, 0], 0))), float(np.sqrt(max(cov[1, 1], 0)))),
                      coherence=float(np.sum(cw * base) / base.sum()), ntile=int(use.sum()))


def _contrast(vx, vy, v, c, dr: float) -> float:
    """Power of the radial profile of ``v`` about ``c`` (bins of ``dr`` pixels): what the rings explain."""
    r = np.hypot(vx - c[0], vy - c[1])
    ib = ((r - r.min()) / dr).astype(np.int64)
    n = np.bincount(ib)
    m = np.bincount(ib, weights=v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nansum(m * m / n) / v.size)


def _refine(hp, good, binsize, c0, err, npix: int = 200_000) -> np.ndarray:
    """Grid search of the radial-profile contrast about ``c0``: coarse (a subset of pixels), then fine."""
    ny, nx = hp.shape
    rng = np.random.default_rng(0)
    jy, ix = np.nonzero(good)
    pick = rng.choice(jy.size, size=min(npix, jy.size), replace=False)
    vy = (jy[pick] + 0.5) * binsize - 0.5
    vx = (ix[pick] + 0.5) * binsize - 0.5
    v = hp[jy[pick], ix[pick]]
    v = v - v.mean()
    mid = np.array([nx * binsize / 2.0, ny * binsize / 2.0])
    u = np.asarray(c0, float) - mid
    u /= max(np.hypot(*u), 1e-9)
    p = np.array([-u[1], u[0]])
    c = np.asarray(c0, float)
    dr = binsize / 2.0
    # coarse then fine: along the direction (poorly known) and across it (well known)
    wide = max(1500.0, 5 * err)
    for along, across, n in ((np.linspace(-wide, wide, 121), np.linspace(-60, 60, 5), npix // 4),
                             (np.arange(-40, 41, 4.0), np.arange(-12, 13, 3.0), npix),
                             (np.arange(-5, 5.1, 1.0), np.arange(-3, 3.1, 1.0), npix)):
        best, bc = -np.inf, c
        for a in along:
            for b in across:
                cand = c + a * u + b * p
                val = _contrast(vx[:n], vy[:n], v[:n], cand, dr)
                if val > best:
                    best, bc = val, cand
        c = bc
    return c
