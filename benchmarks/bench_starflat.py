"""Benchmark the star-flat solve (``spotflat response``) against ``calibrate`` on the same files.

Writes N DM grid catalogues (49 x 49 = 2401 spots, large dithers over +-2 grid
steps, fluxes F s R(x, y) + Poisson noise over a known response) and times, in
fresh processes:

(a) ``calibrate``: read + build the calibration catalogue (the baseline),
    with its quality control as ``spotflat calibrate`` runs it, and
    (a') without it (``qc=False``: read + the F, s fit alone),
(b) the star flat: read + :func:`spotflat.starflat.solve_starflat` into a
    64-px map (the inner solve timed separately: the exact direct solve and
    the degeneracy/error analysis),
(c) the whole ``spotflat response`` command (read, solve, profiles, files, figures).

Targets: (b)/(a) <= 10 and peak memory below 2 GiB for N = 1400. The
ratios to both (a) and (a') are printed (``--skip-qc`` leaves (a) out).

Usage::

    python benchmarks/bench_starflat.py --n 1400
    python benchmarks/bench_starflat.py --n 200 --binsize 128     # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits


def write_files(directory: Path, n: int, seed: int = 0) -> None:
    """N DM grid catalogues of 2401 spots dithered over +-130 px on a known response."""
    from spotflat.grids import grid_positions

    rng = np.random.default_rng(seed)
    ny, nx = 4004, 4096
    yy, xx = np.mgrid[0:ny:8, 0:nx:8]
    R = 1 + 0.01 * np.sin(np.hypot(xx + 3000.0, yy + 1000.0) / 200.0) + 0.02 * (xx / nx - 0.5)
    F = 3e5 * np.exp(0.03 * rng.standard_normal(2401))
    for j in range(n):
        x0, y0 = 2047.5 + rng.uniform(-130, 130), 2001.5 + rng.uniform(-130, 130)
        gx, gy = grid_positions(x0, y0, 65.3, 65.3, 0.004, 49, 49)
        ok = (gx > 2) & (gx < nx - 3) & (gy > 2) & (gy < ny - 3)
        idx = np.flatnonzero(ok)
        x, y = gx[idx] + rng.normal(0, 0.02, idx.size), gy[idx] + rng.normal(0, 0.02, idx.size)
        ft = F[idx] * np.exp(0.003 * rng.standard_normal()) * R[(y // 8).astype(int), (x // 8).astype(int)]
        fe = np.sqrt(ft)
        cols = [fits.Column(name="id", format="K", array=np.arange(idx.size)),
                fits.Column(name="base_SdssCentroid_x", format="D", array=x),
                fits.Column(name="base_SdssCentroid_y", format="D", array=y),
                fits.Column(name="base_SdssShape_xx", format="D", array=np.full(idx.size, 5.0)),
                fits.Column(name="base_SdssShape_yy", format="D", array=np.full(idx.size, 5.2)),
                fits.Column(name="base_SdssShape_xy", format="D", array=np.zeros(idx.size)),
                fits.Column(name="base_SdssShape_instFlux", format="D", array=ft + fe * rng.standard_normal(idx.size)),
                fits.Column(name="base_SdssShape_instFluxErr", format="D", array=fe),
                fits.Column(name="spotgrid_index", format="D", array=idx.astype(float)),
                fits.Column(name="spotgrid_x", format="D", array=gx[idx]),
                fits.Column(name="spotgrid_y", format="D", array=gy[idx])]
        info = fits.BinTableHDU.from_columns([fits.Column(name="NORMALIZED_DX", format="D", array=np.zeros(2401))],
                                             name="GRID_INFO")
        for k, v in dict(X0=x0, Y0=y0, XSTEP=65.3, YSTEP=65.3, THETA=0.004, NCOLS=49, NROWS=49).items():
            info.header[k] = v
        name = f"MC_C_20201110_{j:06d}_R22_S20_20.0s_{x0:.1f}x_{y0:.1f}y_gridfit.cat"
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols), info]).writeto(directory / name)


STAGES = {
    "calibrate": """
from spotflat import read_grids, build_calibration
g = read_grids(D, detector="R22_S20"); build_calibration(g)
""",
    "calibrate_noqc": """
from spotflat import read_grids, build_calibration
g = read_grids(D, detector="R22_S20"); build_calibration(g, qc=False)
""",
    "starflat": """
from spotflat import read_grids
from spotflat.starflat import solve_starflat
import time
g = read_grids(D, detector="R22_S20")
ts = time.perf_counter()  # (not t0: that times the whole stage, read included)
st = solve_starflat(g.x, g.y, g.flux, g.flux_err, shape=(4004, 4096), binsize=B)
EXTRA["solve_s"] = time.perf_counter() - ts
EXTRA["summary"] = st.summary()
""",
    "response_cli": """
from click.testing import CliRunner
from spotflat.cli import main
import tempfile
r = CliRunner().invoke(main, ["response", D, "--detector", "R22_S20", "--binsize", str(B), "-o", tempfile.mkdtemp(), "-q", "--nboot", "50"])
assert r.exit_code == 0, r.output
""",
}


def run_stage(stage: str, directory: Path, binsize: int) -> dict:
    code = f"""
import json, resource, time
D = {str(directory)!r}; B = {binsize}; EXTRA = {{}}
t0 = time.perf_counter()
{STAGES[stage]}
dt = time.perf_counter() - t0
print(json.dumps(dict(time=dt, rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **EXTRA)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1400, help="number of exposures (files)")
    ap.add_argument("--binsize", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dir", default=None, help="write the files here (kept; reused when present) instead of a "
                                                 "temporary folder")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-qc", action="store_true", help="baseline: calibrate without its quality control only")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.dir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        if len(list(d.glob("*_gridfit.cat"))) != args.n:
            t0 = time.perf_counter()
            write_files(d, args.n)
            print(f"wrote {args.n} files in {time.perf_counter() - t0:.1f} s")
        stages = ([] if args.skip_qc else ["calibrate"]) + ["calibrate_noqc", "starflat"] + (
            [] if args.skip_cli else ["response_cli"])
        best: dict = {}
        for _ in range(args.repeat):
            for s in stages:
                r = run_stage(s, d, args.binsize)
                if s not in best or r["time"] < best[s]["time"]:
                    best[s] = r
        base = best.get("calibrate", {"time": np.nan})["time"]
        base0 = best["calibrate_noqc"]["time"]
        for s in stages:
            r = best[s]
            extra = f"  (inner solve {r['solve_s']:.1f} s; {r['summary']})" if "solve_s" in r else ""
            print(f"{s:14s} {r['time']:7.2f} s  {r['time'] / base:6.2f}x calibrate  {r['time'] / base0:6.2f}x "
                  f"calibrate without QC  peak RSS {r['rss_mib']:6.0f} MiB{extra}")


if __name__ == "__main__":
    main()
