"""The correlate stage's figures: which ones, how they are made, how they are written.

:func:`render_figures` draws every figure of a
:class:`~spotflat.pipeline.CorrelateResult` (nothing is written);
:func:`write_figure_set` writes a set of figures into an output folder so
that the folder's spotflat figures are exactly this run's: all PNGs are
staged (:func:`spotflat.fileio.staged_outputs`) and appear together with
the run's other outputs, and spotflat figures of an earlier run that this
run did not make are removed (and named) once the new set is in place.
Only files spotflat writes are ever removed: the figure names below and
those recorded in the folder's manifest (``.spotflat-figures``) by the
earlier run; a user's own PNGs stay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure

__all__ = ["FIGURE_NAMES", "MANIFEST", "FigureFiles", "render_figures", "write_figure_set", "spotflat_figures"]

#: every figure name spotflat's correlate stage and demo can write
FIGURE_NAMES = ("spot_flux_map.png", "t_map.png", "q_map.png", "residual_map.png", "t_vs_q.png",
                "residual_hist.png", "amp_residuals.png", "residual_vs_boundary.png", "mismatch_recovery.png",
                "dx_vs_dqdx.png", "dy_vs_dqdy.png", "size_vs_lapq.png", "xx-yy_vs_d2q_xx-yy.png",
                "xy_vs_d2qdxdy.png", "xx_vs_d2qdx2.png", "yy_vs_d2qdy2.png",
                # names of earlier versions (shapes against q), removed when a new run replaces them
                "size_vs_q.png", "xx_vs_q.png", "yy_vs_q.png", "xy_vs_q.png")

#: file in the output folder listing the figures the last run wrote
MANIFEST = ".spotflat-figures"


class FigureFiles(list):
    """The PNG files written (a list of paths), with ``removed``: stale figures deleted."""

    removed: list

    def __init__(self, files=(), removed=()):
        super().__init__(files)
        self.removed = list(removed)


def spotflat_figures(outdir: str | os.PathLike) -> list[Path]:
    """PNG files in ``outdir`` that spotflat wrote (known names or the manifest's)."""
    outdir = Path(outdir)
    names = set(FIGURE_NAMES)
    manifest = outdir / MANIFEST
    if manifest.is_file():
        for line in manifest.read_text(errors="replace").splitlines():
            line = line.strip()
            # only plain PNG names inside outdir: a damaged manifest cannot point elsewhere
            if line.endswith(".png") and os.sep not in line and "/" not in line and not line.startswith("."):
                names.add(line)
    return sorted(outdir / n for n in names if (outdir / n).is_file())


def render_figures(res, bin: int | None = None) -> dict[str, Figure]:
    """Draw every figure of a correlate result (nothing is written).

    Parameters
    ----------
    res : spotflat.pipeline.CorrelateResult
    bin : int, optional
        Bin size (pixels) of the t / q / residual maps; default chosen from
        the residual's signal and noise (:func:`spotflat.mapbins.choose_map_bin`).

    Returns
    -------
    dict
        File name -> :class:`matplotlib.figure.Figure`.
    """
    from . import geometry, plots
    from .mapbins import choose_map_bin, map_noise
    from .pipeline import _expected_rms, quantity_pair

    comp = res.comparison
    det = comp.detector or None
    spots = comp.calib.spots
    label = f" ({det})" if det else ""
    figs: dict[str, Figure] = {}
    figs["spot_flux_map.png"] = plots.plot_spot_map(spots["x"], spots["y"], spots["flux"], detector=det,
                                                    title=f"Spot mean flux F[k]{label}",
                                                    label="F[k] [counts]")
    shape = geometry.ccd_shape(det) if det else (int(np.nanmax(comp.y)) + 1, int(np.nanmax(comp.x)) + 1)
    choice = (choose_map_bin(comp.x, comp.y, comp.d, shape) if bin is None
              else map_noise(comp.x, comp.y, comp.d, shape, bin))
    b = choice.bin
    maps = {name: map_noise(comp.x, comp.y, v, shape, b) for name, v in (("t", comp.t), ("q", comp.q))}
    # t and q share one colour scale so the two maps can be compared cell by cell
    tq_factor, tq_unit = plots.unit_scale(np.concatenate([(m.map - 1).ravel() for m in maps.values()]))
    tq = np.concatenate([np.where(m.count >= 0.5 * np.median(m.count[m.count > 0]), m.map - 1, np.nan).ravel()
                         for m in maps.values()]) * tq_factor
    lim = float(np.nanpercentile(np.abs(tq), 98)) if np.isfinite(tq).any() else 1.0
    for name, title in (("t", "Spot relative throughput t"), ("q", "Flat relative response q at the spots")):
        m = maps[name]
        figs[f"{name}_map.png"] = plots.plot_ccd_map(
            m.map, bin=b, detector=det, title=f"{title}{label}", label=f"{name} − 1", cmap="RdBu_r",
            offset=1.0, scale=(tq_factor, tq_unit), vlim=(-lim, lim), symmetric=True,
            note=f"{b}-px bins (chosen for the residual map); same colour scale as the "
                 f"{'q' if name == 't' else 't'} map")
    d_factor, d_unit = plots.unit_scale(choice.map)
    figs["residual_map.png"] = plots.plot_ccd_map(
        choice.map, bin=b, detector=det, title=f"Residual d = t/q − 1{label}", label="d", cmap="RdBu_r",
        scale=(d_factor, d_unit), symmetric=True, center=0.0, count=choice.count,
        note=choice.describe(d_factor, d_unit))
    groups = np.broadcast_to(np.arange(comp.t.shape[0])[:, None], comp.t.shape)
    flux = res.stats.get("flux")
    figs["t_vs_q.png"] = plots.plot_t_vs_q(comp.t, comp.q, slope=getattr(flux, "slope", None),
                                           slope_err=getattr(flux, "slope_err", None),
                                           r=getattr(flux, "r", None), r_err=getattr(flux, "r_err_block", None),
                                           groups=groups, title=f"Spot relative throughput vs flat{label}")
    expected = _expected_rms(comp)
    figs["residual_hist.png"] = plots.plot_residual_hist(comp.d, expected_rms=expected,
                                                         title=f"Spot-vs-flat residual d = t/q − 1{label}")
    if len(res.amp_summary):
        figs["amp_residuals.png"] = plots.plot_amp_bars(res.amp_summary, expected_rms=expected,
                                                        title=f"Residual per amplifier{label}")
    if res.boundary_summary is not None and len(res.boundary_summary):
        figs["residual_vs_boundary.png"] = plots.plot_distance_profile(
            res.boundary_summary, expected_rms=expected, title=f"Residual vs distance to a boundary{label}")
    with np.errstate(invalid="ignore"):
        v = comp.valid
        xx = float(np.nanmean(np.where(v, comp.grids.xx, np.nan)))
        yy = float(np.nanmean(np.where(v, comp.grids.yy, np.nan)))
    names = {"dx": ("centroid shift dx", "pix"), "dy": ("centroid shift dy", "pix"),
             "size": ("relative size change (xx + yy)", ""), "xx": ("relative xx change", ""),
             "yy": ("relative yy change", ""), "xy": ("xy change", "pix2"), "xx-yy": ("xx − yy change", "pix2")}
    against_names = {"dqdx": ("flat gradient dq/dx", "1/pix"), "dqdy": ("flat gradient dq/dy", "1/pix"),
                     "q": ("flat relative response q − 1", ""),
                     "lapq": ("flat Laplacian d²q/dx² + d²q/dy²", "1/pix2"),
                     "d2q_xx-yy": ("flat d²q/dx² − d²q/dy²", "1/pix2"),
                     "d2qdxdy": ("flat d²q/dxdy", "1/pix2"), "d2qdx2": ("flat d²q/dx²", "1/pix2"),
                     "d2qdy2": ("flat d²q/dy²", "1/pix2")}
    for quantity, st in res.stats.items():
        if quantity == "flux":
            continue
        a, bq, against = quantity_pair(comp, quantity)
        yname, yunit = names.get(quantity, (quantity, ""))
        xname, xunit = against_names.get(against, (against, ""))
        if against == "q":
            bq = bq - 1
        rel = plots.expected_relation(quantity, xx=xx, yy=yy)
        figs[f"{quantity}_vs_{against}.png"] = plots.plot_relation(
            a, bq, yname=yname, xname=xname, yunit=yunit, xunit=xunit, relation=rel, slope=st.slope,
            slope_err=st.slope_err, r=st.r, r_err=st.r_err_block, groups=groups,
            title=f"{yname.split(' (')[0].capitalize()} vs {xname.split(' q')[0]}{label}")
    return figs


def write_figure_set(figures: Mapping[str, Figure], outdir: str | os.PathLike, dpi: int = 110) -> FigureFiles:
    """Write ``figures`` into ``outdir`` together, removing spotflat figures of an earlier run.

    Every PNG is rendered to a temporary file first
    (:func:`spotflat.fileio.staged_outputs`, joined with the other outputs
    of the run when called inside one); only when the whole set is done are
    they renamed into place, the manifest rewritten and the earlier run's
    spotflat figures that this set does not replace removed. A failure
    leaves ``outdir`` as it was.

    Parameters
    ----------
    figures : mapping
        File name (``*.png``, no folder) -> figure.
    outdir : str or os.PathLike
        Output folder (created if needed).
    dpi : int
        Resolution.

    Returns
    -------
    FigureFiles
        The paths written; ``.removed`` lists the stale figures deleted.
    """
    from .fileio import atomic_path, make_output_dir, remove_with_outputs, staged_outputs

    for name in figures:
        if Path(name).name != name or not name.endswith(".png"):
            raise ValueError(f"figure name {name!r} must be a plain file name ending in .png")
    # one staged set (joined with the other outputs when called inside write_outputs):
    # the PNGs and the manifest appear together, stale figures go only once they have
    with staged_outputs():
        outdir = make_output_dir(outdir)
        earlier = spotflat_figures(outdir)
        written = []
        for name, fig in figures.items():
            with atomic_path(outdir / name) as tmp:
                # zlib level 1: the same pixels, ~10 % larger files, a fraction of level 6's deflate time
                fig.savefig(tmp, dpi=dpi, format="png", pil_kwargs={"compress_level": 1})
            written.append(outdir / name)
        with atomic_path(outdir / MANIFEST) as tmp:
            tmp.write_text("".join(f"{n}\n" for n in sorted(figures)))
        removed = [p for p in earlier if p.name not in figures]
        for path in removed:
            remove_with_outputs(path)
    return FigureFiles(written, removed)
