"""Resampling machinery for :mod:`spotflat.stats`: bootstrap, jackknife, null.

Everything here works on *spots* as the resampling unit (all dithers of one
spot share ``F[k]`` and move together) and is vectorised:

* :func:`bootstrap_counts` draws how many times each spot enters each
  bootstrap resample, so that any statistic built from per-spot sums costs
  one small matrix product for all resamples;
* :func:`jackknife_se`, :func:`percentile_interval` and :func:`bca_interval`
  turn replicates into errors and intervals;
* :func:`patch_labels` groups spots into square spatial patches of the spot
  grid for the block jackknife;
* :func:`null_correlations` builds the null distribution of the correlation
  by pairing spot ``k``'s series of ``a`` with the series of ``b`` at the grid
  position ``pi(k)``, where ``pi`` is a toroidal shift of the spot grid
  composed with one of its rotations/flips (:func:`null_permutation` gives the
  explicit pairing). Exposures stay aligned, so the flat keeps its spatial
  structure. All shifts of one rotation/flip are evaluated together as a 2-D
  cyclic cross-correlation with FFTs over the spot grid, summed over the
  exposures: the cost is a few FFTs of the ``[exposure, column, row]`` cube,
  much less than the ``nspot x nspot`` cross-product matrix.

The spot grid convention is the mixcoatl one used throughout spotflat: spot
``k`` of a complete ``nrows x ncols`` grid has grid column ``k // nrows`` and
grid row ``k % nrows``.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy.special import ndtr, ndtri

from .errors import InputError

__all__ = [
    "bootstrap_counts",
    "jackknife_se",
    "percentile_interval",
    "bca_interval",
    "patch_labels",
    "SYMMETRIES",
    "null_permutation",
    "null_correlations",
]

#: The 8 symmetries of a square grid as ``(swap, (e0, e1))``: grid position
#: ``x = (column, row)`` goes to ``d @ P @ x`` where ``P`` swaps the two axes
#: when ``swap`` and ``d = diag(e0, e1)``. Elements 0-3 (no swap) exist for any
#: grid; 4-7 need a square one. Names: identity, rotate180, flip-column,
#: flip-row, transpose, anti-transpose, rotate90, rotate270.
SYMMETRIES = (
    (False, (1, 1)), (False, (-1, -1)), (False, (-1, 1)), (False, (1, -1)),
    (True, (1, 1)), (True, (-1, -1)), (True, (-1, 1)), (True, (1, -1)),
)


def bootstrap_counts(nunits: int, nboot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each unit enters each bootstrap resample.

    Parameters
    ----------
    nunits : int
        Number of resampling units (spots).
    nboot : int
        Number of resamples.
    rng : numpy.random.Generator
        Random generator.

    Returns
    -------
    numpy.ndarray
        Integer array ``(nboot, nunits)``; every row sums to ``nunits``.

    Examples
    --------
    >>> w = bootstrap_counts(5, 3, np.random.default_rng(0))
    >>> w.shape, w.sum(axis=1).tolist()
    ((3, 5), [5, 5, 5])
    """
    draws = rng.integers(0, nunits, size=(nboot, nunits))
    draws += np.arange(nboot)[:, None] * nunits
    return np.bincount(draws.ravel(), minlength=nboot * nunits).reshape(nboot, nunits)


def jackknife_se(theta: np.ndarray) -> float:
    """Jackknife standard error from delete-one (or delete-a-block) replicates.

    ``sqrt((G - 1) / G * sum((theta_g - mean(theta))**2))`` for ``G``
    replicates; unequal block sizes are treated as equal (the usual
    delete-a-group approximation).

    Parameters
    ----------
    theta : array_like
        The statistic recomputed with each unit (block) left out.

    Returns
    -------
    float
        NaN with fewer than two finite replicates.

    Examples
    --------
    >>> round(jackknife_se([0.9, 1.0, 1.1]), 6)
    0.11547
    """
    theta = np.asarray(theta, dtype=float)
    theta = theta[np.isfinite(theta)]
    g = theta.size
    if g < 2:
        return float("nan")
    return float(np.sqrt((g - 1) / g * np.sum((theta - theta.mean()) ** 2)))


def percentile_interval(boot: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Bootstrap percentile interval.

    Parameters
    ----------
    boot : array_like
        Bootstrap replicates (non-finite ones are ignored).
    confidence : float
        Central coverage.

    Returns
    -------
    (float, float)
        Lower and upper limits (NaN when there are no replicates).
    """
    boot = np.asarray(boot, dtype=float)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bca_interval(theta_hat: float, boot: np.ndarray, jack: np.ndarray,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Bias-corrected and accelerated (BCa) bootstrap interval.

    Parameters
    ----------
    theta_hat : float
        The statistic on the full sample.
    boot : array_like
        Bootstrap replicates.
    jack : array_like
        Delete-one jackknife replicates; they give the acceleration
        ``a = sum(d**3) / (6 * sum(d**2)**1.5)`` with ``d = mean(jack) - jack``.
    confidence : float
        Central coverage.

    Returns
    -------
    (float, float)
        Lower and upper limits (NaN when there are no replicates).

    Notes
    -----
    Efron (1987). The bias correction is
    ``z0 = Phi^-1(#{boot < theta_hat} / B)`` (ties count half), clipped so that
    it stays finite when every replicate lies on one side.
    """
    boot = np.asarray(boot, dtype=float)
    boot = boot[np.isfinite(boot)]
    jack = np.asarray(jack, dtype=float)
    jack = jack[np.isfinite(jack)]
    nb = boot.size
    if nb == 0 or not np.isfinite(theta_hat):
        return float("nan"), float("nan")
    frac = (np.sum(boot < theta_hat) + 0.5 * np.sum(boot == theta_hat)) / nb
    z0 = ndtri(np.clip(frac, 0.5 / nb, 1.0 - 0.5 / nb))
    d = jack.mean() - jack if jack.size else np.zeros(1)
    den = 6.0 * np.sum(d * d) ** 1.5
    acc = float(np.sum(d ** 3) / den) if den > 0 else 0.0
    alpha = (1.0 - confidence) / 2.0
    z = ndtri(np.array([alpha, 1.0 - alpha]))
    levels = ndtr(z0 + (z0 + z) / (1.0 - acc * (z0 + z)))
    lo, hi = np.quantile(boot, np.clip(levels, 0.0, 1.0))
    return float(lo), float(hi)


def patch_labels(cols: np.ndarray, rows: np.ndarray,
                 patch_size: int | tuple[int, int] = 7) -> np.ndarray:
    """Label spots by the square patch of the spot grid they fall in.

    Parameters
    ----------
    cols, rows : array_like of int
        Grid column and row of each spot.
    patch_size : int or (int, int)
        Patch size in grid steps, as ``(columns, rows)`` when a pair.

    Returns
    -------
    numpy.ndarray
        Integer patch label per spot, ``0..npatch-1`` (consecutive over the
        patches that hold a spot).

    Examples
    --------
    >>> k = np.arange(16)
    >>> patch_labels(k // 4, k % 4, 2).reshape(4, 4)
    array([[0, 0, 1, 1],
           [0, 0, 1, 1],
           [2, 2, 3, 3],
           [2, 2, 3, 3]])
    """
    pc, pr = (patch_size, patch_size) if np.ndim(patch_size) == 0 else patch_size
    if int(pc) < 1 or int(pr) < 1:
        raise InputError(f"patch_size {patch_size!r} must be >= 1")
    cols = np.asarray(cols, dtype=np.int64) // int(pc)
    rows = np.asarray(rows, dtype=np.int64) // int(pr)
    key = cols * (int(rows.max(initial=0)) + 1) + rows
    return np.unique(key, return_inverse=True)[1].reshape(np.shape(cols))


def _grid_lookup(cols: np.ndarray, rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Spot index at each grid cell (-1 where no spot)."""
    lookup = np.full(shape, -1, dtype=np.int64)
    lookup[cols, rows] = np.arange(cols.size)
    return lookup


def _cyclic_near(d: np.ndarray, n: int, min_shift: int) -> np.ndarray:
    """Whether a displacement ``d`` modulo ``n`` is shorter than ``min_shift``."""
    d = d % n
    return np.minimum(d, n - d) < min_shift


def null_permutation(cols: np.ndarray, rows: np.ndarray, shape: tuple[int, int],
                     element: int, shift: tuple[int, int], min_shift: int = 0) -> np.ndarray:
    """Explicit spot pairing of one null resample.

    Spot ``k`` at grid position ``x = (cols[k], rows[k])`` is paired with the
    spot at ``h(x) + shift`` (modulo the grid ``shape = (ncols, nrows)``),
    ``h = SYMMETRIES[element]``.

    Parameters
    ----------
    cols, rows : array_like of int
        Grid column and row of each spot.
    shape : (int, int)
        ``(ncols, nrows)`` of the grid.
    element : int
        Index into :data:`SYMMETRIES` (4-7 need a square grid).
    shift : (int, int)
        Toroidal shift in (column, row).
    min_shift : int
        Spots whose partner lies fewer than ``min_shift`` grid steps away in
        both directions (cyclically; e.g. on the axis of a flip) get no
        partner.

    Returns
    -------
    numpy.ndarray
        Partner spot index per spot, -1 when the partner cell holds no spot
        or is too near.

    Examples
    --------
    >>> k = np.arange(9)
    >>> null_permutation(k // 3, k % 3, (3, 3), 0, (1, 0)).tolist()
    [3, 4, 5, 6, 7, 8, 0, 1, 2]

    A flip of the column index keeps column 0 in place and pairs columns 2
    and 3 (one step apart): with ``min_shift=2`` those get no partner.

    >>> k = np.arange(25)
    >>> null_permutation(k // 5, k % 5, (5, 5), 2, (0, 0), min_shift=2).reshape(5, 5)
    array([[-1, -1, -1, -1, -1],
           [20, 21, 22, 23, 24],
           [-1, -1, -1, -1, -1],
           [-1, -1, -1, -1, -1],
           [ 5,  6,  7,  8,  9]])
    """
    cols = np.asarray(cols, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    swap, (e0, e1) = SYMMETRIES[element]
    if swap and shape[0] != shape[1]:
        raise InputError(f"symmetry {element} needs a square grid, got {shape}")
    x0, x1 = (rows, cols) if swap else (cols, rows)
    p0 = (e0 * x0 + shift[0]) % shape[0]
    p1 = (e1 * x1 + shift[1]) % shape[1]
    partner = _grid_lookup(cols, rows, shape)[p0, p1]
    near = _cyclic_near(p0 - cols, shape[0], min_shift) & _cyclic_near(p1 - rows, shape[1], min_shift)
    partner[near] = -1
    return partner


def _near_pairs(cols, rows, shape, element, shifts, min_shift):
    """(pairing, spot, partner) of the spots paired with a too-near partner."""
    ip_all, ik_all, pk_all = [], [], []
    lookup = _grid_lookup(cols, rows, shape)
    for e in np.unique(element):
        sel = np.flatnonzero(element == e)
        swap, (e0, e1) = SYMMETRIES[e]
        x0, x1 = (rows, cols) if swap else (cols, rows)
        # displacement of every spot for every pairing of this symmetry
        d0 = (e0 * x0 - cols)[None, :] + shifts[sel, 0][:, None]
        d1 = (e1 * x1 - rows)[None, :] + shifts[sel, 1][:, None]
        ip, ik = np.nonzero(_cyclic_near(d0, shape[0], min_shift)
                            & _cyclic_near(d1, shape[1], min_shift))
        ip = sel[ip]
        pk = lookup[(e0 * x0[ik] + shifts[ip, 0]) % shape[0],
                    (e1 * x1[ik] + shifts[ip, 1]) % shape[1]]
        ok = pk >= 0
        ip_all.append(ip[ok]); ik_all.append(ik[ok]); pk_all.append(pk[ok])
    return np.concatenate(ip_all), np.concatenate(ik_all), np.concatenate(pk_all)


def _pair_sums(A, B, valid, ik, pk, complete, chunk=64):
    """Per (spot, partner) pair: sum A*B, sum A**2 over the overlap, sum B**2 over it.

    Gathers rows in small chunks: a gather of thousands of long rows at once
    is many times slower (page faults on the temporaries).
    """
    n = ik.size
    ab, aa, bb = np.empty(n), np.empty(n), np.empty(n)
    ncol = A.shape[1]
    ga, gb = np.empty((chunk, ncol)), np.empty((chunk, ncol))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        i, p = ik[s:s + m], pk[s:s + m]
        np.take(A, i, axis=0, out=ga[:m])
        np.take(B, p, axis=0, out=gb[:m])
        ab[s:s + m] = np.einsum("ij,ij->i", ga[:m], gb[:m])
        if complete:
            aa[s:s + m] = np.einsum("ij,ij->i", ga[:m], ga[:m])
            bb[s:s + m] = np.einsum("ij,ij->i", gb[:m], gb[:m])
        else:
            aa[s:s + m] = np.einsum("ij,ij->i", ga[:m] * valid[p], ga[:m])
            bb[s:s + m] = np.einsum("ij,ij->i", gb[:m] * valid[i], gb[:m])
    return ab, aa, bb


def _allowed_shifts(shape: tuple[int, int], min_shift: int) -> np.ndarray:
    """Flat indices ``s0 * nrows + s1`` of the shifts not excluded as tiny."""
    n0, n1 = shape
    s0, s1 = np.arange(n0), np.arange(n1)
    d0 = np.minimum(s0, n0 - s0)
    d1 = np.minimum(s1, n1 - s1)
    tiny = (d0[:, None] < min_shift) & (d1[None, :] < min_shift)
    return np.flatnonzero(~tiny)


class _Spectra:
    """rfft2 over the grid of ``[column, row, exposure]`` cubes, direct and transposed.

    The exposure axis is last (contiguous): for spots in canonical order the
    cube is a free view of the ``[spot, exposure]`` array, and the sums over
    exposures below run over contiguous memory.
    """

    def __init__(self, x: np.ndarray, cols: np.ndarray, rows: np.ndarray,
                 shape: tuple[int, int], full: bool, workers: int) -> None:
        nexp = x.shape[1]
        if full:  # spots in canonical order fill the grid: a view, no scatter
            self.cube = np.ascontiguousarray(x).reshape(*shape, nexp)
        else:
            self.cube = np.zeros((*shape, nexp))
            self.cube[cols, rows] = x
        self.shape = shape
        self.workers = workers
        self._cache: dict[bool, np.ndarray] = {}

    def get(self, swap: bool) -> np.ndarray:
        if swap not in self._cache:
            if swap:
                self._cache[swap] = self._transposed(self.get(False))
            else:
                self._cache[swap] = scipy.fft.rfft2(self.cube, axes=(0, 1), workers=self.workers)
        return self._cache[swap]

    def _transposed(self, f: np.ndarray) -> np.ndarray:
        """Half spectrum of the transposed (square) grid from the direct one.

        ``F_T(u, v) = F(v, u)``; where ``u`` is beyond the stored half, use
        the Hermitian symmetry ``F(v, u) = conj(F(-v, -u))`` of real images.
        """
        n, h = f.shape[0], f.shape[1]
        u = np.arange(n)[:, None]
        v = np.arange(h)[None, :]
        upper = np.broadcast_to(u >= h, (n, h))
        i0 = np.where(upper, (-v) % n, v)
        i1 = np.where(upper, (n - u) % n, u)
        out = f[i0, i1]
        np.conjugate(out[h:], out=out[h:])  # rows u >= h are exactly the upper ones
        return out


def _cross_correlations(sa: _Spectra, sb: _Spectra, elements: np.ndarray) -> np.ndarray:
    """Summed-over-exposure cyclic cross-correlations for grid symmetries.

    Returns ``T[e, s0, s1] = sum_x sum_j A[x, j] * B[h_e(x) + s, j]``.
    """
    n0, n1 = sa.shape
    neg0 = (-np.arange(n0)) % n0
    fb = sb.get(False)
    fbc = None
    spec = np.zeros((len(SYMMETRIES), n0, fb.shape[1]), dtype=complex)
    for swap in (False, True):
        todo = [e for e in elements if SYMMETRIES[e][0] == swap]
        if not todo:
            continue
        fa = sa.get(swap)
        # F_{A o h^-1}(u) = F_A(h^T u): reflections are index negations, and a
        # negation of both axes is a complex conjugation for real images.
        for reflect in (False, True):
            sub = [e for e in todo if (SYMMETRIES[e][1][0] != SYMMETRIES[e][1][1]) == reflect]
            if not sub:
                continue
            y = fa[neg0] if reflect else fa
            for e in sub:
                e0 = SYMMETRIES[e][1][0]
                if (e0 == 1) != reflect:  # (1,1) or (-1,1): conj(Y) * F_B
                    if fbc is None:
                        fbc = np.conj(fb)
                    spec[e] = np.conj(np.einsum("uvj,uvj->uv", y, fbc))
                else:  # (-1,-1) or (1,-1): Y * F_B
                    spec[e] = np.einsum("uvj,uvj->uv", y, fb)
    return scipy.fft.irfft2(spec, s=(n0, n1), workers=sa.workers)


def null_correlations(A: np.ndarray, B: np.ndarray, valid: np.ndarray,
                      cols: np.ndarray, rows: np.ndarray, shape: tuple[int, int],
                      nnull: int, rng: np.random.Generator, *, min_shift: int = 2,
                      workers: int = 2) -> dict:
    """Null distribution of the correlation from shifted/rotated spot pairings.

    Parameters
    ----------
    A, B : numpy.ndarray
        ``[spot, exposure]`` deviations of the two quantities from their means
        over the jointly valid points, **0 where not jointly valid**.
    valid : numpy.ndarray of bool
        ``[spot, exposure]`` jointly valid points.
    cols, rows : numpy.ndarray of int
        Grid column and row of each spot (row of ``A``).
    shape : (int, int)
        ``(ncols, nrows)`` of the grid.
    nnull : int
        Number of null pairings, drawn without replacement from all allowed
        (symmetry, shift) combinations; all of them when there are fewer.
    rng : numpy.random.Generator
        Random generator.
    min_shift : int
        Shifts with both ``|m| < min_shift`` and ``|n| < min_shift``
        (cyclic distance) are excluded, for every symmetry, so the identity
        and near-identity pairings never enter. Within a pairing, spots whose
        partner is that near (on the axis of a flip or transpose, at the
        centre of a rotation) are left out of it: they would pair a spot
        with itself or a neighbour and pull the null towards the observed r.
    workers : int
        Threads for the FFTs.

    Returns
    -------
    dict
        ``r`` (the null correlations), ``element`` (index into
        :data:`SYMMETRIES`), ``shift`` (``(n, 2)`` array of ``(m, n)``) and
        ``navailable`` (number of allowed pairings).

    Notes
    -----
    For the pairing ``pi`` the correlation is
    ``sum A[k] B[pi(k)] / sqrt(sum A[k]**2 V[pi(k)] * sum V[k] B[pi(k)]**2)``
    with ``V`` the validity mask and every sum over spots and exposures: the
    numerator and both variances run over the points valid in both members
    of the pair (their overlap). The deviations keep the means of the
    unpermuted data rather than being re-centred on each overlap (a
    second-order difference). With complete data on a full grid this is
    exactly the Pearson r of the permuted pairs (without the near spots);
    for the identity pairing (``min_shift=0``) it is exactly the observed r.

    Every shift of one symmetry is one cyclic cross-correlation over the
    grid, summed over exposures: ``sum_j conj(F[A_h]_j) F[B]_j`` in Fourier
    space, with ``F`` the 2-D FFT of each exposure's ``[column, row]``
    image. Reflections act on the spectrum as index negations, so each
    quantity needs one FFT (two on a square grid, for the transposes).
    Complete data need the cross-correlation of ``A`` with ``B`` only;
    missing data add ``A**2`` with ``V`` and ``V`` with ``B**2``. The near
    spots are then subtracted explicitly (a few per pairing on average).
    """
    n0, n1 = shape
    nelem = 8 if n0 == n1 else 4
    allowed = _allowed_shifts(shape, min_shift)
    navail = nelem * allowed.size
    if navail == 0:
        raise InputError(f"no null pairings: a {n0} x {n1} spot grid has no shift of "
                         f">= {min_shift} steps", expected="a larger grid or smaller min_shift")
    pick = np.sort(rng.choice(navail, size=min(int(nnull), navail), replace=False))
    element = pick // allowed.size
    sflat = allowed[pick % allowed.size]
    elements = np.unique(element)
    full = cols.size == n0 * n1 and np.array_equal(cols * n1 + rows, np.arange(cols.size))
    complete = full and bool(valid.all())

    shifts = np.stack([sflat // n1, sflat % n1], axis=1)
    spec_a = _Spectra(A, cols, rows, shape, full, workers)
    spec_b = _Spectra(B, cols, rows, shape, full, workers)
    num = _cross_correlations(spec_a, spec_b, elements).reshape(len(SYMMETRIES), -1)[element, sflat]
    if complete:
        saa = np.full(num.shape, np.einsum("ij,ij->", A, A))
        sbb = np.full(num.shape, np.einsum("ij,ij->", B, B))
    else:
        v = valid.astype(float)
        spec_v = _Spectra(v, cols, rows, shape, full, workers)
        saa = _cross_correlations(_Spectra(A * A, cols, rows, shape, full, workers),
                                  spec_v, elements).reshape(len(SYMMETRIES), -1)[element, sflat]
        sbb = _cross_correlations(spec_v, _Spectra(B * B, cols, rows, shape, full, workers),
                                  elements).reshape(len(SYMMETRIES), -1)[element, sflat]

    # take out the spots paired with themselves or a near neighbour (on the
    # axis of a flip, the centre of a rotation): few per pairing on average
    ip, ik, pk = _near_pairs(cols, rows, shape, element, shifts, min_shift)
    if ip.size:
        near_ab, near_aa, near_bb = _pair_sums(A, B, valid, ik, pk, complete)
        num = num - np.bincount(ip, near_ab, minlength=num.size)
        saa = saa - np.bincount(ip, near_aa, minlength=num.size)
        sbb = sbb - np.bincount(ip, near_bb, minlength=num.size)
    # FFT round-off can leave tiny negative variances where the overlap is empty
    den = np.sqrt(np.clip(saa, 0, None) * np.clip(sbb, 0, None))
    scale = np.sqrt(np.einsum("ij,ij->", A, A) * np.einsum("ij,ij->", B, B))
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = den > 1e-9 * scale
        r = np.where(ok, num / np.where(ok, den, 1.0), np.nan)
    return {"r": r, "element": element, "shift": shifts, "navailable": navail}
