"""Benchmark the simulator: response map, spot measurement, whole run.

Run as ``python benchmarks/bench_simulate.py [--ndither 50] [--detector R22_S11]``.
Prints wall times, their ratio to a baseline measured in the same run (one
CCD-sized float32 Gaussian draw: the least any per-pixel map costs) and the
peak memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn, repeat: int = 1):
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ndither", type=int, default=50, help="exposures in the run (default 50)")
    ap.add_argument("--detector", default="R22_S11")
    ap.add_argument("--format", default="dm", choices=["dm", "legacy"])
    args = ap.parse_args(argv)

    from spotflat.geometry import ccd_shape
    from spotflat.response import response_map
    from spotflat.simulate import footprint_moments, simulate_run, simulate_spots

    shape = ccd_shape(args.detector)
    rng = np.random.default_rng(0)
    t_base, _ = _timed(lambda: rng.standard_normal(shape, dtype=np.float32), repeat=3)
    t_resp, resp = _timed(lambda: response_map(args.detector, seed=1))
    t_spots, sim = _timed(lambda: simulate_spots(resp, ndither=args.ndither, seed=2))
    npt = sim.flux.size
    t_fm, _ = _timed(lambda: footprint_moments(resp, sim.x_true, sim.y_true, sim.xx_true,
                                               sim.yy_true, sim.xy_true))
    with tempfile.TemporaryDirectory() as tmp:
        t_run, res = _timed(lambda: simulate_run(Path(tmp) / "run", detector=args.detector,
                                                 ndither=args.ndither, fmt=args.format, seed=3))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows = [
        ("baseline: CCD-size float32 normal draw", t_base),
        ("response_map (full CCD, all components)", t_resp),
        (f"simulate_spots ({npt} points)", t_spots),
        (f"footprint_moments ({npt} points)", t_fm),
        (f"simulate_run ({args.ndither} {args.format} files + flat + truth)", t_run),
    ]
    print(f"detector {args.detector} {shape}, 49 x 49 spots x {args.ndither} dithers")
    for name, t in rows:
        print(f"  {name:<58s} {t:8.3f} s  {t / t_base:7.1f} x baseline")
    print(f"  footprint_moments per point: {t_fm / npt * 1e6:.2f} us")
    print(f"  peak memory (max RSS): {peak_mb:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
