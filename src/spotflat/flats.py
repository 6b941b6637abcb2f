"""CCOB flats: read, assemble, mask, normalise, combine, and sample at spots.

A flat comes in one of three forms, told apart from the file itself:

* **raw**: a multi-extension FITS with 16 ``SegmentNN`` image extensions
  (8 for a wavefront sensor) -- overscan-subtracted and assembled into the DM
  convention by :func:`spotflat.geometry.assemble_raw`;
* **master**: a combined flat written by :func:`write_flat` (primary header
  ``FLATTYPE = 'MASTER'``, optional ``MASK`` extension), or a calibrated LSST
  flat with ``IMAGE`` and ``MASK`` extensions;
* **assembled**: any other single CCD image -- the primary HDU's data, else
  the first image extension -- taken to be in the DM convention already.

Bad pixels are masked (NaN in the returned image) and counted per reason:
non-finite values, saturation, far outliers from the local level, a user
mask, and the file's own mask. A margin of ``edge`` pixels along the CCD
border is left in the image but kept out of the normalisation statistics
(the edge roll-off would bias them).

Normalisation divides by the mean (or median) level over the CCD
(``"ccd"``) or over each amplifier separately (``"amp"``). Per-amplifier
normalisation also divides out the amplifier gain steps: a flat whose
amplifiers differ only by a gain factor comes back with every amplifier at
level 1 -- and with it any real response difference between amplifiers.

Sampling at spot positions lives in :mod:`spotflat.footprint` and is
re-exported here: :func:`sample_flat`, :func:`flat_gradient`,
:func:`bin_flat`, :func:`footprint_sigma`.

Examples
--------
>>> import numpy as np
>>> img = np.full((40, 80), 2000.0)
>>> img[:, 40:] *= 1.1                       # a gain step
>>> f = prepare_flat(img, normalize="ccd", edge=0)
>>> round(float(np.nanmean(f.data)), 12)
1.0
>>> q = sample_flat(f.data, [10.0, 60.0], [20.0, 20.0], sigma=1.5)
>>> np.round(q, 4).tolist()
[0.9524, 1.0476]
"""

from __future__ import annotations

import gzip
import io
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from astropy.io import fits

from .errors import InputError
from .fileio import atomic_path, check_readable, provenance_cards, reading
from .footprint import (MIN_WEIGHT, SIZE_STEP, bin_flat, correlate_separable, expected_shape,
                        flat_gradient, footprint_sigma, gaussian_kernel1d, sample_flat)

__all__ = [
    "FlatImage",
    "MASK_BITS",
    "NORMALIZE_MODES",
    "read_flat",
    "load_flat",
    "prepare_flat",
    "check_flat_varies",
    "detect_form",
    "detector_from_header",
    "normalize_flat",
    "amplifier_slices",
    "find_outliers",
    "combine_flats",
    "write_flat",
    "sample_flat",
    "flat_gradient",
    "bin_flat",
    "footprint_sigma",
    "MIN_WEIGHT",
    "SIZE_STEP",
]

#: Bit of each mask reason in :attr:`FlatImage.mask`.
MASK_BITS = {"nonfinite": 1, "saturated": 2, "outliers": 4, "user": 8, "file": 16}

#: Accepted values of ``normalize``.
NORMALIZE_MODES = ("ccd", "amp", None)

#: Full scale of the LSSTCam 18-bit ADCs: raw pixels at or above are saturated.
RAW_FULL_SCALE = 2 ** 18 - 1

_DEFAULT_EDGE = 10


@dataclass
class FlatImage:
    """A flat field ready for sampling, with what was masked and why.

    Attributes
    ----------
    data : numpy.ndarray
        ``(ny, nx)`` float64 image in the DM convention (``data[y, x]``),
        normalised as asked; masked pixels are NaN.
    mask : numpy.ndarray
        ``(ny, nx)`` uint8 bit mask, bits :data:`MASK_BITS` (0 = good).
    detector : str or None
        Detector name (e.g. ``"R22_S11"``) when known, else the vendor
        (``"ITL"``/``"E2V"``) told from the shape, else None.
    form : str
        ``"raw"``, ``"assembled"``, ``"master"`` or ``"array"``.
    report : dict
        Pixel counts: ``total``, ``masked`` (any reason), one entry per
        reason of :data:`MASK_BITS`, and ``edge`` (pixels of the border
        margin kept out of the normalisation statistics, not masked).
    levels : dict
        Normalisation level(s) divided out: ``{"ccd": level}`` or ``{amp: level}``.
    path : str or None
        File the flat was read from.
    header : astropy.io.fits.Header or None
        Primary header of that file.
    """

    data: np.ndarray
    mask: np.ndarray
    detector: str | None = None
    form: str = "array"
    report: dict[str, int] = field(default_factory=dict)
    levels: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    header: fits.Header | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the image."""
        return self.data.shape

    def summary(self) -> list[str]:
        """Short lines describing the flat and its mask, for the command line.

        Examples
        --------
        >>> import numpy as np
        >>> FlatImage(np.ones((2, 2)), np.zeros((2, 2), np.uint8), report={"total": 4, "masked": 0}
        ...           ).summary()[0]
        'flat: array 2 x 2 (nx x ny), detector unknown'
        """
        ny, nx = self.data.shape
        lines = [f"flat: {self.form} {nx} x {ny} (nx x ny), detector {self.detector or 'unknown'}"]
        r = self.report
        if r:
            total = max(r.get("total", 1), 1)
            lines.append(f"masked: {r.get('masked', 0)} of {r.get('total', 0)} pixels "
                         f"({100.0 * r.get('masked', 0) / total:.3f} %)")
            for key in MASK_BITS:
                if r.get(key):
                    lines.append(f"  {key}: {r[key]}")
            if r.get("edge"):
                lines.append(f"edge margin kept out of the normalisation: {r['edge']} pixels")
        if self.levels:
            vals = np.array(list(self.levels.values()), dtype=float)
            if len(vals) == 1:
                lines.append(f"normalised by {next(iter(self.levels))} level {vals[0]:.6g}")
            else:
                lines.append(f"normalised per amplifier: levels {np.nanmin(vals):.6g} .. "
                             f"{np.nanmax(vals):.6g}")
        return lines


# --------------------------------------------------------------------------- reading

def _open_fits(path: str | os.PathLike) -> fits.HDUList:
    """Open a FITS file fully in memory; InputError for missing, non-FITS or truncated files."""
    path = os.fspath(path)
    check_readable(path, "a CCOB flat FITS file")
    if os.path.isdir(path):
        raise InputError("is a directory", path=path, expected="a CCOB flat FITS file")
    with reading(path, "a CCOB flat FITS file (not truncated)"):
        return _open_bytes(path)


def _open_bytes(path: str) -> fits.HDUList:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            # decompress once: astropy re-reads gzip streams per extension
            raw = gzip.decompress(raw)
        from .fitstable import check_structure

        check_structure(raw, path)  # sizes checked before astropy allocates what a damaged header asks
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=False)
            for hdu in hdul:  # touch every data unit: a truncated file fails here
                _ = hdu.data
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, TypeError, IndexError) as exc:
        raise InputError(f"cannot read as FITS ({exc})", path=path,
                         expected="a FITS file (not truncated)") from None
    for w in caught:
        if "truncated" in str(w.message).lower():
            raise InputError(f"truncated FITS file ({w.message})", path=path)
    return hdul


def _segment_hdus(hdul: fits.HDUList) -> list[fits.ImageHDU]:
    return [h for h in hdul[1:] if h.is_image and str(h.name).upper().startswith("SEGMENT")]


def detect_form(hdul: fits.HDUList) -> str:
    """Which kind of flat a FITS file holds: ``"raw"``, ``"master"`` or ``"assembled"``.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList

    Returns
    -------
    str

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.io import fits
    >>> detect_form(fits.HDUList([fits.PrimaryHDU(np.ones((4, 4)))]))
    'assembled'
    """
    if _segment_hdus(hdul):
        return "raw"
    head = hdul[0].header
    if str(head.get("FLATTYPE", "")).strip().upper() == "MASTER":
        return "master"
    names = {str(h.name).upper() for h in hdul}
    if {"IMAGE", "MASK"} <= names:
        return "master"
    return "assembled"


def _image_hdu(hdul: fits.HDUList, path) -> fits.ImageHDU | fits.PrimaryHDU:
    """The HDU holding the image of an assembled or master flat."""
    names = [str(h.name).upper() for h in hdul]
    if "IMAGE" in names and hdul[names.index("IMAGE")].data is not None:
        return hdul[names.index("IMAGE")]
    for hdu in hdul:
        if hdu.is_image and hdu.data is not None:
            if hdu.data.ndim != 2:
                raise InputError(f"HDU {hdu.name or 0} has a {hdu.data.ndim}-d image", path=path,
                                 expected="a 2-d CCD image")
            return hdu
    raise InputError("no image data in any HDU", path=path,
                     expected="a raw 16-segment file, an assembled CCD image or a master flat")


def detector_from_header(header: fits.Header) -> str | None:
    """The detector a flat's header names, or None.

    Parameters
    ----------
    header : astropy.io.fits.Header
        A primary (or image) header with ``RAFTBAY`` and ``CCDSLOT`` (raw BOT
        data) or ``DETECTOR`` (assembled and master flats).

    Returns
    -------
    str or None
        ``R22_S11``, when the name is an LSSTCam detector.

    Examples
    --------
    >>> from astropy.io import fits
    >>> detector_from_header(fits.Header({"RAFTBAY": "R22", "CCDSLOT": "S11"}))
    'R22_S11'
    """
    raft = str(header.get("RAFTBAY", "")).strip()
    slot = str(header.get("CCDSLOT", "")).strip()
    det = str(header.get("DETECTOR", "")).strip() if isinstance(header.get("DETECTOR"), str) else ""
    from .geometry import get_camera

    cam = get_camera()
    for name in (f"{raft}_{slot}" if raft and slot else "", det):
        if name and name in cam:
            return name
    return None


def _vendor_of_shape(shape: tuple[int, int]) -> str | None:
    for vendor in ("ITL", "E2V"):
        if expected_shape(vendor) == tuple(shape):
            return vendor
    return None


def _check_detector(shape: tuple[int, int], detector, path) -> None:
    if detector is None:
        return
    want = expected_shape(detector)
    if tuple(shape) != want:
        raise InputError(f"flat is {shape[1]} x {shape[0]} pixels (nx x ny), but detector {detector} "
                         f"is {want[1]} x {want[0]}", path=path,
                         expected="a flat of the same CCD as the spot data")


def _check_header_detector(header: fits.Header, detector, path) -> None:
    """A flat whose header names another detector than the spot data's is refused."""
    if not isinstance(detector, str):
        return
    from .geometry import get_camera

    cam = get_camera()
    if detector not in cam:
        return
    named = detector_from_header(header)
    value = header.get("DETNAME")  # detector_from_header has already tried RAFTBAY/CCDSLOT and DETECTOR
    if named is None and isinstance(value, str) and value.strip() in cam:
        named = value.strip()
    if named is not None and cam.detector(named).name != cam.detector(detector).name:
        raise InputError(f"flat header names detector {named}, the spot data are {detector}", path=path,
                         expected=f"the flat of {detector}")


def check_flat_varies(flat: np.ndarray, path=None) -> None:
    """Refuse a flat with no pixel-to-pixel variation (zero variance of its valid pixels).

    A constant flat carries no response to compare with: correlations and
    slopes against it are 0/0 (a slope of 1e12, a NaN r), not a result.

    Raises
    ------
    InputError
    """
    v = np.asarray(flat, dtype=np.float64)
    n = int(np.count_nonzero(np.isfinite(v)))
    if n == 0:
        return
    # the usual flat decides without a full-size copy: std >= range / sqrt(2 n) (the extreme
    # pixels alone give that much) and |mean| <= max(|min|, |max|); only a flat that nearly
    # fails takes the exact test below
    lo, hi = float(np.fmin.reduce(v, axis=None)), float(np.fmax.reduce(v, axis=None))
    if np.isfinite(hi - lo) and (hi - lo) / np.sqrt(2.0 * n) > 2e-9 * max(abs(lo), abs(hi), 1e-300):
        return
    v = v[np.isfinite(v)]
    if v.size and np.std(v) <= 1e-9 * max(abs(float(np.mean(v))), 1e-300):
        raise InputError("the flat is constant (zero variance over its valid pixels)", path=path,
                         expected="a CCOB flat with pixel-to-pixel response")


def _file_mask(hdul: fits.HDUList, shape) -> np.ndarray | None:
    """Bad pixels of a ``MASK`` extension: a spotflat master's bits (uint8), else a
    bool map (LSST mask planes BAD/SAT/NO_DATA when the header names them, else nonzero)."""
    names = [str(h.name).upper() for h in hdul]
    if "MASK" not in names:
        return None
    hdu = hdul[names.index("MASK")]
    if hdu.data is None or hdu.data.shape != tuple(shape):
        return None
    data = np.asarray(hdu.data)
    if str(hdul[0].header.get("FLATTYPE", "")).strip().upper() == "MASTER":
        return data.astype(np.uint8)  # written by write_flat: bits of MASK_BITS
    planes = [int(hdu.header[f"MP_{p}"]) for p in ("BAD", "SAT", "NO_DATA") if f"MP_{p}" in hdu.header]
    if planes:
        bits = sum(1 << p for p in planes)
        return (data.astype(np.int64) & bits) != 0
    return data != 0


def _saturation_level(saturation, hdus: Iterable, default):
    if saturation != "auto":
        return None if saturation is None else float(saturation)
    for hdu in hdus:
        if "SATURATE" in hdu.header:
            return float(hdu.header["SATURATE"])
    return default


def _raw_saturated(hdul: fits.HDUList, level: float, detector) -> np.ndarray:
    """Assembled map of raw pixels at or above ``level`` (before overscan subtraction)."""
    from .geometry import assemble_raw

    copy = [fits.PrimaryHDU(header=hdul[0].header.copy())]
    for hdu in _segment_hdus(hdul):
        head = hdu.header.copy()
        for key in ("BSCALE", "BZERO", "BLANK"):
            head.remove(key, ignore_missing=True)
        copy.append(fits.ImageHDU(data=(hdu.data >= level).astype(np.float32), header=head))
    return assemble_raw(fits.HDUList(copy), overscan=None, detector=detector, dtype=np.float32) > 0.5


def load_flat(path: str | os.PathLike, normalize: str | None = "ccd", detector: Any = None,
              overscan: str | None = "row", mask: Any = None, edge: int = _DEFAULT_EDGE,
              stat: str = "mean", saturation: Any = "auto", outliers: float | None = 10.0,
              outlier_floor: float = 0.05) -> FlatImage:
    """Read a CCOB flat in any of its forms, mask it and normalise it.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file (optionally gzipped): raw 16-segment, assembled CCD image,
        or master flat (see the module docstring for how the form is told).
    normalize : {"ccd", "amp", None}
        Divide by the level of the whole CCD, of each amplifier (which also
        removes the amplifier gain steps), or not at all.
    detector : str or tuple, optional
        Detector of the spot data (name such as ``"R22_S11"``, vendor, or
        shape): the flat must match it. By default taken from the header
        (``RAFTBAY``/``CCDSLOT``), else the vendor from the image shape.
    overscan : {"row", "mean", None}
        Serial-overscan subtraction of a raw flat: per row, one level per
        segment, or none. Ignored for assembled and master flats.
    mask : array_like or path, optional
        User bad-pixel mask, ``(ny, nx)``, nonzero/True = bad (a FITS file:
        its first image).
    edge : int
        Width (pixels) of the CCD border left out of the normalisation statistics.
    stat : {"mean", "median"}
        Statistic of the normalisation level.
    saturation : float, None or "auto"
        Pixels at or above this level are masked. ``"auto"``: the header's
        ``SATURATE``, else for raw files the 18-bit ADC full scale
        (:data:`RAW_FULL_SCALE`, applied to the raw values before overscan
        subtraction), else no check.
    outliers : float or None
        Mask pixels deviating from their local level (see :func:`find_outliers`)
        by more than this many robust standard deviations; None: no check.
    outlier_floor : float
        ... and by more than this fraction of the local level.

    Returns
    -------
    FlatImage

    Raises
    ------
    InputError
        Missing, non-FITS or truncated file; no image; a raw flat without
        overscan columns when ``overscan`` is asked; shape not matching
        ``detector``; no valid pixel (e.g. all NaN).
    """
    with reading(path, "a CCOB flat FITS file"):  # damaged cards surface lazily, while reading
        return _load_flat(path, normalize, detector, overscan, mask, edge, stat, saturation, outliers,
                          outlier_floor)


def _load_flat(path, normalize, detector, overscan, mask, edge, stat, saturation, outliers,
               outlier_floor) -> FlatImage:
    hdul = _open_fits(path)
    path = os.fspath(path)
    form = detect_form(hdul)
    header = hdul[0].header
    det_name = detector if detector is not None else detector_from_header(header)
    file_bad = None
    saturated = None
    if form == "raw":
        from .geometry import assemble_raw, get_camera

        known = det_name if isinstance(det_name, str) and det_name in get_camera() else None
        try:
            image = assemble_raw(hdul, overscan=overscan, detector=known)
        except InputError as exc:
            raise InputError(exc.problem, path=path, expected=exc.expected) from None
        segs = _segment_hdus(hdul)
        level = _saturation_level(saturation, [*segs, hdul[0]], RAW_FULL_SCALE)
        if level is not None:
            saturated = _raw_saturated(hdul, level, known)
        saturation_for_image = None
    else:
        hdu = _image_hdu(hdul, path)
        image = np.asarray(hdu.data, dtype=np.float64)
        if form == "master":
            file_bad = _file_mask(hdul, image.shape)
        saturation_for_image = _saturation_level(saturation, [hdul[0], hdu], None)
    _check_detector(image.shape, detector, path)
    _check_header_detector(header, detector, path)
    if det_name is None:
        det_name = _vendor_of_shape(image.shape)
    user = _read_user_mask(mask, image.shape)
    try:
        flat = prepare_flat(image, normalize=normalize, detector=det_name, mask=user, edge=edge,
                            stat=stat, saturation=saturation_for_image, outliers=outliers,
                            outlier_floor=outlier_floor, _saturated=saturated, _file_mask=file_bad)
    except InputError as exc:
        raise InputError(exc.problem, path=path, expected=exc.expected) from None
    flat.form = form
    flat.path = path
    flat.header = header
    return flat


def read_flat(path: str | os.PathLike, normalize: str | None = "ccd", detector: Any = None,
              overscan: str | None = "row", mask: Any = None, edge: int = _DEFAULT_EDGE,
              stat: str = "mean", **kwargs: Any) -> np.ndarray:
    """Read a CCOB flat as a normalised, assembled image (masked pixels NaN).

    The array-only form of :func:`load_flat` (same parameters; ``saturation``,
    ``outliers`` and ``outlier_floor`` go through ``kwargs``).

    Parameters
    ----------
    path : str or os.PathLike
        Raw 16-segment file, assembled CCD image or master flat.
    normalize : {"ccd", "amp", None}
        Level divided out: whole CCD, per amplifier (removes amplifier gain
        steps), or none.
    detector, overscan, mask, edge, stat, **kwargs
        See :func:`load_flat`.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float64, DM convention (``[y, x]``, pixel centres at integers).

    Raises
    ------
    InputError
        See :func:`load_flat`.
    """
    return load_flat(path, normalize=normalize, detector=detector, overscan=overscan, mask=mask,
                     edge=edge, stat=stat, **kwargs).data


def _read_user_mask(mask, shape) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        hdul = _open_fits(mask)
        data = next((h.data for h in hdul if h.is_image and h.data is not None), None)
        if data is None:
            raise InputError("no image in the mask file", path=mask)
        mask = data
    arr = np.asarray(mask)
    if arr.shape != tuple(shape):
        raise InputError(f"mask shape {arr.shape} does not match the flat {tuple(shape)}")
    return arr != 0


# --------------------------------------------------------------------------- masking

_STRIPE = 32  # rows per stripe of find_outliers' pixel arithmetic (temporaries stay in cache)


def find_outliers(image: np.ndarray, valid: np.ndarray | None = None, nsigma: float = 10.0,
                  floor: float = 0.05, sigma: float = 2.0) -> np.ndarray:
    """Pixels far from their local level.

    The local level of each pixel is the Gaussian-weighted mean (width
    ``sigma``) of its *valid neighbours*, the pixel itself excluded. A pixel
    is an outlier when its relative deviation from that level exceeds both
    ``nsigma`` robust standard deviations (1.4826 x the median absolute
    deviation of the relative deviations over the CCD) and ``floor``. The
    local level follows the flat's real structure (vignetting, edge roll-off,
    tree rings), so only pixel-scale defects -- dead, hot, dark pixels -- are
    caught.

    Parameters
    ----------
    image : numpy.ndarray
        ``(ny, nx)`` flat (NaN allowed).
    valid : numpy.ndarray of bool, optional
        Pixels to use and test (default: the finite ones).
    nsigma, floor, sigma : float
        Threshold in robust sigma, minimum relative deviation, smoothing width (pixels).

    Returns
    -------
    numpy.ndarray of bool

    Examples
    --------
    >>> import numpy as np
    >>> img = 1.0 + 0.01 * np.random.default_rng(1).standard_normal((50, 60))
    >>> img[20, 30] = 0.2
    >>> np.argwhere(find_outliers(img)).tolist()
    [[20, 30]]
    """
    image = np.asarray(image, dtype=np.float64)
    valid = np.isfinite(image) if valid is None else (valid & np.isfinite(image))
    if not valid.any():
        return np.zeros(image.shape, dtype=bool)
    g = gaussian_kernel1d(sigma)
    centre = g[len(g) // 2] ** 2
    from .footprint import TRUNCATE, _bad_term, _profile

    # a fully valid image is convolved as it is (no zeroed copy)
    all_valid = bool(valid.all())
    num = correlate_separable(image if all_valid else np.where(valid, image, 0.0), g, g)
    # the valid weight K * m = K * (CCD) - K * (masked): the first term is the product of two 1-D
    # profiles, the second is scattered from the (usually few) masked pixels -- one convolution, not two
    ny, nx = image.shape
    py = _profile(ny, "gauss", sigma, TRUNCATE)[1:-1]
    px = _profile(nx, "gauss", sigma, TRUNCATE)[1:-1]
    bad = None if all_valid else _bad_term(~valid, g, g, pad=0)
    usable = np.empty(image.shape, dtype=bool)
    # the rest in stripes of rows, in place in the convolution's output: on a 4k x 4k CCD every
    # fresh full-size temporary costs more (page faults) than the arithmetic
    for r0 in range(0, ny, _STRIPE):
        r1 = min(r0 + _STRIPE, ny)
        im, ok, nm = image[r0:r1], valid[r0:r1], num[r0:r1]
        den = np.multiply.outer(py[r0:r1], px)
        if bad is not None:
            den -= bad[r0:r1]
        nm -= np.where(ok, im, 0.0) * centre  # leave the pixel itself out
        den -= ok * centre
        use = usable[r0:r1]
        np.greater(den, 0.05, out=use)
        use &= ok
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(nm, den, out=nm)  # the local level
            nm[...] = np.divide(im, nm, out=np.full(im.shape, np.nan), where=use)
        nm -= 1.0
        use &= np.isfinite(nm)
    del bad
    dev = num  # the relative deviations
    if not usable.any():
        return np.zeros(image.shape, dtype=bool)
    sample = dev[usable]
    if sample.size > 1_000_000:  # a robust scale does not need every pixel
        sample = sample[:: sample.size // 1_000_000]
    mad = np.median(np.abs(sample - np.median(sample)))
    threshold = max(nsigma * 1.4826 * mad, floor)
    np.abs(dev, out=dev)
    with np.errstate(invalid="ignore"):
        return usable & (dev > threshold)


def amplifier_slices(shape: tuple[int, int], detector: Any = None) -> dict[str, tuple[slice, slice]]:
    """``{amp: (y-slice, x-slice)}`` of the amplifiers of a CCD image.

    From :func:`spotflat.geometry.amp_slices` for a detector name, else from
    the vendor layout told by ``detector`` or the image shape.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the image.
    detector : str, optional
        Detector name or vendor.

    Returns
    -------
    dict

    Raises
    ------
    InputError
        When the layout cannot be told.

    Examples
    --------
    >>> amplifier_slices((4004, 4096))["C00"]
    (slice(0, 2002, None), slice(0, 512, None))
    """
    from .geometry import amp_slices, get_camera

    cam = get_camera()
    if isinstance(detector, str) and detector in cam:
        if cam.detector(detector).shape != tuple(shape):
            raise InputError(f"image shape {tuple(shape)} does not match detector {detector}")
        return amp_slices(detector)
    vendor = detector.upper() if isinstance(detector, str) else _vendor_of_shape(shape)
    if vendor is None or vendor not in cam.types:
        raise InputError(f"cannot tell the amplifier layout of a {shape[1]} x {shape[0]} image",
                         expected="an ITL (4072 x 4000) or E2V (4096 x 4004) CCD, or a detector name")
    ctype = cam.types[vendor]
    if (ctype.ny, ctype.nx) != tuple(shape):
        raise InputError(f"image shape {tuple(shape)} does not match a {vendor} CCD")
    return {a.name: a.slices for a in sorted(ctype.amps, key=lambda a: a.name)}


def _edge_mask(shape: tuple[int, int], edge: int) -> np.ndarray:
    """True inside the CCD, away from the border margin of ``edge`` pixels."""
    inner = np.zeros(shape, dtype=bool)
    edge = int(edge)
    if edge < 0:
        raise InputError(f"edge must be >= 0, got {edge}")
    if 2 * edge < shape[0] and 2 * edge < shape[1]:
        inner[edge:shape[0] - edge, edge:shape[1] - edge] = True
    return inner


def _level(values: np.ndarray, stat: str) -> float:
    if values.size == 0:
        return float("nan")
    return float(np.mean(values) if stat == "mean" else np.median(values))


def normalize_flat(image: np.ndarray, mode: str | None = "ccd", stat: str = "mean",
                   valid: np.ndarray | None = None, edge: int = _DEFAULT_EDGE,
                   amp_slices: Mapping[str, tuple[slice, slice]] | None = None,
                   detector: Any = None) -> tuple[np.ndarray, dict[str, float]]:
    """Divide a flat by its mean or median level, over the CCD or per amplifier.

    The level is taken over valid pixels (finite, and ``valid`` when given)
    outside a margin of ``edge`` pixels along the CCD border. Per amplifier
    (``mode="amp"``), each amplifier is divided by its own level: this removes
    the amplifier gain steps (a flat that differs between amplifiers only by
    a gain factor becomes the same in every amplifier), together with any
    true response step at the amplifier boundaries.

    Parameters
    ----------
    image : numpy.ndarray
        ``(ny, nx)`` flat.
    mode : {"ccd", "amp", None}
        Whole CCD, per amplifier, or no normalisation.
    stat : {"mean", "median"}
    valid : numpy.ndarray of bool, optional
        Pixels usable for the statistics.
    edge : int
        Border margin (pixels) left out of the statistics.
    amp_slices : dict, optional
        ``{amp: (y-slice, x-slice)}`` for ``mode="amp"``; default from
        :func:`amplifier_slices` (needs an ITL/E2V shape or ``detector``).
    detector : str, optional
        Used to find the amplifier layout.

    Returns
    -------
    normalised : numpy.ndarray
        float64; pixels not covered by any amplifier (``mode="amp"``) and
        amplifiers without valid pixels are NaN.
    levels : dict
        ``{"ccd": level}`` or ``{amp: level}`` (empty for ``mode=None``).

    Raises
    ------
    InputError
        Unknown mode or statistic, no valid pixel, a non-positive level.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.ones((4, 8)); img[:, 4:] = 3.0
    >>> out, lv = normalize_flat(img, "amp", edge=0,
    ...     amp_slices={"A": (slice(0, 4), slice(0, 4)), "B": (slice(0, 4), slice(4, 8))})
    >>> out.tolist()[0], lv
    ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], {'A': 1.0, 'B': 3.0})
    """
    if mode not in NORMALIZE_MODES:
        raise InputError(f"unknown normalisation {mode!r}", expected="'ccd', 'amp' or None")
    if stat not in ("mean", "median"):
        raise InputError(f"unknown statistic {stat!r}", expected="'mean' or 'median'")
    image = np.asarray(image, dtype=np.float64)
    use = np.isfinite(image)
    if valid is not None:
        use &= valid
    if not use.any():
        raise InputError("the flat has no valid pixel (all NaN or masked)")
    if mode is None:
        return image.copy(), {}
    stats_use = use & _edge_mask(image.shape, edge)
    if not stats_use.any():
        raise InputError(f"no valid pixel outside the {edge}-pixel edge margin")
    if mode == "ccd":
        level = _level(image[stats_use], stat)
        if not level > 0:
            raise InputError(f"the flat's {stat} level is {level:g}", expected="a positive flat")
        return image / level, {"ccd": level}
    if amp_slices is None:
        amp_slices = amplifier_slices(image.shape, detector)
    out = np.full(image.shape, np.nan)
    levels = {}
    for name, (ys, xs) in amp_slices.items():
        level = _level(image[ys, xs][stats_use[ys, xs]], stat)
        levels[name] = level
        if np.isfinite(level):
            if not level > 0:
                raise InputError(f"amplifier {name} has a {stat} level of {level:g}",
                                 expected="a positive flat")
            out[ys, xs] = image[ys, xs] / level
    if not any(np.isfinite(v) for v in levels.values()):
        raise InputError("no amplifier has a valid pixel")
    return out, levels


def prepare_flat(image: Any, normalize: str | None = "ccd", detector: Any = None, mask: Any = None,
                 edge: int = _DEFAULT_EDGE, stat: str = "mean", saturation: float | None = None,
                 outliers: float | None = 10.0, outlier_floor: float = 0.05,
                 amp_slices: Mapping[str, tuple[slice, slice]] | None = None,
                 _saturated: np.ndarray | None = None, _file_mask: np.ndarray | None = None
                 ) -> FlatImage:
    """Mask and normalise an assembled flat held in memory.

    The steps of :func:`load_flat` after reading: mask non-finite pixels,
    pixels at or above ``saturation``, the user ``mask`` and far outliers
    (:func:`find_outliers`), then :func:`normalize_flat`; masked pixels are NaN.

    Parameters
    ----------
    image : array_like
        ``(ny, nx)`` assembled flat, DM convention.
    normalize, detector, mask, edge, stat, saturation, outliers, outlier_floor
        As in :func:`load_flat` (``mask`` here an array).
    amp_slices : dict, optional
        Amplifier layout for ``normalize="amp"`` (default from the shape/detector).

    Returns
    -------
    FlatImage

    Raises
    ------
    InputError
        Not a 2-d image, shape not matching ``detector``, no valid pixel.
    """
    img = np.array(image, dtype=np.float64)  # a copy: masked pixels are overwritten
    if img.ndim != 2:
        raise InputError(f"the flat must be a 2-d image, got {img.ndim} dimensions")
    if detector is not None:
        _check_detector(img.shape, detector, None)
    bits = np.zeros(img.shape, dtype=np.uint8)
    if _file_mask is not None:
        if _file_mask.dtype == bool:
            bits[_file_mask] |= MASK_BITS["file"]
        else:  # the bits of a spotflat master: keep their reasons
            bits |= (_file_mask.astype(np.uint8) & sum(MASK_BITS.values()))
    finite = np.isfinite(img)
    bits[~finite & (bits == 0)] |= MASK_BITS["nonfinite"]
    if saturation is not None:
        with np.errstate(invalid="ignore"):
            bits[finite & (img >= saturation)] |= MASK_BITS["saturated"]
    if _saturated is not None:
        bits[_saturated] |= MASK_BITS["saturated"]
    user = _read_user_mask(mask, img.shape)
    if user is not None:
        bits[user] |= MASK_BITS["user"]
    if not (bits == 0).any():
        raise InputError("the flat has no valid pixel (all NaN or masked)")
    if outliers is not None:
        bits[find_outliers(img, bits == 0, nsigma=outliers, floor=outlier_floor)] |= MASK_BITS["outliers"]
    good = bits == 0
    img[~good] = np.nan
    data, levels = normalize_flat(img, normalize, stat, good, edge, amp_slices, detector)
    report = {"total": int(img.size), "masked": int((~good).sum())}
    for key, bit in MASK_BITS.items():
        report[key] = int(np.count_nonzero(bits & bit))
    report["edge"] = int(np.count_nonzero(good & ~_edge_mask(img.shape, edge)))
    det = detector if isinstance(detector, str) else _vendor_of_shape(img.shape)
    return FlatImage(data=data, mask=bits, detector=det, form="array", report=report, levels=levels)


# --------------------------------------------------------------------------- combining

def combine_flats(paths_or_arrays: Sequence[Any], method: str = "median", normalize: str | None = "ccd",
                  stat: str = "mean", nsigma: float = 3.0, maxiters: int = 5, detector: Any = None,
                  block_rows: int = 256, **load_kwargs: Any) -> np.ndarray:
    """Combine several flat exposures into a master flat.

    Each exposure is masked and normalised first (:func:`load_flat` for
    paths, :func:`prepare_flat` for arrays, with ``normalize``/``stat``), so
    exposures of different brightness combine correctly; then, pixel by
    pixel over the exposures with a valid value:

    * ``"median"``: the median;
    * ``"clipped"``: the mean after iteratively rejecting values more than
      ``nsigma`` robust standard deviations (1.4826 x the median absolute
      deviation of the values kept) from their median, at most ``maxiters``
      times.

    The result is normalised again the same way (so its level is exactly 1).
    Pixels masked in every exposure are NaN. The normalised exposures are
    held as float32 (relative precision 6e-8, far below any flat's noise) to
    halve the memory of the stack.

    Parameters
    ----------
    paths_or_arrays : sequence of path or array_like
        Flat files (any form) or assembled images, all of one CCD.
    method : {"median", "clipped"}
    normalize : {"ccd", "amp", None}
    stat : {"mean", "median"}
        Normalisation statistic.
    nsigma, maxiters
        Clipping parameters of ``"clipped"``.
    detector : str, optional
        Detector (name, vendor or shape) the flats must match.
    block_rows : int
        Rows combined at a time (bounds the memory of the stack).
    amp_slices : dict, optional (keyword)
        Amplifier layout for ``normalize="amp"`` of array inputs of no known shape.
    **load_kwargs
        Passed to :func:`load_flat` / :func:`prepare_flat` (``edge``,
        ``overscan``, ``mask``, ``saturation``, ``outliers``...).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` master flat, float64, NaN where no exposure is valid.

    Raises
    ------
    InputError
        No input, unknown method, images of different shapes, or any input error.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> truth = 1 + 0.01 * rng.standard_normal((40, 60))
    >>> exps = [s * truth for s in (1000.0, 1500.0, 900.0)]
    >>> exps[1][5, 5] = 1e6                      # a cosmic ray in one exposure
    >>> master = combine_flats(exps, method="median", edge=0, outliers=None)
    >>> bool(np.allclose(master, truth / truth.mean()))
    True
    """
    if method not in ("median", "clipped"):
        raise InputError(f"unknown combination method {method!r}", expected="'median' or 'clipped'")
    items = list(paths_or_arrays)
    if not items:
        raise InputError("no flats to combine")
    amp_slices = load_kwargs.pop("amp_slices", None)
    stack = []
    shape = None
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            flat = load_flat(item, normalize=normalize, detector=detector, stat=stat, **load_kwargs)
        else:
            flat = prepare_flat(item, normalize=normalize, detector=detector, stat=stat,
                                amp_slices=amp_slices, **load_kwargs)
        if shape is None:
            shape = flat.shape
        elif flat.shape != shape:
            where = item if isinstance(item, (str, os.PathLike)) else None
            raise InputError(f"flat is {flat.shape}, the first one is {shape}", path=where,
                             expected="flats of one CCD")
        stack.append(flat.data.astype(np.float32))  # halves the memory of the stack
    out = np.full(shape, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        for r0 in range(0, shape[0], block_rows):
            block = np.stack([s[r0:r0 + block_rows] for s in stack]).astype(np.float64)
            if method == "median":
                out[r0:r0 + block_rows] = np.nanmedian(block, axis=0)
            else:
                out[r0:r0 + block_rows] = _clipped_mean(block, nsigma, maxiters)
    if normalize is not None and np.isfinite(out).any():
        edge = load_kwargs.get("edge", _DEFAULT_EDGE)
        det = detector if isinstance(detector, str) else None
        out, _ = normalize_flat(out, normalize, stat, None, edge, amp_slices, det)
    return out


def _clipped_mean(block: np.ndarray, nsigma: float, maxiters: int) -> np.ndarray:
    """Sigma-clipped mean along axis 0 (NaN = missing), robust scale."""
    data = block.copy()
    for _ in range(maxiters):
        centre = np.nanmedian(data, axis=0)
        dev = np.abs(data - centre)
        # 1.4826 MAD: with a handful of exposures one outlier inflates the
        # standard deviation so much that it would never be rejected
        scale = 1.4826 * np.nanmedian(dev, axis=0)
        with np.errstate(invalid="ignore"):
            reject = dev > nsigma * scale
        if not reject.any():
            break
        data[reject] = np.nan
    return np.nanmean(data, axis=0)


# --------------------------------------------------------------------------- writing

def write_flat(path: str | os.PathLike, image: Any, detector: str | None = None,
               header: Mapping[str, Any] | fits.Header | None = None, overwrite: bool = True,
               **provenance: Any) -> Path:
    """Write a master flat (atomically, with provenance).

    The primary HDU holds the image (float32, NaN where masked) with
    ``FLATTYPE = 'MASTER'``, ``DETECTOR``, the provenance cards of
    :func:`spotflat.fileio.provenance_cards` and the ``header`` items; for a
    :class:`FlatImage` also its normalisation, mask counts and a ``MASK``
    extension (uint8 bits :data:`MASK_BITS`). :func:`load_flat` reads it back
    as a ``"master"`` flat.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (replaced atomically; nothing is left on failure).
    image : numpy.ndarray or FlatImage
    detector : str, optional
        Detector name (default: the FlatImage's).
    header : mapping, optional
        Extra primary-header cards (e.g. ``{"NCOMBINE": 5}``).
    overwrite : bool
        Replace an existing file.
    **provenance
        Extra provenance cards (e.g. ``inputs="a.fits,b.fits"``; keys are
        upper-cased and cut to 8 characters).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    InputError
        Not a 2-d image, or the output cannot be written.
    """
    flat = image if isinstance(image, FlatImage) else None
    data = np.asarray(flat.data if flat is not None else image, dtype=np.float32)
    if data.ndim != 2:
        raise InputError(f"the flat must be a 2-d image, got {data.ndim} dimensions")
    if detector is None and flat is not None:
        detector = flat.detector
    primary = fits.PrimaryHDU(data)
    head = primary.header
    head["FLATTYPE"] = ("MASTER", "spotflat master flat")
    if detector:
        head["DETECTOR"] = (str(detector), "detector name or vendor")
    for key, value in provenance_cards(**provenance).items():
        head[key[:8]] = value
    if flat is not None:
        if flat.levels:
            head["NORMALIZ"] = ("ccd" if "ccd" in flat.levels else "amp", "normalisation of the flat")
        for key in ("masked", *MASK_BITS, "edge"):
            if key in flat.report:
                head[("NM" + key.upper())[:8]] = (flat.report[key], f"pixels masked: {key}"
                                                   if key != "edge" else "pixels in the edge margin")
    if header is not None:
        for key, value in (header.items() if hasattr(header, "items") else header):
            if key in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND") or str(key).startswith("NAXIS"):
                continue
            head[key] = value
    hdus = [primary]
    if flat is not None:
        hdus.append(fits.ImageHDU(np.asarray(flat.mask, dtype=np.uint8), name="MASK"))
    with atomic_path(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path)
