"""Sample a flat field over the footprint of each spot.

The flat's relative response at a spot, ``q``, is the weighted mean of the
flat over the spot's footprint (DESIGN.md section 2). Positions are CCD pixels
in the LSST DM convention: pixel ``(i, j)`` of ``flat[i, j]`` has its centre at
``x = j``, ``y = i``, and the CCD spans ``-0.5 <= x <= nx - 0.5``,
``-0.5 <= y <= ny - 0.5``.

The footprint weighting
-----------------------
Let ``K(d)`` be a footprint kernel over integer pixel offsets ``d = (dx, dy)``,
normalised to ``sum_d K(d) = 1``:

* **Gaussian** (``sigma``): ``K(dx, dy) = g(dx) g(dy)``, with
  ``g(u) = exp(-u**2 / (2 sigma**2))`` for integer ``|u| <= ceil(truncate *
  sigma)`` (``truncate = 4``), zero beyond, each ``g`` normalised to sum 1;
* **circular top-hat** (``radius``): ``K(d)`` proportional to the area of
  pixel ``d`` (the unit square centred on ``d``) inside the circle of radius
  ``radius`` centred on 0, the area measured on a 10 x 10 grid of sub-pixel
  centres (:data:`TOPHAT_SUBSAMPLE`);
* **none** (neither given): ``K = delta``, i.e. plain bilinear interpolation.

At a sub-pixel position ``(x, y)`` let ``c`` run over the four pixel centres
around it with the bilinear weights ``t_c`` (``(1 - fx)(1 - fy)``, ...,
``fx = x - floor(x)``). The weight of pixel ``p`` is

    ``w_p(x, y) = sum_c t_c K(p - c)``

(the kernel convolved with the bilinear tent), and

    ``q(x, y) = sum_p w_p m_p f_p / sum_p w_p m_p``

where ``f`` is the flat and ``m_p = 1`` for a finite pixel on the CCD, 0 for a
masked (NaN) pixel or a pixel off the CCD: masked pixels are excluded and the
rest re-weighted. ``sum_p w_p m_p`` is the fraction of the footprint's weight
on valid pixels; where it is below ``min_weight`` (default
:data:`MIN_WEIGHT` = 0.5) ``q`` is NaN. Positions off the CCD (or NaN) give
NaN.

This is computed exactly, and fast, as a *normalised convolution*:
``N = K * (m f)`` and ``D = K * m`` at every pixel centre (separable for the
Gaussian), then ``N`` and ``D`` are bilinearly interpolated to each position
and ``q = N / D``. For many positions this costs one image convolution plus
one bilinear interpolation, independent of the footprint size.

:func:`flat_gradient` returns the exact partial derivatives of that same
``q(x, y)`` (ratio of the two bilinear interpolants), for the centroid studies.

The Gaussian convolution is done as block-banded matrix products (BLAS, one
thread) in float64 whatever the flat's type, so float32 flats are sampled as
exactly as float64 ones.

Per-spot footprint sizes (``sigma`` or ``radius`` arrays) are quantised to a
grid of ``step`` pixels (default :data:`SIZE_STEP` = 0.05 px, i.e. the size
used is ``step * round(size / step)``) and one convolution is run per distinct
value; a size that rounds to 0 means no footprint (bilinear interpolation).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from scipy import ndimage

from .blas import single_thread_blas
from .errors import InputError

__all__ = [
    "MIN_WEIGHT",
    "SIZE_STEP",
    "TRUNCATE",
    "TOPHAT_SUBSAMPLE",
    "sample_flat",
    "sample_flat_checkerboard",
    "flat_gradient",
    "bin_flat",
    "footprint_sigma",
    "kernel_sigma",
    "gaussian_kernel1d",
    "tophat_kernel",
    "expected_shape",
]

#: Minimum fraction of the footprint weight on valid pixels (else ``q`` is NaN).
MIN_WEIGHT = 0.5
#: Grid (pixels) to which per-spot ``sigma`` / ``radius`` values are rounded.
SIZE_STEP = 0.05
#: The Gaussian kernel is cut at ``ceil(TRUNCATE * sigma)`` pixels.
TRUNCATE = 4.0
#: Sub-pixel grid (per axis) used to measure each pixel's area inside the top-hat.
TOPHAT_SUBSAMPLE = 10

# CCD shapes (ny, nx) by vendor, in case the geometry module is not wanted
_VENDOR_SHAPES = {"ITL": (4000, 4072), "E2V": (4004, 4096)}


# --------------------------------------------------------------------------- kernels

def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """The normalised 1-D Gaussian footprint weights at integer offsets.

    Parameters
    ----------
    sigma : float
        Gaussian width, pixels (> 0).
    truncate : float
        Cut the kernel at ``ceil(truncate * sigma)`` pixels.

    Returns
    -------
    numpy.ndarray
        ``2 R + 1`` weights for offsets ``-R..R``, summing to 1.

    Examples
    --------
    >>> w = gaussian_kernel1d(1.0)
    >>> len(w), round(float(w.sum()), 12)
    (9, 1.0)
    """
    radius = int(np.ceil(truncate * sigma))
    u = np.arange(-radius, radius + 1, dtype=float)
    g = np.exp(-0.5 * (u / sigma) ** 2)
    return g / g.sum()


def tophat_kernel(radius: float, subsample: int = TOPHAT_SUBSAMPLE) -> np.ndarray:
    """The normalised 2-D circular top-hat footprint weights.

    Parameters
    ----------
    radius : float
        Circle radius, pixels (> 0).
    subsample : int
        Sub-pixel centres per axis used to measure each pixel's area inside
        the circle.

    Returns
    -------
    numpy.ndarray
        Square ``(2 R + 1, 2 R + 1)`` array, ``R = ceil(radius + 0.5)``, entry
        ``[R + dy, R + dx]`` the weight of offset ``(dx, dy)``; sums to 1.

    Examples
    --------
    >>> k = tophat_kernel(0.3)   # only the central pixel is touched
    >>> float(k[k.shape[0] // 2, k.shape[1] // 2])
    1.0
    """
    half = int(np.ceil(radius + 0.5))
    sub = (np.arange(subsample) + 0.5) / subsample - 0.5  # sub-pixel centres in a pixel
    d = np.arange(-half, half + 1, dtype=float)
    # coordinates of every sub-pixel centre along one axis: (offset, sub)
    u = d[:, None] + sub[None, :]
    inside = (u[:, None, :, None] ** 2 + u[None, :, None, :] ** 2) <= radius ** 2
    area = inside.sum(axis=(2, 3)).astype(float)  # [dy, dx]
    if area.sum() == 0:  # radius below the sub-pixel spacing: the centre pixel only
        area[half, half] = 1.0
    return area / area.sum()


def kernel_sigma(sigma: Any) -> np.ndarray:
    r"""The Gaussian kernel width whose weights match a footprint of width ``sigma``.

    :func:`sample_flat` convolves the kernel with the bilinear tent, which
    adds ``fx (1 - fx)`` to the weights' variance along each axis, 1/6
    px\ :sup:`2` on average over sub-pixel positions. A spot's own weights
    (its Gaussian at the pixel centres about its sub-pixel centre) have no
    such term, so sampling with ``sigma`` sees pixel-scale structure (PRNU)
    through a smoother window than the spot: less variance in ``q`` than in
    ``t`` and, for white PRNU and ``sigma = 1.55`` px, a slope 3 % too high.
    ``sqrt(sigma**2 - 1/6)`` makes the mean variance that of the spot
    (slope 1.003 in the same test). Widths with ``sigma**2 <= 1/6`` give 0
    (bilinear interpolation alone); NaN stays NaN.

    Examples
    --------
    >>> float(kernel_sigma(1.0) ** 2)  # doctest: +ELLIPSIS
    0.833...
    """
    s = np.asarray(sigma, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(s), np.nan, np.sqrt(np.clip(s * s - 1.0 / 6.0, 0.0, None)))


def footprint_sigma(xx: Any, yy: Any, xy: Any = None, method: str = "trace") -> np.ndarray:
    """Gaussian footprint width from a spot's second moments.

    Parameters
    ----------
    xx, yy : array_like
        Second moments (pixels squared), e.g. ``base_SdssShape_xx/yy``.
    xy : array_like, optional
        Cross moment; used by ``method="det"``.
    method : {"trace", "det"}
        ``"trace"``: ``sqrt((xx + yy) / 2)``; ``"det"``:
        ``(xx * yy - xy**2) ** (1/4)`` (the geometric-mean width of the
        ellipse; needs ``xy``).

    Returns
    -------
    numpy.ndarray or float
        Width in pixels; NaN where the moments are not finite or not positive.

    Examples
    --------
    >>> float(footprint_sigma(4.0, 6.0))
    2.23606797749979
    """
    xx = np.asarray(xx, dtype=float)
    yy = np.asarray(yy, dtype=float)
    with np.errstate(invalid="ignore"):
        if method == "trace":
            s2 = 0.5 * (xx + yy)
            out = np.sqrt(np.where(s2 > 0, s2, np.nan))
        elif method == "det":
            if xy is None:
                raise InputError("method='det' needs the cross moment xy")
            det = xx * yy - np.asarray(xy, dtype=float) ** 2
            out = np.where((det > 0) & (xx > 0) & (yy > 0), det, np.nan) ** 0.25
        else:
            raise InputError(f"unknown method {method!r}", expected="'trace' or 'det'")
    return out[()]


# --------------------------------------------------------------------------- checks

def expected_shape(detector: Any) -> tuple[int, int]:
    """CCD image shape ``(ny, nx)`` for a detector given by name, vendor or shape.

    Parameters
    ----------
    detector : str or tuple of int
        A vendor (``"ITL"``, ``"E2V"``), a detector name understood by
        :func:`spotflat.geometry.ccd_shape` (e.g. ``"R22_S11"``), or a shape.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> expected_shape("E2V")
    (4004, 4096)
    """
    if isinstance(detector, (tuple, list)) and len(detector) == 2:
        return int(detector[0]), int(detector[1])
    key = str(detector).upper()
    if key in _VENDOR_SHAPES:
        return _VENDOR_SHAPES[key]
    try:
        from . import geometry
    except ImportError as exc:  # pragma: no cover - geometry is part of the package
        raise InputError(f"cannot look up detector {detector!r}: {exc}") from exc
    try:
        shape = geometry.ccd_shape(detector)
    except InputError:
        raise
    except Exception as exc:  # unknown name in the geometry table
        raise InputError(f"unknown detector {detector!r}", expected="e.g. 'R22_S11', 'ITL' or 'E2V'") from exc
    return int(shape[0]), int(shape[1])


def _as_flat(flat: Any, detector: Any = None, need_finite: bool = True) -> np.ndarray:
    """The 2-D float image of ``flat`` (an array or an object with ``.data``), checked."""
    data = getattr(flat, "data", flat)
    if detector is None:
        detector = getattr(flat, "detector", None)
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise InputError(f"the flat must be a 2-D image, got {arr.ndim} dimensions")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if detector is not None:
        shape = expected_shape(detector)
        if arr.shape != shape:
            raise InputError(f"flat shape {arr.shape} does not match detector {detector} {shape}",
                             expected="a flat of the same CCD as the spot data")
    if need_finite and not np.isfinite(arr).any():
        raise InputError("the flat has no finite pixel (all NaN or masked)")
    return arr


def _positions(x: Any, y: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcast positions; return x, y (float64) and the on-CCD mask."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    ny, nx = shape
    with np.errstate(invalid="ignore"):
        on = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    if x.size and not on.any():
        raise InputError(f"all {x.size} positions are off the CCD (x in -0.5..{nx - 0.5}, "
                         f"y in -0.5..{ny - 0.5}) or NaN",
                         expected="spot positions in CCD pixels (DM convention)")
    return x, y, on


def _size_groups(size: Any, shape: tuple[int, ...], step: float, name: str
                 ) -> Iterator[tuple[float, np.ndarray | None]]:
    """Yield (quantised size, boolean selection or None for all) per distinct size."""
    size = np.asarray(size, dtype=float)
    if step <= 0:
        raise InputError(f"step must be positive, got {step}")
    with np.errstate(invalid="ignore"):
        if np.any(size < 0):
            raise InputError(f"{name} must be >= 0")
    if size.ndim == 0:
        if not np.isfinite(size):
            raise InputError(f"{name} must be finite, got {float(size)}")
        yield step * np.round(float(size) / step), None
        return
    try:
        size = np.broadcast_to(size, shape)
    except ValueError:
        raise InputError(f"{name} of shape {size.shape} does not match the positions {shape}") from None
    with np.errstate(invalid="ignore"):
        idx = np.round(size / step)
    finite = np.isfinite(idx)
    for k in np.unique(idx[finite]):
        yield step * k, (idx == k)


# --------------------------------------------------------------------------- maps

def _padded(a: np.ndarray) -> np.ndarray:
    """``a`` with one row/column of zeros around it (the pixels just off the CCD)."""
    out = np.zeros((a.shape[0] + 2, a.shape[1] + 2), dtype=np.float64)
    out[1:-1, 1:-1] = a
    return out


def _band(kernel: np.ndarray, block: int) -> np.ndarray:
    """Band matrix ``B`` with ``(window @ B)[i] = sum_k kernel[k] window[i + k]``."""
    width = len(kernel)
    band = np.zeros((block + width - 1, block))
    for i in range(block):
        band[i:i + width, i] = kernel
    return band


def correlate_separable(a: np.ndarray | list[np.ndarray], kx: np.ndarray, ky: np.ndarray,
                        pad: int = 0, block: int = 64) -> np.ndarray:
    """Correlate an image with ``outer(ky, kx)``, zero outside the image.

    ``out[i, j] = sum_{u, v} ky[v] kx[u] a[i - pad + v - Ry, j - pad + u - Rx]``
    for odd-length kernels, ``R = (len - 1) // 2``, and ``a`` taken as 0
    outside its bounds: with ``pad = 0`` the same as two passes of
    :func:`scipy.ndimage.correlate1d` with ``mode="constant"``; ``pad``
    extends the output by that many pixels on every side. Computed as
    block-banded matrix products (BLAS), several times faster than
    ``correlate1d`` for kernels of ~10-30 taps.

    Parameters
    ----------
    a : numpy.ndarray or list of numpy.ndarray
        2-D float image (finite), or several of the same shape.
    kx, ky : numpy.ndarray
        Odd-length 1-D weights along x (axis 1) and y (axis 0).
    pad : int
        Extra output rows/columns on each side.
    block : int
        Output columns (rows) per matrix product.

    Returns
    -------
    numpy.ndarray
        ``(ny + 2 pad, nx + 2 pad)``, float64; for a list of ``k`` images
        ``(ny + 2 pad, nx + 2 pad, k)``.

    Examples
    --------
    >>> import numpy as np
    >>> out = correlate_separable(np.eye(3), np.array([0.0, 1.0, 0.5]), np.array([1.0]), pad=1)
    >>> out[1:-1, 1:-1].tolist()
    [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.5, 1.0]]
    """
    kx = np.asarray(kx, dtype=np.float64)
    ky = np.asarray(ky, dtype=np.float64)
    if len(kx) % 2 == 0 or len(ky) % 2 == 0:
        raise ValueError("kernels must have odd length")
    single = isinstance(a, np.ndarray)
    images = [a] if single else list(a)
    ny, nx = images[0].shape
    if any(im.shape != (ny, nx) for im in images):
        raise ValueError("all images must have the same shape")
    nimg = len(images)
    rx, ry = (len(kx) - 1) // 2, (len(ky) - 1) // 2
    oy, ox = ny + 2 * pad, nx + 2 * pad
    band_x = _band(kx, block)
    band_t = np.ascontiguousarray(_band(ky, block).T)
    # several images are interleaved pixel by pixel ([y, x, image]) so that
    # one y product serves them all and a later gather fetches them together
    out = np.empty((oy, ox, nimg))
    buf = np.empty((block + 2 * ry, ox, nimg))
    with single_thread_blas():
        for i0 in range(0, oy, block):
            # one stripe of output rows: the x pass of the input rows it needs
            # goes to a small buffer that stays in cache, then one y product
            i1 = min(i0 + block, oy)
            nrow = i1 - i0 + 2 * ry
            lo = i0 - pad - ry  # input row of buffer row 0
            lo_c, hi_c = max(lo, 0), min(i1 - pad + ry, ny)
            buf[:nrow] = 0.0
            for j0 in range(0, ox, block) if hi_c > lo_c else ():
                j1 = min(j0 + block, ox)
                clo = j0 - pad - rx  # input column of band row 0
                clo_c, chi_c = max(clo, 0), min(j1 - pad + rx, nx)
                if chi_c <= clo_c:
                    continue
                band = band_x[clo_c - clo:chi_c - clo, :j1 - j0]
                for c, im in enumerate(images):
                    window = im[lo_c:hi_c, clo_c:chi_c]
                    if window.dtype != np.float64:
                        window = window.astype(np.float64)
                    buf[lo_c - lo:hi_c - lo, j0:j1, c] = window @ band
            np.matmul(band_t[:i1 - i0, :nrow], buf[:nrow].reshape(nrow, ox * nimg),
                      out=out[i0:i1].reshape(i1 - i0, ox * nimg))
    return out[:, :, 0] if single else out


_SCATTER_LIMIT = 30_000_000  # bad pixels x kernel taps up to which the bad term is scattered


def _bad_term(bad: np.ndarray, kx: np.ndarray, ky: np.ndarray, pad: int = 1) -> np.ndarray:
    """:func:`correlate_separable` of a bad-pixel map, by scattering the kernel.

    ``out = sum over bad pixels p of the kernel placed at p``: for the usual
    few thousand bad pixels far cheaper than a convolution of the whole CCD
    (and the untouched part of the ``np.zeros`` output costs no memory).
    Falls back to :func:`correlate_separable` for large masked areas.
    """
    ys, xs = np.nonzero(bad)
    kx = np.asarray(kx, dtype=np.float64)
    ky = np.asarray(ky, dtype=np.float64)
    if ys.size * kx.size * ky.size > _SCATTER_LIMIT:
        return correlate_separable(bad.astype(np.float64), kx, ky, pad=pad)
    ny, nx = bad.shape
    oy, ox = ny + 2 * pad, nx + 2 * pad
    out = np.zeros((oy, ox))
    flat = out.reshape(-1)
    rx, ry = (kx.size - 1) // 2, (ky.size - 1) // 2
    # out[i, j] += ky[v] kx[u] for i = p_y + pad + ry - v, j = p_x + pad + rx - u
    di = (pad + ry - np.arange(ky.size))[:, None]
    dj = (pad + rx - np.arange(kx.size))[None, :]
    weight = np.outer(ky, kx).ravel()
    chunk = max(1, 4_000_000 // weight.size)
    for c0 in range(0, ys.size, chunk):
        i = (ys[c0:c0 + chunk, None, None] + di).astype(np.intp)
        j = (xs[c0:c0 + chunk, None, None] + dj).astype(np.intp)
        i, j = np.broadcast_arrays(i, j)
        ok = ((i >= 0) & (i < oy) & (j >= 0) & (j < ox)).reshape(len(i), -1)
        idx = (i * ox + j).reshape(len(i), -1)
        w = np.broadcast_to(weight, idx.shape)
        np.add.at(flat, idx[ok], w[ok])
    return out


def _footprint_maps(images: list[np.ndarray], kind: str, size: float, truncate: float) -> np.ndarray:
    """Padded correlations of (unpadded, finite) images with the footprint kernel.

    Returns ``(ny + 2, nx + 2, len(images))``: CCD pixel ``(i, j)`` at ``[i + 1, j + 1]``.
    """
    ny, nx = images[0].shape
    if kind == "gauss" and size > 0:
        g = gaussian_kernel1d(size, truncate)
        return correlate_separable(images, g, g, pad=1)
    out = np.zeros((ny + 2, nx + 2, len(images)))
    for c, im in enumerate(images):
        if kind == "none" or size == 0:
            out[1:-1, 1:-1, c] = im
        else:
            # symmetric kernel: convolution == correlation; "same" keeps the centre aligned
            from scipy import signal  # imported here: scipy.signal costs seconds to import

            out[:, :, c] = signal.oaconvolve(_padded(im), tophat_kernel(size), mode="same")
    return out


def _profile(n: int, kind: str, size: float, truncate: float) -> np.ndarray:
    """Padded 1-D correlation of the CCD's extent (ones on 0..n-1) with the kernel."""
    ones = np.zeros(n + 2)
    ones[1:-1] = 1.0
    if kind == "none" or size == 0:
        return ones
    return ndimage.correlate1d(ones, gaussian_kernel1d(size, truncate), mode="constant", cval=0.0)


_CHUNK = 1 << 16  # positions per interpolation chunk: temporaries stay in cache


def _bilinear_many(maps: np.ndarray | list[np.ndarray], x: np.ndarray, y: np.ndarray,
                   profiles: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """Bilinear interpolation of padded maps at CCD positions on the CCD.

    ``maps`` is an array ``(ny + 2, nx + 2[, k])`` or a list of them, with
    CCD pixel ``(i, j)`` at ``[i + 1, j + 1]``; returns one array shaped like
    ``x`` per map (channel). With ``profiles = (py, px)`` (padded 1-D
    profiles) the interpolated separable map ``outer(py, px)`` is appended.
    """
    maps = [maps] if isinstance(maps, np.ndarray) else list(maps)
    height, width = maps[0].shape[:2]
    tables = []  # (flat table, channels, complex?)
    for m in maps:
        k = m.shape[2] if m.ndim == 3 else 1
        if k == 2:  # gather two channels in one go as complex numbers
            tables.append((np.ascontiguousarray(m).view(np.complex128).reshape(-1), 2))
        elif k == 1:
            tables.append((m.reshape(-1), 1))
        else:
            tables.append((m.reshape(height * width, k), k))
    nch = sum(k for _, k in tables)
    out = np.empty((nch + (profiles is not None),) + x.shape)
    for c0 in range(0, x.size, _CHUNK):
        c1 = min(c0 + _CHUNK, x.size)
        xp = x[c0:c1] + 1.0
        yp = y[c0:c1] + 1.0
        x0 = xp.astype(np.intp)  # positions on the CCD: xp >= 0.5, so trunc == floor
        y0 = yp.astype(np.intp)
        np.minimum(x0, width - 2, out=x0)
        np.minimum(y0, height - 2, out=y0)
        fx = xp - x0
        fy = yp - y0
        gx = 1.0 - fx
        gy = 1.0 - fy
        i = y0 * width + x0
        ch = 0
        for table, k in tables:
            if k > 2:
                wx, vx, wy, vy = gx[:, None], fx[:, None], gy[:, None], fy[:, None]
            else:
                wx, vx, wy, vy = gx, fx, gy, fy
            v = table[i] * wx
            v += table[i + 1] * vx
            v *= wy
            w = table[i + width] * wx
            w += table[i + width + 1] * vx
            w *= vy
            v += w
            if k == 1:
                out[ch, c0:c1] = v
            elif k == 2:
                out[ch, c0:c1] = v.real
                out[ch + 1, c0:c1] = v.imag
            else:
                out[ch:ch + k, c0:c1] = v.T
            ch += k
        if profiles is not None:
            py, px = profiles
            v = py[y0] * gy
            v += py[y0 + 1] * fy
            w = px[x0] * gx
            w += px[x0 + 1] * fx
            v *= w
            out[nch, c0:c1] = v
    return list(out)


def _bilinear_grad(maps: np.ndarray, x: np.ndarray, y: np.ndarray,
                   profiles: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`_bilinear_many`, with the interpolants' x and y derivatives.

    Returns ``(value, d/dx, d/dy)``, each ``(k [+ 1], n)``. In a cell
    ``[x0, x0 + 1) x [y0, y0 + 1)`` the bilinear interpolant is linear in x at
    fixed y (and vice versa), so the derivatives are the differences across
    the cell (taken from the cell above/right on its lower/left border).
    """
    height, width, k = maps.shape
    table = maps.reshape(height * width, k)
    xp = x + 1.0
    yp = y + 1.0
    x0 = np.minimum(xp.astype(np.intp), width - 2)
    y0 = np.minimum(yp.astype(np.intp), height - 2)
    fx = (xp - x0)[:, None]
    fy = (yp - y0)[:, None]
    gx, gy = 1.0 - fx, 1.0 - fy
    i = y0 * width + x0
    v00, v01, v10, v11 = table[i], table[i + 1], table[i + width], table[i + width + 1]
    val = (v00 * gx + v01 * fx) * gy + (v10 * gx + v11 * fx) * fy
    ddx = (v01 - v00) * gy + (v11 - v10) * fy
    ddy = (v10 - v00) * gx + (v11 - v01) * fx
    val, ddx, ddy = val.T, ddx.T, ddy.T
    if profiles is not None:
        py, px = profiles
        yv = py[y0] * gy[:, 0] + py[y0 + 1] * fy[:, 0]
        xv = px[x0] * gx[:, 0] + px[x0 + 1] * fx[:, 0]
        yd = py[y0 + 1] - py[y0]
        xd = px[x0 + 1] - px[x0]
        val = np.vstack([val, yv * xv])
        ddx = np.vstack([ddx, yv * xd])
        ddy = np.vstack([ddy, yd * xv])
    return val, ddx, ddy


def _prepare(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The flat with masked pixels zeroed (same float type), and the boolean
    bad-pixel map (None if every pixel is valid)."""
    m = np.isfinite(flat)
    if m.all():
        return flat, None
    return np.where(m, flat, 0), ~m


def _sample_ratio(prep: tuple[np.ndarray, np.ndarray | None], x: np.ndarray, y: np.ndarray,
                  kind: str, size: float, truncate: float, min_weight: float,
                  grad: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """q = interp(N) / interp(D) at on-CCD positions x, y (1-D arrays).

    With ``grad``, the exact derivatives ``(dq/dx, dq/dy)`` of that function instead.
    """
    fz, bad = prep
    if kind != "tophat":
        # D = K * m = K * (CCD rectangle) - K * (bad pixels): the first term
        # separates into 1-D profiles, the second is zero far from bad pixels
        profiles = (_profile(fz.shape[0], kind, size, truncate), _profile(fz.shape[1], kind, size, truncate))
        maps = _footprint_maps([fz], kind, size, truncate)
        if bad is not None:
            if kind == "gauss" and size > 0:
                g = gaussian_kernel1d(size, truncate)
                maps = [maps[:, :, 0], _bad_term(bad, g, g)]
            else:
                maps = [maps[:, :, 0], _padded(bad)]
    else:
        profiles = None
        maps = _footprint_maps([fz, ~bad if bad is not None else np.ones(fz.shape)], kind, size, truncate)
    if grad:
        if isinstance(maps, list):
            maps = np.stack(maps, axis=-1)
        val, ddx, ddy = _bilinear_grad(maps, x, y, profiles)
        if bad is not None and profiles is not None:  # D = profile product - bad-pixel term
            val, ddx, ddy = ([v[0], v[2] - v[1]] for v in (val, ddx, ddy))
        (n_i, d_i), (nx_i, dx_i), (ny_i, dy_i) = val, ddx, ddy
    else:
        val = _bilinear_many(maps, x, y, profiles)
        if bad is not None and profiles is not None:
            n_i, d_i = val[0], val[2] - val[1]
        else:
            n_i, d_i = val
    del maps
    # round-off of the FFT (top-hat) can leave tiny negative weights
    bad = ~(d_i >= max(min_weight, 1e-12))
    d_i[bad] = np.nan
    if grad:
        d2 = d_i * d_i
        return (nx_i * d_i - n_i * dx_i) / d2, (ny_i * d_i - n_i * dy_i) / d2
    n_i /= d_i
    return n_i


# --------------------------------------------------------------------------- public

def sample_flat(flat: Any, x: Any, y: Any, sigma: Any = None, radius: Any = None, *,
                detector: Any = None, min_weight: float = MIN_WEIGHT, step: float = SIZE_STEP,
                truncate: float = TRUNCATE) -> np.ndarray:
    """The flat's weighted mean over each spot's footprint.

    The weighting is defined exactly in the module docstring
    (:mod:`spotflat.footprint`): the Gaussian or top-hat kernel convolved with
    the bilinear tent, masked (NaN) and off-CCD pixels excluded.

    Parameters
    ----------
    flat : numpy.ndarray or FlatImage
        Flat image ``[y, x]`` (NaN = masked), normally normalised, e.g. from
        :func:`spotflat.read_flat`.
    x, y : array_like
        Spot positions, CCD pixels, DM convention (pixel centres at integers),
        any (broadcastable) shape, e.g. ``[spot, exposure]``.
    sigma : float or array_like, optional
        Gaussian footprint width in pixels (scalar, or one per position, e.g.
        :func:`footprint_sigma` of the spot moments). Arrays are rounded to a
        grid of ``step`` pixels.
    radius : float or array_like, optional
        Radius in pixels of a circular top-hat footprint instead (e.g. the
        flux aperture). Give at most one of ``sigma`` and ``radius``; with
        neither, the flat is bilinearly interpolated.
    detector : str or tuple, optional
        Detector of the spot data (name, vendor or shape): the flat's shape
        must match it.
    min_weight : float
        Minimum fraction of the footprint weight on valid pixels; below it
        (spots on masked pixels or hanging over the CCD edge) ``q`` is NaN.
    step : float
        Quantisation of per-position ``sigma`` / ``radius`` (pixels).
    truncate : float
        Gaussian cut-off in units of ``sigma``.

    Returns
    -------
    numpy.ndarray
        ``q`` with the broadcast shape of ``x`` and ``y``; NaN for positions
        off the CCD or NaN, and where too little weight remains.

    Raises
    ------
    InputError
        When every position is off the CCD, the flat has no finite pixel, its
        shape does not match ``detector``, or the footprint is invalid.

    Examples
    --------
    >>> import numpy as np
    >>> flat = np.add.outer(np.zeros(50), 1.0 + 0.01 * np.arange(60))  # gradient in x
    >>> q = sample_flat(flat, [10.25, 30.0], [20.5, 25.0], sigma=2.0)
    >>> np.round(q, 6).tolist()   # a linear flat is reproduced exactly
    [1.1025, 1.3]
    """
    return _drive(flat, x, y, sigma, radius, detector, min_weight, step, truncate, grad=False)


def _drive(flat, x, y, sigma, radius, detector, min_weight, step, truncate, grad):
    """Validate the inputs and sample q (or its gradient) per distinct footprint size."""
    flat = _as_flat(flat, detector)
    if sigma is not None and radius is not None:
        raise InputError("give either sigma (Gaussian) or radius (top-hat), not both")
    if not 0.0 <= min_weight <= 1.0:
        raise InputError(f"min_weight must be within 0..1, got {min_weight}")
    x, y, on = _positions(x, y, flat.shape)
    if sigma is not None:
        kind, size, name = "gauss", sigma, "sigma"
    elif radius is not None:
        kind, size, name = "tophat", radius, "radius"
    else:
        kind, size, name = "none", 0.0, "size"
    nout = 2 if grad else 1
    out = [np.full(x.shape, np.nan) for _ in range(nout)]
    groups = list(_size_groups(size, x.shape, step, name))
    patches = None
    if kind == "gauss" and not grad and _patches_cheaper(groups, int(on.sum()), flat.shape, truncate):
        patches = _Patches(flat, groups, truncate)
    # the zeroed copy for the convolutions, only when some footprint size needs them
    prep = _prepare(flat) if patches is None or any(v <= 0 for v, _ in groups) else None
    del flat
    for value, sel in groups:
        use = on if sel is None else (on & sel)
        if patches is not None and value > 0:
            # few positions for the CCD's pixels: gathered patches, not a whole-CCD convolution per size
            if use.any():
                out[0][use] = patches.sample(x[use], y[use], value, (min_weight, 0.0), checker=False)[0]
        elif use.all():  # the common case: no copies of the positions
            res = _sample_ratio(prep, x.ravel(), y.ravel(), kind, value, truncate, min_weight, grad)
            res = res if grad else (res,)
            out = [r.reshape(x.shape) for r in res]
        elif use.any():
            res = _sample_ratio(prep, x[use], y[use], kind, value, truncate, min_weight, grad)
            for o, r in zip(out, res if grad else (res,)):
                o[use] = r
    return tuple(o[()] for o in out) if grad else out[0][()]


_PATCH_COST = 0.7  # patch pixels per position against CCD pixels per footprint size, where the paths cost alike


def _patches_cheaper(groups: list, npos: int, shape: tuple[int, int], truncate: float) -> bool:
    """Whether gathered patches beat one whole-CCD convolution per footprint size."""
    sizes = [v for v, _ in groups if v > 0]
    if not sizes:
        return False
    L = 2 * int(np.ceil(truncate * max(sizes))) + 2
    return npos * L * L < _PATCH_COST * len(sizes) * shape[0] * shape[1]


def _tent_weights(g: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Per-position 1-D pixel weights of the kernel ``g`` convolved with the bilinear tent.

    Column ``k`` is the weight of pixel ``p0 - R + k`` (``R = (len(g) - 1) // 2``,
    ``p0`` the pixel centre at or left of the position, ``f`` the fractional
    offset from it): ``(1 - f) g[k] + f g[k - 1]``, ``len(g) + 1`` columns.
    """
    f = f[:, None]
    w = np.zeros((f.shape[0], g.size + 1))
    w[:, :-1] = (1.0 - f) * g
    w[:, 1:] += f * g
    return w


def sample_flat_checkerboard(flat: Any, x: Any, y: Any, sigma: Any, *, min_weight: float = MIN_WEIGHT,
                             half_min_weight: float = 0.2, step: float = SIZE_STEP,
                             truncate: float = TRUNCATE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat and its two checkerboard halves over each Gaussian footprint, in one pass.

    Returns what three calls of :func:`sample_flat` would (same weights, same
    masking, same thresholds), to rounding:

    * ``q = sample_flat(flat, x, y, sigma, min_weight=min_weight)``;
    * ``q_a`` the same over the pixels with ``i + j`` odd only (the others
      masked), ``min_weight=half_min_weight``;
    * ``q_b`` over the pixels with ``i + j`` even.

    Why it is cheap: a masked footprint mean is ``N / D`` with
    ``N = sum_p w_p m_p f_p`` and ``D = sum_p w_p m_p``. With the sign
    pattern ``c_p = (-1)**(i + j)`` the halves' masks are ``m (1 -+ c) / 2``,
    so ``N_a, N_b = (N -+ N_c) / 2`` and ``D_a, D_b = (D -+ D_c) / 2``, with
    ``N_c = sum_p w_p c_p m_p f_p`` and ``D_c = sum_p w_p c_p m_p``. The
    weights are separable (``w_p = W_y(i) W_x(j)``, the 1-D kernel convolved
    with the bilinear tent) and so is ``c_p``, so all four sums come from one
    gathered pixel patch per position; ``D`` and ``D_c`` are products of 1-D
    sums, corrected only at positions whose patch holds a masked pixel.
    The cost grows with the number of positions, not with the number of
    distinct footprint sizes (no whole-CCD convolution per size).

    Parameters
    ----------
    flat : numpy.ndarray or FlatImage
        Flat image ``[y, x]`` (NaN = masked).
    x, y : array_like
        Positions, CCD pixels (DM convention), broadcastable.
    sigma : float or array_like
        Gaussian footprint width per position (quantised to ``step``, as in
        :func:`sample_flat`).
    min_weight : float
        Minimum valid-weight fraction for ``q``.
    half_min_weight : float
        The same for each half (a half holds at most ~half the weight).
    step, truncate : float
        As in :func:`sample_flat`.

    Returns
    -------
    q, q_a, q_b : numpy.ndarray
        Shape of the broadcast positions; NaN off the CCD and where too
        little weight is valid.

    Raises
    ------
    InputError
        As :func:`sample_flat`.

    Examples
    --------
    >>> import numpy as np
    >>> flat = 1.0 + 0.01 * np.arange(40)[:, None] + 0.002 * np.arange(50)[None, :]
    >>> q, qa, qb = sample_flat_checkerboard(flat, [20.3, 10.0], [18.7, 30.5], sigma=2.0)
    >>> np.round(q, 12).tolist(), bool(np.allclose(qa, q)), bool(np.allclose(qb, q))
    ([1.2276, 1.325], True, True)
    """
    flat = _as_flat(flat)
    for w in (min_weight, half_min_weight):
        if not 0.0 <= w <= 1.0:
            raise InputError(f"min_weight must be within 0..1, got {w}")
    x, y, on = _positions(x, y, flat.shape)
    groups = list(_size_groups(sigma, x.shape, step, "sigma"))
    patches = _Patches(flat, groups, truncate)
    del flat
    out = [np.full(x.shape, np.nan) for _ in range(3)]
    for value, sel in groups:
        use = on if sel is None else (on & sel)
        if not use.any():
            continue
        idx = np.flatnonzero(use.ravel())
        res = patches.sample(x.ravel()[idx], y.ravel()[idx], value, (min_weight, half_min_weight), checker=True)
        for o, r in zip(out, res):
            o.ravel()[idx] = r
    return tuple(o[()] for o in out)


class _Patches:
    """Gathered-patch sums of a flat over Gaussian footprints (no whole-CCD convolution).

    The footprint mean at a position is ``N / D`` with ``N = sum_p w_p m_p f_p``
    and ``D = sum_p w_p m_p``, the weights ``w_p = W_y(i) W_x(j)`` the 1-D
    kernel convolved with the bilinear tent (:func:`_tent_weights`): exactly
    the bilinear interpolation of the convolved maps that :func:`sample_flat`
    builds, to rounding. ``D`` is a product of 1-D sums, corrected only at
    positions whose patch holds a masked pixel. The cost grows with the number
    of positions, not with the CCD's pixels or the number of footprint sizes.
    With ``checker`` also the checkerboard sums ``N_c``, ``D_c`` (signs
    ``(-1)**(i + j)``, see :func:`sample_flat_checkerboard`).
    """

    def __init__(self, flat: np.ndarray, groups: list, truncate: float) -> None:
        self.truncate = truncate
        ny, nx = self.shape = flat.shape
        radii = [int(np.ceil(truncate * v)) if v > 0 else 0 for v, _ in groups]
        self.pad = pad = max(radii, default=0) + 1
        # zero-padded copies: every patch lies inside; off-CCD pixels count as masked.
        # The flat goes straight into the padded copy, its masked pixels zeroed there
        self.fpad = np.zeros((ny + 2 * pad, nx + 2 * pad))
        inner = self.fpad[pad:pad + ny, pad:pad + nx]
        inner[...] = flat
        bad = ~np.isfinite(inner)
        if bad.any():
            inner[bad] = 0.0
        else:
            bad = None
        self.bpad = None
        if bad is not None:
            self.bpad = np.zeros(self.fpad.shape, dtype=bool)
            self.bpad[pad:pad + ny, pad:pad + nx] = bad
        self.inside_y = np.zeros(ny + 2 * pad)
        self.inside_y[pad:pad + ny] = 1.0
        self.inside_x = np.zeros(nx + 2 * pad)
        self.inside_x[pad:pad + nx] = 1.0

    def sample(self, xs_all: np.ndarray, ys_all: np.ndarray, value: float, min_weights: tuple[float, float],
               checker: bool) -> list[np.ndarray]:
        """``[q]`` (or ``[q, q_a, q_b]`` with ``checker``) at on-CCD positions, one footprint width."""
        from numpy.lib.stride_tricks import sliding_window_view

        ny, nx = self.shape
        pad = self.pad
        min_weight, half_min_weight = min_weights
        R = int(np.ceil(self.truncate * value)) if value > 0 else 0
        g = gaussian_kernel1d(value, self.truncate) if value > 0 else np.ones(1)
        L = g.size + 1
        win = sliding_window_view(self.fpad, (L, L))
        bwin = sliding_window_view(self.bpad, (L, L)) if self.bpad is not None else None
        alt = np.where(np.arange(L) % 2 == 0, 1.0, -1.0)
        res = [np.empty(xs_all.size) for _ in range(3 if checker else 1)]
        chunk = max(1, (1 << 21) // (L * L))  # patches of ~16 MB
        for c0 in range(0, xs_all.size, chunk):
            xs, ys = xs_all[c0:c0 + chunk], ys_all[c0:c0 + chunk]
            # as in _bilinear_many: padded index x0 = floor(x + 1) (positions are on the CCD), clamped
            x0 = np.minimum((xs + 1.0).astype(np.intp), nx)
            y0 = np.minimum((ys + 1.0).astype(np.intp), ny)
            wx = _tent_weights(g, xs + 1.0 - x0)
            wy = _tent_weights(g, ys + 1.0 - y0)
            # patch column k is CCD pixel x0 - 1 - R + k, i.e. padded-array column x0 - 1 - R + k + pad
            jx, iy = x0 - 1 - R + pad, y0 - 1 - R + pad
            patch = win[iy, jx]  # (n, L, L): rows i, columns j
            rows = np.einsum("nij,nj->ni", patch, wx)
            N = np.einsum("ni,ni->n", rows, wy)
            # valid weight on the CCD: separable; masked pixels subtracted below
            offx = jx[:, None] + np.arange(L)
            offy = iy[:, None] + np.arange(L)
            ix_, iy_ = self.inside_x[offx], self.inside_y[offy]
            D = np.einsum("nj,nj->n", wx, ix_) * np.einsum("ni,ni->n", wy, iy_)
            if checker:
                sx = np.where((x0 - 1 - R) % 2 == 0, 1.0, -1.0)  # (-1)**j of column 0
                sy = np.where((y0 - 1 - R) % 2 == 0, 1.0, -1.0)
                wxc = wx * alt
                wyc = wy * alt
                rowsc = np.einsum("nij,nj->ni", patch, wxc)
                Nc = np.einsum("ni,ni->n", rowsc, wyc) * (sx * sy)
                Dc = np.einsum("nj,nj->n", wxc, ix_) * np.einsum("ni,ni->n", wyc, iy_) * (sx * sy)
            if bwin is not None:
                bp = bwin[iy, jx]
                hit = np.flatnonzero(bp.any(axis=(1, 2)))
                if hit.size:
                    b = bp[hit].astype(np.float64)
                    D[hit] -= np.einsum("ni,nij,nj->n", wy[hit], b, wx[hit])
                    if checker:
                        Dc[hit] -= np.einsum("ni,nij,nj->n", wyc[hit], b, wxc[hit]) * (sx * sy)[hit]
            parts = [(N, D, min_weight)]
            if checker:
                parts += [(0.5 * (N - Nc), 0.5 * (D - Dc), half_min_weight),
                          (0.5 * (N + Nc), 0.5 * (D + Dc), half_min_weight)]
            for k, (num, den, mw) in enumerate(parts):
                low = ~(den >= max(mw, 1e-12))
                with np.errstate(invalid="ignore", divide="ignore"):
                    r = num / den
                r[low] = np.nan
                res[k][c0:c0 + chunk] = r
        return res


def flat_gradient(flat: Any, x: Any, y: Any, sigma: Any = None, radius: Any = None, *,
                  detector: Any = None, min_weight: float = MIN_WEIGHT, step: float = SIZE_STEP,
                  truncate: float = TRUNCATE) -> tuple[np.ndarray, np.ndarray]:
    """Local gradient of the sampled flat, ``(dq/dx, dq/dy)``, at spot positions.

    The exact partial derivatives of the function ``q(x, y)`` that
    :func:`sample_flat` evaluates (same footprint, same masking): ``q`` is the
    ratio of the bilinear interpolants of ``N = K * (m f)`` and ``D = K * m``,
    so ``dq/dx = (N_x D - N D_x) / D**2`` with ``N_x``, ``D_x`` the
    interpolants' slopes. Inside a pixel cell (between four pixel centres)
    ``N_x`` is the difference of the footprint-smoothed flat across the cell
    (linear in y); on a cell border the cell above/right is used. With a
    Gaussian footprint of a few pixels the smoothed flat varies slowly, so this
    is the local gradient of the flat on the spot's scale; with no footprint
    it is the pixel-to-pixel difference.

    Parameters
    ----------
    flat : numpy.ndarray or FlatImage
        Flat image ``[y, x]`` (NaN = masked).
    x, y : array_like
        Positions, CCD pixels (DM convention).
    sigma, radius : float or array_like, optional
        Footprint, as in :func:`sample_flat`.
    detector, min_weight, step, truncate
        As in :func:`sample_flat`.

    Returns
    -------
    dqdx, dqdy : numpy.ndarray
        Per pixel, shape of ``x``; NaN where :func:`sample_flat` is NaN.

    Raises
    ------
    InputError
        As :func:`sample_flat`.

    Examples
    --------
    >>> import numpy as np
    >>> flat = 1.0 + 0.01 * np.arange(40)[:, None] + 0.002 * np.arange(50)[None, :]
    >>> gx, gy = flat_gradient(flat, 20.3, 18.7, sigma=2.0)
    >>> round(float(gx), 12), round(float(gy), 12)
    (0.002, 0.01)
    """
    return _drive(flat, x, y, sigma, radius, detector, min_weight, step, truncate, grad=True)


def bin_flat(flat: Any, bin: int | tuple[int, int]) -> np.ndarray:
    """A coarser map of the flat: the NaN-aware mean over ``bin x bin`` blocks.

    Blocks start at pixel 0; the last block along an axis may be partial
    (its mean is over the pixels it has). A block with no finite pixel is NaN.
    Block ``(I, J)`` covers pixels ``y = I*by .. I*by + by - 1``, ``x =
    J*bx .. J*bx + bx - 1``; its centre is at ``x = J*bx + (bx - 1)/2`` for a
    full block.

    Parameters
    ----------
    flat : numpy.ndarray or FlatImage
        Flat image ``[y, x]``.
    bin : int or (int, int)
        Block size (``by, bx`` for a pair).

    Returns
    -------
    numpy.ndarray
        Shape ``(ceil(ny / by), ceil(nx / bx))``.

    Examples
    --------
    >>> import numpy as np
    >>> bin_flat(np.arange(12.0).reshape(3, 4), 2).tolist()
    [[2.5, 4.5], [8.5, 10.5]]
    """
    flat = _as_flat(flat, need_finite=False)
    by, bx = (bin, bin) if np.ndim(bin) == 0 else tuple(bin)
    by, bx = int(by), int(bx)
    if by < 1 or bx < 1:
        raise InputError(f"bin must be a positive integer, got {bin!r}")
    ny, nx = flat.shape
    my, mx = -(-ny // by), -(-nx // bx)
    pad = np.full((my * by, mx * bx), np.nan)
    pad[:ny, :nx] = flat
    blocks = pad.reshape(my, by, mx, bx)
    good = np.isfinite(blocks)
    total = np.where(good, blocks, 0.0).sum(axis=(1, 3))
    count = good.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
