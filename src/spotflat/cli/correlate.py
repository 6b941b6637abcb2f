"""``spotflat correlate``: spots vs flat, with honest errors and figures."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ._common import POSITIVE, csv_option, echo_summary
from .calibrate import workers_options

__all__ = ["correlate", "print_summary", "print_focal_plane_summary"]


def _sigma(value: str):
    if value == "moments":
        return value
    try:
        width = float(value)
    except ValueError:
        width = float("nan")
    if not (np.isfinite(width) and width > 0):
        raise click.BadParameter(f"{value!r}: expected 'moments' or a width in pixels (a finite number > 0)",
                                 param_hint="'--sigma'")
    return width


def _is_many(calib: Path) -> bool:
    """CALIB names several catalogues: a folder or a glob pattern."""
    import glob

    return calib.is_dir() or glob.has_magic(str(calib))


@click.command()
@click.argument("calib", type=click.Path(path_type=Path))
@click.argument("spotdata_dir", required=False, type=click.Path(path_type=Path))
@click.option("--flat", "flat", default=None, type=click.Path(path_type=Path),
              help="CCOB flat: raw 16-segment file, assembled CCD image or master flat.")
@click.option("--flat-dir", default=None, type=click.Path(path_type=Path),
              help="Folder of flats, one per detector (found by the detector name in the file "
                   "name or header); for the focal-plane form.")
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--quantity", default="flux", show_default=True,
              help="Comma-separated: flux, dx, dy (against the flat gradient), size, xx-yy, xy, xx, yy "
                   "(against its second derivatives).")
@click.option("--nboot", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples over spots.")
@click.option("--nnull", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Null (shifted/rotated flat) resamples.")
@click.option("--block", type=click.Choice(["amp", "patch"]), default="amp", show_default=True,
              help="Blocks of the all row's method-specific block jackknife (r_err_block, "
                   "slope_err_block): amplifiers or patches; the recommended errors do not depend on it.")
@click.option("--patch-size", type=click.IntRange(min=1), default=10, show_default=True,
              help="Patch size in grid steps (the within row's blocks, and --block patch).")
@click.option("--method", type=click.Choice(["pearson", "spearman"]), default="pearson", show_default=True)
@click.option("--normalize", type=click.Choice(["ccd", "amp"]), default="ccd", show_default=True,
              help="Flat normalisation (amp removes amplifier gain steps).")
@click.option("--sigma", default="moments", show_default=True,
              help="Gaussian footprint: 'moments' (from each spot's second moments) or pixels.")
@click.option("--radius", type=POSITIVE, default=None, help="Use a top-hat footprint of this radius (pixels).")
@click.option("--weight", type=click.Choice(["auto", "gaussian", "gaussian2"]), default="auto", show_default=True,
              help="How the flux saw the response: auto follows the flux column (sigma/sqrt(2) for "
                   "SdssShape, the aperture radius for aperture fluxes); gaussian2 = sigma/sqrt(2).")
@click.option("--flat-electrons", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Electrons per pixel of the flat, for the slope's errors-in-variables correction "
                   "(default: the flat's level x header GAIN).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of all resampling (the same for every detector).")
@click.option("--no-figures", is_flag=True, help="Skip the per-detector PNG figures.")
@workers_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def correlate(calib: Path, spotdata_dir: Path | None, flat: Path | None, flat_dir: Path | None, outdir: Path,
              quantity: str, nboot: int, nnull: int, block: str, patch_size: int, method: str, normalize: str,
              sigma: str, radius: float | None, weight: str, flat_electrons: float | None, seed: int,
              no_figures: bool, workers: int | None, scheduler: str | None, quiet: bool) -> None:
    """Compare the spots of CALIB with a flat; write results, residuals and figures.

    \b
    One detector:  spotflat correlate CALIB.fits --flat FLAT [SPOTDATA_DIR] -o OUTDIR
    Focal plane:   spotflat correlate CALIB_DIR_OR_GLOB --flat-dir FLATS/ [SPOTDATA_TREE] -o OUTDIR

    SPOTDATA_DIR defaults to the processed-grid files recorded in CALIB.
    One detector writes OUTDIR/results.ecsv (+ .fits), OUTDIR/residuals.fits,
    per-amplifier and boundary summaries, and PNG figures. The focal-plane
    form writes the same into OUTDIR/<DET>/ for each detector, plus
    OUTDIR/focal_plane_summary.ecsv (per CCD), focal_plane_amps.ecsv (per
    amplifier) and focal_plane.png; detectors run in parallel (--workers,
    --scheduler) and nothing is written unless all of them succeed.
    """
    from ..pipeline import QUANTITY_PAIRS, run_correlate, write_outputs

    quantities = csv_option(quantity) or ["flux"]
    bad = [q for q in quantities if q not in QUANTITY_PAIRS]
    if bad:
        raise click.BadParameter(f"unknown quantity {bad[0]!r}; choose from {', '.join(QUANTITY_PAIRS)}",
                                 param_hint="--quantity")
    if (flat is None) == (flat_dir is None):
        raise click.UsageError("give either --flat FLAT (one detector) or --flat-dir FLATS/ (one flat per detector)")
    from ..fileio import check_output_dir

    check_output_dir(outdir, option="-o")  # a bad -o fails now, not after the work
    params = dict(quantities=quantities, nboot=nboot, nnull=nnull, block=block, patch_size=patch_size, seed=seed,
                  method=method, normalize=normalize, sigma=_sigma(sigma), radius=radius, weight=weight,
                  flat_electrons=flat_electrons)
    many = _is_many(calib)
    if many and flat is not None:
        raise click.UsageError(f"{calib} names several catalogues: give --flat-dir with one flat per detector")
    if many:
        _focal_plane(calib, spotdata_dir, flat_dir, outdir, params, not no_figures, workers, scheduler, quiet)
        return
    if flat is None:  # one catalogue, its flat found in a folder of flats
        from ..calibration import read_calibration
        from ..focalplane import find_flats

        det = read_calibration(calib).detector
        flat = find_flats(flat_dir, [det])[det]
    if workers not in (None, 1) or scheduler:
        click.echo("Note: one detector runs in this process; --workers and --scheduler share out "
                   "the detectors of the focal-plane form.", err=True)
    from ..parallel import single_thread_blas

    with single_thread_blas():  # the same numbers as the focal-plane form's workers
        res = run_correlate(calib, flat, spotdata=spotdata_dir, progress=not quiet, **params)
    files = write_outputs(res, outdir, figures=not no_figures)
    print_summary(res, outdir, files)


def _focal_plane(calib, spotdata_dir, flat_dir, outdir, params, figures, workers, scheduler, quiet) -> None:
    from ..focalplane import correlate_focal_plane, find_calibrations, find_flats
    from ..parallel import Runner

    with Runner(workers=workers, scheduler=scheduler) as runner:
        calibs = find_calibrations(calib)
        flats = find_flats(flat_dir, list(calibs))
        res = correlate_focal_plane(calibs, flats, outdir, runner=runner, spotdata=spotdata_dir,
                                    figures=figures, progress=not quiet, **params)
        how = runner.describe()
    print_focal_plane_summary(res, outdir, how)


def print_focal_plane_summary(res, outdir: Path, how: str = "") -> None:
    """Short summary of a focal-plane run: per detector when few, the spread when many."""
    s = res.summary
    rows = []
    if len(s) <= 12:
        for r in s:
            rows.append((str(r["detector"]), f"r {r['r']:+.4f} ± {r['r_err']:.4f}, "
                                             f"slope {r['slope']:.4g} ± {r['slope_err']:.2g}, "
                                             f"d rms {r['d_rms']:.3e}, p = {r['p_value']:.3g}"))
    else:
        r, d = np.asarray(s["r"], float), np.asarray(s["d_rms"], float)
        worst = str(s["detector"][int(np.nanargmax(d))])
        rows.append(("r", f"median {np.nanmedian(r):+.4f}, range {np.nanmin(r):+.4f} .. {np.nanmax(r):+.4f}"))
        rows.append(("residual rms", f"median {np.nanmedian(d):.3e}, largest {np.nanmax(d):.3e} ({worst})"))
    if how:
        rows.append(("run on", how))
    rows.append(("summary", str(Path(outdir) / "focal_plane_summary.ecsv")))
    rows.append(("figure", str(Path(outdir) / "focal_plane.png")))
    echo_summary(f"Spot-vs-flat correlation over {len(s)} detectors:", rows)


def print_summary(res, outdir: Path, files) -> None:
    """Short human summary of a correlate run: the recommended numbers first."""
    comp = res.comparison
    rows = [("spots / points", f"{comp.nspot} / {comp.npoint}")]
    what = {"all": "all points", "amp": "amplifier steps", "within": "within amplifiers"}
    for name, parts in getattr(res, "components", {}).items():
        for cr in parts:
            note = ""
            if name == "flux":
                note = f" (raw {cr.slope_raw:.4g}, reliability {cr.reliability:.3f})" \
                    if cr.reliability != 1.0 else " (uncorrected: flat noise unknown)"
            rows.append((f"{name} {cr.component}",
                         f"r {cr.r:+.4f} ± {cr.r_err:.4f} [{cr.r_low:+.4f}, {cr.r_high:+.4f}], "
                         f"p = {cr.p_value:.3g}; slope {cr.slope:.4g} ± {cr.slope_err:.2g} "
                         f"[{cr.slope_low:.4g}, {cr.slope_high:.4g}]{note}"))
            rows.append(("", f"{what.get(cr.component, cr.component)} -- {cr.error_method}"
                         if not cr.error_method.startswith(what.get(cr.component, "?")) else cr.error_method))
    for name, st in res.stats.items():
        rows.append((f"{name} (methods)", f"all points: bootstrap ± {st.r_err_bootstrap:.4f}, jackknife ± "
                                          f"{st.r_err_jackknife:.4f}, block ({st.block}, {st.nblocks}) ± "
                                          f"{st.r_err_block:.4f}; shifted-flat null ± {st.r_null_std:.4f}, "
                                          f"p = {st.p_value:.3g} (these ignore the shared seams)"))
    v = res.variance
    if v:
        rows.append(("variance of t", f"{v['frac_explained_flat']:.1%} explained by the flat "
                                      f"(t/q removes it), {v['frac_unexplained_flat']:.1%} left in d; "
                                      f"regression on q explains {v['frac_explained_regression']:.1%}"))
    d = comp.d[comp.valid]
    rows.append(("residual d", f"rms {np.std(d):.3e}, mean {np.mean(d):+.2e}"))
    rows.append(("results", str(Path(outdir) / "results.ecsv")))
    rows.append(("figures", f"{sum(1 for f in files if str(f).endswith('.png'))} PNG files in {outdir}"))
    if getattr(res, "removed_figures", None):
        rows.append(("", "removed stale figures of an earlier run: "
                         + ", ".join(p.name for p in res.removed_figures)))
    echo_summary(f"Spot-vs-flat correlation for {comp.detector or 'unnamed detector'} "
                 "(recommended: r ± error [95 %], p, slope corrected for the flat's noise):", rows)
