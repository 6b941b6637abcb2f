"""``spotflat response``: the response map from the spots alone (a star flat)."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import echo_summary

__all__ = ["response"]


@click.command()
@click.argument("spotdata", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration catalogue of the same files (its kept points restrict the fit).")
@click.option("--flat", type=click.Path(path_type=Path), default=None,
              help="Flat of the detector to compare the map with.")
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--detector", default=None, help="Detector name, when the files do not say (e.g. R22_S20).")
@click.option("--binsize", type=click.IntRange(min=1), default=64, show_default=True,
              help="Map bin size, pixels.")
@click.option("--per-amp", is_flag=True, help="Also fit one factor per amplifier.")
@click.option("--flux-column", default=None, help="Flux column of the spot data.")
@click.option("--nboot", type=click.IntRange(min=0), default=100, show_default=True,
              help="Resamples over spots for the profile errors.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resampling.")
@click.option("--no-figures", is_flag=True, help="Skip the PNG figures.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def response(spotdata: Path, calibration: Path | None, flat: Path | None, outdir: Path, detector: str | None,
             binsize: int, per_amp: bool, flux_column: str | None, nboot: int, seed: int, no_figures: bool,
             quiet: bool) -> None:
    """Solve the detector response from the dithered spots alone; compare it with a flat.

    Writes OUTDIR/response.fits (RESPONSE, RESPONSE_ERR, COVERAGE, ...;
    BINSIZE and DETECTOR in the headers), OUTDIR/profiles.ecsv (radial
    profiles about the tree-ring centre) and PNG figures. Map bins the
    dithers do not determine (modes longer than the dither box, areas no
    spot links) are NaN.
    """
    from ..fileio import check_output_dir
    from ..responsemap import run_response, write_response

    check_output_dir(outdir, option="-o")  # a bad -o fails before the solve, as in correlate
    res = run_response(spotdata, calibration, flat, detector=detector, binsize=binsize, per_amp=per_amp,
                       flux_column=flux_column, nboot=nboot, seed=seed, progress=not quiet)
    files = write_response(res, outdir, figures=not no_figures)
    star = res.star
    rows = [("map", star.summary())]
    if res.flat_comparison is not None:
        c = res.flat_comparison
        rows.append(("vs flat", f"r = {c.r:.4f} +- {c.r_err:.4f}, slope {c.slope:.4f} +- {c.slope_err:.4f} "
                                f"over {c.nbin} bins; ratio chi2/dof = {c.chi2:.1f}/{c.dof}"))
    rows.append(("written", ", ".join(str(p) for p in files)))
    echo_summary(f"Response map of {res.detector or 'unnamed detector'}:", rows)
