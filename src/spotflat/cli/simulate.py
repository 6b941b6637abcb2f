"""``spotflat simulate``: write a synthetic spot run, a CCOB flat and its truth."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ._common import echo_summary

__all__ = ["simulate"]


@click.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--detector", default="R22_S11", show_default=True,
              help="LSSTCam detector, e.g. R22_S11 (E2V) or R02_S02 (ITL).")
@click.option("--ndither", type=click.IntRange(min=1), default=None,
              help="Number of exposures (dithers)  [default: 200, or the preset's]")
@click.option("--preset", type=click.Choice(["small", "full"]), default=None,
              help="Run size: small = 50 dithers (seconds), full = 200.")
@click.option("--format", "fmt", type=click.Choice(["dm", "legacy"]), default="dm", show_default=True,
              help="Processed-grid format: DM grid catalogues or legacy processed grids.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--flat-mismatch", type=click.Choice(["none", "treering", "independent", "wavelength"]),
              default="none", show_default=True,
              help="none: the flat sees exactly the spots' response; treering: the spots see an "
                   "extra tree-ring pattern the flat misses; independent: unrelated responses; "
                   "wavelength: the flat's tree rings have another amplitude.")
@click.option("--mismatch-amplitude", type=float, default=0.005, show_default=True,
              help="Peak amplitude of the extra tree rings (--flat-mismatch treering).")
@click.option("--wavelength-ratio", type=float, default=0.5, show_default=True,
              help="Flat/spot tree-ring amplitude ratio (--flat-mismatch wavelength).")
@click.option("--flat-form", type=click.Choice(["assembled", "raw"]), default="assembled",
              show_default=True, help="Write the flat assembled or as a raw 16-segment file.")
@click.option("--noise", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Noise scale (1 = Poisson + read noise, 0 = noiseless).")
@click.option("--illumination", type=click.FloatRange(min=0), default=0.03, show_default=True,
              help="Size of the flat's illumination gradient (0 = uniform).")
@click.option("--dither", type=click.Choice(["random", "raster"]), default="random", show_default=True,
              help="Sub-step dither offsets drawn at random or on a raster.")
@click.option("--treering-kind", type=click.Choice(["area", "qe"]), default="area", show_default=True,
              help="Tree rings (the detector's imSim model, real centre and amplitude) as a pixel-area "
                   "effect (charge displaced: the flat sees them, spot fluxes do not) or as QE.")
@click.option("--treering-boost", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Scale the tree rings up (1 = the real amplitude, 4e-5 to 1.3e-4 rms; e.g. 20 for a "
                   "demonstration).")
@click.option("--overwrite", is_flag=True, help="Allow a non-empty OUTDIR (replaces spotdata/, flat/, truth.fits).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def simulate(outdir: Path, detector: str, ndither: int | None, preset: str | None, fmt: str, seed: int,
             flat_mismatch: str, mismatch_amplitude: float, wavelength_ratio: float, flat_form: str,
             noise: float, illumination: float, dither: str, treering_kind: str, treering_boost: float,
             overwrite: bool, quiet: bool) -> None:
    """Simulate spot-projector dithers and a CCOB flat with a known truth.

    Writes OUTDIR/spotdata/ (one processed-grid file per exposure),
    OUTDIR/flat/ (the CCOB flat) and OUTDIR/truth.fits (spot brightnesses,
    exposure scales, the true relative throughput and flat response at
    every point, binned response maps). The whole set appears at once; a
    failed run leaves nothing behind.
    """
    from ..simulate import PRESETS, ResponseParams, simulate_run

    n = ndither or PRESETS[preset or "full"]["ndither"]
    kwargs = dict(detector=detector, ndither=n, fmt=fmt, seed=seed, flat_mismatch=flat_mismatch,
                  flat_form=flat_form, noise=noise, mismatch_amplitude=mismatch_amplitude,
                  wavelength_ratio=wavelength_ratio, illumination=illumination, dither=dither,
                  overwrite=overwrite,
                  response=ResponseParams(treering_kind=treering_kind, treering_boost=treering_boost))
    if quiet:
        res = simulate_run(outdir, **kwargs)
    else:
        from ..progress import progress_bar

        with progress_bar(n + 2, "Writing simulated run") as advance:
            res = simulate_run(outdir, progress=advance, **kwargs)
    sim = res.spots
    measured = ~sim.missing
    dt = np.nanstd(np.where(measured & ~sim.outlier, res.t, np.nan))
    mm = np.nanstd(np.where(measured, res.mismatch / np.nanmean(res.mismatch), np.nan))
    echo_summary(f"Simulated {res.detector} ({res.params['vendor']}):", [
        ("spot data", f"{len(res.spot_files)} {fmt.upper()} files in {res.outdir / 'spotdata'}"),
        ("grid", f"{sim.ncols} x {sim.nrows} spots, {int(measured.sum())} measured points "
                 f"({sim.missing.mean():.1%} missing, {int(sim.outlier.sum())} outliers)"),
        ("flat", f"{res.flat_path} ({flat_form})"),
        ("flat mismatch", flat_mismatch + (f" (rms of spot/flat response {mm:.3%})" if flat_mismatch != "none" else "")),
        ("true t scatter", f"{dt:.3%} (rms of the relative throughput)"),
        ("tree rings", f"imSim model of {res.detector}, {treering_kind}, x{treering_boost:g} "
                       f"(flat modulation rms {res.params['response']['treering_amplitude']:.1e})"
         if res.params.get("treering_model") == "imsim" else "synthetic"),
        ("truth", str(res.truth_path)),
    ])
