"""Spot relative throughput against the flat at the same pixels.

For every spot ``k`` and exposure ``j`` (DESIGN.md section 2):

* ``t[k, j] = f[k, j] / (F[k] s[j])`` — the spot's relative throughput;
* ``Q[k, j]`` — the normalised flat averaged over the spot's footprint at
  ``(x[k, j], y[k, j])`` (:func:`spotflat.flats.sample_flat`);
* ``q[k, j]`` — ``Q`` normalised *the same way as t*: divided by a per-spot
  factor and a per-exposure factor estimated exactly as ``F`` and ``s`` are
  (alternating means, ``median = 1``), so both are relative to the same spot
  and the same exposure;
* ``d[k, j] = t[k, j] / q[k, j] - 1`` — the spot-vs-flat residual.

Both ``t`` and ``q`` are (re)normalised over the points where both are valid,
so a spot that falls off the flat's valid area in some dithers is compared on
the dithers it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from .calibration import Calibration, _quiet, check_matches, estimate_scales
from .errors import InputError
from .grids import SpotGrids

__all__ = [
    "Comparison",
    "relative_throughput",
    "normalise_like_t",
    "compare_spots_flat",
    "footprint_sigma",
    "flux_footprint",
    "binned_map",
    "summarize_by_amp",
    "summarize_by_distance",
]


def relative_throughput(calib: Calibration, grids: SpotGrids, clip: bool = True) -> np.ndarray:
    """Relative throughput ``t[k, j] = f[k, j] / (F[k] s[j])``.

    Parameters
    ----------
    calib : Calibration
    grids : SpotGrids
        The spot data the catalogue was built from.
    clip : bool
        Drop the points the clipped calibration rejected.

    Returns
    -------
    numpy.ndarray
        ``[spot, exposure]``; see :meth:`Calibration.relative_throughput`.
    """
    return calib.relative_throughput(grids, clip=clip)


def normalise_like_t(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Divide by per-spot and per-exposure factors, as ``t`` is normalised.

    Parameters
    ----------
    values : numpy.ndarray
        Positive ``[spot, exposure]`` array (e.g. the sampled flat ``Q``).
    valid : numpy.ndarray of bool, optional
        Points to use; others come back NaN.

    Returns
    -------
    numpy.ndarray
        ``values / (A[k] B[j])`` with ``A`` the per-spot mean of
        ``values / B`` and ``B`` the per-exposure mean of ``values / A``
        (``median(B) = 1``), estimated by :func:`spotflat.calibration.estimate_scales`.

    Examples
    --------
    >>> v = np.outer([1.0, 2.0, 4.0], [1.0, 1.1])
    >>> normalise_like_t(v)
    array([[1., 1.],
           [1., 1.],
           [1., 1.]])
    """
    v = np.array(values, dtype=np.float64)
    if valid is not None:
        v[~valid] = np.nan
    v[~(np.isfinite(v) & (v > 0))] = np.nan
    if not np.isfinite(v).any():
        raise InputError("no valid points to normalise")
    A, B, *_ = estimate_scales(v, stat="mean")
    with np.errstate(invalid="ignore", divide="ignore"):
        return v / (A[:, None] * B[None, :])


def flux_footprint(flux_column: str | None) -> tuple[str, float | None]:
    """How a flux column saw the response: ``("gaussian2", None)``, ``("tophat", R)`` or ``("gaussian", None)``.

    * Gaussian-weighted (adaptive-moment) fluxes such as
      ``base_SdssShape_instFlux`` or ``base_GaussianFlux_instFlux`` weight the
      image by the spot's own Gaussian ``G``: the response enters through
      ``G**2``, a Gaussian of width ``sigma / sqrt(2)``.
    * Aperture fluxes (``base_CircularApertureFlux_12_0_instFlux``,
      ``APFLUX_<r>``) sum a disc: a top-hat of the aperture radius.
    * Anything else (legacy ``FLUX``, PSF fluxes): the spot's Gaussian
      itself.

    Examples
    --------
    >>> flux_footprint("base_SdssShape_instFlux")
    ('gaussian2', None)
    >>> flux_footprint("base_CircularApertureFlux_12_0_instFlux")
    ('tophat', 12.0)
    >>> flux_footprint("FLUX")
    ('gaussian', None)
    """
    import re

    name = (flux_column or "").lower()
    m = re.search(r"circularapertureflux_(\d+)_(\d+)", name) or re.search(r"apflux_?(\d+)(?:[_p](\d+))?", name)
    if m:
        return "tophat", float(f"{m.group(1)}.{m.group(2) or 0}")
    if "sdssshape" in name or "gaussianflux" in name:
        return "gaussian2", None
    return "gaussian", None


def footprint_sigma(xx: np.ndarray, yy: np.ndarray, default: float = 2.2) -> np.ndarray:
    """Gaussian footprint width ``sqrt((xx + yy) / 2)``, with ``default`` where unmeasured.

    Wraps :func:`spotflat.footprint.footprint_sigma` for catalogues whose
    spots may lack moments.

    Examples
    --------
    >>> footprint_sigma(np.array([4.0, np.nan]), np.array([6.0, 1.0]))
    array([2.23606798, 2.2       ])
    """
    from .footprint import footprint_sigma as _sigma

    s = np.asarray(_sigma(xx, yy), dtype=float)
    return np.where(np.isfinite(s), s, default)


@dataclass
class Comparison:
    """Spot and flat relative responses at the same points, and their residual.

    Attributes
    ----------
    t, q, d : numpy.ndarray
        ``[spot, exposure]`` arrays: relative throughput, flat relative
        response (normalised like ``t``) and residual ``t / q - 1``; NaN where
        either side is missing.
    x, y : numpy.ndarray
        Spot positions (CCD pixels) of every point.
    dqdx, dqdy : numpy.ndarray or None
        Flat gradient at every point (per pixel, relative units).
    hessian : spotflat.derivatives.FlatHessian or None
        Flat second derivatives at every point over the same footprint as
        ``q`` (per pixel**2; the regressors of the shapes).
    grids : SpotGrids
    calib : Calibration
    detector : str
    meta : dict
        Footprint and normalisation used.
    footprint_sigma : numpy.ndarray or None
        Per-spot Gaussian width (pixels) the flat was sampled with.
    footprint_radius : float or None
        Top-hat radius instead (pixels).
    flat_electrons : float or None
        Electrons per pixel of the flat (its photon noise), when known.
    """

    t: np.ndarray
    q: np.ndarray
    d: np.ndarray
    x: np.ndarray
    y: np.ndarray
    grids: SpotGrids
    calib: Calibration
    detector: str = ""
    dqdx: np.ndarray | None = None
    dqdy: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    footprint_sigma: np.ndarray | None = None
    footprint_radius: float | None = None
    flat_electrons: float | None = None
    hessian: object = None  # spotflat.derivatives.FlatHessian

    @property
    def valid(self) -> np.ndarray:
        """Points where both ``t`` and ``q`` are defined."""
        return np.isfinite(self.d)

    @property
    def nspot(self) -> int:
        """Spots with at least one valid point."""
        return int(self.valid.any(axis=1).sum())

    @property
    def npoint(self) -> int:
        """Valid (spot, exposure) points."""
        return int(self.valid.sum())

    def amp_labels(self) -> np.ndarray:
        """Amplifier of every point (``""`` when unknown), from :mod:`spotflat.geometry`."""
        return _amp_of(self.detector, self.x, self.y)

    def spot_amp_labels(self) -> np.ndarray:
        """Amplifier of each spot at its mean position."""
        with np.errstate(invalid="ignore"), _quiet():
            xm, ym = np.nanmean(self.x, axis=1), np.nanmean(self.y, axis=1)
        return _amp_of(self.detector, xm, ym)

    def residual_table(self) -> Table:
        """One row per valid (spot, exposure) point.

        Columns: ``spotgrid_index``, ``exposure`` (index), ``filename``,
        ``x``, ``y`` (pix), ``t``, ``q``, ``d``, ``amp``, ``dx``, ``dy``,
        ``xx``, ``yy``, ``xy`` (and ``dqdx``, ``dqdy``, ``d2qdx2``,
        ``d2qdy2``, ``d2qdxdy`` when computed).
        """
        k, j = np.nonzero(self.valid)
        g = self.grids
        tab = Table()
        tab["spotgrid_index"] = k.astype(np.int32)
        tab["exposure"] = j.astype(np.int32)
        tab["filename"] = np.asarray(g.exposures["filename"]).astype(str)[j]
        tab["x"], tab["y"] = self.x[k, j], self.y[k, j]
        tab["x"].unit = tab["y"].unit = "pix"
        tab["t"], tab["q"], tab["d"] = self.t[k, j], self.q[k, j], self.d[k, j]
        tab["amp"] = self.amp_labels()[k, j]
        for name in ("dx", "dy", "xx", "yy", "xy"):
            tab[name] = getattr(g, name)[k, j]
            tab[name].unit = "pix" if name in ("dx", "dy") else "pix2"
        if self.dqdx is not None:
            tab["dqdx"], tab["dqdy"] = self.dqdx[k, j], self.dqdy[k, j]
            tab["dqdx"].unit = tab["dqdy"].unit = "1 / pix"
        if self.hessian is not None:
            for name, v in (("d2qdx2", self.hessian.dxx), ("d2qdy2", self.hessian.dyy),
                            ("d2qdxdy", self.hessian.dxy)):
                tab[name] = v[k, j]
                tab[name].unit = "1 / pix2"
        tab.meta.update(self.meta)
        return tab


def _amp_of(detector: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Amplifier of each position; ``""`` off the CCD, at NaN, or when the detector is unknown."""
    from . import geometry

    if not detector:
        return np.full(np.shape(x), "", dtype="<U3")
    return np.asarray(geometry.amp_of_pixel(detector, x, y))


def compare_spots_flat(calib: Calibration, grids: SpotGrids, flat: np.ndarray,
                       sigma: float | str | None = "moments", radius: float | None = None,
                       detector: str | None = None, gradient: bool = True,
                       clip: bool = True, weight: str = "auto", hessian: bool = False) -> Comparison:
    """Sample the flat at every spot of every dither and form ``t``, ``q``, ``d``.

    Parameters
    ----------
    calib : Calibration
        The catalogue built from ``grids``.
    grids : SpotGrids
        The spot data (same exposures as the catalogue).
    flat : numpy.ndarray
        Normalised, assembled flat of the same detector (DM convention), e.g.
        from :func:`spotflat.read_flat`.
    sigma : float, "moments" or None
        Gaussian footprint: ``"moments"`` uses each spot's mean second
        moments (``sqrt((xx + yy) / 2)``, then as ``weight`` says), a number
        a fixed width in pixels (used as given).
    radius : float, optional
        Use a circular top-hat of this radius instead of a Gaussian.
    weight : {"auto", "gaussian", "gaussian2"}
        How the flux column saw the response (:func:`flux_footprint`):
        ``"auto"`` follows the flux column -- ``sigma / sqrt(2)`` for
        Gaussian-weighted fluxes (SdssShape), a top-hat of the aperture
        radius for aperture fluxes (unless ``radius`` is given), the
        moments' width otherwise; ``"gaussian"`` forces the moments' width,
        ``"gaussian2"`` its ``1 / sqrt(2)``.
    detector : str, optional
        Detector name; defaults to the catalogue's. Checked against the
        spot data and the flat's shape.
    gradient : bool
        Also sample the flat's gradient (for the centroid studies).
    hessian : bool
        Also sample the flat's second derivatives over the same footprint
        (:func:`spotflat.derivatives.flat_hessian`, for the shape studies).
    clip : bool
        Drop the points the clipped calibration rejected as outliers.

    Returns
    -------
    Comparison

    Raises
    ------
    InputError
        When detectors differ, the flat's shape does not match the detector,
        or no spot lands on the flat.
    """
    from . import flats, geometry

    check_matches(calib, grids)
    det = detector or calib.detector or grids.detector
    for name, other in (("calibration catalogue", calib.detector), ("spot data", grids.detector)):
        if det and other and other != det:
            raise InputError(f"the {name} is for {other}, not {det}")
    flat = np.asarray(flat)
    if det:
        shape = tuple(geometry.ccd_shape(det))
        if flat.shape != shape:
            raise InputError(f"flat has shape {flat.shape}, detector {det} is {shape} (ny, nx)",
                             expected="a flat of the spot data's detector")
    t = calib.relative_throughput(grids, clip=clip)
    x, y = grids.x, grids.y
    ok = np.isfinite(t) & np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise InputError("no spot has a valid relative throughput")
    if weight not in ("auto", "gaussian", "gaussian2"):
        raise InputError(f"unknown footprint weight {weight!r}", expected="auto, gaussian or gaussian2")
    flux_col = calib.meta.get("FLUXCOL") or grids.flux_column
    kind, ap_radius = flux_footprint(flux_col) if weight == "auto" else (weight, None)
    if radius is None and kind == "tophat" and isinstance(sigma, str):
        radius = ap_radius
    fp_sigma, fp_radius = None, None
    if radius is not None:
        fp_radius = float(radius)
        footprint = {"radius": fp_radius}
        meta = {"FOOTPRNT": "tophat", "RADIUS": fp_radius}
    elif isinstance(sigma, str):
        if sigma != "moments":
            raise InputError(f"unknown footprint {sigma!r}", expected="'moments' or a width in pixels")
        spots = calib.spots
        sig_k = footprint_sigma(np.asarray(spots["xx"], float), np.asarray(spots["yy"], float))
        if kind == "gaussian2":  # the response is seen through G**2
            sig_k = sig_k / np.sqrt(2.0)
        # the bilinear tent adds 1/6 px^2 of variance: take it off the kernel
        from .footprint import kernel_sigma

        sig_k = kernel_sigma(sig_k)
        fp_sigma = sig_k
        footprint = {"sigma": np.broadcast_to(sig_k[:, None], t.shape)[ok]}
        meta = {"FOOTPRNT": "gaussian", "SIGMA": "moments", "FPWEIGHT": kind,
                "SIGMED": float(np.median(sig_k))}
    else:
        footprint = {"sigma": None if sigma is None else float(sigma)}
        if sigma is not None:
            fp_sigma = np.full(t.shape[0], float(sigma))
        meta = {"FOOTPRNT": "gaussian" if sigma is not None else "point", "SIGMA": sigma or 0.0}
    Q = np.full(t.shape, np.nan)
    xs, ys = x[ok], y[ok]
    try:
        Q[ok] = flats.sample_flat(flat, xs, ys, **footprint)
    except InputError as exc:
        raise InputError(f"no overlap between the spots and the flat ({exc})") from None
    valid = ok & np.isfinite(Q) & (Q > 0)
    if not valid.any():
        raise InputError("no overlap between the spots and the flat's valid pixels")
    q = normalise_like_t(Q, valid)
    t_n = normalise_like_t(t, valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = t_n / q - 1.0
    dqdx = dqdy = None
    if gradient:
        dqdx = np.full(t.shape, np.nan)
        dqdy = np.full(t.shape, np.nan)
        gsig = footprint.get("sigma")
        gx, gy = flats.flat_gradient(flat, x[valid], y[valid],
                                     sigma=gsig[valid[ok]] if isinstance(gsig, np.ndarray) else gsig)
        dqdx[valid], dqdy[valid] = gx, gy
    hess = None
    if hessian:
        from .derivatives import flat_hessian

        gsig = footprint.get("sigma")
        hess = flat_hessian(flat, x[valid], y[valid], radius=footprint.get("radius"),
                            sigma=gsig[valid[ok]] if isinstance(gsig, np.ndarray) else gsig).scattered(valid)
    return Comparison(t=t_n, q=q, d=d, x=np.where(valid, x, np.nan), y=np.where(valid, y, np.nan),
                      grids=grids, calib=calib, detector=det, dqdx=dqdx, dqdy=dqdy, meta=meta,
                      footprint_sigma=fp_sigma, footprint_radius=fp_radius, hessian=hess)


def binned_map(x: np.ndarray, y: np.ndarray, values: np.ndarray, shape: tuple[int, int],
               bin: int = 128, statistic: str = "mean") -> np.ndarray:
    """Bin point values onto a coarse CCD map.

    Parameters
    ----------
    x, y, values : numpy.ndarray
        Points (CCD pixels) and their values; non-finite ones are ignored.
    shape : (int, int)
        CCD shape ``(ny, nx)``.
    bin : int
        Bin size in pixels.
    statistic : {"mean", "median", "count", "std"}

    Returns
    -------
    numpy.ndarray
        Shape ``(ceil(ny / bin), ceil(nx / bin))``; NaN in empty bins.

    Examples
    --------
    >>> binned_map(np.array([0., 1., 5.]), np.array([0., 0., 0.]), np.array([1., 3., 7.]), (4, 8), bin=4)
    array([[2., 7.]])
    """
    from scipy.stats import binned_statistic_2d

    x, y, v = (np.ravel(a) for a in (x, y, values))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(v)
    ny, nx = shape
    ex = np.arange(0, nx + bin, bin) - 0.5
    ey = np.arange(0, ny + bin, bin) - 0.5
    ex[-1] = min(ex[-1], nx - 0.5)  # a partial last bin ends at the CCD edge
    ey[-1] = min(ey[-1], ny - 0.5)
    with _quiet():
        res = binned_statistic_2d(y[ok], x[ok], v[ok], statistic=statistic, bins=[ey, ex])
    out = res.statistic
    if statistic == "count":
        return out
    return np.where(np.isfinite(out), out, np.nan)


def _group_summary(labels: np.ndarray, d: np.ndarray, t: np.ndarray, q: np.ndarray,
                   spot: np.ndarray, order: list) -> Table:
    rows = []
    for lab in order:
        m = labels == lab
        n = int(m.sum())
        if n == 0:
            continue
        dd = d[m]
        # the error of the mean residual counts spots, not points: a spot's dithers share F[k]
        inv = np.unique(spot[m], return_inverse=True)[1].ravel()
        per_spot = np.bincount(inv, weights=dd) / np.bincount(inv)
        nsp = len(per_spot)
        err = float(np.std(per_spot, ddof=1) / np.sqrt(nsp)) if nsp > 1 else np.nan
        rows.append((lab, n, nsp, float(np.mean(t[m])), float(np.mean(q[m])), float(np.mean(dd)),
                     err, float(np.sqrt(np.mean(dd ** 2)))))
    names = ("group", "npoint", "nspot", "t_mean", "q_mean", "d_mean", "d_mean_err", "d_rms")
    if not rows:
        return Table(names=names, dtype=(str, int, int, float, float, float, float, float))
    return Table(rows=rows, names=names)


def summarize_by_amp(comp: Comparison) -> Table:
    """Mean ``t``, ``q``, ``d`` (with errors over spots) and residual RMS per amplifier.

    Returns
    -------
    astropy.table.Table
        Columns ``amp``, ``npoint``, ``nspot``, ``t_mean``, ``q_mean``,
        ``d_mean``, ``d_mean_err``, ``d_rms``; one row per amplifier with data.
    """
    from . import geometry

    v = comp.valid
    labels = comp.amp_labels()[v]
    spot = np.nonzero(v)[0]
    order = list(geometry.amp_names(comp.detector)) if comp.detector else sorted(set(labels))
    tab = _group_summary(labels, comp.d[v], comp.t[v], comp.q[v], spot, order)
    tab.rename_column("group", "amp")
    return tab


def summarize_by_distance(comp: Comparison, kind: str = "any",
                          edges: tuple[float, ...] = (0, 10, 25, 50, 100, 200, 500, 5000)) -> Table:
    """Residual statistics in bins of distance to a boundary.

    Parameters
    ----------
    comp : Comparison
    kind : {"amp", "midline", "edge", "any"}
        Boundary type (see :func:`spotflat.geometry.distance_to_boundary`).
    edges : tuple of float
        Bin edges in pixels.

    Returns
    -------
    astropy.table.Table
        ``dist_min``, ``dist_max`` and the columns of :func:`summarize_by_amp`.
    """
    from . import geometry

    if not comp.detector:
        raise InputError("the detector is unknown, so boundary distances are undefined")
    v = comp.valid
    dist = geometry.distance_to_boundary(comp.detector, comp.x[v], comp.y[v], kind=kind)
    idx = np.digitize(dist, edges) - 1
    order = [f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(len(edges) - 1)]
    # one label per bin, indexed per point (not one formatted string per point); "" outside the bins
    inside = (idx >= 0) & (idx < len(order))
    labels = np.array(order + [""])[np.where(inside, idx, len(order))]
    tab = _group_summary(labels, comp.d[v], comp.t[v], comp.q[v], np.nonzero(v)[0], order)
    lo = {o: edges[i] for i, o in enumerate(order)}
    tab.add_column([lo[g] for g in tab["group"]], name="dist_min", index=0)
    tab.add_column([edges[order.index(g) + 1] for g in tab["group"]], name="dist_max", index=1)
    tab["dist_min"].unit = tab["dist_max"].unit = "pix"
    tab.remove_column("group")
    tab.meta["BOUNDARY"] = kind
    return tab
