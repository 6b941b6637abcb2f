"""Synthetic spot-projector dithers and CCOB flats with a known truth.

What is simulated
-----------------
* A **true response map** ``R`` of the chosen detector (per-amplifier gains,
  tree rings, mid-line, edge roll-off, dust donuts, PRNU; see
  :mod:`spotflat.response`).
* A **spot grid** (default 49 x 49, step ~65.3 px, small rotation) whose spots
  have their own brightness ``F[k]`` (a few % scatter on a mild vignetting),
  a small fixed projector distortion, and second moments ~5 px^2; it is
  **dithered** over ``ndither`` exposures (random or raster sub-step offsets
  of the grid centre), each with a brightness ``s[j]`` drifting from exposure
  to exposure (normalised to ``median(s) = 1``).
* **Spot measurements.** The detector multiplies the spot's Gaussian profile
  ``G`` (its moments ``Sigma``) by ``R`` sampled at the nominal pixel
  centres: pixels that are larger or more sensitive collect more of the light
  falling on them. This is the simple pixel-area model: a pixel's area (or
  QE) scales what it collects, but pixel boundaries are not moved, so the
  charge is not displaced as the lateral fields behind real tree rings would
  displace it. The measured quantities are the moments of ``G R``:

  - flux ``f = F[k] s[j] Rbar`` with ``Rbar = sum(G R) / sum(G)`` the
    response averaged over the footprint (the same Gaussian weight
    :func:`footprint_moments` uses);
  - centroid shifted by ``sum(G R d) / sum(G R)`` (``d`` the pixel offset
    from the spot centre), i.e. ``Sigma grad ln(G * R)``: spots move up the
    response gradient;
  - second moments changed by the central second moments of ``G R`` minus
    those of ``G``, i.e. ``Sigma (H / Rbar) Sigma - shift shift^T`` with
    ``H`` the Hessian of the smoothed response: a spot sitting on a ring crest
    looks narrower across the ring.

  Then Gaussian noise of the Poisson + read-noise size (``noise`` scales it;
  0 switches it off), a fraction of missing spots (no row / NaN row), a few
  outliers (cosmic-ray hits, blends: flux off by 5-70 %) and, in DM
  catalogues, a few unmatched junk sources.
* A **CCOB flat**: ``level x R_flat x I`` plus Poisson noise, with ``I`` a
  smooth illumination (tilt + radial fall-off, ``illumination`` sets its
  size) and ``R_flat`` the response the flat sees, which ``flat_mismatch``
  chooses:

  - ``"none"``: ``R_flat = R`` -- the flat sees exactly the spots' response;
  - ``"treering"``: the spots see ``R (1 + T)`` with ``T`` an extra
    tree-ring pattern (same centre, its own profile, peak amplitude
    ``mismatch_amplitude``) that the flat does not see;
  - ``"independent"``: ``R_flat`` is an independent realisation (other
    gains, ring centre and profile, dust, PRNU) without the deterministic
    edge and mid-line features, so nothing is shared with ``R``;
  - ``"wavelength"``: the flat is taken at another wavelength where the
    tree rings have ``wavelength_ratio`` times the spots' amplitude.

Truth and normalisation
-----------------------
``truth.fits`` (read it with :func:`read_truth`) holds, per point
``(k, j)``: ``resp = Rbar`` (spots), ``resp_flat`` (the flat's response over
the same footprint, noiseless, without illumination), ``illum`` (``I`` at
the spot), ``mismatch = resp / resp_flat``, ``flux_true`` and the measured
``flux``, the ``missing`` and ``outlier`` flags, and three normalised
quantities:

* ``t = flux_true / (F[k] s[j])`` with ``F``, ``s`` (tables ``SPOTS`` and
  ``EXPOSURES``) the fixed point of the calibration's alternating means on
  the noiseless fluxes of the measured, non-outlier points, with
  ``median(s) = 1`` (:func:`effective_scales`). These are what a calibration
  can recover: it cannot tell a factor shared by all spots of one exposure
  (their mean response moves as the grid is dithered, ~1e-4) from the
  projector's brightness, so they differ from the projector's own
  brightness ``F_proj``, ``s_proj`` by such factors.
* ``t_spot = resp / <resp>_k`` and ``q = resp_flat illum / <resp_flat
  illum>_k``: spot and flat response each divided by its per-spot mean over
  the same points (DESIGN.md's normalisation of ``q``).

With ``flat_mismatch="none"``, ``noise=0`` and ``illumination=0``,
``t_spot == q`` exactly and ``t / q`` is a product of one factor per spot
and one per exposure, each within ~1e-3 of 1; with illumination, ``t_spot / q = <resp I>_k / (<resp>_k I) ~ <I>_k
/ I``, the illumination's variation across the dither cell (~1e-3 for the
default).

In memory and on disk
---------------------
:func:`simulate_data` returns everything as arrays (a :class:`Simulation`);
:func:`simulate_run` also writes ``OUTDIR/spotdata/``, ``OUTDIR/flat/`` and
``OUTDIR/truth.fits``. For many cheap realisations (injection-recovery
tests), give :func:`simulate_data` a small made-up CCD,
``layout=spotflat.response.synthetic_layout((600, 600))``, and a small grid.

Projector positions
-------------------
File names carry the projector (BOT) position in mm, with one decimal. The
simulated projector axis meets the CCD at the grid centre ``(X0, Y0)``; its
BOT position is that pixel mapped to the focal plane by the geometry and to
BOT coordinates by :mod:`spotflat.projector`'s default convention (see
:func:`bot_position`), so a fit of the projector map on simulated dithers
recovers the geometry's prediction (to the 0.05 mm rounding of the names).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .errors import InputError
from .fileio import atomic_path, provenance_cards
from .response import (ResponseParams, child_seed, detector_layout, illumination_at, illumination_map,
                       response_map, treering_map)

__all__ = [
    "SpotSimulation",
    "Simulation",
    "SimulationResult",
    "PRESETS",
    "MISMATCH_MODES",
    "footprint_moments",
    "effective_scales",
    "simulate_spots",
    "simulate_data",
    "simulate_run",
    "make_flat",
    "spot_filename",
    "bot_position",
    "read_truth",
    "response_map",
    "ResponseParams",
]

MISMATCH_MODES = ("none", "treering", "independent", "wavelength")
FORMATS = ("dm", "legacy")
FLAT_FORMS = ("assembled", "raw")

#: Named run sizes: ``small`` runs end to end in seconds (demo, tests).
PRESETS = {
    "small": dict(ndither=50),
    "full": dict(ndither=200),
}

_DEFAULT_DATE = "20191031"
_EXPTIME = 20.0


# --------------------------------------------------------------------------
# footprint sampling
# --------------------------------------------------------------------------

def _stamp_moments(w: np.ndarray, ddx: np.ndarray, ddy: np.ndarray) -> tuple:
    """Sum, centroid and central second moments of stamps ``w[n, row, col]``."""
    col = w.sum(axis=1)  # (n, m): marginal along x
    row = w.sum(axis=2)  # (n, m): marginal along y
    s0 = col.sum(axis=1)
    mx = (col * ddx).sum(axis=1) / s0
    my = (row * ddy).sum(axis=1) / s0
    vxx = (col * ddx * ddx).sum(axis=1) / s0 - mx * mx
    vyy = (row * ddy * ddy).sum(axis=1) / s0 - my * my
    vxy = (np.einsum("nyx,nx->ny", w, ddx) * ddy).sum(axis=1) / s0 - mx * my
    return s0, mx, my, vxx, vyy, vxy


def footprint_moments(image: np.ndarray, x, y, xx, yy, xy, half: int = 8,
                      chunk: int = 20000) -> dict[str, np.ndarray]:
    """Gaussian-weighted moments of ``image`` about points ``(x, y)``.

    The weight is the spot profile ``G`` with second moments ``xx, yy, xy``
    evaluated at pixel centres within ``half`` pixels (the stamp is
    ``2 half + 1`` pixels wide; pixels off the image count as 0).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image (e.g. the response), pixel ``(iy, ix)`` centred at
        ``(x, y) = (ix, iy)``.
    x, y : array_like
        Spot centres, pixels.
    xx, yy, xy : array_like
        Second moments of the weight (broadcast against ``x``).
    half : int
        Stamp half-width, pixels.
    chunk : int
        Points per vectorised batch (bounds the memory).

    Returns
    -------
    dict of numpy.ndarray
        ``mean`` -- ``sum(G I) / sum(G)``; ``dx, dy`` -- centroid of ``G I``
        minus centroid of ``G``; ``dxx, dyy, dxy`` -- central second moments
        of ``G I`` minus those of ``G``. Shapes follow ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> m = footprint_moments(np.ones((50, 50)), [20.3], [25.0], 5.0, 5.0, 0.0)
    >>> float(m["mean"][0]), float(abs(m["dx"][0])) < 1e-12
    (1.0, True)
    """
    x, y, xx, yy, xy = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, y, xx, yy, xy)))
    shape = x.shape
    x, y, xx, yy, xy = (a.ravel() for a in (x, y, xx, yy, xy))
    ny, nx = image.shape
    flat = image.ravel()
    off = np.arange(-half, half + 1)
    out = {k: np.empty(x.size) for k in ("mean", "dx", "dy", "dxx", "dyy", "dxy")}
    for lo in range(0, x.size, chunk):
        sl = slice(lo, min(lo + chunk, x.size))
        px = np.floor(x[sl] + 0.5).astype(np.int64)[:, None] + off  # (n, m)
        py = np.floor(y[sl] + 0.5).astype(np.int64)[:, None] + off
        ddx = px - x[sl, None]  # (n, m) offsets of the stamp columns
        ddy = py - y[sl, None]  # (n, m) offsets of the stamp rows
        det = xx[sl] * yy[sl] - xy[sl] ** 2
        a, b, c = yy[sl] / det, -xy[sl] / det, xx[sl] / det
        # G = gx(col) gy(row) exp(-b dx dy): separable parts on (n, m), cross term on (n, m, m)
        gxw = np.exp(-0.5 * a[:, None] * ddx * ddx)
        gyw = np.exp(-0.5 * c[:, None] * ddy * ddy)
        w = np.exp(-b[:, None, None] * ddy[:, :, None] * ddx[:, None, :])
        w *= gyw[:, :, None]
        w *= gxw[:, None, :]
        inside = ((px >= 0) & (px < nx))[:, None, :] & ((py >= 0) & (py < ny))[:, :, None]
        idx = np.clip(py, 0, ny - 1)[:, :, None] * nx + np.clip(px, 0, nx - 1)[:, None, :]
        vals = flat[idx]
        if not inside.all():
            vals = np.where(inside, vals, 0)
        wi = w * vals
        mom0 = _stamp_moments(w, ddx, ddy)
        momi = _stamp_moments(wi, ddx, ddy)
        out["mean"][sl] = momi[0] / mom0[0]
        for key, i in (("dx", 1), ("dy", 2), ("dxx", 3), ("dyy", 4), ("dxy", 5)):
            out[key][sl] = momi[i] - mom0[i]
    return {k: v.reshape(shape) for k, v in out.items()}


# --------------------------------------------------------------------------
# spots
# --------------------------------------------------------------------------

@dataclass
class SpotSimulation:
    """Simulated spot measurements and their truth, as ``[spot, exposure]`` arrays.

    Attributes
    ----------
    grid : astropy.table.Table
        One row per exposure: ``x0 y0 xstep ystep theta`` of the (fitted =
        true) grid, the dither offset ``ddx ddy`` and the scale ``s``.
    ncols, nrows : int
        Grid size.
    F : numpy.ndarray
        ``(nspot,)`` projector brightness of each spot (electrons at
        ``s = 1``, ``R = 1``).
    s : numpy.ndarray
        ``(nexp,)`` exposure scale, ``median(s) = 1``.
    gx, gy : numpy.ndarray
        ``(nspot, nexp)`` grid points.
    x_true, y_true : numpy.ndarray
        ``(nspot, nexp)`` true spot centres (grid point + distortion).
    xx_true, yy_true, xy_true : numpy.ndarray
        ``(nspot, nexp)`` true second moments of the spot profile.
    resp : numpy.ndarray
        ``(nspot, nexp)`` response averaged over the footprint (``Rbar``).
    flux_true : numpy.ndarray
        ``F s Rbar`` (noiseless, no outliers).
    flux, flux_err, x, y, xx, yy, xy : numpy.ndarray
        Measured values, NaN where ``missing``. ``flux_err`` is the noise
        model's error (its ``noise=1`` value when ``noise=0``, so that
        weights stay finite).
    missing, outlier : numpy.ndarray
        Boolean ``(nspot, nexp)`` masks.
    params : dict
        The parameters used.
    treering_shift : dict or None
        With pixel-area tree rings (``displacement``): ``f`` (footprint-mean
        radial charge displacement, pixels), ``fprime`` and ``r`` at every
        point; None otherwise.
    """

    grid: Table = field(repr=False)
    ncols: int
    nrows: int
    F: np.ndarray = field(repr=False)
    s: np.ndarray = field(repr=False)
    gx: np.ndarray = field(repr=False)
    gy: np.ndarray = field(repr=False)
    x_true: np.ndarray = field(repr=False)
    y_true: np.ndarray = field(repr=False)
    xx_true: np.ndarray = field(repr=False)
    yy_true: np.ndarray = field(repr=False)
    xy_true: np.ndarray = field(repr=False)
    resp: np.ndarray = field(repr=False)
    flux_true: np.ndarray = field(repr=False)
    flux: np.ndarray = field(repr=False)
    flux_err: np.ndarray = field(repr=False)
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    xx: np.ndarray = field(repr=False)
    yy: np.ndarray = field(repr=False)
    xy: np.ndarray = field(repr=False)
    missing: np.ndarray = field(repr=False)
    outlier: np.ndarray = field(repr=False)
    params: dict = field(default_factory=dict, repr=False)
    treering_shift: dict | None = field(default=None, repr=False)

    @property
    def nspot(self) -> int:
        """Number of grid points."""
        return self.F.size

    @property
    def nexp(self) -> int:
        """Number of exposures."""
        return self.s.size


def _grid_points(x0, y0, xstep, ystep, theta, ncols, nrows):
    try:
        from .grids import grid_positions
    except ImportError:  # pragma: no cover - grids is part of the package
        grid_positions = None
    if grid_positions is not None:
        return grid_positions(x0, y0, xstep, ystep, theta, ncols, nrows)
    k = np.arange(ncols * nrows)  # pragma: no cover
    u = (k // nrows - (ncols - 1) / 2.0) * xstep
    v = (k % nrows - (nrows - 1) / 2.0) * ystep
    return x0 + u * np.cos(theta) - v * np.sin(theta), y0 + u * np.sin(theta) + v * np.cos(theta)


def _dither_offsets(n: int, mode: str, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """``(n, 2)`` dither offsets in units of the grid step."""
    if mode == "random":
        return rng.uniform(-0.5, 0.5, size=(n, 2)) * amplitude
    if mode == "raster":
        m = int(np.ceil(np.sqrt(n)))
        pos = (np.arange(m) + 0.5) / m - 0.5
        rows = [(pos[i] if (j % 2 == 0) else pos[m - 1 - i], pos[j]) for j in range(m) for i in range(m)]
        return np.asarray(rows[:n]) * amplitude
    raise InputError(f"unknown dither pattern {mode!r}", expected="random or raster")


def simulate_spots(response: np.ndarray, *, ndither: int = 50, seed: int | np.random.SeedSequence = 0,
                   noise: float = 1.0, ncols: int = 49, nrows: int = 49, xstep: float = 65.3,
                   ystep: float | None = None, theta: float = 0.004,
                   center: tuple[float, float] | None = None, dither: str = "random",
                   dither_amplitude: float = 1.0, flux: float = 3.0e5, flux_spread: float = 0.03,
                   vignetting: float = 0.2, drift: float = 0.003, moments: tuple[float, float, float] = (5.0, 5.2, 0.2),
                   moment_spread: float = 0.15, distortion: float = 0.5, read_noise: float = 8.0,
                   missing_fraction: float = 0.03, outlier_fraction: float = 0.003,
                   flux_weight: str = "gaussian2", displacement=None) -> SpotSimulation:
    """Dither a spot grid over ``response`` and measure every spot.

    See the module notes for the measurement model.

    Parameters
    ----------
    response : numpy.ndarray
        The response the spots see, ``(ny, nx)`` in the DM orientation.
    ndither : int
        Number of exposures.
    seed : int or numpy.random.SeedSequence
        Seed; the same seed gives the same simulation.
    noise : float
        Noise scale: 1 for Poisson + read noise, 0 for none.
    ncols, nrows : int
        Grid size.
    xstep, ystep : float
        Grid steps, pixels (``ystep`` defaults to ``1.0002 xstep``).
    theta : float
        Grid rotation, radians (each exposure adds a ~2e-5 rad jitter).
    center : tuple of float, optional
        Undithered grid centre ``(x, y)``; default: the CCD centre plus a
        random offset of up to 20 px.
    dither : {"random", "raster"}
        Sub-step offsets drawn uniformly or on a raster.
    dither_amplitude : float
        Size of the dither box in grid steps (1 = one full step).
    flux : float
        Mean spot flux, electrons (gain 1).
    flux_spread : float
        Fractional scatter of the spot brightnesses.
    vignetting : float
        Fractional fall-off of the spot brightness towards the grid corners.
    drift : float
        Per-exposure random-walk step of the brightness ``s``.
    moments : tuple of float
        Mean ``(xx, yy, xy)``, pixel^2.
    moment_spread : float
        Scatter of each spot's ``xx, yy`` (pixel^2; ``xy`` gets 2/3 of it).
    distortion : float
        Size of the projector's fixed distortion, pixels.
    read_noise : float
        Electrons per pixel.
    missing_fraction : float
        Fraction of points dropped at random.
    outlier_fraction : float
        Fraction of measured points made outliers.
    flux_weight : {"gaussian", "gaussian2"}
        Weight through which the flux sees the response: ``G**2`` (default)
        as the Gaussian-weighted ``base_SdssShape_instFlux`` the catalogues
        are labelled with does (moments halved), or the spot's profile
        ``G`` (a total flux). Centroids and shapes keep ``G``. (With ``G``
        under the SdssShape label, ``correlate``'s matching footprint
        ``sigma/sqrt(2)`` sees a narrower response than the spots did: the
        demo's slope came out 1-3 % high.)
    displacement : spotflat.treerings.TreeRingModel, optional
        Pixel-area tree rings: the charge of each spot is displaced radially
        by the model's ``f(r)``; the flux is unchanged, the centroid moves by
        the footprint average of ``f`` and the second moments change by
        ``J Sigma + Sigma J`` (:func:`spotflat.treerings.displacement_at`).
        The shifts are stored in ``treering_shift``.

    Returns
    -------
    SpotSimulation
    """
    if ndither < 1:
        raise InputError(f"ndither must be at least 1, not {ndither}")
    if ncols < 1 or nrows < 1:
        raise InputError(f"grid {ncols} x {nrows} is empty")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.default_rng(ss)
    ny, nx = response.shape
    ystep = 1.0002 * xstep if ystep is None else ystep
    nspot, nexp = ncols * nrows, ndither
    if center is None:
        center = ((nx - 1) / 2 + rng.uniform(-20, 20), (ny - 1) / 2 + rng.uniform(-20, 20))

    # per spot: grid coordinates scaled to [-1, 1], brightness, distortion, shape
    k = np.arange(nspot)
    U = (k // nrows - (ncols - 1) / 2) / max((ncols - 1) / 2, 1)
    V = (k % nrows - (nrows - 1) / 2) / max((nrows - 1) / 2, 1)
    F = flux * (1 - vignetting * 0.5 * (U * U + V * V)) * np.exp(flux_spread * rng.standard_normal(nspot))
    cdx, cdy = rng.standard_normal((2, 4)) * distortion / 2
    dist_x = cdx[0] * U * U + cdx[1] * U * V + cdx[2] * V * V + cdx[3] * U ** 3 + 0.03 * rng.standard_normal(nspot)
    dist_y = cdy[0] * U * U + cdy[1] * U * V + cdy[2] * V * V + cdy[3] * V ** 3 + 0.03 * rng.standard_normal(nspot)
    xx_k = moments[0] + moment_spread * rng.standard_normal(nspot)
    yy_k = moments[1] + moment_spread * rng.standard_normal(nspot)
    xy_k = moments[2] + 0.67 * moment_spread * rng.standard_normal(nspot)

    # per exposure: dither, rotation jitter, focus, brightness drift
    off = _dither_offsets(nexp, dither, dither_amplitude, rng)
    x0 = center[0] + off[:, 0] * xstep
    y0 = center[1] + off[:, 1] * ystep
    th = theta + 2e-5 * rng.standard_normal(nexp)
    focus = 1 + 0.005 * rng.standard_normal(nexp)
    s = np.exp(np.cumsum(drift * rng.standard_normal(nexp)) + 0.3 * drift * rng.standard_normal(nexp))
    s /= np.median(s)

    gx = np.empty((nspot, nexp))
    gy = np.empty((nspot, nexp))
    for j in range(nexp):
        gx[:, j], gy[:, j] = _grid_points(x0[j], y0[j], xstep, ystep, th[j], ncols, nrows)
    x_true = gx + dist_x[:, None]
    y_true = gy + dist_y[:, None]
    xx_t = xx_k[:, None] * focus[None, :]
    yy_t = yy_k[:, None] * focus[None, :]
    xy_t = xy_k[:, None] * focus[None, :]

    fm = footprint_moments(response, x_true, y_true, xx_t, yy_t, xy_t)
    if flux_weight == "gaussian2":
        resp = footprint_moments(response, x_true, y_true, xx_t / 2, yy_t / 2, xy_t / 2)["mean"]
    elif flux_weight == "gaussian":
        resp = fm["mean"]
    else:
        raise InputError(f"unknown flux weight {flux_weight!r}", expected="gaussian or gaussian2")
    tr_shift = None
    if displacement is not None:
        from .treerings import displacement_at

        dsp = displacement_at(displacement, x_true, y_true, xx_t, yy_t, xy_t)
        for key in ("dx", "dy", "dxx", "dyy", "dxy"):
            fm[key] = fm[key] + dsp[key]
        tr_shift = dsp
    flux_true = F[:, None] * s[None, :] * resp

    # noise: Poisson + read noise over the footprint's effective area
    neff = 4 * np.pi * np.sqrt(xx_t * yy_t - xy_t ** 2)
    ferr = np.sqrt(np.maximum(flux_true, 0) + neff * read_noise ** 2)
    snr = flux_true / ferr
    gauss = rng.standard_normal((6, nspot, nexp)) * noise
    meas_flux = flux_true + ferr * gauss[0]
    sig_x = np.sqrt(2 * xx_t) / snr
    sig_y = np.sqrt(2 * yy_t) / snr
    cx = x_true + fm["dx"] + sig_x * gauss[1]
    cy = y_true + fm["dy"] + sig_y * gauss[2]
    mxx = xx_t + fm["dxx"] + 2 * xx_t / snr * gauss[3]
    myy = yy_t + fm["dyy"] + 2 * yy_t / snr * gauss[4]
    mxy = xy_t + fm["dxy"] + np.sqrt(2 * xx_t * yy_t) / snr * gauss[5]

    # missing: random drops, and spots whose centre is off (or at) the CCD edge
    missing = rng.random((nspot, nexp)) < missing_fraction
    missing |= (x_true < 2) | (x_true > nx - 3) | (y_true < 2) | (y_true > ny - 3)
    # spots partly off the CCD lose flux: flag them as outliers
    outlier = (resp < 0.8) & ~missing
    pick = (rng.random((nspot, nexp)) < outlier_fraction) & ~missing
    kind = rng.random((nspot, nexp)) < 0.6
    cr = pick & kind  # cosmic-ray hit: extra flux
    meas_flux = np.where(cr, meas_flux * (1 + rng.uniform(0.05, 0.5, (nspot, nexp))), meas_flux)
    bl = pick & ~kind  # blend or partial detection: flux lost, centroid and size off
    ang = rng.uniform(0, 2 * np.pi, (nspot, nexp))
    shift = rng.uniform(0.5, 2.0, (nspot, nexp))
    meas_flux = np.where(bl, meas_flux * rng.uniform(0.3, 0.9, (nspot, nexp)), meas_flux)
    cx = np.where(bl, cx + shift * np.cos(ang), cx)
    cy = np.where(bl, cy + shift * np.sin(ang), cy)
    grow = rng.uniform(1.1, 1.5, (nspot, nexp))
    mxx, myy = np.where(bl, mxx * grow, mxx), np.where(bl, myy * grow, myy)
    outlier |= pick

    nan = np.where(missing, np.nan, 1.0)
    grid = Table({"x0": x0, "y0": y0, "xstep": np.full(nexp, xstep), "ystep": np.full(nexp, ystep),
                  "theta": th, "ddx": off[:, 0] * xstep, "ddy": off[:, 1] * ystep, "s": s})
    params = dict(ndither=ndither, noise=noise, ncols=ncols, nrows=nrows, xstep=xstep, ystep=ystep,
                  theta=theta, center=tuple(float(c) for c in center), dither=dither,
                  dither_amplitude=dither_amplitude, flux=flux, flux_spread=flux_spread,
                  vignetting=vignetting, drift=drift, moments=tuple(moments), moment_spread=moment_spread,
                  distortion=distortion, read_noise=read_noise, missing_fraction=missing_fraction,
                  outlier_fraction=outlier_fraction)
    return SpotSimulation(
        grid=grid, ncols=ncols, nrows=nrows, F=F, s=s, gx=gx, gy=gy, x_true=x_true, y_true=y_true,
        xx_true=xx_t, yy_true=yy_t, xy_true=xy_t, resp=resp, flux_true=flux_true,
        flux=meas_flux * nan, flux_err=ferr * (noise if noise > 0 else 1.0) * nan, x=cx * nan, y=cy * nan,
        xx=mxx * nan, yy=myy * nan, xy=mxy * nan, missing=missing, outlier=outlier, params=params,
        treering_shift=None if tr_shift is None else {k: tr_shift[k] for k in ("f", "fprime", "r")})


# --------------------------------------------------------------------------
# flat
# --------------------------------------------------------------------------

def make_flat(response: np.ndarray, illumination: np.ndarray | float = 1.0, level: float = 50000.0,
              noise: float = 1.0, seed: int | np.random.SeedSequence = 0) -> np.ndarray:
    """A CCOB flat: ``level x response x illumination`` plus Poisson noise.

    Parameters
    ----------
    response : numpy.ndarray
        The response the flat sees.
    illumination : numpy.ndarray or float
        The CCOB illumination pattern (or a constant).
    level : float
        Mean signal, electrons per pixel (gain 1).
    noise : float
        Noise scale (0: noiseless).
    seed : int or numpy.random.SeedSequence

    Returns
    -------
    numpy.ndarray
        float32 image.
    """
    rng = np.random.default_rng(seed)
    img = np.multiply(response, illumination, dtype=np.float32)
    img *= np.float32(level)
    if noise > 0:
        # Gaussian approximation to Poisson: the level is tens of thousands of electrons
        g = rng.standard_normal(img.shape, dtype=np.float32)
        g *= np.sqrt(np.maximum(img, 0)) * np.float32(noise)
        img += g
    return img


# --------------------------------------------------------------------------
# names and projector positions
# --------------------------------------------------------------------------

def _split_detector(detector: str) -> tuple[str, str]:
    parts = detector.split("_")
    if len(parts) != 2 or not parts[0].startswith("R") or not parts[1].startswith("S"):
        raise InputError(f"bad detector name {detector!r}", expected="RXY_SXY, e.g. R22_S11")
    return parts[0], parts[1]


def bot_position(detector: str, x0, y0):
    """Projector (BOT) position, mm, of a grid centred at CCD pixel ``(x0, y0)``.

    The grid centre is taken to be where the projector's axis meets the CCD:
    pixel -> DM focal plane through :func:`spotflat.geometry.ccd_to_focal`,
    then focal plane -> BOT through :func:`spotflat.projector.focal_to_bot`
    (its default convention), so :func:`spotflat.projector.bot_to_ccd` inverts
    it.

    Parameters
    ----------
    detector : str
    x0, y0 : float or array_like
        Grid centre, CCD pixels.

    Returns
    -------
    bot_x, bot_y : float or numpy.ndarray

    Examples
    --------
    >>> bx, by = bot_position("R02_S02", 2036.5, 2000.5)
    >>> round(float(bx), 2), round(float(by), 2)
    (-296.25, 42.25)
    """
    from .geometry import ccd_to_focal
    from .projector import focal_to_bot

    fx, fy = ccd_to_focal(detector, x0, y0, check=False)
    return focal_to_bot(fx, fy)


def spot_filename(detector: str, seq: int, bot_x: float, bot_y: float, fmt: str = "dm",
                  date: str = _DEFAULT_DATE, exptime: float = _EXPTIME) -> str:
    """Processed-grid file name in the mixcoatl convention.

    Examples
    --------
    >>> spot_filename("R02_S02", 1500, -293.2, 39.6)
    'MC_C_20191031_001500_R02_S02_20.0s_-293.2x_39.6y_gridfit.cat'
    >>> spot_filename("R22_S11", 7, 0.04, -0.04, fmt="legacy")
    'MC_C_20191031_000007_R22_S11_20.0s_0.0x_-0.0y_processed_grid.fits'
    """
    raft, sensor = _split_detector(detector)
    suffix = {"dm": "gridfit.cat", "legacy": "processed_grid.fits"}[fmt]
    return f"MC_C_{date}_{seq:06d}_{raft}_{sensor}_{exptime:.1f}s_{bot_x:.1f}x_{bot_y:.1f}y_{suffix}"


# --------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------

def _dm_table(sim: SpotSimulation, j: int, rng: np.random.Generator, njunk: float,
              shape: tuple[int, int]) -> fits.BinTableHDU:
    """One DM grid source catalogue (the LSST SourceCatalog column names)."""
    ok = ~sim.missing[:, j]
    idx = np.flatnonzero(ok)
    ny, nx = shape
    nj = int(rng.poisson(njunk))
    jx, jy = rng.uniform(0, nx - 1, nj), rng.uniform(0, ny - 1, nj)
    jflux = np.exp(rng.uniform(np.log(2e2), np.log(2e4), nj))
    jsize = np.where(rng.random(nj) < 0.5, rng.uniform(0.2, 0.6, nj), rng.uniform(4, 20, nj))
    jerr = np.sqrt(jflux + 4 * np.pi * jsize * 64.0)

    def cat(a, b):
        return np.concatenate([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])

    flux, ferr = sim.flux[idx, j], sim.flux_err[idx, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(ferr > 0, np.abs(flux) / ferr, np.inf)
    xx, yy, xy = sim.xx[idx, j], sim.yy[idx, j], sim.xy[idx, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        ex, ey = np.sqrt(2 * np.abs(xx)) / snr, np.sqrt(2 * np.abs(yy)) / snr
    # aperture fluxes enclose the whole spot: same response, more read noise
    rn2 = sim.params["read_noise"] ** 2 * sim.params["noise"] ** 2
    noise = sim.params["noise"]
    ap = {}
    for r in (12, 17):
        aerr = np.sqrt(np.maximum(ferr ** 2 + np.pi * r * r * rn2, 0))
        ap[r] = (sim.flux_true[idx, j] + aerr * noise * rng.standard_normal(idx.size)
                 + (flux - sim.flux_true[idx, j]) * (sim.outlier[idx, j]), aerr)
    cols = [
        ("base_SdssCentroid_x", "D", "pixel", cat(sim.x[idx, j], jx)),
        ("base_SdssCentroid_y", "D", "pixel", cat(sim.y[idx, j], jy)),
        ("base_SdssCentroid_xErr", "E", "pixel", cat(ex, np.full(nj, 0.1))),
        ("base_SdssCentroid_yErr", "E", "pixel", cat(ey, np.full(nj, 0.1))),
        ("base_SdssShape_xx", "D", "pixel^2", cat(xx, jsize)),
        ("base_SdssShape_yy", "D", "pixel^2", cat(yy, jsize)),
        ("base_SdssShape_xy", "D", "pixel^2", cat(xy, np.zeros(nj))),
        ("base_SdssShape_xxErr", "E", "pixel^2", cat(2 * xx / snr, np.full(nj, 0.1))),
        ("base_SdssShape_yyErr", "E", "pixel^2", cat(2 * yy / snr, np.full(nj, 0.1))),
        ("base_SdssShape_xyErr", "E", "pixel^2", cat(np.sqrt(2 * np.abs(xx * yy)) / snr, np.full(nj, 0.1))),
        ("base_SdssShape_instFlux", "D", "ct", cat(flux, jflux)),
        ("base_SdssShape_instFluxErr", "D", "ct", cat(ferr, jerr)),
        ("base_CircularApertureFlux_12_0_instFlux", "D", "ct", cat(ap[12][0], jflux)),
        ("base_CircularApertureFlux_12_0_instFluxErr", "D", "ct", cat(ap[12][1], jerr)),
        ("base_CircularApertureFlux_17_0_instFlux", "D", "ct", cat(ap[17][0], jflux)),
        ("base_CircularApertureFlux_17_0_instFluxErr", "D", "ct", cat(ap[17][1], jerr)),
        ("spotgrid_index", "D", None, cat(idx, np.full(nj, np.nan))),
        ("spotgrid_x", "D", None, cat(sim.gx[idx, j], np.full(nj, np.nan))),
        ("spotgrid_y", "D", None, cat(sim.gy[idx, j], np.full(nj, np.nan))),
    ]
    # sources come out of detection roughly in y order
    order = np.lexsort((cols[0][3], np.round(cols[1][3])))
    n = order.size
    columns = [fits.Column(name="id", format="K", array=np.arange(1, n + 1, dtype=np.int64)),
               fits.Column(name="parent", format="K", array=np.zeros(n, dtype=np.int64))]
    for name, form, unit, arr in cols:
        columns.append(fits.Column(name=name, format=form, unit=unit, array=arr[order]))
    return fits.BinTableHDU.from_columns(columns)


def _grid_cards(sim: SpotSimulation, j: int) -> dict:
    g = sim.grid[j]
    return {"X0": float(g["x0"]), "Y0": float(g["y0"]), "XSTEP": float(g["xstep"]),
            "YSTEP": float(g["ystep"]), "THETA": float(g["theta"]), "NCOLS": sim.ncols, "NROWS": sim.nrows}


def _write_dm(path: Path, sim: SpotSimulation, j: int, rng, njunk, shape, meta: dict) -> None:
    table = _dm_table(sim, j, rng, njunk, shape)
    # projector distortion as the grid task would store it: per spot, in grid steps
    dxn = (sim.x_true[:, j] - sim.gx[:, j]) / sim.grid["xstep"][j]
    dyn = (sim.y_true[:, j] - sim.gy[:, j]) / sim.grid["ystep"][j]
    info = fits.BinTableHDU.from_columns(
        [fits.Column(name="NORMALIZED_DY", format="D", array=dyn),
         fits.Column(name="NORMALIZED_DX", format="D", array=dxn)], name="GRID_INFO")
    for k, v in _grid_cards(sim, j).items():
        info.header[k] = v
    primary = fits.PrimaryHDU()
    primary.header.update(meta)
    with atomic_path(path) as tmp:
        fits.HDUList([primary, table, info]).writeto(tmp)


def _write_legacy(path: Path, sim: SpotSimulation, j: int, meta: dict) -> None:
    miss = sim.missing[:, j]
    nan = np.where(miss, np.nan, 1.0)
    zeros = np.where(miss, np.nan, 0.0)
    gx, gy = sim.gx[:, j], sim.gy[:, j]
    cols = {
        "X": gx, "Y": gy, "DX": sim.x[:, j] - gx, "DY": sim.y[:, j] - gy,
        "XX": zeros, "YY": zeros, "DXX": sim.xx[:, j], "DYY": sim.yy[:, j],
        "FLUX": zeros, "DFLUX": sim.flux[:, j] * nan,
    }
    table = fits.BinTableHDU.from_columns([fits.Column(name=k, format="D", array=v) for k, v in cols.items()])
    primary = fits.PrimaryHDU()
    for k, v in _grid_cards(sim, j).items():
        primary.header[k] = v
    primary.header.update(meta)
    with atomic_path(path) as tmp:
        fits.HDUList([primary, table]).writeto(tmp)


def _flat_header(detector: str, vendor: str, level: float, mismatch: str) -> dict:
    raft, sensor = _split_detector(detector)
    return {"RAFTBAY": raft, "CCDSLOT": sensor, "DETNAME": detector, "CCD_MANU": vendor,
            "TSTAND": "CCOB", "TESTTYPE": "FLAT", "IMGTYPE": "FLAT", "EXPTIME": 10.0,
            "BUNIT": "electron", "SIMULATD": True, "SIMLEVEL": level, "SIMMISM": mismatch}


def _write_flat(path: Path, image: np.ndarray, detector: str, form: str, header: dict,
                noise: float, rng: np.random.Generator) -> None:
    if form == "assembled":
        hdu = fits.PrimaryHDU(image.astype(np.float32))
        hdu.header.update(header)
        hdu.header.update(provenance_cards())
        hdul = fits.HDUList([hdu])
    else:
        from . import geometry

        hdul = geometry.make_raw_hdulist(image, detector, overscan_level=1000.0,
                                         read_noise=6.0 * noise, rng=rng, dtype=np.int32)
        hdul[0].header.update(header)
        hdul[0].header.update(provenance_cards())
    with atomic_path(path) as tmp:
        hdul.writeto(tmp)


def _bin_mean(img: np.ndarray, b: int) -> np.ndarray:
    ny, nx = (img.shape[0] // b) * b, (img.shape[1] // b) * b
    return img[:ny, :nx].reshape(ny // b, b, nx // b, b).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


# --------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------

@dataclass
class Simulation:
    """An in-memory simulation: spot measurements, the flat and the truth.

    Attributes
    ----------
    detector, vendor, flat_mismatch : str
    spots : SpotSimulation
        The spot measurements and their truth.
    flat : numpy.ndarray
        The CCOB flat, float32 electrons, assembled (DM orientation).
    F : numpy.ndarray
        ``(nspot,)`` the spot means a calibration recovers (see the module
        notes; ``spots.F`` is the projector's own brightness).
    s : numpy.ndarray
        ``(nexp,)`` the exposure scales a calibration recovers,
        ``median(s) = 1`` (``spots.s`` is the projector's brightness drift).
    resp_flat, illum : numpy.ndarray
        ``(nspot, nexp)`` the flat's footprint-averaged response and the
        illumination at each point.
    t : numpy.ndarray
        ``(nspot, nexp)`` true relative throughput ``f / (F s)`` (noiseless).
    t_spot, q : numpy.ndarray
        ``(nspot, nexp)`` spot response and flat response (with
        illumination), each divided by its per-spot mean.
    mismatch : numpy.ndarray
        ``resp / resp_flat``.
    resp_bin, flatresp_bin : numpy.ndarray
        The spots' and the flat's true response maps, binned ``truth_bin``.
    truth_bin : int
    gains : dict
        Amplifier gain factors of the spots' response.
    params : dict
        Every parameter of the run (also in the truth file's header).
    treering : spotflat.treerings.TreeRingModel or None
        The imSim tree-ring model (None for the synthetic rings).
    treering_shift, treering_fprime : numpy.ndarray or None
        ``(nspot, nexp)`` footprint-averaged radial charge displacement
        ``f`` (pixels) and ``f'`` at every point, for pixel-area rings
        (the centroid moved by ``f`` along the radius; the flat's ring
        modulation is ``~ -f'``); None when the rings are QE-like.
    """

    detector: str
    vendor: str
    flat_mismatch: str
    spots: SpotSimulation = field(repr=False)
    flat: np.ndarray = field(repr=False)
    F: np.ndarray = field(repr=False)
    s: np.ndarray = field(repr=False)
    resp_flat: np.ndarray = field(repr=False)
    illum: np.ndarray = field(repr=False)
    t: np.ndarray = field(repr=False)
    t_spot: np.ndarray = field(repr=False)
    q: np.ndarray = field(repr=False)
    mismatch: np.ndarray = field(repr=False)
    resp_bin: np.ndarray = field(repr=False)
    flatresp_bin: np.ndarray = field(repr=False)
    truth_bin: int = field(repr=False)
    gains: dict = field(repr=False)
    params: dict = field(repr=False)
    treering: object = field(default=None, repr=False)
    treering_shift: np.ndarray | None = field(default=None, repr=False)
    treering_fprime: np.ndarray | None = field(default=None, repr=False)


@dataclass
class SimulationResult(Simulation):
    """What :func:`simulate_run` wrote, with the :class:`Simulation` behind it.

    Attributes
    ----------
    outdir : pathlib.Path
    spot_files : list of pathlib.Path
        Processed-grid files, in exposure order ``j``.
    flat_path, truth_path : pathlib.Path
    fmt, flat_form : str
    (and every attribute of :class:`Simulation`)
    """

    outdir: Path | None = None
    spot_files: list = field(default_factory=list, repr=False)
    flat_path: Path | None = None
    truth_path: Path | None = None
    fmt: str = "dm"
    flat_form: str = "assembled"


def effective_scales(flux: np.ndarray, use: np.ndarray, maxiter: int = 500,
                     tol: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """The ``F[k]``, ``s[j]`` that a calibration recovers from noiseless fluxes.

    Alternates ``F = mean_j f / s`` and ``s = mean_k f / F`` over the points
    ``use`` (plain means), with ``median(s) = 1``, to convergence: the fixed
    point of the calibration's own iteration (DESIGN.md section 2) when
    there is no noise and no outlier.

    Parameters
    ----------
    flux : numpy.ndarray
        ``(nspot, nexp)`` noiseless fluxes.
    use : numpy.ndarray
        Boolean mask of the points that enter the means.

    Returns
    -------
    F, s : numpy.ndarray
    """
    f = np.where(use, flux, 0.0)
    w = use.astype(float)
    nk, nj = w.sum(axis=1), w.sum(axis=0)
    s = np.ones(flux.shape[1])
    F = np.full(flux.shape[0], np.nan)
    for _ in range(maxiter):
        F = np.where(nk > 0, (f / s[None, :]).sum(axis=1) / np.maximum(nk, 1), np.nan)
        Fz = np.where(np.isfinite(F) & (F > 0), F, 1.0)
        s_new = np.where(nj > 0, (f / Fz[:, None]).sum(axis=0) / np.maximum(nj, 1), np.nan)
        s_new /= np.nanmedian(s_new)
        done = np.nanmax(np.abs(s_new - s)) < tol
        s = s_new
        if done:
            break
    F = np.where(nk > 0, (f / s[None, :]).sum(axis=1) / np.maximum(nk, 1), np.nan)
    return F, s


def _per_spot_norm(a: np.ndarray, use: np.ndarray) -> np.ndarray:
    w = use.astype(float)
    n = w.sum(axis=1)
    mean = np.where(n > 0, (a * w).sum(axis=1) / np.maximum(n, 1), np.nan)
    return a / mean[:, None]


def _prepare_outdir(outdir: Path, overwrite: bool) -> Path | None:
    """Check ``outdir`` and create it (with parents) if needed.

    Returns the top-most folder created here (to remove on failure), or None.
    """
    if outdir.exists() and not outdir.is_dir():
        raise InputError("output path exists and is not a directory", path=outdir)
    if outdir.is_dir():
        if any(outdir.iterdir()) and not overwrite:
            raise InputError("output directory is not empty", path=outdir,
                             expected="an empty or new directory, or --overwrite")
        if not os.access(outdir, os.W_OK):
            raise InputError("output directory is not writable", path=outdir)
        return None
    top = outdir.absolute()
    while not top.parent.exists():
        top = top.parent
    try:
        outdir.mkdir(parents=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory ({exc.strerror})", path=outdir) from None
    return top


def _check_common(ndither, preset, flat_mismatch, noise) -> int:
    if preset is not None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}", expected=" or ".join(PRESETS))
    if ndither is None:
        ndither = PRESETS[preset or "full"]["ndither"]
    if flat_mismatch not in MISMATCH_MODES:
        raise InputError(f"unknown flat mismatch {flat_mismatch!r}", expected=", ".join(MISMATCH_MODES))
    if int(ndither) < 1:
        raise InputError(f"ndither must be at least 1, not {ndither}")
    if noise < 0:
        raise InputError(f"noise must be >= 0, not {noise}")
    return int(ndither)


def simulate_data(detector: str = "R22_S11", ndither: int | None = None, seed: int = 0,
                  flat_mismatch: str = "none", noise: float = 1.0, *, preset: str | None = None,
                  layout: tuple | None = None, mismatch_amplitude: float = 0.005,
                  wavelength_ratio: float = 0.5, illumination: float = 0.03,
                  flat_level: float = 50000.0, response: ResponseParams | None = None,
                  truth_bin: int = 8, **spot_kwargs) -> Simulation:
    """Simulate spot measurements, a CCOB flat and the truth, in memory.

    Everything :func:`simulate_run` writes, without the files: for notebooks
    and for tests that need many realisations. With a small synthetic
    ``layout`` (:func:`spotflat.response.synthetic_layout`) and a small grid
    one realisation takes milliseconds.

    Parameters
    ----------
    detector : str
        LSSTCam detector (or just a label when ``layout`` is given).
    ndither, seed, flat_mismatch, noise, preset
        As :func:`simulate_run`.
    layout : tuple, optional
        ``(shape, vendor, amps)`` of the CCD instead of the detector's.
    mismatch_amplitude, wavelength_ratio, illumination, flat_level, response, truth_bin
        As :func:`simulate_run`.
    **spot_kwargs
        Passed to :func:`simulate_spots`.

    Returns
    -------
    Simulation

    Examples
    --------
    >>> from spotflat.response import synthetic_layout
    >>> sim = simulate_data("toy", ndither=4, layout=synthetic_layout((400, 400)),
    ...                     ncols=5, nrows=5, xstep=60.0, flat_mismatch="treering")
    >>> sim.t.shape, sim.flat.shape
    ((25, 4), (400, 400))
    """
    ndither = _check_common(ndither, preset, flat_mismatch, noise)
    if layout is None:
        _split_detector(detector)
        layout = detector_layout(detector)
    shape, vendor, _ = layout
    streams = {name: child_seed(seed, i) for i, name in
               enumerate(("resp", "spots", "mismatch", "flatresp", "flat", "illum"))}

    # ---- responses
    rparams = response or ResponseParams()
    R, info = response_map(detector, streams["resp"], rparams, layout=layout, return_info=True)
    tr_model, tr_kind = info["treering_model"], info["treering_kind"]
    displacement = None
    resp_flat = R
    if tr_model is not None and tr_kind == "area":
        # pixel-area rings: the flat sees the area change, the spots' charge is displaced instead
        resp_spot = R / info["treering_factor"]
        displacement = tr_model
    else:
        resp_spot = R
    info.pop("treering_factor", None)
    if flat_mismatch == "treering":
        T = treering_map(shape, info["treering_center"], mismatch_amplitude,
                         rparams.resolved(vendor).treering_wavelength,
                         np.random.default_rng(streams["mismatch"]))
        resp_spot = resp_spot * T
        del T
    elif flat_mismatch == "independent":
        resp_flat = response_map(detector, streams["flatresp"], rparams, layout=layout, deterministic=False)
    elif flat_mismatch == "wavelength":
        resp_flat = response_map(detector, streams["resp"], rparams, layout=layout,
                                 treering_scale=wavelength_ratio)

    # ---- spots, and the truth at every point
    sim = simulate_spots(resp_spot, ndither=ndither, seed=streams["spots"], noise=noise,
                         displacement=displacement, **spot_kwargs)
    if resp_flat is resp_spot:
        resp_flat_pts = sim.resp
    else:  # the flat at the points through the flux's own weight (G**2: moments halved), so t and q compare
        div = 2.0 if spot_kwargs.get("flux_weight", "gaussian2") == "gaussian2" else 1.0
        resp_flat_pts = footprint_moments(resp_flat, sim.x_true, sim.y_true, sim.xx_true / div,
                                          sim.yy_true / div, sim.xy_true / div)["mean"]
    ill_angle = float(np.random.default_rng(streams["illum"]).uniform(0, 2 * np.pi))
    ny, nx = shape
    illum_pts = illumination_at(sim.x_true / (nx - 1) * 2 - 1, sim.y_true / (ny - 1) * 2 - 1,
                                illumination, ill_angle)
    use = ~sim.missing & ~sim.outlier
    F_cal, s_cal = effective_scales(sim.flux_true, use)
    t = sim.flux_true / (F_cal[:, None] * s_cal[None, :])
    t_spot = _per_spot_norm(sim.resp, use)
    q = _per_spot_norm(resp_flat_pts * illum_pts, use)
    mismatch = sim.resp / resp_flat_pts

    # ---- the flat
    illum_img = illumination_map(shape, illumination, ill_angle)
    flat = make_flat(resp_flat, illum_img, level=flat_level, noise=noise, seed=streams["flat"])
    del illum_img

    params = dict(detector=detector, vendor=vendor, seed=seed, ndither=ndither,
                  flat_mismatch=flat_mismatch, noise=noise,
                  mismatch_amplitude=mismatch_amplitude, wavelength_ratio=wavelength_ratio,
                  illumination=illumination, illum_angle=ill_angle, flat_level=flat_level,
                  treering_center=tuple(info["treering_center"]), treering_kind=tr_kind,
                  treering_model=rparams.resolved(vendor).treering_model,
                  response=info["params"], spots=sim.params)
    shift = sim.treering_shift
    return Simulation(
        detector=detector, vendor=vendor, flat_mismatch=flat_mismatch, spots=sim, flat=flat,
        F=F_cal, s=s_cal, resp_flat=resp_flat_pts, illum=illum_pts, t=t, t_spot=t_spot, q=q,
        mismatch=mismatch, resp_bin=_bin_mean(resp_spot, truth_bin),
        flatresp_bin=_bin_mean(resp_flat, truth_bin), truth_bin=truth_bin, gains=info["gains"],
        params=params, treering=tr_model,
        treering_shift=None if shift is None else shift["f"],
        treering_fprime=None if shift is None else shift["fprime"])


def simulate_run(outdir: str | os.PathLike, detector: str = "R22_S11", ndither: int | None = None,
                 fmt: str = "dm", seed: int = 0, flat_mismatch: str = "none",
                 flat_form: str = "assembled", noise: float = 1.0, *, preset: str | None = None,
                 mismatch_amplitude: float = 0.005, wavelength_ratio: float = 0.5,
                 illumination: float = 0.03, flat_level: float = 50000.0,
                 response: ResponseParams | None = None, junk: float = 10.0,
                 truth_bin: int = 8, overwrite: bool = False,
                 progress: Callable[[int], None] | None = None, **spot_kwargs) -> SimulationResult:
    """Simulate a dithered spot run and a CCOB flat on one detector; write them.

    Writes ``OUTDIR/spotdata/`` (one processed-grid file per exposure),
    ``OUTDIR/flat/`` (the flat) and ``OUTDIR/truth.fits``. The whole set
    appears at once: files are written to a hidden staging folder inside
    ``OUTDIR`` and moved into place at the end, so a failed run leaves no
    partial output.

    Parameters
    ----------
    outdir : str or os.PathLike
        Output folder; created (with its parents) if needed; must be empty
        unless ``overwrite``.
    detector : str
        LSSTCam detector, e.g. ``"R22_S11"`` (E2V) or ``"R02_S02"`` (ITL).
    ndither : int, optional
        Number of exposures (default 200, or the preset's).
    fmt : {"dm", "legacy"}
        Processed-grid format.
    seed : int
        Seed of everything; the same seed writes the same data.
    flat_mismatch : {"none", "treering", "independent", "wavelength"}
        How the flat's response differs from the spots' (module notes).
    flat_form : {"assembled", "raw"}
        Write the flat as one assembled image or as a raw 16-segment file
        with overscan (through :func:`spotflat.geometry.make_raw_hdulist`).
    noise : float
        Noise scale of spots and flat (0 = noiseless).
    preset : {"small", "full"}, optional
        Run size (:data:`PRESETS`): ``small`` is 50 dithers.
    mismatch_amplitude : float
        Peak amplitude of the extra tree rings for ``flat_mismatch="treering"``.
    wavelength_ratio : float
        Flat/spot tree-ring amplitude ratio for ``flat_mismatch="wavelength"``.
    illumination : float
        Size of the CCOB illumination gradient (0 = uniform).
    flat_level : float
        Mean flat signal, electrons per pixel.
    response : ResponseParams, optional
        Response component amplitudes.
    junk : float
        Mean number of unmatched junk sources per DM catalogue.
    truth_bin : int
        Bin of the response and mismatch maps stored in the truth file.
    overwrite : bool
        Allow a non-empty ``outdir``; earlier ``spotdata/``, ``flat/`` and
        ``truth.fits`` there are replaced.
    progress : callable, optional
        Called with the number of files just written (for a progress bar);
        the total is ``ndither + 2``.
    **spot_kwargs
        Passed to :func:`simulate_spots` (grid, flux, dither, fractions...).

    Returns
    -------
    SimulationResult

    Examples
    --------
    >>> res = simulate_run("sim", preset="small", flat_mismatch="treering")  # doctest: +SKIP
    >>> len(res.spot_files), res.flat_path.name                            # doctest: +SKIP
    (50, 'ccob_flat_R22_S11.fits')
    """
    # ---- validate everything before touching the disk
    ndither = _check_common(ndither, preset, flat_mismatch, noise)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}", expected=" or ".join(FORMATS))
    if flat_form not in FLAT_FORMS:
        raise InputError(f"unknown flat form {flat_form!r}", expected=" or ".join(FLAT_FORMS))
    raft, sensor = _split_detector(detector)
    layout = detector_layout(detector)
    shape = layout[0]
    outdir = Path(outdir)
    created = _prepare_outdir(outdir, overwrite)

    stage = None
    try:
        stage = Path(tempfile.mkdtemp(prefix=".spotflat-simulate-", dir=outdir))
        (stage / "spotdata").mkdir()
        (stage / "flat").mkdir()
        res = simulate_data(detector, ndither, seed, flat_mismatch, noise, layout=layout,
                            mismatch_amplitude=mismatch_amplitude, wavelength_ratio=wavelength_ratio,
                            illumination=illumination, flat_level=flat_level, response=response,
                            truth_bin=truth_bin, **spot_kwargs)
        sim = res.spots

        # ---- spot data
        rng_files = np.random.default_rng(child_seed(seed, 6))
        bx, by = bot_position(detector, np.asarray(sim.grid["x0"]), np.asarray(sim.grid["y0"]))
        bx, by = np.broadcast_to(bx, (ndither,)), np.broadcast_to(by, (ndither,))
        names = [spot_filename(detector, 1000 + j, float(bx[j]), float(by[j]), fmt) for j in range(ndither)]
        for j, name in enumerate(names):
            meta = {"RAFTBAY": raft, "CCDSLOT": sensor, "EXPTIME": _EXPTIME, "SIMULATD": True}
            if fmt == "dm":
                _write_dm(stage / "spotdata" / name, sim, j, rng_files, junk, shape, meta)
            else:
                _write_legacy(stage / "spotdata" / name, sim, j, meta)
            if progress:
                progress(1)

        # ---- flat
        flat_name = (f"ccob_flat_{detector}.fits" if flat_form == "assembled"
                     else f"MC_C_{_DEFAULT_DATE}_000100_{raft}_{sensor}.fits")
        _write_flat(stage / "flat" / flat_name, res.flat, detector, flat_form,
                    _flat_header(detector, res.vendor, flat_level, flat_mismatch), noise,
                    np.random.default_rng(child_seed(seed, 7)))
        if progress:
            progress(1)

        # ---- truth
        res.params.update(fmt=fmt, flat_form=flat_form, junk=junk)
        _write_truth(stage / "truth.fits", res, names, bx, by)
        if progress:
            progress(1)

        # ---- move into place
        if overwrite:
            for sub in ("spotdata", "flat"):
                if (outdir / sub).is_dir():
                    shutil.rmtree(outdir / sub)
        for sub in ("spotdata", "flat", "truth.fits"):
            os.replace(stage / sub, outdir / sub)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if stage is not None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)

    spot_dir = outdir / "spotdata"
    fields = {f: getattr(res, f) for f in Simulation.__dataclass_fields__}
    return SimulationResult(**fields, outdir=outdir, spot_files=[spot_dir / n for n in names],
                            flat_path=outdir / "flat" / flat_name, truth_path=outdir / "truth.fits",
                            fmt=fmt, flat_form=flat_form)


# --------------------------------------------------------------------------
# truth file
# --------------------------------------------------------------------------

def _header_params(params: dict) -> list[tuple[str, object, str]]:
    p, sp, rp = params, params["spots"], params["response"]
    return [
        ("DETECTOR", p["detector"], "detector simulated"),
        ("VENDOR", p["vendor"], "CCD vendor"),
        ("SEED", p["seed"], "random seed"),
        ("NDITHER", p["ndither"], "number of exposures"),
        ("FORMAT", p["fmt"], "processed-grid format"),
        ("MISMATCH", p["flat_mismatch"], "flat vs spot response mode"),
        ("MISMAMP", p["mismatch_amplitude"], "extra tree-ring amplitude (treering)"),
        ("WLRATIO", p["wavelength_ratio"], "flat/spot ring amplitude (wavelength)"),
        ("FLATFORM", p["flat_form"], "flat written assembled or raw"),
        ("NOISE", p["noise"], "noise scale (0 = none)"),
        ("ILLUMAMP", p["illumination"], "CCOB illumination gradient size"),
        ("ILLUMANG", p["illum_angle"], "[rad] illumination tilt direction"),
        ("FLATLVL", p["flat_level"], "[e-] mean flat level"),
        ("TRCX", p["treering_center"][0], "[pix] tree-ring centre x"),
        ("TRCY", p["treering_center"][1], "[pix] tree-ring centre y"),
        ("TRAMP", rp["treering_amplitude"], "ring amplitude (imsim: flat rms)"),
        ("TRMODEL", p.get("treering_model", "synthetic"), "tree-ring model: imsim or synthetic"),
        ("TRKIND", p.get("treering_kind", "qe"), "rings: area (charge moved) or qe"),
        ("TRBOOST", rp.get("treering_boost", 1.0), "imsim ring displacement scale"),
        ("GAINSIG", rp["gain_sigma"], "per-amp gain scatter"),
        ("MIDAMP", rp["midline_amplitude"], "mid-line amplitude"),
        ("EDGEAMP", rp["edge_amplitude"], "edge roll-off amplitude"),
        ("EDGESCL", rp["edge_scale"], "[pix] edge roll-off scale"),
        ("NDUST", rp["ndust"], "dust donuts"),
        ("PRNU", rp["prnu"], "pixel response non-uniformity"),
        ("NCOLS", sp["ncols"], "grid columns"),
        ("NROWS", sp["nrows"], "grid rows"),
        ("XSTEP", sp["xstep"], "[pix] grid step x"),
        ("YSTEP", sp["ystep"], "[pix] grid step y"),
        ("THETA", sp["theta"], "[rad] grid rotation"),
        ("DITHER", sp["dither"], "dither pattern"),
        ("DITHAMP", sp["dither_amplitude"], "[step] dither box size"),
        ("FLUX0", sp["flux"], "[e-] mean spot flux"),
        ("FSPREAD", sp["flux_spread"], "spot brightness scatter"),
        ("DRIFT", sp["drift"], "exposure brightness random-walk step"),
        ("RDNOISE", sp["read_noise"], "[e-] read noise"),
        ("MISSFRAC", sp["missing_fraction"], "fraction of missing points"),
        ("OUTLFRAC", sp["outlier_fraction"], "fraction of outlier points"),
    ]


def _write_truth(path, res: Simulation, names, bx, by) -> None:
    sim, params, b = res.spots, res.params, res.truth_bin
    F_cal, s_cal, resp_flat, illum = res.F, res.s, res.resp_flat, res.illum
    t, t_spot, q, mismatch, gains = res.t, res.t_spot, res.q, res.mismatch, res.gains
    bin_spot, bin_flat = res.resp_bin, res.flatresp_bin
    primary = fits.PrimaryHDU()
    for key, value, comment in _header_params(params):
        primary.header[key] = (value, comment)
    primary.header.update(provenance_cards())
    primary.header["COMMENT"] = "spotflat simulation truth; see spotflat.simulate for the definitions"

    nspot, nexp = sim.F.size, sim.s.size
    spots = Table({"spotgrid_index": np.arange(nspot), "F": F_cal, "F_proj": sim.F,
                   "nobs": (~sim.missing).sum(axis=1), "dist_x": sim.x_true[:, 0] - sim.gx[:, 0],
                   "dist_y": sim.y_true[:, 0] - sim.gy[:, 0], "xx": sim.xx_true.mean(axis=1),
                   "yy": sim.yy_true.mean(axis=1), "xy": sim.xy_true.mean(axis=1)})
    exposures = Table({"exposure": np.arange(nexp), "filename": np.array(names), "s": s_cal,
                       "s_proj": sim.s,
                       "x0": sim.grid["x0"], "y0": sim.grid["y0"], "theta": sim.grid["theta"],
                       "ddx": sim.grid["ddx"], "ddy": sim.grid["ddy"], "bot_x": np.asarray(bx, float),
                       "bot_y": np.asarray(by, float)})
    kk, jj = np.meshgrid(np.arange(nspot), np.arange(nexp), indexing="ij")
    points = Table({
        "spotgrid_index": kk.ravel(), "exposure": jj.ravel(),
        "x": sim.x_true.ravel(), "y": sim.y_true.ravel(),
        "resp": sim.resp.ravel(), "resp_flat": resp_flat.ravel(), "illum": illum.ravel(),
        "mismatch": mismatch.ravel(), "t": t.ravel(), "t_spot": t_spot.ravel(), "q": q.ravel(),
        "flux_true": sim.flux_true.ravel(), "flux": sim.flux.ravel(),
        "missing": sim.missing.ravel(), "outlier": sim.outlier.ravel(),
    })
    # each part of the truth: QE-type response (resp), and the rings' area part seen only by the flat
    zero = np.zeros(points["x"].shape)
    points["tr_shift"] = zero if res.treering_shift is None else res.treering_shift.ravel()
    points["tr_shift"].unit = "pix"
    points["tr_shift"].description = "radial charge displacement by pixel-area tree rings (footprint mean)"
    points["tr_area"] = 1.0 - (zero if res.treering_fprime is None else res.treering_fprime.ravel())
    points["tr_area"].description = "flat's ring area factor at the spot, 1 - <f'> (1 if rings are QE)"
    amps = Table({"amp": np.array(sorted(gains)), "gain": np.array([gains[a] for a in sorted(gains)])})
    hdus = [primary]
    tabs = [("SPOTS", spots), ("EXPOSURES", exposures), ("POINTS", points), ("AMPS", amps)]
    if res.treering is not None:
        m = res.treering
        rr = np.arange(0.0, 8000.0, 1.0)
        ring = Table({"r": rr, "f": m.displacement(rr), "fprime": m.derivative(rr)})
        ring["r"].unit = ring["f"].unit = "pix"
        ring.meta.update({"DETECTOR": m.detector, "CENTREX": m.centre[0], "CENTREY": m.centre[1],
                          "SCALE": m.scale, "KIND": params.get("treering_kind", "area")})
        tabs.append(("TREERING", ring))
    for name, tab in tabs:
        hdu = fits.table_to_hdu(tab)
        hdu.name = name
        hdus.append(hdu)
    for name, img, what in (("RESP_BIN", bin_spot, "spots' true response"),
                            ("FLATRESP_BIN", bin_flat, "flat's true response (no illumination)"),
                            ("MISMATCH_BIN", bin_spot / bin_flat, "spot / flat response")):
        hdu = fits.ImageHDU(img, name=name)
        hdu.header["BIN"] = (b, "[pix] bin size, bin 0 starts at pixel 0")
        hdu.header["COMMENT"] = f"binned mean of the {what}"
        hdus.append(hdu)
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def read_truth(path: str | os.PathLike) -> dict:
    """Read a ``truth.fits`` written by :func:`simulate_run`.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict
        ``header`` (the run's parameters), ``spots``, ``exposures``,
        ``points``, ``amps`` (astropy Tables) and ``resp_bin``,
        ``flatresp_bin``, ``mismatch_bin`` (binned float32 maps, bin size in
        ``header["BIN"]`` of each HDU; also ``bin``).

    Raises
    ------
    InputError
        When the file is not a spotflat truth file.
    """
    try:
        with fits.open(path) as hdul:
            out = {"header": hdul[0].header.copy()}
            for name in ("SPOTS", "EXPOSURES", "POINTS", "AMPS"):
                out[name.lower()] = Table.read(hdul[name])
            for name in ("RESP_BIN", "FLATRESP_BIN", "MISMATCH_BIN"):
                out[name.lower()] = np.asarray(hdul[name].data)
            out["bin"] = int(hdul["RESP_BIN"].header["BIN"])
    except KeyError as exc:
        raise InputError(f"not a spotflat truth file ({exc})", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read truth file ({exc})", path=path) from None
    return out
