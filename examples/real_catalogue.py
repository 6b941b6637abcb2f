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
# # A real spot-projector catalogue
#
# One real exposure of the LSST Camera's spot projector: an LSST DM grid
# source catalogue (mixcoatl `gridFit`) of the ITL CCD R02_S02, taken on the
# test stand (BOT) on 2019-10-31 with a 20 s exposure and the projector at
# BOT position (-293.2, 39.6) mm. The file comes from the public repository
# snyder18/mixcoatl and lives beside the project in
# `../shared/data/real/mixcoatl/` (set `SPOTFLAT_REAL_DATA` to another copy of
# `data/real`); this notebook stops with a message when it is absent.
#
# We look at what spotflat reads from it: the spot fluxes (as the seed
# notebook's scatter of spots coloured by flux), the fitted grid and the
# centroid offsets from it, and where the spots are on the focal plane.
# One exposure cannot be calibrated (that needs dithers; see
# `simulated_walkthrough.py`), but it is everything a dithered run is made
# of. Figures go to `real_catalogue_figures/`.

# %%
import os
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from matplotlib.figure import Figure

import spotflat
from spotflat import geometry, plots, projector
from spotflat.grids import read_grid_file

NAME = "MC_C_20191031_001500_R02_S02_20.0s_-293.2x_39.6y_gridfit.cat"
try:
    ROOT = Path(__file__).resolve().parents[1]  # run as a script: the repository root
except NameError:  # in a notebook started from examples/ or the repository root
    ROOT = Path.cwd().parent if Path.cwd().name == "examples" else Path.cwd()
REAL = Path(os.environ.get("SPOTFLAT_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))
CATALOGUE = REAL / "mixcoatl" / NAME
if not CATALOGUE.exists():
    print(f"The real catalogue is not here: {CATALOGUE}\n"
          "It is part of the project's shared data (../shared/data/real beside the repository); "
          "set SPOTFLAT_REAL_DATA to a copy of data/real to run this example.")
    sys.exit(0)

FIGURES = Path("real_catalogue_figures")
FIGURES.mkdir(exist_ok=True)

# %% [markdown]
# ## What is in the file
#
# A LSST SourceCatalog FITS table: one row per detected source, matched to
# the grid by `spotgrid_index` (-1 for sources that match no grid point),
# with the DM measurement columns, and the fitted grid parameters in the
# header of a `GRID_INFO` HDU.

# %%
raw = Table.read(CATALOGUE, hdu=1)
matched = np.asarray(raw["spotgrid_index"]) >= 0
print(f"{len(raw)} sources, {matched.sum()} matched to the grid, {len(raw.colnames)} columns, e.g.")
print([c for c in raw.colnames if c.startswith(("spotgrid", "base_SdssCentroid", "base_SdssShape"))][:12])
with fits.open(CATALOGUE) as hdul:
    grid_info = {k: hdul["GRID_INFO"].header[k] for k in ("X0", "Y0", "XSTEP", "YSTEP", "THETA", "NCOLS", "NROWS")}
print("GRID_INFO:", grid_info)

# %% [markdown]
# ## Read it with spotflat
#
# `read_grids` turns it into `[spot, exposure]` arrays (here 2401 x 1) indexed
# by grid point, with the metadata parsed from the file name: detector,
# exposure time, projector position. The default flux column for DM
# catalogues is `base_SdssShape_instFlux`.

# %%
grids = spotflat.read_grids(CATALOGUE)
exp = grids.exposures[0]
print(f"{grids.nspot} grid points ({grids.grid_shape[0]} x {grids.grid_shape[1]}), detector {grids.detector}, "
      f"{exp['exptime']} s, projector at ({exp['bot_x']}, {exp['bot_y']}) mm, flux column {grids.flux_column}")
print(spotflat.parse_filename(CATALOGUE))

grid = read_grid_file(CATALOGUE).grid
print("grid parameters read:", {k: round(float(v), 4) for k, v in grid.items()})
assert all(np.isclose(grid[k], grid_info[k]) for k in grid_info), "grid parameters differ from GRID_INFO"

# %% [markdown]
# ## The spot flux map
#
# The seed notebook's first figure: every spot at its position on the CCD,
# coloured by its flux. The pattern is the projector's, not the CCD's: in
# this 2019 run it lit a disc about 2500 pixels across, and the spots
# outside it are ten times fainter. That is why spotflat divides each spot
# by its own mean over many dithers (`F[k]`) before comparing with a flat:
# only the small dither-to-dither changes of a spot's flux carry the CCD's
# response.

# %%
flux = grids.flux[:, 0]
x, y = grids.x[:, 0], grids.y[:, 0]
p10, p50, p90 = np.nanpercentile(flux, [10, 50, 90])
print(f"flux: 10/50/90th percentiles {p10:.3g} / {p50:.3g} / {p90:.3g} counts, {np.isfinite(flux).sum()} spots measured")
fig = plots.plot_spot_map(x, y, flux, detector=grids.detector, title=f"Spot flux, {grids.detector} (real, 2019)",
                          label="base_SdssShape_instFlux [counts]", s=10)
plots.save_figure(fig, FIGURES / "spot_flux_map.png")
fig

# %% [markdown]
# ## Centroid offsets from the fitted grid
#
# `dx`, `dy` are each spot's centroid minus its fitted grid point
# (`base_SdssCentroid - spotgrid`). A perfect projector on a perfect CCD
# gives zero; the projector's optical distortion gives a smooth pattern, and
# the CCD's pixel-boundary distortions (tree rings, edges) add small
# position-dependent shifts -- the centroid part of the analysis correlates
# them, dither by dither, with the flat's gradient.

# %%
dx, dy = grids.dx[:, 0], grids.dy[:, 0]
print(f"dx: rms {np.nanstd(dx):.3f} px, dy: rms {np.nanstd(dy):.3f} px; "
      f"largest |offset| {np.nanmax(np.hypot(dx, dy)):.2f} px")
fig = Figure(figsize=(11, 4.8), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ok = np.isfinite(dx) & np.isfinite(dy)
q = ax1.quiver(x[ok], y[ok], dx[ok], dy[ok], np.hypot(dx[ok], dy[ok]), angles="xy", scale_units="xy",
               scale=1 / 40, cmap="viridis", width=0.003)
fig.colorbar(q, ax=ax1, label="|offset| [px]")
ax1.set_aspect("equal")
ax1.set_xlabel("CCD x [pix]")
ax1.set_ylabel("CCD y [pix]")
ax1.set_title("centroid - grid point (arrows x40)")
bins = np.linspace(-3, 3, 61)
ax2.hist(dx[ok], bins=bins, histtype="step", label=f"dx (rms {np.std(dx[ok]):.2f} px)")
ax2.hist(dy[ok], bins=bins, histtype="step", label=f"dy (rms {np.std(dy[ok]):.2f} px)")
ax2.set_xlabel("offset from the grid [px]")
ax2.set_ylabel("spots")
ax2.set_title("centroid offsets")
ax2.legend()
plots.save_figure(fig, FIGURES / "centroid_offsets.png")
fig

# %% [markdown]
# The spots' second moments give the footprint spotflat uses to sample a
# flat: a Gaussian of width `sqrt((xx + yy) / 2)`.

# %%
sigma = np.sqrt((grids.xx[:, 0] + grids.yy[:, 0]) / 2)
print(f"spot size: median xx {np.nanmedian(grids.xx):.2f}, yy {np.nanmedian(grids.yy):.2f} px^2; "
      f"footprint sigma {np.nanmedian(sigma):.2f} px")

# %% [markdown]
# ## On the focal plane
#
# `spotflat.geometry` maps the CCD pixels of the spots into the DM focal
# plane (mm). The projector's position from the file name is in the test
# stand's (BOT) axes; under spotflat's default convention (`ccs`:
# `focal_x = bot_y`, `focal_y = bot_x`) it lands on R02_S02 too, but not on
# the grid centre: one exposure cannot tell whether the projector origin is
# offset or the convention differs. `fit_projector_map` says so and lists the
# hypotheses; a dithered run settles it.

# %%
fx, fy = geometry.ccd_to_focal(grids.detector, x, y)
conv = projector.default_convention()
px, py = conv.to_focal(float(exp["bot_x"]), float(exp["bot_y"]))
print(f"spots cover focal x {np.nanmin(fx):.1f} .. {np.nanmax(fx):.1f} mm, y {np.nanmin(fy):.1f} .. "
      f"{np.nanmax(fy):.1f} mm")
print(f"projector ({conv.name}: {conv.describe()}) at focal ({px:.2f}, {py:.2f}) mm ->",
      projector.bot_to_ccd(float(exp["bot_x"]), float(exp["bot_y"])))
fit = spotflat.fit_projector_map([exp["bot_x"]], [exp["bot_y"]], [grid["X0"]], [grid["Y0"]],
                                 detector=grids.detector)
print("\n".join(fit.summary_lines()))

fig = Figure(figsize=(7.5, 6.2), layout="constrained")
ax = fig.add_subplot()
raft = grids.detector.split("_")[0]
cx, cy = np.nanmean(fx), np.nanmean(fy)
for det in geometry.get_camera():
    ox, oy = geometry.detector_outline(det)
    if abs(ox[:4].mean() - cx) < 50 and abs(oy[:4].mean() - cy) < 50:  # the CCD and its neighbours
        colour = "k" if det.raft == raft else "0.5"
        ax.plot(ox, oy, color=colour, lw=0.8)
        ax.text(ox[:4].mean(), oy.max() - 2, det.name, ha="center", va="top", fontsize=8, color=colour,
                bbox={"fc": "white", "ec": "none", "alpha": 0.7}, zorder=5)
sc = ax.scatter(fx, fy, c=flux, s=2, cmap="viridis")
fig.colorbar(sc, ax=ax, label="flux [counts]", shrink=0.8)
ax.plot(px, py, "x", color="C3", ms=9, mew=2, label=f"projector position ({conv.name} convention)")
ax.legend(loc="lower left", fontsize=8)
ax.set_aspect("equal")
ax.set_xlabel("focal plane x [mm]")
ax.set_ylabel("focal plane y [mm]")
ax.set_title(f"{grids.detector}'s spots on the focal plane")
plots.save_figure(fig, FIGURES / "focal_plane.png")
fig
