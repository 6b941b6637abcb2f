"""Benchmark the geometry transforms against a bare numpy affine transform.

Times, on the same N random points (10 million by default):

(0) the baseline: a bare numpy 2-d affine ``u = a*x + b*y + c; v = d*x + e*y + f``;
(a) ``ccd_to_focal`` (with its range check) on a science CCD;
(b) ``focal_to_ccd``;
(c) the round trip CCD -> focal -> CCD, (a) + (b), also checked for exactness;
(d) ``focal_to_detector`` (detector numbers; points anywhere on the focal plane);
(e) ``focal_to_detector`` returning detector names (object array);
(f) (d) for points on one raft (R22) only, the usual case of spot data.

Prints points per second and the ratio of each to the baseline (target:
within 3x), plus peak memory. Each time is the best of ``--repeat`` runs; the
baseline is re-timed right before every run of every step and the ratio is the
median of those paired ratios, so that load from other processes on a shared
machine cancels out.

Usage::

    python benchmarks/bench_geometry.py --n 10000000
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="number of points")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best is kept)")
    parser.add_argument("--detector", default="R22_S11")
    args = parser.parse_args()

    from spotflat.geometry import ccd_to_focal, focal_to_ccd, get_camera

    cam = get_camera()
    d = cam.detector(args.detector)
    rng = np.random.default_rng(0)
    n = args.n
    x = rng.uniform(-0.5, d.nx - 0.5, n)
    y = rng.uniform(-0.5, d.ny - 0.5, n)
    fxa = rng.uniform(-330.0, 330.0, n)
    fya = rng.uniform(-330.0, 330.0, n)
    rfx = rng.uniform(-63.0, 63.0, n)
    rfy = rng.uniform(-63.0, 63.0, n)
    cam._lookup  # build the focal-plane lookup once, outside the timings
    a, b, c, dd, e, f = 0.01, 1e-5, -20.0, -1e-5, 0.01, 30.0

    def baseline():
        u = a * x + b * y + c
        v = dd * x + e * y + f
        return u, v

    fx, fy = ccd_to_focal(d, x, y)
    steps = {
        "ccd_to_focal": lambda: ccd_to_focal(d, x, y),
        "focal_to_ccd": lambda: focal_to_ccd(d, fx, fy),
        "ccd -> focal -> ccd": lambda: focal_to_ccd(d, *ccd_to_focal(d, x, y)),
        "focal_to_detector (index)": lambda: cam.focal_to_detector_index(fxa, fya),
        "focal_to_detector (names)": lambda: cam.focal_to_detector(fxa, fya),
        "focal_to_detector (one raft)": lambda: cam.focal_to_detector_index(rfx, rfy),
    }
    base_times, timings, ratios = [], {}, {}
    for name, fn in steps.items():
        pairs = []
        for _ in range(args.repeat):
            tb = best(baseline, 1)
            ts = best(fn, 1)
            base_times.append(tb)
            pairs.append((ts, ts / tb))
        timings[name] = min(t for t, _ in pairs)
        ratios[name] = float(np.median([r for _, r in pairs]))
    bx, by = focal_to_ccd(d, *ccd_to_focal(d, x, y))
    err = max(np.abs(bx - x).max(), np.abs(by - y).max())
    idx, _, _ = cam.focal_to_detector_index(fxa, fya)

    base = min(base_times)
    print(f"{n:,} points, detector {d.name}, best of {args.repeat}; ratio = median of paired runs")
    print(f"{'step':32s} {'time (s)':>9s} {'Mpoints/s':>10s} {'ratio':>7s}")
    print(f"{'bare numpy affine (baseline)':32s} {base:9.3f} {n / base / 1e6:10.1f} {1.0:7.2f}")
    for name, t in timings.items():
        print(f"{name:32s} {t:9.3f} {n / t / 1e6:10.1f} {ratios[name]:7.2f}")
    print(f"round-trip max error: {err:.2e} px; points on a CCD: {np.mean(idx >= 0):.1%}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
