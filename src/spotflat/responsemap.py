"""The ``response`` stage: a star-flat map from spot data, against a flat, written to files.

:func:`run_response` reads the spot data (and optionally a calibration
catalogue and a flat), solves the binned response map with
:func:`spotflat.starflat.solve_starflat`, compares it with the flat binned
the same way, and computes the radial (tree-ring) profiles;
:func:`write_response` writes ``response.fits``, ``profiles.ecsv`` and the
figures, all staged and moved into place together.

``response.fits``
    Primary header: ``BINSIZE`` (bin ``i, j`` covers CCD ``x`` in
    ``[i B, (i + 1) B)``, ``y`` in ``[j B, (j + 1) B)``, DM convention, array
    index ``[j, i]``), ``DETECTOR``, the fit's ``CHI2``/``DOF``/``ERRSCALE``,
    ``NDEGEN`` (degenerate modes masked), the dither box and provenance.
    Image HDUs ``RESPONSE`` (``R`` normalised to mean 1 over the constrained
    bins, NaN elsewhere), ``RESPONSE_ERR``, ``COVERAGE`` (points per bin),
    ``NSPOT`` (distinct spots per bin); with a flat also ``FLAT`` (the flat
    binned and normalised the same way), ``FLAT_ERR`` and ``RATIO``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from .errors import InputError
from .fileio import atomic_path, make_output_dir, provenance_cards, staged_outputs
from .starflat import FlatComparison, StarFlat, compare_with_flat, solve_starflat

__all__ = ["ResponseResult", "run_response", "write_response"]


@dataclass
class ResponseResult:
    """What :func:`run_response` produced.

    Attributes
    ----------
    star : StarFlat
    flat_comparison : FlatComparison or None
    profiles : spotflat.profiles.RadialProfiles or None
    detector : str
    files : list of pathlib.Path
    """

    star: StarFlat
    flat_comparison: FlatComparison | None
    profiles: object | None
    detector: str
    files: list = field(default_factory=list)


def run_response(spotdata, calibration=None, flat=None, *, detector: str | None = None,
                 binsize: int = 64, per_amp: bool = False, flux_column: str | None = None,
                 shape: tuple[int, int] | None = None, nboot: int = 100, seed: int = 0,
                 progress: bool = False) -> ResponseResult:
    """Solve the response map of one detector from its spot data.

    Parameters
    ----------
    spotdata : path-like or SpotGrids
        Folder of processed-grid files (or a stacked :class:`SpotGrids`).
    calibration : path-like or Calibration, optional
        A catalogue of the same files: its ``used`` mask (points the
        calibration kept) restricts the fit.
    flat : path-like or numpy.ndarray, optional
        A flat of the detector to compare with.
    detector : str, optional
        Detector name (required when the files do not say).
    binsize : int
        Map bin, pixels.
    per_amp : bool
        Fit one factor per amplifier as well.
    flux_column : str, optional
        Flux column of the spot data.
    shape : tuple of int, optional
        CCD ``(ny, nx)`` when the detector is not an LSSTCam one.
    nboot : int
        Resamples for the profile errors.
    seed : int
        Seed of the resampling.
    progress : bool

    Returns
    -------
    ResponseResult
    """
    from .calibration import Calibration, check_matches, read_calibration
    from .grids import SpotGrids, read_grids
    from .profiles import radial_profiles, treering_centre

    calib = None
    if calibration is not None:
        calib = calibration if isinstance(calibration, Calibration) else read_calibration(calibration)
        detector = detector or calib.detector or None
        flux_column = flux_column or calib.meta.get("FLUXCOL") or None
    grids = spotdata if isinstance(spotdata, SpotGrids) else read_grids(
        spotdata, flux_column=flux_column, detector=detector, progress=progress)
    det = detector or grids.detector or ""
    used = None
    if calib is not None:
        check_matches(calib, grids)
        used = calib.used
    flat_img = None
    if flat is not None:
        if isinstance(flat, np.ndarray):
            flat_img = np.asarray(flat, dtype=float)
        else:
            from .flats import read_flat

            flat_img = read_flat(flat, normalize="ccd", detector=det or None)
    if shape is None:
        if det:
            from . import geometry

            try:
                shape = tuple(int(n) for n in geometry.ccd_shape(det))
            except (KeyError, ValueError, InputError):
                shape = None
        if shape is None and flat_img is not None:
            shape = flat_img.shape
        if shape is None:
            raise InputError("the CCD size is unknown: the spot data name no LSSTCam detector",
                             expected="--detector RXY_SXY (e.g. R22_S20)")
    e = grids.exposures
    star = solve_starflat(grids.x, grids.y, grids.flux, grids.flux_err, shape=shape, binsize=binsize,
                          used=used, per_amp=per_amp, detector=det,
                          grid_origin=(np.asarray(e["x0"], float), np.asarray(e["y0"], float)))
    cmp = compare_with_flat(star, flat_img, seed=seed) if flat_img is not None else None
    prof = None
    centre = treering_centre(det)
    if centre is not None:
        prof = radial_profiles(grids, centre, flat=flat_img, used=star.used, nboot=nboot, seed=seed)
    return ResponseResult(star=star, flat_comparison=cmp, profiles=prof, detector=det)


def _image(data, name: str, unit: str | None, comment: str) -> fits.ImageHDU:
    hdu = fits.ImageHDU(np.asarray(data, dtype=np.float32 if data.dtype.kind == "f" else np.int32), name=name)
    if unit:
        hdu.header["BUNIT"] = unit
    hdu.header["COMMENT"] = comment
    return hdu


def response_hdulist(res: ResponseResult) -> fits.HDUList:
    """The ``response.fits`` content (see the module notes)."""
    star = res.star
    primary = fits.PrimaryHDU()
    h = primary.header
    h["BINSIZE"] = (star.binsize, "[pix] map bin size B")
    h["DETECTOR"] = (res.detector, "detector")
    h["CCDNX"] = (int(star.shape[1]), "[pix] CCD width")
    h["CCDNY"] = (int(star.shape[0]), "[pix] CCD height")
    h["CONVENT"] = ("DM", "pixel centres at integers, (0,0) lower left")
    for k, v in star.meta.items():
        if k in ("BINSIZE", "DETECTOR"):
            continue
        h[k] = v
    h["COMMENT"] = "RESPONSE: R normalised to mean 1 over constrained bins; NaN = unconstrained or not visited"
    h["COMMENT"] = "bin i,j covers CCD x in [i*B,(i+1)*B), y in [j*B,(j+1)*B) (DM pixels)"
    h["COMMENT"] = "array index [j, i] = bin (x index i, y index j)"
    if res.flat_comparison is not None:
        c = res.flat_comparison
        h["FLAT_R"] = (c.r, "Pearson r of RESPONSE and FLAT")
        h["FLAT_RE"] = (c.r_err, "error of FLAT_R")
        h["FLAT_SL"] = (c.slope, "slope of RESPONSE-1 on FLAT-1")
        h["FLAT_SLE"] = (c.slope_err, "error of FLAT_SL")
        h["RAT_CHI2"] = (c.chi2, "chi2 of RATIO = const (full covariance)")
        h["RAT_DOF"] = (c.dof, "dof of RAT_CHI2")
    h.update(provenance_cards())
    hdus = [primary,
            _image(star.response, "RESPONSE", None, "relative response R, mean 1 over constrained bins"),
            _image(star.response_err, "RESPONSE_ERR", None, "1-sigma error of RESPONSE"),
            _image(star.coverage, "COVERAGE", "count", "spot measurements per bin used in the fit"),
            _image(star.nspot_bin, "NSPOT", "count", "distinct spots per bin")]
    if res.flat_comparison is not None:
        c = res.flat_comparison
        hdus += [_image(np.where(star.constrained, c.flat_map, np.nan), "FLAT", None,
                        "flat binned the same way, mean 1 over the compared bins"),
                 _image(np.where(star.constrained, c.flat_err, np.nan), "FLAT_ERR", None, "error of FLAT"),
                 _image(c.ratio, "RATIO", None, "RESPONSE / FLAT")]
    for hdu in hdus[1:]:
        hdu.header["BINSIZE"] = star.binsize
        hdu.header["DETECTOR"] = res.detector
    return fits.HDUList(hdus)


def write_response(res: ResponseResult, outdir: str | os.PathLike, figures: bool = True) -> list[Path]:
    """Write ``response.fits``, ``profiles.ecsv`` and figures into ``outdir``, all at once.

    Every file is staged (:func:`spotflat.fileio.staged_outputs`) and renamed
    into place only when all of them succeeded.

    Returns
    -------
    list of pathlib.Path
    """
    with staged_outputs():
        outdir = make_output_dir(outdir)
        final = [outdir / "response.fits"]
        with atomic_path(final[0]) as tmp:
            response_hdulist(res).writeto(tmp)
        if res.profiles is not None:
            tab = res.profiles.table()
            tab.meta.update(provenance_cards(DETECTOR=res.detector))
            tables = [("profiles.ecsv", tab)]
            amp = res.profiles.amplitude_table()
            if len(amp):
                tables.append(("profile_amplitudes.ecsv", amp))
            for name, t in tables:
                with atomic_path(outdir / name) as tmp:
                    t.write(tmp, format="ascii.ecsv")
                final.append(outdir / name)
        if figures:
            from .responseplots import response_figures

            final += [outdir / n for n in response_figures(res, outdir)]
    res.files = final
    return final
