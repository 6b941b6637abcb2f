"""A synthetic pixel response (QE x pixel area) for an LSSTCam CCD.

The true response map used by :mod:`spotflat.simulate` is a product of the
effects a CCD test stand knows, each a separate factor ``1 + delta``:

* **amplifier gain steps** -- one factor per amplifier segment
  (``1 + N(0, gain_sigma)``), with steps at every segment boundary;
* **tree rings** -- by default the imSim model of the chosen detector
  (:mod:`spotflat.treerings`: real centre, real amplitude, flat modulation
  rms ~4e-5 to 1.3e-4): a radial *displacement of charge* ``f(r)``, so the
  flat sees the pixel-area change ``1 / ((1 + f') (1 + f / r))`` while the
  spots keep their flux and move (``treering_kind="area"``, the physical
  case; ``"qe"`` makes the same modulation a QE effect instead, for the
  other hypothesis). ``treering_boost`` scales ``f`` up for
  demonstrations. The older synthetic model (a quasi-periodic profile whose
  local wavelength drifts between ``treering_wavelength`` limits, peak
  ``treering_amplitude``, QE-like) is used when ``treering_model="synthetic"``
  or when ``treering_amplitude`` is given;
* **mid-line** -- the boundary between the two amplifier rows differs by
  vendor: ITL shows a narrow/wide pair of pixel rows (a pixel-area
  discontinuity, ``-m`` then ``+m/2``) over a shallow dip a few tens of rows
  wide; E2V shows a small step between the two halves and one dark row;
* **edge roll-off** -- ``1 + a exp(-d / L)`` with ``d`` the distance to the
  nearest edge, separately in x and y; ITL loses response at the edges
  (``a < 0``), E2V gains a little (``a > 0``);
* **dust donuts** -- annular shadows ``1 - a exp(-(r - r0)^2 / 2 w^2)`` of
  dust on the window (radius ``r0`` 10-40 px);
* **PRNU** -- independent pixel-level Gaussian scatter.

Every component is drawn from its own random stream spawned from the seed,
so changing one amplitude does not change the other components' draws: a
map built with ``treering_amplitude=0`` is the same map without its rings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from .errors import InputError

__all__ = ["ResponseParams", "response_map", "child_seed", "synthetic_layout", "treering_profile", "treering_map",
           "treering_center", "illumination_map", "detector_layout"]

# vendor defaults: (tree-ring amplitude, edge amplitude, edge scale px, mid-line amplitude)
_VENDOR = {
    "ITL": dict(treering_amplitude=0.004, edge_amplitude=-0.08, edge_scale=10.0, midline_amplitude=0.02),
    "E2V": dict(treering_amplitude=0.0015, edge_amplitude=0.02, edge_scale=6.0, midline_amplitude=0.003),
}

# random streams per component, fixed so that each component's draws are stable
_STREAMS = ("gain", "treering", "dust", "prnu")


@dataclass(frozen=True)
class ResponseParams:
    """Amplitudes of the response components (``None`` = vendor default).

    Attributes
    ----------
    gain_sigma : float
        RMS of the per-amplifier gain factors.
    treering_model : {"imsim", "synthetic"} or None
        Tree-ring model; ``None``: ``"synthetic"`` when ``treering_amplitude``
        is given, else ``"imsim"`` (the detector's packaged model).
    treering_kind : {"area", "qe"} or None
        What the rings are: a pixel-area effect (charge displaced; the
        physical default of the imSim model) or a QE effect (the only kind
        of the synthetic model).
    treering_boost : float
        Multiplies the imSim displacement (1 = real amplitude).
    treering_detector : str or None
        Table entry for a made-up layout (default ``R22_S11``'s radial
        function, centred so that the CCD centre is ~4800 px from it).
    treering_amplitude : float or None
        Peak fractional amplitude of the synthetic tree rings (vendor
        default ITL 0.4 %, E2V 0.15 %: 10-100x the real ones).
    treering_wavelength : tuple of float
        Range of the local ring wavelength, pixels.
    treering_center : tuple of float or None
        Ring centre ``(x, y)`` in CCD pixels; ``None`` draws one a few
        hundred pixels beyond a random corner.
    midline_amplitude : float or None
        Size of the mid-line feature (vendor-specific shape, see module notes).
    edge_amplitude, edge_scale : float or None
        Edge roll-off ``a`` and its e-folding distance ``L`` (pixels).
    ndust : int
        Number of dust donuts.
    dust_amplitude : float
        Largest donut depth (depths are uniform in ``[0.2, 1] x`` this).
    prnu : float
        Pixel-level RMS response scatter.
    """

    gain_sigma: float = 0.01
    treering_model: str | None = None
    treering_kind: str | None = None
    treering_boost: float = 1.0
    treering_detector: str | None = None
    treering_amplitude: float | None = None
    treering_wavelength: tuple[float, float] = (30.0, 90.0)
    treering_center: tuple[float, float] | None = None
    midline_amplitude: float | None = None
    edge_amplitude: float | None = None
    edge_scale: float | None = None
    ndust: int = 8
    dust_amplitude: float = 0.02
    prnu: float = 0.003

    def resolved(self, vendor: str) -> "ResponseParams":
        """These parameters with the ``None`` entries filled for ``vendor``."""
        model = self.treering_model or ("synthetic" if self.treering_amplitude is not None else "imsim")
        if model not in ("imsim", "synthetic"):
            raise InputError(f"unknown tree-ring model {model!r}", expected="imsim or synthetic")
        kind = self.treering_kind or ("area" if model == "imsim" else "qe")
        if kind not in ("area", "qe"):
            raise InputError(f"unknown tree-ring kind {kind!r}", expected="area or qe")
        if model == "synthetic" and kind == "area":
            raise InputError("the synthetic tree rings are a QE pattern only",
                             expected="treering_model='imsim' for pixel-area rings")
        defaults = dict(_VENDOR[vendor])
        if model == "imsim":
            defaults["treering_amplitude"] = 0.0  # unused: the imSim rings set their own amplitude
        out = replace(self, treering_model=model, treering_kind=kind)
        return replace(out, **{k: v for k, v in defaults.items() if getattr(out, k) is None})

    def as_dict(self) -> dict:
        """Plain ``dict`` of the parameters."""
        return asdict(self)


def detector_layout(detector: str) -> tuple[tuple[int, int], str, dict]:
    """``(ny, nx)``, vendor and amplifier slices of a detector, from the geometry.

    Parameters
    ----------
    detector : str
        LSSTCam detector name, e.g. ``"R22_S11"``.

    Returns
    -------
    shape : tuple of int
        ``(ny, nx)`` of the assembled (DM) image.
    vendor : str
        ``"ITL"`` or ``"E2V"``.
    amps : dict
        ``{amp name: (yslice, xslice)}`` in the assembled image.

    Raises
    ------
    InputError
        For a name the geometry does not know.
    """
    from . import geometry

    try:
        shape = tuple(int(n) for n in geometry.ccd_shape(detector))
        vend = str(geometry.vendor(detector)).upper()
        amps = dict(geometry.amp_slices(detector))
    except InputError:
        raise
    except (KeyError, ValueError) as exc:
        raise InputError(f"unknown detector {detector!r} ({exc})",
                         expected="an LSSTCam detector name like R22_S11") from None
    if vend not in _VENDOR:
        raise InputError(f"detector {detector} has vendor {vend!r}", expected="ITL or E2V")
    return shape, vend, amps


def child_seed(seed: int | np.random.SeedSequence, i: int) -> np.random.SeedSequence:
    """The ``i``-th child of ``seed``, without the state ``SeedSequence.spawn`` keeps.

    Calling it twice gives the same child, so a map can be rebuilt from the
    same seed object (``spawn`` would hand out new children each time).
    """
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (int(i),),
                                  pool_size=ss.pool_size)


def synthetic_layout(shape: tuple[int, int] = (1024, 1024), vendor: str = "ITL",
                     amps: tuple[int, int] = (2, 8)) -> tuple[tuple[int, int], str, dict]:
    """A small made-up CCD layout, for fast simulations in tests.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    vendor : {"ITL", "E2V"}
        Sets the vendor-specific defaults.
    amps : tuple of int
        ``(rows, columns)`` of amplifiers tiling the CCD.

    Returns
    -------
    tuple
        ``(shape, vendor, {amp: (yslice, xslice)})``, the form of
        :func:`detector_layout`, for ``response_map(layout=...)``.

    Examples
    --------
    >>> shape, vendor, amps = synthetic_layout((100, 80), amps=(2, 4))
    >>> len(amps), amps["C13"]
    (8, (slice(50, 100, None), slice(60, 80, None)))
    """
    if vendor not in _VENDOR:
        raise InputError(f"unknown vendor {vendor!r}", expected="ITL or E2V")
    ny, nx = shape
    nr, nc = amps
    ys = [int(v) for v in np.linspace(0, ny, nr + 1).round()]
    xs = [int(v) for v in np.linspace(0, nx, nc + 1).round()]
    return (int(ny), int(nx)), vendor, {
        f"C{r}{c}": (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1])) for r in range(nr) for c in range(nc)}


def _streams(seed: int | np.random.SeedSequence) -> dict[str, np.random.Generator]:
    return {name: np.random.default_rng(child_seed(seed, i)) for i, name in enumerate(_STREAMS)}


def treering_center(shape: tuple[int, int], rng: np.random.Generator) -> tuple[float, float]:
    """A tree-ring centre a few hundred pixels beyond a random CCD corner.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    rng : numpy.random.Generator

    Returns
    -------
    (x, y) : tuple of float
    """
    ny, nx = shape
    cx, cy = rng.integers(0, 2, size=2)
    off = rng.uniform(200.0, 800.0, size=2)
    x = -off[0] if cx == 0 else nx - 1 + off[0]
    y = -off[1] if cy == 0 else ny - 1 + off[1]
    return float(x), float(y)


def treering_profile(r: np.ndarray, amplitude: float, wavelength: tuple[float, float],
                     rng: np.random.Generator) -> np.ndarray:
    """Quasi-periodic radial tree-ring profile ``delta(r)``.

    The local wavelength wanders smoothly between the two limits and the
    amplitude is modulated between 40 % and 100 % of ``amplitude`` over
    radii of ~1000 px, as on real sensors.

    Parameters
    ----------
    r : numpy.ndarray
        Radii (pixels), increasing and evenly spaced.
    amplitude : float
        Peak fractional amplitude.
    wavelength : tuple of float
        ``(min, max)`` local wavelength, pixels.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        ``delta`` at ``r``, mean ~0.
    """
    lo, hi = wavelength
    p1, p2, p3, p4 = rng.uniform(0, 2 * np.pi, 4)
    l1, l2 = rng.uniform(1500.0, 3000.0, 2)
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    lam = mid + half * (0.7 * np.sin(2 * np.pi * r / l1 + p1) + 0.3 * np.sin(2 * np.pi * r / (0.37 * l1) + p2))
    dr = np.gradient(r)
    phase = 2 * np.pi * np.cumsum(dr / lam) + p3
    env = 0.7 + 0.3 * np.sin(2 * np.pi * r / l2 + p4)
    return amplitude * env * np.sin(phase)


def treering_map(shape: tuple[int, int], center: tuple[float, float], amplitude: float,
                 wavelength: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Tree-ring factor ``1 + delta(r)`` on the CCD (float32 image).

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    center : tuple of float
        Ring centre ``(x, y)`` in pixels (usually off the CCD).
    amplitude : float
        Peak fractional amplitude.
    wavelength : tuple of float
        Local wavelength limits, pixels.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        float32 image of shape ``shape``.
    """
    ny, nx = shape
    xc, yc = center
    y = (np.arange(ny, dtype=np.float32) - np.float32(yc))[:, None]
    x = (np.arange(nx, dtype=np.float32) - np.float32(xc))[None, :]
    r = np.sqrt(x * x + y * y)
    rmin, rmax = float(r.min()), float(r.max())
    rr = np.arange(max(rmin - 2.0, 0.0), rmax + 2.0, 0.25)
    prof = treering_profile(rr, amplitude, wavelength, rng)
    # profile on a 0.25 px radius grid, linearly interpolated: error ~1e-3 of the amplitude
    out = np.interp(r.ravel(), rr, prof).astype(np.float32).reshape(shape)
    out += np.float32(1.0)
    return out


def _edge_profile(n: int, amplitude: float, scale: float) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    d = np.minimum(i, n - 1 - i)
    return 1.0 + amplitude * np.exp(-d / scale)


def _midline_profile(ny: int, vendor: str, amplitude: float) -> np.ndarray:
    """Per-row factor for the mid-line feature (the boundary is between rows ny/2-1 and ny/2)."""
    y = np.arange(ny, dtype=np.float64)
    yb = ny / 2.0 - 0.5  # boundary position, in pixel-centre coordinates
    prof = np.ones(ny)
    if vendor == "ITL":
        # narrow row then wide row (boundary displaced by a fraction of a pixel), on a shallow dip
        prof[ny // 2 - 1] -= amplitude
        prof[ny // 2] += 0.5 * amplitude
        prof -= 0.1 * amplitude * np.exp(-np.abs(y - yb) / 15.0)
    else:
        # a small step between the two halves and one dark boundary row
        prof += np.where(y > yb, 0.5, -0.5) * amplitude * (1 - 0.5 * np.exp(-np.abs(y - yb) / 30.0))
        prof[ny // 2] -= amplitude
    return prof


def _dust(img: np.ndarray, n: int, amplitude: float, rng: np.random.Generator) -> None:
    ny, nx = img.shape
    for _ in range(n):
        x0, y0 = rng.uniform(50, nx - 50), rng.uniform(50, ny - 50)
        r0, w = rng.uniform(10.0, 40.0), rng.uniform(2.0, 5.0)
        depth = amplitude * rng.uniform(0.2, 1.0)
        half = int(np.ceil(r0 + 5 * w))
        ys = slice(max(int(y0) - half, 0), min(int(y0) + half + 1, ny))
        xs = slice(max(int(x0) - half, 0), min(int(x0) + half + 1, nx))
        yy, xx = np.mgrid[ys, xs]
        r = np.hypot(xx - x0, yy - y0)
        img[ys, xs] *= (1.0 - depth * np.exp(-0.5 * ((r - r0) / w) ** 2)).astype(img.dtype)


def imsim_rings(detector: str, shape: tuple[int, int], params: ResponseParams, rng: np.random.Generator,
                scale: float = 1.0):
    """The imSim tree-ring model for ``detector`` (or a stand-in for a made-up layout)."""
    from .treerings import known_detector, treering_model

    if known_detector(detector) and params.treering_detector is None:
        model = treering_model(detector)
        if params.treering_center is not None:
            model = model.with_centre(params.treering_center)
    else:
        model = treering_model(params.treering_detector or "R22_S11")
        if params.treering_center is not None:
            centre = params.treering_center
        else:
            # a made-up CCD: put it at the radii of a real one (~4800 px), off a random corner
            ny, nx = shape
            sx, sy = rng.choice([-1.0, 1.0], size=2)
            centre = ((nx - 1) / 2 + sx * 4800 / np.sqrt(2), (ny - 1) / 2 + sy * 4800 / np.sqrt(2))
        model = model.with_centre(centre)
    return model.scaled(params.treering_boost * scale)


def response_map(detector: str = "R22_S11", seed: int | np.random.SeedSequence = 0,
                 params: ResponseParams | None = None, *, deterministic: bool = True,
                 treering_scale: float = 1.0, layout: tuple | None = None,
                 return_info: bool = False, treerings: bool = True):
    """The true relative response (QE x pixel area) of a detector.

    Parameters
    ----------
    detector : str
        LSSTCam detector (vendor, shape and amplifier layout come from
        :mod:`spotflat.geometry`).
    seed : int or numpy.random.SeedSequence
        Seed of the random components (gains, ring centre and profile, dust,
        PRNU).
    params : ResponseParams, optional
        Component amplitudes; vendor defaults where ``None``.
    deterministic : bool
        Include the non-random features (edge roll-off, mid-line). A flat
        meant to be *unrelated* to the spots' response leaves them out so
        that nothing is shared.
    treering_scale : float
        Multiplies the tree-ring amplitude (used for a flat taken at another
        wavelength, where the rings are weaker or stronger).
    layout : tuple, optional
        ``(shape, vendor, amps)`` to bypass the geometry lookup (see
        :func:`detector_layout`).
    return_info : bool
        Also return a dict describing what was drawn (gains, ring centre,
        the ``treering_model`` object and ``treering_factor``, the rings'
        own factor image, so that ``map / treering_factor`` is the map
        without them).
    treerings : bool
        Include the rings (``False``: the same map without them).

    Returns
    -------
    numpy.ndarray
        float32 image ``(ny, nx)`` in the DM (assembled) orientation, mean ~1.
    info : dict
        Only with ``return_info=True``.

    Examples
    --------
    >>> r = response_map("R22_S11", seed=1)
    >>> r.shape, r.dtype.name, bool(abs(r.mean() - 1) < 0.03)
    ((4004, 4096), 'float32', True)
    """
    shape, vend, amps = layout if layout is not None else detector_layout(detector)
    p = (params or ResponseParams()).resolved(vend)
    rng = _streams(seed)
    ny, nx = shape

    model = None
    if p.treering_model == "imsim":
        model = imsim_rings(detector, shape, p, rng["treering"], scale=treering_scale)
        center = model.centre
        from .treerings import area_factor_map

        ring = area_factor_map(model, shape)
    else:
        center = p.treering_center or treering_center(shape, rng["treering"])
        ring = treering_map(shape, center, p.treering_amplitude * treering_scale,
                            p.treering_wavelength, rng["treering"])
    img = ring.copy() if treerings else np.ones(shape, dtype=np.float32)
    gains = {}
    for amp in sorted(amps):
        g = 1.0 + p.gain_sigma * rng["gain"].standard_normal()
        gains[amp] = g
        ys, xs = amps[amp]
        img[ys, xs] *= np.float32(g)
    if deterministic:
        row = _midline_profile(ny, vend, p.midline_amplitude) * _edge_profile(ny, p.edge_amplitude, p.edge_scale)
        col = _edge_profile(nx, p.edge_amplitude, p.edge_scale)
        img *= row.astype(np.float32)[:, None]
        img *= col.astype(np.float32)[None, :]
    _dust(img, p.ndust, p.dust_amplitude, rng["dust"])
    if p.prnu > 0:
        noise = rng["prnu"].standard_normal(shape, dtype=np.float32)
        noise *= np.float32(p.prnu)
        noise += np.float32(1.0)
        img *= noise
    if return_info:
        pd = p.as_dict()
        if model is not None:
            pd["treering_amplitude"] = float(np.std(ring))  # the rms flat modulation of the imSim rings
        return img, {"vendor": vend, "gains": gains, "treering_center": tuple(float(c) for c in center),
                     "params": pd, "treering_model": model, "treering_factor": ring,
                     "treering_kind": p.treering_kind}
    return img


def illumination_map(shape: tuple[int, int], amplitude: float, angle: float) -> np.ndarray:
    """Smooth CCOB illumination: a tilt plus a radial fall-off.

    ``I = 1 + a (cos(phi) u + sin(phi) v) + a/2 (u^2 + v^2 - 2/3)``, with
    ``u, v`` the pixel coordinates scaled to ``[-1, 1]``; its departures
    from 1 are at most ~1.7 ``a``.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    amplitude : float
        ``a``; 0 gives a uniform illumination.
    angle : float
        Direction ``phi`` of the tilt, radians.

    Returns
    -------
    numpy.ndarray
        float32 image.

    Examples
    --------
    >>> illumination_map((3, 3), 0.0, 0.0).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    ny, nx = shape
    u = (np.arange(nx, dtype=np.float64) / max(nx - 1, 1) * 2 - 1)[None, :]
    v = (np.arange(ny, dtype=np.float64) / max(ny - 1, 1) * 2 - 1)[:, None]
    return illumination_at(u, v, amplitude, angle).astype(np.float32)


def illumination_at(u, v, amplitude: float, angle: float):
    """The illumination of :func:`illumination_map` at scaled coordinates ``u, v``.

    ``u = 2 x / (nx - 1) - 1`` and ``v = 2 y / (ny - 1) - 1`` for pixel
    coordinates ``x, y``.
    """
    return 1.0 + amplitude * (np.cos(angle) * u + np.sin(angle) * v) \
        + 0.5 * amplitude * (u * u + v * v - 2.0 / 3.0)
