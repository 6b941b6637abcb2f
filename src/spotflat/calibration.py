"""The per-spot calibration catalogue: spot means ``F[k]`` and exposure scales ``s[j]``.

Model (DESIGN.md section 2)::

    f[k, j] = F[k] * s[j] * T(x[k, j], y[k, j]) * noise

``F`` and ``s`` are estimated together by alternating ``F = stat_j(f / s)`` and
``s = stat_k(f / F)`` until they stop changing, with the normalisation
``median(s) = 1``. The default statistic is a sigma-clipped mean: outliers
(cosmic rays, spots cut by an edge, blends) are rejected point by point
against the current model with a robust (MAD) scale per spot, so one bad
point cannot move ``F[k]``.

The relative throughput is then ``t[k, j] = f[k, j] / (F[k] s[j])``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # astropy is imported where it is used: reading needs none of it
    from astropy.io import fits
    from astropy.table import Table

from .blocks import BlockPool
from .errors import InputError
from .fileio import (atomic_path, check_readable, fits_table_safe, fits_table_unescape, provenance_cards, reading,
                     staged_outputs)
from .grids import SpotGrids
from .masks import count, nonzero

__all__ = [
    "STATISTICS",
    "Calibration",
    "estimate_scales",
    "build_calibration",
    "write_calibration",
    "read_calibration",
]

#: Statistics accepted for ``F`` and ``s``.
STATISTICS = ("mean", "median", "clipped")

# standard error of the median of a Gaussian sample, in units of std / sqrt(n)
_MEDIAN_EFF = np.sqrt(np.pi / 2.0)


def _nanmedian(a: np.ndarray, axis: int) -> np.ndarray:
    """NaN-aware median along ``axis`` by one sort (numpy's nanmedian loops over rows)."""
    a = np.sort(np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1), axis=-1)  # NaNs sort last
    return _sorted_median(a)


def _sorted_median(a: np.ndarray) -> np.ndarray:
    """Median of the finite values along the last axis of ``a``, sorted along it (NaNs last)."""
    n = count(np.isfinite(a), axis=-1)
    lo = np.maximum((n - 1) // 2, 0)[..., None]
    hi = np.maximum(n // 2, 0)[..., None]
    med = 0.5 * (np.take_along_axis(a, lo, -1) + np.take_along_axis(a, hi, -1))[..., 0]
    return np.where(n > 0, med, np.nan)


def _robust_sigma(resid: np.ndarray, axis: int) -> np.ndarray:
    """Normalised median absolute deviation along ``axis`` (NaN-aware)."""
    with np.errstate(all="ignore"):
        return 1.4826 * np.expand_dims(_nanmedian(np.abs(resid), axis), axis)


def _masked(out: np.ndarray, mask: np.ndarray, value, fill: float = 0.0) -> np.ndarray:
    """``out[...] = where(mask, value, fill)`` without a temporary array.

    ``value`` is an array or a ``callable(out, where)`` writing into ``out``.
    The statistics below reuse one work array this way: on a [spot, exposure]
    set of a few hundred MB, fresh temporaries cost more than the arithmetic.
    """
    out.fill(fill)
    if callable(value):
        value(out, mask)
    else:
        np.copyto(out, value, where=mask)
    return out


def _masked_std(buf: np.ndarray, mask: np.ndarray, axis: int, ddof: int) -> np.ndarray:
    """Std along ``axis`` of the values in ``buf`` (zero where not ``mask``), two-pass as numpy's.

    ``buf`` is overwritten. Equals ``np.nanstd(where(mask, a, nan), axis, ddof=ddof)``.
    """
    n = count(mask, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = buf.sum(axis=axis) / n
        buf -= np.expand_dims(mean, axis)
        np.copyto(buf, 0.0, where=~mask)
        np.multiply(buf, buf, out=buf)
        var = buf.sum(axis=axis) / (n - ddof)
        return np.where(n - ddof > 0, np.sqrt(var), np.nan)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN-slice warnings: missing spots are expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def estimate_scales(flux: np.ndarray, stat: str = "clipped", sigma: float = 4.0,
                    maxiter: int = 50, tol: float = 1e-10, x: np.ndarray | None = None,
                    y: np.ndarray | None = None, exclude: np.ndarray | None = None,
                    segment: tuple[float, float] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """Jointly estimate spot means ``F`` and exposure scales ``s``.

    Points are rejected against their expectation, not only against their
    spot's mean: a point far from ``F[k] s[j]`` is kept when the other points
    that landed near the same pixels (given ``x``, ``y``) deviate the same way
    -- real response structure such as an amplifier seam or an edge, which
    the spot-vs-flat comparison is there to measure.

    Parameters
    ----------
    flux : numpy.ndarray
        ``f[k, j]``, shape ``(nspot, nexp)``; NaN where missing.
    stat : {"clipped", "mean", "median"}
        ``clipped`` is a mean after rejecting points more than ``sigma``
        robust standard deviations (MAD) from the current model ``F s``, the
        rejection being redone at every iteration.
    sigma : float
        Clipping threshold (``stat="clipped"`` only).
    maxiter : int
        Maximum number of alternations.
    tol : float
        Stop when ``F`` and ``s`` change by less than this (relative).
    x, y : numpy.ndarray, optional
        CCD positions of the points, shape of ``flux``: turns on the local
        expectation (see above). Without them a point is judged against
        ``F[k] s[j]`` alone.
    exclude : numpy.ndarray of bool, optional
        Exposures left out of ``F`` and ``s`` (bad exposures found by the
        quality control). Their ``s[j]`` is then fitted against ``F`` alone
        (a robust mean of ``f/F``) and none of their points is ``used``.
    segment : (float, float), optional
        Amplifier size (``nx``, ``ny`` pixels): neighbourhoods for the local
        expectation never straddle an amplifier seam.

    Returns
    -------
    F : numpy.ndarray
        Spot means, shape ``(nspot,)`` (NaN for spots never measured).
    s : numpy.ndarray
        Exposure scales, shape ``(nexp,)``, with ``median(s) = 1``.
    used : numpy.ndarray of bool
        Points used in the final estimate (finite and not clipped).
    niter : int
        Alternations done.
    converged : bool
        Whether ``tol`` was reached.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> F0, s0 = rng.uniform(1e4, 2e4, 50), rng.uniform(0.8, 1.2, 20)
    >>> f = F0[:, None] * s0[None, :]
    >>> F, s, used, n, ok = estimate_scales(f, stat="mean")
    >>> bool(np.allclose(F[:, None] * s[None, :], f)), float(np.median(s)), ok
    (True, 1.0, True)
    """
    if stat not in STATISTICS:
        raise InputError(f"unknown statistic {stat!r}", expected=" or ".join(STATISTICS))
    if not (np.isfinite(sigma) and sigma > 0):
        raise InputError(f"clipping threshold sigma={sigma!r}", expected="a finite number > 0 (--sigma)")
    f = np.asarray(flux, dtype=np.float64)
    if f.ndim != 2:
        raise InputError(f"flux must be 2-D [spot, exposure], got shape {f.shape}")
    finite = np.isfinite(f)
    finite &= f > 0
    if not finite.any():
        raise InputError("all fluxes are NaN or non-positive", expected="some measured spots")
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (f.shape[1],):
            raise InputError(f"exclude has shape {exclude.shape}, expected ({f.shape[1]},)")
        if exclude.any():
            if exclude.all():
                raise InputError("every exposure is excluded", expected="at least one good exposure")
            keep = ~exclude
            sub = lambda a: None if a is None else np.asarray(a)[:, keep]  # noqa: E731
            F, s_in, used_in, it, ok = estimate_scales(f[:, keep], stat, sigma, maxiter, tol,
                                                       sub(x), sub(y), None, segment)
            s = np.full(f.shape[1], np.nan)
            s[keep] = s_in
            s[exclude] = _fit_scales(f[:, exclude], F, sigma)
            used = np.zeros(f.shape, dtype=bool)
            used[:, keep] = used_in
            return F, s, used, it, ok
    if stat == "median":
        F, s, used, it, ok = _median_scales(f, finite, maxiter, tol)
        return F, _finite_scales(f, F, s, sigma), used, it, ok
    clipped = stat == "clipped"
    local = None
    if clipped and x is not None and y is not None:
        local = _Neighbourhoods(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64),
                                finite, segment)
    nspot, nexp = f.shape
    # the work goes by blocks of spots: each block's temporaries stay in cache and
    # no [spot, exposure]-sized array is made (fresh memory costs more than the sums)
    blocks = [slice(r, min(r + _BLOCK_ROWS, nspot)) for r in range(0, nspot, _BLOCK_ROWS)]
    used = finite
    new_used = np.empty_like(finite) if clipped else finite
    nk = count(used, axis=1).astype(np.float64)  # points per spot
    s = np.ones(nexp)
    F = np.full(nspot, np.nan)
    converged = False
    local_on = local is not None
    it = 0

    def sums(b):  # F[b] = sum_j f/s / n, and block b's part of sum_k f/F
        fb = np.where(used[b], f[b], 0.0)
        Fb = F_new[b] = (fb @ invs) / nk[b]
        return np.where(np.isfinite(Fb), 1.0 / Fb, 0.0) @ fb

    def clip(b):
        new_used[b], scale[b] = _keep(f[b], finite[b], used[b], invF[b], invs, sigma, robust=it == 1)

    # two threads share the blocks; the blocks' parts of s are added in block order
    with BlockPool(f.size) as pool:
        for it in range(1, maxiter + 1):
            F_new = np.empty(nspot)
            acc = np.zeros(nexp)
            with np.errstate(invalid="ignore", divide="ignore"):
                invs = np.where(np.isfinite(s), 1.0 / s, 0.0)  # an exposure with no points has no s
                for part in pool.map(sums, blocks):
                    acc += part
                known = np.isfinite(F_new)
                s_new = acc / count(used if known.all() else used[known], axis=0)
            F_new, s_new, change = _normalise(F_new, s_new, F, s)
            if clipped:
                with np.errstate(invalid="ignore", divide="ignore"):
                    invF, invs = 1.0 / F_new, 1.0 / s_new
                    scale = np.empty(nspot)
                    pool.map(clip, blocks)
                    if local_on:
                        local.rescue(f, finite, new_used, invF, invs, scale, sigma, pool)
            F, s = F_new, s_new
            changed = clipped and not np.array_equal(new_used, used)
            if changed:
                if used is finite:
                    used = np.empty_like(finite)
                used, new_used = new_used, used
                nk = count(used, axis=1).astype(np.float64)
            if not changed and change < tol and it > 1:
                converged = True
                break
    return F, _finite_scales(f, F, s, sigma), used, it, converged


def _fit_scales(f: np.ndarray, F: np.ndarray, sigma: float) -> np.ndarray:
    """``s[j]`` of each column of ``f`` against fixed ``F``: a clipped mean of ``f/F``.

    Starts from the median and rejects against it with a MAD scale, so that
    an exposure partly (even mostly) wrong still gets a finite scale from its
    largest consistent part.
    """
    with np.errstate(invalid="ignore", divide="ignore"), _quiet():
        r = f / F[:, None]
        r[~(np.isfinite(r) & (r > 0))] = np.nan
        med = _nanmedian(r, 0)
        for _ in range(3):
            dev = np.abs(r / med[None, :] - 1.0)
            mad = 1.4826 * _nanmedian(dev, 0)
            ok = dev <= sigma * np.maximum(mad, 1e-12)[None, :]
            med = np.nansum(np.where(ok, r, 0.0), 0) / np.count_nonzero(ok, 0)
    return med


def _finite_scales(f: np.ndarray, F: np.ndarray, s: np.ndarray, sigma: float) -> np.ndarray:
    """Give every exposure with measured spots a finite ``s`` (one whose points were all
    rejected gets its robust scale against ``F``), never a NaN."""
    bad = ~np.isfinite(s)
    if bad.any():
        s = s.copy()
        s[bad] = _fit_scales(f[:, bad], F, sigma)
    return s


class _Neighbourhoods:
    """Cells of CCD pixels, for the local expectation of a point's throughput.

    The cell size adapts to the density of points (about 16 per cell, between
    8 and 64 pixels); cells are aligned with the amplifier segments when their
    size is known, so none straddles a seam. A point whose cell holds fewer
    than :attr:`MIN_POINTS` is judged in the cell twice (then four times) as
    large, still inside its segment.
    """

    MIN_POINTS = 5
    PER_CELL = 16.0
    LEVELS = 3

    def __init__(self, x: np.ndarray, y: np.ndarray, finite: np.ndarray,
                 segment: tuple[float, float] | None) -> None:
        self.ok = finite & np.isfinite(x) & np.isfinite(y)
        self.x, self.y = x, y
        self.segment = segment
        self._cells: dict = {}
        self._model: dict = {}
        self._cell = None
        self._full = None  # every point's per-axis finest cells (:meth:`_axes`), for :meth:`cells`

    def cells(self, level: int) -> tuple[np.ndarray, int]:
        """``(cell index of every point (-1 where not ok), number of cells + 1)`` at ``level``.

        The finest cells' integer indices (segment, cell inside it) are computed
        once; a coarser level's cell inside its segment is the finest one's
        integer-divided by ``2 ** level`` -- exactly ``floor(u / (cell 2^level))``,
        since scaling by a power of two commutes with floating-point rounding --
        so no level recomputes the positions' floating-point arithmetic.
        """
        if level not in self._cells:
            ok = self.ok
            if self._cell is None:
                self._size()
            if self._full is None:
                self._full = self._axes(self.x, self.y, ok)
            cx, cy = self._level_xy(self._full, level)
            ny = 1
            if self._any:
                big = np.iinfo(cx.dtype).max
                cx -= cx.min(where=ok, initial=big)
                cy -= cy.min(where=ok, initial=big)
                ny = int(cy.max(where=ok, initial=0)) + 1
                if (int(cx.max(where=ok, initial=0)) + 1) * ny >= 2 ** 31 - 2 and cx.dtype != np.int64:
                    cx = cx.astype(np.int64)  # a huge spread of (garbage) positions
            cx *= ny
            cx += cy
            del cy
            np.copyto(cx, -1, where=~ok)
            self._cells[level] = (cx, int(cx.max()) + 2)
        return self._cells[level]

    def _size(self) -> None:
        """The cell size (from the density of the points) and the integer type of cell indices."""
        ok = self.ok
        self._any = bool(ok.any())
        npts = max(int(np.count_nonzero(ok)), 1)
        area, reach = 1.0, 0.0
        if self._any:  # the spread of x + 0.5 over the points (pixel edges at integers)
            with np.errstate(invalid="ignore"):
                lims = [(np.float64(a.min(where=ok, initial=np.inf)), np.float64(a.max(where=ok, initial=-np.inf)))
                        for a in (self.x, self.y)]
            ext = [(hi + 0.5) - (lo + 0.5) for lo, hi in lims]
            area = max(float(ext[0]) * float(ext[1]), 1.0)
            reach = max(abs(float(v)) for lim in lims for v in lim)
        self._cell = float(np.clip(np.sqrt(self.PER_CELL * area / npts), 8.0, 64.0))
        # cell indices in int32 (half the memory of int64) unless the positions reach too far
        self._itype = np.int32 if (reach + 1.0) / self._cell < 2 ** 29 else np.int64

    def _axes(self, x: np.ndarray, y: np.ndarray, ok: np.ndarray | None = None) -> tuple:
        """``(ix, lx, iy, ly)``: segment index (None without segments) and finest cell inside it,
        per axis, of positions ``x``, ``y`` (all of them, or where ``ok``; 0 elsewhere)."""
        sx, sy = self.segment if self.segment is not None else (np.inf, np.inf)
        seg = []
        for a, size in ((x, sx), (y, sy)):
            with np.errstate(invalid="ignore"):
                u = np.where(ok, a, 0.0) if ok is not None else a + 0.0
                u += 0.5
                if np.isfinite(size):
                    i = u / size
                    np.floor(i, out=i)
                    w = i * size
                    np.subtract(u, w, out=u)  # position inside the segment
                    del w
                else:
                    i = None
                np.divide(u, self._cell, out=u)
                np.floor(u, out=u)
            seg += [None if i is None else i.astype(self._itype), u.astype(self._itype)]
            del u, i
        return tuple(seg)

    def _level_xy(self, axes: tuple, level: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell column and row at ``level`` (not yet offset to start at 0) from :meth:`_axes`."""
        ix, lx, iy, ly = axes
        cell = self._cell * 2 ** level
        div = 2 ** level
        cx = lx // div if div > 1 else lx.copy()
        cy = ly // div if div > 1 else ly.copy()
        if self.segment is not None:
            sx, sy = self.segment
            cx += ix * int(np.ceil(sx / cell))
            cy += iy * int(np.ceil(sy / cell))
        return cx, cy

    @staticmethod
    def _ids(cx: np.ndarray, cy: np.ndarray, lims: tuple[int, int, int, int]) -> np.ndarray:
        """Cell ids ``(cx - x0) ny + (cy - y0)`` (``cx``, ``cy`` are overwritten); -1 outside
        ``lims = (x0, y0, nx, ny)``."""
        x0, y0, nx, ny = lims
        if nx * ny >= 2 ** 31 - 2 or cx.dtype != np.int32:
            cx, cy = cx.astype(np.int64), cy.astype(np.int64)
        cx -= x0
        cy -= y0
        out = (cx < 0) | (cx >= nx)
        out |= cy < 0
        out |= cy >= ny
        cx *= ny
        cx += cy
        cx[out] = -1
        return cx

    def rescue(self, f, finite, used, invF, invs, scale, sigma, pool: BlockPool | None = None) -> None:
        """Put back (in ``used``) the rejected points that agree with their neighbourhood.

        ``t`` is relative to each spot's own mean, i.e. to the response
        averaged over where that spot's dithers fell, which differs from spot
        to spot near a seam. So the expectation is a small model fitted to the
        points in use, ``log t[k, j] = r[cell] - a[k]`` (cell response, spot
        offset; a few alternating means), and a rejected point comes back when
        it is within ``sigma`` of its spot's scale of that expectation.
        """
        cand = finite & ~used & self.ok
        if not cand.any():
            return
        ks, js = nonzero(cand)  # (in memory order: which order does not matter here)
        with np.errstate(invalid="ignore", divide="ignore"):
            lt_c = np.log(f[ks, js] * invF[ks] * invs[js])
        if self._cell is None:
            self._size()
        axes = self._axes(self.x[ks, js], self.y[ks, js])
        for level in range(self.LEVELS):
            if ks.size == 0:
                return
            r, a, nc, lims = self._fit_model(level, f, used, invF, invs, pool)
            c = self._ids(*self._level_xy(axes, level), lims)
            enough = (c >= 0) & (nc[np.maximum(c, 0)] >= self.MIN_POINTS)
            with np.errstate(invalid="ignore"):
                agree = np.abs(lt_c - (r[c] - a[ks])) <= sigma * np.maximum(scale[ks], 1e-12)
            back = enough & agree
            if back.any():
                used[ks[back], js[back]] = True
            rest = ~enough
            ks, js, lt_c = ks[rest], js[rest], lt_c[rest]
            axes = tuple(None if v is None else v[rest] for v in axes)

    def _points(self, f, used, invF, invs, pool: BlockPool | None = None) -> tuple:
        """``(spot, log t, axes)`` of the points in use, gathered a chunk at a time (no
        [spot, exposure]-sized temporaries: fresh memory costs more here than the arithmetic);
        the chunks shared by the ``pool``'s threads."""
        if self._cell is None:
            self._size()
        # compressed to 1-D (one memory order for all, whatever each array's)
        order = "F" if f.flags.f_contiguous and not f.flags.c_contiguous else "C"
        good = used & self.ok
        flat = [a.ravel(order=order) for a in (good, f, self.x, self.y)]
        starts = list(range(0, good.size, _CHUNK))
        counts = [int(np.count_nonzero(flat[0][lo:lo + _CHUNK])) for lo in starts]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        n = int(offsets[-1])
        gk, gl = np.empty(n, np.intp), np.empty(n)
        # the per-axis arrays :meth:`_axes` returns (None for an axis without segments), full size
        axes = tuple(None if v is None else np.empty(n, v.dtype) for v in self._axes(np.empty(0), np.empty(0)))

        def chunk(i):  # written at its place (the chunks' sizes are known): no concatenation
            lo, at = starts[i], offsets[i]
            sel = np.flatnonzero(flat[0][lo:lo + _CHUNK])
            sel += lo
            k, j = np.unravel_index(sel, f.shape, order=order)
            out = slice(at, at + sel.size)
            lt = gl[out]
            with np.errstate(invalid="ignore", divide="ignore"):
                np.multiply(flat[1][sel], invF[k], out=lt)
                lt *= invs[j]
                np.log(lt, out=lt)
            gk[out] = k
            for dst, v in zip(axes, self._axes(flat[2][sel], flat[3][sel])):
                if dst is not None:
                    dst[out] = v
            fin = np.isfinite(lt)
            return None if fin.all() else (out, fin)

        bad = [r for r in (pool.map(chunk, range(len(starts))) if pool is not None
                           else [chunk(i) for i in range(len(starts))]) if r is not None]
        if bad:  # points whose log t is not finite (rare): left out
            keep = np.ones(n, dtype=bool)
            for out, fin in bad:
                keep[out] = fin
            gk, gl = gk[keep], gl[keep]
            axes = tuple(None if v is None else v[keep] for v in axes)
        return gk, gl, axes

    def _fit_model(self, level: int, f, used, invF, invs, pool: BlockPool | None = None):
        """``(r, a, count, lims)`` of the cell-response model at ``level``, fitted once;
        ``lims`` place a cell column and row in ``r`` (:meth:`_ids`).

        It is fitted to the points in use when the level is first needed (after
        the first, robust, rejection pass for the finest cells) and kept: later
        passes change the set of points in use by a few rejected points only
        (refitting changes no verdict in the seam Monte Carlo, and costs
        iterations).
        """
        if level not in self._model:
            gk, gl, axes = self._points(f, used, invF, invs, pool)
            cx, cy = self._level_xy(axes, level)
            del axes
            if cx.size:
                x0, y0 = int(cx.min()), int(cy.min())
                lims = (x0, y0, int(cx.max()) - x0 + 1, int(cy.max()) - y0 + 1)
            else:
                lims = (0, 0, 1, 1)
            gc = self._ids(cx, cy, lims)
            del cy
            self._model[level] = cell_means(gk, gc, gl, f.shape[0], lims[2] * lims[3], niter=3) + (lims,)
        return self._model[level]


def cell_means(gk: np.ndarray, gc: np.ndarray, gl: np.ndarray, nspot: int, ncell: int, niter: int):
    """``(r, a, count)`` of ``gl ~ r[gc] - a[gk]`` by ``niter`` alternating means
    (spot index ``gk``, cell index ``gc`` of each point); ``count`` per cell."""
    gk = np.asarray(gk, dtype=np.intp)  # once: bincount would cast int32 indices on every call
    gc = np.asarray(gc, dtype=np.intp)
    nk = np.bincount(gk, minlength=nspot).astype(np.float64)
    nc = np.bincount(gc, minlength=ncell).astype(np.float64)
    r = np.zeros(ncell)
    a = np.zeros(nspot)
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(niter):
            a = np.bincount(gk, weights=r[gc] - gl, minlength=nspot) / nk
            a[nk == 0] = 0.0
            r = np.bincount(gc, weights=gl + a[gk], minlength=ncell) / nc
    r[~np.isfinite(r)] = 0.0
    return r, a, nc


def _normalise(F_new: np.ndarray, s_new: np.ndarray, F: np.ndarray, s: np.ndarray):
    """Impose ``median(s) = 1`` on one alternation's estimate; also the largest relative change."""
    with np.errstate(invalid="ignore", divide="ignore"), _quiet():
        norm = np.nanmedian(s_new)
        s_new, F_new = s_new / norm, F_new * norm
        dF = np.nanmax(np.abs(F_new / F - 1.0)) if np.isfinite(F).any() else np.inf
        ds = np.nanmax(np.abs(s_new / s - 1.0))
    return F_new, s_new, max(dF, ds)


#: Points per chunk when the cell model's points are gathered (:meth:`_Neighbourhoods._points`).
_CHUNK = 1 << 18

#: Spots per block in :func:`estimate_scales` (a block of 1400 exposures is ~0.7 MB).
_BLOCK_ROWS = 64


def _keep(f: np.ndarray, finite: np.ndarray, used: np.ndarray, invF: np.ndarray, invs: np.ndarray,
          sigma: float, robust: bool) -> np.ndarray:
    """Sigma-clipping test of one block of spots against the model ``F s``.

    The scale is the normalised MAD of the points in use (``robust``, the first
    pass, so gross outliers cannot inflate it), otherwise their plain std, as
    in classic sigma clipping.
    """
    resid = np.where(finite, f, 0.0) * invF[:, None]
    resid *= invs[None, :]
    resid -= 1.0
    if robust:
        scale = _robust_sigma(np.where(used, resid, np.nan), axis=1)
    else:
        n = count(used, axis=1)[:, None].astype(np.float64)
        r0 = np.where(used, resid, 0.0)
        mean = r0.sum(axis=1, keepdims=True) / n
        r0 *= resid
        scale = np.sqrt(np.maximum(r0.sum(axis=1, keepdims=True) / n - mean ** 2, 0.0) * n / (n - 1))
    return finite & ~(np.abs(resid) > sigma * np.maximum(scale, 1e-12)), scale[:, 0]


def _median_scales(f: np.ndarray, finite: np.ndarray, maxiter: int, tol: float):
    """:func:`estimate_scales` with ``stat="median"``."""
    fu = np.where(finite, f, np.nan)
    s = np.ones(f.shape[1])
    F = np.full(f.shape[0], np.nan)
    converged = False
    it = 0
    for it in range(1, maxiter + 1):
        with np.errstate(invalid="ignore", divide="ignore"):
            F_new = _nanmedian(fu / s[None, :], 1)
            s_new = _nanmedian(fu / F_new[:, None], 0)
        F, s, change = _normalise(F_new, s_new, F, s)
        if change < tol and it > 1:
            converged = True
            break
    return F, s, finite, it, converged


@dataclass
class Calibration:
    """A calibration catalogue: per-spot and per-exposure tables.

    Attributes
    ----------
    spots : astropy.table.Table
        One row per grid point: ``spotgrid_index``, ``grid_col``, ``grid_row``,
        ``flux`` (``F[k]``, the chosen statistic), ``flux_err`` (its standard
        error), ``flux_std`` (scatter of ``f/s`` over dithers), ``flux_mean``,
        ``flux_median``, ``flux_clipped``, ``ndither`` (dithers used),
        ``nmeasured``, mean position ``x``, ``y`` and its scatter, mean
        ``dx``, ``dy``, ``xx``, ``yy``, ``xy``, ``t_std`` (scatter of the
        relative throughput) and ``valid`` (enough dithers).
    exposures : astropy.table.Table
        One row per exposure: the columns of :attr:`SpotGrids.exposures` plus
        ``scale`` (``s[j]``), ``scale_err``, ``nused`` and ``t_std``.
    meta : dict
        Provenance: statistic, flux column, detector, input count, ...
    used : numpy.ndarray of bool or None
        ``[spot, exposure]``: the points the estimate of ``F`` and ``s`` used
        (measured, positive and not clipped). Stored in the FITS catalogue
        (HDU ``USED``); None for a catalogue read from ECSV or written by an
        earlier spotflat.
    qc : astropy.table.Table or None
        Per-exposure quality-control metrics (:func:`spotflat.qc.run_qc`);
        written as ``qc.ecsv`` beside the catalogue by ``spotflat calibrate``.
    """

    spots: Table
    exposures: Table
    meta: dict = field(default_factory=dict)
    used: np.ndarray | None = None
    qc: Table | None = None

    @property
    def detector(self) -> str:
        """Detector name the catalogue belongs to."""
        return str(self.meta.get("DETECTOR", ""))

    @property
    def F(self) -> np.ndarray:
        """Spot means ``F[k]`` (NaN for spots that are not valid)."""
        return np.asarray(self.spots["flux"], dtype=float)

    @property
    def s(self) -> np.ndarray:
        """Exposure scales ``s[j]``."""
        return np.asarray(self.exposures["scale"], dtype=float)

    def relative_throughput(self, grids: SpotGrids, clip: bool = True) -> np.ndarray:
        """``t[k, j] = f[k, j] / (F[k] s[j])`` for matching spot data.

        Parameters
        ----------
        grids : SpotGrids
            The stacked measurements the catalogue was built from (same
            exposures, in the same order: checked by file name).
        clip : bool
            For a clipped catalogue, set the points the estimator rejected to
            NaN (:attr:`used`), so that ``t`` holds exactly the points ``F``
            and ``s`` were made from. A catalogue without :attr:`used` (ECSV,
            or older files) falls back to the estimator's first, robust pass:
            points more than ``SIGCLIP`` robust (MAD) standard deviations from
            their spot's mean; that set can differ by a few marginal points.

        Returns
        -------
        numpy.ndarray
            Shape ``(nspot, nexp)``.
        """
        check_matches(self, grids)
        if self.meta.get("FLUXCOL") not in (None, grids.flux_column):
            raise InputError(f"spot data use flux column {grids.flux_column!r} but the catalogue "
                             f"was built from {self.meta.get('FLUXCOL')!r}")
        with np.errstate(invalid="ignore", divide="ignore"):
            t = grids.flux / (self.F[:, None] * self.s[None, :])
        t[~np.isfinite(t)] = np.nan
        if not (clip and self.meta.get("STAT") == "clipped"):
            return t
        if self.used is not None:
            if self.used.shape != t.shape:
                raise InputError(f"catalogue's USED mask has shape {self.used.shape}, spot data {t.shape}")
            t[~self.used] = np.nan
        else:
            sig = float(self.meta.get("SIGCLIP", 4.0))
            scale = _robust_sigma(t - 1.0, axis=1)
            with np.errstate(invalid="ignore"):
                t[np.abs(t - 1.0) > sig * np.maximum(scale, 1e-12)] = np.nan
        return t


def check_matches(calib: Calibration, grids: SpotGrids) -> None:
    """Raise :class:`InputError` unless ``grids`` holds the catalogue's exposures."""
    if grids.nspot != len(calib.spots):
        raise InputError(f"spot data have {grids.nspot} grid points, the calibration {len(calib.spots)}")
    a = [str(x) for x in calib.exposures["filename"]]
    b = [str(x) for x in grids.exposures["filename"]]
    if a != b:
        missing = sorted(set(a) - set(b))[:3]
        raise InputError("spot data and calibration catalogue hold different exposures"
                         + (f" (e.g. {', '.join(missing)} is not in the spot data)" if missing else ""),
                         expected="the files the catalogue was built from")
    det = calib.detector
    if det and grids.detector and det != grids.detector:
        raise InputError(f"calibration is for {det}, spot data for {grids.detector}")


def _segment(detector: str) -> tuple[float, float] | None:
    """Amplifier size (nx, ny) of a known detector, for the point rejection's neighbourhoods."""
    if not detector:
        return None
    try:
        from .geometry import get_camera

        d = get_camera().detector(detector)
        nrow, ncol = d.type.amp_grid.shape
        ny, nx = d.shape
        return nx / ncol, ny / nrow
    except Exception:  # unknown name: no seams to align to
        return None


def _point_statistics(grids: SpotGrids, F: np.ndarray, s: np.ndarray, used: np.ndarray, stat: str,
                      min_dithers: int) -> dict:
    """The per-spot and per-exposure statistics of the catalogue, given the fit (arrays only).

    Every per-point quantity goes through one work array (see :func:`_masked`).
    """
    f = grids.flux
    buf = np.empty_like(f)
    measured = np.isfinite(f) & np.isfinite(s)[None, :]
    n_all = count(measured, axis=1)
    n = count(used, axis=1)
    out = {"n": n, "n_all": n_all}

    def scaled(out, where):  # f / s
        np.divide(f, s[None, :], out=out, where=where)

    def throughput(out, where):  # t = f / (F s)
        np.multiply(F[:, None], s[None, :], out=out, where=where)
        np.divide(f, out, out=out, where=where)

    def mean_used(a) -> np.ndarray:
        return _masked(buf, used, a).sum(axis=1) / n

    def std_used(a, ddof: int = 0) -> np.ndarray:
        return _masked_std(_masked(buf, used, a), used, axis=1, ddof=ddof)

    with np.errstate(invalid="ignore", divide="ignore"):
        out["flux_mean"] = _masked(buf, measured, scaled).sum(axis=1) / n_all
        out["flux_clipped"] = mean_used(scaled)
        out["flux_std"] = std_used(scaled, ddof=1)
        _masked(buf, measured, scaled, fill=np.nan).sort(axis=1)  # NaNs last
        out["flux_median"] = _sorted_median(buf)
    eff = _MEDIAN_EFF if stat == "median" else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        out["flux_err"] = eff * out["flux_std"] / np.sqrt(n)
    valid = out["valid"] = (n >= min_dithers) & np.isfinite(F)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["x"] = mean_used(grids.x)
        out["y"] = mean_used(grids.y)
        out["x_std"] = std_used(grids.x)
        out["y_std"] = std_used(grids.y)
        for q in ("dx", "dy", "xx", "yy", "xy"):
            out[q] = mean_used(getattr(grids, q))
        out["t_std"] = std_used(throughput)
    excluded = ~used.any(axis=0) & measured.any(axis=0)  # left out by the exposure QC
    out["nclipped"] = np.where(excluded, 0, count(measured & ~used, axis=0))
    good = used & valid[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        nused = out["nused"] = count(good, axis=0)
        # s[j] is an average over spots of f/F: the fixed response pattern the
        # spots sample is common to all exposures and cancels, so only the
        # measurement noise moves s. Use the measured flux errors when the
        # files give them; otherwise the scatter over spots (conservative).
        with_err = good & np.isfinite(grids.flux_err)
        measured_err = out["measured_err"] = bool(np.count_nonzero(with_err) >= 0.9 * nused.sum() and with_err.any())
        if measured_err:
            def rel2(out, where):  # (flux_err / f)^2
                np.divide(grids.flux_err, f, out=out, where=where)
                np.multiply(out, out, out=out)

            _masked(buf, with_err, rel2)
            out["scale_err"] = eff * s * np.sqrt(buf.sum(axis=0)) / count(with_err, axis=0)
            out["flux_err_stat"] = np.where(valid, eff * F * np.sqrt(buf.sum(axis=1))
                                            / count(with_err, axis=1), np.nan)
        else:
            def ratio(out, where):  # f / F
                np.divide(f, F[:, None], out=out, where=where)

            s_std = _masked_std(_masked(buf, good, ratio), good, axis=0, ddof=1)
            out["scale_err"] = eff * s_std / np.sqrt(nused)
            out["flux_err_stat"] = np.full(len(F), np.nan)
        out["exp_t_std"] = _masked_std(_masked(buf, good, throughput), good, axis=0, ddof=0)
    return out


def build_calibration(grids: SpotGrids, stat: str = "clipped", min_dithers: int = 3,
                      sigma: float = 4.0, maxiter: int = 50, tol: float = 1e-10,
                      qc=True, on_qc: Callable[[Table], None] | None = None) -> Calibration:
    """Build the calibration catalogue from stacked processed-grid data.

    Parameters
    ----------
    grids : SpotGrids
        From :func:`spotflat.read_grids`.
    stat : {"clipped", "mean", "median"}
        Statistic for ``F`` and ``s`` (see :func:`estimate_scales`). The
        sigma-clipped mean is robust to the outliers real data has.
    min_dithers : int
        Spots measured (and kept) in fewer exposures get ``valid = False`` and
        NaN ``flux``: their mean is too poorly known to compare with the flat.
    sigma, maxiter, tol
        Passed to :func:`estimate_scales`.
    qc : bool or spotflat.qc.QCOptions
        Exposure-level quality control (:func:`spotflat.qc.run_qc`, on by
        default): outlier exposures are left out of ``F`` and ``s`` and kept
        in the EXPOSURES table with ``used = False`` and a ``reason``.
        ``False`` fits every exposure (the point-level rejection stays).
    on_qc : callable, optional
        Called with the QC table (:attr:`Calibration.qc`) as soon as the
        exposure quality control is decided: its per-exposure metrics, grid
        centres and ``used``/``reason`` (everything :func:`spotflat.qcplot.plot_qc`
        shows), before the brighter-fatter columns are added and the per-spot
        statistics computed -- e.g. to draw the QC figure elsewhere meanwhile
        (``spotflat calibrate``).

    Returns
    -------
    Calibration

    Raises
    ------
    InputError
        When fluxes are all NaN, or fewer exposures than ``min_dithers``.

    Examples
    --------
    >>> grids = spotflat.read_grids("spotdata/")              # doctest: +SKIP
    >>> cal = spotflat.build_calibration(grids, stat="clipped", min_dithers=5)  # doctest: +SKIP
    >>> cal.spots["spotgrid_index", "flux", "flux_err", "ndither"][:3]          # doctest: +SKIP
    """
    from astropy.table import Table

    if min_dithers < 1:
        raise InputError(f"min_dithers must be at least 1, got {min_dithers}")
    if grids.nexp < min_dithers:
        names = ", ".join(map(str, grids.exposures["filename"][:3])) + (", ..." if grids.nexp > 3 else "")
        raise InputError(f"only {grids.nexp} exposure(s) ({names}), fewer than min_dithers={min_dithers}",
                         path=grids.exposures["path"][0] if grids.nexp == 1 else None,
                         expected="more dithers, or min_dithers=1 (--min-dithers 1) for a single exposure")
    f = grids.flux
    segment = _segment(grids.detector)
    qc_result = None
    if qc is False or qc is None:
        F, s, used, niter, converged = estimate_scales(f, stat=stat, sigma=sigma, maxiter=maxiter, tol=tol,
                                                       x=grids.x, y=grids.y, segment=segment)
        st = _point_statistics(grids, F, s, used, stat, min_dithers)
    else:
        from concurrent.futures import ThreadPoolExecutor

        from .qc import QCOptions, _qc_bf, _qc_fit, _qc_table

        opts = qc if isinstance(qc, QCOptions) else QCOptions()
        # The per-point statistics need only the final fit, and the first fit is
        # the final one unless the QC excludes an exposure: they are computed from
        # it on a second core (whole-array numpy work, which runs without the GIL)
        # while this thread scores the exposures and does the brighter-fatter QC.
        # Not with re-registration, which relabels grids.flux in place.
        ahead: list = []
        with ThreadPoolExecutor(1) as pool:
            def on_fit(res):
                if not ahead and not opts.register:
                    ahead.append((res, pool.submit(_point_statistics, grids, *res[:3], stat, min_dithers)))

            state = _qc_fit(grids, stat, sigma, opts, segment, maxiter, tol, on_fit=on_fit)
            F, s, used, niter, converged = state.res
            if ahead and ahead[0][0] is state.res:
                job = ahead[0][1]
            else:  # refitted: the statistics of the final fit, beside the brighter-fatter QC
                if ahead:
                    ahead[0][1].cancel()
                job = pool.submit(_point_statistics, grids, F, s, used, stat, min_dithers)
            table = _qc_table(state)
            if on_qc is not None:
                on_qc(table)
            try:
                qc_result = _qc_bf(state, table)
            finally:
                st = job.result()
    valid, n = st["valid"], st["n"]
    if not valid.any():  # nothing to write: a failed calibration is an error, not a file
        where = grids.exposures["path"][0] if grids.nexp == 1 else os.path.commonpath(
            [str(p) for p in grids.exposures["path"]])
        raise InputError(f"no spot was measured in at least min_dithers={min_dithers} of the {grids.nexp} "
                         "exposures (or every point was rejected)", path=where,
                         expected="usable fluxes; check --flux-column, or lower --min-dithers")
    ncols, nrows = grids.grid_shape
    k = np.arange(grids.nspot)

    spots = Table()
    spots["spotgrid_index"] = k
    spots["grid_col"] = k // nrows
    spots["grid_row"] = k % nrows
    spots["flux"] = np.where(valid, F, np.nan)
    spots["flux_err"] = np.where(valid, st["flux_err"], np.nan)
    for c in ("flux_std", "flux_mean", "flux_median", "flux_clipped"):
        spots[c] = st[c]
    spots["ndither"] = n.astype(np.int64)
    spots["nmeasured"] = st["n_all"].astype(np.int64)
    for c in ("x", "y", "x_std", "y_std", "dx", "dy", "xx", "yy", "xy", "t_std"):
        spots[c] = st[c]
    spots["valid"] = valid
    units = {"flux": "ct", "flux_err": "ct", "flux_std": "ct", "flux_mean": "ct", "flux_median": "ct",
             "flux_clipped": "ct", "x": "pix", "y": "pix", "x_std": "pix", "y_std": "pix",
             "dx": "pix", "dy": "pix", "xx": "pix2", "yy": "pix2", "xy": "pix2"}
    for name, unit in units.items():
        spots[name].unit = unit
    spots["flux"].description = f"F[k], {stat} of f/s over dithers"

    exposures = grids.exposures.copy()
    counts = grids.flag_counts()
    exposures["nfar"] = counts["far"].astype(np.int64)
    exposures["nambiguous"] = counts["ambiguous"].astype(np.int64)
    exposures["nclipped"] = st["nclipped"].astype(np.int64)
    if qc_result is not None:
        q = qc_result.table
        exposures["used"] = np.asarray(q["used"], dtype=bool)
        exposures["reason"] = np.asarray([r or "-" for r in q["reason"]], dtype=str)
        for c in ("t_scatter", "pattern_r", "rejected_fraction", "x_centre", "y_centre",
                  "registration", "bf_flag"):
            exposures[c] = q[c]
    else:
        exposures["used"] = np.ones(len(exposures), dtype=bool)
        exposures["reason"] = np.full(len(exposures), "-", dtype=str)
    exposures["scale"] = s
    exposures["scale_err"] = st["scale_err"]
    spots["flux_err_stat"] = st["flux_err_stat"]
    spots["flux_err_stat"].unit = "ct"
    spots["flux_err_stat"].description = "error of F[k] from the measured flux errors only"
    exposures["nused"] = st["nused"].astype(np.int64)
    exposures["t_std"] = st["exp_t_std"]
    exposures["scale"].description = "s[j], exposure scale, median(s) = 1"
    measured_err = st["measured_err"]

    paths = [Path(p) for p in grids.exposures["path"]]
    common = os.path.commonpath([str(p.parent) for p in paths]) if paths else ""
    meta = {
        "DETECTOR": grids.detector,
        "NINPUT": grids.nexp,
        "NSPOT": grids.nspot,
        "NVALID": int(valid.sum()),
        "STAT": stat,
        "FLUXCOL": grids.flux_column,
        "MINDITH": int(min_dithers),
        "SIGCLIP": float(sigma),
        "NITER": int(niter),
        "CONVERGD": bool(converged),
        "INPUTDIR": common,
        "SERRMETH": "measured" if measured_err else "scatter",
        "MAXOFFS": float(grids.meta.get("max_offset", 0.0)) if np.isfinite(grids.meta.get("max_offset", 0.0)) else 0.0,
        "NFAR": int(exposures["nfar"].sum()),
        "NAMBIG": int(exposures["nambiguous"].sum()),
        "NCLIPPED": int(exposures["nclipped"].sum()),
        "NEXCL": int(np.count_nonzero(~np.asarray(exposures["used"]))),
        "QC": qc_result is not None,
    }
    if qc_result is not None:
        meta["NREGIST"] = len(qc_result.registered)
        if qc_result.spot_bf is not None:
            spots["bf_flag"] = qc_result.spot_bf
    return Calibration(spots=spots, exposures=exposures, meta=meta, used=used,
                       qc=None if qc_result is None else qc_result.table)


def _hdu(table: Table, name: str) -> fits.BinTableHDU:
    from astropy.io import fits

    hdu = fits.table_to_hdu(table)
    hdu.name = name
    return hdu


def _used_hdu(used: np.ndarray) -> fits.ImageHDU:
    """The ``[spot, exposure]`` mask of points used, bit-packed along exposures."""
    from astropy.io import fits

    hdu = fits.ImageHDU(np.packbits(used, axis=1), name="USED")
    hdu.header["NSPOT"] = (used.shape[0], "spots (image rows)")
    hdu.header["NEXP"] = (used.shape[1], "exposures (bits along each row)")
    hdu.header["COMMENT"] = "1 = point used for F[k] and s[j]; numpy.packbits, big bit order"
    return hdu


def _read_used(hdu, path: Path, nspot: int, nexp: int) -> np.ndarray:
    shape = (int(hdu.header.get("NSPOT", -1)), int(hdu.header.get("NEXP", -1)))
    if shape != (nspot, nexp) or hdu.data is None or hdu.data.shape != (nspot, -(-nexp // 8)):
        raise InputError(f"USED mask of shape {shape} does not match {nspot} spots x {nexp} exposures",
                         path=path)
    return np.unpackbits(np.asarray(hdu.data, dtype=np.uint8), axis=1, count=nexp).astype(bool)


def write_calibration(calib: Calibration, path: str | os.PathLike, ecsv: bool = False,
                      overwrite: bool = True) -> list[Path]:
    """Write the catalogue as FITS (and optionally ECSV), atomically.

    The FITS file has a primary HDU with provenance (package version, date,
    detector, statistic, flux column, input count, ...), the HDUs ``SPOTS``
    and ``EXPOSURES``, and ``USED``, the bit-packed ``[spot, exposure]`` mask
    of the points the estimate used. With ``ecsv=True`` two ECSV files are
    written beside it, ``<stem>_spots.ecsv`` and ``<stem>_exposures.ecsv``,
    carrying the same metadata (not the mask).

    Parameters
    ----------
    calib : Calibration
    path : str or os.PathLike
        Output FITS file.
    ecsv : bool
        Also write the ECSV pair.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from astropy.io import fits

    path = Path(path)
    cards = provenance_cards(**calib.meta)
    primary = fits.PrimaryHDU()
    for key, value in cards.items():
        primary.header[key] = value
    primary.header["COMMENT"] = "spotflat calibration catalogue: HDU SPOTS (F[k]) and EXPOSURES (s[j])"
    spots, exposures = calib.spots.copy(), calib.exposures.copy()
    spots.meta, exposures.meta = {}, {}
    exposures = fits_table_safe(exposures)  # paths with non-ASCII characters
    hdul = fits.HDUList([primary, _hdu(spots, "SPOTS"), _hdu(exposures, "EXPOSURES")])
    if calib.used is not None:
        hdul.append(_used_hdu(calib.used))
    written = []
    inputs = [p for p in calib.exposures["path"]] if "path" in calib.exposures.colnames else []
    with staged_outputs(inputs=inputs):  # the FITS file and the ECSV pair appear together
        with atomic_path(path, overwrite=overwrite) as tmp:
            hdul.writeto(tmp)
        written.append(path)
        if ecsv:
            for name, table in (("spots", calib.spots), ("exposures", calib.exposures)):
                out = path.with_name(f"{path.stem}_{name}.ecsv")
                t = table.copy()
                t.meta = dict(cards)
                with atomic_path(out, overwrite=overwrite) as tmp:
                    t.write(tmp, format="ascii.ecsv")
                written.append(out)
    return written


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Read a catalogue written by :func:`write_calibration` (FITS or ECSV).

    Parameters
    ----------
    path : str or os.PathLike
        The FITS file, or the ``<stem>_spots.ecsv`` of an ECSV pair.

    Returns
    -------
    Calibration

    Raises
    ------
    InputError
        When the file is missing, unreadable or not a spotflat calibration.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path=path, expected="a calibration catalogue")
    with reading(path, "a spotflat calibration catalogue"):
        check_readable(path, "a spotflat calibration catalogue")
        return _read_calibration(path)


def _read_calibration(path: Path) -> Calibration:
    from astropy.io import fits
    from astropy.table import Table

    used = None
    try:
        if path.suffix == ".ecsv":
            spots = Table.read(path, format="ascii.ecsv")
            exp_path = path.with_name(path.name.replace("_spots.ecsv", "_exposures.ecsv"))
            exposures = Table.read(exp_path, format="ascii.ecsv")
            meta = dict(spots.meta)
            spots.meta, exposures.meta = {}, {}
        else:
            with fits.open(path) as hdul:
                if "SPOTS" not in hdul or "EXPOSURES" not in hdul:
                    raise InputError("not a spotflat calibration catalogue", path=path,
                                     expected="HDUs SPOTS and EXPOSURES")
                meta = {k: v for k, v in hdul[0].header.items()
                        if k not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "COMMENT", "")}
                shape = (hdul["SPOTS"].header.get("NAXIS2", 0), hdul["EXPOSURES"].header.get("NAXIS2", 0))
                if "USED" in hdul:
                    used = _read_used(hdul["USED"], path, *shape)
            spots = Table.read(path, hdu="SPOTS")
            exposures = Table.read(path, hdu="EXPOSURES")
            spots.meta = {}
            exposures = fits_table_unescape(exposures)
            exposures.meta = {}
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read calibration catalogue ({exc})", path=path) from None
    for t in (spots, exposures):
        for name in t.colnames:
            if t[name].dtype.kind == "S":
                t[name] = t[name].astype(str)
    missing = [c for c in ("spotgrid_index", "flux", "flux_err") if c not in spots.colnames] + \
              [c for c in ("filename", "scale") if c not in exposures.colnames]
    if missing:
        raise InputError(f"calibration catalogue lacks columns {', '.join(missing)}", path=path)
    _check_values(spots, exposures, path)
    return Calibration(spots=spots, exposures=exposures, meta=meta, used=used)


def _check_values(spots: Table, exposures: Table, path: Path) -> None:
    """A damaged catalogue fails here, naming the file, not deep inside a later step."""
    for t, cols in ((spots, ("spotgrid_index", "flux", "flux_err", "x", "y")),
                    (exposures, ("scale", "ncols", "nrows", "x0", "y0"))):
        for c in cols:
            if c in t.colnames and (t[c].ndim != 1 or t[c].dtype.kind not in "biuf"):
                raise InputError(f"column {c!r} is not a numeric scalar column", path=path,
                                 expected="a catalogue written by spotflat calibrate")
    k = np.asarray(spots["spotgrid_index"])
    if len(k) == 0 or len(exposures) == 0 or not np.array_equal(k, np.arange(len(k))):
        raise InputError("spot indices are not 0 .. nspot-1, or no spot/exposure", path=path,
                         expected="a catalogue written by spotflat calibrate")
    if "ncols" in exposures.colnames and "nrows" in exposures.colnames:
        n = np.asarray(exposures["ncols"], float) * np.asarray(exposures["nrows"], float)
        if not np.all(n == len(k)):
            raise InputError(f"grid size in EXPOSURES does not match the {len(k)} spots", path=path)
    with np.errstate(invalid="ignore"):
        for c in ("x", "y"):
            v = np.asarray(spots[c], float) if c in spots.colnames else np.zeros(1)
            if np.any(np.abs(v) > 1e6):
                raise InputError(f"spot positions {c!r} beyond 1e6 pixels", path=path,
                                 expected="CCD pixel positions")
        scale = np.asarray(exposures["scale"], float)
        if np.any(scale <= 0) or np.any(np.isinf(scale)):
            raise InputError("exposure scales must be positive and finite (or NaN for a rejected exposure)",
                             path=path)
