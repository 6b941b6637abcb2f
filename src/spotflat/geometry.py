"""LSSTCam geometry: amplifier, CCD and focal-plane frames and the transforms between them.

The camera model is built from a compact table packaged with spotflat
(``spotflat/data/lsstcam_geometry.json``), generated from the obs_lsst policy
files by ``scripts/make_geometry_table.py``; the LSST stack is not needed.

Frames (DESIGN.md section 3):

``amp``
    Trimmed pixel of one segment ``C00``..``C17`` (no prescan/overscan), origin
    at the read-out corner, axes as the raw segment array lays them out
    (column = x, row = y).
``ccd``
    The assembled detector in the LSST DM convention: pixel centres at
    integers, ``(0, 0)`` the centre of the lower-left pixel, so a CCD covers
    ``-0.5 <= x < nx - 0.5``. ITL 4072 x 4000, E2V 4096 x 4004.
``focal``
    DM ``FOCAL_PLANE`` in mm: ``focal = offset + R(yaw) @ ((ccd - refpos) * pixel_size)``
    where ``offset`` is the raft offset plus the raft-yaw-rotated CCD offset and
    ``yaw`` the CCD yaw plus the raft yaw (corner rafts), as in obs_lsst.
``bot``
    The test stand's projector position; see :mod:`spotflat.projector`.

Every transform takes numpy arrays (any shape) and returns arrays of the same
shape; scalars in give scalars out.

Examples
--------
>>> from spotflat.geometry import ccd_to_focal, focal_to_detector, amp_to_ccd
>>> ccd_to_focal("R22_S11", 2047.5, 2001.5)
(0.0, 0.0)
>>> focal_to_detector(42.25, -296.25)
('R02_S02', 2036.5, 2000.5)
>>> amp_to_ccd("R22_S11", "C10", 0, 0)
(511.0, 4003.0)
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError

__all__ = [
    "Amplifier",
    "CcdType",
    "Detector",
    "Camera",
    "get_camera",
    "load_camera",
    "ccd_shape",
    "vendor",
    "amp_names",
    "amp_slices",
    "amp_of_pixel",
    "amp_index_map",
    "amp_boundaries",
    "distance_to_boundary",
    "amp_to_ccd",
    "ccd_to_amp",
    "ccd_to_focal",
    "focal_to_ccd",
    "focal_to_detector",
    "detector_outline",
    "bot_to_focal",
    "focal_to_bot",
    "assemble_raw",
    "make_raw_hdulist",
    "TABLE_NAME",
]

#: File name of the packaged geometry table inside ``spotflat/data``.
TABLE_NAME = "lsstcam_geometry.json"

_BOUNDARY_KINDS = ("amp", "midline", "edge", "any")


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Amplifier:
    """One amplifier (segment) of a CCD type and where it sits in the DM CCD image.

    Attributes
    ----------
    name : str
        ``C00`` .. ``C17``; the raw extension is ``Segment`` + the two digits.
    hdu : int
        HDU number in obs_lsst's policy (raw files list the segments in
        table order: C10..C17 then C07..C00).
    ix, iy : int
        Column and row of the amplifier in the grid of amplifiers.
    flip_x, flip_y : bool
        Whether the raw data are reversed in x / y when placed in the DM image.
    x0, y0 : int
        DM CCD pixel of the amplifier block's lower-left corner.
    nx, ny : int
        Trimmed data size in pixels.
    """

    name: str
    hdu: int
    ix: int
    iy: int
    flip_x: bool
    flip_y: bool
    x0: int
    y0: int
    nx: int
    ny: int

    @property
    def extname(self) -> str:
        """The raw FITS extension name, e.g. ``Segment10``."""
        return "Segment" + self.name[1:]

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(y-slice, x-slice)`` of the amplifier in the assembled DM image."""
        return slice(self.y0, self.y0 + self.ny), slice(self.x0, self.x0 + self.nx)


@dataclass(frozen=True)
class CcdType:
    """A kind of CCD: size, raw segment layout and amplifier arrangement.

    Attributes
    ----------
    name : str
        obs_lsst type name: ``ITL``, ``E2V``, ``ITL_G`` (guider), ``ITL_WF`` (wavefront).
    vendor : str
        ``"ITL"`` or ``"E2V"``.
    kind : str
        ``"science"``, ``"guider"`` or ``"wavefront"``.
    nx, ny : int
        Assembled CCD size in pixels.
    refpos : tuple of float
        CCD pixel placed at the detector's focal-plane offset.
    pixel_size : float
        Pixel size in mm.
    raw_size : tuple of int
        ``(nx, ny)`` of one raw segment array.
    data, serial_prescan, serial_overscan, parallel_overscan : tuple of int
        ``(x0, y0, nx, ny)`` of each region in a raw segment (0-based).
    amps : tuple of Amplifier
        In raw-file order.
    """

    name: str
    vendor: str
    kind: str
    nx: int
    ny: int
    refpos: tuple[float, float]
    pixel_size: float
    raw_size: tuple[int, int]
    data: tuple[int, int, int, int]
    serial_prescan: tuple[int, int, int, int]
    serial_overscan: tuple[int, int, int, int]
    parallel_overscan: tuple[int, int, int, int]
    amps: tuple[Amplifier, ...]

    @property
    def amp_nx(self) -> int:
        """Width of one amplifier's data block (pixels)."""
        return self.data[2]

    @property
    def amp_ny(self) -> int:
        """Height of one amplifier's data block (pixels)."""
        return self.data[3]

    @functools.cached_property
    def amp_grid(self) -> np.ndarray:
        """``(n_rows, n_cols)`` array of amplifier indices (into :attr:`amps`) by grid cell."""
        ncol = max(a.ix for a in self.amps) + 1
        nrow = max(a.iy for a in self.amps) + 1
        grid = np.full((nrow, ncol), -1, dtype=np.intp)
        for i, a in enumerate(self.amps):
            grid[a.iy, a.ix] = i
        return grid


@dataclass(frozen=True, eq=False)
class Detector:
    """One CCD of the camera and its place on the focal plane.

    Attributes
    ----------
    name : str
        ``R22_S11`` style (corner rafts: ``R00_SG0``, ``R00_SW1``).
    id : int
        obs_lsst detector number (0..188 science, 189..204 corner sensors).
    raft, sensor : str
        ``R22``, ``S11``.
    type : CcdType
        Size, raw layout and amplifiers.
    serial : str
        The CCD's serial number (``LSST_NUM``).
    offset : tuple of float
        Focal-plane position (mm) of :attr:`refpos`.
    yaw : float
        Rotation in the focal plane (degrees, counter-clockwise).
    """

    name: str
    id: int
    raft: str
    sensor: str
    type: CcdType = field(repr=False)
    serial: str
    offset: tuple[float, float]
    yaw: float
    _p2f: np.ndarray = field(repr=False, compare=False)
    _f2p: np.ndarray = field(repr=False, compare=False)

    vendor = property(lambda self: self.type.vendor, doc='``"ITL"`` or ``"E2V"``.')
    kind = property(lambda self: self.type.kind, doc='``"science"``, ``"guider"`` or ``"wavefront"``.')
    nx = property(lambda self: self.type.nx, doc="Width in pixels.")
    ny = property(lambda self: self.type.ny, doc="Height in pixels.")
    pixel_size = property(lambda self: self.type.pixel_size, doc="Pixel size (mm).")
    refpos = property(lambda self: self.type.refpos, doc="Reference pixel (at :attr:`offset`).")
    shape = property(lambda self: (self.type.ny, self.type.nx), doc="``(ny, nx)``.")

    @property
    def amps(self) -> tuple[Amplifier, ...]:
        """The amplifiers, in raw-file order."""
        return self.type.amps

    @property
    def amp_names(self) -> list[str]:
        """Amplifier names, sorted (``C00`` .. ``C07``, ``C10`` .. ``C17``)."""
        return sorted(a.name for a in self.type.amps)

    def amp(self, name: str) -> Amplifier:
        """The :class:`Amplifier` called ``name`` (``C10`` or ``Segment10``).

        Raises
        ------
        InputError
            For an unknown amplifier name.
        """
        key = str(name).strip().upper()
        if key.startswith("SEGMENT"):
            key = "C" + key[7:]
        for a in self.type.amps:
            if a.name == key:
                return a
        raise InputError(f"unknown amplifier {name!r} for {self.name}",
                         expected="one of " + ", ".join(self.amp_names))

    @property
    def pixel_to_focal_matrix(self) -> np.ndarray:
        """2 x 3 affine matrix: ``focal = M[:, :2] @ (x, y) + M[:, 2]`` (mm)."""
        return self._p2f.copy()

    @property
    def focal_to_pixel_matrix(self) -> np.ndarray:
        """2 x 3 affine matrix: ``ccd = M[:, :2] @ (fx, fy) + M[:, 2]`` (pixels)."""
        return self._f2p.copy()


def _rotation(yaw_deg: float) -> tuple[float, float]:
    # exact cos/sin for multiples of 90 degrees so transforms stay exact
    q = yaw_deg / 90.0
    if q == int(q):
        return [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][int(q) % 4]
    r = math.radians(yaw_deg)
    return math.cos(r), math.sin(r)


def _affines(ctype: CcdType, offset, yaw) -> tuple[np.ndarray, np.ndarray]:
    c, s = _rotation(yaw)
    p = ctype.pixel_size
    rx, ry = ctype.refpos
    lin = np.array([[c * p, -s * p], [s * p, c * p]])
    p2f = np.empty((2, 3))
    p2f[:, :2] = lin
    p2f[:, 2] = np.asarray(offset) - lin @ np.array([rx, ry])
    inv = np.array([[c / p, s / p], [-s / p, c / p]])
    f2p = np.empty((2, 3))
    f2p[:, :2] = inv
    f2p[:, 2] = np.array([rx, ry]) - inv @ np.asarray(offset)
    return p2f, f2p


class Camera:
    """The LSSTCam model: detectors, their CCD types and the focal-plane lookup.

    Build it with :func:`get_camera` (the packaged table, cached) or
    :func:`load_camera` (another table file).

    Parameters
    ----------
    table : dict
        A geometry table as written by ``scripts/make_geometry_table.py``.

    Examples
    --------
    >>> cam = get_camera()
    >>> len(cam.science_detectors), len(cam.detectors)
    (189, 205)
    >>> d = cam.detector("R22_S11")
    >>> d.vendor, d.nx, d.ny, d.pixel_size
    ('E2V', 4096, 4004, 0.01)
    """

    def __init__(self, table: dict) -> None:
        try:
            self.types = {name: self._make_type(name, t) for name, t in table["ccd_types"].items()}
            cols = table["detector_columns"]
            dets = {}
            for row in table["detectors"]:
                r = dict(zip(cols, row))
                ctype = self.types[r["type"]]
                offset = (float(r["offset_x"]), float(r["offset_y"]))
                p2f, f2p = _affines(ctype, offset, float(r["yaw"]))
                dets[r["name"]] = Detector(r["name"], int(r["id"]), r["raft"], r["sensor"], ctype,
                                           str(r["serial"]), offset, float(r["yaw"]), p2f, f2p)
            self.rafts = {k: dict(v) for k, v in table["rafts"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed geometry table ({exc})") from exc
        self._dets = dets
        self.table = table

    @staticmethod
    def _make_type(name: str, t: dict) -> CcdType:
        dx0, dy0, w, h = t["data"]
        amps = []
        for row in t["amps"]:
            a = dict(zip(t["amp_columns"], row))
            amps.append(Amplifier(a["name"], int(a["hdu"]), int(a["ix"]), int(a["iy"]),
                                  bool(a["flip_x"]), bool(a["flip_y"]),
                                  int(a["ix"]) * w, int(a["iy"]) * h, w, h))
        return CcdType(name, t["vendor"], t["kind"], int(t["nx"]), int(t["ny"]),
                       tuple(t["refpos"]), float(t["pixel_size"][0]), tuple(t["raw_size"]),
                       tuple(t["data"]), tuple(t["serial_prescan"]), tuple(t["serial_overscan"]),
                       tuple(t["parallel_overscan"]), tuple(amps))

    # -- detectors -------------------------------------------------------------
    @property
    def detectors(self) -> list[str]:
        """All detector names, by obs_lsst detector number."""
        return list(self._dets)

    @property
    def science_detectors(self) -> list[str]:
        """The 189 science CCDs."""
        return [n for n, d in self._dets.items() if d.kind == "science"]

    def __len__(self) -> int:
        return len(self._dets)

    def __iter__(self) -> Iterator[Detector]:
        return iter(self._dets.values())

    def __contains__(self, name: object) -> bool:
        try:
            self.detector(name)  # type: ignore[arg-type]
        except InputError:
            return False
        return True

    def detector(self, name: "str | Detector") -> Detector:
        """The :class:`Detector` called ``name``.

        Parameters
        ----------
        name : str or Detector
            ``R22_S11``; ``R22S11``, ``r22/s11`` and ``R22-S11`` are accepted too.

        Raises
        ------
        InputError
            For an unknown detector name.
        """
        if isinstance(name, Detector):
            return name
        key = re.sub(r"[\s/\-]+", "_", str(name).strip().upper())
        m = re.fullmatch(r"(R\d\d)_?(S[GW]?\d+)", key)
        if m:
            key = f"{m[1]}_{m[2]}"
        try:
            return self._dets[key]
        except KeyError:
            raise InputError(f"unknown detector {name!r}",
                             expected="an LSSTCam detector name like R22_S11 (rafts R01..R43, "
                                      "sensors S00..S22; corner rafts SG0, SG1, SW0, SW1)") from None

    # -- focal plane -> detector --------------------------------------------------
    @functools.cached_property
    def _lookup(self) -> dict:
        """Tables telling which detector covers each focal-plane position.

        Every detector is an axis-aligned rectangle (yaws are multiples of 90
        degrees), so the detector edges cut each axis into intervals, and each
        (x interval, y interval) rectangle lies inside one detector or none. A
        uniform grid of one-pixel cells along each axis maps a coordinate to its
        *class* (see :func:`_axis_classes`): an interval between edges, or a run
        of cells that hold an edge. A table by (y class, x class) then gives a
        code: the detector number where the rectangle lies wholly inside one
        unrotated CCD (the fast path: pixel = focal * scale + constant), -1 where
        no CCD touches it, and otherwise (edge cells, rotated corner-raft
        sensors) a code ``>= ndet`` whose points are tested against the list of
        candidate detectors ``cands[code]``. The tables take ~0.65 MB: unlike one
        fine 2-D grid over the whole plane, they stay in the L2 cache.
        """
        dets = list(self._dets.values())
        ndet = len(dets)
        boxes = np.array([(ox.min(), ox.max(), oy.min(), oy.max())
                          for ox, oy in (detector_outline(d) for d in dets)])
        scale = 1.0 / dets[0].pixel_size
        cell = 1.0 / scale  # one pixel: the cell index then comes from focal * scale, the pixel
        margin = 1e-6  # mm = 1e-4 pixel, far above rounding errors: fast cells stay exact
        xlo, xmap, xr = _axis_classes(boxes[:, :2].ravel(), cell, margin)
        ylo, ymap, yr = _axis_classes(boxes[:, 2:].ravel(), cell, margin)
        # (detector, class): the box touches the class's range / holds it wholly
        x0, x1, y0, y1 = (b[:, None] for b in boxes.T)
        touch_x = (x0 - margin < xr[:, 1]) & (x1 + margin > xr[:, 0])
        touch_y = (y0 - margin < yr[:, 1]) & (y1 + margin > yr[:, 0])
        in_x = (x0 + margin <= xr[:, 0]) & (xr[:, 1] <= x1 - margin)
        in_y = (y0 + margin <= yr[:, 0]) & (yr[:, 1] <= y1 - margin)
        touch = touch_y[:, :, None] & touch_x[:, None, :]
        count = touch.sum(axis=0)
        first = touch.argmax(axis=0)
        fast = np.array([d._f2p[0, 1] == 0 and d._f2p[1, 0] == 0 and d._f2p[0, 0] == scale
                         and d._f2p[1, 1] == scale for d in dets])
        iy, ix = np.indices(count.shape)
        quick = (count == 1) & fast[first] & in_y[first, iy] & in_x[first, ix]
        codes = np.where(quick, first, -1)
        lists: dict[tuple, int] = {}
        for i, j in zip(*np.nonzero((count > 0) & ~quick)):
            key = tuple(np.flatnonzero(touch[:, i, j]))  # by detector number: first hit wins
            codes[i, j] = ndet + lists.setdefault(key, len(lists))
        codes = codes.ravel()
        # candidate lists by code (rows below ndet unused), padded with -1
        cands = np.full((ndet + len(lists), max(map(len, lists), default=1)), -1, dtype=np.intp)
        for key, k in lists.items():
            cands[ndet + k, :len(key)] = key
        # fast-path constants (u, v) by table cell, NaN elsewhere; side by side, so that one
        # take fetches both
        cuv = np.full((codes.size, 2), np.nan)
        for i, d in enumerate(dets):
            cuv[codes == i] = d._f2p[:, 2]
        # by detector: f2p matrix and pixel limits; a last row of NaN for candidate -1
        params = np.array([[*d._f2p[0], *d._f2p[1], d.nx - 0.5, d.ny - 0.5] for d in dets]
                          + [[np.nan] * 8])
        # the maps in the smallest integer type that holds a table cell, to stay in cache
        small = np.int16 if codes.size <= np.iinfo(np.int16).max else np.int32
        ncol = count.shape[1]
        return {"scale": scale, "xoff": -xlo * scale, "yoff": -ylo * scale,
                "xmap": xmap.astype(small), "ymap": (ymap * ncol).astype(small),
                "codes": codes, "cuv": cuv, "ndet": ndet, "cands": cands, "params": params,
                "names": np.array([d.name for d in dets] + [None], dtype=object)}

    def focal_to_detector_index(self, x, y,
                                chunk: int = 1 << 14) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`focal_to_detector` but returns detector numbers (-1 in gaps).

        Parameters
        ----------
        x, y : array_like
            Focal-plane position (mm).
        chunk : int
            Points processed at a time (keeps temporaries in cache).

        Returns
        -------
        index : ndarray of int
            Position of the detector in :attr:`detectors`, -1 off every CCD.
        ccd_x, ccd_y : ndarray of float
            Pixel on that detector, NaN off every CCD.
        """
        x, y, _ = _xy(x, y)
        shape = x.shape
        x, y = x.ravel(), y.ravel()
        lk = self._lookup
        n = x.size
        idx = np.empty(n, dtype=np.intp)
        px = np.empty(n)
        py = np.empty(n)
        m = max(1, min(n, chunk))
        # scratch space, reused by every chunk
        buf = (np.empty((2, m), dtype=np.intp), np.empty((2, m), dtype=lk["xmap"].dtype),
               np.empty((m, 2)))
        # the few points that need the inside test go in batches of several chunks: numpy's
        # per-call overhead would cost more than their arithmetic
        batch = 8 * m
        with np.errstate(invalid="ignore"):  # NaN positions compare False, cast anyhow: fine
            for b in range(0, n, batch):
                be = min(n, b + batch)
                for s in range(b, be, m):
                    e = min(n, s + m)
                    self._locate(lk, x[s:e], y[s:e], idx[s:e], px[s:e], py[s:e], buf)
                pos = np.flatnonzero(idx[b:be] >= lk["ndet"])
                if pos.size:
                    self._resolve(lk, x[b:be], y[b:be], idx[b:be], px[b:be], py[b:be], pos)
        return idx.reshape(shape), px.reshape(shape), py.reshape(shape)

    @staticmethod
    def _locate(lk, x, y, idx, px, py, buf) -> None:
        """The fast path for one chunk: code and fast-path pixel of every point."""
        m = x.size
        ci, cell = buf[0][0, :m], buf[0][1, :m]
        cx, cy = buf[1][0, :m], buf[1][1, :m]
        # table cell of each point: class along x plus class along y (premultiplied by the
        # row length). NaN and far-away values cast to an integer off the grid (INT_MIN on
        # x86; saturated, or 0 for NaN, on ARM) that the clip sends to an end cell of the
        # axis, beyond every detector
        np.multiply(x, lk["scale"], out=px)
        np.add(px, lk["xoff"], out=ci, casting="unsafe")
        lk["xmap"].take(ci, mode="clip", out=cx)
        np.multiply(y, lk["scale"], out=py)
        np.add(py, lk["yoff"], out=ci, casting="unsafe")
        lk["ymap"].take(ci, mode="clip", out=cy)
        np.add(cx, cy, out=cell)
        lk["codes"].take(cell, mode="clip", out=idx)
        # pixel = focal * scale + c: exact where the fast path applies, NaN elsewhere
        c = lk["cuv"].take(cell, axis=0, mode="clip", out=buf[2][:m])
        px += c[:, 0]
        py += c[:, 1]

    @staticmethod
    def _resolve(lk, x, y, idx, px, py, pos) -> None:
        """Points ``pos`` (edge cells, rotated sensors): try each candidate detector in turn."""
        xs, ys = x.take(pos), y.take(pos)
        for level, cand in enumerate(lk["cands"].take(idx.take(pos), axis=0).T):
            p = lk["params"].take(cand, axis=0).T  # cand -1: the last row, NaN, never hit
            u = p[0] * xs
            u += p[1] * ys
            u += p[2]
            v = p[3] * xs
            v += p[4] * ys
            v += p[5]
            hit = u >= -0.5
            hit &= u < p[6]
            hit &= v >= -0.5
            hit &= v < p[7]
            if level == 0:
                ri = np.where(hit, cand, -1)
                ru, rv = np.where(hit, u, np.nan), np.where(hit, v, np.nan)
            else:
                hit &= ri < 0
                ri[hit], ru[hit], rv[hit] = cand[hit], u[hit], v[hit]
        idx[pos], px[pos], py[pos] = ri, ru, rv

    def focal_to_detector(self, x, y):
        """The detector and CCD pixel under each focal-plane position.

        Parameters
        ----------
        x, y : float or array_like
            DM focal-plane position (mm).

        Returns
        -------
        names : str/None or ndarray of object
            Detector name, ``None`` where the point falls in a gap or off the camera.
        ccd_x, ccd_y : float or ndarray
            CCD pixel on that detector, NaN in gaps.
        """
        xa, ya, scalar = _xy(x, y)
        idx, px, py = self.focal_to_detector_index(xa, ya)
        names = self._lookup["names"].take(idx)  # take: a little faster than fancy indexing
        if scalar:
            return names, float(px), float(py)  # a 0-d index gives the name itself
        return names, px, py


# --------------------------------------------------------------------------- loading
def load_camera(path: "str | Path") -> Camera:
    """Build a :class:`Camera` from a geometry-table JSON file.

    Parameters
    ----------
    path : str or pathlib.Path
        A table written by ``scripts/make_geometry_table.py``.
    """
    try:
        with open(path) as fh:
            table = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"not a JSON geometry table ({exc})", path=path) from exc
    return Camera(table)


@functools.lru_cache(maxsize=1)
def get_camera() -> Camera:
    """The LSSTCam model from the packaged geometry table (built once, then cached).

    Examples
    --------
    >>> get_camera() is get_camera()
    True
    >>> get_camera().detector("R02_S02").vendor
    'ITL'
    """
    text = resources.files("spotflat").joinpath("data", TABLE_NAME).read_text()
    return Camera(json.loads(text))


def _det(detector: "str | Detector") -> Detector:
    return get_camera().detector(detector)


# --------------------------------------------------------------------------- helpers
def _xy(x, y):
    """Float arrays of a matching shape and whether both inputs were scalars."""
    scalar = np.ndim(x) == 0 and np.ndim(y) == 0
    try:
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"coordinates must be numbers ({exc})") from None
    if xa.shape != ya.shape:
        try:
            xa, ya = np.broadcast_arrays(xa, ya)
        except ValueError:
            raise InputError(f"x and y have different shapes {xa.shape} and {ya.shape}") from None
    return xa, ya, scalar


def _axis_classes(edges: np.ndarray, cell: float,
                  margin: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Cut one focal-plane axis into classes of cells, for :attr:`Camera._lookup`.

    The axis is covered by uniform cells of ``cell`` mm from ``lo``; a cell is an
    *edge cell* when it lies within ``margin`` of one of ``edges``. Each maximal
    run of edge cells, and each run of other cells (an interval between edges:
    all its points are on the same side of every edge), is a class.

    Parameters
    ----------
    edges : array_like
        Positions (mm) of the detector edges along the axis.
    cell : float
        Cell size (mm).
    margin : float
        Distance (mm) from an edge within which a cell counts as an edge cell.

    Returns
    -------
    lo : float
        Position (mm) of the start of cell 0.
    classes : ndarray of intp
        Class of each cell; the first and the last cell lie beyond every edge.
    ranges : ndarray, shape (n_classes, 2)
        ``[start, end)`` (mm) of the cells of each class; the end classes reach to
        infinity, as positions off the grid are clipped onto its end cells.
    """
    edges = np.asarray(edges, dtype=float)
    lo = edges.min() - 2 * cell
    n = int(math.ceil((edges.max() - lo) / cell)) + 3
    near = np.zeros(n + 1, dtype=np.intp)  # +1 at the first cell near an edge, -1 after the last
    np.add.at(near, ((edges - margin - lo) // cell).astype(np.intp), 1)
    np.add.at(near, ((edges + margin - lo) // cell).astype(np.intp) + 1, -1)
    is_edge = np.cumsum(near[:n]) > 0
    start = np.r_[True, is_edge[1:] != is_edge[:-1]]
    bounds = np.r_[np.flatnonzero(start), n]
    ranges = lo + cell * np.c_[bounds[:-1], bounds[1:]]
    ranges[0, 0], ranges[-1, 1] = -np.inf, np.inf
    return lo, np.cumsum(start) - 1, ranges


def _out(scalar: bool, *arrays):
    if scalar:
        return tuple(float(a) for a in arrays)
    return arrays


def _check_range(x: np.ndarray, lo: float, hi: float, what: str, axis: str, where: str) -> None:
    if x.size == 0:
        return
    xmin, xmax = np.min(x), np.max(x)
    if np.isnan(xmin) or np.isnan(xmax):  # NaN passes through, only real numbers are checked
        xmin, xmax = np.nanmin(x) if np.isfinite(x).any() else lo, np.nanmax(x) if np.isfinite(x).any() else hi
    tol = 1e-9
    if xmin < lo - tol or xmax > hi + tol:
        bad = x[(x < lo - tol) | (x > hi + tol)]
        raise InputError(f"{what} {axis} = {bad.flat[0]:g} is outside {where} "
                         f"({bad.size} point(s) out of range)",
                         expected=f"{lo:g} <= {axis} <= {hi:g}, or check=False to extrapolate")


def _affine(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # skip the zero terms of axis-aligned detectors: half the work of a general affine
    if m[0, 1] == 0.0 and m[1, 0] == 0.0:
        u = x * m[0, 0]
        u += m[0, 2]
        v = y * m[1, 1]
        v += m[1, 2]
    elif m[0, 0] == 0.0 and m[1, 1] == 0.0:
        u = y * m[0, 1]
        u += m[0, 2]
        v = x * m[1, 0]
        v += m[1, 2]
    else:
        u = x * m[0, 0]
        u += y * m[0, 1]
        u += m[0, 2]
        v = x * m[1, 0]
        v += y * m[1, 1]
        v += m[1, 2]
    return u, v


# --------------------------------------------------------------------------- simple queries
def ccd_shape(detector: "str | Detector") -> tuple[int, int]:
    """``(ny, nx)`` of the assembled CCD image.

    Examples
    --------
    >>> ccd_shape("R02_S02"), ccd_shape("R22_S11")
    ((4000, 4072), (4004, 4096))
    """
    return _det(detector).shape


def vendor(detector: "str | Detector") -> str:
    """``"ITL"`` or ``"E2V"``.

    Examples
    --------
    >>> vendor("R02_S02"), vendor("R22_S11")
    ('ITL', 'E2V')
    """
    return _det(detector).vendor


def amp_names(detector: "str | Detector") -> list[str]:
    """Amplifier names, sorted: ``C00`` .. ``C07``, ``C10`` .. ``C17`` (16; 8 for wavefront sensors)."""
    return _det(detector).amp_names


def amp_slices(detector: "str | Detector") -> dict[str, tuple[slice, slice]]:
    """``{amp: (y-slice, x-slice)}`` of each amplifier in the assembled DM image.

    Examples
    --------
    >>> amp_slices("R02_S02")["C10"]
    (slice(2000, 4000, None), slice(0, 509, None))
    """
    d = _det(detector)
    return {a.name: a.slices for a in sorted(d.amps, key=lambda a: a.name)}


def amp_index_map(detector: "str | Detector") -> np.ndarray:
    """``(ny, nx)`` int8 image: index into :func:`amp_names` of the amplifier of every pixel."""
    d = _det(detector)
    out = np.full(d.shape, -1, dtype=np.int8)
    names = d.amp_names
    for a in d.amps:
        out[a.slices] = names.index(a.name)
    return out


def _amp_cells(d: Detector, x: np.ndarray, y: np.ndarray):
    """Grid cell (index into d.amps, -1 off the CCD) of each CCD position."""
    t = d.type
    grid = t.amp_grid
    cx = np.floor((x + 0.5) / t.amp_nx)
    cy = np.floor((y + 0.5) / t.amp_ny)
    on = (cx >= 0) & (cx < grid.shape[1]) & (cy >= 0) & (cy < grid.shape[0])
    cell = np.full(x.shape, -1, dtype=np.intp)
    cell[on] = grid[cy[on].astype(np.intp), cx[on].astype(np.intp)]
    return cell


def amp_of_pixel(detector: "str | Detector", x, y):
    """The amplifier each CCD position falls in (``""`` off the CCD).

    Parameters
    ----------
    detector : str or Detector
    x, y : float or array_like
        DM CCD pixel coordinates.

    Returns
    -------
    str or ndarray of str

    Examples
    --------
    >>> amp_of_pixel("R22_S11", [0, 4095, 10], [0, 4003, -5]).tolist()
    ['C00', 'C17', '']
    """
    d = _det(detector)
    xa, ya, scalar = _xy(x, y)
    cell = _amp_cells(d, xa, ya)
    names = np.array([a.name for a in d.amps] + [""])
    out = names[cell]
    return str(out) if scalar else out


def amp_boundaries(detector: "str | Detector") -> dict[str, list[tuple[float, float, float, float]]]:
    """Boundary lines of a CCD as ``(x0, y0, x1, y1)`` segments in CCD pixels.

    Returns
    -------
    dict
        ``"amp"``: the seams between neighbouring amplifiers of a row;
        ``"midline"``: the line between the two rows of amplifiers (empty for
        one-row wavefront sensors); ``"edge"``: the four CCD edges. Lines lie on
        pixel edges (half-integers).
    """
    d = _det(detector)
    t = d.type
    nrow, ncol = t.amp_grid.shape
    lo, hx, hy = -0.5, d.nx - 0.5, d.ny - 0.5
    seams = [(k * t.amp_nx - 0.5, r * t.amp_ny - 0.5, k * t.amp_nx - 0.5, (r + 1) * t.amp_ny - 0.5)
             for r in range(nrow) for k in range(1, ncol)]
    mid = [(lo, k * t.amp_ny - 0.5, hx, k * t.amp_ny - 0.5) for k in range(1, nrow)]
    edge = [(lo, lo, hx, lo), (hx, lo, hx, hy), (hx, hy, lo, hy), (lo, hy, lo, lo)]
    return {"amp": seams, "midline": mid, "edge": edge}


def distance_to_boundary(detector: "str | Detector", x, y, kind: str = "any"):
    """Distance (pixels) from CCD positions to the nearest boundary of a kind.

    Parameters
    ----------
    detector : str or Detector
    x, y : float or array_like
        DM CCD pixel coordinates.
    kind : {"amp", "midline", "edge", "any"}
        ``"amp"``: seams between neighbouring amplifiers (serial direction);
        ``"midline"``: the line between the two amplifier rows; ``"edge"``: the
        CCD's outer edges; ``"any"``: the nearest of them all, i.e. the
        distance to the edge of the pixel's own amplifier.

    Returns
    -------
    float or ndarray
        Distance from the position to the boundary line (pixel 0 is 0.5 from
        the edge). NaN off the CCD; ``inf`` when the CCD has no such boundary.

    Examples
    --------
    >>> distance_to_boundary("R22_S11", [0, 511, 700], [5, 2001, 2002], kind="any").tolist()
    [0.5, 0.5, 0.5]
    >>> float(distance_to_boundary("R22_S11", 700, 2002, kind="amp"))
    188.5
    """
    if kind not in _BOUNDARY_KINDS:
        raise InputError(f"unknown boundary kind {kind!r}", expected=" or ".join(_BOUNDARY_KINDS))
    d = _det(detector)
    t = d.type
    xa, ya, scalar = _xy(x, y)
    xa, ya = np.atleast_1d(xa), np.atleast_1d(ya)
    nrow, ncol = t.amp_grid.shape
    res = np.full(xa.shape, np.inf)
    if kind in ("amp", "any") and ncol > 1:
        k = np.clip(np.rint((xa + 0.5) / t.amp_nx), 1, ncol - 1)
        res = np.minimum(res, np.abs(xa + 0.5 - k * t.amp_nx))
    if kind in ("midline", "any") and nrow > 1:
        k = np.clip(np.rint((ya + 0.5) / t.amp_ny), 1, nrow - 1)
        res = np.minimum(res, np.abs(ya + 0.5 - k * t.amp_ny))
    if kind in ("edge", "any"):
        e = np.minimum(np.minimum(xa + 0.5, d.nx - 0.5 - xa), np.minimum(ya + 0.5, d.ny - 0.5 - ya))
        res = np.minimum(res, e)
    off = ~((xa >= -0.5) & (xa < d.nx - 0.5) & (ya >= -0.5) & (ya < d.ny - 0.5))
    res[off] = np.nan
    return float(res[0]) if scalar else res


def detector_outline(detector: "str | Detector") -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane corners (mm) of a CCD's outer edge, closed (5 points), for plotting.

    Examples
    --------
    >>> fx, fy = detector_outline("R22_S11")
    >>> round(float(fx.max() - fx.min()), 2), round(float(fy.max() - fy.min()), 2)
    (40.96, 40.04)
    """
    d = _det(detector)
    cx = np.array([-0.5, d.nx - 0.5, d.nx - 0.5, -0.5, -0.5])
    cy = np.array([-0.5, -0.5, d.ny - 0.5, d.ny - 0.5, -0.5])
    return _affine(d._p2f, cx, cy)


# --------------------------------------------------------------------------- transforms
def amp_to_ccd(detector: "str | Detector", amp, x, y, check: bool = True):
    """Amplifier pixel -> DM CCD pixel.

    Parameters
    ----------
    detector : str or Detector
    amp : str or array_like of str
        ``C00`` .. ``C17`` (one for all points or one per point).
    x, y : float or array_like
        Trimmed amplifier pixel, origin at the read-out corner.
    check : bool
        Raise :class:`~spotflat.errors.InputError` for positions outside the
        amplifier (``-0.5 .. n - 0.5``); ``False`` extrapolates.

    Returns
    -------
    ccd_x, ccd_y : float or ndarray

    Examples
    --------
    >>> amp_to_ccd("R02_S02", "C00", 0, 0), amp_to_ccd("R02_S02", "C10", 0, 0)
    ((508.0, 0.0), (508.0, 3999.0))
    """
    d = _det(detector)
    xa, ya, scalar = _xy(x, y)
    amps = np.asarray(amp)
    if amps.ndim == 0:
        return _out(scalar, *_amp_to_ccd_one(d, d.amp(str(amps)), xa, ya, check))
    if amps.shape != xa.shape:
        raise InputError(f"{amps.size} amplifier names for {xa.size} points")
    u = np.empty(xa.shape)
    v = np.empty(xa.shape)
    for name in np.unique(amps):
        sel = amps == name
        u[sel], v[sel] = _amp_to_ccd_one(d, d.amp(str(name)), xa[sel], ya[sel], check)
    return _out(scalar, u, v)


def _amp_to_ccd_one(d: Detector, a: Amplifier, x, y, check):
    if check:
        _check_range(x, -0.5, a.nx - 0.5, f"{d.name} {a.name} amplifier pixel", "x", "the amplifier")
        _check_range(y, -0.5, a.ny - 0.5, f"{d.name} {a.name} amplifier pixel", "y", "the amplifier")
    u = a.x0 + (a.nx - 1 - x if a.flip_x else x)
    v = a.y0 + (a.ny - 1 - y if a.flip_y else y)
    return u, v


def ccd_to_amp(detector: "str | Detector", x, y, check: bool = True):
    """DM CCD pixel -> (amplifier name, amplifier pixel).

    Parameters
    ----------
    detector : str or Detector
    x, y : float or array_like
        DM CCD pixel coordinates.
    check : bool
        Raise for positions off the CCD; ``False`` gives ``""`` and NaN there.

    Returns
    -------
    amp : str or ndarray of str
    amp_x, amp_y : float or ndarray

    Examples
    --------
    >>> ccd_to_amp("R02_S02", 508.0, 3999.0)
    ('C10', 0.0, 0.0)
    """
    d = _det(detector)
    xa, ya, scalar = _xy(x, y)
    if check:
        _check_range(xa, -0.5, d.nx - 0.5, f"{d.name} CCD pixel", "x", "the CCD")
        _check_range(ya, -0.5, d.ny - 0.5, f"{d.name} CCD pixel", "y", "the CCD")
    cell = _amp_cells(d, xa, ya)
    amps = d.amps
    # per-amplifier affine ax = sx * x + cx (same for y), gathered by cell; last row: off the CCD
    sx = np.array([-1.0 if a.flip_x else 1.0 for a in amps] + [np.nan])
    cx = np.array([a.x0 + a.nx - 1 if a.flip_x else -a.x0 for a in amps] + [np.nan], dtype=float)
    sy = np.array([-1.0 if a.flip_y else 1.0 for a in amps] + [np.nan])
    cy = np.array([a.y0 + a.ny - 1 if a.flip_y else -a.y0 for a in amps] + [np.nan], dtype=float)
    names = np.array([a.name for a in amps] + [""])
    ax = sx[cell] * xa + cx[cell]
    ay = sy[cell] * ya + cy[cell]
    name = names[cell]
    if scalar:
        return str(name), float(ax), float(ay)
    return name, ax, ay


def ccd_to_focal(detector: "str | Detector", x, y, check: bool = True):
    """DM CCD pixel -> DM focal plane (mm).

    Parameters
    ----------
    detector : str or Detector
    x, y : float or array_like
        DM CCD pixel coordinates.
    check : bool
        Raise for positions off the CCD (``-0.5 .. n - 0.5``); ``False`` extrapolates.

    Returns
    -------
    focal_x, focal_y : float or ndarray

    Examples
    --------
    >>> ccd_to_focal("R02_S02", 2036.5, 2000.5)
    (42.25, -296.25)
    """
    d = _det(detector)
    xa, ya, scalar = _xy(x, y)
    if check:
        _check_range(xa, -0.5, d.nx - 0.5, f"{d.name} CCD pixel", "x", "the CCD")
        _check_range(ya, -0.5, d.ny - 0.5, f"{d.name} CCD pixel", "y", "the CCD")
    return _out(scalar, *_affine(d._p2f, xa, ya))


def focal_to_ccd(detector: "str | Detector", x, y):
    """DM focal plane (mm) -> DM CCD pixel of a given detector.

    Positions off the detector give pixels outside ``0 .. n - 1`` (no error):
    use :func:`focal_to_detector` to find which CCD a point is on.

    Examples
    --------
    >>> focal_to_ccd("R02_S02", 42.25, -296.25)
    (2036.5, 2000.5)
    """
    d = _det(detector)
    xa, ya, scalar = _xy(x, y)
    return _out(scalar, *_affine(d._f2p, xa, ya))


def focal_to_detector(x, y):
    """DM focal plane (mm) -> (detector name, CCD x, CCD y).

    Points in the gaps between CCDs, or off the camera, give ``None`` and NaN
    (no exception). Guide and wavefront sensors are included.

    Returns
    -------
    names : str/None or ndarray of object
    ccd_x, ccd_y : float or ndarray

    Examples
    --------
    >>> focal_to_detector([0.0, 21.0], [0.0, 0.0])[0].tolist()
    ['R22_S11', None]
    """
    return get_camera().focal_to_detector(x, y)


# re-exports: the projector conventions and raw assembly live in their own modules
from .projector import bot_to_focal, focal_to_bot  # noqa: E402


def __getattr__(name: str):
    # assembly imports this module, so its functions are fetched on first use
    if name in ("assemble_raw", "make_raw_hdulist"):
        from . import assembly

        return getattr(assembly, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
