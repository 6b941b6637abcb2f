"""Figures of the ``response`` stage: star-flat map, flat map, ratio, radial profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fileio import atomic_path

__all__ = ["response_figures", "plot_map", "plot_profiles"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:  # staged with the other outputs of the run
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def plot_map(ax, image: np.ndarray, binsize: int, title: str, label: str = "", symmetric: bool = True):
    """Show a binned CCD map in CCD pixel coordinates (DM: origin lower left)."""
    ny, nx = image.shape
    ext = (0, nx * binsize, 0, ny * binsize)
    finite = image[np.isfinite(image)]
    vmin = vmax = None
    if finite.size and symmetric:
        half = np.nanpercentile(np.abs(finite - 1.0), 98) or 1e-6
        vmin, vmax = 1 - half, 1 + half
    im = ax.imshow(image, origin="lower", extent=ext, cmap="RdBu_r", vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("CCD x [pix]")
    ax.set_ylabel("CCD y [pix]")
    ax.figure.colorbar(im, ax=ax, label=label, shrink=0.85)
    return im


def plot_profiles(fig, prof) -> None:
    """Radial profiles of flux, radial centroid shift and size against the flat."""
    tab = prof.table()
    r = np.asarray(tab["r"])
    panels = [("flux", "t - 1"), ("radial_shift", "radial shift [pix]"), ("size", "d size / size")]
    axes = fig.subplots(len(panels), 1, sharex=True)
    for ax, (col, lab) in zip(axes, panels):
        ax.errorbar(r, tab[col], yerr=tab[f"{col}_err"], fmt=".", ms=2, lw=0.5, label="spots")
        if "flat" in tab.colnames:
            tmpl = prof.template(col)
            if tmpl is not None:
                ax.plot(r, tmpl, "-", lw=0.8, color="C3", label="flat (area model)")
        ax.set_ylabel(lab, fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("radius from the tree-ring centre [pix]")


def response_figures(res, outdir) -> list[str]:
    """Write the PNG figures of a :class:`spotflat.responsemap.ResponseResult`; returns the names."""
    plt = _plt()
    outdir = Path(outdir)
    star = res.star
    names = []
    fig, ax = plt.subplots(figsize=(6, 5))
    plot_map(ax, star.response, star.binsize,
             f"{res.detector or 'detector'}: response from the spots ({star.binsize}-px bins)", "R")
    _save(fig, outdir / "response_map.png")
    plt.close(fig)
    names.append("response_map.png")
    if res.flat_comparison is not None:
        c = res.flat_comparison
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        plot_map(axes[0], np.where(star.constrained, c.flat_map, np.nan), star.binsize, "flat, binned the same way")
        plot_map(axes[1], c.ratio, star.binsize,
                 f"response / flat (r = {c.r:.3f} +- {c.r_err:.3f}, slope {c.slope:.3f} +- {c.slope_err:.3f})")
        _save(fig, outdir / "response_vs_flat.png")
        plt.close(fig)
        names.append("response_vs_flat.png")
    if res.profiles is not None:
        fig = plt.figure(figsize=(8, 7))
        plot_profiles(fig, res.profiles)
        _save(fig, outdir / "radial_profiles.png")
        plt.close(fig)
        names.append("radial_profiles.png")
    return names
