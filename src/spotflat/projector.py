"""Test-stand (BOT) projector coordinates <-> focal plane, and the fitted projector map.

The BOT moves the spot projector over the focal plane and records where in
the raw header (``BOTXCAM``, ``BOTYCAM``, "position of lamp/source in camera
coordinate system", mm) and in processed-grid file names (``..._-293.2x_39.6y_...``;
spotflat takes the file-name ``x``/``y`` to be the same ``BOTXCAM``/``BOTYCAM``).
These are *not* the DM focal-plane axes: for R02_S02, whose DM centre is at
``x = 42.25, y = -296.25`` mm, a real header says ``BOTXCAM = -296.5,
BOTYCAM = 41.7``.

Conventions
-----------
A :class:`BotConvention` states ``focal = M @ (bot_x, bot_y) + offset``.
Built in:

``"ccs"`` (default)
    The camera coordinate system of LSE-349, whose x and y are swapped with
    respect to the DM focal plane (DVCS): ``focal_x = bot_y``, ``focal_y = bot_x``.
    This puts the real header above onto R02_S02 at 0.6 mm from its centre.
``"dm"``
    The position is already in DM focal-plane axes: ``focal = bot``.

Any convention can be given as a :class:`BotConvention`, as a spec string
``"y,x"`` / ``"-x,y"`` (the bot axis, with sign, feeding focal x then focal y),
or as a 2 x 3 matrix ``[[m00, m01, dx], [m10, m11, dy]]``; the default can be
changed with :func:`set_default_convention`.

Which convention a given data set used is a question for the data:
:func:`fit_projector_map` fits the affine map from projector millimetres to
the fitted grid centre ``(X0, Y0)`` of a dithered run and compares it with the
geometry's prediction for the stated convention. One exposure (or positions
on a line) cannot settle it; the fit then says so and only lists how far the
observed centre is from each hypothesis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

__all__ = [
    "BotConvention",
    "CONVENTIONS",
    "get_convention",
    "set_default_convention",
    "default_convention",
    "bot_to_focal",
    "focal_to_bot",
    "bot_to_ccd",
    "predicted_projector_map",
    "fit_projector_map",
    "ProjectorFit",
]


@dataclass(frozen=True)
class BotConvention:
    """How test-stand projector coordinates map to the DM focal plane.

    ``focal = matrix @ (bot_x, bot_y) + offset`` (mm).

    Parameters
    ----------
    name : str
    matrix : tuple of tuple of float
        2 x 2 linear part.
    offset : tuple of float
        Translation (mm).
    description : str

    Examples
    --------
    >>> c = get_convention("ccs")
    >>> c.to_focal(-296.5, 41.7)
    (41.7, -296.5)
    """

    name: str
    matrix: tuple[tuple[float, float], tuple[float, float]]
    offset: tuple[float, float] = (0.0, 0.0)
    description: str = ""

    @property
    def m(self) -> np.ndarray:
        """The linear part as a 2 x 2 array."""
        return np.array(self.matrix, dtype=float)

    def to_focal(self, bx, by):
        """Projector (mm) -> DM focal plane (mm); scalars in, scalars out."""
        bxa, bya, scalar = _xy(bx, by)
        m = self.matrix
        fx = m[0][0] * bxa + m[0][1] * bya + self.offset[0]
        fy = m[1][0] * bxa + m[1][1] * bya + self.offset[1]
        return (float(fx), float(fy)) if scalar else (fx, fy)

    def to_bot(self, fx, fy):
        """DM focal plane (mm) -> projector (mm); scalars in, scalars out."""
        fxa, fya, scalar = _xy(fx, fy)
        inv = np.linalg.inv(self.m)
        ux, uy = fxa - self.offset[0], fya - self.offset[1]
        bx = inv[0, 0] * ux + inv[0, 1] * uy
        by = inv[1, 0] * ux + inv[1, 1] * uy
        return (float(bx), float(by)) if scalar else (bx, by)

    def describe(self) -> str:
        """``focal_x = +bot_y, focal_y = +bot_x`` style text."""
        return _describe(self.m, "focal", "bot")


#: Named conventions.
CONVENTIONS: dict[str, BotConvention] = {
    "ccs": BotConvention("ccs", ((0.0, 1.0), (1.0, 0.0)), (0.0, 0.0),
                         "LSE-349 camera coordinate system: x and y swapped with respect to the "
                         "DM focal plane"),
    "dm": BotConvention("dm", ((1.0, 0.0), (0.0, 1.0)), (0.0, 0.0),
                        "already in DM focal-plane axes"),
}
_DEFAULT = [CONVENTIONS["ccs"]]


def default_convention() -> BotConvention:
    """The convention used when none is given (``"ccs"`` unless changed)."""
    return _DEFAULT[0]


def set_default_convention(convention) -> BotConvention:
    """Change the default convention for this process; returns the new default.

    Examples
    --------
    >>> old = default_convention()
    >>> set_default_convention("dm").name
    'dm'
    >>> set_default_convention(old).name
    'ccs'
    """
    _DEFAULT[0] = get_convention(convention)
    return _DEFAULT[0]


def get_convention(convention=None) -> BotConvention:
    """Turn a name, spec string, matrix or :class:`BotConvention` into a convention.

    Parameters
    ----------
    convention : None, str, BotConvention or array_like
        ``None`` (the default convention), a name in :data:`CONVENTIONS`, a
        spec ``"y,x"`` (signed bot axes feeding focal x and y), or a 2 x 2 /
        2 x 3 matrix.

    Raises
    ------
    InputError
        For an unknown name or a malformed spec or a singular matrix.

    Examples
    --------
    >>> get_convention("y,x").matrix
    ((0.0, 1.0), (1.0, 0.0))
    >>> get_convention("-x,y").describe()
    'focal_x = -bot_x, focal_y = +bot_y'
    """
    if convention is None:
        return _DEFAULT[0]
    if isinstance(convention, BotConvention):
        conv = convention
    elif isinstance(convention, str):
        key = convention.strip().lower()
        if key in CONVENTIONS:
            return CONVENTIONS[key]
        conv = _from_spec(key)
    else:
        try:
            arr = np.asarray(convention, dtype=float)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.shape not in ((2, 2), (2, 3)):
            raise InputError(f"cannot use {convention!r} as a projector convention",
                             expected="a name (" + ", ".join(CONVENTIONS) + "), a spec like 'y,x' "
                                      "or a 2x3 matrix")
        off = (float(arr[0, 2]), float(arr[1, 2])) if arr.shape == (2, 3) else (0.0, 0.0)
        conv = BotConvention("custom", ((float(arr[0, 0]), float(arr[0, 1])),
                                        (float(arr[1, 0]), float(arr[1, 1]))), off, "user matrix")
    if abs(np.linalg.det(conv.m)) < 1e-12:
        raise InputError(f"projector convention {conv.name!r} has a singular matrix")
    return conv


def _from_spec(spec: str) -> BotConvention:
    parts = [p.strip().replace("bot_", "") for p in spec.split(",")]
    rows = []
    for p in parts:
        sign = -1.0 if p.startswith("-") else 1.0
        axis = p.lstrip("+-")
        if len(parts) != 2 or axis not in ("x", "y"):
            raise InputError(f"unknown projector convention {spec!r}",
                             expected="one of " + ", ".join(CONVENTIONS) +
                                      ", or a spec like 'y,x' or '-x,y'")
        rows.append((sign, 0.0) if axis == "x" else (0.0, sign))
    return BotConvention(spec, (rows[0], rows[1]), (0.0, 0.0), f"spec {spec!r}")


def _xy(x, y):
    scalar = np.ndim(x) == 0 and np.ndim(y) == 0
    try:
        xa, ya = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad coordinates ({exc})") from None
    return xa, ya, scalar


def bot_to_focal(bx, by, convention=None):
    """Projector position (``BOTXCAM``, ``BOTYCAM`` or file-name x, y; mm) -> DM focal plane (mm).

    Parameters
    ----------
    bx, by : float or array_like
    convention : see :func:`get_convention`
        Default ``"ccs"``: ``focal_x = bot_y``, ``focal_y = bot_x``.

    Examples
    --------
    >>> bot_to_focal(-296.5, 41.7)
    (41.7, -296.5)
    >>> bot_to_focal(-296.5, 41.7, convention="dm")
    (-296.5, 41.7)
    """
    return get_convention(convention).to_focal(bx, by)


def focal_to_bot(fx, fy, convention=None):
    """DM focal plane (mm) -> projector position (mm); inverse of :func:`bot_to_focal`.

    Examples
    --------
    >>> focal_to_bot(42.25, -296.25)
    (-296.25, 42.25)
    """
    return get_convention(convention).to_bot(fx, fy)


def bot_to_ccd(bx, by, detector=None, convention=None):
    """Projector position -> (detector, CCD pixel) where the projector centre falls.

    Parameters
    ----------
    bx, by : float or array_like
    detector : str, optional
        Give pixels on this CCD (even off it); otherwise the CCD under each point.
    convention : see :func:`get_convention`

    Returns
    -------
    names, ccd_x, ccd_y
        As :func:`spotflat.geometry.focal_to_detector`.

    Examples
    --------
    >>> name, x, y = bot_to_ccd(-296.5066801033021, 41.69999486007703)
    >>> name, round(x, 1), round(y, 1)
    ('R02_S02', 1981.5, 1974.8)
    """
    from .geometry import focal_to_ccd, focal_to_detector

    fx, fy = bot_to_focal(bx, by, convention)
    if detector is None:
        return focal_to_detector(fx, fy)
    x, y = focal_to_ccd(detector, fx, fy)
    from .geometry import get_camera

    name = get_camera().detector(detector).name
    if np.ndim(x) == 0:
        return name, x, y
    return np.full(np.shape(x), name, dtype=object), x, y


def predicted_projector_map(detector, convention=None) -> tuple[np.ndarray, np.ndarray]:
    """The geometry's projector -> CCD pixel map for a convention.

    Returns
    -------
    matrix : ndarray, shape (2, 2)
        Pixels per mm: ``ccd = matrix @ (bot_x, bot_y) + offset``.
    offset : ndarray, shape (2,)
        Pixels.
    """
    from .geometry import get_camera

    d = get_camera().detector(detector)
    conv = get_convention(convention)
    f2p = d.focal_to_pixel_matrix
    lin = f2p[:, :2] @ conv.m
    off = f2p[:, :2] @ np.asarray(conv.offset) + f2p[:, 2]
    return lin, off


# --------------------------------------------------------------------------- fit
_SIGNED_PERMS = [np.array(m, dtype=float) for m in (
    [[1, 0], [0, 1]], [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[-1, 0], [0, -1]],
    [[0, 1], [1, 0]], [[0, -1], [1, 0]], [[0, 1], [-1, 0]], [[0, -1], [-1, 0]])]


def _nearest_signed_perm(m: np.ndarray) -> np.ndarray:
    return max(_SIGNED_PERMS, key=lambda p: float(np.sum(p * m)))


def _describe(m: np.ndarray, out: str, inp: str) -> str:
    p = _nearest_signed_perm(m)
    terms = []
    for i, o in enumerate("xy"):
        j = int(np.argmax(np.abs(p[i])))
        terms.append(f"{out}_{o} = {'+' if p[i, j] > 0 else '-'}{inp}_{'xy'[j]}")
    return ", ".join(terms)


@dataclass
class ProjectorFit:
    """Result of :func:`fit_projector_map`: the projector -> grid-centre map and its checks.

    Attributes
    ----------
    detector : str or None
    convention : BotConvention
        The convention the prediction is made for.
    n_exposures, n_positions : int
        Exposures used and distinct projector positions among them.
    fitted : bool
        Whether the affine map could be fitted (>= 3 positions not on a line).
    matrix : ndarray (2, 2) or None
        Fitted ``ccd = matrix @ (bot_x, bot_y) + offset`` (pixels per mm).
    offset : ndarray (2,) or None
        Fitted translation (pixels).
    scale : float
        ``sqrt(|det(matrix)|)`` (px/mm; ~100 expected for 10 um pixels). NaN if not fitted.
    scale_x, scale_y : float
        Length of the matrix rows: px per mm along CCD x and y.
    rotation_deg : float
        Rotation left after removing the nearest axis swap/flip (degrees).
    axes : str
        The fitted map's axis assignment, e.g. ``"ccd_x = +bot_y, ccd_y = +bot_x"``.
    swapped : bool
        CCD x follows projector y (and vice versa).
    handedness_flipped : bool
        ``det(matrix) < 0``: the map mirrors one axis.
    rms : float
        RMS residual of the fit (pixels).
    residuals : ndarray (n, 2)
        Observed minus fitted centre, per exposure.
    predicted_matrix, predicted_offset : ndarray or None
        The geometry's map for :attr:`convention` (needs the detector).
    offset_px : ndarray (2,) or None
        Mean observed minus predicted grid centre (pixels).
    relative : str or None
        How the fitted axes relate to the predicted ones, e.g. ``"agrees"`` or
        ``"CCD x flipped"``.
    implied_convention : str or None
        The focal <- bot axis assignment the fit implies, assuming the catalogue
        pixels are DM CCD pixels (e.g. ``"focal_x = +bot_y, focal_y = +bot_x"``),
        with the matching named convention if any.
    alternatives : dict
        Observed minus predicted centre (pixels) for the prediction as stated
        and with the CCD x / y axes flipped; with one position this is all
        one can say, and it cannot decide between them.
    warnings : list of str
    """

    detector: str | None
    convention: BotConvention
    n_exposures: int
    n_positions: int
    fitted: bool = False
    matrix: np.ndarray | None = None
    offset: np.ndarray | None = None
    scale: float = float("nan")
    scale_x: float = float("nan")
    scale_y: float = float("nan")
    rotation_deg: float = float("nan")
    axes: str = ""
    swapped: bool = False
    handedness_flipped: bool = False
    rms: float = float("nan")
    residuals: np.ndarray | None = None
    predicted_matrix: np.ndarray | None = None
    predicted_offset: np.ndarray | None = None
    offset_px: np.ndarray | None = None
    relative: str | None = None
    implied_convention: str | None = None
    alternatives: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def predict(self, bx, by):
        """Grid centre (CCD pixels) the fitted map gives for projector positions."""
        if not self.fitted:
            raise InputError("the projector map could not be fitted",
                             expected=">= 3 distinct projector positions not on a line")
        bxa, bya, scalar = _xy(bx, by)
        x = self.matrix[0, 0] * bxa + self.matrix[0, 1] * bya + self.offset[0]
        y = self.matrix[1, 0] * bxa + self.matrix[1, 1] * bya + self.offset[1]
        return (float(x), float(y)) if scalar else (x, y)

    def summary_lines(self) -> list[str]:
        """Short human-readable report (for a CLI summary), one string per line."""
        det = self.detector or "unknown detector"
        lines = [f"Projector -> grid centre map ({det}; {self.n_exposures} exposure(s) at "
                 f"{self.n_positions} projector position(s); convention '{self.convention.name}': "
                 f"{self.convention.describe()})"]
        if self.fitted:
            lines.append(f"  fitted: scale {self.scale:.2f} px/mm (x {self.scale_x:.2f}, "
                         f"y {self.scale_y:.2f}), rotation {self.rotation_deg:+.3f} deg, "
                         f"axes {self.axes}" + (", mirrored" if self.handedness_flipped else ""))
            lines.append(f"  rms residual {self.rms:.2f} px")
            if self.implied_convention:
                lines.append(f"  data imply (if the catalogue pixels are DM CCD pixels): "
                             f"{self.implied_convention}")
        else:
            lines.append("  map not fitted: needs >= 3 distinct projector positions not on a line")
        if self.predicted_matrix is not None:
            pm = self.predicted_matrix
            lines.append(f"  geometry predicts: {_describe(pm, 'ccd', 'bot')}, "
                         f"{math.sqrt(abs(np.linalg.det(pm))):.2f} px/mm")
            if self.relative:
                lines.append(f"  fitted vs predicted axes: {self.relative}")
            if self.offset_px is not None:
                o = self.offset_px
                lines.append(f"  observed - predicted centre: ({o[0]:+.1f}, {o[1]:+.1f}) px")
            if not self.fitted and self.alternatives:
                alts = "; ".join(f"{k}: ({v[0]:+.1f}, {v[1]:+.1f}) px" for k, v in self.alternatives.items())
                lines.append(f"  observed - predicted, by hypothesis (cannot decide from these "
                             f"positions): {alts}")
        for w in self.warnings:
            lines.append(f"  WARNING: {w}")
        return lines


def fit_projector_map(bot_x, bot_y, x0, y0, detector=None, convention=None,
                      position_tol: float = 1e-3, max_offset_px: float = 100.0,
                      scale_tol: float = 0.05) -> ProjectorFit:
    """Fit the affine map from projector position (mm) to fitted grid centre (CCD pixels).

    Parameters
    ----------
    bot_x, bot_y : array_like
        Projector position of each exposure (``BOTXCAM``/``BOTYCAM`` or the
        file name's ``x``/``y``), mm.
    x0, y0 : array_like
        Fitted grid centre ``X0``, ``Y0`` of each exposure (CCD pixels).
    detector : str, optional
        The CCD; needed to compare with the geometry's prediction.
    convention : see :func:`get_convention`
        Convention to compare with (default ``"ccs"``).
    position_tol : float
        Positions closer than this (mm) count as the same position.
    max_offset_px : float
        Warn when the observed centre is further than this from the prediction.
    scale_tol : float
        Warn when the fitted scale differs from the predicted one by more than
        this fraction.

    Returns
    -------
    ProjectorFit
        Never raises for too few positions: ``fitted`` is ``False`` and the
        warnings say why.

    Examples
    --------
    >>> import numpy as np
    >>> bx = np.array([-296.5, -295.5, -296.5, -297.0])
    >>> by = np.array([41.7, 41.7, 42.7, 40.2])
    >>> fx, fy = bot_to_focal(bx, by)
    >>> from spotflat.geometry import focal_to_ccd
    >>> x, y = focal_to_ccd("R02_S02", fx, fy)
    >>> fit = fit_projector_map(bx, by, x, y, detector="R02_S02")
    >>> fit.fitted, round(fit.scale, 3), fit.axes, fit.relative, fit.warnings
    (True, 100.0, 'ccd_x = +bot_y, ccd_y = +bot_x', 'agrees', [])
    """
    conv = get_convention(convention)
    try:
        arrs = [np.asarray(a, dtype=float).ravel() for a in (bot_x, bot_y, x0, y0)]
    except (TypeError, ValueError) as exc:
        raise InputError(f"projector fit needs numbers ({exc})") from None
    if len({a.size for a in arrs}) != 1:
        raise InputError("bot_x, bot_y, x0 and y0 have different lengths")
    good = np.all([np.isfinite(a) for a in arrs], axis=0)
    bx, by, gx, gy = (a[good] for a in arrs)
    n = bx.size
    key = np.round(np.column_stack([bx, by]) / position_tol)
    n_pos = len(np.unique(key, axis=0)) if n else 0
    det_name = None
    if detector is not None:
        from .geometry import get_camera

        det_name = get_camera().detector(detector).name
    fit = ProjectorFit(det_name, conv, n, n_pos)
    if n == 0:
        fit.warnings.append("no exposure with a finite projector position and grid centre")
        return fit

    design = np.column_stack([bx, by, np.ones(n)])
    centred = np.column_stack([bx - bx.mean(), by - by.mean()])
    spread_rank = np.linalg.matrix_rank(centred, tol=position_tol) if n >= 2 else 0
    if n_pos >= 3 and spread_rank == 2:
        coef, *_ = np.linalg.lstsq(design, np.column_stack([gx, gy]), rcond=None)
        m = coef[:2].T
        t = coef[2]
        fit.fitted = True
        fit.matrix, fit.offset = m, t
        fit.residuals = np.column_stack([gx, gy]) - (design @ coef)
        dof = max(n - 3, 1)
        fit.rms = float(np.sqrt(np.sum(fit.residuals ** 2) / (2 * dof))) if n > 3 else 0.0
        det = float(np.linalg.det(m))
        fit.scale = math.sqrt(abs(det))
        fit.scale_x, fit.scale_y = (float(v) for v in np.hypot(m[:, 0], m[:, 1]))
        p = _nearest_signed_perm(m)
        q = p.T @ m
        fit.rotation_deg = math.degrees(math.atan2(q[1, 0] - q[0, 1], q[0, 0] + q[1, 1]))
        fit.axes = _describe(m, "ccd", "bot")
        fit.swapped = p[0, 0] == 0
        fit.handedness_flipped = det < 0
        if abs(fit.scale - 100.0) > 100.0 * scale_tol and detector is None:
            fit.warnings.append(f"fitted scale {fit.scale:.1f} px/mm is not the ~100 px/mm of "
                                "10 um pixels")
        if n == 3:
            fit.warnings.append("3 positions determine the map exactly: no residual to check it")
    else:
        why = (f"{n_pos} distinct projector position(s)" if n_pos < 3
               else f"the {n_pos} projector positions lie on a line")
        fit.warnings.append(f"cannot fit the projector map: {why}; need >= 3 positions not on a "
                            "line (a dithered run) to tell the convention")

    if det_name is None:
        fit.warnings.append("no detector given: cannot compare with the geometry's prediction")
        return fit
    from .geometry import get_camera

    d = get_camera().detector(det_name)
    pm, pt = predicted_projector_map(d, conv)
    fit.predicted_matrix, fit.predicted_offset = pm, pt
    px = pm[0, 0] * bx + pm[0, 1] * by + pt[0]
    py = pm[1, 0] * bx + pm[1, 1] * by + pt[1]
    fit.offset_px = np.array([np.mean(gx - px), np.mean(gy - py)])
    fx_, fy_ = d.nx - 1 - px, d.ny - 1 - py  # the same positions with the CCD axes reversed
    fit.alternatives = {
        "as stated": (float(np.mean(gx - px)), float(np.mean(gy - py))),
        "CCD x flipped": (float(np.mean(gx - fx_)), float(np.mean(gy - py))),
        "CCD y flipped": (float(np.mean(gx - px)), float(np.mean(gy - fy_))),
        "CCD x and y flipped": (float(np.mean(gx - fx_)), float(np.mean(gy - fy_))),
    }
    if fit.fitted:
        rel = fit.matrix @ np.linalg.inv(pm)
        p = _nearest_signed_perm(rel)
        names = {(1, 1): "agrees", (-1, 1): "CCD x flipped", (1, -1): "CCD y flipped",
                 (-1, -1): "CCD x and y flipped (180 deg)"}
        if p[0, 0] != 0:
            fit.relative = names[(int(p[0, 0]), int(p[1, 1]))]
        else:
            fit.relative = f"CCD axes swapped ({_describe(rel, 'fit', 'predicted')})"
        lin = d.pixel_to_focal_matrix[:, :2] @ fit.matrix  # focal mm per bot mm
        implied = _describe(lin, "focal", "bot")
        match = [c.name for c in CONVENTIONS.values()
                 if np.array_equal(_nearest_signed_perm(c.m), _nearest_signed_perm(lin))]
        fit.implied_convention = implied + (f" (convention '{match[0]}')" if match else
                                            " (no named convention)")
        if fit.relative != "agrees":
            fit.warnings.append(f"the fitted map disagrees with convention '{conv.name}': "
                                f"{fit.relative}; data imply {implied}")
        pscale = math.sqrt(abs(np.linalg.det(pm)))
        if abs(fit.scale / pscale - 1) > scale_tol:
            fit.warnings.append(f"fitted scale {fit.scale:.1f} px/mm differs from the predicted "
                                f"{pscale:.1f} px/mm by more than {scale_tol:.0%}")
        # the offset at the data's own mean position, from the fitted map
        obs = fit.matrix @ [bx.mean(), by.mean()] + fit.offset
        pred = pm @ [bx.mean(), by.mean()] + pt
        fit.offset_px = obs - pred
    off = float(np.hypot(*fit.offset_px))
    if off > max_offset_px:
        o = fit.offset_px
        fit.warnings.append(f"grid centre is {off:.0f} px ({o[0]:+.0f}, {o[1]:+.0f}) from where "
                            f"convention '{conv.name}' puts the projector: the projector origin "
                            "is offset, or the convention (or the catalogue's pixel frame) differs")
    return fit
