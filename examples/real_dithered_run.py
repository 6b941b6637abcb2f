# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A real dithered run, and its quality control
#
# Ten real LSST DM grid catalogues of the E2V CCD R22_S20 (BOT run 12784,
# November 2020), each taken with the spot projector at a different position:
# the grid origin moves by thousands of pixels and 450-1800 spots land on the
# CCD each time. They come from the public repository Snyder005/mixcoatl and
# live beside the project in `../shared/data/real/mixcoatl/R22_S20_run12784/`
# (set `SPOTFLAT_REAL_DATA` to another copy of `data/real`); this notebook
# stops with a message when they are absent.
#
# The file names carry no metadata and the headers no detector, so we say
# which CCD it is. Then we calibrate (``F[k]``, ``s[j]``) with the quality
# control on, look at the QC figure, follow a few spots' relative throughput
# ``t`` across the CCD, and damage a copy of one exposure the way grid fits
# go wrong to see the QC name it. Figures go to `real_dithered_run_figures/`.

# %%
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits
from matplotlib.figure import Figure

from spotflat.calibration import build_calibration
from spotflat.grids import read_grids
from spotflat.qc import QCOptions
from spotflat.qcplot import plot_qc

try:
    ROOT = Path(__file__).resolve().parents[1]  # run as a script: the repository root
except NameError:  # in a notebook started from examples/ or the repository root
    ROOT = Path.cwd().parent if Path.cwd().name == "examples" else Path.cwd()
REAL = Path(os.environ.get("SPOTFLAT_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
RUN = REAL / "mixcoatl" / "R22_S20_run12784"
if not RUN.is_dir():
    print(f"The real dithered run is not here: {RUN}\n"
          "It is part of the project's shared data (../shared/data/real beside the repository); "
          "set SPOTFLAT_REAL_DATA to a copy of data/real to run this example.")
    sys.exit(0)

FIGURES = Path("real_dithered_run_figures")
FIGURES.mkdir(exist_ok=True)

# %% [markdown]
# ## Read the run
#
# `detector="R22_S20"` assigns the detector to files that name none (files
# that named another would be refused). Grid points whose centroid is more
# than a quarter of a grid step from their grid position are unmatched (the
# "far" flag): this run has a few, up to 335 px away.

# %%
grids = read_grids(RUN, detector="R22_S20")
counts = grids.flag_counts()
print(f"{grids.nexp} exposures, {grids.nspot} grid points, detector {grids.detector}")
for name, n, nf in zip(grids.exposures["filename"], grids.exposures["nfound"], counts["far"]):
    print(f"  {name}: {n} spots, {nf} far matches unmatched")

# %% [markdown]
# ## Calibrate with the quality control
#
# Per exposure the QC measures the robust scatter of ``t``, the 10-90 % width
# of ``t`` (which sees a part of the spots off by the same amount), the
# correlation of the exposure's flux pattern with the consensus ``F``, the
# fraction of points rejected and the grid centre on the CCD. Outliers are
# left out of ``F`` and ``s`` and kept in the table with the reason.

# %%
cal = build_calibration(grids)
qc = cal.qc
for row in qc:
    print(f"  {row['filename']:40s} used={row['used']!s:5s} scatter {row['t_scatter']:.2%} "
          f"width {row['t_width']:.2%} r={row['pattern_r']:.4f} rejected {row['rejected_fraction']:.1%} "
          f"{row['reason']}")
valid = np.asarray(cal.spots["valid"])
print(f"median scatter of t over spots: {np.nanmedian(np.asarray(cal.spots['t_std'])[valid]):.3%} "
      f"({int(valid.sum())} spots with >= 3 dithers)")

# %% [markdown]
# Two exposures of this real run are left out: in them a corner of the grid
# (the projector's faint halo, grid columns 37-48) is ~5 % brighter than in
# the other eight, so about a fifth of their spots disagree with the
# consensus by far more than the noise. The QC figure shows it.

# %%
fig = plot_qc(qc, cal.detector)
fig.savefig(FIGURES / "qc.png", dpi=80)

# %% [markdown]
# ## t for a few spots across the CCD
#
# The relative throughput ``t = f / (F s)`` of a spot, measured where each of
# its dithers fell, is the detector's response there (up to the spot's
# mean). A few bright spots spread over the grid:

# %%
t = cal.relative_throughput(grids)
ndith = np.count_nonzero(np.isfinite(t), axis=1)
bright = np.flatnonzero((ndith >= 6) & (cal.F > 1e6))
pick = bright[np.linspace(0, bright.size - 1, 4).astype(int)]
fig = Figure(figsize=(10, 4), layout="constrained")
ax = fig.subplots(1, 2)
for k in pick:
    m = np.isfinite(t[k])
    ax[0].plot(grids.x[k, m], t[k, m], "o-", label=f"spot {k}")
    ax[1].plot(grids.x[k, m], grids.y[k, m], "o-")
    print(f"spot {k}: {m.sum()} dithers, t from {np.nanmin(t[k]):.4f} to {np.nanmax(t[k]):.4f}")
ax[0].set_xlabel("x on the CCD (pix)")
ax[0].set_ylabel("t")
ax[0].legend(fontsize=7)
ax[1].set_xlabel("x (pix)")
ax[1].set_ylabel("y (pix)")
ax[1].set_title("where the dithers fell")
fig.savefig(FIGURES / "t_of_spots.png", dpi=80)

# %% [markdown]
# ## A grid fit that locked one column away
#
# The most common failure of grid fitting: every label of one exposure off by
# one grid column. We damage a copy of one exposure that way and calibrate the
# copy. The QC excludes it, names it, and the label registration (integer
# shifts and the 8 flips/rotations of the grid, against the consensus
# pattern) says how its labels fit better. With `register=True` it is
# relabelled and used again.

# %%
work = Path(tempfile.mkdtemp(prefix="spotflat-dithered-"))
try:
    for f in sorted(RUN.glob("*.fits")):
        shutil.copy(f, work / f.name)
    victim = sorted(RUN.glob("*.fits"))[4].name
    with fits.open(work / victim, mode="update") as hdul:
        idx = np.asarray(hdul[1].data["spotgrid_index"], dtype=float)
        ok = np.isfinite(idx) & (idx >= 0)
        k = np.where(ok, idx, 0).astype(int)
        shifted = k + 49  # one grid column further (grid column = k // 49)
        hdul[1].data["spotgrid_index"][:] = np.where(ok & (shifted < 2401), shifted, np.nan)
    damaged = build_calibration(read_grids(work, detector="R22_S20"))
    j = list(damaged.qc["filename"]).index(victim)
    print(f"{victim}: used={bool(damaged.qc['used'][j])}, {damaged.qc['reason'][j]}")
    print(f"registration: {damaged.qc['registration'][j]} (scatter / {damaged.qc['reg_gain'][j]:.1f})")
    fixed = build_calibration(read_grids(work, detector="R22_S20"), qc=QCOptions(register=True))
    j = list(fixed.qc["filename"]).index(victim)
    print(f"re-registered: used={bool(fixed.qc['used'][j])}, scatter of t {fixed.qc['t_scatter'][j]:.2%}")
finally:
    shutil.rmtree(work)
