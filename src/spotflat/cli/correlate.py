"""``spotflat correlate``: spots vs flat, with honest errors and figures."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ._common import csv_option, echo_summary

__all__ = ["correlate", "print_summary"]


def _sigma(value: str):
    if value == "moments":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter("expected 'moments' or a width in pixels") from None


@click.command()
@click.argument("calib", type=click.Path(path_type=Path))
@click.argument("spotdata_dir", required=False, type=click.Path(path_type=Path))
@click.option("--flat", "flat", required=True, type=click.Path(path_type=Path),
              help="CCOB flat: raw 16-segment file, assembled CCD image or master flat.")
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--quantity", default="flux", show_default=True,
              help="Comma-separated: flux, dx, dy, size, xx, yy, xy.")
@click.option("--nboot", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples over spots.")
@click.option("--nnull", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Null (shifted/rotated flat) resamples.")
@click.option("--block", type=click.Choice(["amp", "patch"]), default="amp", show_default=True,
              help="Block jackknife over amplifiers or spatial patches of the spot grid.")
@click.option("--patch-size", type=click.IntRange(min=1), default=7, show_default=True,
              help="Patch size in grid steps for --block patch.")
@click.option("--method", type=click.Choice(["pearson", "spearman"]), default="pearson", show_default=True)
@click.option("--normalize", type=click.Choice(["ccd", "amp"]), default="ccd", show_default=True,
              help="Flat normalisation (amp removes amplifier gain steps).")
@click.option("--sigma", default="moments", show_default=True,
              help="Gaussian footprint: 'moments' (from each spot's second moments) or pixels.")
@click.option("--radius", type=float, default=None, help="Use a top-hat footprint of this radius (pixels).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of all resampling.")
@click.option("--no-figures", is_flag=True, help="Skip the PNG figures.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def correlate(calib: Path, spotdata_dir: Path | None, flat: Path, outdir: Path, quantity: str, nboot: int,
              nnull: int, block: str, patch_size: int, method: str, normalize: str, sigma: str,
              radius: float | None, seed: int, no_figures: bool, quiet: bool) -> None:
    """Compare the spots of CALIB with a flat; write results, residuals and figures.

    SPOTDATA_DIR defaults to the processed-grid files recorded in CALIB.
    Writes OUTDIR/results.ecsv (+ .fits), OUTDIR/residuals.fits, per-amplifier
    and boundary summaries, and PNG figures.
    """
    from ..pipeline import QUANTITY_PAIRS, run_correlate, write_outputs

    quantities = csv_option(quantity) or ["flux"]
    bad = [q for q in quantities if q not in QUANTITY_PAIRS]
    if bad:
        raise click.BadParameter(f"unknown quantity {bad[0]!r}; choose from {', '.join(QUANTITY_PAIRS)}",
                                 param_hint="--quantity")
    res = run_correlate(calib, flat, spotdata=spotdata_dir, quantities=quantities, nboot=nboot, nnull=nnull,
                        block=block, patch_size=patch_size, seed=seed, method=method, normalize=normalize,
                        sigma=_sigma(sigma), radius=radius, progress=not quiet)
    files = write_outputs(res, outdir, figures=not no_figures)
    print_summary(res, outdir, files)


def print_summary(res, outdir: Path, files) -> None:
    """Short human summary of a correlate run."""
    comp = res.comparison
    rows = [("spots / points", f"{comp.nspot} / {comp.npoint}")]
    for name, st in res.stats.items():
        rows.append((f"{name} r", f"{st.r:+.4f} ± {st.r_err_bootstrap:.4f} (bootstrap) "
                                  f"± {st.r_err_jackknife:.4f} (jackknife) ± {st.r_err_block:.4f} "
                                  f"(block: {st.block}, {st.nblocks})"))
        rows.append(("", f"{int(st.confidence * 100)}% BCa interval [{st.bca_low:+.4f}, {st.bca_high:+.4f}]; "
                         f"null {st.r_null_mean:+.4f} ± {st.r_null_std:.4f}, p = {st.p_value:.3g}"))
        note = " (1 = flat describes the response)" if name == "flux" else ""
        rows.append(("", f"slope {st.slope:.4g} ± {st.slope_err:.2g}{note}"))
    v = res.variance
    if v:
        rows.append(("variance of t", f"{v['frac_explained_flat']:.1%} explained by the flat "
                                      f"(t/q removes it), {v['frac_unexplained_flat']:.1%} left in d; "
                                      f"regression on q explains {v['frac_explained_regression']:.1%}"))
    d = comp.d[comp.valid]
    rows.append(("residual d", f"rms {np.std(d):.3e}, mean {np.mean(d):+.2e}"))
    rows.append(("results", str(Path(outdir) / "results.ecsv")))
    rows.append(("figures", f"{sum(1 for f in files if str(f).endswith('.png'))} PNG files in {outdir}"))
    echo_summary(f"Spot-vs-flat correlation for {comp.detector or 'unnamed detector'}:", rows)
