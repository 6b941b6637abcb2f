"""Raw LSSTCam 16-segment FITS <-> assembled CCD image in the DM convention.

Assembly rule (DESIGN.md section 3, checked pixel for pixel against obs_lsst's
expected images): each ``SegmentNN`` extension's ``DATASEC`` is copied to its
``DETSEC`` in the camera team's detector frame, a reversed range in
``DETSEC`` (e.g. ``[509:1,1:2000]``) meaning the data are flipped along that
axis; the DM image is that result flipped in y. Sections missing from a
header are taken from the packaged geometry table.

Overscan: the serial overscan (the columns after ``DATASEC`` in each row, or
``BIASSEC`` when the header has one) is averaged over the whole segment
(``"mean"``) or row by row (``"row"``) and subtracted from that segment's data.

:func:`make_raw_hdulist` is the inverse: it splits an assembled DM image into
segments with prescan, serial and parallel overscan, and headers in the same
conventions as the real files, so that
``assemble_raw(make_raw_hdulist(img, det))`` returns ``img`` exactly.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from typing import Mapping, Sequence

import numpy as np
from astropy.io import fits

from .errors import InputError
from .geometry import Amplifier, CcdType, Detector, get_camera

__all__ = ["assemble_raw", "make_raw_hdulist", "parse_section", "amp_sections",
           "OVERSCAN_MODES"]

#: Accepted values of ``overscan`` in :func:`assemble_raw`.
OVERSCAN_MODES = (None, "none", "mean", "row")

_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")
_SEGMENT_RE = re.compile(r"^SEGMENT(\d\d)$", re.IGNORECASE)


def parse_section(text: str, key: str = "section", where: str | None = None,
                  path=None) -> tuple[int, int, int, int]:
    """Parse a FITS section ``'[x1:x2,y1:y2]'`` (1-based, inclusive, possibly reversed).

    Parameters
    ----------
    text : str
        The header value.
    key, where, path
        Used in the error message (keyword, extension, file).

    Returns
    -------
    tuple of int
        ``(x1, x2, y1, y2)`` as written (a reversed range keeps ``x1 > x2``).

    Raises
    ------
    InputError
        When the value is not of that form or has a zero index.

    Examples
    --------
    >>> parse_section("[509:1,1:2000]")
    (509, 1, 1, 2000)
    """
    m = _SECTION_RE.match(str(text)) if isinstance(text, str) else None
    if m is None or 0 in (vals := tuple(int(v) for v in m.groups())):
        loc = f" in {where}" if where else ""
        raise InputError(f"malformed {key} {text!r}{loc}", path=path,
                         expected="'[x1:x2,y1:y2]' with 1-based indices")
    return vals


def _fmt(x1: int, x2: int, y1: int, y2: int) -> str:
    return f"[{x1}:{x2},{y1}:{y2}]"


def amp_sections(ctype: CcdType, amp: Amplifier) -> dict[str, str]:
    """Header sections of one segment as the camera writes them.

    Returns
    -------
    dict
        ``DATASEC`` (in the raw segment), ``DETSEC`` (camera-team detector
        frame, reversed ranges for read-out flips) and ``DETSIZE``.

    Examples
    --------
    >>> from spotflat.geometry import get_camera
    >>> d = get_camera().detector("R02_S02")
    >>> amp_sections(d.type, d.amp("C10"))["DETSEC"], amp_sections(d.type, d.amp("C00"))["DETSEC"]
    ('[509:1,1:2000]', '[509:1,4000:2001]')
    """
    dx0, dy0, w, h = ctype.data
    x1, x2 = amp.x0 + 1, amp.x0 + w
    if amp.flip_x:
        x1, x2 = x2, x1
    # the camera frame is the DM frame flipped in y, so the DM y-flip cancels there
    c1, c2 = ctype.ny - (amp.y0 + h) + 1, ctype.ny - amp.y0
    if not amp.flip_y:
        c1, c2 = c2, c1
    return {"DATASEC": _fmt(dx0 + 1, dx0 + w, dy0 + 1, dy0 + h),
            "DETSEC": _fmt(x1, x2, c1, c2),
            "DETSIZE": _fmt(1, ctype.nx, 1, ctype.ny)}


# --------------------------------------------------------------------------- reading
def _open(path_or_hdulist):
    if isinstance(path_or_hdulist, fits.HDUList):
        return path_or_hdulist, None, False
    path = os.fspath(path_or_hdulist)
    if not os.path.exists(path):
        raise InputError("no such file", path=path, expected="a raw LSSTCam FITS file")
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        if gz:
            # astropy seeks back and forth in a gzip stream (decompressing it again each
            # time); decompressing once into memory is ~10x faster for a 16-segment file
            with gzip.open(path, "rb") as fh:
                return fits.open(io.BytesIO(fh.read()), memmap=False), path, True
        return fits.open(path, memmap=False), path, True
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read as FITS ({exc})", path=path) from None


def _identify(hdul: fits.HDUList, detector, path) -> Detector | CcdType | None:
    """The detector (or at least the CCD type) of a raw file, when it can be told."""
    cam = get_camera()
    if detector is not None:
        return cam.detector(detector)
    hdr = hdul[0].header
    raft, slot = str(hdr.get("RAFTBAY", "")).strip(), str(hdr.get("CCDSLOT", "")).strip()
    if raft and slot and f"{raft}_{slot}" in cam:
        return cam.detector(f"{raft}_{slot}")
    num = str(hdr.get("LSST_NUM", "")).strip().upper()
    for vendor in ("ITL", "E2V"):
        if num.startswith(vendor):
            return cam.types[vendor]
    return None


def assemble_raw(path_or_hdulist, overscan: str | None = None, detector: str | None = None,
                 overscan_skip: int = 2, dtype=np.float64) -> np.ndarray:
    """Assemble a raw 16-segment LSSTCam FITS file into a DM-convention CCD image.

    Parameters
    ----------
    path_or_hdulist : str, os.PathLike or astropy.io.fits.HDUList
        Raw file with ``SegmentNN`` image extensions.
    overscan : {None, "mean", "row"}
        Serial-overscan subtraction: ``None`` (none), ``"mean"`` (one level per
        segment) or ``"row"`` (one level per row of each segment).
    detector : str, optional
        Detector name, when the primary header's ``RAFTBAY``/``CCDSLOT`` are
        missing or wrong; used only to fill in missing sections and to check
        that no segment is missing.
    overscan_skip : int
        Overscan columns next to the data left out of the level (they carry
        charge deferred from the last data pixels).
    dtype : numpy dtype
        Output type (float64 by default).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` image; ``[y, x]`` is DM CCD pixel ``(x, y)``.

    Raises
    ------
    InputError
        Missing segments, malformed or inconsistent ``DATASEC``/``DETSEC``,
        sections that do not tile the detector, no way to tell the layout.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.arange(4000 * 4072, dtype=float).reshape(4000, 4072)
    >>> bool(np.array_equal(assemble_raw(make_raw_hdulist(img, "R02_S02")), img))
    True
    """
    if overscan not in OVERSCAN_MODES:
        raise InputError(f"unknown overscan mode {overscan!r}", expected="None, 'mean' or 'row'")
    hdul, path, close = _open(path_or_hdulist)
    try:
        return _assemble(hdul, path, overscan, detector, int(overscan_skip), dtype)
    finally:
        if close:
            hdul.close()


def _assemble(hdul, path, overscan, detector, skip, dtype):
    segments = {}
    for hdu in hdul[1:]:
        m = _SEGMENT_RE.match(str(hdu.header.get("EXTNAME", hdu.name)).strip())
        if m and hdu.is_image:
            segments["C" + m[1]] = hdu
    if not segments:
        raise InputError("no SegmentNN image extensions", path=path,
                         expected="a raw LSSTCam file with 16 segments")
    known = _identify(hdul, detector, path)
    ctype = known.type if isinstance(known, Detector) else known
    if ctype is not None:
        expected = sorted(a.name for a in ctype.amps)
        missing = [n for n in expected if n not in segments]
        if missing:
            raise InputError("missing segment(s) " + ", ".join("Segment" + n[1:] for n in missing),
                             path=path, expected=f"{len(expected)} segments")
        extra = [n for n in segments if n not in expected]
        if extra:
            raise InputError("unexpected segment(s) " + ", ".join("Segment" + n[1:] for n in extra),
                             path=path, expected=f"the {len(expected)} segments of a {ctype.name} CCD")
    # detector size: header, else the table
    size_text = hdul[0].header.get("DETSIZE") or next(
        (h.header.get("DETSIZE") for h in segments.values() if h.header.get("DETSIZE")), None)
    if size_text:
        x1, x2, y1, y2 = parse_section(size_text, "DETSIZE", None, path)
        nx, ny = abs(x2 - x1) + 1, abs(y2 - y1) + 1
    elif ctype is not None:
        nx, ny = ctype.nx, ctype.ny
    else:
        raise InputError("no DETSIZE and no way to tell the detector", path=path,
                         expected="DETSIZE, RAFTBAY/CCDSLOT or LSST_NUM in the header, "
                                  "or the detector argument")
    out = np.empty((ny, nx), dtype=dtype)
    covered = 0
    boxes = []
    for name, hdu in segments.items():
        where = hdu.header.get("EXTNAME", name)
        data = hdu.data
        if data is None or data.ndim != 2:
            raise InputError(f"{where} has no 2-d image", path=path)
        hdr = hdu.header
        fallback = amp_sections(ctype, _amp_of(ctype, name)) if ctype is not None else None
        secs = {}
        for key in ("DATASEC", "DETSEC"):
            val = hdr.get(key)
            if val is None:
                if fallback is None:
                    raise InputError(f"{where} has no {key} and the detector is unknown", path=path,
                                     expected="DATASEC/DETSEC cards, or RAFTBAY/CCDSLOT in the primary "
                                              "header, or the detector argument")
                val = fallback[key]
            secs[key] = parse_section(val, key, where, path)
        dx1, dx2, dy1, dy2 = secs["DATASEC"]
        if dx1 > dx2 or dy1 > dy2:
            raise InputError(f"reversed DATASEC {hdr.get('DATASEC')!r} in {where}", path=path,
                             expected="increasing ranges (flips belong in DETSEC)")
        if dx2 > data.shape[1] or dy2 > data.shape[0]:
            raise InputError(f"DATASEC {_fmt(dx1, dx2, dy1, dy2)} in {where} is outside the "
                             f"{data.shape[1]} x {data.shape[0]} segment", path=path)
        tx1, tx2, ty1, ty2 = secs["DETSEC"]
        w, h = dx2 - dx1 + 1, dy2 - dy1 + 1
        if (abs(tx2 - tx1) + 1, abs(ty2 - ty1) + 1) != (w, h):
            raise InputError(f"DETSEC {_fmt(tx1, tx2, ty1, ty2)} and DATASEC {_fmt(dx1, dx2, dy1, dy2)} "
                             f"of {where} differ in size", path=path)
        cx0, cx1 = min(tx1, tx2) - 1, max(tx1, tx2)  # 0-based half-open, camera frame
        cy0, cy1 = min(ty1, ty2) - 1, max(ty1, ty2)
        if cx1 > nx or cy1 > ny:
            raise InputError(f"DETSEC {_fmt(tx1, tx2, ty1, ty2)} of {where} is outside the "
                             f"{nx} x {ny} detector", path=path)
        block = data[dy1 - 1:dy2, dx1 - 1:dx2].astype(dtype)
        if overscan in ("mean", "row"):
            block -= _overscan_level(hdr, data, secs["DATASEC"], overscan, skip, where, path, dtype)
        if tx1 > tx2:
            block = block[:, ::-1]
        if not ty1 > ty2:  # DM = camera frame flipped in y
            block = block[::-1, :]
        out[ny - cy1:ny - cy0, cx0:cx1] = block
        covered += w * h
        boxes.append((cx0, cx1, cy0, cy1, where))
    if covered != nx * ny or _overlap(boxes):
        raise InputError("segment DETSECs do not tile the detector exactly "
                         f"({covered} of {nx * ny} pixels; missing or overlapping segments)",
                         path=path)
    return out


def _amp_of(ctype: CcdType, name: str) -> Amplifier:
    for a in ctype.amps:
        if a.name == name:
            return a
    raise InputError(f"no amplifier {name} in a {ctype.name} CCD")


def _overlap(boxes) -> bool:
    for i, (a0, a1, b0, b1, _) in enumerate(boxes):
        for c0, c1, d0, d1, _ in boxes[i + 1:]:
            if a0 < c1 and c0 < a1 and b0 < d1 and d0 < b1:
                return True
    return False


def _overscan_level(hdr, data, datasec, mode, skip, where, path, dtype):
    dx1, dx2, dy1, dy2 = datasec
    bias = hdr.get("BIASSEC")
    if bias:
        bx1, bx2, by1, by2 = parse_section(bias, "BIASSEC", where, path)
        cols = slice(min(bx1, bx2) - 1, max(bx1, bx2))
        rows_all = slice(min(by1, by2) - 1, max(by1, by2))
    else:
        cols = slice(dx2 + skip, data.shape[1])
        rows_all = slice(dy1 - 1, dy2)
    region = data[:, cols].astype(dtype)
    if region.shape[1] == 0:
        raise InputError(f"{where} has no serial overscan columns", path=path,
                         expected="columns after DATASEC, or a BIASSEC card")
    if mode == "mean":
        return float(region[rows_all].mean())
    rows = region[dy1 - 1:dy2]
    if rows.shape[0] != dy2 - dy1 + 1:
        raise InputError(f"{where}: the overscan does not cover every data row", path=path)
    return rows.mean(axis=1)[:, None]


# --------------------------------------------------------------------------- writing
def _levels(overscan_level, names: Sequence[str]) -> dict[str, float]:
    if isinstance(overscan_level, Mapping):
        missing = [n for n in names if n not in overscan_level]
        if missing:
            raise InputError("overscan_level has no value for " + ", ".join(missing))
        return {n: float(overscan_level[n]) for n in names}
    arr = np.asarray(overscan_level, dtype=float)
    if arr.ndim == 0:
        return {n: float(arr) for n in names}
    if arr.shape != (len(names),):
        raise InputError(f"overscan_level has {arr.size} values",
                         expected=f"a scalar, a dict by amplifier or {len(names)} values "
                                  "in amp_names() order")
    return dict(zip(names, arr.tolist()))


def make_raw_hdulist(image, detector: str | Detector, overscan_level=0.0, read_noise: float = 0.0,
                     rng=None, header_template=None, dtype=None) -> fits.HDUList:
    """Split an assembled DM image into a raw-like 16-segment HDUList (inverse of assembly).

    Each segment gets serial prescan, the data, serial overscan and parallel
    overscan in the real layout (ITL: 3 + 509 + 64 columns, 2000 + 48 rows;
    E2V: 10 + 512 + 54, 2002 + 46), headers ``DATASEC``, ``DETSEC``,
    ``DETSIZE``, ``DTV*``/``DTM*`` as the camera writes them, in the real
    extension order (``Segment10`` .. ``Segment17``, ``Segment07`` ..
    ``Segment00``). The primary header has ``RAFTBAY``, ``CCDSLOT``,
    ``LSST_NUM``, ``DETSIZE``, ``INSTRUME`` and ``TSTAND``.

    Parameters
    ----------
    image : array_like
        ``(ny, nx)`` DM-convention image of the detector.
    detector : str or Detector
        Which CCD (sets the layout and the header cards).
    overscan_level : float, dict or sequence
        Bias level added to every pixel of a segment (data and overscan): one
        value, ``{amp: level}``, or one value per amplifier in ``amp_names()`` order.
    read_noise : float
        Standard deviation of Gaussian noise added to every raw pixel (ADU).
    rng : numpy.random.Generator or int, optional
        Random generator (or seed) for the noise.
    header_template : astropy.io.fits.Header or dict, optional
        Extra primary-header cards (e.g. ``BOTXCAM``, ``EXPTIME``); they win
        over the defaults.
    dtype : numpy dtype, optional
        Pixel type; default: the image's float type, int32 for integer images.
        Integer types round.

    Returns
    -------
    astropy.io.fits.HDUList

    Examples
    --------
    >>> import numpy as np
    >>> hdul = make_raw_hdulist(np.zeros((4004, 4096)), "R22_S11", overscan_level=1000.0)
    >>> hdul[1].name, hdul[1].header["DATASEC"], hdul[1].header["DETSEC"], hdul[1].data.shape
    ('Segment10', '[11:522,1:2002]', '[512:1,1:2002]', (2048, 576))
    """
    d = get_camera().detector(detector)
    t = d.type
    img = np.asarray(image)
    if img.shape != d.shape:
        raise InputError(f"image is {img.shape[1]} x {img.shape[0]} pixels",
                         expected=f"{d.nx} x {d.ny} for {d.name} ({d.vendor})")
    if dtype is None:
        dtype = img.dtype if img.dtype.kind == "f" else np.dtype(np.int32)
    dtype = np.dtype(dtype)
    levels = _levels(overscan_level, d.amp_names)
    if read_noise and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    primary = fits.PrimaryHDU()
    ph = primary.header
    ph["INSTRUME"] = ("lsstCam", "Instrument")
    ph["TSTAND"] = ("BOT", "Camera test stand")
    ph["RAFTBAY"] = (d.raft, "The RAFT Bay")
    ph["CCDSLOT"] = (d.sensor, "The CCD Slot")
    ph["LSST_NUM"] = (d.serial, "LSST Assigned CCD Number")
    ph["DETSIZE"] = _fmt(1, d.nx, 1, d.ny)
    ph["IMGTYPE"] = ("FLAT", "BIAS, DARK, FLAT, SPOT, ...")
    ph["CCDGAIN"] = (1.0, "Rough guess at overall system gain (e-/DNB)")
    from .fileio import provenance_cards

    for k, v in provenance_cards(SIMULATD=True).items():
        ph[k[:8]] = v
    if header_template is not None:
        for k, v in (header_template.items() if hasattr(header_template, "items") else header_template):
            if k in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND") or k.startswith("NAXIS"):
                continue
            ph[k] = v
    rw, rh = t.raw_size
    dx0, dy0, w, h = t.data
    hdus = [primary]
    for a in t.amps:  # table order is the raw files' extension order
        raw = np.full((rh, rw), levels[a.name], dtype=np.float64)
        block = img[a.slices].astype(np.float64)
        if a.flip_x:
            block = block[:, ::-1]
        if a.flip_y:
            block = block[::-1, :]
        raw[dy0:dy0 + h, dx0:dx0 + w] += block
        if read_noise:
            raw += rng.normal(0.0, read_noise, raw.shape)
        if dtype.kind in "iu":
            raw = np.rint(raw)
        hdu = fits.ImageHDU(raw.astype(dtype), name=a.extname)
        secs = amp_sections(t, a)
        hh = hdu.header
        hh["HEADVER"] = (1, "Version number of header")
        hh["CHANNEL"] = int(a.hdu)
        hh["EXTNAME"] = a.extname
        hh["CCDSUM"] = "1 1"
        for key in ("DATASEC", "DETSEC", "DETSIZE"):
            hh[key] = secs[key]
        tx1, tx2, ty1, ty2 = parse_section(secs["DETSEC"])
        hh["DTV1"] = (tx1 + dx0 + 1 if tx1 > tx2 else tx1 - dx0 - 1, "detector transformation vector")
        hh["DTV2"] = (ty1 + dy0 + 1 if ty1 > ty2 else ty1 - dy0 - 1, "detector transformation vector")
        hh["DTM1_1"] = (-1.0 if tx1 > tx2 else 1.0, "detector transformation matrix")
        hh["DTM2_2"] = (-1.0 if ty1 > ty2 else 1.0, "detector transformation matrix")
        hh["DTM1_2"] = (0.0, "detector transformation matrix")
        hh["DTM2_1"] = (0.0, "detector transformation matrix")
        hh["BIASLVL"] = (levels[a.name], "simulated bias level (ADU)")
        hdus.append(hdu)
    return fits.HDUList(hdus)
