"""Second derivatives of the flat at the spots: the regressors of the spot shapes.

A spot of Gaussian profile ``G`` (covariance ``Sigma``) measured on a response
``1 + delta`` has, to first order in ``delta`` (Stein's lemma on the moments
of ``G (1 + delta)``), a centroid shifted by ``Sigma <grad delta>`` and second
moments changed by ``Sigma <H> Sigma``, where ``H`` is the Hessian of
``delta`` and ``<.>`` the average over the spot. So the right regressor of
a centroid shift is the flat's gradient, and that of the second moments the
flat's second derivatives -- the Laplacian for the size ``xx + yy``,
``d2/dx2 - d2/dy2`` for ``xx - yy``, ``d2/dxdy`` for ``xy`` -- each averaged
over the spot (docs/science.rst, "Shapes and centroids").

The averaging is the smoothing, and it is not optional: the flat has photon
noise, white per pixel, and a second derivative multiplies the noise power at
wavenumber ``k`` by ``k**4``: the raw pixel-to-pixel Laplacian of a 5e4 e-
flat is noise at the 1e-2 level. The spot itself integrates the response
over its own profile, so its footprint is the physically right kernel
(smoother loses the signal on the spot's scale, sharper only adds noise).
:func:`flat_hessian` therefore differentiates exactly the footprint-averaged
flat that :func:`spotflat.footprint.sample_flat` evaluates for ``q`` (same
kernel, same masking): a central difference of step one pixel of that
function, which for a bilinear interpolant of the smoothed image is the
interpolated discrete second difference of the smoothed flat. All stencil
points are sampled in one call, so the smoothing (per footprint width) is
done once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FlatHessian", "flat_hessian", "noise_hessian", "REGRESSORS"]

#: regressor name -> (FlatHessian attribute, description); used as ``against`` in the results
REGRESSORS = {
    "lapq": ("laplacian", "Laplacian of the flat, d2q/dx2 + d2q/dy2"),
    "d2qdx2": ("dxx", "d2q/dx2"),
    "d2qdy2": ("dyy", "d2q/dy2"),
    "d2q_xx-yy": ("diff", "d2q/dx2 - d2q/dy2"),
    "d2qdxdy": ("dxy", "d2q/dxdy"),
}

# stencil offsets (dx, dy) in units of the step: centre, +-x, +-y, the four diagonals
_OFFSETS = np.array([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)], float)


@dataclass
class FlatHessian:
    """Second derivatives of the footprint-averaged flat at each position (per pixel**2).

    Attributes
    ----------
    dxx, dyy, dxy : numpy.ndarray
        ``d2q/dx2``, ``d2q/dy2``, ``d2q/dxdy``, shape of the positions; NaN
        where any stencil point is NaN in :func:`spotflat.footprint.sample_flat`.
    step : float
        Finite-difference step, pixels.
    """

    dxx: np.ndarray
    dyy: np.ndarray
    dxy: np.ndarray
    step: float = 1.0

    @property
    def laplacian(self) -> np.ndarray:
        """``d2q/dx2 + d2q/dy2`` (the regressor of the size ``xx + yy``)."""
        return self.dxx + self.dyy

    @property
    def diff(self) -> np.ndarray:
        """``d2q/dx2 - d2q/dy2`` (the regressor of ``xx - yy``)."""
        return self.dxx - self.dyy

    def regressor(self, name: str) -> np.ndarray:
        """The regressor called ``name`` in :data:`REGRESSORS`."""
        return getattr(self, REGRESSORS[name][0])

    def scattered(self, where: np.ndarray) -> "FlatHessian":
        """These values (one per ``True`` of ``where``, in order) placed in arrays of ``where``'s
        shape, NaN elsewhere."""
        full = [np.full(where.shape, np.nan) for _ in range(3)]
        for arr, v in zip(full, (self.dxx, self.dyy, self.dxy)):
            arr[where] = v
        return FlatHessian(*full, step=self.step)


def flat_hessian(flat: Any, x: Any, y: Any, sigma: Any = None, radius: Any = None, *,
                 step: float = 1.0, min_weight: float | None = None) -> FlatHessian:
    """Second derivatives of the flat over each spot's footprint, at spot positions.

    Parameters
    ----------
    flat : numpy.ndarray or FlatImage
        Normalised flat ``[y, x]`` (NaN = masked).
    x, y : array_like
        Positions, CCD pixels (DM convention), any shape.
    sigma, radius : float or array_like, optional
        Footprint, as in :func:`spotflat.footprint.sample_flat` (arrays: one
        per position). Use the footprint ``q`` is sampled with.
    step : float
        Finite-difference step in pixels (1: the interpolated discrete second
        difference of the smoothed flat; the smoothing is the footprint's).
    min_weight : float, optional
        As in :func:`spotflat.footprint.sample_flat`.

    Returns
    -------
    FlatHessian

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[0:60, 0:70].astype(float)
    >>> flat = 1 + 1e-4 * ((xx - 35) ** 2 - 0.5 * (yy - 30) ** 2 + (xx - 35) * (yy - 30))
    >>> h = flat_hessian(flat, 35.2, 30.4, sigma=2.0)
    >>> [round(float(v), 8) for v in (h.dxx, h.dyy, h.dxy)]
    [0.0002, -0.0001, 0.0001]
    """
    from .footprint import sample_flat

    if not step > 0:
        raise ValueError(f"step must be > 0, not {step}")
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    shape = x.shape
    xs, ys = x.ravel(), y.ravel()
    n = xs.size
    kw: dict = {} if min_weight is None else {"min_weight": min_weight}
    for name, v in (("sigma", sigma), ("radius", radius)):
        if v is None:
            continue
        v = np.asarray(v, float)
        kw[name] = float(v) if v.ndim == 0 else np.tile(np.broadcast_to(v, shape).ravel(), len(_OFFSETS))
    px = (xs[None, :] + step * _OFFSETS[:, :1]).ravel()
    py = (ys[None, :] + step * _OFFSETS[:, 1:]).ravel()
    q = sample_flat(flat, px, py, **kw).reshape(len(_OFFSETS), n)
    c, xp, xm, yp, ym, pp, mm, pm, mp = q
    h2 = step * step
    dxx = (xp + xm - 2 * c) / h2
    dyy = (yp + ym - 2 * c) / h2
    dxy = (pp + mm - pm - mp) / (4 * h2)
    return FlatHessian(dxx.reshape(shape), dyy.reshape(shape), dxy.reshape(shape), float(step))


def noise_hessian(shape: tuple[int, int], x: Any, y: Any, electrons: float, sigma: Any = None,
                  radius: Any = None, seed: int | np.random.Generator | None = 0) -> FlatHessian:
    """What :func:`flat_hessian` returns on the photon noise alone of a flat of ``electrons`` e-/pixel.

    A flat of the same ``shape`` made only of white noise of relative
    variance ``1 / electrons`` per pixel, differentiated exactly as the flat
    is (same positions, footprint and stencil): its variance over the
    points, after the same per-spot centring, is the noise variance of the
    regressor, so ``1 - var(noise) / var(regressor)`` is the regressor's
    reliability ratio (the attenuation of a least-squares slope on it).

    Parameters
    ----------
    shape : (int, int)
        Shape of the flat.
    x, y, sigma, radius
        As :func:`flat_hessian`.
    electrons : float
        Electrons per pixel of the flat.
    seed : int or numpy.random.Generator, optional

    Returns
    -------
    FlatHessian
    """
    if not electrons > 0:
        raise ValueError(f"electrons must be > 0, not {electrons}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    noise = rng.standard_normal(tuple(shape)) / np.sqrt(float(electrons))
    return flat_hessian(noise, x, y, sigma=sigma, radius=radius)
