"""Benchmark: sample a full CCD flat at every spot of every dither.

Samples a 4004 x 4096 (E2V) flat at ``nspots x ndither`` positions (default
2401 x 1400 = 3.36 M) with a Gaussian footprint of sigma 2.2 px and compares
with plain bilinear interpolation of the same positions
(``scipy.ndimage.map_coordinates(flat, coords, order=1)``), measured in the
same run. The positions are a 49 x 49 spot grid with random dithers of up to
+-``--dither`` px, stored ``[spot, exposure]`` as the correlate step does.

Each timing is repeated (``--repeat``) and interleaved with the baseline; the
minimum and median are printed with their ratios, and the peak memory
(traced numpy allocations during one call, and the process's maximum RSS).

Usage::

    python benchmarks/bench_flats.py            # full size
    python benchmarks/bench_flats.py --ndither 100 --repeat 2
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import tracemalloc

import numpy as np
from scipy import ndimage

from spotflat.footprint import sample_flat


def _positions(rng, shape, nside, ndither, dither):
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(60, nx - 60, nside), np.linspace(60, ny - 60, nside))
    x = gx.reshape(-1, 1) + rng.uniform(-dither, dither, (nside * nside, ndither))
    y = gy.reshape(-1, 1) + rng.uniform(-dither, dither, (nside * nside, ndither))
    return x, y


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nside", type=int, default=49, help="spots per grid side (49 -> 2401 spots)")
    p.add_argument("--ndither", type=int, default=1400, help="exposures (dithers)")
    p.add_argument("--dither", type=float, default=40.0, help="dither half-range, px")
    p.add_argument("--sigma", type=float, default=2.2, help="Gaussian footprint sigma, px")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--masked", type=int, default=2000,
                   help="also time a flat with this many NaN pixels (0: skip)")
    args = p.parse_args(argv)

    rng = np.random.default_rng(42)
    shape = (4004, 4096)
    flat = (1.0 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    x, y = _positions(rng, shape, args.nside, args.ndither, args.dither)
    coords = np.array([y.ravel(), x.ravel()])
    print(f"flat {shape[0]} x {shape[1]} float32; {x.shape[0]} x {x.shape[1]} = {x.size:,} positions; "
          f"sigma {args.sigma} px")

    cases = {
        "map_coordinates order=1 (baseline)": lambda: ndimage.map_coordinates(flat, coords, order=1),
        f"sample_flat sigma={args.sigma}": lambda: sample_flat(flat, x, y, sigma=args.sigma),
    }
    if args.masked:
        bad = flat.copy()
        bad[rng.integers(0, shape[0], args.masked), rng.integers(0, shape[1], args.masked)] = np.nan
        bad[:, 1000] = np.nan  # and a bad column
        cases[f"sample_flat sigma={args.sigma}, {args.masked} NaN px + a bad column"] = (
            lambda: sample_flat(bad, x, y, sigma=args.sigma))
        cases["sample_flat radius=5 (top-hat)"] = lambda: sample_flat(flat, x, y, radius=5.0)

    times = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    base = times[next(iter(cases))]
    bmin, bmed = min(base), statistics.median(base)
    print(f"\n{'case':<62} {'min s':>7} {'median s':>9} {'ratio(min)':>11} {'ratio(med)':>11}")
    for name, ts in times.items():
        print(f"{name:<62} {min(ts):7.3f} {statistics.median(ts):9.3f} "
              f"{min(ts) / bmin:11.2f} {statistics.median(ts) / bmed:11.2f}")

    peak_base = _peak(cases[next(iter(cases))])
    peak_q = _peak(lambda: sample_flat(flat, x, y, sigma=args.sigma))
    print(f"\npeak traced memory during one call: baseline {peak_base / 2**20:.0f} MiB, "
          f"sample_flat {peak_q / 2**20:.0f} MiB (inputs: flat {flat.nbytes / 2**20:.0f} MiB, "
          f"x+y {2 * x.nbytes / 2**20:.0f} MiB, held outside)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"process peak RSS: {rss:.2f} GiB (target < 2 GiB)")


if __name__ == "__main__":
    main()
