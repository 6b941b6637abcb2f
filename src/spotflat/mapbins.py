"""Choose the bin size of a residual map from its signal and its noise.

A binned map of ``d = t / q - 1`` (or of ``t``, ``q``) shows structure only
when the bins are small enough to keep it and large enough to average the
noise down. Both limits depend on the data: ``t`` and ``q`` are relative to
each spot's own mean, so structure larger than the small area one spot's
dithers cover cancels in bins of that size, while the noise per bin falls
with the number of points in it.

The noise is measured from the data, not from a noise model: the points are
split into two interleaved halves (by the parity of spot + exposure index,
so every spot is in both), each half is made relative to its own per-spot
means and binned, and the difference of the two maps holds noise only (any
structure fixed to the pixels is in both). The signal variance of
the map is its variance minus that noise. :func:`choose_map_bin` takes the
largest bin with nearly the best signal-to-noise per bin and says when no
bin size shows structure above the noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["MapBinning", "map_noise", "choose_map_bin", "DEFAULT_BINS"]

#: bin sizes (pixels) tried by :func:`choose_map_bin`
DEFAULT_BINS = (16, 24, 32, 48, 64, 96, 128)


@dataclass
class MapBinning:
    """A binned map with its measured noise and signal.

    Attributes
    ----------
    bin : int
        Bin size in pixels.
    map : numpy.ndarray
        Mean of the values per bin (NaN in empty bins), origin lower left.
    count : numpy.ndarray
        Points per bin.
    noise : float
        Typical noise of one bin (the per-point noise over the square root
        of the median count), in the values' units.
    point_noise : float
        Noise of one point in the map, from the split-half difference
        (below the raw noise when the bins are as large as a spot's dithers:
        the per-spot normalisation then cancels part of it).
    signal_rms : float
        RMS of the map's structure after the noise is removed (0 when the
        map is consistent with noise).
    significance : float
        Excess of the (robust) variance of the noise-standardised bins over
        1, in standard deviations of that variance under noise alone: above
        5 the map holds structure.
    detectable : bool
        Structure is detected (significance above the threshold) and its
        rms is at least half the per-bin noise, so it can be seen.
    tried : dict
        ``{bin: (signal_rms, noise, significance)}`` for every size tried.
    """

    bin: int
    map: np.ndarray
    count: np.ndarray
    noise: float
    point_noise: float
    signal_rms: float
    significance: float
    detectable: bool
    tried: dict = field(default_factory=dict)

    def describe(self, scale: float = 1.0, unit: str = "") -> str:
        """One line for a figure: bin, per-bin noise, signal rms and whether structure shows."""
        u = f" {unit}" if unit else ""
        if not np.isfinite(self.noise):
            return f"{self.bin}-px bins: too few points per bin to measure the noise"
        noise, sig = self.noise * scale, self.signal_rms * scale
        head = f"{self.bin}-px bins: per-bin noise {noise:.3g}{u}, signal rms {sig:.3g}{u}"
        if self.detectable:
            return f"{head} ({self.significance:.0f}σ structure)"
        if self.significance >= 5:
            return f"{head}: structure detected ({self.significance:.0f}σ) but below the noise per bin"
        return f"{head}: noise-dominated, no structure detected"


def _bin_index(x, y, shape, bin):
    ny, nx = shape
    nbx, nby = -(-nx // bin), -(-ny // bin)
    ix = np.floor((x + 0.5) / bin).astype(int)
    iy = np.floor((y + 0.5) / bin).astype(int)
    ok = (ix >= 0) & (ix < nbx) & (iy >= 0) & (iy < nby)
    return np.where(ok, iy * nbx + ix, -1), (nby, nbx)


def _sums(idx, v, size):
    n = np.bincount(idx, minlength=size).astype(float)
    s = np.bincount(idx, weights=v, minlength=size)
    return n, s


def map_noise(x: np.ndarray, y: np.ndarray, values: np.ndarray, shape: tuple[int, int], bin: int,
              valid: np.ndarray | None = None, per_spot: bool = True) -> MapBinning:
    """Bin ``values`` and measure the map's noise and signal at one bin size.

    Parameters
    ----------
    x, y, values : numpy.ndarray
        ``[spot, exposure]`` arrays (CCD pixels and values); 1-D arrays are
        taken as one exposure. Non-finite points are ignored.
    shape : (int, int)
        CCD shape ``(ny, nx)``.
    bin : int
        Bin size in pixels.
    valid : numpy.ndarray, optional
        Points to use (default: all finite ones).
    per_spot : bool
        The values are relative to each spot's mean over its exposures (as
        ``t``, ``q`` and ``d`` are): each half is made relative to its own
        per-spot mean, so the noise of that mean counts as noise.

    Returns
    -------
    MapBinning

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x, y = rng.uniform(0, 256, (2, 400, 10))
    >>> m = map_noise(x, y, rng.normal(0, 1e-3, x.shape), (256, 256), bin=64)
    >>> m.map.shape, m.detectable
    ((4, 4), False)
    """
    x, y, v = (np.asarray(a, float) for a in (x, y, values))
    if v.ndim == 1:
        x, y, v = x[:, None], y[:, None], v[:, None]
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(v)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    k, j = np.nonzero(ok)
    xv, yv, vv = x[ok], y[ok], v[ok]
    half = (k + j) % 2
    hv = vv
    if per_spot and v.shape[1] > 1:
        # each half relative to its own per-spot mean: the noise of a spot's
        # mean (few dithers) is then noise in the half-difference, as it is in
        # the map, instead of a "structure" both halves share
        key = 2 * k + half
        cnt = np.bincount(key, minlength=2 * v.shape[0])
        tot = np.bincount(key, weights=vv, minlength=2 * v.shape[0])
        allc = np.bincount(k, minlength=v.shape[0])
        allm = np.bincount(k, weights=vv, minlength=v.shape[0]) / np.maximum(allc, 1)
        hv = vv - tot[key] / np.maximum(cnt[key], 1) + allm[k]
    idx, mshape = _bin_index(xv, yv, shape, bin)
    keep = idx >= 0
    idx, vv, hv, half = idx[keep], vv[keep], hv[keep], half[keep]
    size = mshape[0] * mshape[1]
    n, s = _sums(idx, vv, size)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(n > 0, s / n, np.nan)
        na, sa = _sums(idx[half == 0], hv[half == 0], size)
        nb, sb = _sums(idx[half == 1], hv[half == 1], size)
        both = (na > 0) & (nb > 0)
        z = (sa[both] / na[both] - sb[both] / nb[both]) / np.sqrt(1 / na[both] + 1 / nb[both])
    # per-point noise from the split-half differences: robust (MAD) so a few
    # bins with sub-bin structure sampled differently do not dominate it
    sigma = float(1.4826 * np.median(np.abs(z))) if z.size >= 5 else float("nan")
    used = n >= 2
    nu = n[used]
    med_n = float(np.median(nu)) if nu.size else 0.0
    noise = sigma / np.sqrt(med_n) if med_n > 0 else float("nan")
    signal, signif = 0.0, 0.0
    if nu.size >= 5 and np.isfinite(sigma) and sigma > 0:
        # standardised bins: variance 1 for noise, 1 + signal^2 n / sigma^2 with
        # structure; robust (MAD) like sigma, so a stray outlier point in one
        # bin is neither noise nor signal
        mu = m[used]
        zb = (mu - np.median(mu)) * np.sqrt(nu) / sigma
        var = float((1.4826 * np.median(np.abs(zb - np.median(zb)))) ** 2)
        # spread of a MAD variance from N normal values: 2.3 / sqrt(N) (both estimates)
        signif = (var - 1.0) / (2.3 * np.sqrt(1.0 / nu.size + 1.0 / z.size))
        signal = float(sigma * np.sqrt((var - 1.0) / med_n)) if var > 1.0 else 0.0
    detectable = bool(signif >= 5 and np.isfinite(noise) and signal >= 0.5 * noise)
    return MapBinning(bin=int(bin), map=m.reshape(mshape), count=n.reshape(mshape), noise=float(noise),
                      point_noise=sigma, signal_rms=signal, significance=float(signif), detectable=detectable)


def choose_map_bin(x: np.ndarray, y: np.ndarray, values: np.ndarray, shape: tuple[int, int],
                   bins: tuple[int, ...] = DEFAULT_BINS, valid: np.ndarray | None = None,
                   per_spot: bool = True,
                   min_count: float = 4.0, default_count: float = 25.0, tolerance: float = 0.8) -> MapBinning:
    """The bin size that shows the map's structure best, with its noise and signal.

    Every size in ``bins`` with a median of at least ``min_count`` points
    per bin is tried; among those where structure is detected, the largest
    whose signal-to-noise per bin (``signal_rms / noise``) is within
    ``tolerance`` of the best wins (larger bins read more easily, as long as
    they keep the structure).
    When no size detects structure, the smallest with a median of
    ``default_count`` points per bin is returned (a map of noise at a
    readable level), marked not detectable.

    Parameters
    ----------
    x, y, values : numpy.ndarray
        ``[spot, exposure]`` arrays, as for :func:`map_noise`.
    shape : (int, int)
        CCD shape ``(ny, nx)``.
    bins : tuple of int
        Candidate bin sizes in pixels.
    valid : numpy.ndarray, optional
        Points to use.
    per_spot : bool
        As for :func:`map_noise`.
    min_count, default_count : float
        Median points per bin needed to try a size, and wanted when nothing
        is detected.
    tolerance : float
        Fraction of the best signal-to-noise a larger bin may lose.

    Returns
    -------
    MapBinning
        With ``tried`` filled for every size.
    """
    results = {b: map_noise(x, y, values, shape, b, valid=valid, per_spot=per_spot) for b in sorted(bins)}
    tried = {b: (r.signal_rms, r.noise, r.significance) for b, r in results.items()}
    counts = {b: float(np.median(r.count[r.count > 0])) if (r.count > 0).any() else 0.0
              for b, r in results.items()}
    usable = [b for b in results if counts[b] >= min_count] or [max(results)]
    detected = [b for b in usable if results[b].significance >= 5 and results[b].noise > 0]
    if detected:
        snr = {b: results[b].signal_rms / results[b].noise for b in detected}
        # the largest bin within ``tolerance`` of the best signal-to-noise: larger
        # bins are smoother to read, as long as they do not wash the structure out
        top = max(snr.values())
        best = max(b for b in detected if snr[b] >= tolerance * top)
    else:
        enough = [b for b in usable if counts[b] >= default_count]
        best = min(enough) if enough else max(usable)
    out = results[best]
    out.tried = tried
    return out
