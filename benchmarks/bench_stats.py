"""Benchmark of the correlation statistics step (spotflat.stats).

Times :func:`spotflat.stats.correlation_analysis` on ``nside x nside`` spots x
``nexp`` exposures with ``nboot`` bootstrap resamples, a block jackknife over
16 amplifier-like blocks and ``nnull`` null pairings, and reports its ratio to
one pass of :func:`numpy.corrcoef` over the same points, measured in the same
run. Also reports the peak memory (tracemalloc of the statistics step and the
process's maximum resident set size).

Run::

    python benchmarks/bench_stats.py                 # 2401 x 1400, complete data
    python benchmarks/bench_stats.py --missing 0.05  # 5 % of points missing
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np

from spotflat.stats import correlation_analysis


def best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nside", type=int, default=49, help="spot grid side (49 -> 2401 spots)")
    p.add_argument("--nexp", type=int, default=1400, help="exposures (dithers)")
    p.add_argument("--nboot", type=int, default=1000)
    p.add_argument("--nnull", type=int, default=1000)
    p.add_argument("--missing", type=float, default=0.0, help="fraction of points set to NaN")
    p.add_argument("--method", default="pearson", choices=["pearson", "spearman"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    rng = np.random.default_rng(1)
    nspot = args.nside ** 2
    q = 1 + 0.01 * rng.normal(size=(nspot, args.nexp))
    t = 1 + 0.9 * (q - 1) + 0.01 * rng.normal(size=q.shape)
    if args.missing > 0:
        t[rng.random(t.shape) < args.missing] = np.nan
    k = np.arange(nspot)
    # 16 amplifier-like blocks: 2 halves in rows x 8 segments in columns
    amp = (k % args.nside >= args.nside // 2) * 8 + (k // args.nside) * 8 // args.nside

    def corrcoef():
        ok = np.isfinite(t) & np.isfinite(q)
        return np.corrcoef(t[ok], q[ok])[0, 1] if args.missing > 0 else \
            np.corrcoef(t.ravel(), q.ravel())[0, 1]

    def analysis():
        return correlation_analysis(t, q, block="amp", block_labels=amp, nboot=args.nboot,
                                    nnull=args.nnull, seed=0, method=args.method)

    t_base, r_base = best_of(corrcoef, args.repeat)
    analysis()  # warm-up (imports, FFT plans)
    t_stat, res = best_of(analysis, args.repeat)
    tracemalloc.start()
    analysis()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    print(f"data: {nspot} spots x {args.nexp} exposures = {q.size / 1e6:.2f} M points, "
          f"missing {args.missing:.0%}, method {args.method}")
    print(f"np.corrcoef, one pass:        {t_base * 1e3:8.1f} ms   r = {r_base:.6f}")
    print(f"correlation_analysis (nboot={args.nboot}, block jackknife {res.nblocks} blocks, "
          f"nnull={res.nnull}): {t_stat * 1e3:8.1f} ms   r = {res.r:.6f}")
    print(f"ratio statistics / corrcoef:  {t_stat / t_base:8.1f}   (target <= 20)")
    print(f"peak traced memory of the statistics step: {peak / 2**20:.0f} MiB "
          f"(input arrays t, q: {2 * q.nbytes / 2**20:.0f} MiB)")
    print(f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(res)


if __name__ == "__main__":
    main()
