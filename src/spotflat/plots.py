"""Matplotlib figures of spot-vs-flat comparisons.

Every function draws into a given :class:`matplotlib.axes.Axes` (or makes a
new figure) and returns the figure, so it works in notebooks and scripts
alike; :func:`save_figure` writes a PNG atomically. Figures are built with
:class:`matplotlib.figure.Figure` directly, so no GUI backend is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .fileio import atomic_path

__all__ = [
    "new_axes",
    "save_figure",
    "draw_amp_boundaries",
    "plot_spot_map",
    "plot_ccd_map",
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


def _limits(values: np.ndarray, symmetric: bool, pct: float = 99.0):
    v = np.asarray(values)[np.isfinite(values)]
    if v.size == 0:
        return None, None
    if symmetric:
        m = np.percentile(np.abs(v - np.median(v)), pct)
        c = np.median(v)
        return c - m, c + m
    return np.percentile(v, 100 - pct), np.percentile(v, pct)


def plot_spot_map(x: np.ndarray, y: np.ndarray, values: np.ndarray, *, detector: str | None = None,
                  title: str = "Spot flux", label: str = "flux", ax=None, symmetric: bool = False,
                  cmap: str = "viridis", s: float = 6.0) -> Figure:
    """Scatter of spots at their positions, coloured by a value (e.g. ``F[k]``).

    Parameters
    ----------
    x, y, values : numpy.ndarray
        Positions (CCD pixels) and values; NaNs are skipped.
    detector : str, optional
        Draw its amplifier boundaries and use its extent.
    title, label : str
        Title and colour-bar label.
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
    vmin, vmax = _limits(v[ok], symmetric)
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
                 label: str = "", ax=None, symmetric: bool = False, cmap: str = "viridis") -> Figure:
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
        Title and colour-bar label.
    ax : matplotlib.axes.Axes, optional
    symmetric : bool
        Colour limits symmetric about the median.
    cmap : str
        Colour map.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax)
    ny, nx = image.shape
    vmin, vmax = _limits(image, symmetric)
    im = ax.imshow(image, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                   extent=(-0.5, nx * bin - 0.5, -0.5, ny * bin - 0.5))
    fig.colorbar(im, ax=ax, label=label)
    if detector:
        draw_amp_boundaries(ax, detector)
    ax.set_xlabel("CCD x [pix]")
    ax.set_ylabel("CCD y [pix]")
    ax.set_title(title)
    return fig


def plot_t_vs_q(t: np.ndarray, q: np.ndarray, *, slope: float | None = None, slope_err: float | None = None,
                r: float | None = None, r_err: float | None = None, ax=None,
                title: str = "Spot relative throughput vs flat", xlabel: str = "flat relative response q",
                ylabel: str = "spot relative throughput t") -> Figure:
    """Hexbin of ``t`` against ``q`` with the fitted slope and the slope-1 line.

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

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax)
    t, q = np.ravel(t), np.ravel(q)
    ok = np.isfinite(t) & np.isfinite(q)
    t, q = t[ok], q[ok]
    lo, hi = np.percentile(q, [0.5, 99.5]) if q.size else (0.0, 1.0)
    tlo, thi = np.percentile(t, [0.5, 99.5]) if t.size else (0.0, 1.0)
    hb = ax.hexbin(q, t, gridsize=60, bins="log", mincnt=1, cmap="Blues",
                   extent=(lo, hi, tlo, thi))
    fig.colorbar(hb, ax=ax, label="points per cell")
    xs = np.array([lo, hi])
    mq, mt = (np.mean(q), np.mean(t)) if q.size else (1.0, 1.0)
    ax.plot(xs, mt + (xs - mq), color="0.4", ls="--", lw=1, label="slope 1 (flat describes response)")
    if slope is not None and np.isfinite(slope):
        txt = f"fit: slope {slope:.3f}" + (f" ± {slope_err:.3f}" if slope_err is not None else "")
        ax.plot(xs, mt + slope * (xs - mq), color="C3", lw=1.5, label=txt)
    if r is not None:
        ax.text(0.03, 0.95, f"r = {r:.3f}" + (f" ± {r_err:.3f}" if r_err is not None else ""),
                transform=ax.transAxes, va="top")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def plot_residual_hist(d: np.ndarray, *, expected_rms: float | None = None, ax=None,
                       title: str = "Spot-vs-flat residual d = t/q - 1") -> Figure:
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
    if d.size:
        lim = np.percentile(np.abs(d), 99.5)
        bins = np.linspace(-lim, lim, 81)
        ax.hist(d, bins=bins, histtype="stepfilled", alpha=0.6, label=f"data (rms {np.std(d):.2e})")
        if expected_rms:
            xs = 0.5 * (bins[1:] + bins[:-1])
            g = d.size * (bins[1] - bins[0]) * np.exp(-0.5 * (xs / expected_rms) ** 2) / (
                np.sqrt(2 * np.pi) * expected_rms)
            ax.plot(xs, g, color="C3", label=f"expected noise (rms {expected_rms:.2e})")
        ax.legend(fontsize=8)
    ax.set_xlabel("d")
    ax.set_ylabel("points")
    ax.set_title(title)
    return fig


def plot_amp_bars(table, *, ax=None, column: str = "d_mean", err: str = "d_mean_err",
                  title: str = "Residual per amplifier") -> Figure:
    """Per-amplifier residuals (from :func:`spotflat.compare.summarize_by_amp`).

    Top: mean ``d`` with its error over spots (``d`` has zero mean per spot,
    so a non-zero amplifier mean is a gain or response step the flat misses).
    Bottom: the residual RMS, where the flat and the spots disagree most.

    Parameters
    ----------
    table : astropy.table.Table
        With ``amp``, ``column``, ``err`` and ``d_rms`` columns.
    ax : matplotlib.axes.Axes, optional
        Draw only the top panel into this axes.
    column, err : str
        Columns of the bar heights and their errors.
    title : str

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
    ax.bar(xs, vals, yerr=np.where(np.isfinite(errs), errs, 0), capsize=3, color="C0")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("mean d = t/q - 1")
    ax.set_title(title)
    if ax2 is not None:
        ax2.bar(xs, np.asarray(table["d_rms"], float), color="C1")
        ax2.set_ylabel("rms of d")
        ax2.set_xticks(xs, names, rotation=45)
        ax2.set_xlabel("amplifier")
    else:
        ax.set_xticks(xs, names, rotation=45)
        ax.set_xlabel("amplifier")
    return fig


def plot_distance_profile(table, *, ax=None, title: str = "Residual vs distance to a boundary") -> Figure:
    """Mean and rms residual in bins of distance to a boundary.

    Parameters
    ----------
    table : astropy.table.Table
        From :func:`spotflat.compare.summarize_by_distance`.
    ax : matplotlib.axes.Axes, optional
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, ax = _axes(ax, figsize=(6.4, 4.2))
    lo, hi = np.asarray(table["dist_min"], float), np.asarray(table["dist_max"], float)
    mid = np.sqrt(np.maximum(lo, 1) * hi)
    ax.errorbar(mid, table["d_mean"], yerr=table["d_mean_err"], xerr=[mid - np.maximum(lo, 1e-1), hi - mid],
                fmt="o", capsize=2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    kind = table.meta.get("BOUNDARY", "any")
    what = "boundary (amplifier, mid-line or edge)" if kind == "any" else f"{kind} boundary"
    ax.set_xlabel(f"distance to the nearest {what} [pix]")
    ax.set_ylabel("mean d = t/q - 1")
    rms = ax.twinx()
    rms.plot(mid, table["d_rms"], "s--", color="C1", label="rms of d")
    rms.set_ylabel("rms of d", color="C1")
    ax.set_title(title)
    return fig
