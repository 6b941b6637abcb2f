"""``spotflat calibrate``: build the per-spot calibration catalogue."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click

from ._common import POSITIVE, echo_summary, explain_groups

__all__ = ["calibrate", "workers_options"]


def _workers(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter("must be at least 1 (1 = serial)")
    return value


def workers_options(fn):
    """The ``--workers N`` and ``--scheduler ADDRESS`` options shared by calibrate and correlate."""
    fn = click.option("--scheduler", default=None, metavar="ADDRESS",
                      help="Run on a running Dask scheduler, e.g. tcp://host:8786 (workers must see "
                           "the same files); overrides --workers.")(fn)
    fn = click.option("--workers", "-j", type=int, default=None, callback=_workers, metavar="N",
                      help="Local worker processes (default: the machine's cores; 1 = serial). "
                           "Small jobs run in this process.")(fn)
    return fn


def _output_for(output: Path, detector: str, several: bool, to_dir: bool) -> Path:
    if to_dir:
        return output / f"calib_{detector or 'unnamed'}.fits"
    if not several:
        return output
    return output.with_name(f"{output.stem}_{detector}{output.suffix or '.fits'}")


def _is_dir_output(output: Path, raw: str) -> bool:
    """``-o`` names a folder when it is one, or ends with a path separator."""
    return output.is_dir() or raw.endswith(("/", os.sep))


@click.command()
@click.argument("spotdata_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Calibration catalogue to write (FITS). With several detectors and no "
                   "--detector, one file per detector: OUTPUT_<detector>.fits. An existing folder "
                   "(or a name ending in /) gets OUTPUT/calib_<detector>.fits.")
@click.option("--flux-column", default=None,
              help="Flux column (default base_SdssShape_instFlux for DM catalogues, "
                   "FLUX+DFLUX for legacy files; '+' sums columns).")
@click.option("--stat", type=click.Choice(["clipped", "mean", "median"]), default="clipped",
              show_default=True, help="Statistic for F[k] and s[j].")
@click.option("--sigma", type=POSITIVE, default=4.0, show_default=True,
              help="Clipping threshold for --stat clipped.")
@click.option("--min-dithers", type=click.IntRange(min=1), default=3, show_default=True,
              help="Spots kept in fewer exposures are flagged invalid.")
@click.option("--detector", default=None,
              help="Use only this detector's files, e.g. R22_S11; files that name no detector "
                   "are assigned this one (files naming another are refused).")
@click.option("--ecsv", is_flag=True, help="Also write <output>_spots.ecsv and <output>_exposures.ecsv.")
@click.option("--max-offset", type=click.FloatRange(min=0, min_open=True), default=0.25, show_default=True,
              help="Grid points whose centroid is farther than this fraction of the grid step from "
                   "the grid position are unmatched (a neighbouring spot, not their own).")
@click.option("--qc/--no-qc", default=True, show_default=True,
              help="Exposure quality control: outlier exposures are excluded from F and s.")
@click.option("--keep", "keep", multiple=True, metavar="FILE",
              help="Keep this exposure (file name) whatever the QC says; repeatable.")
@click.option("--drop", "drop", multiple=True, metavar="FILE",
              help="Exclude this exposure (file name); repeatable.")
@click.option("--register", is_flag=True,
              help="Re-register exposures whose grid labels fit the consensus better shifted/flipped.")
@click.option("--qc-figure/--no-qc-figure", default=True, show_default=True,
              help="Write the QC figure <output>_qc.png.")
@workers_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def calibrate(spotdata_dir: Path, output: str, flux_column: str | None, stat: str, sigma: float,
              min_dithers: int, detector: str | None, ecsv: bool, max_offset: float, qc: bool,
              keep: tuple, drop: tuple, register: bool, qc_figure: bool, workers: int | None,
              scheduler: str | None, quiet: bool) -> None:
    """Build the calibration catalogue (F[k], s[j]) from SPOTDATA_DIR.

    SPOTDATA_DIR holds processed-grid files (DM grid catalogues or legacy
    processed grids) of one or several detectors, e.g. a focal-plane tree;
    files of different detectors are never mixed. The work is shared among
    --workers local processes or the workers of a Dask --scheduler; the
    catalogues are the same bit for bit as with --workers 1.
    """
    from ..errors import InputError

    raw = output
    if not raw:
        raise InputError("-o/--output: empty output path", expected="a file or folder name")
    # the QC figure's matplotlib import and first draw, on another core while
    # this process reads and fits (it draws itself when the helper cannot)
    helper = None
    if qc and qc_figure:
        from ..qcplot import FigureProcess

        helper = FigureProcess()
    try:
        _calibrate(spotdata_dir, raw, flux_column, stat, sigma, min_dithers, detector, ecsv, max_offset, qc,
                   keep, drop, register, qc_figure, workers, scheduler, quiet, helper)
    finally:
        if helper is not None:
            helper.close()


def _calibrate(spotdata_dir, raw, flux_column, stat, sigma, min_dithers, detector, ecsv, max_offset, qc,
               keep, drop, register, qc_figure, workers, scheduler, quiet, helper) -> None:
    from ..errors import InputError
    from ..fileio import check_output, check_output_dir, check_writable
    from ..focalplane import calibrate_detectors
    from ..grids import find_grid_files, group_by_detector, select_detector
    from ..parallel import Runner
    from ..qc import QCOptions

    output = Path(raw)
    to_dir = _is_dir_output(output, raw)
    if to_dir:
        # a folder: the same checks as every command's output folder (the file
        # names inside depend on the detectors, checked once they are known)
        check_output_dir(output, option="-o")
    else:
        check_writable(output)
    # connect first: an unreachable scheduler fails before any reading
    with Runner(workers=workers, scheduler=scheduler) as runner:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not Path(spotdata_dir).exists():
                raise InputError("no such directory", path=spotdata_dir,
                                 expected="a folder of processed-grid files")
            paths = find_grid_files(spotdata_dir)
            if not to_dir:
                check_output(output, inputs=paths, option="-o")
        for w in caught:
            click.echo(f"Warning: {w.message}", err=True)

        groups = group_by_detector(paths)
        if detector:
            groups = {detector: select_detector(groups, detector, where=spotdata_dir)}
        explain_groups(groups, min_dithers, spotdata_dir)
        several = len(groups) > 1
        if to_dir and output.is_dir():  # the files this run writes inside: refused now, not after the work
            for det in groups:
                out = _output_for(output, det, several, to_dir)
                for f in (out, *_qc_paths(out)):
                    check_output(f, inputs=paths, option="-o")
        if several:
            names = list(groups)
            shown = ", ".join(d or "(unnamed)" for d in names[:12]) + (", ..." if len(names) > 12 else "")
            click.echo(f"{len(groups)} detectors found ({shown}): writing one catalogue per detector.")
        # build everything before writing anything: no partial set of outputs
        options = QCOptions(enabled=qc, keep=keep, drop=drop, register=register, max_offset=max_offset)
        drawn: list = []  # detectors whose QC figure the child draws while the catalogue is built

        def on_qc(det, table):
            if qc_figure and helper is not None and helper.submit(table, det):
                drawn.append(det)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            cals = calibrate_detectors(groups, runner, flux_column=flux_column, stat=stat,
                                       min_dithers=min_dithers, sigma=sigma, progress=not quiet, qc=options,
                                       on_qc=on_qc)
        for w in caught:
            if issubclass(w.category, UserWarning):
                click.echo(f"Warning: {w.message}", err=True)
        how = runner.describe()
    written_all = _write_all(cals, output, several, to_dir, ecsv, qc_figure, inputs=paths, helper=helper,
                             drawn=drawn)
    if len(written_all) == 1:
        det, cal, written = written_all[0]
        _summary(det, cal, written, how)
    else:
        _short_summary(written_all, how)


def _write_all(cals, output: Path, several: bool, to_dir: bool, ecsv: bool, figure: bool, inputs=(), helper=None,
               drawn=None):
    """Write every catalogue with its QC table and figure: all staged, then renamed together.

    ``drawn``: detectors whose QC figure the ``helper`` child is drawing (submitted in this order).
    """
    from ..calibration import write_calibration
    from ..fileio import atomic_path, make_output_dir, staged_outputs

    drawn = list(drawn or ())
    pending, got = list(drawn), {}

    def drawn_png(det):  # collected in the order submitted, once the catalogue is written
        while det in pending:
            got[pending[0]] = helper.collect()
            pending.pop(0)
        return got.get(det)

    written_all = []
    with staged_outputs(inputs=inputs):  # every file of the run appears, or none
        if to_dir:
            make_output_dir(output, option="-o")
        for det, cal in cals.items():
            out = _output_for(output, det, several, to_dir)
            files = list(write_calibration(cal, out, ecsv=ecsv))
            if cal.qc is not None:
                qpath, png = _qc_paths(out)
                with atomic_path(qpath) as tmp:
                    t = cal.qc.copy()
                    t.meta = dict(cal.meta)
                    t.write(tmp, format="ascii.ecsv")
                files.append(qpath)
                if figure:
                    from ..qcplot import write_qc_figure

                    # a drawing the child failed is drawn here, not asked of the child again
                    files.append(write_qc_figure(cal.qc, png, det, helper=None if det in drawn else helper,
                                                 png=drawn_png(det)))
            written_all.append((det, cal, files))
    return written_all


def _qc_paths(out: Path) -> tuple[Path, Path]:
    """The QC table and figure written beside the catalogue ``out``."""
    return out.with_name(f"{out.stem}_qc.ecsv"), out.with_name(f"{out.stem}_qc.png")


def _qc_rows(cal) -> list[tuple[str, str]]:
    """Counts of flags per reason and the exposures left out, for the summary."""
    import numpy as np

    m, e = cal.meta, cal.exposures
    far = f"> {m.get('MAXOFFS', 0):g} step" if m.get("MAXOFFS", 0) else "rule off"
    rows = [("points flagged", f"{m.get('NFAR', 0)} far from their grid point ({far}), "
                               f"{m.get('NAMBIG', 0)} sharing a source, {m.get('NCLIPPED', 0)} clipped")]
    used = np.asarray(e["used"], dtype=bool) if "used" in e.colnames else np.ones(len(e), bool)
    if m.get("QC"):
        rows.append(("exposures used", f"{int(used.sum())} of {len(e)}"))
        for j in np.flatnonzero(~used):
            rows.append(("  excluded", f"{e['filename'][j]}: {e['reason'][j]}"))
        if "registration" in e.colnames:
            for j in range(len(e)):
                if str(e["registration"][j]) != "identity" and used[j]:
                    rows.append(("  labels", f"{e['filename'][j]}: fit better as {e['registration'][j]}"
                                             + (" (re-registered)" if m.get("NREGIST") else "")))
        if "bf_flag" in e.colnames and np.any(e["bf_flag"]):
            bad = [str(n) for n in e["filename"][np.asarray(e["bf_flag"])]]
            rows.append(("  saturation/BF", f"{len(bad)} exposure(s) with t or size depending on peak level: "
                                            + ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")))
        if "bf_flag" in cal.spots.colnames:
            rows.append(("  BF spots", f"{int(np.count_nonzero(cal.spots['bf_flag']))} spots whose size grows "
                                       "with peak level"))
    return rows


def _summary(det, cal, written, how: str) -> None:
    import numpy as np

    spots, e = cal.spots, cal.exposures
    valid = np.asarray(spots["valid"])
    t_std = np.asarray(spots["t_std"])[valid]
    used = np.asarray(e["used"], dtype=bool) if "used" in e.colnames else np.ones(len(e), bool)
    ncols, nrows = int(e["ncols"][0]), int(e["nrows"][0])
    rows = [
        ("files read", len(e)),
        ("grid", f"{ncols} x {nrows} = {len(spots)} spots"),
        ("spots kept", f"{int(valid.sum())} (>= {cal.meta['MINDITH']} dithers)"),
        ("statistic", f"{cal.meta['STAT']} of {cal.meta['FLUXCOL']}"
                      f" ({cal.meta['NITER']} iterations{'' if cal.meta['CONVERGD'] else ', NOT converged'})"),
        ("median scatter of t", f"{np.nanmedian(t_std):.4%}" if t_std.size else "n/a"),
        ("exposure scale s", f"{np.nanmin(cal.s[used]):.4f} .. {np.nanmax(cal.s[used]):.4f}"
                             + (" (used exposures)" if not used.all() else "")),
    ]
    rows += _qc_rows(cal)
    rows += _projector_rows(cal)
    if how.startswith("Dask"):  # one detector on a local pool is read in this process
        rows.append(("run on", how))
    rows.append(("written", ", ".join(str(p) for p in written)))
    echo_summary(f"Calibration of {det or 'unnamed detector'}:", rows)


def _short_summary(written_all, how: str) -> None:
    """One line per detector (focal-plane runs)."""
    import numpy as np

    rows = []
    for det, cal, written in written_all:
        valid = np.asarray(cal.spots["valid"])
        t_std = np.asarray(cal.spots["t_std"])[valid]
        scatter = f"{np.nanmedian(t_std):.3%}" if t_std.size else "n/a"
        e = cal.exposures
        excl = [str(n) for n, u in zip(e["filename"], e["used"]) if not u] if "used" in e.colnames else []
        rows.append((det or "(unnamed)", f"{len(cal.exposures)} files, {int(valid.sum())}/{len(valid)} spots kept, "
                                         f"median scatter of t {scatter} -> {written[0]}"
                                         + (f"; excluded: {', '.join(excl)}" if excl else "")))
    rows.append(("run on", how))
    echo_summary(f"Calibration of {len(written_all)} detectors:", rows)


def _projector_rows(cal) -> list[tuple[str, str]]:
    """The projector-to-pixel fit, when the geometry module provides it."""
    import numpy as np

    try:
        from ..projector import fit_projector_map
    except ImportError:
        return []
    e = cal.exposures
    fit = fit_projector_map(np.asarray(e["bot_x"], float), np.asarray(e["bot_y"], float),
                            np.asarray(e["x0"], float), np.asarray(e["y0"], float),
                            detector=cal.detector or None)
    lines = fit.summary_lines()
    rows = [("projector map", lines[0] if lines else "")]
    rows += [("", line) for line in lines[1:]]
    return rows
