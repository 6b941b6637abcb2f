"""Damage copies of real DM grid catalogues the way real grid fits go wrong.

Used by the QC tests on the real dithered run: every function reads a real
file and writes a damaged copy elsewhere (never into ``shared/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

FLUXES = ("base_SdssShape_instFlux", "base_SdssShape_instFluxErr")


def _rewrite(src, dst, edit) -> Path:
    dst = Path(dst)
    with fits.open(src) as hdul:
        data = hdul[1].data
        edit(data, hdul)
        hdul.writeto(dst, overwrite=True)
    return dst


def scramble_labels(src, dst, seed: int = 0) -> Path:
    """A buggy grid fit: the matched sources' spot indices permuted at random."""
    rng = np.random.default_rng(seed)

    def edit(data, hdul):
        idx = np.asarray(data["spotgrid_index"], dtype=float)
        ok = np.flatnonzero(np.isfinite(idx) & (idx >= 0))
        data["spotgrid_index"][ok] = idx[ok][rng.permutation(ok.size)]

    return _rewrite(src, dst, edit)


def shift_labels(src, dst, dcol: int = 1, drow: int = 0) -> Path:
    """A grid fit locked ``dcol`` columns (``drow`` rows) away: every label moved by
    that many grid steps; sources pushed off the grid become unmatched."""

    def edit(data, hdul):
        nrows = int(hdul["GRID_INFO"].header["NROWS"])
        ncols = int(hdul["GRID_INFO"].header["NCOLS"])
        idx = np.asarray(data["spotgrid_index"], dtype=float)
        ok = np.isfinite(idx) & (idx >= 0)
        k = np.where(ok, idx, 0).astype(int)
        col, row = k // nrows + dcol, k % nrows + drow
        inside = ok & (col >= 0) & (col < ncols) & (row >= 0) & (row < nrows)
        new = np.where(inside, col * nrows + row, np.nan)
        data["spotgrid_index"][:] = new

    return _rewrite(src, dst, edit)


def scale_spots(src, dst, fraction: float = 0.5, factor: float = 0.95, seed: int = 0) -> Path:
    """``fraction`` of the matched spots (chosen at random) with fluxes times ``factor``."""
    rng = np.random.default_rng(seed)

    def edit(data, hdul):
        idx = np.asarray(data["spotgrid_index"], dtype=float)
        ok = np.flatnonzero(np.isfinite(idx) & (idx >= 0))
        pick = rng.choice(ok, int(round(fraction * ok.size)), replace=False)
        for name in FLUXES:
            data[name][pick] = data[name][pick] * factor

    return _rewrite(src, dst, edit)
