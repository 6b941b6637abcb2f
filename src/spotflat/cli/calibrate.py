"""``spotflat calibrate``: build the per-spot calibration catalogue."""

from __future__ import annotations

import warnings
from pathlib import Path

import click
import numpy as np

from ._common import echo_summary, progress

__all__ = ["calibrate"]


def _output_for(output: Path, detector: str, several: bool) -> Path:
    if not several:
        return output
    return output.with_name(f"{output.stem}_{detector}{output.suffix or '.fits'}")


@click.command()
@click.argument("spotdata_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Calibration catalogue to write (FITS). With several detectors and no "
                   "--detector, one file per detector: OUTPUT_<detector>.fits.")
@click.option("--flux-column", default=None,
              help="Flux column (default base_SdssShape_instFlux for DM catalogues, "
                   "FLUX+DFLUX for legacy files; '+' sums columns).")
@click.option("--stat", type=click.Choice(["clipped", "mean", "median"]), default="clipped",
              show_default=True, help="Statistic for F[k] and s[j].")
@click.option("--sigma", type=float, default=4.0, show_default=True,
              help="Clipping threshold for --stat clipped.")
@click.option("--min-dithers", type=click.IntRange(min=1), default=3, show_default=True,
              help="Spots kept in fewer exposures are flagged invalid.")
@click.option("--detector", default=None, help="Use only this detector's files, e.g. R22_S11.")
@click.option("--ecsv", is_flag=True, help="Also write <output>_spots.ecsv and <output>_exposures.ecsv.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def calibrate(spotdata_dir: Path, output: Path, flux_column: str | None, stat: str, sigma: float,
              min_dithers: int, detector: str | None, ecsv: bool, quiet: bool) -> None:
    """Build the calibration catalogue (F[k], s[j]) from SPOTDATA_DIR.

    SPOTDATA_DIR holds processed-grid files (DM grid catalogues or legacy
    processed grids) of one or several detectors; files of different
    detectors are never mixed.
    """
    from ..calibration import build_calibration, write_calibration
    from ..errors import InputError
    from ..fileio import check_writable
    from ..grids import find_grid_files, group_by_detector, read_grid_file, stack_grid_files

    check_writable(output)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not Path(spotdata_dir).exists():
            raise InputError("no such directory", path=spotdata_dir,
                             expected="a folder of processed-grid files")
        paths = find_grid_files(spotdata_dir)
    for w in caught:
        click.echo(f"Warning: {w.message}", err=True)

    groups = group_by_detector(paths)
    if detector:
        if detector not in groups:
            raise InputError(f"no files for detector {detector}", path=spotdata_dir,
                             expected="one of " + ", ".join(d or "(unnamed)" for d in groups))
        groups = {detector: groups[detector]}
    several = len(groups) > 1
    if several:
        click.echo(f"{len(groups)} detectors found ({', '.join(d or '(unnamed)' for d in groups)}): "
                   "writing one catalogue per detector.")
    # read everything before writing anything: no partial set of outputs
    results = []
    for det, det_paths in groups.items():
        label = f"Reading {det or 'grid files'}"
        with progress(det_paths, label, quiet) as bar:
            grids = stack_grid_files((read_grid_file(p, flux_column) for p in bar),
                                     detector=det or None, count=len(det_paths))
        cal = build_calibration(grids, stat=stat, min_dithers=min_dithers, sigma=sigma)
        results.append((det, grids, cal))
    for det, grids, cal in results:
        out = _output_for(output, det, several)
        written = write_calibration(cal, out, ecsv=ecsv)
        _summary(det, grids, cal, written)


def _summary(det, grids, cal, written) -> None:
    spots = cal.spots
    valid = np.asarray(spots["valid"])
    t_std = np.asarray(spots["t_std"])[valid]
    rows = [
        ("files read", grids.nexp),
        ("grid", f"{grids.grid_shape[0]} x {grids.grid_shape[1]} = {grids.nspot} spots"),
        ("spots kept", f"{int(valid.sum())} (>= {cal.meta['MINDITH']} dithers)"),
        ("statistic", f"{cal.meta['STAT']} of {cal.meta['FLUXCOL']}"
                      f" ({cal.meta['NITER']} iterations{'' if cal.meta['CONVERGD'] else ', NOT converged'})"),
        ("median scatter of t", f"{np.nanmedian(t_std):.4%}" if t_std.size else "n/a"),
        ("exposure scale s", f"{np.nanmin(cal.s):.4f} .. {np.nanmax(cal.s):.4f}"),
    ]
    rows += _projector_rows(grids)
    rows.append(("written", ", ".join(str(p) for p in written)))
    echo_summary(f"Calibration of {det or 'unnamed detector'}:", rows)


def _projector_rows(grids) -> list[tuple[str, str]]:
    """The projector-to-pixel fit, when the geometry module provides it."""
    try:
        from ..projector import fit_projector_map
    except ImportError:
        return []
    e = grids.exposures
    fit = fit_projector_map(np.asarray(e["bot_x"], float), np.asarray(e["bot_y"], float),
                            np.asarray(e["x0"], float), np.asarray(e["y0"], float),
                            detector=grids.detector or None)
    lines = fit.summary_lines()
    rows = [("projector map", lines[0] if lines else "")]
    rows += [("", line) for line in lines[1:]]
    return rows
