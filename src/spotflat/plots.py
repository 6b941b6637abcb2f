"""Matplotlib figures of spot-vs-flat comparisons.

Every function draws into a given :class:`matplotlib.axes.Axes` (or makes a
new figure) and returns the figure, so it works in notebooks and scripts
alike (and tests can inspect its axes); :func:`save_figure` writes a PNG
atomically. Figures are built with :class:`matplotlib.figure.Figure`
directly, so no GUI backend is needed.

Every axis and colour bar names its quantity and unit. Small relative
quantities are shown in scaled units (ppm or %, chosen from the data by
:func:`unit_scale`) so that tick labels stay short, and value ranges are
robust (percentiles) without hiding points: a figure says how many points
fall outside its axes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .fileio import atomic_path

__all__ = [
    "new_axes",
    "save_figure",
    "draw_amp_boundaries",
    "unit_scale",
    "Expectation",
    "Relation",
    "binned_means",
    "expected_relation",
    "plot_spot_map",
    "plot_ccd_map",
    "plot_relation",
    "plot_t_vs_q",
    "plot_residual_hist",
    "plot_amp_bars",
    "plot_distance_profile",
]


def new_axes(figsize: tuple[float, float] = (6.4, 5.2)):
    """A new figure with one axes.

    Parameters
    ----------
    figsize : (float, float)
        Figure size in inches.

    Returns
    -------
    fig : matplotlib.figure.Figure
    ax : matplotlib.axes.Axes

    Examples
    --------
    >>> fig, ax = new_axes()
    >>> len(fig.axes)
    1
    """
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _axes(ax, figsize=(6.4, 5.2)):
    if ax is None:
        return new_axes(figsize)
    return ax.figure, ax


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG file, atomically.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : str or os.PathLike
        Output file; replaced only once the PNG is complete.
    dpi : int
        Resolution.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def draw_amp_boundaries(ax, detector: str, color: str = "k", lw: float = 0.6, labels: bool = True) -> None:
    """Outline the amplifiers of ``detector`` (CCD pixel frame) and name them.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Axes in CCD pixel coordinates.
    detector : str
        Detector name, e.g. ``"R22_S11"``.
    color : str
        Line and label colour.
    lw : float
        Line width.
    labels : bool
        Write the amplifier names at their centres.
    """
    from . import geometry

    for amp, (sy, sx) in geometry.amp_slices(detector).items():
        x0, x1, y0, y1 = sx.start - 0.5, sx.stop - 0.5, sy.start - 0.5, sy.stop - 0.5
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color=color, lw=lw)
        if labels:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, amp, ha="center", va="center", fontsize=7,
                    color=color, alpha=0.6)


# ---------------------------------------------------------------- units and limits

#: (factor, unit) for small relative quantities, chosen by their typical size
_RELATIVE = ((2e-3, 1e6, "ppm"), (np.inf, 1e2, "%"))


def unit_scale(values: np.ndarray, unit: str = "") -> tuple[float, str]:
    """Factor and unit label that keep tick labels short for ``values``.

    Parameters
    ----------
    values : numpy.ndarray
        The data to show (NaNs ignored).
    unit : {"", "pix", "1/pix", "pix2", "counts"}
        Unit of ``values``: ``""`` for a relative (dimensionless) quantity,
        shown in ppm or %; ``"pix"`` is shown in milli-pixels when small;
        ``"1/pix"`` (a relative gradient) in ppm or % per pixel.

    Returns
    -------
    factor : float
        Multiply the values by it.
    label : str
        The unit of the scaled values.

    Examples
    --------
    >>> unit_scale(np.array([3e-4, -8e-4]))
    (1000000.0, 'ppm')
    >>> unit_scale(np.array([0.004, -0.02]))
    (100.0, '%')
    >>> unit_scale(np.array([0.01, -0.02]), "pix")
    (1000.0, 'mpix')
    """
    v = np.abs(np.asarray(values, float))
    v = v[np.isfinite(v)]
    ref = float(np.percentile(v, 99)) if v.size else 0.0
    if unit in ("", "1/pix"):
        per = "/pix" if unit else ""
        for limit, factor, name in _RELATIVE:
            if ref < limit:
                return factor, name + per
        return 1.0, "1/pix" if unit else ""
    if unit == "pix":
        return (1e3, "mpix") if ref < 0.5 else (1.0, "pix")
    if unit == "pix2":
        return 1.0, "pix²"
    return 1.0, unit


def _label(name: str, unit: str) -> str:
    return f"{name} [{unit}]" if unit else name


def _robust_range(v: np.ndarray, pct: float = 0.5, pad: float = 0.08) -> tuple[float, float]:
    """Limits holding all but ``pct`` % of the points at each end, padded."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return -1.0, 1.0
    lo, hi = np.percentile(v, [pct, 100 - pct])
    if hi <= lo:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-12), hi + 0.5 * max(abs(hi), 1e-12)
    span = hi - lo
    return float(lo - pad * span), float(hi + pad * span)


def _limits(values: np.ndarray, symmetric: bool, pct: float = 98.0, center: float | None = None):
    v = np.asarray(values)[np.isfinite(values)]
    if v.size == 0:
        return None, None
    if symmetric:
        c = float(np.median(v)) if center is None else center
        m = float(np.percentile(np.abs(v - c), pct))
        m = m if m > 0 else 1.0
        return c - m, c + m
    return np.percentile(v, 100 - pct), np.percentile(v, pct)


def _clustered_mean(y: np.ndarray, groups: np.ndarray | None) -> tuple[float, float]:
    """Mean and its standard error, counting each group (spot) as one cluster.

    A spot's dithers share its ``F[k]`` and position, so its points are not
    independent; the cluster-robust error sums residuals per spot first.
    """
    n = y.size
    if n < 2:
        return (float(y[0]) if n else float("nan")), float("nan")
    mean = float(np.mean(y))
    if groups is None:
        return mean, float(np.std(y, ddof=1) / np.sqrt(n))
    _, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=y - mean)
    ng = sums.size
    if ng < 2:
        return mean, float("nan")
    return mean, float(np.sqrt(np.sum(sums ** 2) * ng / (ng - 1)) / n)


def binned_means(x: np.ndarray, y: np.ndarray, nbins: int = 12, groups: np.ndarray | None = None,
                 pct: float = 1.0, min_points: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of ``y`` in equal-width bins of ``x``, with cluster-robust errors.

    The bins span the ``pct``-th to ``(100 - pct)``-th percentiles of ``x``;
    bins with fewer than ``min_points`` points are dropped.

    Returns
    -------
    xm, ym, yerr : numpy.ndarray
        Mean ``x`` and ``y`` per bin and the standard error of ``ym``.
    """
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    g = None if groups is None else np.asarray(groups)[ok]
    if x.size < min_points:
        return np.array([]), np.array([]), np.array([])
    lo, hi = np.percentile(x, [pct, 100 - pct])
    if hi <= lo:
        return np.array([]), np.array([]), np.array([])
    edges = np.linspace(lo, hi, nbins + 1)
    idx = np.digitize(x, edges) - 1
    xm, ym, ye = [], [], []
    for i in range(nbins):
        m = idx == i
        if m.sum() < min_points:
            continue
        mean, err = _clustered_mean(y[m], None if g is None else g[m])
        xm.append(float(np.mean(x[m])))
        ym.append(mean)
        ye.append(err)
    return np.array(xm), np.array(ym), np.array(ye)


# ---------------------------------------------------------------- expected relations

@dataclass
class Expectation:
    """What a comparison should show under one hypothesis.

    Attributes
    ----------
    label : str
        The hypothesis and the slope it predicts, for the legend.
    slope : float or None
        The predicted slope (in the quantity's units per unit of the flat
        quantity), drawn through the means; None when it has no fixed value.
    """

    label: str
    slope: float | None = None


@dataclass
class Relation:
    """The expected relations of one quantity against the flat.

    Attributes
    ----------
    expectations : list of Expectation
        Lines to draw.
    note : str
        What else to know (e.g. a relation without a fixed slope).
    slope_unit : str
        Unit of the slope.
    """

    expectations: list = field(default_factory=list)
    note: str = ""
    slope_unit: str = ""


def expected_relation(quantity: str, xx: float | None = None, yy: float | None = None) -> Relation:
    """What ``quantity`` against its flat quantity should show, by hypothesis.

    A QE variation scales what a pixel collects, so a spot's flux follows
    the flat (slope 1), and a response gradient across a Gaussian spot of
    second moment ``xx`` pulls its centroid up the gradient by
    ``xx * dq/dx``. A pixel-area variation caused by lateral fields (tree
    rings) moves charge between pixels: the spot keeps its flux (slope 0)
    and moves by the charge displacement, whose ratio to ``dq/dx`` is
    ``(P / 2 pi)**2`` for rings of period ``P`` (no fixed value). The second
    moments against the flat's second derivatives: QE gives
    ``Sigma H Sigma`` (slopes fixed by the spot's moments), pixel area a
    positive slope as well, ``(P / 2 pi)**2`` times larger.

    Parameters
    ----------
    quantity : str
        ``flux``, ``dx``, ``dy``, ``size``, ``xx``, ``yy``, ``xx-yy`` or ``xy``.
    xx, yy : float, optional
        Mean second moments of the spots (pix^2), for the QE slopes.

    Returns
    -------
    Relation
    """
    if quantity == "flux":
        return Relation([Expectation("flat describes the spot flux (QE): slope 1", 1.0),
                         Expectation("charge moved, flux kept (lateral fields): slope 0", 0.0)])
    if quantity in ("dx", "dy"):
        mom = xx if quantity == "dx" else yy
        axis = quantity[1]
        exps = []
        if mom is not None and np.isfinite(mom):
            exps.append(Expectation(f"QE gradient: {quantity} = $\\langle {axis}{axis} \\rangle$ dq/d{axis}, "
                                    f"slope {mom:.2f} pix²", float(mom)))
        return Relation(exps, note="lateral fields (tree rings): slope (P/2π)² for ring period P, "
                                   "no fixed value", slope_unit="pix²")
    # second moments against the flat's second derivatives (docs/science.rst, "Shapes and
    # centroids"): QE gives Sigma H Sigma, slopes fixed by the spot's moments; pixel area
    # (charge displaced by u, flat -div u) gives J Sigma + Sigma J: the same (positive) sign
    # and a slope (P / 2 pi)**2-times larger, P the structure's period
    area = "pixel area: positive slope too, (P/2π)² × the QE one for structure of period P"
    ok = xx is not None and yy is not None and np.isfinite(xx) and np.isfinite(yy)
    qe = {"size": ("relative size = (xx+yy)/4 · ∇²q", (xx + yy) / 4 if ok else None, "pix²"),
          "xx": ("relative xx = xx · d²q/dx²", xx if ok else None, "pix²"),
          "yy": ("relative yy = yy · d²q/dy²", yy if ok else None, "pix²"),
          "xx-yy": ("Δ(xx−yy) = ((xx+yy)/2)² (d²q/dx² − d²q/dy²)", ((xx + yy) / 2) ** 2 if ok else None, "pix⁴"),
          "xy": ("Δxy = xx·yy · d²q/dxdy", xx * yy if ok else None, "pix⁴")}
    if quantity in qe:
        text, slope, unit = qe[quantity]
        exps = [Expectation(f"QE: {text}, slope {slope:.3g} {unit}", float(slope))] if slope is not None else []
        return Relation(exps, note=area, slope_unit=unit)
    return Relation(note=f"no simple expected relation for {quantity}")


# ---------------------------------------------------------------- figures

def plot_spot_map(x: np.ndarray, y: np.ndarray, values: np.ndarray, *, detector: str | None = None,
                  title: str = "Spot flux", label: str = "flux [counts]", ax=None, symmetric: bool = False,
                  cmap: str = "viridis", s: float = 6.0) -> Figure:
    """Scatter of spots at their positions, coloured by a value (e.g. ``F[k]``).

    Parameters
    ----------
    x, y, values : numpy.ndarray
        Positions (CCD pixels) and values; NaNs are skipped.
    detector : str, optional
        Draw its amplifier boundaries and use its extent.
    title, label : str
        Title and colour-bar label (with its unit).
    ax : matplotlib.axes.Axes, optional
    symmetric : bool
        Colour limits symmetric about the median (for residuals).
    cmap : str
        Colour map.
    s : float
        Marker size.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax)
    x, y, v = (np.ravel(a) for a in (x, y, values))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(v)
    vmin, vmax = _limits(v[ok], symmetric, pct=99.0)
    sc = ax.scatter(x[ok], y[ok], c=v[ok], s=s, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=0)
    fig.colorbar(sc, ax=ax, label=label)
    if detector:
        draw_amp_boundaries(ax, detector, labels=False)
        from . import geometry

        ny, nx = geometry.ccd_shape(detector)
        ax.set_xlim(-0.5, nx - 0.5)
        ax.set_ylim(-0.5, ny - 0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("CCD x [pix]")
    ax.set_ylabel("CCD y [pix]")
    ax.set_title(title)
    return fig


def plot_ccd_map(image: np.ndarray, *, bin: int = 1, detector: str | None = None, title: str = "",
                 label: str = "", ax=None, symmetric: bool = False, cmap: str = "viridis",
                 unit: str | None = None, offset: float = 0.0, center: float | None = None,
                 vlim: tuple[float, float] | None = None, count: np.ndarray | None = None,
                 note: str | None = None, scale: tuple[float, str] | None = None) -> Figure:
    """Show a (binned) CCD map in CCD pixel coordinates, amplifiers outlined.

    Parameters
    ----------
    image : numpy.ndarray
        Map with ``bin`` x ``bin`` pixel cells, origin at the lower-left pixel.
    bin : int
        Cell size in pixels (to label the axes in CCD pixels).
    detector : str, optional
        Outline its amplifiers.
    title, label : str
        Title and colour-bar label (the quantity; its unit is appended when
        ``unit`` is given).
    ax : matplotlib.axes.Axes, optional
    symmetric : bool
        Colour limits symmetric about ``center`` (default the median).
    cmap : str
        Colour map.
    unit : str, optional
        Unit of ``image - offset`` for :func:`unit_scale` (``""`` for a
        relative quantity, shown in ppm or %). None: shown as it is.
    offset : float
        Subtracted before scaling (1 for ``t`` and ``q``, shown as ``t - 1``).
    center : float, optional
        Centre of symmetric limits, in the scaled units.
    vlim : (float, float), optional
        Colour limits in the scaled units (to share a scale between maps).
    count : numpy.ndarray, optional
        Points per cell: the colour limits come from cells holding at least
        half the median count, so a few sparse edge cells do not set them.
    note : str, optional
        A line under the title (e.g. the map's noise and signal).
    scale : (float, str), optional
        Factor and unit label to use instead of :func:`unit_scale`'s.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax)
    ny, nx = image.shape
    values = np.asarray(image, float) - offset
    cbar_label = label
    if scale is not None or unit is not None:
        factor, ulabel = scale if scale is not None else unit_scale(values, unit)
        values = values * factor
        cbar_label = _label(label, ulabel)
    if vlim is None:
        sel = values
        if count is not None:
            c = np.asarray(count, float)
            full = c[c > 0]
            if full.size:
                sel = np.where(c >= 0.5 * np.median(full), values, np.nan)
        vmin, vmax = _limits(sel, symmetric, center=center)
    else:
        vmin, vmax = vlim
    im = ax.imshow(values, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                   extent=(-0.5, nx * bin - 0.5, -0.5, ny * bin - 0.5))
    cb = fig.colorbar(im, ax=ax, label=cbar_label, extend="both" if vlim is not None or symmetric else "neither")
    cb.locator = MaxNLocator(7)
    cb.update_ticks()
    if detector:
        draw_amp_boundaries(ax, detector)
    ax.set_xlabel("CCD x [pix]")
    ax.set_ylabel("CCD y [pix]")
    if note:
        ax.set_title(title, pad=16)
        ax.annotate(note, xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7.5, color="0.2")
    else:
        ax.set_title(title)
    return fig


def plot_relation(a: np.ndarray, b: np.ndarray, *, yname: str, xname: str, yunit: str = "",
                  xunit: str = "", relation: Relation | None = None, slope: float | None = None,
                  slope_err: float | None = None, r: float | None = None, r_err: float | None = None,
                  groups: np.ndarray | None = None, nbins: int = 12, ax=None, title: str = "") -> Figure:
    """A spot quantity against a flat quantity: the point cloud, binned means, the fit, the expectations.

    The cloud is a log-density hexbin inside robust limits (0.5-99.5
    percentiles, padded); the number of points outside them is written on
    the figure. Over it, the mean of ``a`` in equal-count bins of ``b``
    (equal-width bins over its 1-99 percentiles) with cluster-robust errors
    (each spot one cluster), the fitted
    regression line and the line each hypothesis of ``relation`` predicts.

    Parameters
    ----------
    a, b : numpy.ndarray
        The spot quantity (y) and the flat quantity (x), any shape;
        non-finite pairs are skipped.
    yname, xname : str
        Axis names, without units.
    yunit, xunit : str
        Units for :func:`unit_scale` (``""``: relative, ``"pix"``, ``"1/pix"``).
    relation : Relation, optional
        Expected relations (:func:`expected_relation`).
    slope, slope_err : float, optional
        Fitted slope of ``a`` on ``b`` in original units (drawn through the means).
    r, r_err : float, optional
        Correlation and its error, written in the corner.
    groups : numpy.ndarray, optional
        Spot index of every point (same shape as ``a``), for the errors.
    nbins : int
        Bins of the binned means.
    ax : matplotlib.axes.Axes, optional
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(6.6, 6.0))
    a, b = np.asarray(a, float), np.asarray(b, float)
    g = None if groups is None else np.ravel(np.broadcast_to(groups, a.shape))
    a, b = np.ravel(a), np.ravel(b)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    g = None if g is None else g[ok]
    fx, ux = unit_scale(b, xunit)
    fy, uy = unit_scale(a, yunit)
    X, Y = b * fx, a * fy
    xlo, xhi = _robust_range(X)
    ylo, yhi = _robust_range(Y)
    inside = (X >= xlo) & (X <= xhi) & (Y >= ylo) & (Y <= yhi)
    nout = int((~inside).sum())
    if inside.any():
        hb = ax.hexbin(X[inside], Y[inside], gridsize=45, bins="log", mincnt=1, cmap="Blues",
                       extent=(xlo, xhi, ylo, yhi), linewidths=0)
        fig.colorbar(hb, ax=ax, label="points per cell [count]")
    xm, ym, ye = binned_means(X, Y, nbins=nbins, groups=g)
    if xm.size:
        ax.errorbar(xm, ym, yerr=ye, fmt="o", color="k", ms=3.5, capsize=2, lw=1,
                    label="binned mean ± s.e. (spots as clusters)", zorder=5)
    xs = np.array([xlo, xhi])
    mb, ma = (float(np.mean(b)), float(np.mean(a))) if a.size else (0.0, 0.0)
    rel = relation or Relation()

    def line(s):
        return fy * (ma + s * (xs / fx - mb))

    for i, e in enumerate(rel.expectations):
        if e.slope is not None:
            ax.plot(xs, line(e.slope), ls=("--", ":", "-.")[i % 3], color=("0.35", "C2", "C4")[i % 3],
                    lw=1.3, label=f"expected if {e.label}")
    if slope is not None and np.isfinite(slope):
        su = f" {rel.slope_unit}" if rel.slope_unit else ""
        txt = f"fit: slope {slope:.3g}" + (f" ± {slope_err:.2g}" if slope_err is not None else "") + su
        ax.plot(xs, line(slope), color="C3", lw=1.6, label=txt)
    lines = []
    if r is not None:
        lines.append(f"r = {r:.3f}" + (f" ± {r_err:.3f}" if r_err is not None else ""))
    lines.append(f"{nout} of {a.size} points ({nout / max(a.size, 1):.2%}) outside the axes")
    ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8,
            bbox={"fc": "white", "ec": "0.7", "alpha": 0.85, "pad": 2})
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.yaxis.set_major_locator(MaxNLocator(7))
    handles, labels = ax.get_legend_handles_labels()
    if handles or rel.note:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), fontsize=7.5, frameon=False,
                  title=rel.note or None, title_fontsize=7.5)
    ax.set_xlabel(_label(xname, ux))
    ax.set_ylabel(_label(yname, uy))
    ax.set_title(title)
    return fig


def plot_t_vs_q(t: np.ndarray, q: np.ndarray, *, slope: float | None = None, slope_err: float | None = None,
                r: float | None = None, r_err: float | None = None, ax=None,
                title: str = "Spot relative throughput vs flat", xlabel: str = "flat relative response q − 1",
                ylabel: str = "spot relative throughput t − 1", groups: np.ndarray | None = None) -> Figure:
    """``t - 1`` against ``q - 1`` (:func:`plot_relation`) with the QE and lateral-field expectations.

    Parameters
    ----------
    t, q : numpy.ndarray
        Any shape; non-finite pairs are skipped.
    slope, slope_err : float, optional
        Fitted slope of ``t`` on ``q`` (drawn through the means).
    r, r_err : float, optional
        Correlation, written in the corner.
    ax : matplotlib.axes.Axes, optional
    title, xlabel, ylabel : str
        Title and axis names (units are appended).
    groups : numpy.ndarray, optional
        Spot index of every point, for the errors of the binned means
        (default: the first axis of a 2-D ``t``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    t, q = np.asarray(t, float), np.asarray(q, float)
    if groups is None and t.ndim == 2:
        groups = np.broadcast_to(np.arange(t.shape[0])[:, None], t.shape)
    return plot_relation(t - 1, q - 1, yname=ylabel, xname=xlabel, relation=expected_relation("flux"),
                         slope=slope, slope_err=slope_err, r=r, r_err=r_err, groups=groups, ax=ax, title=title)


def plot_residual_hist(d: np.ndarray, *, expected_rms: float | None = None, ax=None,
                       title: str = "Spot-vs-flat residual d = t/q − 1") -> Figure:
    """Histogram of residuals, with a Gaussian of the expected noise when given.

    Parameters
    ----------
    d : numpy.ndarray
        Residuals ``t / q - 1``.
    expected_rms : float, optional
        Noise expected from the measurement errors.
    ax : matplotlib.axes.Axes, optional
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax)
    d = np.ravel(d)
    d = d[np.isfinite(d)]
    factor, unit = unit_scale(d)
    if d.size:
        lim = float(np.percentile(np.abs(d), 99.9)) * 1.05 or 1e-6
        bins = np.linspace(-lim, lim, 81)
        nout = int((np.abs(d) > lim).sum())
        ax.hist(d * factor, bins=bins * factor, histtype="stepfilled", alpha=0.6,
                label=f"data (rms {np.std(d) * factor:.3g} {unit}; {nout} outside the axes)")
        if expected_rms:
            xs = 0.5 * (bins[1:] + bins[:-1])
            g = d.size * (bins[1] - bins[0]) * np.exp(-0.5 * (xs / expected_rms) ** 2) / (
                np.sqrt(2 * np.pi) * expected_rms)
            ax.plot(xs * factor, g, color="C3",
                    label=f"noise expected from the flux errors (rms {expected_rms * factor:.3g} {unit})")
        ax.legend(fontsize=8, loc="upper right")
    ax.xaxis.set_major_locator(MaxNLocator(7))
    ax.set_xlabel(_label("residual d = t/q − 1", unit))
    ax.set_ylabel("points per bin [count]")
    ax.set_title(title)
    return fig


def plot_amp_bars(table, *, ax=None, column: str = "d_mean", err: str = "d_mean_err",
                  title: str = "Residual per amplifier", expected_rms: float | None = None) -> Figure:
    """Per-amplifier residuals (from :func:`spotflat.compare.summarize_by_amp`).

    Top: mean ``d`` with its error over spots (``d`` has zero mean per spot,
    so a non-zero amplifier mean is a gain or response step the flat misses).
    Bottom: the residual RMS, where the flat and the spots disagree most,
    against the noise expected from the flux errors when given.

    Parameters
    ----------
    table : astropy.table.Table
        With ``amp``, ``column``, ``err`` and ``d_rms`` columns.
    ax : matplotlib.axes.Axes, optional
        Draw only the top panel into this axes.
    column, err : str
        Columns of the bar heights and their errors.
    title : str
    expected_rms : float, optional
        Noise rms expected in ``d``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if ax is None:
        fig = Figure(figsize=(7.5, 5.6), layout="constrained")
        ax, ax2 = fig.subplots(2, 1, sharex=True)
    else:
        fig, ax2 = ax.figure, None
    names = [str(a) for a in table["amp"]]
    xs = np.arange(len(names))
    vals = np.asarray(table[column], float)
    errs = np.asarray(table[err], float)
    errs = np.where(np.isfinite(errs), errs, 0)
    factor, unit = unit_scale(np.abs(vals) + errs)
    ax.bar(xs, vals * factor, yerr=errs * factor, capsize=3, color="C0", label="mean ± s.e. over spots")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel(_label("mean d = t/q − 1", unit))
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    if ax2 is not None:
        rms = np.asarray(table["d_rms"], float)
        f2, u2 = unit_scale(np.append(rms, expected_rms or 0.0))
        ax2.bar(xs, rms * f2, color="C1", label="rms of d")
        if expected_rms:
            ax2.axhline(expected_rms * f2, color="k", ls="--", lw=1,
                        label="noise expected from the flux errors")
        top = np.nanmax(np.append(rms, expected_rms or 0.0)) * f2
        ax2.set_ylim(0, 1.3 * top if np.isfinite(top) and top > 0 else None)  # room for the legend
        ax2.set_ylabel(_label("rms of d", u2))
        ax2.yaxis.set_major_locator(MaxNLocator(6))
        ax2.legend(fontsize=8, loc="upper center", ncols=2)
        ax2.set_xticks(xs, names, rotation=45)
        ax2.set_xlabel("amplifier")
    else:
        ax.set_xticks(xs, names, rotation=45)
        ax.set_xlabel("amplifier")
    return fig


def plot_distance_profile(table, *, ax=None, title: str = "Residual vs distance to a boundary",
                          expected_rms: float | None = None) -> Figure:
    """Mean and rms residual in bins of distance to a boundary, each on its own axis.

    Top: the mean of ``d`` with its standard error over spots (a trend at
    small distances is a boundary effect the flat misses). Bottom (when no
    ``ax`` is given): the rms of ``d`` on a zero-based axis with an
    approximate error ``rms / sqrt(2 nspot)``, and the noise expected from
    the flux errors.

    Parameters
    ----------
    table : astropy.table.Table
        From :func:`spotflat.compare.summarize_by_distance`.
    ax : matplotlib.axes.Axes, optional
        Draw only the mean panel into it.
    title : str
    expected_rms : float, optional
        Noise rms expected in ``d``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if ax is None:
        fig = Figure(figsize=(6.6, 6.0), layout="constrained")
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(1.2, 1))
    else:
        fig, ax2 = ax.figure, None
    lo, hi = np.asarray(table["dist_min"], float), np.asarray(table["dist_max"], float)
    lo1 = np.maximum(lo, 1.0)
    mid = np.sqrt(lo1 * hi)
    mean = np.asarray(table["d_mean"], float)
    err = np.asarray(table["d_mean_err"], float)
    err0 = np.where(np.isfinite(err), err, 0)
    factor, unit = unit_scale(np.abs(mean) + err0)
    ax.errorbar(mid, mean * factor, yerr=err0 * factor, xerr=[mid - lo1, hi - mid], fmt="o", capsize=2,
                label="mean d ± s.e. over spots")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylabel(_label("mean d = t/q − 1", unit))
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.legend(fontsize=8, loc="best")
    kind = table.meta.get("BOUNDARY", "any")
    what = "boundary (amplifier, mid-line or edge)" if kind == "any" else f"{kind} boundary"
    xlabel = f"distance to the nearest {what} [pix]"
    ax.set_title(title)
    if ax2 is None:
        ax.set_xlabel(xlabel)
        return fig
    rms = np.asarray(table["d_rms"], float)
    nsp = np.maximum(np.asarray(table["nspot"], float), 1)
    f2, u2 = unit_scale(np.append(rms, expected_rms or 0.0))
    ax2.errorbar(mid, rms * f2, yerr=rms * f2 / np.sqrt(2 * nsp), xerr=[mid - lo1, hi - mid], fmt="s",
                 color="C1", capsize=2, label="rms of d ± rms/√(2 N_spot)")
    if expected_rms:
        ax2.axhline(expected_rms * f2, color="k", ls="--", lw=1, label="noise expected from the flux errors")
    top = np.nanmax(np.append(rms * f2 * (1 + 1 / np.sqrt(2 * nsp)), (expected_rms or 0) * f2))
    ax2.set_ylim(0, 1.25 * top if np.isfinite(top) and top > 0 else None)
    ax2.set_ylabel(_label("rms of d", u2))
    ax2.yaxis.set_major_locator(MaxNLocator(5))
    ax2.legend(fontsize=8, loc="lower right")
    ax2.set_xlabel(xlabel)
    return fig
