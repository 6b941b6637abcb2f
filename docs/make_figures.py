"""Make the documentation's generated figures from the installed spotflat.

Called by ``docs/conf.py`` when Sphinx starts (``builder-inited``); can also
be run by hand::

    python docs/make_figures.py [OUTDIR] [--force]

Writes into ``docs/_generated/`` (ignored by git):

* ``focal_plane.png`` -- the LSSTCam focal plane from :mod:`spotflat.geometry`:
  every raft and CCD outlined, labelled and coloured by vendor, with the
  test-stand (BOT) axes of the default convention;
* ``ccd_amplifiers.png`` -- the amplifier layout of one E2V and one ITL CCD
  in the DM CCD frame: amplifier names, read-out corners, serial direction;
* ``demo/`` -- the figures of a small ``spotflat demo`` run (kept between
  builds; ``--force`` or ``SPOTFLAT_DOCS_FORCE=1`` remakes everything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Polygon

import spotflat
from spotflat import geometry, projector

HERE = Path(__file__).resolve().parent

#: settings of the demo run shown in the getting-started page (small: fast builds)
DEMO = {"ndither": 20, "nboot": 200, "nnull": 200, "seed": 0, "mismatch": "treering"}
DEMO_FIGURES = ("spot_flux_map.png", "t_map.png", "q_map.png", "residual_map.png", "t_vs_q.png",
                "residual_hist.png", "amp_residuals.png", "residual_vs_boundary.png",
                "mismatch_recovery.png", "dx_vs_dqdx.png", "dy_vs_dqdy.png", "size_vs_lapq.png")
#: modules that draw the demo figures: a change to any of them remakes the cached run
FIGURE_CODE = ("plots.py", "figures.py", "mapbins.py", "cli/demo.py")

VENDOR_COLOURS = {"ITL": "#9ecae1", "E2V": "#fdae6b"}
KIND_HATCH = {"science": None, "guider": "////", "wavefront": "...."}


def focal_plane_figure(path: Path) -> Path:
    """All CCDs of LSSTCam on the DM focal plane, coloured by vendor."""
    cam = geometry.get_camera()
    fig = Figure(figsize=(9.5, 9.5), layout="constrained")
    ax = fig.add_subplot()
    for det in cam:
        fx, fy = geometry.detector_outline(det)
        ax.add_patch(Polygon(np.column_stack([fx, fy]), closed=True, lw=0.5, ec="k",
                             fc=VENDOR_COLOURS[det.vendor], hatch=KIND_HATCH[det.kind]))
        ax.text(fx[:4].mean(), fy[:4].mean(), det.sensor, ha="center", va="center", fontsize=5.5)
    for name, raft in cam.rafts.items():
        members = [d for d in cam if d.raft == name]
        xs = np.concatenate([geometry.detector_outline(d)[0] for d in members])
        ys = np.concatenate([geometry.detector_outline(d)[1] for d in members])
        pad = 1.0
        x0, x1, y0, y1 = xs.min() - pad, xs.max() + pad, ys.min() - pad, ys.max() + pad
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="0.25", lw=1.0)
        ax.text(x0 + 1.5, y1 - 1.5, name, ha="left", va="top", fontsize=7, weight="bold", color="0.15")
    # the test stand's projector axes (default convention), drawn from the focal-plane origin
    conv = projector.default_convention()
    o = np.array(conv.to_focal(0.0, 0.0), float)
    for label, (bx, by) in (("BOT x", (60.0, 0.0)), ("BOT y", (0.0, 60.0))):
        tip = np.array(conv.to_focal(bx, by), float)
        ax.annotate("", xy=tip, xytext=o, arrowprops={"arrowstyle": "->", "color": "C3", "lw": 1.5})
        ax.text(*(o + 1.2 * (tip - o)), label, color="C3", ha="center", va="center", fontsize=8,
                bbox={"fc": "white", "ec": "none", "pad": 1.0})
    # where the projector of the real 2019 catalogue was (file name x, y)
    px, py = conv.to_focal(-293.2, 39.6)
    ax.plot(px, py, "x", color="C3", ms=7, mew=1.5)
    ax.annotate("projector (-293.2x, 39.6y)\nof the real catalogue", xy=(px, py), xytext=(px + 20, py - 40),
                fontsize=7, color="C3", arrowprops={"arrowstyle": "-", "color": "C3", "lw": 0.8})
    handles = [Polygon([[0, 0]], fc=VENDOR_COLOURS["ITL"], ec="k", label="ITL science"),
               Polygon([[0, 0]], fc=VENDOR_COLOURS["E2V"], ec="k", label="E2V science"),
               Polygon([[0, 0]], fc=VENDOR_COLOURS["ITL"], ec="k", hatch="////", label="ITL guider"),
               Polygon([[0, 0]], fc=VENDOR_COLOURS["ITL"], ec="k", hatch="....", label="ITL wavefront")]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.95)
    ax.set_xlim(-330, 330)
    ax.set_ylim(-330, 330)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.6", lw=0.4, zorder=0)
    ax.axvline(0, color="0.6", lw=0.4, zorder=0)
    ax.set_xlabel("focal plane x [mm] (DM FOCAL_PLANE)")
    ax.set_ylabel("focal plane y [mm]")
    ax.set_title(f"LSSTCam focal plane: {len(cam.science_detectors)} science CCDs, "
                 f"{len(cam.detectors) - len(cam.science_detectors)} corner-raft sensors")
    fig.savefig(path, dpi=110)
    return path


def _amp_panel(ax, detector: str) -> None:
    d = geometry.get_camera().detector(detector)
    ny, nx = d.shape
    for name, (sy, sx) in geometry.amp_slices(detector).items():
        x0, x1, y0, y1 = sx.start - 0.5, sx.stop - 0.5, sy.start - 0.5, sy.stop - 0.5
        ax.add_patch(Polygon([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], closed=True, fc="0.95", ec="k", lw=0.8))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + (250 if y0 > 0 else -250), name, ha="center", va="center",
                fontsize=9, weight="bold")
        # read-out corner = amp pixel (0, 0); the arrow shows amp +x (the serial direction away from it)
        cx, cy = geometry.amp_to_ccd(detector, name, 0, 0)
        ex, ey = geometry.amp_to_ccd(detector, name, 300, 0)
        ux, uy = geometry.amp_to_ccd(detector, name, 0, 600)
        ax.plot(cx, cy, "o", color="C3", ms=5)
        ax.annotate("", xy=(ex, ey), xytext=(cx, cy), arrowprops={"arrowstyle": "->", "color": "C3", "lw": 1.2})
        ax.annotate("", xy=(ux, uy), xytext=(cx, cy), arrowprops={"arrowstyle": "->", "color": "C0", "lw": 1.2})
    ax.axhline(d.type.amp_ny - 0.5, color="C2", lw=1.5, ls="--")
    ax.text(nx / 2, d.type.amp_ny + 40, "mid-line", color="C2", ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-250, nx + 250)
    ax.set_ylim(-300, ny + 300)
    ax.set_aspect("equal")
    ax.set_xlabel("CCD x [pix] (DM)")
    ax.set_ylabel("CCD y [pix]")
    ax.set_title(f"{detector} ({d.vendor}, {nx} x {ny} px, amps {d.type.amp_nx} x {d.type.amp_ny})",
                 fontsize=10)


def amplifier_figure(path: Path, detectors=("R22_S11", "R02_S02")) -> Path:
    """Amplifier layout of one CCD of each vendor in the DM CCD frame."""
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    axes = fig.subplots(1, len(detectors))
    for ax, det in zip(np.atleast_1d(axes), detectors):
        _amp_panel(ax, det)
    fig.suptitle("Amplifiers in the CCD frame: red dot = read-out corner (amp pixel 0, 0), "
                 "red arrow = amp +x (serial), blue arrow = amp +y (parallel)", fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def demo_figures(outdir: Path, force: bool = False) -> list[Path]:
    """Run a small ``spotflat demo`` into ``outdir`` unless it is there already."""
    stamp = outdir / "stamp.json"
    code = hashlib.sha1()
    for name in FIGURE_CODE:
        f = Path(spotflat.__file__).parent / name
        code.update(f.read_bytes() if f.exists() else b"")
    want = {"version": spotflat.__version__, "code": code.hexdigest(), **DEMO}
    have = json.loads(stamp.read_text()) if stamp.exists() else None
    if not force and have == want and all((outdir / f).exists() for f in DEMO_FIGURES):
        return [outdir / f for f in DEMO_FIGURES]
    from spotflat.cli.demo import run_demo

    out = run_demo(outdir, ndither=DEMO["ndither"], nboot=DEMO["nboot"], nnull=DEMO["nnull"],
                   seed=DEMO["seed"], mismatch=DEMO["mismatch"], quiet=True)
    missing = [f for f in DEMO_FIGURES if not (outdir / f).exists()]
    if missing:
        raise RuntimeError(f"spotflat demo did not write {', '.join(missing)}")
    res = out["result"].stats["flux"]
    summary = {"r": res.r, "r_err_bootstrap": res.r_err_bootstrap, "r_err_block": res.r_err_block,
               "slope": res.slope, "slope_err": res.slope_err, "p_value": res.p_value,
               "r_recovered": out["r_recovered"]}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    # keep the figures and small tables only: the simulated inputs are ~90 MB
    shutil.rmtree(outdir / "sim", ignore_errors=True)
    for big in ("residuals.fits", "calib.fits"):
        (outdir / big).unlink(missing_ok=True)
    stamp.write_text(json.dumps(want))
    return [outdir / f for f in DEMO_FIGURES]


def main(outdir: Path | str = HERE / "_generated", force: bool = False, demo: bool = True) -> list[Path]:
    """Make every generated figure; return their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = [focal_plane_figure(outdir / "focal_plane.png"), amplifier_figure(outdir / "ccd_amplifiers.png")]
    if demo:
        files += demo_figures(outdir / "demo", force=force)
    return files


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", nargs="?", default=str(HERE / "_generated"))
    p.add_argument("--force", action="store_true", help="remake the demo run too")
    p.add_argument("--no-demo", action="store_true", help="only the geometry figures")
    a = p.parse_args()
    for f in main(a.outdir, force=a.force, demo=not a.no_demo):
        print(f)
    sys.exit(0)
