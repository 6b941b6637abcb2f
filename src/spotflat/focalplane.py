"""Focal-plane mode: calibrate and correlate many detectors, summarise them on the focal plane.

The work is cut into independent pieces handed to a
:class:`spotflat.parallel.Runner` (serial, local processes or Dask):

* **calibrate** reads each detector's processed-grid files and builds its
  catalogue. With several detectors, one task per detector reads its files
  (streaming) and builds the catalogue on the worker. With fewer detectors
  than Dask workers (one big CCD on a cluster), each detector's files are
  cut into contiguous chunks; a task reads one chunk and returns it stacked
  as one ``(quantity, file, spot)`` block, and this process combines the
  blocks in file order and builds the catalogue. Either way the catalogue
  is the serial one bit for bit: the reading is exact, the combination
  order fixed, and every task runs on one BLAS thread
  (:func:`spotflat.parallel.single_thread_blas`).
* **correlate** runs one task per detector: read its catalogue, spot data
  and flat, compare, correlate, and write ``<DET>/results.ecsv`` etc. into
  a hidden staging folder. A task holds a per-process lock while it works,
  so no process has more than one CCD's flat in memory. Only when every
  detector succeeded are the folders moved into place and the focal-plane
  summary (``focal_plane_summary.ecsv``, ``focal_plane_amps.ecsv``, and
  ``verdict.ecsv`` with one row per detector and feature) and
  figure (``focal_plane.png``) written; a failure removes the staging
  folder, so there is never a partial focal plane.

A focal-plane correlate run with the same seed gives each detector exactly
the result of a single-detector run with that seed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # astropy is imported where it is used: reading needs none of it
    from astropy.table import Table

from .errors import InputError
from .fileio import atomic_path
from .parallel import Runner, chunked, nchunks_for, one_at_a_time, single_thread_blas

__all__ = [
    "read_grids_chunked",
    "calibrate_detectors",
    "find_calibrations",
    "find_flats",
    "CorrelateJob",
    "FocalPlaneResult",
    "correlate_focal_plane",
    "plot_focal_plane",
]

_DET_RE = re.compile(r"(?<![A-Za-z0-9])(R\d\d)[_\-]?(S\d\d|SG\d|SW\d)(?![0-9])")


# ---------------------------------------------------------------------------- calibrate
def _read_chunk(job: tuple[list[str], str | None]) -> tuple[list[tuple], np.ndarray | None, list | None]:
    """Task: read a chunk of grid files; return their metadata and one stacked block."""
    from .grids import QUANTITIES, read_grid_files

    paths, flux_column = job
    files = list(read_grid_files(paths, flux_column))
    metas = [(str(f.path), f.format, f.grid, f.meta, f.flux_column) for f in files]
    if len({f.nspot for f in files}) == 1:
        block = np.empty((len(QUANTITIES), len(files), files[0].nspot))
        for j, f in enumerate(files):
            for iq, q in enumerate(QUANTITIES):
                block[iq, j] = f.values[q]
        return metas, block, None
    # grid sizes differ: let the stacking raise its usual error
    return metas, None, [f.values for f in files]


def _files_from_chunks(chunks: Sequence[tuple]):
    """GridFile views over the chunk blocks, in the original file order."""
    from .grids import QUANTITIES, GridFile

    for metas, block, values in chunks:
        for j, (path, fmt, grid, meta, flux_column) in enumerate(metas):
            vals = values[j] if block is None else {q: block[iq, j] for iq, q in enumerate(QUANTITIES)}
            yield GridFile(Path(path), fmt, grid, vals, meta, flux_column)


def read_grids_chunked(paths: Sequence[str | os.PathLike], runner: Runner, flux_column: str | None = None,
                       detector: str | None = None, progress: bool = False, min_chunk: int = 32,
                       max_chunk: int = 256, **stack_options):
    """Read grid files on the runner's workers, by contiguous chunks; stack them here.

    Parameters
    ----------
    paths : sequence of path-like
        The files of one detector, in the order the serial reader uses.
    runner : Runner
    flux_column, detector
        As for :func:`spotflat.grids.read_grids`.
    progress : bool
        Progress bar over chunks.
    min_chunk, max_chunk : int
        Chunk size bounds (files), see :func:`spotflat.parallel.nchunks_for`.

    Returns
    -------
    SpotGrids
        Identical to ``read_grids(paths, flux_column, detector)``.
    """
    from .grids import stack_grid_files

    paths = [str(p) for p in paths]
    if not paths:
        raise InputError("no processed-grid files to stack")
    n = nchunks_for(len(paths), runner.nworkers, min_chunk=min_chunk, max_chunk=max_chunk)
    jobs = [(c, flux_column) for c in chunked(paths, n)]
    chunks = runner.map(_read_chunk, jobs, label=f"Reading {detector or 'grid files'}", progress=progress)
    return stack_grid_files(_files_from_chunks(chunks), detector=detector, count=len(paths), **stack_options)


def _calibrate_one(job: tuple) -> Any:
    """Task: read one detector's files (streaming) and build its catalogue."""
    det, paths, flux_column, stat, min_dithers, sigma, *rest = job
    qc = rest[0] if rest else True  # (the QC options were added last)
    return _calibrate_serial(det, paths, (flux_column, stat, min_dithers, sigma, qc), progress=False)


def _offset(qc) -> dict:
    """The far-match option of the stacking, carried with the QC options."""
    off = getattr(qc, "max_offset", "default")
    return {} if off == "default" else {"max_offset": off}


def calibrate_detectors(groups: dict[str, Sequence[str | os.PathLike]], runner: Runner | None = None, *,
                        flux_column: str | None = None, stat: str = "clipped", min_dithers: int = 3,
                        sigma: float = 4.0, progress: bool = False, min_chunk: int = 32,
                        split_files: bool | None = None, qc=True, on_qc=None) -> dict:
    """Build one calibration catalogue per detector, on the runner's workers.

    Several detectors: one task per detector (reads its files streaming and
    builds its catalogue on the worker). One detector on a Dask cluster (or
    fewer detectors than workers): its files are read by chunks on the
    workers and stacked here. One detector with a local process pool: read
    here by forked readers writing into shared memory
    (:mod:`spotflat.forkread`) -- shipping the stacked arrays back through
    pipes costs more than the parallel reading saves (measured: 1400 files,
    2.1 s serial, 3.4 s with two processes).

    Parameters
    ----------
    groups : dict
        ``{detector: [grid files]}``, e.g. from
        :func:`spotflat.grids.group_by_detector` (``""`` for files whose
        detector is unknown).
    runner : Runner, optional
        Default: serial.
    flux_column, stat, min_dithers, sigma
        As for :func:`spotflat.calibration.build_calibration`.
    progress : bool
        Progress bars (over files when serial, over tasks otherwise).
    min_chunk : int
        Smallest chunk of files worth a task when one detector's files are
        split among workers.
    split_files : bool, optional
        Force (``True``) or forbid (``False``) splitting each detector's files
        into chunks; default: on a Dask cluster with fewer detectors than
        workers.
    qc : bool or spotflat.qc.QCOptions
        Quality control, as for :func:`spotflat.calibration.build_calibration`
        (a ``max_offset`` attribute also sets the far-match rule of the reader).
    on_qc : callable, optional
        ``on_qc(detector, qc_table)`` as soon as a detector's QC table is
        final (see :func:`spotflat.calibration.build_calibration`); called for
        the detectors calibrated in this process only.

    Returns
    -------
    dict
        ``{detector: Calibration}`` in the order of ``groups``; equal to the
        serial result bit for bit (apart from the write date).

    Examples
    --------
    >>> from spotflat.grids import find_grid_files, group_by_detector     # doctest: +SKIP
    >>> with Runner(workers=2) as r:                                      # doctest: +SKIP
    ...     cals = calibrate_detectors(group_by_detector(find_grid_files("tree/")), r)
    """
    from .calibration import build_calibration

    own = runner is None
    runner = runner or Runner(workers=1)
    try:
        dets = list(groups)
        opts = (flux_column, stat, min_dithers, sigma, qc)
        if runner.kind == "serial":
            with single_thread_blas():  # as the workers do: same numbers bit for bit
                return {det: _calibrate_serial(det, groups[det], opts, progress, on_qc=on_qc) for det in dets}
        if split_files is None:
            split_files = runner.kind == "dask" and len(dets) < runner.nworkers
        if not split_files and len(dets) == 1:
            # read here, the local workers' cores sharing the reading through shared memory
            nread = runner.nworkers if runner.kind == "processes" else 1
            with single_thread_blas():
                return {det: _calibrate_serial(det, groups[det], opts, progress, nread, on_qc) for det in dets}
        if not split_files:
            jobs = [(det, [str(p) for p in groups[det]], *opts) for det in dets]
            cals = runner.map(_calibrate_one, jobs, label="Calibrating detectors", progress=progress)
            return dict(zip(dets, cals))
        out = {}
        for det in dets:  # few detectors for many workers: split each one's files
            grids = read_grids_chunked(groups[det], runner, flux_column, detector=det or None,
                                       progress=progress, min_chunk=min_chunk, **_offset(qc))
            hook = None if on_qc is None else (lambda table, det=det: on_qc(det, table))
            with single_thread_blas():
                out[det] = build_calibration(grids, stat=stat, min_dithers=min_dithers, sigma=sigma, qc=qc,
                                             on_qc=hook)
            del grids
        return out
    finally:
        if own:
            runner.close()


def _calibrate_serial(det: str, paths, opts, progress: bool, nread: int = 1, on_qc=None):
    """One detector's catalogue: read its files (a bar over them; ``nread`` processes share
    the reading, :mod:`spotflat.forkread`) and calibrate here (``on_qc(det, table)``: see
    :func:`calibrate_detectors`)."""
    from .calibration import build_calibration
    from .forkread import read_stack

    flux_column, stat, min_dithers, sigma, qc = opts
    # the catalogue's writer imported while forked readers read
    grids = read_stack(paths, flux_column, detector=det or None, nproc=nread, progress=progress,
                       label=f"Reading {det or 'grid files'}", preload=("astropy.io.fits",), **_offset(qc))
    hook = None if on_qc is None else (lambda table: on_qc(det, table))
    return build_calibration(grids, stat=stat, min_dithers=min_dithers, sigma=sigma, qc=qc, on_qc=hook)


# ---------------------------------------------------------------------------- finding inputs
def _detector_in_name(name: str) -> str | None:
    from .geometry import get_camera

    cam = get_camera()
    for m in _DET_RE.finditer(Path(name).name):
        det = f"{m[1]}_{m[2]}"
        if det in cam:
            return det
    return None


def _fits_files(spec: str | os.PathLike, what: str) -> list[Path]:
    """FITS files named by a folder (searched recursively), a glob pattern or one file."""
    spec_s = os.fspath(spec)
    p = Path(spec_s)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")
                       and q.name.lower().endswith((".fits", ".fit", ".fits.gz", ".fits.fz")))
    elif glob.has_magic(spec_s):
        files = sorted(Path(q) for q in glob.glob(spec_s) if Path(q).is_file())
    elif p.is_file():
        files = [p]
    else:
        raise InputError("no such file, folder or pattern", path=p, expected=what)
    if not files:
        raise InputError("no FITS files found", path=p, expected=what)
    return files


def find_calibrations(spec: str | os.PathLike) -> dict[str, Path]:
    """Calibration catalogues in a folder (recursive) or matching a glob, by detector.

    FITS files that are not spotflat calibration catalogues (no ``SPOTS`` and
    ``EXPOSURES`` HDUs) are ignored.

    Parameters
    ----------
    spec : path-like or str
        A folder, a glob pattern (``"calib/calib_*.fits"``) or one file.

    Returns
    -------
    dict
        ``{detector: path}`` sorted by detector.

    Raises
    ------
    InputError
        When no catalogue is found, a catalogue does not name its detector,
        or two catalogues are for the same detector.
    """
    from astropy.io import fits

    found: dict[str, Path] = {}
    for p in _fits_files(spec, "calibration catalogues (calib_<DET>.fits) or a pattern matching them"):
        try:
            with fits.open(p) as hdul:
                names = {h.name for h in hdul}
                det = str(hdul[0].header.get("DETECTOR", "")).strip()
        except (OSError, ValueError):
            continue
        if not {"SPOTS", "EXPOSURES"} <= names:
            continue
        if not det:
            raise InputError("calibration catalogue does not name its detector", path=p,
                             expected="a DETECTOR header card (from spotflat calibrate)")
        if det in found:
            raise InputError(f"two calibration catalogues for {det} ({found[det].name} and {p.name})", path=p,
                             expected="one catalogue per detector")
        found[det] = p
    if not found:
        raise InputError("no spotflat calibration catalogues found", path=spec,
                         expected="files written by spotflat calibrate")
    return dict(sorted(found.items()))


def find_flats(flat_dir: str | os.PathLike, detectors: Sequence[str] | None = None) -> dict[str, Path]:
    """Flats in a folder (recursive), by detector: from the file name, else the header.

    Parameters
    ----------
    flat_dir : path-like
        Folder of flats (``ccob_flat_R22_S11.fits``, raw ``MC_C_..._R22_S11.fits``,
        or any name with a ``RAFTBAY``/``CCDSLOT`` or ``DETECTOR`` header).
    detectors : sequence of str, optional
        The detectors that need a flat: an error lists those without one.

    Returns
    -------
    dict
        ``{detector: path}``.

    Raises
    ------
    InputError
        No flat for a needed detector, or two flats for the same one.
    """
    from astropy.io import fits

    from .flats import detector_from_header

    flat_dir = Path(flat_dir)
    if not flat_dir.is_dir():
        raise InputError("not a directory", path=flat_dir, expected="a folder of flats, one per detector")
    want = None if detectors is None else set(detectors)
    found: dict[str, Path] = {}
    for p in _fits_files(flat_dir, "CCOB flats, one per detector"):
        det = _detector_in_name(p.name)
        if det is None:
            try:
                with fits.open(p) as hdul:  # headers only: the data are not read
                    for h in hdul[:2]:
                        det = det or detector_from_header(h.header)
            except (OSError, ValueError):
                continue
        if det is None or (want is not None and det not in want):
            continue
        if det in found:
            raise InputError(f"two flats for {det} ({found[det].name} and {p.name})", path=flat_dir,
                             expected="one flat per detector")
        found[det] = p
    missing = sorted((want or set()) - set(found))
    if missing:
        raise InputError(f"no flat for {len(missing)} detector(s): {', '.join(missing[:8])}"
                         f"{', ...' if len(missing) > 8 else ''}", path=flat_dir,
                         expected="a flat per detector, named by detector (R22_S11) in the file name or header")
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------- correlate
@dataclass
class CorrelateJob:
    """One detector's correlate task (picklable; everything by path).

    Attributes
    ----------
    detector : str
    calib : str
        Calibration catalogue.
    flat : str
        The detector's flat.
    outdir : str
        Folder the task writes its outputs into.
    params : dict
        Keyword arguments of :func:`spotflat.pipeline.run_correlate`.
    spot_paths : dict, optional
        ``{filename: path}`` of the detector's spot data; default: the paths
        recorded in the catalogue.
    figures : bool
        Write the per-detector PNG figures.
    """

    detector: str
    calib: str
    flat: str
    outdir: str
    params: dict = field(default_factory=dict)
    spot_paths: dict | None = None
    figures: bool = True


def _correlate_one(job: CorrelateJob) -> dict:
    """Task: correlate one detector, write its outputs, return its summary rows."""
    from .calibration import read_calibration
    from .pipeline import run_correlate, write_outputs

    with one_at_a_time():  # one CCD flat per process at a time
        calib = read_calibration(job.calib)
        if calib.detector and calib.detector != job.detector:
            raise InputError(f"catalogue is for {calib.detector}, not {job.detector}", path=job.calib)
        if job.spot_paths is not None:
            names = [str(n) for n in calib.exposures["filename"]]
            missing = [n for n in names if n not in job.spot_paths]
            if missing:
                raise InputError(f"{len(missing)} exposure(s) of the catalogue are not in the spot data "
                                 f"(e.g. {missing[0]})", path=job.calib)
            calib.exposures["path"] = [job.spot_paths[n] for n in names]
        res = run_correlate(calib, job.flat, spotdata=None, progress=False, **job.params)
        write_outputs(res, job.outdir, figures=job.figures)
        return _summary_rows(job.detector, res)


def _summary_rows(det: str, res) -> dict:
    """The CCD row and the amplifier rows of one detector's result."""
    from .stats import pearson_r

    comp = res.comparison
    v = comp.valid
    d = comp.d[v]
    row: dict[str, Any] = {"detector": det, "nspot": comp.nspot, "npoint": comp.npoint}
    # the flux columns are always there (NaN when flux was not asked for): one table layout
    row.update(dict.fromkeys(("r", "r_err", "r_err_bootstrap", "r_err_jackknife", "r_err_block", "r_null_std",
                              "p_value", "slope", "slope_err"), np.nan))
    for r in res.results:
        if "component" in r.colnames and r["component"] != "all":  # one row per detector: all points
            continue
        q = str(r["quantity"])
        pre = "" if q == "flux" else f"{q}_"
        keys = ("r", "r_err", "r_err_bootstrap", "r_err_jackknife", "r_err_block", "r_null_std", "p_value",
                "slope", "slope_err") if q == "flux" else ("r", "r_err", "r_err_block", "p_value", "slope")
        for k in keys:
            row[pre + k] = float(r[k])
    row["d_mean"] = float(np.mean(d)) if d.size else np.nan
    row["d_rms"] = float(np.sqrt(np.mean(d ** 2))) if d.size else np.nan
    row["frac_explained_flat"] = float(res.variance.get("frac_explained_flat", np.nan))
    amps = []
    if len(res.amp_summary):
        labels = comp.amp_labels()
        for a in res.amp_summary:
            m = v & (labels == a["amp"])
            try:
                r_amp = pearson_r(comp.t[m], comp.q[m]) if m.sum() >= 3 else np.nan
            except InputError:
                r_amp = np.nan
            amps.append({"detector": det, "amp": str(a["amp"]), "nspot": int(a["nspot"]),
                         "npoint": int(a["npoint"]), "r": float(r_amp), "d_mean": float(a["d_mean"]),
                         "d_mean_err": float(a["d_mean_err"]), "d_rms": float(a["d_rms"])})
    # QE or pixel area (spotflat.verdict): the detector's rows, one per feature, tagged with it
    verdict = []
    if getattr(res, "verdict", None) is not None:
        for r in res.verdict.table:
            verdict.append({"detector": det, **{c: (r[c].item() if hasattr(r[c], "item") else r[c])
                                                for c in res.verdict.table.colnames}})
    return {"ccd": row, "amps": amps, "verdict": verdict}


@dataclass
class FocalPlaneResult:
    """What a focal-plane correlate run produced.

    Attributes
    ----------
    summary : astropy.table.Table
        One row per detector (``focal_plane_summary.ecsv``): ``detector``,
        ``nspot``, ``npoint``, ``r`` and its errors, ``p_value``, ``slope``,
        ``slope_err``, ``d_mean``, ``d_rms``, ``frac_explained_flat`` (and
        ``<quantity>_r`` ... for other quantities).
    amps : astropy.table.Table
        One row per detector and amplifier (``focal_plane_amps.ecsv``):
        ``detector``, ``amp``, ``nspot``, ``npoint``, ``r``, ``d_mean``,
        ``d_mean_err``, ``d_rms``.
    verdict : astropy.table.Table
        QE or pixel area (``verdict.ecsv`` at the top of the output): one
        row per detector and feature, the columns of each detector's own
        ``verdict.ecsv`` (:mod:`spotflat.verdict`) after ``detector``;
        empty when no detector's verdict could be formed.
    files : list of pathlib.Path
        Files and per-detector folders written.
    """

    summary: Table
    amps: Table
    files: list
    verdict: Table = field(default_factory=lambda: _table())


def _table(*args, **kwargs) -> Table:
    from astropy.table import Table

    return Table(*args, **kwargs)


def _verdict_table(rows: list[dict], meta: dict) -> Table:
    """One row per (detector, feature) from the detectors' verdicts."""
    from astropy.table import Table

    vrows = [v for r in rows for v in r.get("verdict", [])]
    table = Table(rows=vrows) if vrows else Table(names=("detector", "feature", "verdict"), dtype=(str, str, str))
    table.meta.update(meta)
    for col in ("TRCX", "TRCY", "DETECTOR"):  # per-detector cards do not describe the whole table
        table.meta.pop(col, None)
    return table


def _tables(rows: list[dict], meta: dict) -> tuple[Table, Table]:
    from astropy.table import Table

    summary = Table(rows=[r["ccd"] for r in rows])
    amp_rows = [a for r in rows for a in r["amps"]]
    amps = Table(rows=amp_rows) if amp_rows else Table(
        names=("detector", "amp", "nspot", "npoint", "r", "d_mean", "d_mean_err", "d_rms"),
        dtype=(str, str, int, int, float, float, float, float))
    for t in (summary, amps):
        t.meta.update(meta)
    return summary, amps


def correlate_focal_plane(calibs: dict[str, str | os.PathLike], flats: dict[str, str | os.PathLike],
                          outdir: str | os.PathLike, runner: Runner | None = None,
                          spotdata: str | os.PathLike | None = None, figures: bool = True,
                          progress: bool = False, **params: Any) -> FocalPlaneResult:
    """Correlate many detectors; write ``OUTDIR/<DET>/...`` and the focal-plane summary.

    Parameters
    ----------
    calibs : dict
        ``{detector: calibration catalogue}`` (:func:`find_calibrations`).
    flats : dict
        ``{detector: flat}`` (:func:`find_flats`); must cover ``calibs``.
    outdir : path-like
        Output folder (created). Earlier ``<DET>`` folders of the same
        detectors are replaced.
    runner : Runner, optional
        Default: serial.
    spotdata : path-like, optional
        Tree of processed-grid files; default: the paths each catalogue records.
    figures : bool
        Per-detector PNG figures (the focal-plane figure is always drawn).
    progress : bool
        Progress bar over detectors.
    **params
        Passed to :func:`spotflat.pipeline.run_correlate` (``quantities``,
        ``nboot``, ``nnull``, ``block``, ``seed``, ...). The same ``seed``
        is used for every detector.

    Returns
    -------
    FocalPlaneResult

    Raises
    ------
    InputError, WorkerError
        Whatever one detector's task raised; nothing is written then.
    """
    from .fileio import provenance_cards

    missing = sorted(set(calibs) - set(flats))
    if missing:
        raise InputError(f"no flat for {', '.join(missing)}")
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError("not a directory", path=outdir, expected="an output folder")
    created = None
    if not outdir.exists():
        created = outdir
        for parent in reversed(outdir.parents):  # remember the first folder we create
            if not parent.exists():
                created = parent
                break
        outdir.mkdir(parents=True)
    if not os.access(outdir, os.W_OK):
        raise InputError("output directory is not writable", path=outdir)
    spot_paths = _spot_paths_by_detector(spotdata, list(calibs)) if spotdata is not None else {}
    own = runner is None
    runner = runner or Runner(workers=1)
    stage = Path(tempfile.mkdtemp(prefix=".spotflat-focalplane-", dir=outdir))
    files: list[Path] = []
    try:
        jobs = [CorrelateJob(det, str(Path(calibs[det]).resolve()), str(Path(flats[det]).resolve()),
                             str(stage / det), dict(params), spot_paths.get(det) if spotdata else None,
                             figures)
                for det in calibs]
        rows = runner.map(_correlate_one, jobs, label="Correlating detectors", progress=progress)
        meta = provenance_cards(NDET=len(rows), **{k.upper()[:8]: v for k, v in params.items()
                                                  if isinstance(v, (int, float, str, bool))})
        summary, amps = _tables(rows, meta)
        verdict = _verdict_table(rows, meta)
        # every detector succeeded: now, and only now, put the results in place
        for det in calibs:
            final = outdir / det
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage / det, final)
            files.append(final)
        for table, name in ((summary, "focal_plane_summary.ecsv"), (amps, "focal_plane_amps.ecsv"),
                            (verdict, "verdict.ecsv")):
            with atomic_path(outdir / name) as tmp:
                table.write(tmp, format="ascii.ecsv")
            files.append(outdir / name)
        from .plots import save_figure

        quantities = list(params.get("quantities", ["flux"]))
        column = "r" if "flux" in quantities else f"{quantities[0]}_r"
        files.append(save_figure(plot_focal_plane(summary, amps, ccd_column=column), outdir / "focal_plane.png"))
    except BaseException:
        if created is not None and not files:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if own:
            runner.close()
    return FocalPlaneResult(summary=summary, amps=amps, files=files, verdict=verdict)


def _spot_paths_by_detector(spotdata, detectors: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{detector: {filename: path}}`` over a tree of grid files, found once."""
    from .grids import find_grid_files, group_by_detector

    groups = group_by_detector(find_grid_files(spotdata))
    unnamed = groups.get("", [])
    return {det: {p.name: str(p.resolve()) for p in groups.get(det, []) + unnamed} for det in detectors}


# ---------------------------------------------------------------------------- figure
def _raft_boxes(cam) -> dict[str, tuple[float, float, float, float]]:
    from .geometry import detector_outline

    boxes: dict[str, list[float]] = {}
    for d in cam:
        fx, fy = detector_outline(d)
        b = boxes.setdefault(d.raft, [np.inf, -np.inf, np.inf, -np.inf])
        b[:] = [min(b[0], fx.min()), max(b[1], fx.max()), min(b[2], fy.min()), max(b[3], fy.max())]
    return {k: tuple(v) for k, v in boxes.items()}


def _amp_polygon(det: str, amp: str) -> np.ndarray:
    from .geometry import amp_slices, ccd_to_focal

    sy, sx = amp_slices(det)[amp]
    x0, x1, y0, y1 = sx.start - 0.5, sx.stop - 0.5, sy.start - 0.5, sy.stop - 0.5
    fx, fy = ccd_to_focal(det, np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]), check=False)
    return np.column_stack([fx, fy])


def _draw_layout(ax, cam, zoom_to: Sequence[str]) -> None:
    from matplotlib.patches import Rectangle

    from .geometry import detector_outline

    for d in cam:
        fx, fy = detector_outline(d)
        ax.plot(fx, fy, color="0.75", lw=0.4, zorder=1)
    for raft, (x0, x1, y0, y1) in _raft_boxes(cam).items():
        pad = 0.8
        ax.add_patch(Rectangle((x0 - pad, y0 - pad), x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, fill=False,
                               ec="0.35", lw=0.8, zorder=3))
    ax.set_aspect("equal")
    ax.set_xlabel("focal plane x [mm]")
    ax.set_ylabel("focal plane y [mm]")
    if zoom_to:
        pts = np.concatenate([np.column_stack(detector_outline(d)) for d in zoom_to])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        half = max(hi - lo) / 2 + 30.0
        c = (lo + hi) / 2
        full = 330.0
        if half < full * 0.6:  # a few CCDs: zoom on them; otherwise show the whole plane
            ax.set_xlim(c[0] - half, c[0] + half)
            ax.set_ylim(c[1] - half, c[1] + half)
        else:
            ax.set_xlim(-full, full)
            ax.set_ylim(-full, full)


def plot_focal_plane(summary: Table, amps: Table | None = None, ccd_column: str = "r",
                     amp_column: str = "d_rms", title: str = ""):
    """Per-CCD and per-amplifier values coloured on the LSSTCam focal plane.

    Left: ``summary[ccd_column]`` per CCD (default the flux correlation
    ``r``); right: ``amps[amp_column]`` per amplifier (default the residual
    RMS). Raft and CCD outlines come from :mod:`spotflat.geometry`; the view
    zooms on the detectors present when they cover a small part of the plane.

    Parameters
    ----------
    summary : astropy.table.Table
        With ``detector`` and ``ccd_column``.
    amps : astropy.table.Table, optional
        With ``detector``, ``amp`` and ``amp_column``; without it the right
        panel shows ``d_rms`` per CCD.
    ccd_column, amp_column : str
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    from .geometry import detector_outline, get_camera

    cam = get_camera()
    dets = [str(d) for d in summary["detector"]]
    fig = Figure(figsize=(12.5, 5.8), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = [(axes[0], [np.column_stack(detector_outline(d))[:4] for d in dets],
               np.asarray(summary[ccd_column], float), f"{ccd_column} per CCD", "RdBu_r")]
    if amps is not None and len(amps) and amp_column in amps.colnames:
        polys = [_amp_polygon(str(r["detector"]), str(r["amp"])) for r in amps]
        panels.append((axes[1], polys, np.asarray(amps[amp_column], float), f"{amp_column} per amplifier",
                       "viridis"))
    else:
        panels.append((axes[1], panels[0][1], np.asarray(summary["d_rms"], float), "d_rms per CCD", "viridis"))
    for ax, polys, values, label, cmap in panels:
        _draw_layout(ax, cam, dets)
        finite = values[np.isfinite(values)]
        coll = PolyCollection(polys, array=np.ma.masked_invalid(values), cmap=cmap, edgecolors="k",
                              linewidths=0.3, zorder=2)
        if finite.size:
            if cmap == "RdBu_r":
                lim = float(np.max(np.abs(finite))) or 1.0
                coll.set_clim(-lim, lim)
            else:
                coll.set_clim(float(finite.min()), float(finite.max()) if finite.max() > finite.min()
                              else float(finite.min()) + 1e-12)
        ax.add_collection(coll)
        fig.colorbar(coll, ax=ax, label=label, shrink=0.85)
        ax.set_title(label)
    if len(dets) <= 21:
        for d in dets:
            fx, fy = detector_outline(d)
            axes[0].text(fx[:4].mean(), fy[:4].mean(), d, ha="center", va="center", fontsize=6, zorder=4)
    fig.suptitle(title or f"Spot vs flat over the focal plane ({len(dets)} CCDs)")
    return fig
