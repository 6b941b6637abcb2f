"""Make the figures of ``docs/qe_vs_area.rst`` (committed PNGs in ``docs/qe_vs_area_figures/``).

Two simulated E2V R22_S20 runs (100 dithers, the imSim tree rings of R22_S20
scaled by 20, within the BNL-measured range) -- once as a pixel-area effect,
once as a QE effect -- with their radial profiles and verdicts, and the
star-flat map of the real dithered R22_S20 run (BOT run 12784). Slow
(a few minutes); run by hand::

    python docs/make_qe_vs_area_figures.py [REAL_RUN_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.table import Table  # noqa: E402

from spotflat.grids import SpotGrids  # noqa: E402
from spotflat.response import ResponseParams  # noqa: E402
from spotflat.simulate import simulate_data  # noqa: E402
from spotflat.verdict import sensor_verdict  # noqa: E402

OUT = Path(__file__).resolve().parent / "qe_vs_area_figures"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "mixcoatl" / "R22_S20_run12784"


def _grids(sim) -> SpotGrids:
    sp = sim.spots
    return SpotGrids(flux=sp.flux, flux_err=sp.flux_err, x=sp.x, y=sp.y, dx=sp.x - sp.gx, dy=sp.y - sp.gy,
                     xx=sp.xx, yy=sp.yy, xy=sp.xy, exposures=Table({"x0": sp.grid["x0"], "y0": sp.grid["y0"]}),
                     flux_column="base_SdssShape_instFlux", detector="R22_S20")


def profiles_figure(kind: str) -> Table:
    sim = simulate_data("R22_S20", ndither=100, seed=3,
                        response=ResponseParams(treering_kind=kind, treering_boost=20.0))
    v = sensor_verdict(_grids(sim), sim.flat / np.mean(sim.flat), "R22_S20", nboot=50, seed=1)
    p = v.profiles["treering"]
    tab = p.table()
    sel = (tab["r"] > 4300) & (tab["r"] < 4700)
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    row = v.table[v.table["feature"] == "treering"][0]
    for ax, col, lab, tmpl_name in zip(axes, ("flux", "radial_shift", "size"),
                                       ("flux t - 1", "radial centroid shift [pix]", "d size / size"),
                                       ("flat", "-integral(flat) [pix]", "-flat")):
        ax.errorbar(tab["r"][sel], tab[col][sel], yerr=tab[f"{col}_err"][sel], fmt=".", ms=3, lw=0.5,
                    color="k", label="spots")
        ax.plot(tab["r"][sel], p.template(col)[sel], "-", color="C3", lw=1, label=f"flat: {tmpl_name}")
        ax.set_ylabel(lab, fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_title(f"tree rings as {kind.upper()}: qe_fraction = {row['qe_fraction']:.2f} +- "
                      f"{row['qe_fraction_err']:.2f}, area_fraction = {row['area_fraction']:.2f} +- "
                      f"{row['area_fraction_err']:.2f} -> verdict '{row['verdict']}'", fontsize=9)
    axes[-1].set_xlabel("radius from the R22_S20 tree-ring centre [pix]")
    fig.savefig(OUT / f"profiles_{kind}.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return v.table


def real_figure(run: Path) -> None:
    from spotflat.responsemap import run_response
    from spotflat.responseplots import plot_map

    res = run_response(run, detector="R22_S20", binsize=128, nboot=20)
    star = res.star
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    plot_map(axes[0], star.response, star.binsize, f"R22_S20 run 12784: {star.summary()[:46]}...", "R")
    axes[1].imshow(star.coverage, origin="lower", extent=(0, star.response.shape[1] * 128, 0,
                                                         star.response.shape[0] * 128), cmap="viridis")
    axes[1].set_title("COVERAGE: spot measurements per bin", fontsize=9)
    axes[1].set_xlabel("CCD x [pix]")
    fig.savefig(OUT / "r22_s20_response.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(star.summary())


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for kind in ("area", "qe"):
        print(profiles_figure(kind))
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else REAL
    if run.is_dir():
        real_figure(run)
